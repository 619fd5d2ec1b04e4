//! Claiming a test's own database: a spare listed here, on the test's own
//! pool (the warm path: no admin connection), or on an admin connection a
//! spare the server lists or a new copy of the template, made ready first.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::finish::TestDatabase;
use crate::bootstrap::{self, Target};
use crate::budget::Slots;
use crate::error::sqlstate;
use crate::helpers::spares;
use crate::lock::LockFile;
use crate::migrations::Migrations;
use crate::pool::{self, TestPool};
use crate::recycle::{Since, Snapshot, Stored};
use crate::registry::markers::{Kind, Marker, Origin};
use crate::registry::statements::{self, Claimed};
use crate::registry::{self, names};
use crate::session::Session;
use crate::state::Entry;
use crate::{Error, Tenant, catalog};
use pgtest_core::TestSpec;

/// How many spares the server lists for a test to try to claim before it
/// copies the template (a claim fails when another test took it first).
const CLAIM_TRIES: i64 = 4;

/// A test that claims a database of its own.
pub(super) struct Claim<'a> {
    pub(super) session: &'a Session,
    pub(super) spec: &'a TestSpec,
    pub(super) tenant: Tenant,
    pub(super) template: &'a str,
}

impl Claim<'_> {
    /// The warm path: a spare this machine put back, claimed on the test's
    /// pool, with no admin connection; `stored` back when there is none.
    pub(super) async fn listed_here(
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
            let Some(lock) = self.session.dir.hold(&name)? else {
                continue;
            };
            let noted = self.session.dir.spare_note(&name);
            let slots = budget.take(budget.upfront(max, 0), self.spec.name).await?;
            // On failure the slots are given back: the cold path takes its
            // own, for an admin connection too.
            if let Ok((pool, lock, since)) =
                self.try_claim(&name, lock, max, slots, 0, &stored).await?
            {
                let since = Since { noted, ..since };
                let database = self.database(name, stored, lock, since);
                return Ok(Ok((pool, database)));
            }
        }
        Ok(Err(stored))
    }

    /// The cold path, on an admin connection: the template made ready, a
    /// spare the server lists claimed, or a new copy made.
    pub(super) async fn with_admin(
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
        let listed = statements::marked_as(&mut admin, &spare, CLAIM_TRIES).await;
        let listed = listed.map_err(|error| {
            server.query_error(format!("listing spare copies of {}", self.template), &error)
        })?;
        for name in listed {
            let Some(lock) = self.session.dir.hold(&name)? else {
                continue;
            };
            match self.try_claim(&name, lock, max, slots, 1, &stored).await? {
                Ok((pool, lock, since)) => {
                    // Untouched yet: as good as a fresh copy for a snapshot.
                    if let Stored::Missing = stored {
                        stored = take_snapshot(self.session, self.template, &name).await;
                    }
                    let database = self.database(name, stored, lock, since);
                    return Ok((pool, database, admin));
                }
                Err(back) => slots = back,
            }
        }
        let name = names::own_copy(self.template, &uuid::Uuid::new_v4().simple().to_string());
        let lock = self.session.dir.hold(&name)?.ok_or_else(|| {
            let held = std::io::Error::other("held by another process");
            self.session.dir.error(Entry::Live(&name), &held)
        })?;
        let marker = self.marker(&name).at(now);
        statements::create(&mut admin, &name, Some(self.template), &marker)
            .await
            .map_err(|error| registry::create_error(server, &name, &error))?;
        let horizon = catalog::horizon(&mut admin)
            .await
            .map_err(|error| server.query_error("reading the transaction horizon", &error))?;
        if let Stored::Missing = stored {
            stored = take_snapshot(self.session, self.template, &name).await;
        }
        let since = Since {
            horizon,
            counts: stored.snapshot().and_then(Snapshot::fresh_counts),
            noted: None,
        };
        let pool = pool::test_pool(self.session, &name, self.tenant, self.spec, max).await;
        pool.cover.hold(slots, 1).await;
        let database = self.database(name, stored, lock, since);
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
            statements::claim(&mut connection, name, &spare, &marker, counts.as_deref()).await
        };
        let claimed = claimed.await;
        session.dir.forget_spare(name);
        match claimed {
            Ok(Claimed::Ours { horizon, counts }) => {
                let since = Since {
                    horizon,
                    counts,
                    noted: None,
                };
                Ok(Ok((pool, lock, since)))
            }
            Ok(Claimed::NotOurs(owner)) => {
                give_up(pool).await;
                let found = statements::Found {
                    owner,
                    ours: false,
                    marker: None,
                };
                Err(registry::foreign_database(&session.server, name, &found))
            }
            // Taken by another machine's test, or gone.
            Ok(Claimed::Taken) => Ok(Err(give_up(pool).await)),
            Err(error) if sqlstate(&error).as_deref() == Some("3D000") => {
                Ok(Err(give_up(pool).await))
            }
            Err(error) => Err(session.server.connect_error(error, name, self.spec.role)),
        }
    }

    /// The database `name` this test made or claimed; asks the spares
    /// helper for a copy made ahead when the template's copies are not
    /// recycled.
    fn database(&self, name: String, stored: Stored, lock: LockFile, since: Since) -> TestDatabase {
        if let Stored::Unrecyclable = stored {
            let Session {
                dir,
                server,
                config,
                budget,
                ..
            } = self.session;
            spares::want(dir, server, config, budget, self.template);
        }
        TestDatabase {
            name,
            template: self.template.to_owned(),
            test: self.spec.name,
            role: self.spec.role,
            stored,
            since,
            lock,
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

/// Closes `pool`, whose database could not be claimed; its slots back.
async fn give_up(pool: TestPool) -> Slots {
    pool.pool.close().await;
    pool.cover.release().await.expect("the slots it was given")
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
    let mut admin = registry::connect_admin(server).await?;
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
    let mut admin = registry::connect_admin(server).await?;
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
