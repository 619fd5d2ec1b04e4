//! `isolation = "transaction"`: the run's shared database (see
//! [`super::shared`]), the test's one connection inside a transaction that
//! is rolled back when the test ends. sqlx counts that transaction, so the
//! test's own `begin()` becomes a savepoint and its `commit()` a release.

use std::sync::Arc;

use sqlx::Connection;
use sqlx::pool::PoolConnection;
use sqlx::{Postgres, postgres::PgConnection};

use super::{Prepared, acquire, run_scripts, shared};
use crate::migrations::Migrations;
use crate::session::Session;
use crate::{Error, Tenant, catalog};
use pgtest_core::TestSpec;

/// How long a statement waits for a lock before failing: such a wait is
/// usually another test's transaction.
const LOCK_TIMEOUT_MS: u128 = 5000;

pub(super) async fn prepare(
    session: &Arc<Session>,
    spec: &TestSpec,
    migrations: &Migrations,
    tenant: Tenant,
) -> Result<Prepared, Error> {
    let (context, teardown) =
        shared::with_shared_database(session, spec, migrations, tenant).await?;
    let server = &session.server;
    let mut connection = acquire(server, &context, spec).await?;
    let database = context.database();
    begin(&mut connection)
        .await
        .map_err(|error| server.query_error("beginning the test's transaction", &error))?;
    let scripts = spec.fixtures.iter().chain(spec.seeds);
    run_scripts(server, &mut connection, scripts, database, spec).await?;
    let context = context.with_connection(connection);
    Ok(Prepared { context, teardown })
}

/// Begins the transaction that closing the pool rolls back.
async fn begin(connection: &mut PoolConnection<Postgres>) -> Result<(), sqlx::Error> {
    let outer = connection.begin().await?;
    // Not dropped, which would roll back now: closing the pool ends it.
    std::mem::forget(outer);
    let connection: &mut PgConnection = connection;
    catalog::set_lock_timeout(connection, LOCK_TIMEOUT_MS, true).await
}

/// The hint for a test that waited for another test's lock.
pub(super) fn failure_hint(spec: &TestSpec, failure: &str) -> Option<String> {
    failure.contains("lock timeout").then(|| {
        format!(
            "\npgtest: test `{}` waited {}s for a lock held by another test's transaction \
             (two tests writing the same unique key, say): in isolation = \"transaction\", \
             tests see each other's locks. Use values of the test's own (its tenant's id), or \
             isolation = \"database\"\n",
            spec.name,
            LOCK_TIMEOUT_MS / 1000
        )
    })
}
