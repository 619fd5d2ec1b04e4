//! The entry point of generated code: prepare a test's database, run the
//! test's body, and turn every failure into a panic that names the test.

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::bootstrap::{self, shared_database_name};
use crate::budget::{Budget, Slots};
use crate::config::Config;
use crate::migrations::{MigrationSource, Migrations};
use crate::server::Server;
use crate::{Error, Tenant, TestContext};

/// The longest `application_name` PostgreSQL keeps.
const MAX_APPLICATION_NAME: usize = 63;
/// How long closing the pool may wait for connections the test still holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The most connections the test's pool opens.
    pub max_connections: u32,
    /// The role every connection acts as (`SET ROLE`), if any.
    pub role: Option<&'static str>,
    /// Scripts run on the test's pool before the body.
    pub seeds: &'static [Seed],
}

/// A seed script, embedded at compile time.
#[derive(Debug)]
pub struct Seed {
    /// The path as written in the attribute.
    pub path: &'static str,
    /// The script.
    pub sql: &'static str,
}

/// A test body that `#[pg_test]` can call: one impl per supported signature.
#[diagnostic::on_unimplemented(
    message = "`#[pg_test]` does not support a test with the signature `{Self}`",
    note = "a #[pg_test] fn is async and takes (pool: PgPool), (pool: PgPool, tenant: Tenant), \
            (ctx: TestContext) or nothing"
)]
pub trait TestFn {
    /// What the body returns.
    type Output: TestTermination;
    /// Whether the body needs a database at all.
    const NEEDS_DATABASE: bool;
    /// Calls the body.
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output>;
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PgPool) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self(expect_context(context).into_pool())
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(PgPool, Tenant) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        let context = expect_context(context);
        let tenant = context.tenant();
        self(context.into_pool(), tenant)
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn(TestContext) -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = true;
    fn call(self, context: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self(expect_context(context))
    }
}

impl<Fut: Future<Output: TestTermination>> TestFn for fn() -> Fut {
    type Output = Fut::Output;
    const NEEDS_DATABASE: bool = false;
    fn call(self, _: Option<TestContext>) -> impl Future<Output = Self::Output> {
        self()
    }
}

fn expect_context(context: Option<TestContext>) -> TestContext {
    context.expect("NEEDS_DATABASE is true, so the runner prepared a context")
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

/// Runs one test: prepares its database, calls the body on a fresh
/// single-threaded tokio runtime, and cleans up whatever the outcome.
///
/// # Panics
///
/// When the database cannot be prepared, when the body returns `Err`, and
/// with the body's own panic. Each message names the test.
pub fn run<F: TestFn>(spec: TestSpec, test: F) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|error| {
            panic!(
                "pgtest: test `{}`: cannot start a tokio runtime: {error}",
                spec.name
            )
        });
    runtime.block_on(async {
        let (context, slots) = if F::NEEDS_DATABASE {
            match prepare(&spec).await {
                Ok((context, slots)) => (Some(context), Some(slots)),
                Err(error) => panic!("pgtest: test `{}` could not start: {error}", spec.name),
            }
        } else {
            (None, None)
        };
        let pool = context.as_ref().map(|context| context.pool().clone());
        let outcome = CatchUnwind(test.call(context)).await;
        if let Some(pool) = &pool {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
        }
        drop(slots);
        match outcome {
            Ok(returned) => {
                if let Err(error) = returned.into_result() {
                    let hint = pool_hint(&spec, pool.as_ref(), &error);
                    panic!(
                        "pgtest: test `{}` returned an error: {error}{hint}",
                        spec.name
                    );
                }
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied());
                if let Some(message) = message {
                    eprint!("{}", pool_hint(&spec, pool.as_ref(), message));
                }
                resume_unwind(payload)
            }
        }
    });
}

