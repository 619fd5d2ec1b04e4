use pgtest::{PgPool, pg_test};

#[pg_test]
#[tokio::test]
async fn twice_a_test(pool: PgPool) {
    let _ = pool;
}

#[pg_test]
#[test]
fn also_twice() {}

fn main() {}
