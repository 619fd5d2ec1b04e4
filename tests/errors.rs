//! Every failure a user can hit names the test, says what happened and
//! what to do, comes in bounded time, and never shows the password.

mod common;

use std::time::Duration;

use common::{Cluster, PASSWORD, assert_failed_without_password, fixture, free_port, run};
use pgtest::{PgPool, pg_test};

#[pg_test(migrations = "tests/fixtures/notes")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_plain(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(&pool).await?;
    Ok(())
}

#[pg_test(migrations = "tests/fixtures/broken")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_broken_migration(pool: PgPool) {
    let _ = pool;
}

#[pg_test(
    migrations = "tests/fixtures/notes",
    seed = "fixtures/seeds/broken.sql"
)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_broken_seed(pool: PgPool) {
    let _ = pool;
}

#[pg_test(migrations = "tests/fixtures/notes", role = "no_such_role")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_missing_role(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(&pool).await?;
    Ok(())
}

/// Needs one connection more than the default pool has.
#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_needs_six_connections_at_once(pool: PgPool) -> Result<(), sqlx::Error> {
    common::hold_together(&pool, 6).await
}

/// The same, under a timeout of the test's own that ends it before the
/// pool's acquire timeout does.
#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_gives_up_before_its_pool_does(pool: PgPool) {
    let waited =
        tokio::time::timeout(Duration::from_secs(1), common::hold_together(&pool, 6)).await;
    assert!(waited.is_ok(), "the batch did not finish within 1 s");
}

/// A plain assertion failing in a transaction: its one connection is in
/// use at the failure, and no task waited for another.
#[pg_test(isolation = "transaction", migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_transaction_assert_fails(
    mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
) -> Result<(), sqlx::Error> {
    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut *conn).await?;
    assert_eq!(one, 2, "a plain assertion");
    Ok(())
}

/// The same in shared mode, inside a transaction of a pool of one.
#[pg_test(migrations = false, max_connections = 1)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_shared_fails_inside_begin(pool: PgPool) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut *transaction)
        .await?;
    assert_eq!(one, 2, "a plain assertion");
    transaction.commit().await
}

/// No `migrations/` beside this package's Cargo.toml: a table the test
/// expects is missing.
#[pg_test]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_expects_a_table_without_migrations(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select * from orgs").execute(&pool).await?;
    Ok(())
}

/// Runs a fixture against `url` and returns what it printed, checking that
/// it failed, named itself and kept the password out.
fn failure(test: &str, url: &str) -> String {
    let output = run(fixture(test, url).arg("--exact"));
    let text = assert_failed_without_password(&output);
    assert!(
        text.contains(&format!("pgtest: test `errors::{test}` could not start")),
        "the message names the test:\n{text}"
    );
    text
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "expected {part:?} in:\n{text}");
    }
}

#[test]
fn an_unreachable_server_is_reported_at_once() {
    let port = free_port();
    let text = failure(
        "fixture_plain",
        &format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/postgres"),
    );
    assert_contains(
        &text,
        &[
            &format!("cannot reach PostgreSQL at postgres://app:***@127.0.0.1:{port}/postgres"),
            "Start the server, or point PGTEST_DATABASE_URL at one that is running",
        ],
    );
}

