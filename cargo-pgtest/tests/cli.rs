//! `cargo pgtest` end to end, as a user runs it: on the embedded server
//! (a failed test's database opened after the server stopped itself) and
//! on a server given by URL.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Cluster, EmbeddedHome, assert_failed_without_password, run, text, wait_for};
use pgtest::{PgPool, pg_test};

/// Fails after writing a row, in a database of its own, which pgtest keeps.
#[pg_test(isolation = "database", migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_fails_with_a_row(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("create table notes (body text)")
        .execute(&pool)
        .await?;
    sqlx::query("insert into notes values ('look at me')")
        .execute(&pool)
        .await?;
    panic!("failed on purpose");
}

/// `cargo pgtest args`, in this package, with `env`.
fn cargo_pgtest(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cargo-pgtest"));
    command
        .arg("pgtest")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env_remove("PGTEST_DATABASE_URL")
        .envs(env.iter().copied());
    let output = command.output().expect("run cargo-pgtest");
    assert!(
        !text(&output).contains(common::PASSWORD),
        "the password shows:\n{}",
        text(&output)
    );
    output
}

/// `cargo pgtest psql test` reads the row the failed fixture left.
fn assert_psql_reads_the_kept_row(test: &str, env: &[(&str, &str)]) {
    let args = ["psql", test, "--", "-At", "-c", "select body from notes"];
    assert_eq!(succeeded(&cargo_pgtest(&args, env)).trim(), "look at me");
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(output));
    text(output)
}

#[test]
fn on_the_embedded_server_a_failed_tests_database_opens_after_the_server_stopped() {
    let home = EmbeddedHome::new();
    let home_var = home.path().to_str().unwrap();
    let env = [("PGTEST_HOME", home_var)];
    let failed = run(home
        .exact("fixture_fails_with_a_row")
        .env("PGTEST_EMBEDDED_IDLE", "1"));
    let printed = assert_failed_without_password(&failed);
    assert!(
        printed.contains("cargo pgtest psql cli::fixture_fails_with_a_row"),
        "{printed}"
    );
    wait_for(
        "the watchdog to stop the idle server",
        Duration::from_secs(30),
        || home.postmaster_pid().is_none(),
    );

    assert_psql_reads_the_kept_row("fixture_fails_with_a_row", &env);

    let status = succeeded(&cargo_pgtest(&["status"], &env));
    for part in [
        "server: the embedded PostgreSQL",
        "used because no server URL is set",
        "kept: test `cli::fixture_fails_with_a_row` failed here",
        "template, used",
        "connection budget:",
    ] {
        assert!(status.contains(part), "no {part:?} in:\n{status}");
    }

    let before = home.databases();
    let dry = succeeded(&cargo_pgtest(&["clean", "--dry-run"], &env));
    assert!(dry.contains("would drop pgtest_"), "{dry}");
    assert_eq!(home.databases(), before, "a dry run dropped something");
    succeeded(&cargo_pgtest(&["clean"], &env));
    let left: Vec<String> = home
        .databases()
        .into_iter()
        .filter(|name| name.starts_with("pgtest"))
        .collect();
    assert_eq!(left, ["pgtest_locks"], "all but the lock database went");

    assert!(succeeded(&cargo_pgtest(&["stop"], &env)).contains("stopped the embedded server"));
    assert_eq!(home.postmaster_pid(), None);
    assert!(
        succeeded(&cargo_pgtest(&["stop"], &env))
            .contains("no embedded server of this package runs")
    );
}

#[test]
fn on_a_server_given_by_url_it_sees_opens_and_cleans_what_pgtest_made() {
    let cluster = Cluster::start(&[]);
    let url = cluster.url();
    let home = cluster.home();
    let env = [
        ("PGTEST_DATABASE_URL", url.as_str()),
        ("PGTEST_HOME", home.to_str().unwrap()),
    ];
    assert_failed_without_password(&run(cluster.exact("fixture_fails_with_a_row")));

    let status = succeeded(&cargo_pgtest(&["status"], &env));
    for part in [
        "used because its URL is PGTEST_DATABASE_URL",
        "kept: test `cli::fixture_fails_with_a_row` failed here",
    ] {
        assert!(status.contains(part), "no {part:?} in:\n{status}");
    }
    assert_psql_reads_the_kept_row("cli::fixture_fails_with_a_row", &env);
    let unknown = cargo_pgtest(&["psql", "no_such_test"], &env);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("`cargo pgtest status` lists both"),
        "{}",
        text(&unknown)
    );

    let before = cluster.pgtest_databases();
    assert!(!before.is_empty());
    succeeded(&cargo_pgtest(&["clean", "--dry-run"], &env));
    assert_eq!(cluster.pgtest_databases(), before);
    succeeded(&cargo_pgtest(&["clean"], &env));
    assert_eq!(cluster.pgtest_databases(), Vec::<String>::new());
    assert!(
        succeeded(&cargo_pgtest(&["stop"], &env))
            .contains("no embedded server of this package runs")
    );
    assert!(Path::new(env!("CARGO_BIN_EXE_cargo-pgtest")).is_file());
}
