//! `isolation = "shared"`: every test of a run uses the run's copy of the
//! migrations' template, `<template>_r<7 hex>`, copied once per run (a
//! nextest run, or the `cargo test` that started the process) so that rows
//! tests leave behind never pile up across runs. Every process of the run
//! holds a shared lock on the run's lock file while it lives, so that no
//! sweep drops the copy under the run; the first of its tests to find the
//! copy ready writes so in that file, for tests of several databases (see
//! [`build_holding_nothing`]). Tests tell their rows apart by their
//! tenant.

use std::fs;
use std::io::Write as _;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::task::JoinHandle;

use super::{Prepared, Teardown, run_scripts_on_pool, sweep_beside};
use crate::bootstrap::{self, Source, Target};
use crate::migrations::Migrations;
use crate::pool::{self, TestPool};
use crate::registry::markers::{Kind, Marker, Origin};
use crate::registry::{self, markers, names};
use crate::session::Session;
use crate::state::{Entry, append_no_follow};
use crate::{Error, Tenant, TestContext};
use pgtest_core::TestSpec;

pub(super) async fn prepare(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let (context, teardown) = with_shared_database(session, spec, migrations, tenant).await?;
    let scripts: Vec<_> = spec.fixtures.iter().chain(spec.seeds).collect();
    run_scripts_on_pool(&session.server, &context, &scripts, spec).await?;
    Ok(Prepared { context, teardown })
}

/// Makes sure the run's shared database of `migrations` is built, holding
/// no connection slots: a test of several databases does so for each
/// before it takes its slots (see [`super::several`]), since a test that
/// waits for a build must not hold slots the build may need. Once a test
/// of this machine found it ready, nothing but a look at its lock file.
pub(super) async fn build_holding_nothing(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
) -> Result<(), Error> {
    let template = names::template(spec.package, session.server.user(), &migrations.hash, &[]);
    let database = names::run_copy(&template, &markers::host(), &session.config.run_id);
    session.hold_while_alive(Entry::Run(&database)).await?;
    if ready_here(session, &database) {
        return Ok(());
    }
    let ready = Ready {
        template: &template,
        database: &database,
        migrations,
    };
    build(session, None, &ready, spec).await?;
    note_ready(session, &database);
    Ok(())
}

/// Whether a test of this machine found the run's copy `database` ready
/// (see [`note_ready`]). Only a hint: the test's pool checks the copy
/// before the test runs in it.
fn ready_here(session: &Session, database: &str) -> bool {
    let path = session.dir.entry(Entry::Run(database));
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file() && meta.len() > 0)
}

/// Writes in the lock file of the run's copy `database` that it is ready.
fn note_ready(session: &Session, database: &str) {
    if ready_here(session, database) {
        return;
    }
    let path = session.dir.entry(Entry::Run(database));
    let noted = append_no_follow(&path).and_then(|mut file| file.write_all(b"ready\n"));
    if let Err(error) = noted {
        tracing::debug!(%error, path = %path.display(), "cannot note the run's copy ready");
    }
}

/// The run's shared database, made ready if it is not, and a pool on it.
pub(super) async fn with_shared_database(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
    tenant: Tenant,
) -> Result<(TestContext, Teardown), Error> {
    let template = names::template(spec.package, session.server.user(), &migrations.hash, &[]);
    let database = names::run_copy(&template, &markers::host(), &session.config.run_id);
    session.hold_while_alive(Entry::Run(&database)).await?;
    let max = pool::max_for(spec, &session.budget, 0)?;
    let pool = pool::test_pool(session, &database, tenant, spec, max).await;
    let ready = Ready {
        template: &template,
        database: &database,
        migrations,
    };
    let sweep = make_ready(session, &pool, ready, spec).await?;
    let context = TestContext::new(pool.pool, tenant, database, spec.name);
    let teardown = Teardown {
        cover: pool.cover,
        sweep,
        own: None,
        more: Vec::new(),
    };
    Ok((context, teardown))
}

/// The run's shared database and where it comes from.
struct Ready<'a> {
    template: &'a str,
    database: &'a str,
    migrations: &'a Migrations,
}

/// Makes sure this run's shared database (a copy of the migrations'
/// template) is ready, with the test's slots in `pool`'s cover; returns the
/// sweep started when this test made the copy.
async fn make_ready(
    session: &Arc<Session>,
    pool: &TestPool,
    ready: Ready<'_>,
    spec: &TestSpec,
) -> Result<Option<JoinHandle<()>>, Error> {
    let budget = &session.budget;
    let max = pool.cover.max();
    let slots = budget.take(budget.upfront(max, 0), spec.name).await?;
    pool.cover.hold(slots, 0).await;
    if bootstrap::is_ready(session, &pool.pool, ready.database, spec.role).await? {
        note_ready(session, ready.database);
        return Ok(None);
    }
    // The test keeps its slots while it waits: its pool may hold a
    // connection already. The builder builds on the reserve.
    let copied_here = build(session, Some(&pool.pool), &ready, spec).await?;
    note_ready(session, ready.database);
    // Whoever copied it sweeps older copies beside its body, on one more
    // slot when one is free at once (else a later run sweeps them).
    if !copied_here {
        return Ok(None);
    }
    let Some(sweeper) = budget.try_take(1, spec.name)? else {
        return Ok(None);
    };
    pool.cover.add(sweeper, 1).await;
    let admin = registry::connect_admin(&session.server).await?;
    Ok(Some(sweep_beside(session, admin)))
}

/// Builds the run's copy (and its template when missing), unless another
/// test does; whether this one did. With the test's `pool`, the copy is
/// then connected to as the test will be (see [`bootstrap::build_once`]).
async fn build(
    session: &Session,
    pool: Option<&PgPool>,
    ready: &Ready<'_>,
    spec: &TestSpec,
) -> Result<bool, Error> {
    let template = Target::template(ready.template, &Marker::TEMPLATE, ready.migrations, &[]);
    let lock = session.dir.entry(Entry::Run(ready.database));
    let origin = Origin::new(spec.name, &session.config.run_id, lock);
    let marker = Marker::Shared(origin);
    let copy = Target {
        database: ready.database,
        kind: Kind::Shared,
        marker: &marker,
        source: Source::Copy {
            template: &template,
        },
    };
    bootstrap::build_once(session, pool, copy, spec.role, spec.name).await
}
