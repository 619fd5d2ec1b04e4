use pgtest::{PgPool, pg_test};

#[pg_test]
fn not_async(pool: PgPool) {
    let _ = pool;
}

fn main() {}
