//! The entry point of generated code: prepare a test's database, run the
//! test's body, and turn every failure into a panic that names the test.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool, Postgres};

use crate::bootstrap::{self, Kind, Source, Target};
use crate::budget::{Budget, Slots};
use crate::config::Config;
use crate::database::{self, TestDatabase, template_name};
use crate::migrations::Migrations;
use crate::pool::{Cover, TestPool, test_pool};
use crate::server::Server;
use crate::shapes::TestFn;
use crate::spares;
use crate::{Error, Tenant, TestContext};
pub(crate) use pgtest_core::{Isolation, MigrationSource, Script, TestSpec, TestTermination};

/// The size of a test's pool when the attribute does not say: what
/// `#[sqlx::test]` gives, so that code which holds connections while it
/// waits for more (a service's background tasks on the test's pool, say)
/// does not starve. The budget covers only what a pool really opens.
const DEFAULT_MAX_CONNECTIONS: u32 = 5;
/// How long closing the pool may wait for connections the test still holds.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a test may wait for the sweep started beside it.
const SWEEP_WAIT: Duration = Duration::from_secs(10);
/// How long a statement in `isolation = "transaction"` waits for a lock
/// before failing: such a wait is usually another test's transaction.
const LOCK_TIMEOUT: &str = "5s";

/// The most connections the test's pool opens on a server with `budget`,
/// beside `others` connections of the test's own.
fn pool_max(spec: &TestSpec, budget: &Budget, others: u32) -> Result<u32, Error> {
    let largest = budget.largest_pool(others);
    match spec.max_connections {
        Some(max) if max > largest => Err(Error::BudgetTooSmall {
            needed: max + others,
            capacity: budget.capacity(),
        }),
        Some(max) => Ok(max),
        // A transaction's test uses the one connection it is given.
        None if spec.isolation == Isolation::Transaction => Ok(1),
        None => Ok(DEFAULT_MAX_CONNECTIONS.min(largest)),
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
    crate::helper::enter(spec.name);
    // A migrator in a `LazyLock` may start a runtime of its own to read its
    // directory: let it, before this thread drives one.
    if let MigrationSource::Migrator(migrator) = spec.migrations {
        let _ = crate::migrations::static_migrator(migrator);
    }
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
        let cover = teardown
            .as_ref()
            .map(|teardown| Arc::clone(&teardown.cover));
        let outcome = CatchUnwind(test.call(context))
            .await
            .map(TestTermination::into_result);
        let failure = match &outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.clone()),
            Err(payload) => Some(
                panic_message(payload.as_ref())
                    .unwrap_or_default()
                    .to_owned(),
            ),
        };
        // Read before the pool closes: what the test's connections were doing.
        let mut notes = match (&failure, &pool, &cover) {
            (Some(failure), Some(pool), Some(cover)) => pool_hint(&spec, pool, cover, failure),
            _ => String::new(),
        };
        if let Some(pool) = &pool {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, pool.close()).await;
        }
        let kept = match teardown {
            Some(teardown) => teardown.finish(failure.is_none()).await,
            None => None,
        };
        let Some(failure) = failure else { return };
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

/// What to do when the test failed for want of a connection: its pool's
/// own (every connection held by the test's code, while some of it waited
/// for one more) or the budget's. Empty when nothing points there.
fn pool_hint(spec: &TestSpec, pool: &PgPool, cover: &Cover, failure: &str) -> String {
    if spec.isolation == Isolation::Transaction && failure.contains("lock timeout") {
        return format!(
            "\npgtest: test `{}` waited {LOCK_TIMEOUT} for a lock held by another test's \
             transaction (two tests writing the same unique key, say): in \
             isolation = \"transaction\", tests see each other's locks. Use values of the \
             test's own (its tenant's id), or isolation = \"database\"\n",
            spec.name
        );
    }
    if let Some(budget) = cover.failure() {
        return format!(
            "\npgtest: test `{}` could not open another connection: {budget}\n",
            spec.name
        );
    }
    let max = cover.max();
    let timed_out = failure.contains("PoolTimedOut") || failure.contains("pool timed out");
    let exhausted = pool.size() >= max && pool.num_idle() == 0;
    if !timed_out && !exhausted {
        return String::new();
    }
    let slots = match cover.waited() {
        true => " (its pool also waited for connection slots held by other tests)",
        false => "",
    };
    let what = match timed_out {
        true => format!(
            "waited {}s for a connection from its pool of {max}",
            pool.options().get_acquire_timeout().as_secs()
        ),
        false => format!("failed while all {max} connections of its pool were in use"),
    };
    format!(
        "\npgtest: test `{}` {what}{slots}. If its code holds connections while it waits for \
         more (a transaction or acquired connection kept open while querying the pool, \
         background tasks of a service on the pool), give it more: \
         #[pg_test(max_connections = {})]\n",
        spec.name,
        max + 1,
    )
}

