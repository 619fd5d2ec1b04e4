//! The shared database: its name, and building it once per migration set
//! however many processes ask at the same time.
//!
//! A database named `pgtest_<package>_<hash12>` exists on the server only
//! once it is complete: it is built under another name, marked ready with a
//! comment, then renamed in one step. The warm path is therefore a plain
//! connection to it that reads the marker, with no admin connection. The
//! cold path takes a session advisory lock in the admin database, checks
//! again, builds, and lets go. A crash midway leaves only the unfinished
//! copy, which the next build drops.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Executor};
use tokio::sync::OnceCell;

use crate::Error;
use crate::budget::Budget;
use crate::error::{describe, sqlstate};
use crate::migrations::Migrations;
use crate::server::{REFUSED_RETRY, Server, is_refused_for_slots};

/// The longest database name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME_LEN: usize = 63;
/// Hex digits of the migration hash in the name.
const HASH_LEN: usize = 12;
/// Suffix of the copy under construction.
const BUILDING_SUFFIX: &str = "_building";
/// The comment that marks a database as pgtest's and complete.
const READY_MARKER: &str = "pgtest: shared database, ready";
/// The comment on a copy under construction.
const BUILDING_MARKER: &str = "pgtest: shared database, building";
/// Every pgtest marker starts so; a database without it is not pgtest's.
const MARKER_PREFIX: &str = "pgtest:";
/// First key of pgtest's advisory locks ("pgts"); the second is per database.
const LOCK_CLASS: i32 = 0x7067_7473;

/// The shared database's name for a package and migration hash.
///
/// ```text
/// shared_database_name("my-app", "0123456789abcdef…") == "pgtest_my_app_0123456789ab"
/// ```
pub(crate) fn shared_database_name(package: &str, hash: &str) -> String {
    let room = MAX_NAME_LEN - BUILDING_SUFFIX.len() - "pgtest__".len() - HASH_LEN;
    let package: String = package
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    format!("pgtest_{package}_{}", &hash[..HASH_LEN])
}

/// Makes sure the shared database `database` exists and is migrated, using
/// `pool` (the test's own pool, pointing at it) for the warm check so that
/// the check's connection serves the test afterwards.
pub(crate) async fn ensure(
    server: &Server,
    budget: &Budget,
    pool: &PgPool,
    database: &str,
    migrations: &Migrations,
    role: Option<&str>,
) -> Result<(), Error> {
    // Tests on threads of one process check and build once between them.
    static READY: LazyLock<Mutex<HashMap<String, Arc<OnceCell<()>>>>> =
        LazyLock::new(Default::default);
    let cell = {
        let mut ready = READY.lock().unwrap_or_else(PoisonError::into_inner);
        let key = format!("{}/{database}", server.identity());
        ready.entry(key).or_default().clone()
    };
    cell.get_or_try_init(|| async {
        if is_ready(server, pool, database, role).await? {
            tracing::debug!(database, "shared database is ready (warm path)");
            return Ok(());
        }
        // One process per machine goes on to the server's lock; the others
        // wait here without an admin connection, then find the work done.
        let lock_name = format!("bootstrap-{database}.lock");
        let Some(_machine_lock) = budget
            .exclusive(&lock_name, server.bootstrap_timeout)
            .await?
        else {
            return Err(Error::BootstrapTimeout {
                database: database.to_owned(),
                after: server.bootstrap_timeout,
                holders: format!("another test process on this machine ({lock_name})"),
            });
        };
        if is_ready(server, pool, database, role).await? {
            tracing::debug!(
                database,
                "another process on this machine built the shared database"
            );
            return Ok(());
        }
        build(server, database, migrations).await?;
        // Connect as the test will, so that a connection problem of the
        // test's own (its role, say) is explained here too.
        match is_ready(server, pool, database, role).await? {
            true => Ok(()),
            false => Err(Error::Query {
                action: format!("using the shared database {database} just built"),
                url: server.url().to_owned(),
                message: "its ready marker is gone: something other than pgtest changed it"
                    .to_owned(),
            }),
        }
    })
    .await
    .map(|_| ())
}

/// Whether the database exists and carries the ready marker, asked through
/// the test's pool.
async fn is_ready(
    server: &Server,
    pool: &PgPool,
    database: &str,
    role: Option<&str>,
) -> Result<bool, Error> {
    let mut connection = match first_connection(server, pool, database, role).await {
        Ok(connection) => connection,
        Err(FirstConnection::Missing) => return Ok(false),
        Err(FirstConnection::Failed(error)) => return Err(error),
    };
    let marker: Option<String> = sqlx::query_scalar(
        "select shobj_description(oid, 'pg_database') from pg_database where datname = current_database()",
    )
    .fetch_one(&mut *connection)
    .await
    .map_err(|error| server.query_error("reading the ready marker", &error))?;
    Ok(marker.as_deref() == Some(READY_MARKER))
}

enum FirstConnection {
    Missing,
    Failed(Error),
}

