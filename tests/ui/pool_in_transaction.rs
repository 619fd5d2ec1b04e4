use pgtest::pg_test;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

#[pg_test(isolation = "transaction", pool = "sqlx")]
async fn one_connection(conn: PoolConnection<Postgres>) {
    let _ = conn;
}

fn main() {}
