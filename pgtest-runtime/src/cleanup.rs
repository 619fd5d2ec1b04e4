//! Removing everything pgtest made on a server.

use std::path::Path;

use sqlx::Connection;

use crate::config::Config;
use crate::markers::Marker;
use crate::server::Server;
use crate::state::StateDir;
use crate::{Error, catalog, helpers};

/// What [`remove_all`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The databases dropped.
    pub dropped: Vec<String>,
    /// pgtest's databases left alone because someone is connected to them.
    pub in_use: Vec<String>,
}

/// Drops every database pgtest made on the server the tests use
/// (`PGTEST_DATABASE_URL`, `DATABASE_URL` or the embedded server, found
/// from the current directory as a test would): shared databases,
/// templates, test databases and unfinished copies, which its comment on
/// each database marks, among those the role pgtest logs in as owns. A
/// database someone is connected to is left alone and listed in
/// [`Removed::in_use`]; nothing pgtest did not make, and nothing another
/// role owns whatever its comment says, is touched. The next test run builds what it needs again.
///
/// ```no_run
/// // A one-off test to run by hand: cargo test remove_pgtest_databases -- --ignored
/// #[tokio::test]
/// #[ignore = "removes every database pgtest made on the test server"]
/// async fn remove_pgtest_databases() {
///     let removed = pgtest::remove_all().await.unwrap();
///     println!("dropped {:?}; in use: {:?}", removed.dropped, removed.in_use);
/// }
/// ```
///
/// # Errors
///
/// When the server cannot be reached or a database cannot be listed or
/// dropped; the error says what to do.
pub async fn remove_all() -> Result<Removed, Error> {
    let here = std::env::current_dir().unwrap_or_else(|_| Path::new(".").to_owned());
    let config = Config::load(&here)?;
    let server = Server::new(&config, &StateDir::home(&config.home)?)?;
    helpers::watchdog::ensure(&server, config.embedded_idle);
    remove(&server, false).await
}

/// Drops every database of pgtest's on `server` but those in use, or, as
/// a `dry_run`, lists them as dropped and drops nothing.
pub(crate) async fn remove(server: &Server, dry_run: bool) -> Result<Removed, Error> {
    let mut admin = server.connect_admin().await?;
    let (_, marked) = catalog::marked(&mut admin)
        .await
        .map_err(|error| server.query_error("listing pgtest's databases", &error))?;
    let mut removed = Removed::default();
    for (name, marker) in marked {
        // Where this admin work happens; it holds nothing but locks.
        if marker == Some(Marker::LockDatabase) {
            continue;
        }
        if dry_run {
            removed.dropped.push(name);
            continue;
        }
        let dropped = catalog::drop_ours(&mut admin, &name, false).await;
        let dropped = dropped
            .map_err(|error| server.query_error(format!("dropping database {name}"), &error))?;
        match dropped {
            catalog::Dropped::Gone => removed.dropped.push(name),
            catalog::Dropped::InUse => removed.in_use.push(name),
            // Its owner changed since the listing: not pgtest's any more.
            catalog::Dropped::NotOurs => {}
        }
    }
    let _ = admin.close().await;
    Ok(removed)
}
