//! A test's pool: lazy, carrying the tenant, the test's name and role on
//! every connection, covered by the connection budget as it grows, and
//! opening a further connection only when the test waits for one.
//!
//! Why the gate: sqlx gives a used connection back to its pool in a spawned
//! task, after a ping, and its `acquire` opens a new connection whenever the
//! pool is below its maximum and has none idle. So a plain pool of five opens
//! a second (and often a third) connection for a test that runs its queries
//! one after another, each a new server process, while a pool of one starves
//! code that holds a connection while it waits for another. The [`Gate`]
//! gives both: the test's pool is a child of a pool that only lends it
//! *permits* (sqlx's `PoolOptions::parent`, public in sqlx 0.8 and 0.9 but
//! hidden from its documentation: a child opens a connection only with a
//! permit of its own or one taken from its parent), and the gate lends one
//! more only when a task of the test waits for a connection. Once the pool
//! has handed out no connection for `PGTEST_GROW_AFTER` (10 ms) while all
//! of its connections are in use, the gate queues for a permit of the
//! parent itself and lets one go: the parent's semaphore is fair, so a task
//! already waiting gets it, and else the gate gets it back. A connection on
//! its way back is only a ping away, and a slow query has no one waiting
//! behind it, so a test that runs one query at a time keeps its one
//! connection.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::budget::{Budget, Slots};
use crate::session::Session;
use crate::{Error, Tenant};
use pgtest_core::{Isolation, TestSpec};

/// The size of a test's pool when the attribute does not say: what
/// `#[sqlx::test]` gives, so that code which holds connections while it
/// waits for more (a service's background tasks on the test's pool, say)
/// does not starve. The budget covers only what a pool really opens.
const DEFAULT_MAX_CONNECTIONS: u32 = 5;

/// The longest `application_name` PostgreSQL keeps.
const MAX_APPLICATION_NAME: usize = 63;

/// How often the gate looks for who took a permit it let go.
const GATE_TICK: Duration = Duration::from_millis(2);

/// The longest a connection given back counts as on its way to idle.
const RETURN_LIMIT: Duration = Duration::from_secs(1);

/// How long the gate looks for who took a permit it let go.
const PROBE_LIMIT: Duration = Duration::from_secs(1);

/// The pool of a test and the slots that cover it.
pub(crate) struct TestPool {
    /// The pool the test gets.
    pub(crate) pool: PgPool,
    /// Its slots, shared with the pool's gate.
    pub(crate) cover: Arc<Cover>,
}

/// The slots of one test, grown by its pool's gate before it lends the
/// pool a permit, so that every connection the pool may open has its slot.
pub(crate) struct Cover {
    /// The pool's maximum.
    max: u32,
    /// Connections the test opens beside the pool (an admin connection).
    others: AtomicU32,
    /// `None` before the test takes its slots and after it gives them back.
    slots: tokio::sync::Mutex<Option<Slots>>,
    /// Whether growing ever had to wait for a slot, for the failure message.
    waited: AtomicBool,
    /// The budget's error, when growing failed.
    failure: Mutex<Option<String>>,
}

impl Cover {
    /// Holds `slots`, taken with [`crate::budget::Budget::upfront`] for
    /// this pool and `others` connections beside it.
    pub(crate) async fn hold(&self, slots: Slots, others: u32) {
        self.others.store(others, Ordering::Release);
        *self.slots.lock().await = Some(slots);
    }

    /// Adds `more` slots, for `others` more connections beside the pool.
    pub(crate) async fn add(&self, more: Slots, others: u32) {
        self.others.fetch_add(others, Ordering::AcqRel);
        if let Some(slots) = self.slots.lock().await.as_mut() {
            slots.absorb(more);
        }
    }

    /// The pool's maximum.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Gives the slots back; the pool opens nothing more once closed.
    pub(crate) async fn release(&self) -> Option<Slots> {
        self.slots.lock().await.take()
    }

    /// Whether growing the pool ever found no slot free at once.
    pub(crate) fn waited(&self) -> bool {
        self.waited.load(Ordering::Relaxed)
    }

