use pgtest::{PgPool, pg_test};

#[pg_test(max_connections = 2, max_connections = 3)]
async fn twice(pool: PgPool) {
    let _ = pool;
}

fn main() {}
