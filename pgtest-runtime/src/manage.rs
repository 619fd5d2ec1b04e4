//! What `cargo pgtest` does, as a library: look at, open, clean and stop
//! what pgtest keeps for a package, with the runtime's own configuration,
//! names, markers and home (the command is a thin line over these).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pgtest_runtime::Error> {
//! let package = std::path::Path::new(".");
//! println!("{}", pgtest_runtime::manage::status(package).await?);
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use sqlx::Connection;

use crate::config::{Config, Target};
use crate::registry::markers::Marker;
use crate::registry::{self, statements};
use crate::registry::{Removed, remove};
use crate::session::Session;
use crate::state::StateDir;
use crate::{Error, embedded, helpers};

/// Does a pgtest helper's work when this process was started as one (the
/// embedded server's watchdog, the spares helper): a binary that is not a
/// test binary but starts the embedded server (`cargo pgtest`) calls this
/// first thing in `main` and exits with the code it returns.
///
/// ```no_run
/// if let Some(code) = pgtest_runtime::manage::run_helper_if_asked() {
///     std::process::exit(code);
/// }
/// ```
pub fn run_helper_if_asked() -> Option<i32> {
    helpers::run_if_asked()
}

/// What pgtest has for the package at `package` (its `Cargo.toml`'s
/// directory): the server and how it was chosen, the embedded server's
/// state, pgtest's databases with their age and size, kept failures with
/// their tests, and who holds connection slots. Starts the embedded server
/// when it is the one in use and is stopped (its watchdog stops it again).
///
/// # Errors
///
/// When the server cannot be reached or asked; the error says what to do.
pub async fn status(package: &Path) -> Result<String, Error> {
    let session = session(package).await?;
    let server = &session.server;
    let mut text = String::new();
    let chosen = match &session.config.target {
        Target::Url { .. } => format!("its URL is {}", server.origin()),
        Target::Embedded => "no server URL is set: PGTEST_DATABASE_URL, DATABASE_URL".to_owned(),
    };
    let _ = writeln!(text, "server: {}", server.url());
    let _ = writeln!(text, "  used because {chosen}");
    if matches!(session.config.target, Target::Embedded) {
        let state = match server.started_embedded {
            true => "started now, to look",
            false => "running",
        };
        let _ = writeln!(
            text,
            "embedded server: {state}; it stops after {} s without a test",
            session.config.embedded_idle.as_secs()
        );
    }
    let _ = writeln!(text, "home: {}", session.home.path().display());
    let mut admin = registry::connect_admin(server).await?;
    let (now, marked) = statements::marked(&mut admin)
        .await
        .map_err(|error| server.query_error("listing pgtest's databases", &error))?;
    let names: Vec<String> = marked.iter().map(|(name, _)| name.clone()).collect();
    let sizes = statements::sizes(&mut admin, &names)
        .await
        .map_err(|error| server.query_error("reading database sizes", &error))?;
    let _ = admin.close().await;
    let failed = session.dir.failed_databases();
    let total: u64 = sizes.iter().sum();
    let _ = writeln!(
        text,
        "databases of role {} ({}, {} MiB):",
        server.user(),
        marked.len(),
        total >> 20
    );
    for ((name, marker), size) in marked.iter().zip(&sizes) {
        let what = match marker {
            Some(Marker::Template { used }) => format!("template, used {}", ago(now, *used)),
            Some(Marker::Shared(origin)) => format!(
                "shared database of run {}, made {}",
                origin.run,
                ago(now, origin.created)
            ),
            Some(Marker::Test(origin)) => match failed.iter().find(|(kept, _)| kept == name) {
                Some((_, test)) => format!("kept: test `{test}` failed here"),
                None => format!("test database of `{}`", origin.test),
            },
            Some(Marker::Spare { .. }) => "spare".to_owned(),
            Some(Marker::Building(_)) => "being built".to_owned(),
            Some(Marker::LockDatabase) => "pgtest's advisory locks".to_owned(),
            None => "a newer pgtest's".to_owned(),
        };
        let _ = writeln!(text, "  {name}  {what}, {} MiB", size >> 20);
    }
    let holders = session.budget.holders();
    let _ = writeln!(
        text,
        "connection budget: {} connections; slots held by: {}",
        session.budget.capacity(),
        if holders.is_empty() {
            "nobody"
        } else {
            &holders
        }
    );
    Ok(text)
}