#[test]
fn a_wrong_password_is_reported_as_a_refused_login() {
    let cluster = Cluster::start(&[]);
    let text = failure(
        "fixture_plain",
        &cluster.url_for("postgres", "not-the-password", "postgres"),
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert_contains(
        &text,
        &[
            "refused the login of role \"postgres\"",
            "password authentication failed",
            "Check the user and password in PGTEST_DATABASE_URL",
        ],
    );
}

#[test]
fn a_malformed_url_is_reported_with_the_password_masked() {
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:notaport/postgres");
    let text = failure("fixture_plain", &url);
    assert_contains(
        &text,
        &[
            "PGTEST_DATABASE_URL is not a usable PostgreSQL URL",
            "invalid port number",
            "postgres://USER:PASSWORD@HOST:PORT/DATABASE",
        ],
    );
}

#[test]
fn a_url_of_another_database_kind_is_refused() {
    let text = failure(
        "fixture_plain",
        &format!("mysql://app:{PASSWORD}@127.0.0.1/app"),
    );
    assert_contains(
        &text,
        &["the scheme is \"mysql\"", "pgtest needs postgres://"],
    );
}

#[test]
fn a_role_that_may_not_create_databases_is_told_how_to_grant_it() {
    let cluster = Cluster::start(&[]);
    cluster.psql(&format!("create role lowly login password '{PASSWORD}'"));
    let text = failure(
        "fixture_plain",
        &cluster.url_for("lowly", PASSWORD, "postgres"),
    );
    assert_contains(
        &text,
        &[
            "role \"lowly\" may not create databases",
            "permission denied to create database",
            "ALTER ROLE \"lowly\" CREATEDB",
        ],
    );
}

#[test]
fn a_failing_migration_is_named_with_the_sql_error() {
    let cluster = Cluster::start(&[]);
    let text = failure("fixture_broken_migration", &cluster.url());
    assert_contains(
        &text,
        &[
            "migration 20250102000000 (broken table) from",
            "tests/fixtures/broken failed while building the shared database pgtest_pgtest_",
            "syntax error at or near \"tabel\"",
            "Fix the migration",
        ],
    );
    assert!(
        cluster.pgtest_databases().is_empty(),
        "the unfinished copy was dropped"
    );
}

#[test]
fn a_failing_seed_is_named_with_the_sql_error() {
    let cluster = Cluster::start(&[]);
    let text = failure("fixture_broken_seed", &cluster.url());
    assert_contains(
        &text,
        &[
            "script fixtures/seeds/broken.sql failed",
            "relation \"no_such_table\" does not exist",
        ],
    );
}

#[test]
fn a_missing_role_says_how_to_create_and_grant_it() {
    let cluster = Cluster::start(&[]);
    let text = failure("fixture_missing_role", &cluster.url());
    assert_contains(
        &text,
        &[
            "cannot act as role \"no_such_role\"",
            "GRANT \"no_such_role\" TO \"postgres\"",
        ],
    );
}

#[test]
fn a_test_starved_by_its_own_pool_is_told_to_ask_for_more_connections() {
    let cluster = Cluster::start(&[]);
    let output = run(cluster
        .exact("fixture_needs_six_connections_at_once")
        .env("PGTEST_ACQUIRE_TIMEOUT", "1"));
    let text = assert_failed_without_password(&output);
    assert_contains(
        &text,
        &[
            "test `errors::fixture_needs_six_connections_at_once` returned an error: PoolTimedOut",
            "waited 1s for a connection from its pool of 5",
            "#[pg_test(max_connections = 6)]",
        ],
    );
}

#[test]
fn a_test_that_gives_up_first_is_still_told_its_pool_was_exhausted() {
    let cluster = Cluster::start(&[]);
    let output = run(cluster.exact("fixture_gives_up_before_its_pool_does"));
    let text = assert_failed_without_password(&output);
    assert_contains(
        &text,
        &[
            "the batch did not finish within 1 s",
            // All five in use, or, on a loaded machine, fewer opened yet.
            "test `errors::fixture_gives_up_before_its_pool_does` failed while ",
            "#[pg_test(max_connections = 6)]",
        ],
    );
}

#[test]
fn a_failing_test_whose_pool_no_task_waited_for_gets_no_pool_hint() {
    let cluster = Cluster::start(&[]);
    for fixture in [
        "fixture_transaction_assert_fails",
        "fixture_shared_fails_inside_begin",
    ] {
        let text = assert_failed_without_password(&run(cluster.exact(fixture)));
        assert!(text.contains("a plain assertion"), "{fixture}:\n{text}");
        assert!(
            !text.contains("max_connections") && !text.contains("connections of its pool"),
            "{fixture} got a pool hint:\n{text}"
        );
    }
    // A shared-mode failure says where its rows are.
    let text =
        assert_failed_without_password(&run(cluster.exact("fixture_shared_fails_inside_begin")));
    let database = cluster.run_database();
    assert_contains(
        &text,
        &[
            &format!("failed in the run's shared database {database} as tenant "),
            "its rows are those whose tenant_id is '",
            &format!(
                "inspect them with: psql -h '127.0.0.1' -p {}",
                cluster.port()
            ),
        ],
    );
}

#[test]
fn a_test_without_migrations_is_told_none_were_applied() {
    let cluster = Cluster::start(&[]);
    let text = assert_failed_without_password(&run(
        cluster.exact("fixture_expects_a_table_without_migrations")
    ));
    assert_contains(
        &text,
        &[
            "orgs",
            "does not exist",
            "ran with no migrations applied: there is no",
            concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"),
            "#[pg_test(migrations = \"path/to/migrations\")]",
        ],
    );
}
