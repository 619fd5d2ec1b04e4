//! The entry point of generated code: prepare a test's database, run the
//! test's body, and turn every failure into a panic that names the test.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool, Postgres};

use crate::bootstrap::{self, Kind, Source, Target};
use crate::budget::{Budget, Slots};
use crate::config::Config;
use crate::database::{self, TestDatabase, template_name};
use crate::migrations::{MigrationSource, Migrations};
use crate::server::Server;
use crate::shapes::{TestFn, TestTermination};
use crate::spares;
use crate::{Error, Tenant, TestContext};

/// The longest `application_name` PostgreSQL keeps.
const MAX_APPLICATION_NAME: usize = 63;
/// How long closing the pool may wait for connections the test still holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a test may wait for the sweep started beside it.
const SWEEP_WAIT: Duration = Duration::from_secs(10);
/// How long a statement in `isolation = "transaction"` waits for a lock
/// before failing: such a wait is usually another test's transaction.
const LOCK_TIMEOUT: &str = "5s";

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
    /// Scripts run before the body, after the fixtures.
    pub seeds: &'static [Script],
    /// sqlx-style fixtures: part of the template in `isolation =
    /// "database"`, else run before the body like seeds.
    pub fixtures: &'static [Script],
    /// How the test is kept apart from the others.
    pub isolation: Isolation,
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

/// A SQL script embedded at compile time: a seed or a fixture.
#[derive(Debug)]
pub struct Script {
    /// The path as written in the attribute.
    pub path: &'static str,
    /// The script.
    pub sql: &'static str,
}

