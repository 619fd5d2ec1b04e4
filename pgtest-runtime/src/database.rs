//! Databases copied from templates, and their sweeping.
//!
//! A template is migrated (and given its fixtures) once per migration set
//! and fixture set, and never connected to afterwards, so copies of it
//! never find it in use. Two kinds of copies:
//!
//! - a run's shared database, `<template>_r<7 hex>`: copied once per run
//!   (a nextest run, or the `cargo test` that started the process), so
//!   rows that tests leave behind never pile up across runs. Every process
//!   of the run holds a shared lock on the run's lock file while it lives;
//! - a test's own database (`isolation = "database"`), `<template>_<8 hex>`:
//!   a spare copy renamed (see [`crate::spares`]) or, when none is left, a
//!   new one. Its test holds an exclusive lock on its lock file while it
//!   runs, and until its process ends when it fails.
//!
//! Copies are swept, not dropped by their users: the drop is off the
//! tests' critical path (a passed test's database is left to the spares
//! helper, after the run, when one runs), and a failed test's database
//! stays for inspection until a later run. A copy is swept once nobody can be using
//! it: its lock file on this machine is free and it passed or belongs to
//! another run; a copy made on another machine, once it is a day old. The
//! sweeper holds the lock file while it drops, and `DROP DATABASE` without
//! `FORCE` refuses while anyone is connected, which guards the rest.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::Error;
use crate::bootstrap::{Kind, create_database, drop_database_unclaimed, now_secs, template_used};
use crate::budget::Budget;
use crate::migrations::Migrations;
use crate::names;
use crate::runner::Script;
use crate::server::Server;
use crate::spares::{self, SPARE_MARKER};

/// How a test database's comment starts.
const TEST_MARKER: &str = "pgtest: test database";
/// The most databases one sweep drops, so that no test waits long for the
/// sweep beside it (a drop can take a second on a busy server); with every
/// test sweeping, two each outpace the one each makes.
const SWEEP_BATCH: usize = 2;
/// Age after which a test database made on another machine is swept.
const FOREIGN_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a template may go without being copied before its spares are
/// swept (a migration edited makes a new template; the old one's spares
/// should not hold disk for a week).
const UNUSED_SPARE_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a template may go without being copied before it is swept
/// (along with the shared databases copied from it, long gone by then).
const UNUSED_TEMPLATE_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The name of the template for a migration set and fixture set.
pub(crate) fn template_name(package: &str, migrations: &Migrations, fixtures: &[Script]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"template\0");
    hash.update(migrations.hash.as_bytes());
    for fixture in fixtures {
        hash.update([0]);
        hash.update(fixture.path.as_bytes());
        hash.update([0]);
        hash.update(fixture.sql.as_bytes());
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    names::template(package, &hex)
}

/// The name of this run's shared database, a copy of `template`.
pub(crate) fn run_database_name(template: &str) -> String {
    let key: String = Sha256::digest(format!("{}\0{}", host(), run_id()))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    names::run_copy(template, &key)
}

/// The comment that marks this run's shared database ready, made by `test`.
pub(crate) fn run_database_comment(budget: &Budget, database: &str, test: &str) -> String {
    Comment {
        prefix: Kind::Shared.ready_marker(),
        test: test.to_owned(),
        host: host(),
        run: run_id(),
        created: now_secs(),
        lock: budget.file(&run_lock_name(database)),
    }
    .to_string()
}

fn run_lock_name(database: &str) -> String {
    format!("run-{database}.lock")
}

/// Marks this process as a user of the run's shared database `database`
/// for as long as it lives (a shared lock on the run's lock file), so that
/// no sweep drops it under the run. Waits while a sweep holds the file.
pub(crate) async fn hold_run_database(budget: &Budget, database: &str) -> Result<(), Error> {
    budget.hold_while_alive(&run_lock_name(database)).await
}

/// A test's own database, from its creation until the test ends.
pub(crate) struct TestDatabase {
    pub(crate) name: String,
    /// Held while the test runs (and, when it fails, until the process
    /// ends): a sweeper that can take it knows the creator is gone.
    lock: File,
    lock_path: PathBuf,
}

