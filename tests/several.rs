//! Tests of two databases each (`database(…)` groups), in shared,
//! database and transaction isolation: a project of their own, 48 tests
//! (16 per mode), run by nextest (`-j 16`, a process per test) and by
//! `cargo test` (16 threads of one process) against a server of
//! `max_connections = 20`. Each test checks that each pool sees its own
//! migrations, fixtures and seeds, and that its mode's isolation holds on
//! both; all pass, and the server refuses no connection.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Cluster, finish, text};

/// A row's tenant: the test's, or none in a template's fixtures (in
/// `isolation = "database"`, fixtures are part of the template).
const TENANT: &str = "coalesce(nullif(current_setting('pgtest.tenant_id', true), ''), \
                      '00000000-0000-0000-0000-000000000000')::uuid";

const APP_MIGRATION: &str = "
create table orgs (
    id bigserial primary key,
    tenant_id uuid not null default {TENANT},
    name text not null,
    unique (tenant_id, name)
);
";

const AUDIT_MIGRATION: &str = "
create table kinds (name text primary key);
insert into kinds values ('fixture'), ('seed'), ('test'), ('tx');
create table events (
    id bigserial primary key,
    tenant_id uuid not null default {TENANT},
    kind text not null references kinds (name)
);
";

/// The suite: 16 tests per mode, each on an app database (`./migrations`,
/// fixture `orgs`) and an audit database (`./audit_migrations`, fixture
/// `audit`, seed `seeds/event.sql`).
const SUITE: &str = r#"
use pgtest::{PgPool, Tenant, pg_test};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

/// Whether the connection's database has the app's table and the audit's.
async fn tables(conn: &mut PgConnection) -> Result<(bool, bool), sqlx::Error> {
    sqlx::query_as("select to_regclass('orgs') is not null, to_regclass('events') is not null")
        .fetch_one(conn)
        .await
}

async fn database(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select current_database()::text").fetch_one(conn).await
}

async fn tenant_of(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select current_setting('pgtest.tenant_id')").fetch_one(conn).await
}

async fn count(conn: &mut PgConnection, sql: &'static str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(conn).await
}

/// Each database has its own migrations, and they are two databases.
async fn own_migrations(app: &mut PgConnection, audit: &mut PgConnection) -> Result<(), sqlx::Error> {
    assert_eq!(tables(app).await?, (true, false), "the app pool sees the app's migrations only");
    assert_eq!(tables(audit).await?, (false, true), "the audit pool sees the audit's only");
    assert_ne!(database(app).await?, database(audit).await?);
    Ok(())
}

const MINE_ORGS: &str = "select count(*) from orgs where tenant_id = current_setting('pgtest.tenant_id')::uuid";
const MINE_EVENTS: &str = "select count(*) from events where tenant_id = current_setting('pgtest.tenant_id')::uuid";

async fn shared_body(app: PgPool, audit: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
    // Both pools' connections held at once.
    let (mut a, mut b) = (app.acquire().await?, audit.acquire().await?);
    own_migrations(&mut a, &mut b).await?;
    // The tenant is on every connection of both pools; the fixtures and the
    // seed are the tenant's rows, among other tests' rows.
    assert_eq!(tenant_of(&mut a).await?, tenant.to_string());
    assert_eq!(tenant_of(&mut b).await?, tenant.to_string());
    assert_eq!(count(&mut a, MINE_ORGS).await?, 1);
    assert_eq!(count(&mut b, MINE_EVENTS).await?, 2);
    sqlx::query("insert into orgs (name) values ('second')").execute(&mut *a).await?;
    sqlx::query("insert into events (kind) values ('test')").execute(&mut *b).await?;
    assert_eq!(count(&mut a, MINE_ORGS).await?, 2);
    assert_eq!(count(&mut b, MINE_EVENTS).await?, 3);
    Ok(())
}

