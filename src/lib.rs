//! Fast, parallel PostgreSQL-backed tests.
//!
//! Write `#[pg_test]` on an async test and take a [`PgPool`]: pgtest finds
//! the server, migrates a template once per migration set (however many
//! test processes start together) and copies it into one shared database
//! per run, gives the test its own small pool on it, and a fresh [`Tenant`]
//! whose id every connection carries as the setting `pgtest.tenant_id`.
//! `isolation = "database"` gives a test a copy of its own instead, and
//! `isolation = "transaction"` a connection inside a transaction that is
//! rolled back; [`sqlx_test`] is a drop-in for `#[sqlx::test]`.
//!
//! ```no_run
//! use pgtest::{Tenant, pg_test};
//! use sqlx::PgPool;
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
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Runs an async test against PostgreSQL.
///
/// The fn is `async` and takes one of:
///
/// | arguments | gets |
/// |---|---|
/// | `(pool: PgPool)` | a pool on the test's database |
/// | `(pool: PgPool, tenant: Tenant)` | the pool and the test's tenant |
/// | `(conn: PoolConnection<Postgres>)` | one connection (in `isolation = "transaction"`, inside the transaction) |
/// | `(conn: PoolConnection<Postgres>, tenant: Tenant)` | the connection and the tenant |
/// | `(options: PgPoolOptions, connect: PgConnectOptions)` | what to build a pool of your own from; it shares the test's connections, so size it with `max_connections = N` (raising it on the options panics in sqlx) |
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
/// | `isolation = "shared"` | the shared database; rows kept apart by the test's tenant | the default |
/// | `isolation = "database"` | a database of the test's own, cloned from a template migrated once (a spare copy made after the previous run, when there is one); kept when the test fails | with `fixtures(…)`, and in [`sqlx_test`] |
/// | `isolation = "transaction"` | one connection inside a transaction on the shared database, rolled back at the end | |
/// | `fixtures("users", "posts")` | scripts as `#[sqlx::test]` reads them: `fixtures/<name>.sql` beside the test file; `"../x.sql"` relative to it; `fixtures(path = "dir", scripts("a", "b"))`; repeatable. In `database` isolation they are part of the template, run once | none |
/// | `migrations = "dir"` | migrations directory, relative to the package's `Cargo.toml`; read when the test runs, so an edit needs no rebuild | `sqlx.toml`'s `[migrate] migrations-dir`, else `"./migrations"` when it exists, else none |
/// | `migrations = false` | no migrations | |
/// | `migrator = "path::TO::MIGRATOR"` | a `static` `sqlx::migrate::Migrator` (from `sqlx::migrate!`) | |
/// | `max_connections = N` | the most connections the test's pool opens | 5, as `#[sqlx::test]` (1 in `isolation = "transaction"`) |
/// | `pool = "frugal"` | the pool opens a connection only when a task of the test waits for one | the default |
/// | `pool = "sqlx"` | the pool opens and hands out connections as a plain sqlx pool of the same size and options would (a new one whenever none is idle, even while another is on its way back) | in [`sqlx_test`] |
/// | `seed = "fixtures/x.sql"` | a script run on the test's pool before the body; repeatable, in order; the path is relative to the test file, as `include_str!` reads it | none |
/// | `role = "app_user"` | every connection acts as this role (so row-level security applies to it) | the URL's role |
/// | `flavor = "multi_thread"` | the body runs on tokio worker threads (for `tokio::task::block_in_place`), as `#[tokio::test(flavor = "multi_thread")]` | `"current_thread"`, as `#[sqlx::test]` |
/// | `worker_threads = N` | with `flavor = "multi_thread"`: how many worker threads | tokio's: one per core |
/// | `crate = "path"` | where pgtest is, for a renamed dependency | `::pgtest` |
/// | `database(migrations = "dir", fixtures(…), seed = "…")` | one of the test's databases, when it has several: repeat the group, one per pool argument, in order; a group takes `migrations`, `migrator`, `fixtures(…)` and `seed` (then not written outside the groups) | one database |
///
/// Seeds insert rows for the test's tenant through the setting, for example
/// `insert into notes (tenant_id, body) values (current_setting('pgtest.tenant_id')::uuid, 'hi')`.
///
/// The pool opens connections as the test needs them, up to five, so code
/// that holds connections while it waits for more (a transaction, a
/// service's background tasks on the pool) does not starve; a test that
/// still runs short fails saying which `max_connections` to set. A frugal
/// pool opens a second only when a task waits for one, so a test that runs
/// its queries one after another keeps one connection, where sqlx's pool,
/// which gets a used connection back in the background, opens a second for
/// the next query (and `pool = "sqlx"` does too). Every connection is
/// covered by the suite's connection budget either way.
///
/// In `isolation = "transaction"` the test takes a connection, not a pool
/// (a pool argument is a compile error): its `begin()` is a savepoint and
/// its `commit()` a release, and everything is rolled back at the end,
/// unless the test sends a raw `COMMIT`. Another test's uncommitted rows
/// are invisible but their locks are not: two such tests writing the same
/// unique key wait for each other, and after 5 s the second fails saying so.
///
/// # Several databases
///
/// A test of a service that talks to two databases takes a pool on each:
/// one `database(…)` group per pool, in the order of the arguments, each
/// with its own migrations, fixtures and seeds (the keys a test of one
/// database writes at the top, as sqlx's proposal for `#[sqlx::test]`
/// groups them). The other arguments are the test's and apply to every
/// database: the isolation (`shared`: each pool on its migrations' shared
/// database, with the test's one tenant on every connection; `database`: a
/// database of its own per pool; `transaction`: a rolled-back transaction
/// per connection), `max_connections` (per pool: at most 3 each for two
/// pools unless it says, so that the test needs one slot per pool up
/// front), `pool`, `role` and `flavor`. The test takes the connection
/// slots of all its pools at once before it prepares any.
///
/// ```no_run
/// use pgtest::{Tenant, pg_test};
/// use sqlx::PgPool;
///
/// #[pg_test(
///     database(migrations = false),
///     database(migrations = false),
/// )]
/// async fn writes_to_both(app: PgPool, audit: PgPool, tenant: Tenant) -> Result<(), sqlx::Error> {
///     let one: i32 = sqlx::query_scalar("select 1").fetch_one(&app).await?;
///     let two: i32 = sqlx::query_scalar("select 2").fetch_one(&audit).await?;
///     assert_eq!((one, two), (1, 2));
///     Ok(())
/// }
/// ```
///
/// In `isolation = "transaction"` it takes a `PoolConnection<Postgres>` per
/// database; `(ctx: TestContext)` reaches the further databases through
/// `TestContext::more_databases`.
///
/// # Example
///
/// ```no_run
/// use pgtest::{Tenant, pg_test};
/// use sqlx::PgPool;
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