/// What the runner undoes when the test ends: the slots it took, the sweep
/// started beside the body (if any) and, in `isolation = "database"`, the
/// test's database.
struct Teardown {
    cover: Arc<Cover>,
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
        drop(self.cover.release().await);
        kept
    }
}

/// Prepares the test's database and pool, after taking the connection
/// slots the test may use; they go back in [`Teardown::finish`], after the
/// pool is closed.
async fn prepare(spec: &TestSpec) -> Result<(TestContext, Teardown), Error> {
    let manifest_dir = Path::new(spec.manifest_dir);
    let config = Config::load(manifest_dir)?;
    let budget_timeout = config.budget_timeout;
    let waits = (config.acquire_timeout, config.grow_after);
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
            let max = pool_max(spec, &budget, 0)?;
            let pool = test_pool(&server, &database, tenant, spec, max, waits).await;
            let ready = Ready {
                template: &template,
                database: &database,
                migrations: &migrations,
            };
            let sweep = shared(&server, &budget, &pool, ready, spec).await?;
            let context = TestContext::new(pool.pool, tenant, database, spec.name);
            let teardown = Teardown {
                cover: pool.cover,
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
            let max = pool_max(spec, &budget, 1)?;
            let (slots, mut admin) = with_template(&server, &budget, built, max, spec).await?;
            let database =
                TestDatabase::create(&server, &budget, &mut admin, &template, spec.name).await?;
            spares::want(&server, &budget, &template, spare_limit);
            let name = database.name.clone();
            let pool = test_pool(&server, &name, tenant, spec, max, waits).await;
            pool.cover.hold(slots, 1).await;
            let context = TestContext::new(pool.pool, tenant, name, spec.name);
            let teardown = Teardown {
                cover: pool.cover,
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

/// The run's shared database and where it comes from.
struct Ready<'a> {
    template: &'a str,
    database: &'a str,
    migrations: &'a Migrations,
}

/// Makes sure this run's shared database (a copy of the migrations'
/// template) is ready, with the test's slots in `pool`'s cover; returns the
/// sweep started when this test made the copy.
async fn shared(
    server: &Server,
    budget: &Budget,
    pool: &TestPool,
    ready: Ready<'_>,
    spec: &TestSpec,
) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
    let max = pool.cover.max();
    let slots = budget.take(budget.upfront(max, 0), spec.name).await?;
    pool.cover.hold(slots, 0).await;
    if bootstrap::is_ready(server, &pool.pool, ready.database, spec.role).await? {
        return Ok(None);
    }
    // The test keeps its slots while it waits: its pool may hold a
    // connection already. The builder builds on the reserve.
    let template_comment = bootstrap::template_comment();
    let built = template_target(ready.template, &template_comment, ready.migrations, &[]);
    let comment = database::run_database_comment(budget, ready.database, spec.name);
    let copied = Target {
        database: ready.database,
        kind: Kind::Shared,
        comment: &comment,
        source: Source::Copy { template: &built },
    };
    let copied_here = bootstrap::build_once(
        server,
        budget,
        Some(&pool.pool),
        copied,
        spec.role,
        spec.name,
    )
    .await?;
    // Whoever copied it sweeps older copies beside its body, on one more
    // slot when one is free at once (else a later run sweeps them).
    if !copied_here {
        return Ok(None);
    }
    let Some(sweeper) = budget.try_take(1, spec.name)? else {
        return Ok(None);
    };
    pool.cover.add(sweeper, 1).await;
    let admin = server.connect(server.admin_database()).await?;
    Ok(Some(sweep_beside(server, budget, admin)))
}

/// Makes sure the template is ready; takes the test's slots (for a pool
/// of `max` and the admin connection) and opens the admin connection that
/// clones it.
async fn with_template(
    server: &Server,
    budget: &Budget,
    target: Target<'_>,
    max: u32,
    spec: &TestSpec,
) -> Result<(Slots, PgConnection), Error> {
    let needed = budget.upfront(max, 1);
    let slots = budget.take(needed, spec.name).await?;
    let mut admin = server.connect(server.admin_database()).await?;
    let ready = Kind::Template.ready_marker();
    let marker = bootstrap::marker(server, &mut admin, target.database).await?;
    if let Some(marker) = marker.filter(|marker| marker.starts_with(ready)) {
        // The marker read here is the stamp: no second query per test.
        bootstrap::note_template_use(server, &mut admin, target.database, &marker).await?;
        return Ok((slots, admin));
    }
    // Built below (on the reserve; this test keeps its slots), stamped as
    // used by the build.
    let _ = admin.close().await;
    bootstrap::build_once(server, budget, None, target, spec.role, spec.name).await?;
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
    crate::compat::raw(&format!("set local lock_timeout = '{LOCK_TIMEOUT}'"))
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
    crate::compat::raw(script.sql)
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
        sqlx::Error::Database(_) => Error::script(script, crate::error::describe(&error)),
        connect => server.connect_error(connect, context.database(), spec.role),
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
