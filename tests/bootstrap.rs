//! The shared database is built once per migration set, however many
//! processes arrive together, and reused without admin connections.

mod common;

use std::time::Duration;

use common::{Cluster, PASSWORD, assert_passed, run, run_together, text};
use pgtest::{PgPool, Tenant, pg_test};
use sqlx::types::Uuid;

const NOTES_MIGRATION_MARKER: &str = "pgtest fixture: the notes migration ran";

#[pg_test(migrations = "tests/fixtures/notes", seed = "fixtures/seeds/note.sql")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_notes(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
    assert_one_seeded_note(pool, tenant).await
}

#[pg_test(
    migrations = "tests/fixtures/notes",
    seed = "fixtures/seeds/note.sql",
    isolation = "database"
)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_notes_in_a_database_of_its_own(
    pool: PgPool,
    tenant: Tenant,
) -> Result<(), sqlx::Error> {
    assert_one_seeded_note(pool, tenant).await
}

/// Two databases, each the run's shared copy of its migrations.
#[pg_test(
    database(migrations = "tests/fixtures/notes"),
    database(migrations = "tests/fixtures/posts")
)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_two_databases(notes: PgPool, posts: PgPool) -> Result<(), sqlx::Error> {
    assert_migrated(notes, posts).await
}

/// Two databases of its own, copies of each migrations' template.
#[pg_test(
    database(migrations = "tests/fixtures/notes"),
    database(migrations = "tests/fixtures/posts"),
    isolation = "database"
)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_two_databases_of_its_own(notes: PgPool, posts: PgPool) -> Result<(), sqlx::Error> {
    assert_migrated(notes, posts).await
}

async fn assert_migrated(notes: PgPool, posts: PgPool) -> Result<(), sqlx::Error> {
    for (pool, table) in [(notes, "notes"), (posts, "posts")] {
        let found: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(table)
            .fetch_one(&pool)
            .await?;
        assert!(found, "{table} is migrated");
    }
    Ok(())
}

async fn assert_one_seeded_note(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
    let mine: i64 = sqlx::query_scalar("select count(*) from notes where tenant_id = $1")
        .bind(tenant.id())
        .fetch_one(&pool)
        .await?;
    assert_eq!(mine, 1, "the seed inserted one note for this tenant");
    Ok(())
}

macro_rules! threaded_fixtures {
    ($($name:ident),*) => {$(
        #[pg_test(migrations = "tests/fixtures/notes", seed = "fixtures/seeds/note.sql")]
        #[ignore = "a fixture, run on threads of one process by the tests of this file"]
        async fn $name(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
            assert_one_seeded_note(pool, tenant).await
        }
    )*};
}
threaded_fixtures!(
    fixture_thread_a,
    fixture_thread_b,
    fixture_thread_c,
    fixture_thread_d
);

