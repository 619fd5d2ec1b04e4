//! Building databases once however many processes ask at the same time:
//! a template per migration set (`pgtest_<package>_<hash12>`) and a run's
//! shared database, a copy of it.
//!
//! Either exists under its name only once it is complete: it is built under
//! another name, marked ready with a comment, then renamed in one step. The
//! warm path is therefore a plain connection to the run's copy that reads
//! the marker, with no admin connection. The cold path takes a session
//! advisory lock in the admin database, checks again, builds, and lets go.
//! A crash midway leaves only the unfinished copy, which the next build
//! drops.

use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::Connection;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};

use self::build::build;
use crate::Error;
use crate::error::sqlstate;
use crate::lock::Mode;
use crate::migrations::Migrations;
use crate::registry::markers::{Kind, Marker};
use crate::registry::{self, statements};
use crate::server::{Server, is_refused_for_slots};
use crate::session::Session;
use crate::state::Entry;
use pgtest_core::Script;

mod build;

/// How stale a template's last-use stamp may get before a copy renews it:
/// one write per template an hour, not one per test.
const USE_STAMP_EVERY: u64 = 60 * 60;

/// Renews the last-use stamp of `template`, about to be copied, when its
/// `marker` (as just read) is older than an hour by the server's clock
/// `now`, so that sweeps keep templates in use.
pub(crate) async fn note_template_use(
    server: &Server,
    admin: &mut PgConnection,
    template: &str,
    marker: &Marker,
    now: u64,
) -> Result<(), Error> {
    let used = match marker {
        Marker::Template { used } => *used,
        _ => 0,
    };
    if now.saturating_sub(used) < USE_STAMP_EVERY {
        return Ok(());
    }
    statements::mark(admin, template, &Marker::TEMPLATE.at(now))
        .await
        .map_err(|error| server.query_error(format!("stamping {template} as used"), &error))
}

/// The server's clock (seconds since the epoch) and the marker of
/// `database`, if it exists; an error when it exists but is not pgtest's:
/// owned by another role (whatever its comment says), or without a marker.
pub(crate) async fn marker(
    server: &Server,
    admin: &mut PgConnection,
    database: &str,
) -> Result<(u64, Option<Marker>), Error> {
    let (now, found) = statements::lookup(admin, database)
        .await
        .map_err(|error| server.query_error("reading the ready marker", &error))?;
    match found {
        None => Ok((now, None)),
        Some(found) => match found.pgtest_marker() {
            Some(marker) => Ok((now, Some(marker.clone()))),
            None => Err(registry::foreign_database(server, database, &found)),
        },
    }
}

/// The connections a build holds at once: an admin connection (which holds
/// the bootstrap lock) and the migration's.
const BUILD_CONNECTIONS: u32 = 2;

/// Whether the shared database `database` is ready: known in this process,
/// or asked through `pool` (the test's own pool, pointing at it), so that
/// the check's connection serves the test afterwards. No admin connection.
pub(crate) async fn is_ready(
    session: &Session,
    pool: &PgPool,
    database: &str,
    role: Option<&str>,
) -> Result<bool, Error> {
    let readiness = session.readiness(database);
    if readiness.initialized() {
        return Ok(true);
    }
    let ready = ready_connection(&session.server, pool, database, role)
        .await?
        .is_some();
    if ready {
        tracing::debug!(database, "shared database is ready (warm path)");
        // Another thread may be building it right now; either way it is ready.
        let _ = readiness.set(());
    }
    Ok(ready)
}

/// Builds `target` (a template, or a run's copy of one, its template first
/// when missing): one thread per process and one process per machine does
/// it while the others wait, holding no connection slots; the builder takes
/// the two it needs from the budget for `holder` (a test). Waiting callers
/// then find the work done. The builder of a run's copy sweeps old copies,
/// then connects as the test will (through `pool`), so that a problem of
/// the test's own, its role say, is explained here too; a template is never
/// connected to (no `pool`).
pub(crate) async fn build_once(
    session: &Session,
    pool: Option<&PgPool>,
    target: Target<'_>,
    role: Option<&str>,
    holder: &str,
) -> Result<bool, Error> {
    let Session { server, dir, .. } = session;
    let database = target.database;
    let readiness = session.readiness(database);
    let built = AtomicBool::new(false);
    readiness
        .get_or_try_init(|| async {
            let lock = Entry::Bootstrap(database);
            let deadline = std::time::Instant::now() + server.bootstrap_timeout;
            let Some(_machine_lock) = dir.lock_until(lock, Mode::Exclusive, deadline).await? else {
                return Err(Error::BootstrapTimeout {
                    database: database.to_owned(),
                    after: server.bootstrap_timeout,
                    holders: format!(
                        "another test process on this machine ({})",
                        dir.entry(lock).display()
                    ),
                });
            };
            let budget = &session.budget;
            let _slots = budget.take_for_build(BUILD_CONNECTIONS, holder).await?;
            let Some(pool) = pool.filter(|_| target.kind == Kind::Shared) else {
                build(server, target).await?;
                built.store(true, Ordering::Relaxed);
                return Ok(());
            };
            if let Some(connection) = ready_connection(server, pool, database, role).await? {
                tracing::debug!(
                    database,
                    "another process on this machine built the shared database"
                );
                let _ = connection.close().await;
                return Ok(());
            }
            build(server, target).await?;
            built.store(true, Ordering::Relaxed);
            match ready_connection(server, pool, database, role).await? {
                Some(connection) => {
                    let _ = connection.close().await;
                    Ok(())
                }
                None => Err(Error::Query {
                    action: format!("using the shared database {database} just built"),
                    url: server.url().to_owned(),
                    message: "its ready marker is gone: something other than pgtest changed it"
                        .to_owned(),
                }),
            }
        })
        .await?;
    Ok(built.into_inner())
}

