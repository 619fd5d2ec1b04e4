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
//!
//! One test's way through it: [`prepare`] (here) names the template and
//! waits for a turn ([`crate::wait`]); `claim` claims a spare listed here
//! on the test's own pool (warm), or on an admin connection makes the
//! template ready (`crate::bootstrap`), claims a spare the server lists or
//! makes a copy (cold), every statement the registry's
//! ([`crate::registry`]); the test's body runs; `finish` puts a passed
//! test's database back (`crate::recycle`) and lists it here as a spare,
//! or retires it for the spares helper (`crate::helpers::spares`) to
//! drop, or keeps a failed test's for inspection.

mod claim;
mod finish;

use std::sync::Arc;
use std::time::{Duration, Instant};

use self::claim::Claim;
pub(super) use self::finish::TestDatabase;
use super::{Prepared, Teardown, run_scripts_on_pool, sweep_beside};
use crate::bootstrap::{self, Target};
use crate::migrations::Migrations;
use crate::recycle::Stored;
use crate::registry::markers::Marker;
use crate::registry::names;
use crate::session::Session;
use crate::state::{COPIERS, Entry};
use crate::wait::{Look, Pace, wait_until};
use crate::{Error, Tenant, TestContext};
use pgtest_core::TestSpec;

/// How long a test waits for a database of its template to be put back,
/// once the template has as many as `PGTEST_TEMPLATE_COPIES`, before it
/// makes one more (the tests holding them may be slow ones).
const TURN_WAIT: Duration = Duration::from_secs(1);

/// Makes sure the template of `spec`'s database is built, holding no
/// connection slots, unless this machine has its snapshot (it was built
/// then, and its tests claim spares with no admin connection): a test of
/// several databases does so for each before it takes its slots (see
/// [`super::several`]), since a test that waits for a build must not hold
/// slots the build may need.
pub(super) async fn build_holding_nothing(
    session: &Session,
    spec: &TestSpec,
    migrations: &Migrations,
) -> Result<(), Error> {
    let role = session.server.user();
    let template = names::template(spec.package, role, &migrations.hash, spec.fixtures);
    if session.dir.entry(Entry::Snapshot(&template)).exists() {
        return Ok(());
    }
    let target = Target::template(&template, &Marker::TEMPLATE, migrations, spec.fixtures);
    bootstrap::build_once(session, None, target, spec.role, spec.name)
        .await
        .map(drop)
}

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
    let snapshot = session.dir.entry(Entry::Snapshot(&template));
    let mut stored = Stored::load(&snapshot);
    let what = format!("a turn to copy {template}");
    let claimed = wait_until(deadline, &what, Pace::Local, async || {
        // Until a copy is made, and its snapshot taken.
        if let Stored::Missing = stored {
            stored = Stored::load(&snapshot);
        }
        let taken = std::mem::replace(&mut stored, Stored::Missing);
        stored = match claim.listed_here(taken).await? {
            Ok((pool, database)) => return Ok(Look::Ready((pool, database, None))),
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
            let copiers: Vec<String> = (0..COPIERS)
                .map(|index| {
                    session
                        .dir
                        .entry(Entry::Copier(index))
                        .display()
                        .to_string()
                })
                .collect();
            return Ok(Look::Held(match take_turns {
                true => format!(
                    "its {} copies (PGTEST_TEMPLATE_COPIES) were all in use by tests of this \
                     machine",
                    session.config.template_copies
                ),
                false => format!(
                    "other tests of this machine kept copying it (they hold {})",
                    copiers.join(", ")
                ),
            }));
        }
        let taken = std::mem::replace(&mut stored, Stored::Missing);
        let (pool, database, admin) = claim.with_admin(migrations, taken).await?;
        drop(copier);
        Ok::<_, Error>(Look::Ready((pool, database, Some(admin))))
    })
    .await?;
    let (pool, database, admin) = claimed.map_err(|expired| Error::CopyTimeout {
        template: template.clone(),
        after: expired.after,
        holder: expired.holder,
    })?;
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
