//! With no server URL, the runtime starts (or reuses) an embedded cluster
//! of the machine's PostgreSQL binaries: one server however many processes
//! arrive, as root or as a normal user, stopping by itself when idle.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    EmbeddedHome, assert_failed_without_password, assert_passed, finish, run, run_together,
    server_user_command, text, wait_for,
};
use pgtest::{PgPool, pg_test};

const READY: &str = "database system is ready to accept connections";

#[pg_test(migrations = "tests/fixtures/notes", seed = "fixtures/seeds/note.sql")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_embedded(pool: PgPool) -> Result<(), sqlx::Error> {
    let notes: i64 = sqlx::query_scalar(
        "select count(*) from notes where tenant_id = current_setting('pgtest.tenant_id')::uuid",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(notes, 1);
    Ok(())
}

#[test]
fn with_no_url_many_processes_start_exactly_one_server() {
    let home = EmbeddedHome::new();
    let outputs = run_together(16, |_| home.exact("fixture_embedded"));
    for output in &outputs {
        assert_passed(output, 1);
    }
    assert_eq!(
        home.server_log().matches(READY).count(),
        1,
        "one server start:\n{}",
        home.server_log()
    );

    // A later run reuses the running server.
    assert_passed(&run(home.exact("fixture_embedded")), 1);
    assert_eq!(
        home.server_log().matches(READY).count(),
        1,
        "no second start"
    );
}

#[test]
fn runs_as_root_and_as_a_normal_user() {
    let home = EmbeddedHome::new();
    assert_passed(&run(home.exact("fixture_embedded")), 1);

    // As root, the server ran as the `postgres` user; now a normal user runs
    // the same suite against a home of its own.
    let Some(mut as_user) = server_user_command(&mut home.exact("fixture_embedded")) else {
        return; // already a normal user: the run above was that case
    };
    let user_home = EmbeddedHome::new();
    let status = Command::new("chown")
        .arg("postgres")
        .arg(user_home.path())
        .status()
        .unwrap();
    assert!(status.success());
    as_user
        .env("PGTEST_HOME", user_home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = finish(
        as_user.spawn().expect("run as postgres"),
        Duration::from_secs(120),
    );
    assert_passed(&output, 1);
    assert!(
        user_home.postmaster_pid().is_some(),
        "the normal user's own server runs"
    );
}

#[test]
fn a_server_killed_with_its_pid_file_left_behind_does_not_block_the_next_run() {
    let home = EmbeddedHome::new();
    assert_passed(&run(home.exact("fixture_embedded")), 1);
    let pid = home.postmaster_pid().expect("a running server");
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(
        "the killed server's processes to exit",
        Duration::from_secs(30),
        || {
            let children = Command::new("pgrep")
                .args(["-P", &pid.to_string()])
                .output()
                .unwrap();
            !fs::exists(format!("/proc/{pid}")).unwrap() && children.stdout.is_empty()
        },
    );
    assert!(
        home.data_dir().unwrap().join("postmaster.pid").exists(),
        "the pid file is stale, not gone"
    );

    let output = run(home.exact("fixture_embedded"));
    assert_passed(&output, 1);
    assert_ne!(home.postmaster_pid(), Some(pid), "a new server runs");
}

#[test]
fn the_idle_server_stops_by_itself() {
    let home = EmbeddedHome::new();
    // No program on PATH (no sh, flock or psql): the watchdog needs none.
    let nothing = tempfile::tempdir().unwrap();
    let output = run(home
        .exact("fixture_embedded")
        .env("PGTEST_EMBEDDED_IDLE", "1")
        .env("PGTEST_PG_BIN", common::pg_bin())
        .env("PATH", nothing.path()));
    assert_passed(&output, 1);
    let watchdog_log =
        || fs::read_to_string(home.cluster().join("watchdog.log")).unwrap_or_default();
    wait_for(
        "the watchdog to stop the idle server",
        Duration::from_secs(30),
        || watchdog_log().contains("stopped the server after 1 s without a client"),
    );
    assert_eq!(home.postmaster_pid(), None, "the server is gone");
}

#[test]
fn missing_binaries_say_what_to_do() {
    let home = EmbeddedHome::new();
    let empty = tempfile::tempdir().unwrap();
    let output = run(home
        .exact("fixture_embedded")
        .env("PGTEST_PG_BIN", empty.path()));
    let text = assert_failed_without_password(&output);
    for part in [
        "test `embedded::fixture_embedded` could not start",
        "no PostgreSQL server binaries",
        &format!("PGTEST_PG_BIN={}", empty.path().display()),
        "apt-get install postgresql",
        "brew install postgresql@17",
    ] {
        assert!(text.contains(part), "expected {part:?} in:\n{text}");
    }
}

#[test]
fn pgtest_database_url_embedded_wins_over_database_url() {
    let home = EmbeddedHome::new();
    let output = run(home
        .exact("fixture_embedded")
        .env("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/app")
        .env("PGTEST_DATABASE_URL", "embedded"));
    assert_passed(&output, 1);
    assert!(
        home.postmaster_pid().is_some(),
        "the embedded server was used:\n{}",
        text(&output)
    );
}
