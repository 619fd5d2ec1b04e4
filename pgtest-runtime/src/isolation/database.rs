//! `isolation = "database"`: each test gets a database of its own that
//! holds exactly what a fresh copy of the template of its migrations and
//! fixtures does: a spare one (marked so: a passed test's database put
//! back, see [`crate::recycle`], or a copy the spares helper made), or,
//! when none is free, a new copy, `<template>_<8 hex>`.
//!
//! The warm path opens no admin connection: the spares this machine put
//! back are listed in the server's directory, and the test claims one on
//! its own pool's first connection, in the spare itself (under a
//! transaction advisory lock, as tests of other machines may claim the
//! same spare: still spare, then marked as the test's). Otherwise the test
//! opens an admin connection, makes sure the template is ready, claims a
//! spare listed by the server, or copies the template, and sweeps old
//! databases beside its body.
//!
//! The test holds an exclusive lock on its database's lock file while it
//! runs (until its process ends when it fails). A passed test puts its
//! database back and marks it spare again; one whose schema changed is
//! retired and dropped later (by the spares helper after the run, or by a
//! sweep); a failed test's stays for inspection until a later run. A test
//! killed midway leaves its database marked as its own, never handed out
//! again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use super::{Prepared, Teardown, run_scripts_on_pool, sweep_beside};
use crate::bootstrap::{self, Target};
use crate::budget::Slots;
use crate::catalog::Claimed;
use crate::error::sqlstate;
use crate::lock::{LockFile, Mode, Pauses, open_no_follow};
use crate::markers::{Kind, Marker, Origin};
use crate::migrations::Migrations;
use crate::pool::{self, TestPool};
use crate::recycle::{PutBack, Reset, Since, Snapshot, Stored};
use crate::session::Session;
use crate::state::{COPIERS, Entry};
use crate::{Error, Tenant, TestContext, catalog, names, spares};
use pgtest_core::TestSpec;

/// How many spares the server lists for a test to try to claim before it
/// copies the template (a claim fails when another test took it first).
const CLAIM_TRIES: i64 = 4;
/// How long a test waits for a database of its template to be put back,
/// once the template has as many as `PGTEST_TEMPLATE_COPIES`, before it
/// makes one more (the tests holding them may be slow ones).
const TURN_WAIT: Duration = Duration::from_secs(1);
/// How long a passed test waits for a connection of its pool to put its
/// database back on, before it opens one.
const CONNECTION_BACK: Duration = Duration::from_millis(200);
/// How long a passed test waits for the sessions of its database to end
/// before it puts the database back.
const SESSIONS_END: Duration = Duration::from_secs(1);

