use pgtest::{PgPool, pg_test};

#[pg_test(migrations = "./no/such/migrations")]
async fn nowhere(pool: PgPool) {
    let _ = pool;
}

fn main() {}