/// Inserts a second note, waits until `PGTEST_FIXTURE_PEERS` tenants have
/// notes (so that the peers really run at the same time), then checks that
/// its tenant-scoped view holds its own two notes only.
#[pg_test(migrations = "tests/fixtures/notes", seed = "fixtures/seeds/note.sql")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_tenant_sees_only_its_rows(
    pool: PgPool,
    tenant: Tenant,
) -> Result<(), sqlx::Error> {
    let peers: i64 = std::env::var("PGTEST_FIXTURE_PEERS")
        .unwrap()
        .parse()
        .unwrap();
    sqlx::query("insert into notes (body) values ('written by the test')")
        .execute(&pool)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tenants: i64 = sqlx::query_scalar("select count(distinct tenant_id) from notes")
            .fetch_one(&pool)
            .await?;
        if tenants >= peers {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {tenants} of {peers} peers wrote notes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen: Vec<(Uuid, String)> = sqlx::query_as(
        "select tenant_id, body from notes where tenant_id = current_setting('pgtest.tenant_id')::uuid order by body",
    )
    .fetch_all(&pool)
    .await?;
    let bodies: Vec<&str> = seen.iter().map(|(_, body)| body.as_str()).collect();
    assert_eq!(bodies, ["seeded for this tenant", "written by the test"]);
    assert!(seen.iter().all(|(owner, _)| *owner == tenant.id()));
    Ok(())
}

#[pg_test(migrations = "tests/fixtures/slow")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_slow(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("insert into slow values (1)")
        .execute(&pool)
        .await?;
    Ok(())
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn thirty_two_cold_processes_migrate_once_and_all_pass() {
    let cluster = Cluster::start(&[("log_statement", "all"), ("max_connections", "100")]);
    let outputs = run_together(32, |_| cluster.exact("fixture_notes"));
    for output in &outputs {
        assert_passed(output, 1);
    }
    assert_eq!(
        count(&cluster.log(), NOTES_MIGRATION_MARKER),
        1,
        "the migration ran exactly once"
    );
    let admin = |database: &str| {
        cluster
            .log()
            .lines()
            .filter(|line| {
                line.contains("connection authorized")
                    && line.contains(&format!("database={database} "))
                    && line.contains("application_name=pgtest bootstrap")
            })
            .count()
    };
    // On a new server, the first look for the lock database finds none,
    // and one connection to the URL's database makes it.
    assert_eq!(admin("postgres"), 1, "one process made the lock database");
    let admin_connections = admin("pgtest_locks") - 1;
    assert!(
        (4..=5).contains(&admin_connections),
        "one process per machine asked the server's capacity, one made sure of the lock \
         database for the machine's share keeper, and one built the template, copied it for \
         the run and swept; the others waited without an admin connection: \
         {admin_connections} admin connections"
    );
    let databases = cluster.pgtest_databases();
    assert_eq!(
        databases.len(),
        2,
        "a template, the run's copy, and no unfinished copy: {databases:?}"
    );
    assert!(databases[0].starts_with("pgtest_pgtest_"), "{databases:?}");
    assert!(
        cluster.run_database().starts_with(&databases[0]),
        "{databases:?}"
    );
    let notes = cluster.psql_in(
        &cluster.run_database(),
        "select count(distinct tenant_id) from notes",
    );
    assert_eq!(
        notes, "32",
        "each process wrote its seed note under its own tenant"
    );
}

#[test]
fn tests_on_threads_of_one_process_share_one_bootstrap() {
    let cluster = Cluster::start(&[("log_statement", "all")]);
    let output = run(cluster.fixture("fixture_thread_").arg("--test-threads=4"));
    assert_passed(&output, 4);
    assert_eq!(
        count(&cluster.log(), NOTES_MIGRATION_MARKER),
        1,
        "the migration ran exactly once"
    );
}

#[test]
fn a_warm_run_opens_no_admin_connection() {
    let cluster = Cluster::start(&[]);
    assert_passed(&run(cluster.exact("fixture_notes")), 1);
    let cold_log_len = cluster.log().len();
    assert_passed(&run(cluster.exact("fixture_notes")), 1);

    let warm_log = cluster.log()[cold_log_len..].to_owned();
    let connections: Vec<&str> = warm_log
        .lines()
        .filter(|line| line.contains("connection authorized"))
        .collect();
    let shared = cluster.run_database();
    assert!(
        connections
            .iter()
            .any(|line| line.contains(&format!("database={shared}"))),
        "the warm run connected to the shared database: {connections:#?}"
    );
    let elsewhere: Vec<&&str> = connections
        .iter()
        .filter(|line| !line.contains(&format!("database={shared}")))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "the warm run connected elsewhere: {elsewhere:#?}"
    );
}

/// The databases a second run of `fixture` connected to, and pgtest's
/// databases named `<template>_<suffix>` whose suffix `copy` accepts,
/// after the first run.
fn warm_connections(fixture: &str, copy: fn(&str) -> bool) -> (Vec<String>, Vec<String>) {
    let cluster = Cluster::start(&[]);
    assert_passed(&run(cluster.exact(fixture)), 1);
    let cold_log_len = cluster.log().len();
    assert_passed(&run(cluster.exact(fixture)), 1);
    let warm_log = cluster.log()[cold_log_len..].to_owned();
    let databases = warm_log
        .lines()
        .filter(|line| line.contains("connection authorized"))
        .filter_map(|line| {
            Some(
                line.split("database=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .to_owned(),
            )
        })
        .collect();
    let copies = cluster
        .pgtest_databases()
        .into_iter()
        .filter(|name| name.rsplit_once('_').is_some_and(|(_, last)| copy(last)))
        .collect();
    (databases, copies)
}

#[test]
fn a_warm_run_of_a_two_database_test_opens_no_admin_connection() {
    let (databases, copies) = warm_connections("fixture_two_databases", |suffix| {
        suffix.len() == 8 && suffix.starts_with('r')
    });
    assert_eq!(
        copies.len(),
        2,
        "the run's two shared databases: {copies:?}"
    );
    assert!(
        copies.iter().all(|copy| databases.contains(copy)),
        "the warm run connected to both shared databases: {databases:?}"
    );
    let elsewhere: Vec<&String> = databases
        .iter()
        .filter(|database| !copies.contains(database))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "the warm run connected elsewhere: {elsewhere:?}"
    );
}

