use pgtest::{PgPool, pg_test};

#[pg_test(isolation = "transaction", migrations = false)]
async fn commits_for_real(pool: PgPool) {
    let _ = pool;
}

fn main() {}
