//! The cold path: under a session advisory lock in the admin database,
//! build the shared database under a temporary name, mark it ready, and
//! rename it into place, unless another process finished first.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::{MARKER_PREFIX, Source, Target};
use crate::Error;
use crate::error::{describe, sqlstate};
use crate::migrations::Migrations;
use crate::names;
use crate::runner::Script;
use crate::server::Server;

/// First key of pgtest's advisory locks ("pgts"); the second is per database.
const LOCK_CLASS: i32 = 0x7067_7473;

/// The cold path: under the advisory lock, build the database unless
/// another process finished it first; for a copy, its template first.
pub(super) async fn build(server: &Server, target: Target<'_>) -> Result<(), Error> {
    if let Source::Copy { template } = target.source {
        build_one(server, *template).await?;
    }
    build_one(server, target).await
}

async fn build_one(server: &Server, target: Target<'_>) -> Result<(), Error> {
    let mut admin = server.connect(server.admin_database()).await?;
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
        comment,
        source,
    } = target;
    match marker(server, admin, database).await? {
        Some(marker) if marker.starts_with(kind.ready_marker()) => {
            tracing::debug!(database, "another process built it");
            return Ok(());
        }
        Some(marker) if marker.starts_with(MARKER_PREFIX) => {}
        Some(_) | None if exists(server, admin, database).await? => {
            return Err(Error::ForeignDatabase {
                database: database.to_owned(),
            });
        }
        _ => {}
    }
    tracing::debug!(database, ?kind, "building");
    let building = names::building(database);
    drop_database(server, admin, &building).await?;
    let template = match source {
        Source::Copy { template } => Some(template.database),
        Source::Build { .. } => None,
    };
    create_database(server, admin, &building, template, kind.building_marker()).await?;
    if let Some(template) = template {
        let comment = marker(server, admin, template).await?.unwrap_or_default();
        super::note_template_use(server, admin, template, &comment).await?;
    }
    if let Source::Build {
        migrations,
        fixtures,
    } = source
        && let Err(error) = fill(server, &building, database, migrations, fixtures).await
    {
        drop_database(server, admin, &building).await?;
        return Err(error);
    }
    let finish = format!(
        "comment on database {building_q} is '{comment}'; \
         alter database {building_q} rename to {database_q}",
        building_q = quote_ident(&building),
        database_q = quote_ident(database),
    );
    admin
        .execute(crate::compat::raw(&finish))
        .await
        .map_err(|error| server.query_error(format!("marking {database} ready"), &error))?;
    tracing::debug!(database, "built and ready");
    Ok(())
}

async fn lock(server: &Server, admin: &mut PgConnection, database: &str) -> Result<(), Error> {
    let timeout_ms = server.bootstrap_timeout.as_millis().max(1);
    let statement = format!("set lock_timeout = {timeout_ms}");
    admin
        .execute(crate::compat::raw(&statement))
        .await
        .map_err(|error| server.query_error("setting the lock timeout", &error))?;
    let locked = sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(database))
        .execute(&mut *admin)
        .await;
    match locked {
        Ok(_) => Ok(()),
        Err(error) if sqlstate(&error).as_deref() == Some("55P03") => {
            Err(Error::BootstrapTimeout {
                database: database.to_owned(),
                after: server.bootstrap_timeout,
                holders: lock_holders(admin, database).await,
            })
        }
        Err(error) => Err(server.query_error("taking the bootstrap lock", &error)),
    }
}

/// Who holds the bootstrap lock of `database`, for the timeout message.
async fn lock_holders(admin: &mut PgConnection, database: &str) -> String {
    let holders: Result<Vec<String>, _> = sqlx::query_scalar(
        "select format('pid %s (%s, %s, since %s)', a.pid, coalesce(nullif(a.application_name, ''), 'no application_name'), \
                a.client_addr, a.backend_start) \
         from pg_locks l join pg_stat_activity a using (pid) \
         where l.locktype = 'advisory' and l.granted and l.classid = $1::oid and l.objid = $2::oid",
    )
    .bind(i64::from(LOCK_CLASS))
    .bind(i64::from(lock_key(database) as u32))
    .fetch_all(admin)
    .await;
    match holders {
        Ok(holders) if !holders.is_empty() => holders.join("; "),
        Ok(_) => "nobody any more".to_owned(),
        Err(error) => format!("unknown ({})", describe(&error)),
    }
}