impl Script {
    /// The error for this script failing with the server's `message`.
    pub(crate) fn error(&self, message: String) -> Error {
        Error::Script {
            path: self.path,
            message,
        }
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
        if F::OPENS_CONNECTIONS && spec.isolation == Isolation::Transaction {
            panic!(
                "pgtest: test `{}` uses isolation = \"transaction\" but takes a way to open \
                 connections of its own (a pool, pool options or a TestContext), whose writes \
                 would escape the transaction. Take `conn: PoolConnection<Postgres>` instead",
                spec.name
            );
        }
        let prepared = match F::NEEDS_DATABASE {
            true => match prepare(&spec).await {
                Ok(prepared) => Some(prepared),
                Err(error) => panic!("pgtest: test `{}` could not start: {error}", spec.name),
            },
            false => None,
        };
        let (context, teardown) = prepared.unzip();
        let pool = context.as_ref().map(|context| context.pool().clone());
        let outcome = CatchUnwind(test.call(context))
            .await
            .map(TestTermination::into_result);
        if let Some(pool) = &pool {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
        }
        let failure = match &outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.clone()),
            Err(payload) => Some(
                panic_message(payload.as_ref())
                    .unwrap_or_default()
                    .to_owned(),
            ),
        };
        let kept = match teardown {
            Some(teardown) => teardown.finish(failure.is_none()).await,
            None => None,
        };
        let Some(failure) = failure else { return };
        let mut notes = pool_hint(&spec, pool.as_ref(), &failure);
        if let Some(kept) = kept {
            notes.push_str(&format!("\npgtest: test `{}` failed; {kept}\n", spec.name));
        }
        match outcome {
            Ok(_) => panic!(
                "pgtest: test `{}` returned an error: {failure}{notes}",
                spec.name
            ),
            Err(payload) => {
                eprint!("{notes}");
                resume_unwind(payload)
            }
        }
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// What to do when the test failed waiting for a connection of its own
/// pool: with every connection held by the test itself, more waiting does
/// not help. Empty when the failure is something else.
fn pool_hint(spec: &TestSpec, pool: Option<&PgPool>, failure: &str) -> String {
    let timed_out = failure.contains("PoolTimedOut") || failure.contains("pool timed out");
    if spec.isolation == Isolation::Transaction && failure.contains("lock timeout") {
        return format!(
            "\npgtest: test `{}` waited {LOCK_TIMEOUT} for a lock held by another test's \
             transaction (two tests writing the same unique key, say): in \
             isolation = \"transaction\", tests see each other's locks. Use values of the \
             test's own (its tenant's id), or isolation = \"database\"\n",
            spec.name
        );
    }
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

/// What the runner undoes when the test ends: the slots it took, the sweep
/// started beside the body (if any) and, in `isolation = "database"`, the
/// test's database.
struct Teardown {
    slots: Slots,
    sweep: Option<tokio::task::JoinHandle<()>>,
    own: Option<(Server, TestDatabase)>,
}

impl Teardown {
    /// Gives everything back; for a failed test with a database of its
    /// own, says how to inspect it.
    async fn finish(self, passed: bool) -> Option<String> {
        if let Some(sweep) = self.sweep {
            let _ = tokio::time::timeout(SWEEP_WAIT, sweep).await;
        }
        let kept = self
            .own
            .and_then(|(server, database)| database.finish(passed, &server));
        drop(self.slots);
        kept
    }
}

/// Prepares the test's database and pool, after taking the connection
/// slots the test may use; they go back in [`Teardown::finish`], after the
/// pool is closed.
async fn prepare(spec: &TestSpec) -> Result<(TestContext, Teardown), Error> {
    let manifest_dir = Path::new(spec.manifest_dir);
    let config = Config::load(manifest_dir)?;
    let (budget_timeout, acquire_timeout) = (config.budget_timeout, config.acquire_timeout);
    let spare_limit = config.spare_databases;
    let server = Server::new(config)?;
    let budget = Budget::of(&server, budget_timeout).await?;
    // The spares helper works only while no process holds this.
    budget.hold_while_alive(spares::CLIENTS_LOCK).await?;
    let migrations = Migrations::load(spec.migrations, manifest_dir).await?;
    let tenant = Tenant::new();
    let (context, teardown) = match spec.isolation {
        Isolation::Shared | Isolation::Transaction => {
            let template = template_name(spec.package, &migrations, &[]);
            let database = database::run_database_name(&template);
            database::hold_run_database(&budget, &database).await?;
            let pool = test_pool(&server, &database, tenant, spec, acquire_timeout);
            let (slots, sweep) = shared(
                &server,
                &budget,
                &pool,
                &database,
                &template,
                &migrations,
                spec,
            )
            .await?;
            let context = TestContext::new(pool, tenant, database, spec.name);
            let teardown = Teardown {
                slots,
                sweep,
                own: None,
            };
            (context, teardown)
        }
        Isolation::Database => {
            let template = template_name(spec.package, &migrations, spec.fixtures);
            let comment = bootstrap::template_comment();
            let built = template_target(&template, &comment, &migrations, spec.fixtures);
            // The pool's connections and an admin connection.
            let (slots, mut admin) = with_template(&server, &budget, built, spec).await?;
            let database =
                TestDatabase::create(&server, &budget, &mut admin, &template, spec.name).await?;
            spares::want(&server, &budget, &template, spare_limit);
            let name = database.name.clone();
            let pool = test_pool(&server, &name, tenant, spec, acquire_timeout);
            let context = TestContext::new(pool, tenant, name, spec.name);
            let teardown = Teardown {
                slots,
                sweep: Some(sweep_beside(&server, &budget, admin)),
                own: Some((server.clone(), database)),
            };
            (context, teardown)
        }
    };
    let context = match spec.isolation {
        Isolation::Transaction => {
            let mut connection = begin(&server, &context, spec).await?;
            for script in scripts(spec) {
                run_script(&mut *connection, script)
                    .await
                    .map_err(|error| script_error(&server, script, &context, spec, error))?;
            }
            context.with_connection(connection)
        }
        Isolation::Shared | Isolation::Database => {
            for script in scripts(spec) {
                run_script(context.pool(), script)
                    .await
                    .map_err(|error| script_error(&server, script, &context, spec, error))?;
            }
            context
        }
    };
    tracing::debug!(test = spec.name, database = context.database(), %tenant, "test prepared");
    Ok((context, teardown))
}

/// Sweeps old copies of templates on `admin`, beside the test's body;
/// passed tests' databases are left to the spares helper if it runs.
fn sweep_beside(
    server: &Server,
    budget: &Budget,
    admin: PgConnection,
) -> tokio::task::JoinHandle<()> {
    let server = server.clone();
    let leave_passed = spares::helper_running(budget);
    tokio::spawn(async move { database::sweep(&server, admin, leave_passed).await })
}

fn template_target<'a>(
    template: &'a str,
    comment: &'a str,
    migrations: &'a Migrations,
    fixtures: &'a [Script],
) -> Target<'a> {
    Target {
        database: template,
        kind: Kind::Template,
        comment,
        source: Source::Build {
            migrations,
            fixtures,
        },
    }
}

