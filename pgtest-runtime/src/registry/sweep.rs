//! Sweeping: dropping the copies of templates that nobody can be using any
//! more, templates unused for a week and spares of templates unused for a
//! day. Processes sweep side by side, a few databases each, beside a
//! test's body; each claims a database before dropping it.
//!
//! A copy is swept once nobody can be using it: its lock file on this
//! machine is free and it passed or belongs to another run; a copy made on
//! another machine (or by another user, whose lock files are not ours to
//! open), once it is a day old. The sweeper holds the lock file while it
//! drops, and `DROP DATABASE` without `FORCE` refuses while anyone is
//! connected, which guards the rest.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::path::Path;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::markers::{Marker, Origin, host};
use super::statements;
use crate::server::Server;
use crate::state::{Entry, ServerDir};
use crate::{Error, catalog};

/// The most databases one sweep drops, so that no test waits long for the
/// sweep beside it (a drop can take a second on a busy server); with every
/// test sweeping, two each outpace the one each makes.
const SWEEP_BATCH: usize = 2;
/// Age after which a copy made on another machine is swept.
const FOREIGN_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a template may go without being copied before its spares are
/// swept (a migration edited makes a new template; the old one's spares
/// should not hold disk for a week).
const UNUSED_SPARE_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a template may go without being copied before it is swept
/// (along with the shared databases copied from it, long gone by then).
const UNUSED_TEMPLATE_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What a sweep may drop, seen from one process.
pub(crate) struct Sweep<'a> {
    pub(crate) server: &'a Server,
    /// This user's directory of the server, where its copies' locks are.
    pub(crate) dir: &'a ServerDir,
    /// This process's run.
    pub(crate) run: &'a str,
    /// Leave passed tests' databases: the spares helper drops them after
    /// the run.
    pub(crate) leave_passed: bool,
}

impl Sweep<'_> {
    /// Drops a few databases nobody can be using (see the module's
    /// documentation), then closes `admin`. Errors are logged, never a
    /// test's failure.
    pub(crate) async fn run(&self, mut admin: PgConnection) {
        if let Err(error) = self.run_with(&mut admin).await {
            tracing::warn!(%error, "sweeping old databases failed");
        }
        let _ = admin.close().await;
    }

    async fn run_with(&self, admin: &mut PgConnection) -> Result<(), Error> {
        let (now, databases) = statements::marked(admin).await.map_err(|error| {
            self.server
                .query_error("listing templates and their copies", &error)
        })?;
        let templates: HashMap<&str, u64> = databases
            .iter()
            .filter_map(|(name, marker)| match marker {
                Some(Marker::Template { used }) => Some((name.as_str(), *used)),
                _ => None,
            })
            .collect();
        let host = host();
        let mut dropped = 0;
        for (name, marker) in &databases {
            if dropped == SWEEP_BATCH {
                break;
            }
            // One that cannot be dropped (a session in it, a privilege
            // gone) stops no sweep: the next is looked at.
            match self
                .sweep_one(admin, name, marker.as_ref(), &templates, &host, now)
                .await
            {
                Ok(true) => dropped += 1,
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, database = name, "not swept"),
            }
        }
        Ok(())
    }

    /// Drops the database `name`, marked `marker`, if nobody can be using
    /// it; whether it did. `now` is the server's clock.
    async fn sweep_one(
        &self,
        admin: &mut PgConnection,
        name: &str,
        marker: Option<&Marker>,
        templates: &HashMap<&str, u64>,
        host: &str,
        now: u64,
    ) -> Result<bool, Error> {
        let age = |since: u64| Duration::from_secs(now.saturating_sub(since));
        let (origin, lock) = match marker {
            Some(Marker::Template { used }) => {
                if age(*used) <= UNUSED_TEMPLATE_AGE {
                    return Ok(false);
                }
                tracing::debug!(database = name, "sweeping a template unused for a week");
                let gone = drop_unclaimed(self.server, admin, name).await?;
                if gone {
                    self.dir.forget_snapshot(name);
                }
                return Ok(gone);
            }
            Some(Marker::Spare { template }) => {
                let used = templates.get(template.as_str()).copied().unwrap_or(0);
                if age(used) <= UNUSED_SPARE_AGE {
                    return Ok(false);
                }
                tracing::debug!(database = name, "sweeping a spare of an unused template");
                return drop_unclaimed(self.server, admin, name).await;
            }
            Some(Marker::Test(origin)) => (origin, Entry::Live(name)),
            Some(Marker::Shared(origin)) => (origin, Entry::Run(name)),
            Some(Marker::Building(_) | Marker::LockDatabase) | None => return Ok(false),
        };
        let passed = self.dir.entry(Entry::Passed(name));
        if self.leave_passed && passed.exists() {
            return Ok(false);
        }
        let old = age(origin.created) > FOREIGN_AGE;
        // Held while dropping, so that nobody starts using it meanwhile.
        let Some(_lock) = sweepable(origin, &self.dir.entry(lock), &passed, host, self.run, old)
        else {
            return Ok(false);
        };
        tracing::debug!(database = name, test = origin.test, "sweeping");
        let gone = drop_unclaimed(self.server, admin, name).await?;
        if gone {
            match lock {
                Entry::Run(_) => drop(fs::remove_file(self.dir.entry(lock))),
                _ => self.dir.forget(name),
            }
        }
        Ok(gone)
    }
}

