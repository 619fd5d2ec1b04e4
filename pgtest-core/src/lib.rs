//! What the code `#[pg_test]` generates, the `pgtest` facade and the
//! runtimes (one per supported sqlx version, built from the same sources)
//! share, so that none of it depends on a sqlx version: a test's spec, its
//! tenant and what a body may return. Use it through the `pgtest` crate.

use std::any::Any;
use std::fmt::{self, Debug};

use uuid::Uuid;

/// Everything the attribute knows about one test.
#[derive(Debug)]
pub struct TestSpec {
    /// `module_path!()::fn_name`.
    pub name: &'static str,
    /// `CARGO_PKG_NAME` of the test's package.
    pub package: &'static str,
    /// `CARGO_MANIFEST_DIR` of the test's package.
    pub manifest_dir: &'static str,
    /// Where the migrations come from.
    pub migrations: MigrationSource,
    /// The most connections the test's pool opens, when the attribute says.
    pub max_connections: Option<u32>,
    /// The role every connection acts as (`SET ROLE`), if any.
    pub role: Option<&'static str>,
    /// Scripts run before the body, after the fixtures.
    pub seeds: &'static [Script],
    /// sqlx-style fixtures: part of the template in `isolation =
    /// "database"`, else run before the body like seeds.
    pub fixtures: &'static [Script],
    /// How the test is kept apart from the others.
    pub isolation: Isolation,
    /// How the test's pool opens connections.
    pub pool: PoolKind,
    /// The tokio runtime the body runs on.
    pub flavor: Flavor,
    /// The test's databases when it has several (`database(…)` groups), in
    /// the order of its arguments, each with its own migrations, fixtures
    /// and seeds; empty when it has one, described by the fields above.
    pub databases: &'static [DatabaseSpec],
}

/// One of the databases of a test that has several: what a `database(…)`
/// group of the attribute says.
#[derive(Debug)]
pub struct DatabaseSpec {
    /// Where its migrations come from.
    pub migrations: MigrationSource,
    /// sqlx-style fixtures, as [`TestSpec::fixtures`].
    pub fixtures: &'static [Script],
    /// Scripts run on it before the body, after the fixtures.
    pub seeds: &'static [Script],
}

/// The tokio runtime a test's body runs on, as `#[tokio::test]` names it:
/// one thread (the default, as in `#[sqlx::test]`), or worker threads,
/// which `tokio::task::block_in_place` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `flavor = "current_thread"`.
    CurrentThread,
    /// `flavor = "multi_thread"`, with `worker_threads` when given (else
    /// tokio's default, one per core).
    MultiThread {
        /// `worker_threads = N`.
        worker_threads: Option<usize>,
    },
}

/// How a test is kept apart from the others; see the attribute's docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// The shared database, rows scoped by the test's tenant.
    Shared,
    /// A database of the test's own, cloned from a template.
    Database,
    /// One connection inside a transaction that is rolled back.
    Transaction,
}

/// How a test's pool opens connections; see the attribute's `pool`
/// argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Opens a further connection only when a task of the test waits for
    /// one (`#[pg_test]`'s default).
    Frugal,
    /// Opens and hands out connections as a plain sqlx pool of the same
    /// size and options would (`#[sqlx_test]`'s default).
    Sqlx,
}

/// A SQL script embedded at compile time: a seed or a fixture.
#[derive(Debug)]
pub struct Script {
    /// The path as written in the attribute.
    pub path: &'static str,
    /// The script.
    pub sql: &'static str,
}

/// Where a test's migrations come from, as the attribute said.
#[derive(Clone, Copy)]
pub enum MigrationSource {
    /// The directory `sqlx.toml` names (`[migrate] migrations-dir`), else
    /// `./migrations` of the test's package when that directory exists,
    /// else none (what `#[sqlx::test]` does).
    Default,
    /// A directory, relative to the test's package, read at run time.
    Dir(&'static str),
    /// A `static` migrator built by `sqlx::migrate!`, of the test's sqlx
    /// version (the runtime of that version checks which it is).
    Migrator(&'static (dyn Any + Send + Sync)),
    /// `migrations = false`: an empty schema.
    None,
}

impl Debug for MigrationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("Default"),
            Self::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            Self::Migrator(_) => f.write_str("Migrator(..)"),
            Self::None => f.write_str("None"),
        }
    }
}

/// A fresh, random tenant id for one test.
///
/// Every connection of the test's pool carries it as the session setting
/// `pgtest.tenant_id` ([`Tenant::SETTING`]), so SQL can read it with
/// `current_setting('pgtest.tenant_id')` (in a column default or a
/// row-level-security policy) and Rust code can bind [`Tenant::id`].
///
/// ```
/// use pgtest_core::Tenant;
///
/// let tenant = Tenant::new();
/// assert_eq!(tenant.to_string(), tenant.id().to_string());
/// assert_ne!(tenant, Tenant::new());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Tenant {
    id: Uuid,
}

impl Tenant {
    /// The session setting that holds the tenant id on every connection of
    /// the test's pool.
    pub const SETTING: &'static str = "pgtest.tenant_id";

    /// A new tenant with a random (version 4) UUID.
    pub fn new() -> Self {
        Self { id: Uuid::new_v4() }
    }

    /// The tenant's id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.id, f)
    }
}

/// What a test body may return: `()` or `Result<(), E: Debug>`.
#[diagnostic::on_unimplemented(
    message = "a #[pg_test] fn must return `()` or `Result<(), E>` with `E: Debug`, not `{Self}`"
)]
pub trait TestTermination {
    /// `Err` with the error's `Debug` text when the test failed.
    fn into_result(self) -> Result<(), String>;
}

impl TestTermination for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Debug> TestTermination for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|error| format!("{error:?}"))
    }
}
