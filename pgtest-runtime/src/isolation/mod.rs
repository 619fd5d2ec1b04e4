//! The isolation modes, one module each, behind one interface: [`prepare`]
//! gives a test its database, its pool and the scripts it asked for (with
//! the connection slots that cover them) as the [`TestContext`] its body
//! gets, and a [`Teardown`] that gives everything back.
//!
//! - [`shared`]: the run's copy of the migrations' template, shared by
//!   every test of the run; tests tell their rows apart by their tenant;
//! - [`transaction`]: the same database, the test's work inside one
//!   transaction that is rolled back;
//! - [`database`]: a copy of the template (migrations and fixtures) for
//!   each test.
//!
//! A test of several databases has each prepared in its mode
//! ([`several`]).

mod database;
mod several;
mod shared;
mod transaction;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Postgres};
use tokio::task::JoinHandle;

use crate::helpers::spares;
use crate::migrations::Migrations;
use crate::pool::{self, Cover};
use crate::registry::Sweep;
use crate::server::Server;
use crate::session::Session;
use crate::{Error, Tenant, TestContext};
use pgtest_core::{Isolation, Script, TestSpec};

/// How long the end of a test may wait for the sweep started beside it.
const SWEEP_WAIT: Duration = Duration::from_secs(10);
/// How long closing the pool may wait for connections the test still holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a mode prepared for a test.
pub(crate) struct Prepared {
    /// What the body gets.
    pub(crate) context: TestContext,
    pub(crate) teardown: Teardown,
}

/// Prepares the test `spec` in its isolation mode.
pub(crate) async fn prepare(session: &Arc<Session>, spec: &TestSpec) -> Result<Prepared, Error> {
    let tenant = Tenant::new();
    match spec.databases.is_empty() {
        true => prepare_one(session, spec, tenant).await,
        false => several::prepare(session, spec, tenant).await,
    }
}

/// Prepares the one database `spec` describes, for `tenant`.
async fn prepare_one(
    session: &Arc<Session>,
    spec: &TestSpec,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let manifest_dir = Path::new(spec.manifest_dir);
    let migrations = Migrations::load(spec.migrations, manifest_dir, &session.home).await?;
    let prepared = match spec.isolation {
        Isolation::Shared => shared::prepare(session, spec, &migrations, tenant).await?,
        Isolation::Transaction => transaction::prepare(session, spec, &migrations, tenant).await?,
        Isolation::Database => database::prepare(session, spec, &migrations, tenant).await?,
    };
    let database = prepared.context.database();
    tracing::debug!(test = spec.name, database, %tenant, "test prepared");
    Ok(prepared)
}

/// What to tell the user about a failure of the test: what its mode or
/// its pool explain. Read before the pool closes. Empty when nothing
/// points there.
pub(crate) fn failure_hint(spec: &TestSpec, pool: &PgPool, cover: &Cover, failure: &str) -> String {
    if spec.isolation == Isolation::Transaction
        && let Some(hint) = transaction::failure_hint(spec, failure)
    {
        return hint;
    }
    pool::starvation_hint(spec, pool, cover, failure)
}

/// What a test gives back when it ends: the slots it took, the sweep
/// started beside the body (if any) and, in `isolation = "database"`, its
/// database.
pub(crate) struct Teardown {
    cover: Arc<Cover>,
    sweep: Option<JoinHandle<()>>,
    own: Option<(Arc<Session>, database::TestDatabase)>,
    /// The test's further databases' pools and teardowns, when it has
    /// several.
    more: Vec<(PgPool, Teardown)>,
}

impl Teardown {
    /// The test's slots, shared with its pool's gate.
    pub(crate) fn cover(&self) -> &Arc<Cover> {
        &self.cover
    }

    /// Closes the test's `pool` and gives everything back; for a failed
    /// test with a database of its own, says how to inspect it.
    pub(crate) async fn finish(self, passed: bool, pool: &PgPool) -> Option<String> {
        // A passed test's database is put back on a connection of its pool,
        // whose catalog caches are warm: taken out of the pool, which then
        // closes.
        let kept_connection = match (&self.own, passed) {
            (Some((_, database)), true) => database.connection_of(pool).await,
            _ => None,
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
        if let Some(sweep) = self.sweep {
            let _ = tokio::time::timeout(SWEEP_WAIT, sweep).await;
        }
        let mut kept = match self.own {
            Some((session, database)) => database.finish(passed, &session, kept_connection).await,
            None => None,
        };
        drop(self.cover.release().await);
        for (pool, teardown) in self.more {
            let also = Box::pin(teardown.finish(passed, &pool)).await;
            kept = match (kept, also) {
                (Some(kept), Some(also)) => Some(format!("{kept}; and {also}")),
                (kept, also) => kept.or(also),
            };
        }
        kept
    }
}

/// Sweeps old copies of templates on `admin`, beside the test's body;
/// passed tests' databases are left to the spares helper if it runs.
fn sweep_beside(session: &Arc<Session>, admin: PgConnection) -> JoinHandle<()> {
    let session = Arc::clone(session);
    tokio::spawn(async move {
        let sweep = Sweep {
            server: &session.server,
            dir: &session.dir,
            run: &session.config.run_id,
            leave_passed: spares::helper_running(&session.dir),
        };
        sweep.run(admin).await;
    })
}

/// Runs `scripts` on `connection`, in order.
async fn run_scripts(
    server: &Server,
    connection: &mut PgConnection,
    scripts: impl IntoIterator<Item = &'static Script>,
    database: &str,
    spec: &TestSpec,
) -> Result<(), Error> {
    for script in scripts {
        let ran = crate::compat::raw(script.sql)
            .execute(&mut *connection)
            .await;
        ran.map_err(|error| match error {
            sqlx::Error::Database(_) => Error::script(script, crate::error::describe(&error)),
            connect => server.connect_error(connect, database, spec.role),
        })?;
    }
    Ok(())
}

/// A connection of `context`'s pool, its failure explained.
async fn acquire(
    server: &Server,
    context: &TestContext,
    spec: &TestSpec,
) -> Result<PoolConnection<Postgres>, Error> {
    let acquired = context.pool().acquire().await;
    acquired.map_err(|error| server.connect_error(error, context.database(), spec.role))
}

/// Runs `scripts` on a connection of `context`'s pool.
async fn run_scripts_on_pool(
    server: &Server,
    context: &TestContext,
    scripts: &[&'static Script],
    spec: &TestSpec,
) -> Result<(), Error> {
    if scripts.is_empty() {
        return Ok(());
    }
    let mut connection = acquire(server, context, spec).await?;
    let database = context.database();
    run_scripts(
        server,
        &mut connection,
        scripts.iter().copied(),
        database,
        spec,
    )
    .await
}