/// What to do when the test failed waiting for a connection of its own
/// pool: with every connection held by the test itself, more waiting does
/// not help. Empty when the failure is something else.
fn pool_hint(spec: &TestSpec, pool: Option<&PgPool>, failure: &str) -> String {
    let timed_out = failure.contains("PoolTimedOut") || failure.contains("pool timed out");
    let Some(pool) = pool.filter(|_| timed_out) else {
        return String::new();
    };
    let n = spec.max_connections;
    format!(
        "\npgtest: test `{}` waited {}s for a connection from its pool of {n}, all of them \
         held by the test itself (a transaction or acquired connection kept open while \
         querying the pool, say). Give it more: #[pg_test(max_connections = {})]\n",
        spec.name,
        pool.options().get_acquire_timeout().as_secs(),
        n + 1,
    )
}

/// Prepares the test's database and pool, after taking the connection
/// slots the pool may use; the slots go back when dropped, after the pool
/// is closed.
async fn prepare(spec: &TestSpec) -> Result<(TestContext, Slots), Error> {
    let manifest_dir = Path::new(spec.manifest_dir);
    let config = Config::load(manifest_dir)?;
    let (budget_timeout, acquire_timeout) = (config.budget_timeout, config.acquire_timeout);
    let server = Server::new(config)?;
    let budget = Budget::of(&server, budget_timeout).await?;
    let mut slots = budget.take(spec.max_connections, spec.name).await?;
    let migrations = Migrations::load(spec.migrations, manifest_dir).await?;
    let database = shared_database_name(spec.package, &migrations.hash);
    let tenant = Tenant::new();
    let pool = test_pool(&server, &database, tenant, spec, acquire_timeout);
    if !bootstrap::is_ready(&server, &pool, &database, spec.role).await? {
        // Waiting for the build holds no slots, so waiters cannot starve
        // the builder of the connections it needs.
        drop(slots);
        let (migrations, role) = (&migrations, spec.role);
        bootstrap::build_once(
            &server, &budget, &pool, &database, migrations, role, spec.name,
        )
        .await?;
        slots = budget.take(spec.max_connections, spec.name).await?;
    }
    for seed in spec.seeds {
        sqlx::raw_sql(sqlx::AssertSqlSafe(seed.sql))
            .execute(&pool)
            .await
            .map_err(|error| seed_error(&server, seed, &database, spec.role, error))?;
    }
    tracing::debug!(test = spec.name, %database, %tenant, "test prepared");
    Ok((TestContext::new(pool, tenant, database, spec.name), slots))
}

/// A lazy pool: it opens connections only when the test uses them, each
/// carrying the tenant, the test's name and the test's role.
fn test_pool(
    server: &Server,
    database: &str,
    tenant: Tenant,
    spec: &TestSpec,
    acquire_timeout: Duration,
) -> PgPool {
    let mut startup = vec![(Tenant::SETTING, tenant.to_string())];
    if let Some(role) = spec.role {
        startup.push(("role", role.to_owned()));
    }
    let options = server
        .options_for(database)
        .application_name(&application_name(spec.name))
        .options(startup);
    PgPoolOptions::new()
        .max_connections(spec.max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// The test's path, shortened from the left to what PostgreSQL keeps.
fn application_name(test: &str) -> String {
    let mut start = test.len().saturating_sub(MAX_APPLICATION_NAME);
    while !test.is_char_boundary(start) {
        start += 1;
    }
    test[start..].to_owned()
}

fn seed_error(
    server: &Server,
    seed: &Seed,
    database: &str,
    role: Option<&str>,
    error: sqlx::Error,
) -> Error {
    match error {
        sqlx::Error::Database(_) => Error::Seed {
            path: seed.path,
            message: crate::error::describe(&error),
        },
        connect => server.connect_error(connect, database, role),
    }
}

/// Polls a future, catching a panic so that cleanup runs before the panic
/// goes on.
struct CatchUnwind<F>(F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: the inner future is never moved out of `self`.
        let inner = unsafe { self.map_unchecked_mut(|this| &mut this.0) };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::application_name;

    #[test]
    fn a_long_test_name_keeps_its_end() {
        let name = format!("{}::the_test", "module".repeat(20));
        let shown = application_name(&name);
        assert_eq!(shown.len(), 63);
        assert!(shown.ends_with("::the_test"));
    }
}