/// `#[sqlx::test]`, served by pgtest: the same arguments as [`pg_test`],
/// with `isolation = "database"` and `pool = "sqlx"` as the defaults, so
/// that a suite written for `#[sqlx::test]` (fixed ids, whole-table counts,
/// tasks that count on sqlx's pool to open a connection rather than wait
/// for one on its way back) passes with only the attribute's path changed.
/// Move tests to `#[pg_test]` (shared, frugal) one by one for speed.
///
/// ```no_run
/// use pgtest::sqlx_test;
/// use sqlx::PgPool;
///
/// #[sqlx_test(migrations = false)]
/// async fn owns_its_database(pool: PgPool) -> Result<(), sqlx::Error> {
///     sqlx::query("create table t (id int primary key)").execute(&pool).await?;
///     sqlx::query("insert into t values (1)").execute(&pool).await?;
///     Ok(())
/// }
/// ```
pub use pgtest_macros::sqlx_test;

#[cfg(not(any(feature = "sqlx-0_9", feature = "sqlx-0_8")))]
compile_error!(
    "pgtest needs the sqlx version of your tests: keep its default feature `sqlx-0_9` for sqlx \
     0.9, or set `default-features = false, features = [\"sqlx-0_8\"]` for sqlx 0.8"
);

/// What a test on sqlx 0.9 uses, when the feature `sqlx-0_9` is on (the
/// default). The same items stand at the crate's root unless only
/// `sqlx-0_8` is on.
#[cfg(feature = "sqlx-0_9")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-0_9")))]
pub mod sqlx_0_9 {
    pub use pgtest_runtime::{Error, Removed, TestContext, remove_all};
}