async fn database_body(app: PgPool, audit: PgPool) -> Result<(), sqlx::Error> {
    let (mut a, mut b) = (app.acquire().await?, audit.acquire().await?);
    own_migrations(&mut a, &mut b).await?;
    // Databases of the test's own: exactly their fixtures and seed, whatever
    // tests had them before (recycled), and rows with fixed keys.
    assert_eq!(count(&mut a, "select count(*) from orgs").await?, 1);
    assert_eq!(count(&mut b, "select count(*) from events").await?, 2);
    assert_eq!(count(&mut b, "select count(*) from kinds").await?, 4);
    sqlx::query("insert into orgs (id, tenant_id, name) values (1000, gen_random_uuid(), 'fixed')")
        .execute(&mut *a)
        .await?;
    sqlx::query("insert into kinds values ('only-here')").execute(&mut *b).await?;
    assert_eq!(count(&mut a, "select count(*) from orgs").await?, 2);
    assert_eq!(count(&mut b, "select count(*) from kinds").await?, 5);
    Ok(())
}

async fn transaction_body(
    mut app: PoolConnection<Postgres>,
    mut audit: PoolConnection<Postgres>,
    tenant: Tenant,
) -> Result<(), sqlx::Error> {
    own_migrations(&mut app, &mut audit).await?;
    assert_eq!(tenant_of(&mut app).await?, tenant.to_string());
    assert_eq!(tenant_of(&mut audit).await?, tenant.to_string());
    // Each connection is inside a transaction begun before the fixtures.
    for conn in [&mut *app, &mut *audit] {
        sqlx::query("select pg_sleep(0.01)").execute(&mut *conn).await?;
        let inside: bool = sqlx::query_scalar("select now() < statement_timestamp()")
            .fetch_one(&mut *conn)
            .await?;
        assert!(inside, "the connection is inside the test's transaction");
    }
    assert_eq!(count(&mut app, MINE_ORGS).await?, 1);
    assert_eq!(count(&mut audit, MINE_EVENTS).await?, 2);
    // Rolled back at the end: the harness finds none of these afterwards.
    sqlx::query("insert into orgs (name) values ('tx-' || current_setting('pgtest.tenant_id'))")
        .execute(&mut *app)
        .await?;
    sqlx::query("insert into events (kind) values ('tx')").execute(&mut *audit).await?;
    assert_eq!(count(&mut app, MINE_ORGS).await?, 2);
    assert_eq!(count(&mut audit, MINE_EVENTS).await?, 3);
    Ok(())
}

macro_rules! shared {
    ($($name:ident)*) => {$(
        #[pg_test(
            isolation = "shared",
            database(fixtures("orgs")),
            database(migrations = "./audit_migrations", fixtures("audit"), seed = "seeds/event.sql"),
        )]
        async fn $name(app: PgPool, audit: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
            crate::shared_body(app, audit, tenant).await
        }
    )*};
}

macro_rules! own_databases {
    ($($name:ident)*) => {$(
        #[pg_test(
            isolation = "database",
            database(fixtures("orgs")),
            database(migrations = "./audit_migrations", fixtures("audit"), seed = "seeds/event.sql"),
        )]
        async fn $name(app: PgPool, audit: PgPool) -> Result<(), sqlx::Error> {
            crate::database_body(app, audit).await
        }
    )*};
}

macro_rules! transactions {
    ($($name:ident)*) => {$(
        #[pg_test(
            isolation = "transaction",
            database(fixtures("orgs")),
            database(migrations = "./audit_migrations", fixtures("audit"), seed = "seeds/event.sql"),
        )]
        async fn $name(
            app: PoolConnection<Postgres>,
            audit: PoolConnection<Postgres>,
            tenant: Tenant,
        ) -> Result<(), sqlx::Error> {
            crate::transaction_body(app, audit, tenant).await
        }
    )*};
}

mod shared {
    use super::*;
    shared!(t00 t01 t02 t03 t04 t05 t06 t07 t08 t09 t10 t11 t12 t13 t14 t15);
}

mod database {
    use super::*;
    own_databases!(t00 t01 t02 t03 t04 t05 t06 t07 t08 t09 t10 t11 t12 t13 t14 t15);
}

mod transaction {
    use super::*;
    transactions!(t00 t01 t02 t03 t04 t05 t06 t07 t08 t09 t10 t11 t12 t13 t14 t15);
}
"#;

const TESTS: usize = 48;

