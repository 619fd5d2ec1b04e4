use pgtest::{PgPool, sqlx_test};

#[sqlx_test(pool = "lazy")]
async fn misnamed(pool: PgPool) {
    let _ = pool;
}

fn main() {}