/// A database to build: its name, what it is for, and what goes in it.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) database: &'a str,
    pub(crate) kind: Kind,
    /// The marker that says it is ready.
    pub(crate) marker: &'a Marker,
    pub(crate) source: Source<'a>,
}

impl<'a> Target<'a> {
    /// The template `database` of `migrations` and `fixtures`, marked
    /// `marker` when ready.
    pub(crate) fn template(
        database: &'a str,
        marker: &'a Marker,
        migrations: &'a Migrations,
        fixtures: &'a [Script],
    ) -> Self {
        Self {
            database,
            kind: Kind::Template,
            marker,
            source: Source::Build {
                migrations,
                fixtures,
            },
        }
    }
}

/// What goes in a database being built.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// Migrations, then fixtures.
    Build {
        migrations: &'a Migrations,
        fixtures: &'a [Script],
    },
    /// A copy of a template, built first when it is not ready.
    Copy { template: &'a Target<'a> },
}

/// The connection that read the ready marker through the test's pool, or
/// `None` when the database is missing or not ready.
async fn ready_connection(
    server: &Server,
    pool: &PgPool,
    database: &str,
    role: Option<&str>,
) -> Result<Option<PoolConnection<Postgres>>, Error> {
    let mut connection = match first_connection(server, pool, database, role).await {
        Ok(connection) => connection,
        Err(FirstConnection::Missing) => return Ok(None),
        Err(FirstConnection::Failed(error)) => return Err(error),
    };
    let found = statements::this_database(&mut connection)
        .await
        .map_err(|error| server.query_error("reading the ready marker", &error))?;
    if !found.ours {
        let _ = connection.close().await;
        return Err(registry::foreign_database(server, database, &found));
    }
    if found
        .marker
        .is_some_and(|marker| marker.is_ready(Kind::Shared))
    {
        Ok(Some(connection))
    } else {
        let _ = connection.close().await;
        Ok(None)
    }
}

enum FirstConnection {
    Missing,
    Failed(Error),
}

/// The pool's first connection. sqlx's pool keeps retrying a refused
/// connection until its acquire timeout; when the first try is slow, a look
/// at the server's socket finds out whether anything listens there, so that
/// a stopped server is reported at once rather than after the timeout. The
/// look starts no session: under load, when first connections are slow for
/// many tests at once, sessions outside the budget would fill the server.
async fn first_connection(
    server: &Server,
    pool: &PgPool,
    database: &str,
    role: Option<&str>,
) -> Result<PoolConnection<Postgres>, FirstConnection> {
    const DIAGNOSE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);
    let explain = |error: sqlx::Error| {
        if sqlstate(&error).as_deref() == Some("3D000") {
            FirstConnection::Missing
        } else {
            FirstConnection::Failed(server.connect_error(error, database, role))
        }
    };
    let started = std::time::Instant::now();
    let acquire = pool.acquire();
    tokio::pin!(acquire);
    tokio::select! {
        result = &mut acquire => return result.map_err(explain),
        () = tokio::time::sleep(DIAGNOSE_AFTER) => {}
    }
    tracing::debug!(
        database,
        "first connection is slow; looking at the server's socket"
    );
    if let Err(error) = listens(&pool.connect_options()).await {
        return Err(explain(sqlx::Error::Io(error)));
    }
    match acquire.await {
        Ok(connection) => Ok(connection),
        // Listening, yet no session within the acquire timeout: say whether
        // the server refuses clients (one session, once, to find out).
        Err(sqlx::Error::PoolTimedOut) => {
            let options = pool.connect_options();
            let probe = PgConnection::connect_with(&options);
            match tokio::time::timeout(server.connect_timeout, probe).await {
                Ok(Err(error)) if is_refused_for_slots(&error) => Err(FirstConnection::Failed(
                    server.too_many_clients(started.elapsed()).await,
                )),
                Ok(Ok(probe)) => {
                    let _ = probe.close().await;
                    Err(FirstConnection::Failed(server.timeout_error()))
                }
                Ok(Err(error)) => Err(explain(error)),
                Err(_) => Err(FirstConnection::Failed(server.timeout_error())),
            }
        }
        Err(error) => Err(explain(error)),
    }
}

/// Whether anything listens where `options` point, asked by connecting to
/// the socket without starting a session.
async fn listens(options: &PgConnectOptions) -> std::io::Result<()> {
    match options.get_socket() {
        Some(socket) if socket.is_dir() => {
            let path = socket.join(format!(".s.PGSQL.{}", options.get_port()));
            tokio::net::UnixStream::connect(path).await.map(drop)
        }
        Some(socket) => tokio::net::UnixStream::connect(socket).await.map(drop),
        None => tokio::net::TcpStream::connect((options.get_host(), options.get_port()))
            .await
            .map(drop),
    }
}
