//! A test's pool: lazy, carrying the tenant, the test's name and role on
//! every connection, covered by the connection budget as it grows
//! ([`cover`]), behind a gate that decides when it may open one more
//! connection ([`gate`]), which the runner and the test's arguments reach
//! through the gates of their thread ([`thread`]). Two kinds, by the
//! attribute's `pool`:
//!
//! - **frugal** (`#[pg_test]`'s): a further connection only when a task
//!   of the test waits for one. sqlx gives a used connection back to its
//!   pool in a spawned task, after a ping, and its `acquire` opens a new
//!   connection whenever the pool is below its maximum and has none idle.
//!   So a plain pool of five opens a second (and often a third)
//!   connection for a test that runs its queries one after another, each
//!   a new server process, while a pool of one starves code that holds a
//!   connection while it waits for another. The frugal pool gives both.
//! - **sqlx** (`#[sqlx_test]`'s): opens and hands out connections as a
//!   plain sqlx pool of the same size and options does, new ones while
//!   others are on their way back included, so that a suite written for
//!   `#[sqlx::test]` sees what it saw there: the options `#[sqlx::test]`
//!   gives (sqlx's defaults, idle connections closed after a second), one
//!   idle connection when the body starts, and every connection's slot
//!   taken before it opens, one ahead.

mod account;
mod cover;
mod gate;
mod thread;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::budget::Budget;
use crate::session::Session;
use crate::{Error, Tenant};
use gate::Gate;
use pgtest_core::{Isolation, PoolKind, TestSpec};

pub(crate) use account::Account;
pub(crate) use cover::Cover;
pub(crate) use thread::{at_park, before_body, own_pool_options};

/// The size of a test's pool when the attribute does not say: what
/// `#[sqlx::test]` gives, so that code which holds connections while it
/// waits for more (a service's background tasks on the test's pool, say)
/// does not starve. The budget covers only what a pool really opens.
const DEFAULT_MAX_CONNECTIONS: u32 = 5;

/// How long `#[sqlx::test]`'s pool keeps a connection idle before it
/// closes it.
const SQLX_TEST_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest `application_name` PostgreSQL keeps.
const MAX_APPLICATION_NAME: usize = 63;

/// The pool of a test and the slots that cover it.
pub(crate) struct TestPool {
    /// The pool the test gets.
    pub(crate) pool: PgPool,
    /// Its slots, shared with the pool's gate.
    pub(crate) cover: Arc<Cover>,
}

/// The most connections the test's pool opens on a server with `budget`,
/// beside `others` connections of the test's own.
pub(crate) fn max_for(spec: &TestSpec, budget: &Budget, others: u32) -> Result<u32, Error> {
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

/// A lazy pool of at most `max` connections on `database`, each carrying
/// the tenant, the test's name and the test's role, of the kind the
/// test's attribute asked for.
pub(crate) async fn test_pool(
    session: &Session,
    database: &str,
    tenant: Tenant,
    spec: &TestSpec,
    max: u32,
) -> TestPool {
    let server = &session.server;
    let mut startup = vec![(Tenant::SETTING, tenant.to_string())];
    if let Some(role) = spec.role {
        startup.push(("role", role.to_owned()));
    }
    let connect = server
        .options_for(database)
        .application_name(&application_name(spec.name))
        .options(startup);
    let options = match spec.pool {
        PoolKind::Frugal => PgPoolOptions::new().test_before_acquire(false),
        PoolKind::Sqlx => PgPoolOptions::new().idle_timeout(SQLX_TEST_IDLE_TIMEOUT),
    };
    let options = options
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(session.config.acquire_timeout);
    let cover = Arc::new(Cover::new(max));
    // A transaction's test holds its one connection: nothing to hand over.
    let one_ahead = spec.pool == PoolKind::Sqlx && spec.isolation != Isolation::Transaction;
    let grow_after = session.config.grow_after;
    let pool = Gate::open(options, connect, Arc::clone(&cover), grow_after, one_ahead).await;
    TestPool { pool, cover }
}

/// What to do when the test failed for want of a connection: its pool's
/// own (every connection held by the test's code, while some of it waited
/// for one more) or the budget's. Empty when nothing points there: a pool
/// whose connections are all in use at the failure (a transaction's one,
/// on its way back) says nothing unless a task was seen waiting, or an
/// acquire timed out.
pub(crate) fn starvation_hint(
    spec: &TestSpec,
    pool: &PgPool,
    cover: &Cover,
    failure: &str,
) -> String {
    if let Some(budget) = cover.failure() {
        return format!(
            "\npgtest: test `{}` could not open another connection: {budget}\n",
            spec.name
        );
    }
    let max = cover.max();
    let timed_out = failure.contains("PoolTimedOut") || failure.contains("pool timed out");
    // A task was seen waiting, and none of the pool's connections is idle
    // (on a loaded machine the pool may not have grown to its maximum yet).
    let exhausted = cover.starved() && pool.num_idle() == 0;
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
        false if pool.size() >= max => {
            format!("failed while all {max} connections of its pool were in use")
        }
        false => format!(
            "failed while a task of it waited for a connection ({} of its pool's {max} were \
             open, all in use)",
            pool.size()
        ),
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

/// The test's path, shortened from the left to what PostgreSQL keeps.
fn application_name(test: &str) -> String {
    let mut start = test.len().saturating_sub(MAX_APPLICATION_NAME);
    while !test.is_char_boundary(start) {
        start += 1;
    }
    test[start..].to_owned()
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