pub(super) async fn prepare(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let role = session.server.user();
    let template = names::template(spec.package, role, &migrations.hash, spec.fixtures);
    let claim = Claim {
        session,
        spec,
        tenant,
        template: &template,
    };
    // Without a spare, while others copy the template or while it has
    // copies enough, wait for a test to put one back (or for a copier's
    // turn) rather than copy too: copies are the server's slowest work, and
    // a test that puts one back usually takes far less.
    let deadline = Instant::now() + session.config.budget_timeout;
    let mut turn_since = None;
    let mut pauses = Pauses::new();
    let snapshot = session.dir.entry(Entry::Snapshot(&template));
    let mut stored = Stored::load(&snapshot);
    let (pool, database, admin) = loop {
        // Until a copy is made, and its snapshot taken.
        if let Stored::Missing = stored {
            stored = Stored::load(&snapshot);
        }
        stored = match claim.listed_here(stored).await? {
            Ok((pool, database)) => break (pool, database, None),
            Err(stored) => stored,
        };
        // Copies enough: its tests take turns on them, unless a turn takes
        // long.
        let take_turns = matches!(stored, Stored::Snapshot(_))
            && session.dir.databases_of(&template) >= session.config.template_copies as usize
            && turn_since.get_or_insert_with(Instant::now).elapsed() < TURN_WAIT;
        let copier = match stored {
            Stored::Unrecyclable => None,
            _ if take_turns => None,
            _ => session.dir.try_copier()?,
        };
        if copier.is_none() && !matches!(stored, Stored::Unrecyclable) {
            if Instant::now() >= deadline {
                return Err(Error::CopyTimeout {
                    template: template.clone(),
                    after: session.config.budget_timeout,
                    locks: (0..COPIERS)
                        .map(|index| {
                            session
                                .dir
                                .entry(Entry::Copier(index))
                                .display()
                                .to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            tokio::time::sleep(pauses.next_until(deadline)).await;
            continue;
        }
        let (pool, database, admin) = claim.with_admin(migrations, stored).await?;
        drop(copier);
        break (pool, database, Some(admin));
    };
    let name = database.name.clone();
    let context = TestContext::new(pool.pool, tenant, name, spec.name);
    let teardown = Teardown {
        cover: pool.cover,
        sweep: admin.map(|admin| sweep_beside(session, admin)),
        own: Some((Arc::clone(session), database)),
        more: Vec::new(),
    };
    // The fixtures are in the template.
    let seeds: Vec<_> = spec.seeds.iter().collect();
    run_scripts_on_pool(&session.server, &context, &seeds, spec).await?;
    Ok(Prepared { context, teardown })
}

/// A test that claims a database of its own.
struct Claim<'a> {
    session: &'a Session,
    spec: &'a TestSpec,
    tenant: Tenant,
    template: &'a str,
}

impl Claim<'_> {
    /// The warm path: a spare this machine put back, claimed on the test's
    /// pool, with no admin connection; `stored` back when there is none.
    async fn listed_here(
        &self,
        stored: Stored,
    ) -> Result<Result<(TestPool, TestDatabase), Stored>, Error> {
        // A role of the test's own may not mark the database.
        if self.spec.role.is_some() || !matches!(stored, Stored::Snapshot(_)) {
            return Ok(Err(stored));
        }
        let candidates = self.session.dir.spares(self.template);
        if candidates.is_empty() {
            return Ok(Err(stored));
        }
        let budget = &self.session.budget;
        let max = pool::max_for(self.spec, budget, 0)?;
        for name in candidates {
            // The spare's lock first: of the tests waiting for a spare, the
            // one that gets it goes on, the others look again.
            let Some(lock) = lock(self.session, &name)? else {
                continue;
            };
            let slots = budget.take(budget.upfront(max, 0), self.spec.name).await?;
            // On failure the slots are given back: the cold path takes its
            // own, for an admin connection too.
            if let Ok((pool, lock, since)) =
                self.try_claim(&name, lock, max, slots, 0, &stored).await?
            {
                let database = TestDatabase::new(self, name, stored, lock, since);
                return Ok(Ok((pool, database)));
            }
        }
        Ok(Err(stored))
    }

    /// The cold path, on an admin connection: the template made ready, a
    /// spare the server lists claimed, or a new copy made.
    async fn with_admin(
        &self,
        migrations: &Migrations,
        mut stored: Stored,
    ) -> Result<(TestPool, TestDatabase, PgConnection), Error> {
        let Session { server, .. } = self.session;
        let target = Target::template(
            self.template,
            &Marker::TEMPLATE,
            migrations,
            self.spec.fixtures,
        );
        // The pool's connections and an admin connection.
        let max = pool::max_for(self.spec, &self.session.budget, 1)?;
        let (mut slots, mut admin, now) =
            with_template(self.session, target, max, self.spec).await?;
        let spare = Marker::Spare {
            template: self.template.to_owned(),
        };
        let listed = catalog::marked_as(&mut admin, &spare, CLAIM_TRIES).await;
        let listed = listed.map_err(|error| {
            server.query_error(format!("listing spare copies of {}", self.template), &error)
        })?;
        for name in listed {
            let Some(lock) = lock(self.session, &name)? else {
                continue;
            };
            match self.try_claim(&name, lock, max, slots, 1, &stored).await? {
                Ok((pool, lock, since)) => {
                    // Untouched yet: as good as a fresh copy for a snapshot.
                    if let Stored::Missing = stored {
                        stored = take_snapshot(self.session, self.template, &name).await;
                    }
                    let database = TestDatabase::new(self, name, stored, lock, since);
                    return Ok((pool, database, admin));
                }
                Err(back) => slots = back,
            }
        }
        let name = names::own_copy(self.template, &uuid::Uuid::new_v4().simple().to_string());
        let lock = lock(self.session, &name)?.ok_or_else(|| {
            let held = std::io::Error::other("held by another process");
            self.session.dir.error(Entry::Live(&name), &held)
        })?;
        let marker = self.marker(&name).at(now);
        catalog::create(&mut admin, &name, Some(self.template), &marker)
            .await
            .map_err(|error| server.create_error(&name, &error))?;
        let horizon = catalog::horizon(&mut admin)
            .await
            .map_err(|error| server.query_error("reading the transaction horizon", &error))?;
        if let Stored::Missing = stored {
            stored = take_snapshot(self.session, self.template, &name).await;
        }
        let since = Since {
            horizon,
            counts: stored.snapshot().and_then(Snapshot::fresh_counts),
        };
        let pool = pool::test_pool(self.session, &name, self.tenant, self.spec, max).await;
        pool.cover.hold(slots, 1).await;
        let database = TestDatabase::new(self, name, stored, lock, since);
        Ok((pool, database, admin))
    }

    /// Claims the spare `name`, whose `lock` file the test holds, on a
    /// pool of the test's own, covered by `slots` (beside `others`
    /// connections): the pool, the lock and what the database was like at
    /// the claim, else the slots back.
    async fn try_claim(
        &self,
        name: &str,
        lock: LockFile,
        max: u32,
        slots: Slots,
        others: u32,
        stored: &Stored,
    ) -> Result<Result<(TestPool, LockFile, Since), Slots>, Error> {
        let session = self.session;
        let pool = pool::test_pool(session, name, self.tenant, self.spec, max).await;
        pool.cover.hold(slots, others).await;
        let spare = Marker::Spare {
            template: self.template.to_owned(),
        };
        let counts = stored.snapshot().and_then(Snapshot::written_counts);
        let claimed = async {
            let mut connection = pool.pool.acquire().await?;
            let marker = self.marker(name);
            catalog::claim(&mut connection, name, &spare, &marker, counts.as_deref()).await
        };
        let claimed = claimed.await;
        let _ = std::fs::remove_file(session.dir.entry(Entry::Spare(name)));
        match claimed {
            Ok(Claimed::Ours { horizon, counts }) => {
                Ok(Ok((pool, lock, Since { horizon, counts })))
            }
            Ok(Claimed::NotOurs(owner)) => {
                give_up(pool).await;
                let found = catalog::Found {
                    owner,
                    ours: false,
                    marker: None,
                };
                Err(session.server.foreign_database(name, &found))
            }
            // Taken by another machine's test, or gone.
            Ok(Claimed::Taken) => Ok(Err(give_up(pool).await)),
            Err(error) if sqlstate(&error).as_deref() == Some("3D000") => {
                Ok(Err(give_up(pool).await))
            }
            Err(error) => Err(session.server.connect_error(error, name, self.spec.role)),
        }
    }

    /// The marker of `name` as the test's database.
    fn marker(&self, name: &str) -> Marker {
        let lock = self.session.dir.entry(Entry::Live(name));
        Marker::Test(Origin::new(
            self.spec.name,
            &self.session.config.run_id,
            lock,
        ))
    }
}

/// Drops the database an earlier failure of `test` kept, of the failed
/// tests' databases `kept` here (with their tests): how many of them stay,
/// and the one dropped, if any. Entries of databases gone are forgotten.
async fn drop_earlier_failure(
    session: &Session,
    admin: &mut PgConnection,
    kept: Vec<(String, String)>,
    test: &str,
) -> (u32, Option<String>) {
    let existing = match catalog::marked(admin).await.map(|(_, marked)| marked) {
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
            let _ = std::fs::remove_file(session.dir.entry(Entry::Failed(&name)));
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
        false => match session.dir.lock(Entry::Live(database)) {
            Ok(lock) if lock.try_lock(Mode::Exclusive).unwrap_or(false) => Some(lock),
            _ => return false,
        },
    };
    let dropped = catalog::drop_ours(admin, database, false).await;
    if !matches!(dropped, Ok(catalog::Dropped::Gone)) {
        return false;
    }
    for entry in [Entry::Failed(database), Entry::Live(database)] {
        let _ = std::fs::remove_file(session.dir.entry(entry));
    }
    drop(lock);
    true
}

/// Closes `pool`, whose database could not be claimed; its slots back.
async fn give_up(pool: TestPool) -> Slots {
    pool.pool.close().await;
    pool.cover.release().await.expect("the slots it was given")
}

/// The lock file of `name`, taken; `None` when another test holds it.
fn lock(session: &Session, name: &str) -> Result<Option<LockFile>, Error> {
    let entry = Entry::Live(name);
    let lock = session.dir.lock(entry)?;
    let taken = lock.try_lock(Mode::Exclusive);
    Ok(taken
        .map_err(|error| session.dir.error(entry, &error))?
        .then_some(lock))
}

/// Makes sure the template is ready; takes the test's slots (for a pool
/// of `max` and the admin connection) and opens the admin connection that
/// copies it. The server's clock, read on the way.
async fn with_template(
    session: &Session,
    target: Target<'_>,
    max: u32,
    spec: &TestSpec,
) -> Result<(Slots, PgConnection, u64), Error> {
    let Session { server, budget, .. } = session;
    let slots = budget.take(budget.upfront(max, 1), spec.name).await?;
    let mut admin = server.connect_admin().await?;
    let (now, marker) = bootstrap::marker(server, &mut admin, target.database).await?;
    if let Some(marker) = marker.filter(|marker| marker.is_ready(Kind::Template)) {
        // The marker read here is the stamp: no second query per test.
        bootstrap::note_template_use(server, &mut admin, target.database, &marker, now).await?;
        return Ok((slots, admin, now));
    }
    // Built below (on the reserve; this test keeps its slots), stamped as
    // used by the build.
    let _ = admin.close().await;
    bootstrap::build_once(session, None, target, spec.role, spec.name).await?;
    let mut admin = server.connect_admin().await?;
    let (now, _) = bootstrap::marker(server, &mut admin, target.database).await?;
    Ok((slots, admin, now))
}

/// Takes the snapshot of `template` on its fresh copy `name`, and keeps it
/// for this machine's later tests; asks the spares helper for copies made
/// ahead when the template's copies cannot be recycled.
async fn take_snapshot(session: &Session, template: &str, name: &str) -> Stored {
    let server = &session.server;
    let taken = async {
        let mut connection = server.connect(name).await?;
        let snapshot = Snapshot::take(&mut connection).await;
        let _ = connection.close().await;
        snapshot.map_err(|error| server.query_error("taking a snapshot", &error))
    };
    let snapshot = match taken.await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            tracing::warn!(%error, "cannot take the template's snapshot");
            return Stored::Missing;
        }
    };
    let path = session.dir.entry(Entry::Snapshot(template));
    if let Err(error) = Stored::store(snapshot.as_ref(), &path) {
        tracing::warn!(%error, "cannot keep the template's snapshot");
    }
    match snapshot {
        Some(snapshot) => Stored::Snapshot(snapshot),
        None => Stored::Unrecyclable,
    }
}

/// A test's own database, from its claim until the test ends.
pub(super) struct TestDatabase {
    name: String,
    template: String,
    /// The test's name.
    test: &'static str,
    /// The role the test's connections take, if any.
    role: Option<&'static str>,
    /// What this machine knows of the template's snapshot.
    stored: Stored,
    /// What the database was like at the claim.
    since: Since,
    /// Held while the test runs (and, when it fails, until the process
    /// ends): a sweeper that can take it knows the test is over.
    lock: LockFile,
}

impl TestDatabase {
    /// The database `name` of the test `claim` made or claimed; asks the
    /// spares helper for a copy made ahead when the template's copies are
    /// not recycled.
    fn new(claim: &Claim<'_>, name: String, stored: Stored, lock: LockFile, since: Since) -> Self {
        if let Stored::Unrecyclable = stored {
            spares::want(claim.session, claim.template);
        }
        Self {
            name,
            template: claim.template.to_owned(),
            test: claim.spec.name,
            role: claim.spec.role,
            stored,
            since,
            lock,
        }
    }

    /// A connection of the test's `pool` taken out of it, to put the
    /// database back on, when the pool has one to give at once and its
    /// connections are pgtest's role's (a test's `role` could not reset).
    pub(super) async fn connection_of(&self, pool: &PgPool) -> Option<PgConnection> {
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
    pub(super) async fn finish(
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
        let _ = open_no_follow(&session.dir.entry(Entry::Passed(&self.name)), 0o600);
        spares::helper_after_run(session);
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
            match server.connect_admin().await {
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
        let entry = session.dir.entry(Entry::Failed(&self.name));
        if let Err(error) = std::fs::write(&entry, self.test) {
            tracing::warn!(%error, path = %entry.display(), "cannot list a kept database");
        }
        // Held until the process ends, so that this run's sweeps keep it.
        std::mem::forget(self.lock);
        let dropped = dropped
            .map(|database| format!(" (the one its failure before kept, {database}, is dropped)"))
            .unwrap_or_default();
        format!(
            "its database {name} is kept until a later run sweeps it{dropped}; \
             inspect it with: {psql} (or, even once the embedded server has stopped: \
             cargo pgtest psql {test}, from cargo install cargo-pgtest)",
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
        let mut pauses = Pauses::new();
        let result = loop {
            let reset = snapshot.reset(&mut connection, &self.since, &back).await;
            match reset.map_err(failed) {
                Ok(Reset::Busy) if Instant::now() >= deadline => {
                    break Ok(Some("a session of the test's outlived it"));
                }
                Ok(Reset::Busy) => tokio::time::sleep(pauses.next_until(deadline)).await,
                Ok(Reset::Retire(why)) => break Ok(Some(why)),
                Ok(Reset::Done { tables, sequences }) => {
                    tracing::debug!(database = self.name, tables, sequences, "put back");
                    // For this machine's next test to claim without an
                    // admin connection.
                    let entry = session.dir.entry(Entry::Spare(&self.name));
                    if let Err(error) = open_no_follow(&entry, 0o600) {
                        tracing::warn!(%error, "cannot list a spare database");
                    }
                    break Ok(None);
                }
                Err(error) => break Err(error),
            }
        };
        let _ = connection.close().await;
        result
    }
}