fn write(root: &Path, path: &str, contents: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// The project, named `name`, written and its tests built. The tests of
/// this file run at once and build into one target directory: under one
/// name, cargo would find the second project's tests built already (the
/// same package, the same sources), with the first's directory, gone once
/// its test ends, as the migrations' place.
fn project(name: &str) -> tempfile::TempDir {
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    let manifest = common::project_manifest(name, "");
    write(root, "Cargo.toml", &manifest);
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    write(root, "src/lib.rs", "");
    let tenant = |migration: &str| migration.replace("{TENANT}", TENANT);
    write(
        root,
        "migrations/20250101000000_orgs.sql",
        &tenant(APP_MIGRATION),
    );
    write(
        root,
        "audit_migrations/20250101000000_events.sql",
        &tenant(AUDIT_MIGRATION),
    );
    write(
        root,
        "tests/fixtures/orgs.sql",
        "insert into orgs (name) values ('acme');\n",
    );
    write(
        root,
        "tests/fixtures/audit.sql",
        "insert into events (kind) values ('fixture');\n",
    );
    write(
        root,
        "tests/seeds/event.sql",
        "insert into events (kind) values ('seed');\n",
    );
    write(root, "tests/two.rs", SUITE);
    let built = cargo(root).args(["test", "--no-run"]).spawn().unwrap();
    let built = finish(built, Duration::from_secs(900));
    assert!(
        built.status.success(),
        "the project builds:\n{}",
        text(&built)
    );
    project
}

/// `cargo` in the project, offline, its output piped.
fn cargo(root: &Path) -> Command {
    let mut command = common::project_cargo();
    command
        .current_dir(root)
        .env("CARGO_NET_OFFLINE", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `command` in the project, against `cluster`, at most five minutes.
fn against(cluster: &Cluster, mut command: Command) -> Output {
    fs::create_dir_all(cluster.tmp_dir()).unwrap();
    command
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", cluster.socket_url())
        .env("PGTEST_HOME", cluster.home())
        .env("TMPDIR", cluster.tmp_dir())
        // Growing waits inside the pool's acquire: on 2 cores shared with
        // the rest of the suite, a wait may pass the default 30 s. What is
        // checked is that none fails and none is refused.
        .env("PGTEST_ACQUIRE_TIMEOUT", "120");
    finish(command.spawn().unwrap(), Duration::from_secs(300))
}

/// No row the transaction-mode tests wrote is left in any database.
fn assert_rolled_back(cluster: &Cluster) {
    let mut checked = (0, 0);
    for database in cluster.pgtest_databases() {
        let has = cluster.psql_in(
            &database,
            "select (to_regclass('orgs') is not null)::int, (to_regclass('events') is not null)::int",
        );
        if has.starts_with('1') {
            let left = cluster.psql_in(
                &database,
                "select count(*) from orgs where name like 'tx-%'",
            );
            assert_eq!(left, "0", "orgs rows of transaction tests in {database}");
            checked.0 += 1;
        }
        if has.ends_with('1') {
            let left = cluster.psql_in(&database, "select count(*) from events where kind = 'tx'");
            assert_eq!(left, "0", "events of transaction tests in {database}");
            checked.1 += 1;
        }
    }
    assert!(
        checked.0 > 0 && checked.1 > 0,
        "the app's and the audit's databases were looked at: {checked:?}"
    );
}

#[test]
fn two_database_tests_in_every_mode_pass_under_nextest_at_j16_on_twenty_connections() {
    let project = project("two-databases-nextest");
    let cluster = Cluster::start(&[("max_connections", "20")]);
    let mut nextest = cargo(project.path());
    nextest.args(["nextest", "run", "-j", "16", "--no-fail-fast"]);
    let output = against(&cluster, nextest);
    let printed = text(&output);
    assert!(
        output.status.success() && printed.contains(&format!("{TESTS} tests run: {TESTS} passed")),
        "all {TESTS} pass under nextest:\n{printed}"
    );
    assert_eq!(cluster.refusals(), 0, "the server refused no connection");
    assert_rolled_back(&cluster);
}

#[test]
fn two_database_tests_in_every_mode_pass_under_cargo_test_on_16_threads_on_twenty_connections() {
    let project = project("two-databases-cargo-test");
    let cluster = Cluster::start(&[("max_connections", "20")]);
    let mut cargo_test = cargo(project.path());
    cargo_test.args(["test", "--", "--test-threads=16"]);
    let output = against(&cluster, cargo_test);
    let printed = text(&output);
    assert!(
        output.status.success() && printed.contains(&format!("test result: ok. {TESTS} passed")),
        "all {TESTS} pass under cargo test:\n{printed}"
    );
    assert_eq!(cluster.refusals(), 0, "the server refused no connection");
    assert_rolled_back(&cluster);
}
