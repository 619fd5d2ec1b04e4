use pgtest::{PgPool, pg_test};

#[pg_test(migration = "./migrations")]
async fn misspelled(pool: PgPool) {
    let _ = pool;
}

fn main() {}