/// The pool's first connection. sqlx's pool keeps retrying a refused
/// connection until its acquire timeout; when the first try is slow, one
/// direct connection finds out why, so that a stopped server is reported at
/// once rather than after the timeout.
async fn first_connection(
    server: &Server,
    pool: &PgPool,
    database: &str,
    role: Option<&str>,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, FirstConnection> {
    const DIAGNOSE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);
    let explain = |error: sqlx::Error| {
        if sqlstate(&error).as_deref() == Some("3D000") {
            FirstConnection::Missing
        } else {
            FirstConnection::Failed(server.connect_error(error, database, role))
        }
    };
    let acquire = pool.acquire();
    tokio::pin!(acquire);
    tokio::select! {
        result = &mut acquire => return result.map_err(explain),
        () = tokio::time::sleep(DIAGNOSE_AFTER) => {}
    }
    tracing::debug!(database, "first connection is slow; diagnosing");
    let started = std::time::Instant::now();
    let options = pool.connect_options();
    let mut refused = false;
    match tokio::time::timeout(server.connect_timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(probe)) => {
            let _ = probe.close().await;
        }
        // Full: the pool keeps retrying, as it should.
        Ok(Err(error)) if is_refused_for_slots(&error) => refused = true,
        Ok(Err(error)) => return Err(explain(error)),
        Err(_) => return Err(FirstConnection::Failed(server.timeout_error())),
    }
    let limit = if refused {
        REFUSED_RETRY
    } else {
        server.connect_timeout
    };
    match tokio::time::timeout(limit, acquire).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if refused => Err(FirstConnection::Failed(
            server.too_many_clients(started.elapsed()).await,
        )),
        Ok(Err(error)) => Err(explain(error)),
        Err(_) => Err(FirstConnection::Failed(server.timeout_error())),
    }
}

/// The cold path: under the advisory lock, build the database unless
/// another process finished it first.
async fn build(server: &Server, database: &str, migrations: &Migrations) -> Result<(), Error> {
    let mut admin = server.connect(server.admin_database()).await?;
    lock(server, &mut admin, database).await?;
    // The lock is a session lock: closing the connection, or the process
    // dying, releases it.
    let result = build_locked(server, &mut admin, database, migrations).await;
    let _ = admin.close().await;
    result
}

async fn build_locked(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
    migrations: &Migrations,
) -> Result<(), Error> {
    match marker(server, admin, database).await? {
        Some(marker) if marker == READY_MARKER => {
            tracing::debug!(database, "another process built the shared database");
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
    tracing::debug!(database, origin = %migrations.origin, "building the shared database");
    let building = format!("{database}{BUILDING_SUFFIX}");
    drop_database(server, admin, &building).await?;
    create_database(server, admin, &building).await?;
    if let Err(error) = migrate(server, &building, database, migrations).await {
        drop_database(server, admin, &building).await?;
        return Err(error);
    }
    let finish = format!(
        "comment on database {building_q} is '{READY_MARKER}'; \
         alter database {building_q} rename to {database_q}",
        building_q = quote_ident(&building),
        database_q = quote_ident(database),
    );
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(finish)))
        .await
        .map_err(|error| server.query_error(format!("marking {database} ready"), &error))?;
    tracing::debug!(database, "shared database is ready (built)");
    Ok(())
}

async fn lock(server: &Server, admin: &mut PgConnection, database: &str) -> Result<(), Error> {
    let timeout_ms = server.bootstrap_timeout.as_millis().max(1);
    let statement = format!("set lock_timeout = {timeout_ms}");
    admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
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

async fn marker(
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

async fn create_database(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<(), Error> {
    let name = quote_ident(database);
    // Two statements: CREATE DATABASE cannot run inside a transaction block.
    let created = match admin
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create database {name}"
        ))))
        .await
    {
        Ok(_) => {
            let comment = format!("comment on database {name} is '{BUILDING_MARKER}'");
            admin
                .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(comment)))
                .await
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
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statement)))
        .await
        .map(|_| ())
        .map_err(|error| server.query_error(format!("dropping database {database}"), &error))
}

async fn migrate(
    server: &Server,
    building: &str,
    database: &str,
    migrations: &Migrations,
) -> Result<(), Error> {
    let mut connection = server.connect(building).await?;
    let result = migrations.migrator().run(&mut connection).await;
    let _ = connection.close().await;
    result.map_err(|error| match error {
        sqlx::migrate::MigrateError::ExecuteMigration(source, version) => Error::MigrationFailed {
            version,
            description: migrations.description(version),
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
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_keeps_the_package_and_twelve_hash_digits() {
        let name = shared_database_name("my-App.rs", "0123456789abcdef0123");
        assert_eq!(name, "pgtest_my_app_rs_0123456789ab");
    }

    #[test]
    fn a_long_package_name_leaves_room_for_the_building_suffix() {
        let name = shared_database_name(&"x".repeat(100), &"f".repeat(64));
        assert!(name.len() + BUILDING_SUFFIX.len() <= MAX_NAME_LEN, "{name}");
        assert!(name.ends_with("_ffffffffffff"), "{name}");
    }

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
