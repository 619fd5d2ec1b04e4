//! The service's suite: each test runs a batch whose workers need several of
//! the pool's connections at once, through application code only. Written
//! for `#[sqlx::test]`, moved by changing the attribute's path
//! (`#[sqlx_test]`), and in pgtest's own style (`#[pg_test]`, rows scoped by
//! the tenant), both with their default pools.

use pgtest::{Tenant, pg_test, sqlx_test};
use pgtest_example_service::{parts, run_batch};
use sqlx::PgPool;

macro_rules! batches {
    ($($workers:literal => $pg_test:ident, $sqlx_test:ident;)*) => {$(
        #[pg_test]
        async fn $pg_test(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> {
            let batch = tenant.to_string();
            assert_eq!(run_batch(&pool, &batch, $workers).await?, $workers);
            Ok(())
        }

        #[sqlx_test]
        async fn $sqlx_test(pool: PgPool) -> anyhow::Result<()> {
            assert_eq!(run_batch(&pool, "nightly", $workers).await?, $workers);
            // A database of its own: the whole table is this test's.
            let all: i64 = sqlx::query_scalar("select count(*) from jobs").fetch_one(&pool).await?;
            assert_eq!(all, $workers);
            Ok(())
        }
    )*};
}

batches! {
    2 => two_workers_finish_a_batch, two_workers_finish_a_batch_in_a_database_of_their_own;
    3 => three_workers_finish_a_batch, three_workers_finish_a_batch_in_a_database_of_their_own;
    4 => four_workers_finish_a_batch, four_workers_finish_a_batch_in_a_database_of_their_own;
    5 => five_workers_finish_a_batch, five_workers_finish_a_batch_in_a_database_of_their_own;
}

#[pg_test]
async fn a_batch_nobody_ran_has_no_parts(pool: PgPool, tenant: Tenant) -> anyhow::Result<()> {
    assert_eq!(parts(&pool, &tenant.to_string()).await?, 0);
    Ok(())
}
