//! The public way to remove what pgtest made on the tests' server.

use std::path::Path;

use crate::Error;
use crate::registry::Removed;

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
    crate::manage::clean(&here, false).await
}