/// Makes sure this run's shared database (`database`, a copy of the
/// migrations' template) is ready and takes the test's slots.
async fn shared(
    server: &Server,
    budget: &Budget,
    pool: &PgPool,
    database: &str,
    template: &str,
    migrations: &Migrations,
    spec: &TestSpec,
) -> Result<(Slots, Option<tokio::task::JoinHandle<()>>), Error> {
    let slots = budget.take(spec.max_connections, spec.name).await?;
    if bootstrap::is_ready(server, pool, database, spec.role).await? {
        return Ok((slots, None));
    }
    // Waiting for a build holds no slots, so waiters cannot starve the
    // builder of the connections it needs.
    drop(slots);
    let template_comment = bootstrap::template_comment();
    let built = template_target(template, &template_comment, migrations, &[]);
    let comment = database::run_database_comment(budget, database, spec.name);
    let copied = Target {
        database,
        kind: Kind::Shared,
        comment: &comment,
        source: Source::Copy { template: &built },
    };
    let copied_here =
        bootstrap::build_once(server, budget, Some(pool), copied, spec.role, spec.name).await?;
    // Whoever copied it sweeps older copies beside its body, on one more
    // slot (when the budget has room for it).
    let sweeper = spec.max_connections + 1;
    if !copied_here || sweeper > budget.capacity() {
        return Ok((budget.take(spec.max_connections, spec.name).await?, None));
    }
    let slots = budget.take(sweeper, spec.name).await?;
    let admin = server.connect(server.admin_database()).await?;
    Ok((slots, Some(sweep_beside(server, budget, admin))))
}

/// Makes sure the template is ready; takes the test's slots and opens the
/// admin connection that clones it.
async fn with_template(
    server: &Server,
    budget: &Budget,
    target: Target<'_>,
    spec: &TestSpec,
) -> Result<(Slots, PgConnection), Error> {
    let needed = spec.max_connections + 1;
    let slots = budget.take(needed, spec.name).await?;
    let mut admin = server.connect(server.admin_database()).await?;
    let ready = Kind::Template.ready_marker();
    let marker = bootstrap::marker(server, &mut admin, target.database).await?;
    if let Some(marker) = marker.filter(|marker| marker.starts_with(ready)) {
        // The marker read here is the stamp: no second query per test.
        bootstrap::note_template_use(server, &mut admin, target.database, &marker).await?;
        return Ok((slots, admin));
    }
    // Built below, stamped as used by the build.
    let _ = admin.close().await;
    drop(slots);
    bootstrap::build_once(server, budget, None, target, spec.role, spec.name).await?;
    let slots = budget.take(needed, spec.name).await?;
    Ok((slots, server.connect(server.admin_database()).await?))
}

/// The test's connection inside the transaction that will be rolled back.
/// sqlx counts that transaction, so the test's own `begin()` becomes a
/// savepoint and its `commit()` a release.
async fn begin(
    server: &Server,
    context: &TestContext,
    spec: &TestSpec,
) -> Result<PoolConnection<Postgres>, Error> {
    let database = context.database();
    let mut connection = context
        .pool()
        .acquire()
        .await
        .map_err(|error| server.connect_error(error, database, spec.role))?;
    let outer = connection
        .begin()
        .await
        .map_err(|error| server.query_error("beginning the test's transaction", &error))?;
    // Not dropped, which would roll back now: closing the pool ends it.
    std::mem::forget(outer);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "set local lock_timeout = '{LOCK_TIMEOUT}'"
    )))
    .execute(&mut *connection)
    .await
    .map_err(|error| server.query_error("setting the lock timeout", &error))?;
    Ok(connection)
}

/// The scripts to run before the body: fixtures (unless the template
/// holds them), then seeds.
fn scripts(spec: &TestSpec) -> impl Iterator<Item = &'static Script> {
    let fixtures = match spec.isolation {
        Isolation::Database => &[][..],
        Isolation::Shared | Isolation::Transaction => spec.fixtures,
    };
    fixtures.iter().chain(spec.seeds)
}

async fn run_script<'c>(
    executor: impl sqlx::Executor<'c, Database = Postgres>,
    script: &Script,
) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(script.sql))
        .execute(executor)
        .await
        .map(|_| ())
}

fn script_error(
    server: &Server,
    script: &Script,
    context: &TestContext,
    spec: &TestSpec,
    error: sqlx::Error,
) -> Error {
    match error {
        sqlx::Error::Database(_) => script.error(crate::error::describe(&error)),
        connect => server.connect_error(connect, context.database(), spec.role),
    }
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
