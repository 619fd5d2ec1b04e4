use pgtest::{PgPool, pg_test};

#[pg_test(migrations = false, migrator = "crate::MIGRATOR")]
async fn both(pool: PgPool) {
    let _ = pool;
}

fn main() {}
