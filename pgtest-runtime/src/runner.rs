//! The entry point of generated code: prepare a test's database (see
//! [`crate::isolation`]), run the test's body, give everything back, and
//! turn every failure into a panic that names the test. A helper process
//! (see [`crate::helpers`]) does its work here instead.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::helpers;
use crate::isolation::{self, Prepared};
use crate::session::Session;
use crate::shapes::TestFn;
use crate::{Error, TestContext, pool};
use pgtest_core::{Flavor, Isolation, MigrationSource, TestSpec, TestTermination};

/// Runs one test: prepares its database, calls the body on a fresh tokio
/// runtime of the test's flavor (one thread unless it asked for
/// `multi_thread`), and cleans up whatever the outcome.
///
/// Every test instantiates this function; it only boxes the body, so that
/// the runner itself (`run_body`) is compiled once, in this crate, rather
/// than once per test in the test's crate.
///
/// # Panics
///
/// When the database cannot be prepared, when the body returns `Err`, and
/// with the body's own panic. Each message names the test.
pub fn run<F: TestFn>(spec: TestSpec, test: F) {
    let body: Body<'_> =
        Box::new(move |context| Box::pin(async move { test.call(context).await.into_result() }));
    let needs = Needs {
        database: F::NEEDS_DATABASE,
        opens_connections: F::OPENS_CONNECTIONS,
        databases: F::DATABASES,
    };
    run_body(spec, needs, body);
}

/// A test's body, its type erased: called with the test's context, what
/// it returned.
type Body<'a> = Box<
    dyn FnOnce(Option<TestContext>) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>> + 'a,
>;

/// What a body's signature asks for (see [`TestFn`]).
struct Needs {
    database: bool,
    opens_connections: bool,
    databases: Option<usize>,
}

/// [`run`] for a body that `needs` what it says.
fn run_body(spec: TestSpec, needs: Needs, body: Body<'_>) {
    let Needs {
        database: needs_database,
        opens_connections,
        databases,
    } = needs;
    if let Some(code) = helpers::run_if_asked() {
        std::process::exit(code);
    }
    helpers::note_test(spec.name);
    // A migrator in a `LazyLock` may start a runtime of its own to read its
    // directory: let it, before this thread drives one.
    let sources = spec.databases.iter().map(|database| database.migrations);
    for source in std::iter::once(spec.migrations).chain(sources) {
        if let MigrationSource::Migrator(migrator) = source {
            let _ = crate::migrations::static_migrator(migrator);
        }
    }
    let mut builder = match spec.flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread { worker_threads } => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = worker_threads {
                builder.worker_threads(threads);
            }
            builder
        }
    };
    // Pools lend permits as the runtime is about to wait (see `pool`).
    let runtime = builder
        .enable_all()
        .on_thread_park(pool::at_park)
        .build()
        .unwrap_or_else(|error| {
            panic!(
                "pgtest: test `{}`: cannot start a tokio runtime: {error}",
                spec.name
            )
        });
    runtime.block_on(async {
        if opens_connections && spec.isolation == Isolation::Transaction {
            panic!(
                "pgtest: test `{}` uses isolation = \"transaction\" but takes a way to open \
                 connections of its own (a pool, pool options or a TestContext), whose writes \
                 would escape the transaction. Take `conn: PoolConnection<Postgres>` instead",
                spec.name
            );
        }
        let groups = spec.databases.len().max(1);
        if let Some(takes) = databases.filter(|&takes| needs_database && takes != groups) {
            panic!(
                "pgtest: test `{}` takes {takes} database(s) but its attribute describes \
                 {groups}: give one `database(…)` group per pool (or connection) argument, in \
                 the arguments' order",
                spec.name
            );
        }
        let prepared = match needs_database {
            true => match prepare(&spec).await {
                Ok(prepared) => Some(prepared),
                Err(error) => panic!("pgtest: test `{}` could not start: {error}", spec.name),
            },
            false => None,
        };
        let (context, teardown) = prepared
            .map(|Prepared { context, teardown }| (context, teardown))
            .unzip();
        pool::before_body().await;
        let pool = context.as_ref().map(|context| context.pool().clone());
        // Where a shared-mode test's rows are, for its failure message.
        let rows = context
            .as_ref()
            .filter(|_| spec.isolation == Isolation::Shared)
            .map(|context| (context.database().to_owned(), context.tenant()));
        let cover = teardown
            .as_ref()
            .map(|teardown| Arc::clone(teardown.cover()));
        let outcome = CatchUnwind(body(context)).await;
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
            (Some(failure), Some(pool), Some(cover)) => {
                isolation::failure_hint(&spec, pool, cover, failure)
            }
            _ => String::new(),
        };
        let kept = match (teardown, &pool) {
            (Some(teardown), Some(pool)) => teardown.finish(failure.is_none(), pool).await,
            _ => None,
        };
        let Some(failure) = failure else { return };
        if let Some(dir) = crate::migrations::missing_default_dir(
            spec.migrations,
            std::path::Path::new(spec.manifest_dir),
        ) {
            notes.push_str(&format!(
                "\npgtest: test `{}` ran with no migrations applied: there is no {} (where \
                 pgtest looks by default: `migrations/` beside Cargo.toml, or sqlx.toml's \
                 `[migrate] migrations-dir`). If it expected tables, add migrations there or \
                 name their directory: #[pg_test(migrations = \"path/to/migrations\")]\n",
                spec.name,
                dir.display()
            ));
        }
        if let Some((database, tenant)) = rows {
            notes.push_str(&shared_rows_note(&spec, &database, tenant).await);
        }
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

/// Where a failed shared-mode test's rows are: the run's database and the
/// test's tenant, and how to look at them.
async fn shared_rows_note(spec: &TestSpec, database: &str, tenant: crate::Tenant) -> String {
    let psql = match Session::get(spec.manifest_dir).await {
        Ok(session) => format!(
            "; inspect them with: {} (or: cargo pgtest psql {database})",
            session.server.psql_command(database)
        ),
        Err(_) => String::new(),
    };
    format!(
        "\npgtest: test `{}` failed in the run's shared database {database} as tenant {tenant}: \
         its rows are those whose tenant_id is '{tenant}' (kept until a later run sweeps the \
         run's database){psql}\n",
        spec.name
    )
}

fn panic_message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Prepares the test's database and pool in the process's session.
async fn prepare(spec: &TestSpec) -> Result<Prepared, Error> {
    let session = Session::get(spec.manifest_dir).await?;
    session.keep_share().await?;
    isolation::prepare(&session, spec).await
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