/// Whether nobody can be using the copy `origin` made (as far as this
/// machine can tell) and it is not something the run `run` keeps (its
/// shared database, its failed tests' databases). When so, its lock file
/// (at `lock`, when the copy is this user's) locked, to hold while
/// dropping. `old`: it was made more than a day ago.
fn sweepable(
    origin: &Origin,
    lock: &Path,
    passed: &Path,
    host: &str,
    run: &str,
    old: bool,
) -> Option<Option<File>> {
    let by_age = || old.then_some(None);
    // Another machine's, or another user's: its lock is not ours.
    if origin.host != host || origin.lock != lock {
        return by_age();
    }
    let Ok(file) = File::open(lock) else {
        return by_age();
    };
    match file.try_lock() {
        Ok(()) if passed.exists() || origin.run != run => Some(Some(file)),
        Ok(()) | Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Error(_)) => by_age(),
    }
}

/// Drops `database`, pgtest's role's, unless another process is building
/// or dropping it (its advisory lock is taken) or someone is connected to
/// it; whether it went.
async fn drop_unclaimed(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<bool, Error> {
    let failed = |action: &str, error: sqlx::Error| {
        server.query_error(format!("{action} {database}"), &error)
    };
    let claimed = catalog::try_advisory_lock(admin, database)
        .await
        .map_err(|error| failed("claiming", error))?;
    if !claimed {
        return Ok(false);
    }
    let dropped = statements::drop_ours(admin, database, false)
        .await
        .map_err(|error| failed("dropping database", error));
    catalog::advisory_unlock(admin, database)
        .await
        .map_err(|error| failed("releasing", error))?;
    dropped.map(|dropped| dropped == statements::Dropped::Gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_swept_when_nobody_can_use_it_and_its_run_keeps_no_failure() {
        let home = tempfile::tempdir().unwrap();
        let dir = ServerDir::unchecked(home.path());
        let (lock, passed) = (dir.entry(Entry::Live("db")), dir.entry(Entry::Passed("db")));
        let origin = Origin {
            test: "blog::tests::lists_posts".to_owned(),
            host: "ci-1".to_owned(),
            run: "run-a".to_owned(),
            created: 1_764_800_000,
            lock: lock.clone(),
        };
        let here =
            |origin: &Origin, run| sweepable(origin, &lock, &passed, "ci-1", run, false).is_some();
        let held = File::create(&lock).unwrap();
        held.lock_shared().unwrap();
        assert!(!here(&origin, "run-b"), "a user holds the lock");
        drop(held);
        assert!(
            !here(&origin, "run-a"),
            "a failure is kept from its own run"
        );
        assert!(here(&origin, "run-b"), "a later run sweeps it");
        fs::write(&passed, b"").unwrap();
        assert!(here(&origin, "run-a"), "a passed test's goes at once");
        let foreign = |origin: &Origin, old| {
            sweepable(origin, &lock, &passed, "ci-2", "run-b", old).is_some()
        };
        assert!(!foreign(&origin, false), "another machine's, made today");
        assert!(foreign(&origin, true), "another machine's, a day old");
        let elsewhere = Origin {
            lock: home.path().join("elsewhere/live-db.lock"),
            ..origin.clone()
        };
        assert!(
            !here(&elsewhere, "run-b"),
            "a lock that is not this user's is not opened"
        );
    }
}