/// What a test on sqlx 0.8 uses, when the feature `sqlx-0_8` is on. A
/// crate on sqlx 0.8 in a workspace where another crate turns `sqlx-0_9`
/// on too names its context `pgtest::sqlx_0_8::TestContext`.
#[cfg(feature = "sqlx-0_8")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-0_8")))]
pub mod sqlx_0_8 {
    pub use pgtest_runtime_sqlx08::{Error, Removed, TestContext, remove_all};
}

#[cfg(feature = "sqlx-0_9")]
use pgtest_runtime as main_runtime;
#[cfg(all(feature = "sqlx-0_8", not(feature = "sqlx-0_9")))]
use pgtest_runtime_sqlx08 as main_runtime;

#[cfg(any(feature = "sqlx-0_9", feature = "sqlx-0_8"))]
pub use main_runtime::__private::sqlx::PgPool;
#[cfg(any(feature = "sqlx-0_9", feature = "sqlx-0_8"))]
pub use main_runtime::{Error, Removed, TestContext, remove_all};
pub use pgtest_core::Tenant;

/// Used by the code `#[pg_test]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use pgtest_core::{
        DatabaseSpec, Flavor, Isolation, MigrationSource, PoolKind, Script, TestSpec,
    };
    use pgtest_core::{Tenant, TestTermination};

    /// Runs the test with the runtime of its own sqlx version, chosen by the
    /// types of its arguments.
    pub fn run<F: Dispatch>(spec: TestSpec, test: F) {
        test.run(spec);
    }

    /// A test body of a supported signature, on one of the enabled sqlx
    /// versions.
    #[cfg_attr(
        all(feature = "sqlx-0_9", not(feature = "sqlx-0_8")),
        diagnostic::on_unimplemented(
            message = "`#[pg_test]` does not support a test with the signature `{Self}` on sqlx 0.9",
            note = "pgtest is built for sqlx 0.9 (its default feature `sqlx-0_9`); if this test's \
                    sqlx is 0.8, depend on pgtest with `default-features = false, features = \
                    [\"sqlx-0_8\"]`",
            note = "a #[pg_test] fn is async and takes (pool: PgPool), (pool: PgPool, tenant: \
                    Tenant), (conn: PoolConnection<Postgres>), (conn: PoolConnection<Postgres>, \
                    tenant: Tenant), (options: PgPoolOptions, connect: PgConnectOptions), \
                    (ctx: TestContext) or nothing"
        )
    )]
    #[cfg_attr(
        all(feature = "sqlx-0_8", not(feature = "sqlx-0_9")),
        diagnostic::on_unimplemented(
            message = "`#[pg_test]` does not support a test with the signature `{Self}` on sqlx 0.8",
            note = "pgtest is built for sqlx 0.8 (its feature `sqlx-0_8`); if this test's sqlx is \
                    0.9, turn on pgtest's feature `sqlx-0_9` (its default)",
            note = "a #[pg_test] fn is async and takes (pool: PgPool), (pool: PgPool, tenant: \
                    Tenant), (conn: PoolConnection<Postgres>), (conn: PoolConnection<Postgres>, \
                    tenant: Tenant), (options: PgPoolOptions, connect: PgConnectOptions), \
                    (ctx: TestContext) or nothing"
        )
    )]
    #[cfg_attr(
        all(feature = "sqlx-0_8", feature = "sqlx-0_9"),
        diagnostic::on_unimplemented(
            message = "`#[pg_test]` does not support a test with the signature `{Self}`",
            note = "a #[pg_test] fn is async and takes (pool: PgPool), (pool: PgPool, tenant: \
                    Tenant), (conn: PoolConnection<Postgres>), (conn: PoolConnection<Postgres>, \
                    tenant: Tenant), (options: PgPoolOptions, connect: PgConnectOptions), \
                    (ctx: TestContext) or nothing, of sqlx 0.8 or 0.9"
        )
    )]
    pub trait Dispatch {
        /// Runs the test; see [`run`].
        fn run(self, spec: TestSpec);
    }

    /// One impl per signature that takes a database, for the runtime `$rt`.
    macro_rules! dispatch {
        ($rt:ident) => {
            dispatch!($rt: (PgPool), (PgPool, Tenant), (PoolConnection<Postgres>),
                (PoolConnection<Postgres>, Tenant), (PgPoolOptions, PgConnectOptions),
                (TestContext),
                (PgPool, PgPool), (PgPool, PgPool, Tenant),
                (PgPool, PgPool, PgPool), (PgPool, PgPool, PgPool, Tenant),
                (PgPool, PgPool, PgPool, PgPool), (PgPool, PgPool, PgPool, PgPool, Tenant),
                (PoolConnection<Postgres>, PoolConnection<Postgres>),
                (PoolConnection<Postgres>, PoolConnection<Postgres>, Tenant),
                (PoolConnection<Postgres>, PoolConnection<Postgres>, PoolConnection<Postgres>),
                (PoolConnection<Postgres>, PoolConnection<Postgres>, PoolConnection<Postgres>,
                    Tenant),
                (PoolConnection<Postgres>, PoolConnection<Postgres>, PoolConnection<Postgres>,
                    PoolConnection<Postgres>),
                (PoolConnection<Postgres>, PoolConnection<Postgres>, PoolConnection<Postgres>,
                    PoolConnection<Postgres>, Tenant));
        };
        ($rt:ident: $(($($arg:ident $(<$param:ident>)?),*)),*) => {$(
            impl<Fut: ::std::future::Future<Output: TestTermination>> Dispatch
                for fn($(dispatch!(@type $rt $arg $(<$param>)?)),*) -> Fut
            {
                fn run(self, spec: TestSpec) {
                    $rt::__private::run(spec, self);
                }
            }
        )*};
        (@type $rt:ident Tenant) => { Tenant };
        (@type $rt:ident TestContext) => { $rt::TestContext };
        (@type $rt:ident PgPool) => { $rt::__private::sqlx::PgPool };
        (@type $rt:ident PoolConnection<Postgres>) => {
            $rt::__private::sqlx::pool::PoolConnection<$rt::__private::sqlx::Postgres>
        };
        (@type $rt:ident PgPoolOptions) => { $rt::__private::sqlx::postgres::PgPoolOptions };
        (@type $rt:ident PgConnectOptions) => {
            $rt::__private::sqlx::postgres::PgConnectOptions
        };
    }

    #[cfg(feature = "sqlx-0_9")]
    dispatch!(pgtest_runtime);
    #[cfg(feature = "sqlx-0_8")]
    dispatch!(pgtest_runtime_sqlx08);

    /// A test without a database, on whichever runtime is there.
    #[cfg(any(feature = "sqlx-0_9", feature = "sqlx-0_8"))]
    impl<Fut: ::std::future::Future<Output: TestTermination>> Dispatch for fn() -> Fut {
        fn run(self, spec: TestSpec) {
            super::main_runtime::__private::run(spec, self);
        }
    }
}