#[test]
fn a_warm_run_of_a_two_database_test_in_databases_of_its_own_opens_no_admin_connection() {
    // The first run's two databases were put back as spares.
    let (databases, spares) = warm_connections("fixture_two_databases_of_its_own", |suffix| {
        suffix.len() == 8 && !suffix.starts_with('r')
    });
    assert_eq!(
        databases.len(),
        2,
        "one connection to each database: {databases:?}"
    );
    assert!(
        databases.iter().all(|database| spares.contains(database)),
        "the warm run connected only to the spares {spares:?}: {databases:?}"
    );
}

#[test]
fn a_bootstrap_killed_midway_is_rebuilt_by_the_next_run() {
    let cluster = Cluster::start(&[]);
    cluster.psql("alter role postgres set pgtest_fixture.slow = 'on'");
    let mut doomed = cluster
        .exact("fixture_slow")
        .spawn()
        .expect("start a fixture");
    cluster.wait_until(
        "select exists (select from pg_stat_activity where query like '%pg_sleep%' \
         and datname like 'pgtest%_building' and pid <> pg_backend_pid())",
        Duration::from_secs(60),
    );
    doomed.kill().expect("SIGKILL the bootstrapping process");
    let _ = doomed.wait();

    cluster.psql("alter role postgres reset pgtest_fixture.slow");
    let output = run(cluster.exact("fixture_slow"));
    assert_passed(&output, 1);
    let databases = cluster.pgtest_databases();
    assert_eq!(
        databases.len(),
        2,
        "a template, the run's copy, and the unfinished copy gone: {databases:?}"
    );
    assert!(
        databases.iter().all(|name| !name.ends_with("_building")),
        "{databases:?}"
    );
    assert_eq!(
        cluster.psql_in(&cluster.run_database(), "select count(*) from slow"),
        "1"
    );
}

#[test]
fn parallel_tests_with_different_tenants_never_see_each_others_rows() {
    let cluster = Cluster::start(&[]);
    let peers = 4;
    let outputs = run_together(peers, |_| {
        let mut command = cluster.fixture("fixture_tenant_sees_only_its_rows");
        command
            .arg("--exact")
            .env("PGTEST_FIXTURE_PEERS", peers.to_string());
        command
    });
    for output in &outputs {
        assert_passed(output, 1);
        assert!(!text(output).contains(common::PASSWORD));
    }
}

#[test]
fn rows_of_earlier_runs_do_not_pile_up() {
    let cluster = Cluster::start(&[]);
    for index in 0..20 {
        let mut command = cluster.exact("fixture_notes");
        command.env("NEXTEST_RUN_ID", format!("run-{index}"));
        assert_passed(&run(command), 1);
    }
    let databases = cluster.pgtest_databases();
    assert_eq!(
        databases.len(),
        2,
        "the template and the last run's copy; earlier copies were swept: {databases:?}"
    );
    assert_eq!(
        cluster.psql_in(&cluster.run_database(), "select count(*) from notes"),
        "1",
        "only the last run's row"
    );
}

#[test]
fn a_development_database_named_by_database_url_is_left_as_it_was() {
    let cluster = Cluster::start(&[]);
    cluster.psql("create database app_dev");
    // A table of the same name as the migrations', which would show any
    // migration or seed that ran there.
    cluster.psql_in(
        "app_dev",
        "create table notes (id int primary key, body text); insert into notes values (1, 'mine')",
    );
    let before = cluster.dump("app_dev");
    let output = run(cluster
        .fixture("fixture_notes")
        .env_remove("PGTEST_DATABASE_URL")
        .env(
            "DATABASE_URL",
            cluster.url_for("postgres", PASSWORD, "app_dev"),
        ));
    assert_passed(&output, 2);
    assert_eq!(
        cluster.dump("app_dev"),
        before,
        "the development database changed"
    );
    assert!(
        !cluster.pgtest_databases().is_empty(),
        "the tests ran on databases of pgtest's own on that server"
    );
}
