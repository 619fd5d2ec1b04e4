use pgtest::pg_test;
use sqlx::PgPool;

#[pg_test]
#[tokio::test]
async fn twice_a_test(pool: PgPool) {
    let _ = pool;
}

#[tokio::test]
#[pg_test]
async fn tokio_first(pool: PgPool) {
    let _ = pool;
}

#[pg_test]
#[test]
fn also_twice() {}

fn main() {}