/// Opens `psql` on a database of pgtest's for the package at `package`:
/// the kept database of the failed test `target` (its full name or its
/// end, `module::test` or `test`), the database named `target`, or, with
/// none, the newest run's shared database. Starts the embedded server when
/// it is stopped, and holds it while `psql` runs, as a test does; `args`
/// go to `psql` after the connection's (`-c "select …"`, say). `psql`'s
/// exit code.
///
/// # Errors
///
/// When the server cannot be reached, `target` names nothing pgtest keeps,
/// or `psql` cannot be run.
pub async fn psql(package: &Path, target: Option<&str>, args: &[String]) -> Result<i32, Error> {
    let session = session(package).await?;
    let server = &session.server;
    let database = match target {
        Some(name) => resolve(&session, name).await?,
        None => newest_shared(&session).await?,
    };
    let mut command = server.psql(&database);
    command.args(args);
    let status = tokio::task::spawn_blocking(move || command.status())
        .await
        .map_err(|error| Error::Psql {
            reason: error.to_string(),
        })?
        .map_err(|error| Error::Psql {
            reason: error.to_string(),
        })?;
    Ok(status.code().unwrap_or(1))
}

/// Drops every database of pgtest's on the server the package at
/// `package` uses (what [`crate::remove_all`] does), or, as a `dry_run`,
/// lists them as dropped and drops nothing.
///
/// # Errors
///
/// When the server cannot be reached or a database cannot be dropped.
pub async fn clean(package: &Path, dry_run: bool) -> Result<Removed, Error> {
    let session = session(package).await?;
    let removed = remove(&session.server, dry_run).await?;
    if !dry_run {
        // The snapshots of the templates dropped: the next copy of one
        // built anew takes its own.
        removed
            .dropped
            .iter()
            .for_each(|name| session.dir.forget_snapshot(name));
    }
    Ok(removed)
}

/// Stops the embedded server of the package at `package`, if it is the
/// one in use and runs; whether it ran. A server given by URL is not
/// pgtest's to stop: `Ok(false)`.
///
/// # Errors
///
/// When the embedded server cannot be looked at or does not stop.
pub fn stop(package: &Path) -> Result<bool, Error> {
    let config = Config::load(package)?;
    if let Target::Url { .. } = config.target {
        return Ok(false);
    }
    let home = StateDir::home(&config.home)?;
    embedded::stop(&home, &config.binaries, config.server_user.as_deref())
}

/// The session of the package at `package`, as its tests would have.
async fn session(package: &Path) -> Result<Arc<Session>, Error> {
    let dir: &'static str = Box::leak(package.display().to_string().into_boxed_str());
    Session::get(dir).await
}

/// The database `name` stands for: a failed test's kept database, else a
/// database of pgtest's of that name.
async fn resolve(session: &Session, name: &str) -> Result<String, Error> {
    let suffix = format!("::{name}");
    let kept = session
        .dir
        .failed_databases()
        .into_iter()
        .find(|(_, test)| test == name || test.ends_with(&suffix));
    if let Some((database, _)) = kept {
        return Ok(database);
    }
    let (_, marked) = listed(session).await?;
    marked
        .into_iter()
        .find(|(database, _)| database == name)
        .map(|(database, _)| database)
        .ok_or_else(|| Error::UnknownDatabase {
            name: name.to_owned(),
        })
}

/// The newest run's shared database, else the lock database.
async fn newest_shared(session: &Session) -> Result<String, Error> {
    let (_, marked) = listed(session).await?;
    let newest = marked
        .into_iter()
        .filter_map(|(database, marker)| match marker {
            Some(Marker::Shared(origin)) => Some((origin.created, database)),
            _ => None,
        })
        .max();
    Ok(newest.map_or_else(
        || crate::server::LOCK_DATABASE.to_owned(),
        |(_, database)| database,
    ))
}

async fn listed(session: &Session) -> Result<(u64, Vec<(String, Option<Marker>)>), Error> {
    let server = &session.server;
    let mut admin = registry::connect_admin(server).await?;
    let marked = statements::marked(&mut admin)
        .await
        .map_err(|error| server.query_error("listing pgtest's databases", &error));
    let _ = admin.close().await;
    marked
}

/// How long ago `then` was, by the server's clock `now`.
fn ago(now: u64, then: u64) -> String {
    match now.saturating_sub(then) {
        seconds if seconds < 120 => format!("{seconds} s ago"),
        seconds if seconds < 2 * 3600 => format!("{} min ago", seconds / 60),
        seconds if seconds < 2 * 86400 => format!("{} h ago", seconds / 3600),
        seconds => format!("{} days ago", seconds / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::ago;

    #[test]
    fn ages_read_in_the_unit_that_fits() {
        assert_eq!(ago(1000, 990), "10 s ago");
        assert_eq!(ago(10_000, 10_000 - 600), "10 min ago");
        assert_eq!(ago(100_000, 100_000 - 3 * 3600), "3 h ago");
        assert_eq!(ago(1_000_000, 1_000_000 - 5 * 86400), "5 days ago");
        assert_eq!(ago(5, 10), "0 s ago");
    }
}
