//! `isolation = "database"`: each test gets a copy of the template of its
//! migrations and fixtures, `<template>_<8 hex>`: a spare copy renamed (see
//! [`crate::spares`]) or, when none is left, a new one. The test holds an
//! exclusive lock on the copy's lock file while it runs, and until its
//! process ends when it fails. A passed test's copy is dropped later (by
//! the spares helper after the run, or by a sweep); a failed test's stays
//! for inspection until a later run.

use std::sync::Arc;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::{Prepared, Teardown, run_scripts_on_pool, sweep_beside};
use crate::bootstrap::{self, Source, Target};
use crate::budget::Slots;
use crate::lock::{LockFile, Mode, open_no_follow};
use crate::markers::{Kind, Marker, Origin};
use crate::migrations::Migrations;
use crate::pool;
use crate::server::Server;
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
    let database = TestDatabase::create(session, &mut admin, &template, spec.name).await?;
    spares::want(session, &template);
    let name = database.name.clone();
    let pool = pool::test_pool(session, &name, tenant, spec, max).await;
    pool.cover.hold(slots, 1).await;
    let context = TestContext::new(pool.pool, tenant, name, spec.name);
    let teardown = Teardown {
        cover: pool.cover,
        sweep: Some(sweep_beside(session, admin)),
        own: Some((session.server.clone(), database)),
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

/// A test's own database, from its creation until the test ends.
pub(super) struct TestDatabase {
    name: String,
    /// Held while the test runs (and, when it fails, until the process
    /// ends): a sweeper that can take it knows the test is over.
    lock: LockFile,
    /// Where the test marks it passed.
    passed: std::path::PathBuf,
}

impl TestDatabase {
    /// Gives `test` a database of its own, a copy of `template`: a spare
    /// one if there is one to claim, else a new copy, made with `admin`.
    async fn create(
        session: &Session,
        admin: &mut PgConnection,
        template: &str,
        test: &str,
    ) -> Result<Self, Error> {
        let Session { server, dir, .. } = session;
        let name = names::own_copy(template, &uuid::Uuid::new_v4().simple().to_string());
        let entry = Entry::Live(&name);
        let lock = dir.lock(entry)?;
        // A new name: nobody else has its lock.
        let taken = lock.try_lock(Mode::Exclusive);
        if !taken.map_err(|error| dir.error(entry, &error))? {
            let held = std::io::Error::other("held by another process");
            return Err(dir.error(entry, &held));
        }
        let origin = Origin::now(test, &session.config.run_id, dir.entry(entry));
        let marker = Marker::Test(origin);
        if !spares::claim(server, admin, template, &name, &marker).await? {
            catalog::create(admin, &name, Some(template), &marker)
                .await
                .map_err(|error| server.create_error(&name, &error))?;
        }
        let passed = dir.entry(Entry::Passed(&name));
        Ok(Self { name, lock, passed })
    }

    /// Ends the test's hold on its database: a passed test's database is
    /// left for the next sweep; a failed test's is kept until a later run,
    /// and the returned text says how to inspect it.
    pub(super) fn finish(self, passed: bool, server: &Server) -> Option<String> {
        if passed {
            let _ = open_no_follow(&self.passed, 0o600);
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
