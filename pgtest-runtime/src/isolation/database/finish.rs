//! The end of a test's hold on its own database: a passed test's put
//! back and listed here as a spare, or retired for the spares helper; a
//! failed test's kept for inspection, at most `PGTEST_KEEP_FAILED`.

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use crate::helpers::spares;
use crate::lock::LockFile;
use crate::recycle::{PutBack, Reset, Since, Stored};
use crate::registry::markers::Marker;
use crate::registry::statements;
use crate::session::Session;
use crate::wait::{Look, Pace, wait_until};
use crate::{Error, registry};

/// How long a passed test waits for a connection of its pool to put its
/// database back on, before it opens one.
const CONNECTION_BACK: Duration = Duration::from_millis(200);
/// How long a passed test waits for the sessions of its database to end
/// before it puts the database back.
const SESSIONS_END: Duration = Duration::from_secs(1);

/// Drops the database an earlier failure of `test` kept, of the failed
/// tests' databases `kept` here (with their tests): how many of them stay,
/// and the one dropped, if any. Entries of databases gone are forgotten.
async fn drop_earlier_failure(
    session: &Session,
    admin: &mut PgConnection,
    kept: Vec<(String, String)>,
    test: &str,
) -> (u32, Option<String>) {
    let existing = match statements::marked(admin).await.map(|(_, marked)| marked) {
        Ok(existing) => existing,
        Err(error) => {
            tracing::warn!(%error, "cannot list pgtest's databases");
            return (u32::try_from(kept.len()).unwrap_or(u32::MAX), None);
        }
    };
    let mut others = 0;
    let mut dropped = None;
    for (name, of) in kept {
        if !existing.iter().any(|(existing, _)| *existing == name) {
            session.dir.forget_failed(&name);
            continue;
        }
        if of == test && dropped.is_none() && drop_database(session, admin, &name, false).await {
            dropped = Some(name);
            continue;
        }
        others += 1;
    }
    (others, dropped)
}

/// Drops `database` and forgets its entries here, unless another process
/// holds its lock (this one does when `held`) or a session is connected to
/// it; whether it did.
async fn drop_database(
    session: &Session,
    admin: &mut PgConnection,
    database: &str,
    held: bool,
) -> bool {
    let lock = match held {
        true => None,
        false => match session.dir.hold(database) {
            Ok(Some(lock)) => Some(lock),
            _ => return false,
        },
    };
    let dropped = statements::drop_ours(admin, database, false).await;
    if !matches!(dropped, Ok(statements::Dropped::Gone)) {
        return false;
    }
    session.dir.forget(database);
    drop(lock);
    true
}

/// A test's own database, from its claim until the test ends.
pub(in crate::isolation) struct TestDatabase {
    pub(super) name: String,
    pub(super) template: String,
    /// The test's name.
    pub(super) test: &'static str,
    /// The role the test's connections take, if any.
    pub(super) role: Option<&'static str>,
    /// What this machine knows of the template's snapshot.
    pub(super) stored: Stored,
    /// What the database was like at the claim.
    pub(super) since: Since,
    /// Held while the test runs (and, when it fails, until the process
    /// ends): a sweeper that can take it knows the test is over.
    pub(super) lock: LockFile,
}

impl TestDatabase {
    /// A connection of the test's `pool` taken out of it, to put the
    /// database back on, when the pool has one to give at once and its
    /// connections are pgtest's role's (a test's `role` could not reset).
    pub(in crate::isolation) async fn connection_of(&self, pool: &PgPool) -> Option<PgConnection> {
        let Stored::Snapshot(snapshot) = &self.stored else {
            return None;
        };
        if self.role.is_some() {
            return None;
        }
        // Idle, or on its way back from the test (a ping away).
        let connection = tokio::time::timeout(CONNECTION_BACK, pool.acquire()).await;
        let mut connection = connection.ok()?.ok()?.detach();
        snapshot.ready(&mut connection).await.ok()?;
        Some(connection)
    }

    /// Ends the test's hold on its database, after its pool is closed: a
    /// passed test's database is put back (on `connection`, if given) and
    /// marked spare, or retired for the spares helper to drop after the
    /// run; a failed test's is kept (see [`Self::keep`]), and the returned
    /// text says what became of it.
    pub(in crate::isolation) async fn finish(
        self,
        passed: bool,
        session: &Session,
        connection: Option<PgConnection>,
    ) -> Option<String> {
        if !passed {
            return Some(self.keep(session).await);
        }
        let why = match self.put_back(session, connection).await {
            Ok(None) => return None,
            Ok(Some(why)) => why.to_owned(),
            Err(error) => format!("putting it back failed: {error}"),
        };
        tracing::debug!(database = self.name, why, "retired");
        session.dir.note_passed(&self.name);
        spares::helper_after_run(
            &session.dir,
            &session.server,
            &session.config,
            &session.budget,
        );
        None
    }

