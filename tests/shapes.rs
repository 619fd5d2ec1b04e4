//! Every supported test shape, run for real against the configured server
//! (`PGTEST_DATABASE_URL` or `DATABASE_URL`).

use std::sync::LazyLock;

use pgtest::{PgPool, Tenant, TestContext, pg_test};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::types::Uuid;
use sqlx::{Acquire, SqlSafeStr};

#[pg_test(migrations = false)]
async fn a_pool_alone(pool: PgPool) {
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

/// On worker threads, as `#[tokio::test(flavor = "multi_thread")]` has
/// them: `block_in_place` works (it panics on a current-thread runtime).
#[pg_test(migrations = false, flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_thread_test_may_block_in_place(pool: PgPool) -> Result<(), sqlx::Error> {
    let handle = tokio::runtime::Handle::current();
    assert_eq!(
        handle.runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    let one: i32 = tokio::task::block_in_place(|| {
        handle.block_on(sqlx::query_scalar("select 1").fetch_one(&pool))
    })?;
    assert_eq!(one, 1);
    Ok(())
}

#[pg_test(migrations = false)]
async fn a_pool_and_a_tenant(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
    let setting: Uuid = sqlx::query_scalar("select current_setting('pgtest.tenant_id')::uuid")
        .fetch_one(&pool)
        .await?;
    assert_eq!(setting, tenant.id());
    Ok(())
}

#[pg_test(migrations = false)]
async fn a_context_names_the_database_test_and_tenant(ctx: TestContext) -> anyhow::Result<()> {
    let (database, application, tenant): (String, String, Uuid) = sqlx::query_as(
        "select current_database(), current_setting('application_name'), \
         current_setting('pgtest.tenant_id')::uuid",
    )
    .fetch_one(ctx.pool())
    .await?;
    assert_eq!(database, ctx.database());
    assert!(database.starts_with("pgtest_pgtest_"), "{database}");
    assert_eq!(
        ctx.test_name(),
        "shapes::a_context_names_the_database_test_and_tenant"
    );
    assert_eq!(application, ctx.test_name());
    assert_eq!(tenant, ctx.tenant().id());
    Ok(())
}

#[pg_test(migrations = false)]
async fn every_connection_of_the_pool_carries_the_tenant(
    pool: PgPool,
    tenant: Tenant,
) -> anyhow::Result<()> {
    let mut first = pool.acquire().await?;
    let mut second = pool.acquire().await?;
    for connection in [&mut first, &mut second] {
        let setting: Uuid = sqlx::query_scalar("select current_setting('pgtest.tenant_id')::uuid")
            .fetch_one(&mut **connection)
            .await?;
        assert_eq!(setting, tenant.id());
    }
    Ok(())
}

#[pg_test(migrations = false)]
#[should_panic(expected = "the body panicked")]
async fn a_panic_in_the_body_fails_the_test(pool: PgPool) {
    sqlx::query("select 1").execute(&pool).await.unwrap();
    panic!("the body panicked");
}

#[pg_test(migrations = false)]
#[should_panic(expected = "returned an error: Database")]
async fn an_err_fails_the_test_with_its_debug_text(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select * from no_such_table")
        .execute(&pool)
        .await?;
    Ok(())
}

#[pg_test(migrations = false)]
#[cfg_attr(all(), should_panic(expected = "through cfg_attr"))]
async fn cfg_attr_passes_through(pool: PgPool) {
    let _ = pool;
    panic!("through cfg_attr");
}

#[pg_test(migrations = false)]
#[ignore = "shows that #[ignore] passes through: this test would fail if it ran"]
async fn ignore_passes_through(pool: PgPool) {
    let _ = pool;
    panic!("an ignored test ran");
}

#[pg_test]
async fn an_async_test_without_arguments_needs_no_database() {
    tokio::task::yield_now().await;
}

#[pg_test]
fn a_sync_test_without_arguments_is_a_plain_test() {
    assert_eq!(2 + 2, 4);
}

/// A transaction holds one connection while the pool serves another query,
/// and `tokio::join!` runs two queries at once.
#[pg_test(migrations = false)]
async fn tests_may_use_several_connections_at_once(pool: PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("create temporary table t (id int)")
        .execute(&mut *tx)
        .await?;
    let outside: i32 = sqlx::query_scalar("select 2").fetch_one(&pool).await?;
    assert_eq!(outside, 2);
    tx.rollback().await?;

    let (a, b) = tokio::join!(
        sqlx::query_scalar::<_, i32>("select 1 from pg_sleep(0.05)").fetch_one(&pool),
        sqlx::query_scalar::<_, i32>("select 2 from pg_sleep(0.05)").fetch_one(&pool),
    );
    assert_eq!((a?, b?), (1, 2));
    Ok(())
}

#[pg_test(migrations = false, max_connections = 1)]
async fn max_connections_sizes_the_pool(pool: PgPool) -> anyhow::Result<()> {
    assert_eq!(pool.options().get_max_connections(), 1);
    let mut connection = pool.acquire().await?;
    let mut tx = connection.begin().await?;
    sqlx::query("select 1").execute(&mut *tx).await?;
    assert!(pool.try_acquire().is_none(), "the only connection is taken");
    tx.commit().await?;
    Ok(())
}

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "gadgets".into(),
        MigrationType::Simple,
        "create table gadgets (name text primary key)".into_sql_str(),
        false,
    )])
});

#[pg_test(migrator = "MIGRATOR")]
async fn a_static_migrator_builds_the_schema(pool: PgPool) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(tables, ["_sqlx_migrations", "gadgets"]);
    Ok(())
}

/// Local items named like what the generated code uses do not disturb it.
mod shadowing {
    #![allow(dead_code, non_camel_case_types)]

    use ::pgtest::{PgPool, pg_test};

    mod core {}
    mod pgtest {}
    struct TestSpec;
    struct MigrationSource;
    type Option = ();
    type Result = ();
    fn run() {}
    fn test() {}

    #[pg_test(migrations = false, crate = "::pgtest")]
    async fn shadowed_names_do_not_break_the_expansion(pool: PgPool) {
        sqlx::query("select 1").execute(&pool).await.unwrap();
    }
}
