//! Removing every database pgtest made on a server (what
//! [`crate::remove_all`] and `cargo pgtest clean` do).

use sqlx::Connection;

use super::admin::connect_admin;
use super::markers::Marker;
use super::statements::{self, Dropped};
use crate::Error;
use crate::server::Server;

/// What [`crate::remove_all`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The databases dropped.
    pub dropped: Vec<String>,
    /// pgtest's databases left alone because someone is connected to them.
    pub in_use: Vec<String>,
}

/// Drops every database of pgtest's on `server` but those in use, or, as
/// a `dry_run`, lists them as dropped and drops nothing.
pub(crate) async fn remove(server: &Server, dry_run: bool) -> Result<Removed, Error> {
    let mut admin = connect_admin(server).await?;
    let (_, marked) = statements::marked(&mut admin)
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
        let dropped = statements::drop_ours(&mut admin, &name, false).await;
        let dropped = dropped
            .map_err(|error| server.query_error(format!("dropping database {name}"), &error))?;
        match dropped {
            Dropped::Gone => removed.dropped.push(name),
            Dropped::InUse => removed.in_use.push(name),
            // Its owner changed since the listing: not pgtest's any more.
            Dropped::NotOurs => {}
        }
    }
    let _ = admin.close().await;
    Ok(removed)
}
