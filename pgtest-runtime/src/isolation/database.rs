//! `isolation = "database"`: each test gets a database of its own that
//! holds exactly what a fresh copy of the template of its migrations and
//! fixtures does: a spare one (marked so: a passed test's database put
//! back, see [`crate::recycle`], or a copy the spares helper made), or,
//! when none is free, a new copy, `<template>_<8 hex>`.
//!
//! A test claims a spare under the database's advisory lock, and holds an
//! exclusive lock on its lock file while it runs (until its process ends
//! when it fails). A passed test puts its database back and marks it spare
//! again; one whose schema changed is retired and dropped later (by the
//! spares helper after the run, or by a sweep); a failed test's stays for
//! inspection until a later run. A test killed midway leaves its database
//! marked as its own, never handed out again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use super::{Prepared, Teardown, run_scripts_on_pool, sweep_beside};
use crate::bootstrap::{self, Source, Target};
use crate::budget::Slots;
use crate::lock::{LockFile, Mode, Pauses, open_no_follow};
use crate::markers::{Kind, Marker, Origin};
use crate::migrations::Migrations;
use crate::pool;
use crate::recycle::{Reset, Snapshot, Stored};
use crate::session::Session;
use crate::state::Entry;
use crate::{Error, Tenant, TestContext, catalog, names, spares};
use pgtest_core::TestSpec;

pub(super) async fn prepare(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let template = names::template(spec.package, &migrations.hash, spec.fixtures);
    let marker = Marker::template_used_now();
    let target = Target {
        database: &template,
        kind: Kind::Template,
        marker: &marker,
        source: Source::Build {
            migrations,
            fixtures: spec.fixtures,
        },
    };
    // The pool's connections and an admin connection.
    let max = pool::max_for(spec, &session.budget, 1)?;
    let (slots, mut admin) = with_template(session, target, max, spec).await?;
    let database = TestDatabase::claim(session, &mut admin, &template, spec).await?;
    let name = database.name.clone();
    let pool = pool::test_pool(session, &name, tenant, spec, max).await;
    pool.cover.hold(slots, 1).await;
    let context = TestContext::new(pool.pool, tenant, name, spec.name);
    let teardown = Teardown {
        cover: pool.cover,
        sweep: Some(sweep_beside(session, admin)),
        own: Some((Arc::clone(session), database)),
    };
    // The fixtures are in the template.
    let seeds: Vec<_> = spec.seeds.iter().collect();
    run_scripts_on_pool(&session.server, &context, &seeds, spec).await?;
    Ok(Prepared { context, teardown })
}

/// Makes sure the template is ready; takes the test's slots (for a pool
/// of `max` and the admin connection) and opens the admin connection that
/// copies it.
async fn with_template(
    session: &Session,
    target: Target<'_>,
    max: u32,
    spec: &TestSpec,
) -> Result<(Slots, PgConnection), Error> {
    let Session { server, budget, .. } = session;
    let slots = budget.take(budget.upfront(max, 1), spec.name).await?;
    let mut admin = server.connect(server.admin_database()).await?;
    let marker = bootstrap::marker(server, &mut admin, target.database).await?;
    if let Some(marker) = marker.filter(|marker| marker.is_ready(Kind::Template)) {
        // The marker read here is the stamp: no second query per test.
        bootstrap::note_template_use(server, &mut admin, target.database, &marker).await?;
        return Ok((slots, admin));
    }
    // Built below (on the reserve; this test keeps its slots), stamped as
    // used by the build.
    let _ = admin.close().await;
    bootstrap::build_once(session, None, target, spec.role, spec.name).await?;
    Ok((slots, server.connect(server.admin_database()).await?))
}

/// How many spares a test tries to claim before copying the template (a
/// claim fails when another test took the same spare first).
const CLAIM_TRIES: i64 = 4;
/// How long a passed test waits for a connection of its pool to put its
/// database back on, before it opens one.
const CONNECTION_BACK: Duration = Duration::from_millis(200);
/// How long a passed test waits for the sessions of its database to end
/// before it puts the database back.
const SESSIONS_END: Duration = Duration::from_secs(1);

/// A test's own database, from its claim until the test ends.
pub(super) struct TestDatabase {
    name: String,
    template: String,
    /// The role the test's connections take, if any.
    role: Option<&'static str>,
    /// What this machine knows of the template's snapshot.
    stored: Stored,
    /// Held while the test runs (and, when it fails, until the process
    /// ends): a sweeper that can take it knows the test is over.
    lock: LockFile,
}

impl TestDatabase {
    /// Gives the test `spec` a database of its own with `admin`: a spare of
    /// `template` if one is free, else a new copy.
    async fn claim(
        session: &Session,
        admin: &mut PgConnection,
        template: &str,
        spec: &TestSpec,
    ) -> Result<Self, Error> {
        let test = spec.name;
        let Session { server, dir, .. } = session;
        let failed = |error: sqlx::Error| {
            server.query_error(format!("claiming a spare copy of {template}"), &error)
        };
        let spare = Marker::Spare {
            template: template.to_owned(),
        };
        let spares = catalog::marked_as(admin, &spare, CLAIM_TRIES)
            .await
            .map_err(failed)?;
        for name in spares {
            let Some(lock) = Self::lock(session, &name)? else {
                continue;
            };
            // Under the advisory lock, as another machine's tests may
            // claim the same spare: still spare, then marked as this test's.
            if !catalog::try_advisory_lock(admin, &name)
                .await
                .map_err(failed)?
            {
                continue;
            }
            let claimed = match catalog::comment(admin, &name).await {
                Ok(comment)
                    if comment.as_deref().and_then(Marker::parse) == Some(spare.clone()) =>
                {
                    let marker = Self::marker(session, &name, test);
                    catalog::mark(admin, &name, &marker).await.map(|()| true)
                }
                other => other.map(|_| false),
            };
            catalog::advisory_unlock(admin, &name)
                .await
                .map_err(failed)?;
            if claimed.map_err(failed)? {
                return Ok(Self::claimed(session, name, template, spec.role, lock));
            }
        }
        let name = names::own_copy(template, &uuid::Uuid::new_v4().simple().to_string());
        let lock = Self::lock(session, &name)?.ok_or_else(|| {
            dir.error(
                Entry::Live(&name),
                &std::io::Error::other("held by another process"),
            )
        })?;
        let marker = Self::marker(session, &name, test);
        catalog::create(admin, &name, Some(template), &marker)
            .await
            .map_err(|error| server.create_error(&name, &error))?;
        let mut database = Self::claimed(session, name, template, spec.role, lock);
        if let Stored::Missing = database.stored {
            database.stored = database.take_snapshot(session).await;
        }
        Ok(database)
    }

