//! The cold path: under a session advisory lock in the admin database,
//! build the shared database under a temporary name, mark it ready, and
//! rename it into place, unless another process finished first.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::{Source, Target, marker, note_template_use};
use crate::error::{describe, sqlstate};
use crate::migrations::Migrations;
use crate::registry::markers::Marker;
use crate::registry::{self, names, statements};
use crate::server::Server;
use crate::{Error, catalog};
use pgtest_core::Script;

/// The cold path: under the advisory lock, build the database unless
/// another process finished it first; for a copy, its template first.
pub(super) async fn build(server: &Server, target: Target<'_>) -> Result<(), Error> {
    if let Source::Copy { template } = target.source {
        build_one(server, *template).await?;
    }
    build_one(server, target).await
}

async fn build_one(server: &Server, target: Target<'_>) -> Result<(), Error> {
    let mut admin = registry::connect_admin(server).await?;
    lock(server, &mut admin, target.database).await?;
    // The lock is a session lock: closing the connection, or the process
    // dying, releases it.
    let result = build_locked(server, &mut admin, target).await;
    let _ = admin.close().await;
    result
}

async fn build_locked(
    server: &Server,
    admin: &mut PgConnection,
    target: Target<'_>,
) -> Result<(), Error> {
    let Target {
        database,
        kind,
        marker: ready,
        source,
    } = target;
    // A database of another role's, or unmarked, is an error here.
    let (now, current) = marker(server, admin, database).await?;
    if current.is_some_and(|current| current.is_ready(kind)) {
        tracing::debug!(database, "another process built it");
        return Ok(());
    }
    tracing::debug!(database, ?kind, "building");
    // An unfinished build of pgtest's role is dropped: marked as building,
    // or not marked at all (a server that crashed lost the marker's commit,
    // not the database's). Anything else under its name is not touched.
    let building = names::building(database);
    let (_, found) = statements::lookup(admin, &building)
        .await
        .map_err(|error| server.query_error("looking at an unfinished build", &error))?;
    if let Some(found) = found {
        let unfinished = found.marker.is_none() || found.marker == Some(Marker::Building(kind));
        if !found.ours || !unfinished {
            return Err(registry::foreign_database(server, &building, &found));
        }
        drop_ours(server, admin, &building).await?;
    }
    let template = match source {
        Source::Copy { template } => Some(template.database),
        Source::Build { .. } => None,
    };
    statements::create(admin, &building, template, &Marker::Building(kind))
        .await
        .map_err(|error| registry::create_error(server, &building, &error))?;
    if let Some(template) = template
        && let (now, Some(used)) = marker(server, admin, template).await?
    {
        note_template_use(server, admin, template, &used, now).await?;
    }
    if let Source::Build {
        migrations,
        fixtures,
    } = source
        && let Err(error) = fill(server, &building, database, migrations, fixtures).await
    {
        drop_ours(server, admin, &building).await?;
        return Err(error);
    }
    statements::mark_and_rename(admin, &building, &ready.at(now), database)
        .await
        .map_err(|error| server.query_error(format!("marking {database} ready"), &error))?;
    tracing::debug!(database, "built and ready");
    Ok(())
}

async fn lock(server: &Server, admin: &mut PgConnection, database: &str) -> Result<(), Error> {
    catalog::set_lock_timeout(admin, server.bootstrap_timeout.as_millis(), false)
        .await
        .map_err(|error| server.query_error("setting the lock timeout", &error))?;
    match catalog::advisory_lock(admin, database).await {
        Ok(()) => Ok(()),
        Err(error) if sqlstate(&error).as_deref() == Some("55P03") => {
            let holders = match catalog::advisory_holders(admin, database).await {
                Ok(holders) if !holders.is_empty() => holders.join("; "),
                Ok(_) => "nobody any more".to_owned(),
                Err(error) => format!("unknown ({})", describe(&error)),
            };
            Err(Error::BootstrapTimeout {
                database: database.to_owned(),
                after: server.bootstrap_timeout,
                holders,
            })
        }
        Err(error) => Err(server.query_error("taking the bootstrap lock", &error)),
    }
}

/// Drops `database`, pgtest's unfinished build, whoever is connected to it.
async fn drop_ours(server: &Server, admin: &mut PgConnection, database: &str) -> Result<(), Error> {
    statements::drop_ours(admin, database, true)
        .await
        .map(drop)
        .map_err(|error| server.query_error(format!("dropping database {database}"), &error))
}

/// Migrates the copy `building` of `database`, runs the fixtures on it,
/// and readies it for copies (see [`crate::recycle::settle`]).
async fn fill(
    server: &Server,
    building: &str,
    database: &str,
    migrations: &Migrations,
    fixtures: &[Script],
) -> Result<(), Error> {
    let mut connection = server.connect(building).await?;
    let mut result = migrate(&mut connection, database, migrations).await;
    for fixture in fixtures {
        if result.is_err() {
            break;
        }
        result = connection
            .execute(crate::compat::raw(fixture.sql))
            .await
            .map(|_| ())
            .map_err(|error| Error::script(fixture, describe(&error)));
    }
    if result.is_ok() {
        result = crate::recycle::settle(&mut connection)
            .await
            .map_err(|error| server.query_error(format!("readying {database} for copies"), &error));
    }
    let _ = connection.close().await;
    result
}

async fn migrate(
    connection: &mut PgConnection,
    database: &str,
    migrations: &Migrations,
) -> Result<(), Error> {
    let migrator = migrations.migrator().await?;
    if migrator.iter().next().is_none() {
        // Nothing to run, and no `_sqlx_migrations` table either.
        return Ok(());
    }
    let result = migrator.run(connection).await;
    result.map_err(|error| match error {
        sqlx::migrate::MigrateError::ExecuteMigration(source, version) => Error::MigrationFailed {
            version,
            description: crate::migrations::description(migrator, version),
            origin: migrations.origin.clone(),
            database: database.to_owned(),
            message: describe(&source),
        },
        other => Error::Migrations {
            origin: migrations.origin.clone(),
            reason: other.to_string(),
        },
    })
}