fn lock_key(database: &str) -> i32 {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let hash = database.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// The comment on `database`, if it exists and has one.
pub(crate) async fn marker(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<Option<String>, Error> {
    sqlx::query_scalar::<_, Option<String>>(
        "select shobj_description(oid, 'pg_database') from pg_database where datname = $1",
    )
    .bind(database)
    .fetch_optional(admin)
    .await
    .map(Option::flatten)
    .map_err(|error| server.query_error("reading the ready marker", &error))
}

async fn exists(server: &Server, admin: &mut PgConnection, database: &str) -> Result<bool, Error> {
    sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
        .bind(database)
        .fetch_one(admin)
        .await
        .map_err(|error| server.query_error("looking up the shared database", &error))
}

/// Creates `database`, a copy of `template` if given, with the comment
/// `marker` (which must not contain a quote).
pub(crate) async fn create_database(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
    template: Option<&str>,
    marker: &str,
) -> Result<(), Error> {
    let name = quote_ident(database);
    let template = template
        .map(|template| format!(" template {}", quote_ident(template)))
        .unwrap_or_default();
    // Two statements: CREATE DATABASE cannot run inside a transaction block.
    let created = match admin
        .execute(crate::compat::raw(&format!(
            "create database {name}{template}"
        )))
        .await
    {
        Ok(_) => {
            let comment = format!("comment on database {name} is '{marker}'");
            admin.execute(crate::compat::raw(&comment)).await
        }
        Err(error) => Err(error),
    };
    match created {
        Ok(_) => Ok(()),
        Err(error) if sqlstate(&error).as_deref() == Some("42501") => Err(server.privilege_error(
            "create databases",
            describe(&error),
            format!(
                "Grant it as a superuser: ALTER ROLE \"{}\" CREATEDB",
                server.user()
            ),
        )),
        Err(error) => Err(server.query_error(format!("creating database {database}"), &error)),
    }
}

/// Drops `database`, whoever is connected to it.
async fn drop_database(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<(), Error> {
    let statement = format!(
        "drop database if exists {} with (force)",
        quote_ident(database)
    );
    admin
        .execute(crate::compat::raw(&statement))
        .await
        .map(|_| ())
        .map_err(|error| server.query_error(format!("dropping database {database}"), &error))
}

/// Migrates the copy `building` of `database`, then runs the fixtures on it.
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
    let _ = connection.close().await;
    result
}

/// Drops `database` unless another process is building or dropping it
/// (its advisory lock is taken) or someone is connected to it; whether it
/// went.
pub(crate) async fn drop_database_unclaimed(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<bool, Error> {
    let claimed: bool = sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(database))
        .fetch_one(&mut *admin)
        .await
        .map_err(|error| server.query_error(format!("claiming {database}"), &error))?;
    if !claimed {
        return Ok(false);
    }
    let dropped = drop_database_if_unused(server, admin, database).await;
    sqlx::query("select pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(database))
        .execute(&mut *admin)
        .await
        .map_err(|error| server.query_error(format!("releasing {database}"), &error))?;
    dropped
}

/// Drops `database` unless someone is connected to it; whether it went.
pub(crate) async fn drop_database_if_unused(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<bool, Error> {
    let statement = format!("drop database if exists {}", quote_ident(database));
    match admin.execute(crate::compat::raw(&statement)).await {
        Ok(_) => Ok(true),
        // 55006: "database … is being accessed by other users".
        Err(error) if sqlstate(&error).as_deref() == Some("55006") => Ok(false),
        Err(error) => Err(server.query_error(format!("dropping database {database}"), &error)),
    }
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

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_between_databases_and_are_stable() {
        assert_eq!(
            lock_key("pgtest_a_000000000000"),
            lock_key("pgtest_a_000000000000")
        );
        assert_ne!(
            lock_key("pgtest_a_000000000000"),
            lock_key("pgtest_a_000000000001")
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