impl TestDatabase {
    /// Gives `test` a database of its own, a copy of `template`: a spare
    /// one if there is one to claim, else a new copy, made with `admin`.
    pub(crate) async fn create(
        server: &Server,
        budget: &Budget,
        admin: &mut PgConnection,
        template: &str,
        test: &str,
    ) -> Result<Self, Error> {
        let name = names::own_copy(template, &uuid::Uuid::new_v4().simple().to_string());
        let lock_path = budget.file(&format!("live-{name}.lock"));
        let lock = budget.open(&lock_path)?;
        lock.lock()
            .map_err(|error| budget.io_error(&lock_path, &error))?;
        let comment = Comment {
            prefix: TEST_MARKER,
            test: test.to_owned(),
            host: host(),
            run: run_id(),
            created: now_secs(),
            lock: lock_path.clone(),
        };
        let comment = comment.to_string();
        if !spares::claim(server, admin, template, &name, &comment).await? {
            create_database(server, admin, &name, Some(template), &comment).await?;
        }
        Ok(Self {
            name,
            lock,
            lock_path,
        })
    }

    /// Ends the test's hold on its database: a passed test's database is
    /// left for the next sweep; a failed test's is kept until a later run,
    /// and the returned text says how to inspect it.
    pub(crate) fn finish(self, passed: bool, server: &Server) -> Option<String> {
        if passed {
            let _ = fs::write(passed_path(&self.lock_path), b"");
            return None;
        }
        // Held until the process ends, so that this run's sweeps keep it.
        std::mem::forget(self.lock);
        Some(format!(
            "its database {name} is kept until a later run sweeps it; inspect it with: {psql}",
            name = self.name,
            psql = server.psql_command(&self.name),
        ))
    }
}

/// Drops a few of the copies of templates that nobody can be using any more
/// (but passed tests' databases when `leave_passed`, as the spares helper
/// drops those after the run), templates unused for a week and spares of
/// templates unused for a day, then closes `admin`. Processes sweep side by side, each
/// claiming a database before dropping it. Errors are logged, never a
/// test's failure.
pub(crate) async fn sweep(server: &Server, mut admin: PgConnection, leave_passed: bool) {
    if let Err(error) = sweep_with(server, &mut admin, leave_passed).await {
        tracing::warn!(%error, "sweeping old databases failed");
    }
    let _ = admin.close().await;
}

async fn sweep_with(
    server: &Server,
    admin: &mut PgConnection,
    leave_passed: bool,
) -> Result<(), Error> {
    let databases: Vec<(String, String)> = sqlx::query_as(
        "select datname, description from (select datname, shobj_description(oid, 'pg_database') as description \
         from pg_database) d where description like any($1) order by datname",
    )
    .bind(
        [TEST_MARKER, Kind::Shared.ready_marker(), Kind::Template.ready_marker(), SPARE_MARKER]
            .map(|marker| format!("{marker};%")),
    )
    .fetch_all(&mut *admin)
    .await
    .map_err(|error| server.query_error("listing templates and their copies", &error))?;
    let templates: HashMap<&str, u64> = databases
        .iter()
        .filter_map(|(name, description)| Some((name.as_str(), template_used(description)?)))
        .collect();
    let (host, run) = (host(), run_id());
    let mut dropped = 0;
    for (name, description) in &databases {
        if dropped == SWEEP_BATCH {
            break;
        }
        if let Some(used) = template_used(description) {
            if now_secs().saturating_sub(used) > UNUSED_TEMPLATE_AGE.as_secs() {
                tracing::debug!(database = name, "sweeping a template unused for a week");
                dropped += usize::from(drop_database_unclaimed(server, admin, name).await?);
            }
            continue;
        }
        if let Some(template) = spare_of(description) {
            let used = templates.get(template).copied().unwrap_or(0);
            if now_secs().saturating_sub(used) > UNUSED_SPARE_AGE.as_secs() {
                tracing::debug!(
                    database = name,
                    "sweeping a spare of a template unused for a day"
                );
                dropped += usize::from(drop_database_unclaimed(server, admin, name).await?);
            }
            continue;
        }
        let Some(comment) = Comment::parse(description) else {
            continue;
        };
        if leave_passed && passed_path(&comment.lock).exists() {
            continue;
        }
        // Held while dropping, so that nobody starts using it meanwhile.
        let Some(_lock) = comment.sweepable(&host, &run) else {
            continue;
        };
        tracing::debug!(database = name, test = comment.test, "sweeping");
        if drop_database_unclaimed(server, admin, name).await? {
            dropped += 1;
            let _ = fs::remove_file(passed_path(&comment.lock));
            let _ = fs::remove_file(&comment.lock);
        }
    }
    Ok(())
}

/// The template a spare was copied from, from its comment.
fn spare_of(description: &str) -> Option<&str> {
    description
        .strip_prefix(SPARE_MARKER)?
        .strip_prefix("; template=")
}

