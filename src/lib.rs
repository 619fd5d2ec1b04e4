//! Fast, parallel PostgreSQL-backed tests.
//!
//! Write `#[pg_test]` on an async test and take a [`PgPool`]: pgtest finds
//! the server, creates and migrates one shared database per migration set
//! (once, however many test processes start together), gives the test its
//! own small pool on it, and a fresh [`Tenant`] whose id every connection
//! carries as the setting `pgtest.tenant_id`.
//!
//! ```no_run
//! use pgtest::{PgPool, Tenant, pg_test};
//!
//! #[pg_test(migrations = false)]
//! async fn sees_only_its_own_rows(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
//!     let mine: sqlx::types::Uuid = sqlx::query_scalar("select current_setting('pgtest.tenant_id')::uuid")
//!         .fetch_one(&pool)
//!         .await?;
//!     assert_eq!(mine, tenant.id());
//!     Ok(())
//! }
//! ```
//!
//! The README covers the server (`PGTEST_DATABASE_URL`, `DATABASE_URL`),
//! the shared database's life cycle and how pgtest compares with
//! `#[sqlx::test]`.

/// Runs an async test against PostgreSQL.
///
/// The fn is `async` and takes one of:
///
/// | arguments | gets |
/// |---|---|
/// | `(pool: PgPool)` | a pool on the shared, migrated database |
/// | `(pool: PgPool, tenant: Tenant)` | the pool and the test's tenant |
/// | `(ctx: TestContext)` | pool, tenant, database name and test name |
/// | none | no database: a plain async test |
///
/// It returns `()` or `Result<(), E>` with `E: Debug` (an `Err` fails the
/// test with the error's `Debug` text). A non-async fn without arguments is
/// a plain `#[test]`. Other attributes (`///` docs, `#[ignore]`,
/// `#[should_panic]`, `#[cfg_attr]`) pass through; do not add `#[test]` or
/// `#[tokio::test]` as well: the test would run twice, so that is an error.
///
/// # Arguments
///
/// | argument | meaning | default |
/// |---|---|---|
/// | `migrations = "dir"` | migrations directory, relative to the package's `Cargo.toml`; read when the test runs, so an edit needs no rebuild | `"./migrations"` when it exists, else none |
/// | `migrations = false` | no migrations | |
/// | `migrator = "path::TO::MIGRATOR"` | a `static` [`sqlx::migrate::Migrator`] (from `sqlx::migrate!`) | |
/// | `max_connections = N` | the most connections the test's pool opens | 4 |
/// | `seed = "fixtures/x.sql"` | a script run on the test's pool before the body; repeatable, in order; the path is relative to the test file, as `include_str!` reads it | none |
/// | `role = "app_user"` | every connection acts as this role (so row-level security applies to it) | the URL's role |
/// | `crate = "path"` | where pgtest is, for a renamed dependency | `::pgtest` |
///
/// Seeds insert rows for the test's tenant through the setting, for example
/// `insert into notes (tenant_id, body) values (current_setting('pgtest.tenant_id')::uuid, 'hi')`.
///
/// # Example
///
/// ```no_run
/// use pgtest::{PgPool, Tenant, pg_test};
///
/// #[pg_test(migrations = false, max_connections = 2)]
/// async fn counts_only_my_rows(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
///     sqlx::query("create temporary table notes (tenant_id uuid, body text)")
///         .execute(&pool)
///         .await?;
///     Ok(())
/// }
/// ```
///
/// # What this expands to
///
/// A plain test that makes one call into the runtime, keeping the body in
/// an inner fn whose signature picks the behaviour:
///
/// ```ignore
/// #[::core::prelude::v1::test]
/// fn counts_only_my_rows() {
///     async fn counts_only_my_rows(pool: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> { /* body */ }
///     let test: fn(PgPool, Tenant) -> _ = counts_only_my_rows;
///     ::pgtest::__private::run(::pgtest::__private::TestSpec { /* the arguments */ }, test)
/// }
/// ```
///
/// # Failures
///
/// When the database cannot be prepared the test panics with a message that
/// names the test, says what happened and what to do, and shows the server
/// URL with its password masked.
pub use pgtest_macros::pg_test;

pub use pgtest_runtime::{Error, Tenant, TestContext};
pub use sqlx::PgPool;

/// Used by the code `#[pg_test]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use pgtest_runtime::__private::*;
}