    /// Keeps a failed test's database for inspection until a later run
    /// sweeps it, at most `PGTEST_KEEP_FAILED` of them: the one an earlier
    /// failure of the same test kept is dropped (the newest of each test
    /// is kept), and when other tests' fill the limit, this one is dropped
    /// instead. What the failure message says of it.
    async fn keep(self, session: &Session) -> String {
        let server = &session.server;
        let limit = session.config.keep_failed;
        let kept: Vec<(String, String)> = session
            .dir
            .failed_databases()
            .into_iter()
            .filter(|(name, _)| *name != self.name)
            .collect();
        let mut admin = None;
        if !kept.is_empty() || limit == 0 {
            match registry::connect_admin(server).await {
                Ok(connection) => admin = Some(connection),
                Err(error) => tracing::warn!(%error, "cannot drop failed tests' databases"),
            }
        }
        let (others, dropped) = match admin.as_mut() {
            Some(admin) => drop_earlier_failure(session, admin, kept, self.test).await,
            None => (u32::try_from(kept.len()).unwrap_or(u32::MAX), None),
        };
        let own_dropped = match admin.as_mut() {
            Some(admin) if others >= limit => drop_database(session, admin, &self.name, true).await,
            _ => false,
        };
        if let Some(admin) = admin {
            let _ = admin.close().await;
        }
        if own_dropped {
            return format!(
                "its database {name} was dropped: {others} failed tests' databases are kept \
                 already (PGTEST_KEEP_FAILED={limit}); inspect and drop those, or raise the limit",
                name = self.name,
            );
        }
        session.dir.note_failed(&self.name, self.test);
        // Held until the process ends, so that this run's sweeps keep it.
        std::mem::forget(self.lock);
        let dropped = dropped
            .map(|database| format!(" (the one its failure before kept, {database}, is dropped)"))
            .unwrap_or_default();
        format!(
            "its database {name} is kept until a later run sweeps it{dropped}; \
             inspect it with: {psql} (or, even once the embedded server has stopped: \
             cargo pgtest psql {test}; install it with cargo install --path cargo-pgtest in a clone of pgtest)",
            name = self.name,
            psql = server.psql_command(&self.name),
            test = self.test,
        )
    }

    /// Puts the database back and marks it spare; why not, when it has to
    /// be retired instead.
    async fn put_back(
        &self,
        session: &Session,
        connection: Option<PgConnection>,
    ) -> Result<Option<&'static str>, Error> {
        let limit = session.config.spare_databases;
        if limit == 0 {
            return Ok(Some("PGTEST_SPARE_DATABASES is 0"));
        }
        let Stored::Snapshot(snapshot) = &self.stored else {
            return Ok(Some("its template's copies are not recycled"));
        };
        let server = &session.server;
        let failed = |error: sqlx::Error| {
            server.query_error(format!("putting database {} back", self.name), &error)
        };
        let mut connection = match connection {
            Some(connection) => connection,
            None => server.connect(&self.name).await?,
        };
        let spare = Marker::Spare {
            template: self.template.clone(),
        };
        let back = PutBack {
            database: &self.name,
            spare: &spare,
            limit,
        };
        // The test's sessions end as its pool closes; one that stays (a
        // pool the test built itself) may still change it.
        let deadline = Instant::now() + SESSIONS_END;
        let what = format!("the other sessions of {} to end", self.name);
        let result = wait_until(deadline, &what, Pace::Local, async || {
            let reset = snapshot.reset(&mut connection, &self.since, &back).await;
            Ok(match reset.map_err(failed)? {
                Reset::Busy => Look::Held("a session of the test's".to_owned()),
                Reset::Retire(why) => Look::Ready(Some(why)),
                Reset::Stale => {
                    session.dir.forget_snapshot(&self.template);
                    Look::Ready(Some(
                        "its relations are not those of this machine's snapshot (its template \
                         built anew, or a relation dropped or renamed)",
                    ))
                }
                Reset::Done {
                    tables,
                    sequences,
                    note,
                } => {
                    tracing::debug!(database = self.name, tables, sequences, "put back");
                    // For this machine's next test to claim without an
                    // admin connection.
                    session.dir.note_spare(&self.name, &note);
                    Look::Ready(None)
                }
            })
        })
        .await
        .map(|reset| reset.unwrap_or(Some("a session of the test's outlived it")));
        let _ = connection.close().await;
        result
    }
}
