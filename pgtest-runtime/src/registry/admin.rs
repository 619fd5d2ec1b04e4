//! pgtest's admin connection, to the one lock database on every server
//! (made here when missing: it is one of pgtest's databases), and the
//! errors for a database that is not pgtest's or could not be made.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::statements::{COPY_RETRY, CreateError, Found, create_lock_database};
use crate::Error;
use crate::error::{DISK_FULL, describe, sqlstate};
use crate::server::{LOCK_DATABASE, Server};

/// An admin connection: to [`LOCK_DATABASE`], made first if missing (from
/// the URL's database), whatever database the URL names, so that every
/// process's advisory locks meet there.
pub(crate) async fn connect_admin(server: &Server) -> Result<PgConnection, Error> {
    match server.open_admin(LOCK_DATABASE).await? {
        Ok(connection) => return Ok(connection),
        Err(error) if sqlstate(&error).as_deref() == Some("3D000") => {}
        Err(error) => return Err(server.connect_error(error, LOCK_DATABASE, None)),
    }
    let mut first = match server.open_admin(server.admin_database()).await? {
        Ok(connection) => connection,
        Err(error) => return Err(server.connect_error(error, server.admin_database(), None)),
    };
    tracing::debug!("making the lock database");
    let made = create_lock_database(&mut first, LOCK_DATABASE).await;
    let _ = first.close().await;
    made.map_err(|error| create_error(server, LOCK_DATABASE, &error.into()))?;
    match server.open_admin(LOCK_DATABASE).await? {
        Ok(connection) => Ok(connection),
        Err(error) => Err(server.connect_error(error, LOCK_DATABASE, None)),
    }
}

/// The error for `database`, found not to be pgtest's.
pub(crate) fn foreign_database(server: &Server, database: &str, found: &Found) -> Error {
    let why = match found.ours {
        false => format!("its owner is role {}, not {}", found.owner, server.user()),
        true => match &found.marker {
            None => "pgtest did not mark it as its own".to_owned(),
            Some(marker) => format!("its marker ({marker}) is not what pgtest expects there"),
        },
    };
    Error::ForeignDatabase {
        database: database.to_owned(),
        owner: found.owner.clone(),
        role: server.user().to_owned(),
        why,
    }
}

/// The error for a failed `CREATE DATABASE` of `database`.
pub(crate) fn create_error(server: &Server, database: &str, error: &CreateError) -> Error {
    let error = match error {
        CreateError::Sql(error) => error,
        CreateError::TemplateInUse { template, sessions } => {
            return Error::TemplateInUse {
                database: database.to_owned(),
                template: template.clone(),
                waited: COPY_RETRY,
                sessions: match sessions.is_empty() {
                    true => "none by the time pgtest looked".to_owned(),
                    false => sessions.join("; "),
                },
            };
        }
    };
    match sqlstate(error).as_deref() {
        Some("42501") => {}
        Some(DISK_FULL) => {
            return Error::DiskFull {
                database: database.to_owned(),
                url: server.url().to_owned(),
                message: describe(error),
            };
        }
        _ => return server.query_error(format!("creating database {database}"), error),
    }
    server.privilege_error(
        "create databases",
        describe(error),
        format!(
            "Grant it as a superuser: ALTER ROLE \"{}\" CREATEDB",
            server.user()
        ),
    )
}
