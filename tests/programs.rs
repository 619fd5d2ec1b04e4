//! The runtime starts no program but the test binary itself (its helpers)
//! and PostgreSQL's `initdb`, `pg_ctl`, `postgres` and `pg_config`: suites
//! in every isolation mode and on the embedded server run with a `PATH` of
//! shims that log each call, and the runtime's sources are read for the
//! programs they start.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use common::{Cluster, EmbeddedHome, assert_passed, run, wait_for};
use pgtest::{PgPool, pg_test};
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

/// Programs a runtime might be tempted to start.
const SHIMMED: [&str; 12] = [
    "sh",
    "bash",
    "psql",
    "flock",
    "pg_config",
    "id",
    "cat",
    "kill",
    "ps",
    "rm",
    "mkdir",
    "env",
];

#[pg_test(migrations = "tests/fixtures/notes")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_shared(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select count(*) from notes")
        .execute(&pool)
        .await?;
    Ok(())
}

#[pg_test(isolation = "transaction", migrations = "tests/fixtures/notes")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_transaction(mut conn: PoolConnection<Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("select count(*) from notes")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[pg_test(isolation = "database", migrations = "tests/fixtures/notes")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_database(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select count(*) from notes")
        .execute(&pool)
        .await?;
    Ok(())
}

/// Where `program` is on this process's `PATH` (or in `/usr/bin`).
fn real(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A directory of shims that append their name and arguments to `log`,
/// then run the real program.
fn shims(dir: &Path, log: &Path) {
    for program in SHIMMED {
        let Some(real) = real(program) else { continue };
        let shim = dir.join(program);
        fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"{program} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                log.display(),
                real.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn suites_start_only_postgresql_and_themselves() {
    let work = tempfile::tempdir().unwrap();
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (bin, log) = (work.path().join("bin"), work.path().join("calls.log"));
    fs::create_dir(&bin).unwrap();
    fs::write(&log, "").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
    shims(&bin, &log);

    let cluster = Cluster::start(&[]);
    for fixture in ["fixture_shared", "fixture_transaction", "fixture_database"] {
        let mut command = cluster.exact(fixture);
        command.env("PATH", &bin);
        assert_passed(&run(command), 1);
    }
    // The spares helper's work after the run: a spare of the template.
    cluster.wait_until(
        "select count(*) = 1 from pg_database \
         where shobj_description(oid, 'pg_database') like 'pgtest: spare database;%'",
        Duration::from_secs(60),
    );

    let home = EmbeddedHome::new();
    let mut embedded = home.exact("fixture_shared");
    embedded
        .env("PATH", &bin)
        .env("PGTEST_EMBEDDED_IDLE", "1")
        .env_remove("PGTEST_PG_BIN");
    assert_passed(&run(embedded), 1);
    // The watchdog stops the server once idle.
    wait_for(
        "the watchdog to stop the server",
        Duration::from_secs(30),
        || home.postmaster_pid().is_none(),
    );

    let calls = fs::read_to_string(&log).unwrap();
    // The shims work: the embedded server's binaries were looked up.
    assert!(
        calls.contains("pg_config --bindir"),
        "no call logged:\n{calls}"
    );
    let others: Vec<&str> = calls
        .lines()
        .filter(|call| *call != "pg_config --bindir")
        .collect();
    assert!(
        others.is_empty(),
        "programs started besides PostgreSQL's:\n{calls}"
    );
}

#[test]
fn the_runtimes_sources_start_only_postgresql_and_the_test_binary() {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgtest-runtime/src");
    let allowed = [
        // The embedded server's user runs what `ServerUser::command` is
        // given: `server_command` and `postgres --version`.
        "Command::new(program)",
        "Command::new(&pg_config)",
        "Command::new(env::current_exe()?)",
        // `cargo pgtest psql`: PostgreSQL's own client.
        "Command::new(&self.psql_program)",
        ".server_command(\"initdb\")",
        ".server_command(\"postgres\")",
        ".server_command(\"pg_ctl\")",
        ".command(&self.binaries.program(program)",
        ".command(&dir.join(\"postgres\")",
    ];
    let mut found = Vec::new();
    let mut pending = vec![sources];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            for line in text.lines().map(str::trim) {
                let starts = ["Command::new(", ".server_command(", ".command(&"];
                if starts.iter().any(|start| line.contains(start)) && !line.starts_with("//") {
                    found.push(format!("{}: {line}", path.display()));
                }
            }
        }
    }
    let unexpected: Vec<&String> = found
        .iter()
        .filter(|line| !allowed.iter().any(|allowed| line.contains(allowed)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the runtime starts a program that is not PostgreSQL's or the test binary:\n{unexpected:#?}"
    );
    assert!(
        found.len() >= allowed.len(),
        "the scan found the known starts: {found:#?}"
    );
}