    /// What the budget said when growing failed.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the slots cover `permits` connections of the pool, beside the
    /// test's others, growing them as needed (see [`Slots::grow`]).
    async fn cover(&self, permits: u32) -> Result<(), Error> {
        let mut slots = self.slots.lock().await;
        let others = self.others.load(Ordering::Acquire);
        if let Some(slots) = slots.as_mut() {
            while slots.count() < others + permits {
                if let Err(error) = slots.grow(others + self.max, &self.waited).await {
                    *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(error.to_string());
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Gives back the slots beyond `permits` connections of the pool.
    async fn trim(&self, permits: u32) {
        let others = self.others.load(Ordering::Acquire);
        if let Some(slots) = self.slots.lock().await.as_mut() {
            slots.shrink_to(others + permits);
        }
    }
}

/// Lends a test's pool the permits for its connections: the first at once,
/// each further one when a task of the test waits for one (see the
/// module's docs).
struct Gate {
    /// The parent whose permits the test's pool takes before it opens a
    /// connection. It never opens a connection itself.
    parent: PgPool,
    /// One pool per permit held back, each holding one of the parent's
    /// permits; dropping one lends its permit to the first in the
    /// parent's queue.
    held: Vec<PgPool>,
    /// What the test's pool did so far, counted by its hooks.
    counts: Arc<Counts>,
    /// The test's slots, which cover every permit lent.
    cover: Arc<Cover>,
}

/// What a test's pool did so far.
struct Counts {
    /// Connections handed out, new or reused.
    handouts: AtomicU64,
    /// Connections opened.
    opened: AtomicU32,
    /// Connections given back (before sqlx's ping on the way to idle).
    released: AtomicU64,
    /// Idle connections handed out again.
    reused: AtomicU64,
    /// When the last connection was given back, in ms since `since`.
    last_release: AtomicU64,
    since: Instant,
}

impl Counts {
    /// Whether a connection given back is still on its way to idle (the
    /// ping sqlx sends first can take long on a busy server): a task that
    /// waits for it is not starved. A connection that never arrives (its
    /// ping failed) counts for a second at most.
    fn on_its_way_back(&self, idle: usize) -> bool {
        let released = self.released.load(Ordering::Acquire);
        let arrived = self.reused.load(Ordering::Acquire) + idle as u64;
        let now = self.since.elapsed().as_millis() as u64;
        let since_release = now.saturating_sub(self.last_release.load(Ordering::Acquire));
        released > arrived && since_release < RETURN_LIMIT.as_millis() as u64
    }
}

impl Gate {
    /// A gate for a pool of `max`, with all permits but the first held back.
    async fn new(max: u32, cover: Arc<Cover>) -> Self {
        let parent = quiet_pool()
            .max_connections(max)
            .connect_lazy_with(nowhere());
        let mut held = Vec::new();
        for _ in 1..max {
            let holder = holder(&parent);
            // Takes a permit of the parent, fails to connect, and keeps the
            // permit in its own semaphore until it is dropped.
            let _ = holder.acquire().await;
            held.push(holder);
        }
        Self {
            parent,
            held,
            counts: Arc::new(Counts {
                handouts: AtomicU64::new(0),
                opened: AtomicU32::new(0),
                released: AtomicU64::new(0),
                reused: AtomicU64::new(0),
                last_release: AtomicU64::new(0),
                since: Instant::now(),
            }),
            cover,
        }
    }

    /// Lends one more permit whenever `pool` has handed out no connection
    /// for `grow_after` while all of its connections are in use and a task
    /// waits for one, until it may open its maximum or closes.
    async fn watch(mut self, pool: PgPool, grow_after: Duration) {
        let mut last = self.counts.handouts.load(Ordering::Acquire);
        let mut quiet_since = Instant::now();
        while !self.held.is_empty() && !pool.is_closed() {
            // Twice per wait: a test has one of these per process, and on
            // a busy machine every wake-up costs.
            tokio::time::sleep((grow_after / 2).max(Duration::from_millis(1))).await;
            let handouts = self.counts.handouts.load(Ordering::Acquire);
            let lent = pool.options().get_max_connections() - self.held.len() as u32;
            // Every connection it may open is open (none still connecting,
            // which can take long with a slow login) and in use.
            let opened = self.counts.opened.load(Ordering::Acquire);
            let (size, idle) = (pool.size(), pool.num_idle());
            let all_busy =
                idle == 0 && size >= lent && size <= opened && !self.counts.on_its_way_back(idle);
            if handouts != last || !all_busy {
                (last, quiet_since) = (handouts, Instant::now());
            } else if quiet_since.elapsed() >= grow_after {
                let lend = tokio::select! {
                    lend = self.lend_if_waited_for(&pool, lent) => lend,
                    () = pool.close_event() => break,
                };
                match lend {
                    Ok(true) => {
                        tracing::debug!(lent = lent + 1, "pool starved: lent one more connection")
                    }
                    Ok(false) => {}
                    // The budget's error is the cover's, for the test's hint.
                    Err(_) => break,
                }
                quiet_since = Instant::now();
            }
        }
        drop(self.parent);
    }

    /// Lends one more permit if a task of the test waits for a connection
    /// (all `lent` are in use), after taking the slot that covers it; gives
    /// the slot back when none waits. Whether one waits, only the parent's
    /// queue knows: a new holder queues for the permit behind any task
    /// already waiting, and the permit goes to the first in line.
    async fn lend_if_waited_for(&mut self, pool: &PgPool, lent: u32) -> Result<bool, Error> {
        self.cover.cover(lent + 1).await?;
        let holder = holder(&self.parent);
        let mut acquire = pin!(holder.acquire());
        // sqlx's child pool looks at its own permits first and at its
        // parent's on the next poll: two polls queue it on the parent.
        let free = std::future::poll_fn(|cx| {
            for _ in 0..2 {
                if acquire.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(true);
                }
            }
            Poll::Ready(false)
        })
        .await;
        if free {
            // A permit the pool gave back (a failed connection attempt):
            // held back again.
            self.held.push(holder);
            self.cover
                .trim(self.cover.max - self.held.len() as u32)
                .await;
            return Ok(false);
        }
        drop(self.held.pop());
        let size = pool.size();
        let taken_by_test = async {
            while pool.size() <= size {
                tokio::time::sleep(GATE_TICK).await;
            }
        };
        // Without a sign either way, the permit counts as lent: its slot
        // stays.
        let waited_for = tokio::select! {
            _ = &mut acquire => false,
            () = taken_by_test => true,
            () = tokio::time::sleep(PROBE_LIMIT) => true,
        };
        if !waited_for {
            self.held.push(holder);
            self.cover.trim(lent).await;
        }
        Ok(waited_for)
    }
}

/// A pool that takes one of `parent`'s permits when its `acquire` fails,
/// and holds it until it is dropped.
fn holder(parent: &PgPool) -> PgPool {
    quiet_pool()
        .max_connections(1)
        .parent(parent.clone())
        .connect_lazy_with(nowhere())
}

/// Options of a pool that never keeps or opens a connection of its own.
fn quiet_pool() -> PgPoolOptions {
    PgPoolOptions::new()
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
}

/// Where nothing listens: a connection attempt fails at once, which is
/// what moves a permit from the parent to a holder.
fn nowhere() -> PgConnectOptions {
    PgConnectOptions::new().socket("/nonexistent/pgtest-gate")
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
/// the tenant, the test's name and the test's role.
pub(crate) async fn test_pool(
    session: &Session,
    database: &str,
    tenant: Tenant,
    spec: &TestSpec,
    max: u32,
) -> TestPool {
    let (acquire_timeout, grow_after) = (session.config.acquire_timeout, session.config.grow_after);
    let server = &session.server;
    let mut startup = vec![(Tenant::SETTING, tenant.to_string())];
    if let Some(role) = spec.role {
        startup.push(("role", role.to_owned()));
    }
    let options = server
        .options_for(database)
        .application_name(&application_name(spec.name))
        .options(startup);
    let cover = Arc::new(Cover {
        max,
        others: AtomicU32::new(0),
        slots: tokio::sync::Mutex::new(None),
        waited: AtomicBool::new(false),
        failure: Mutex::new(None),
    });
    let gate = Gate::new(max, Arc::clone(&cover)).await;
    let (on_new, on_reuse) = (Arc::clone(&gate.counts), Arc::clone(&gate.counts));
    let on_release = Arc::clone(&gate.counts);
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .parent(gate.parent.clone())
        .after_connect(move |_, _| {
            on_new.handouts.fetch_add(1, Ordering::AcqRel);
            on_new.opened.fetch_add(1, Ordering::AcqRel);
            Box::pin(async { Ok(()) })
        })
        .before_acquire(move |_, _| {
            on_reuse.handouts.fetch_add(1, Ordering::AcqRel);
            on_reuse.reused.fetch_add(1, Ordering::AcqRel);
            Box::pin(async { Ok(true) })
        })
        .after_release(move |_, _| {
            let now = on_release.since.elapsed().as_millis() as u64;
            on_release.last_release.store(now, Ordering::Release);
            on_release.released.fetch_add(1, Ordering::AcqRel);
            Box::pin(async { Ok(true) })
        })
        .connect_lazy_with(options);
    tokio::spawn(gate.watch(pool.clone(), grow_after));
    TestPool { pool, cover }
}

/// What to do when the test failed for want of a connection: its pool's
/// own (every connection held by the test's code, while some of it waited
/// for one more) or the budget's. Empty when nothing points there.
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