    /// The database `name`, a copy of `template`, claimed (its `lock`
    /// taken); asks the spares helper for a copy made ahead when the
    /// template's copies are not recycled.
    fn claimed(
        session: &Session,
        name: String,
        template: &str,
        role: Option<&'static str>,
        lock: LockFile,
    ) -> Self {
        let stored = Stored::load(&session.dir.entry(Entry::Snapshot(template)));
        if let Stored::Unrecyclable = stored {
            spares::want(session, template);
        }
        Self {
            name,
            template: template.to_owned(),
            role,
            stored,
            lock,
        }
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

    /// The marker of `name` as `test`'s database.
    fn marker(session: &Session, name: &str, test: &str) -> Marker {
        let lock = session.dir.entry(Entry::Live(name));
        Marker::Test(Origin::now(test, &session.config.run_id, lock))
    }

    /// Takes the snapshot of the template on this fresh copy, and keeps it
    /// for this machine's later tests.
    async fn take_snapshot(&self, session: &Session) -> Stored {
        let server = &session.server;
        let taken = async {
            let mut connection = server.connect(&self.name).await?;
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
        let path = session.dir.entry(Entry::Snapshot(&self.template));
        if let Err(error) = Stored::store(snapshot.as_ref(), &path) {
            tracing::warn!(%error, "cannot keep the template's snapshot");
        }
        match snapshot {
            Some(snapshot) => Stored::Snapshot(snapshot),
            None => {
                spares::want(session, &self.template);
                Stored::Unrecyclable
            }
        }
    }

    /// A connection of the test's `pool` taken out of it, to put the
    /// database back on, when the pool has one to give at once and its
    /// connections are pgtest's role's (a test's `role` could not reset).
    pub(super) async fn connection_of(&self, pool: &PgPool) -> Option<PgConnection> {
        if self.role.is_some() || !matches!(self.stored, Stored::Snapshot(_)) {
            return None;
        }
        // Idle, or on its way back from the test (a ping away).
        let connection = tokio::time::timeout(CONNECTION_BACK, pool.acquire()).await;
        let mut connection = connection.ok()?.ok()?.detach();
        // Whatever the test set in its session (a role, a search path).
        let reset = catalog::run(&mut connection, "reset session authorization; reset all").await;
        reset.is_ok().then_some(connection)
    }

    /// Ends the test's hold on its database, after its pool is closed: a
    /// passed test's database is put back (on `connection`, if given) and
    /// marked spare, or retired for a later drop; a failed test's is kept
    /// until a later run, and the returned text says how to inspect it.
    pub(super) async fn finish(
        self,
        passed: bool,
        session: &Session,
        connection: Option<PgConnection>,
    ) -> Option<String> {
        let server = &session.server;
        if !passed {
            // Held until the process ends, so that this run's sweeps keep it.
            std::mem::forget(self.lock);
            return Some(format!(
                "its database {name} is kept until a later run sweeps it; inspect it with: {psql}",
                name = self.name,
                psql = server.psql_command(&self.name),
            ));
        }
        match self.put_back(session, connection).await {
            Ok(None) => {}
            Ok(Some(why)) => {
                tracing::debug!(database = self.name, why, "retired");
                let _ = open_no_follow(&session.dir.entry(Entry::Passed(&self.name)), 0o600);
            }
            Err(error) => {
                tracing::warn!(%error, database = self.name, "retired: putting it back failed");
                let _ = open_no_follow(&session.dir.entry(Entry::Passed(&self.name)), 0o600);
            }
        }
        None
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
        let result = async {
            // The test's sessions end as its pool closes; one that stays
            // (a pool the test built itself) may still change it.
            let deadline = Instant::now() + SESSIONS_END;
            let mut pauses = Pauses::new();
            while catalog::other_sessions(&mut connection)
                .await
                .map_err(failed)?
                > 0
            {
                if Instant::now() >= deadline {
                    return Ok(Some("a session of the test's outlived it"));
                }
                tokio::time::sleep(pauses.next_until(deadline)).await;
            }
            match snapshot.reset(&mut connection).await.map_err(failed)? {
                Reset::Retire(why) => return Ok(Some(why)),
                Reset::Done { tables, sequences } => {
                    tracing::debug!(database = self.name, tables, sequences, "put back");
                }
            }
            let spare = Marker::Spare {
                template: self.template.clone(),
            };
            let (spares, _) = catalog::count_and_size(&mut connection, &spare, &self.name)
                .await
                .map_err(failed)?;
            if spares >= limit {
                return Ok(Some("its template has PGTEST_SPARE_DATABASES spares"));
            }
            catalog::mark(&mut connection, &self.name, &spare)
                .await
                .map_err(failed)?;
            Ok(None)
        }
        .await;
        let _ = connection.close().await;
        result
    }
}