/// What the comment of a copy of a template records.
#[derive(Debug, PartialEq)]
struct Comment {
    /// What it is: [`TEST_MARKER`] or the shared database's ready marker.
    prefix: &'static str,
    /// The test that made it.
    test: String,
    host: String,
    run: String,
    created: u64,
    /// Last, as a path may hold anything but a quote.
    lock: PathBuf,
}

impl std::fmt::Display for Comment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = format!(
            "{}; test={}; host={}; run={}; created={}; lock={}",
            self.prefix,
            self.test,
            self.host,
            self.run,
            self.created,
            self.lock.display()
        );
        // It goes inside a SQL string literal.
        f.write_str(&text.replace('\'', "''"))
    }
}

impl Comment {
    fn parse(text: &str) -> Option<Self> {
        let prefix = [TEST_MARKER, Kind::Shared.ready_marker()]
            .into_iter()
            .find(|prefix| text.starts_with(&format!("{prefix}; ")))?;
        let rest = &text[prefix.len() + 2..];
        let (fields, lock) = rest.split_once("; lock=")?;
        let field = |key: &str| {
            fields
                .split("; ")
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            prefix,
            test: field("test")?,
            host: field("host")?,
            run: field("run")?,
            created: field("created")?.parse().ok()?,
            lock: PathBuf::from(lock),
        })
    }

    /// Whether nobody can be using the database any more (as far as this
    /// machine can tell) and it is not something this run keeps (its
    /// shared database, its failed tests' databases). When so, the lock
    /// file locked, if there is one, to hold while dropping.
    fn sweepable(&self, host: &str, run: &str) -> Option<Option<File>> {
        let old = now_secs().saturating_sub(self.created) > FOREIGN_AGE.as_secs();
        let by_age = || old.then_some(None);
        if self.host != host {
            return by_age();
        }
        let Ok(file) = File::open(&self.lock) else {
            return by_age();
        };
        match file.try_lock() {
            Ok(()) if passed_path(&self.lock).exists() || self.run != run => Some(Some(file)),
            Ok(()) | Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Error(_)) => by_age(),
        }
    }
}

fn passed_path(lock: &Path) -> PathBuf {
    lock.with_extension("passed")
}

/// This machine's name, from the system call (every platform has it).
fn host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Names the run this process belongs to: nextest's run id, else the
/// parent process (cargo test runs a suite's binaries as its children).
fn run_id() -> String {
    std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| format!("parent-{}", nix::unistd::getppid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comment() -> Comment {
        Comment {
            prefix: TEST_MARKER,
            test: "blog::tests::lists_posts".to_owned(),
            host: "ci-1".to_owned(),
            run: "run-a".to_owned(),
            created: now_secs(),
            lock: PathBuf::from("/tmp/x; y/live-a.lock"),
        }
    }

    #[test]
    fn a_comment_reads_back_what_was_written() {
        let written = comment();
        assert_eq!(Comment::parse(&written.to_string()), Some(written));
    }

    #[test]
    fn a_database_of_another_machine_is_swept_only_when_a_day_old() {
        let mut other = comment();
        assert!(other.sweepable("ci-2", "run-b").is_none());
        other.created -= FOREIGN_AGE.as_secs() + 1;
        assert!(other.sweepable("ci-2", "run-b").is_some());
    }

    #[test]
    fn a_live_user_keeps_a_copy_and_a_gone_one_leaves_it_to_other_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut mine = comment();
        mine.lock = dir.path().join("live-a.lock");
        let held = File::create(&mine.lock).unwrap();
        held.lock_shared().unwrap();
        let sweepable = |comment: &Comment, run| comment.sweepable("ci-1", run).is_some();
        assert!(!sweepable(&mine, "run-b"), "a user holds the lock");
        drop(held);
        assert!(
            !sweepable(&mine, "run-a"),
            "a failure is kept from its own run"
        );
        assert!(sweepable(&mine, "run-b"), "a later run sweeps it");
        fs::write(passed_path(&mine.lock), b"").unwrap();
        assert!(sweepable(&mine, "run-a"), "a passed test's goes at once");
    }

    #[test]
    fn a_spare_names_its_template() {
        let description = format!("{SPARE_MARKER}; template=pgtest_app_0123456789ab");
        assert_eq!(spare_of(&description), Some("pgtest_app_0123456789ab"));
        assert_eq!(spare_of(&comment().to_string()), None);
    }

    #[test]
    fn a_run_databases_comment_reads_back_too() {
        let run = Comment {
            prefix: Kind::Shared.ready_marker(),
            ..comment()
        };
        assert_eq!(Comment::parse(&run.to_string()), Some(run));
    }
}
