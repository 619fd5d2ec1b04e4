//! The gate of a test's pool: the pool is a plain sqlx pool of its size,
//! but all its permits except those the gate lends are held by *holders*,
//! pools that are children of it (sqlx's `PoolOptions::parent`, public in
//! sqlx 0.8 and 0.9 but hidden from its documentation: a child takes a
//! permit of its parent before it opens a connection, and keeps it until
//! it is dropped). A holder connects nowhere, so its one attempt fails at
//! once and leaves it holding the permit; dropping it lends the permit
//! back to the test's pool, where the first task in line, or else the next
//! to ask, takes it. The gate lends one only after taking the slot that
//! covers it.
//!
//! **When a task waits.** Once the pool has handed out no connection for
//! `PGTEST_GROW_AFTER` (10 ms) while all of its connections are in use,
//! the gate queues for a permit of the pool itself and lets one go: the
//! pool's semaphore is fair, so a task already waiting gets it, and else
//! the gate gets it back. A connection on its way back is only a ping
//! away, and a slow query has no one waiting behind it, so a frugal pool
//! that runs one query at a time keeps its one connection.
//!
//! **One ahead, as sqlx's pool.** A plain sqlx pool opens a connection
//! whenever it has none idle and fewer than its maximum out (in use, on
//! their way back after a ping, or opening). So for a pool that opens
//! connections as sqlx's does, the gate keeps one permit free beyond the
//! pool's connections, its slot taken only if one is free at once (else
//! the pool falls back to the wait above). It tops the permit up in the
//! pool's hooks, as a connection is handed out and as one starts on its
//! way back, before anything else runs: the next task that asks opens a
//! connection, as it would on sqlx's pool, instead of waiting for the one
//! on its way back. Tasks that ask while the permit ahead is being used to
//! open a connection wait; they get one just before the test's runtime
//! waits ([`top_up_before_park`], tokio's `on_thread_park`), when it goes
//! idle before it looks for I/O (through which a connection on its way
//! back could reach them first). The pool hands permits to tasks in the
//! order they wait, so the gate lends until one stays free.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::cover::Cover;
use crate::Error;

/// How often the gate looks for who took a permit it let go.
const GATE_TICK: Duration = Duration::from_millis(2);

/// The longest a connection given back counts as on its way to idle.
const RETURN_LIMIT: Duration = Duration::from_secs(1);

/// How long the gate looks for who took a permit it let go.
const PROBE_LIMIT: Duration = Duration::from_secs(1);

thread_local! {
    /// The gates of this thread's pools that keep a permit ahead once
    /// their test's body runs.
    static AHEAD: RefCell<Vec<Weak<Gate>>> = const { RefCell::new(Vec::new()) };
}

/// Lends the permits that the pools of this thread keep ahead (see the
/// module's docs). The runner's runtime calls it just before it waits.
pub(crate) fn top_up_before_park() {
    AHEAD.with_borrow_mut(|gates| {
        gates.retain(|gate| {
            gate.upgrade()
                .inspect(|gate| {
                    gate.top_up();
                })
                .is_some()
        })
    });
}

/// Hands the pools of this thread that keep a permit ahead to the test's
/// body as sqlx's `connect_with` hands a pool over: one connection, idle
/// (the one its test was prepared on once it is back, else a new one),
/// and from then on a permit ahead.
pub(crate) async fn before_body() {
    let waiting: Vec<Arc<Gate>> = AHEAD.with_borrow(|gates| {
        gates
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|gate| !gate.ahead.load(Ordering::Acquire))
            .collect()
    });
    for gate in waiting {
        // With no permit free, a connection on its way back is waited for,
        // not replaced (and the watch lends none meanwhile).
        gate.handing_over.store(true, Ordering::Release);
        let acquired = tokio::time::timeout(RETURN_LIMIT, gate.pool.acquire()).await;
        if let Ok(Ok(mut connection)) = acquired {
            connection.return_to_pool().await;
        }
        gate.handing_over.store(false, Ordering::Release);
        gate.ahead.store(true, Ordering::Release);
        let _ = gate.top_up();
    }
}

/// Lends a test's pool the permits for its connections (see the module's
/// docs).
pub(super) struct Gate {
    /// The test's pool.
    pool: PgPool,
    /// The pool's maximum.
    max: u32,
    /// One holder per permit held back; dropping one lends its permit to
    /// the first task in the pool's queue, or to the next that asks.
    held: Mutex<Vec<PgPool>>,
    /// What the test's pool did so far, counted by its hooks.
    counts: Arc<Counts>,
    /// The test's slots, which cover every permit lent.
    cover: Arc<Cover>,
    /// Whether the pool is being handed to the test's body.
    handing_over: AtomicBool,
    /// Whether it keeps a permit ahead now (see [`before_body`]).
    ahead: AtomicBool,
}

/// What a test's pool did so far.
pub(super) struct Counts {
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
    /// The test's pool, from `options` (its size among them) and
    /// `connect`, behind a gate that lends it its first permit and holds
    /// the others back; the gate watches it until it closes. With `ahead`,
    /// the pool keeps a permit ahead once [`before_body`] hands it over.
    pub(super) async fn open(
        options: PgPoolOptions,
        connect: PgConnectOptions,
        cover: Arc<Cover>,
        grow_after: Duration,
        ahead: bool,
    ) -> PgPool {
        let max = options.get_max_connections();
        let counts = Arc::new(Counts {
            handouts: AtomicU64::new(0),
            opened: AtomicU32::new(0),
            released: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            last_release: AtomicU64::new(0),
            since: Instant::now(),
        });
        let gate = Arc::new_cyclic(|gate: &Weak<Self>| {
            let (on_new, on_reuse, on_release) = (gate.clone(), gate.clone(), gate.clone());
            let (new_counts, reuse_counts) = (Arc::clone(&counts), Arc::clone(&counts));
            let release_counts = Arc::clone(&counts);
            // Each hook runs as the pool hands a connection out or takes
            // one back: where a pool that keeps a permit ahead tops it up.
            let pool = options
                .after_connect(move |_, _| {
                    new_counts.handouts.fetch_add(1, Ordering::AcqRel);
                    new_counts.opened.fetch_add(1, Ordering::AcqRel);
                    top_up(&on_new);
                    Box::pin(async { Ok(()) })
                })
                .before_acquire(move |_, _| {
                    reuse_counts.handouts.fetch_add(1, Ordering::AcqRel);
                    reuse_counts.reused.fetch_add(1, Ordering::AcqRel);
                    top_up(&on_reuse);
                    Box::pin(async { Ok(true) })
                })
                .after_release(move |_, _| {
                    let now = release_counts.since.elapsed().as_millis() as u64;
                    release_counts.last_release.store(now, Ordering::Release);
                    release_counts.released.fetch_add(1, Ordering::AcqRel);
                    let served = top_up(&on_release);
                    Box::pin(async move {
                        // A task that waited got a permit: it goes first,
                        // before this connection can be back.
                        if served {
                            tokio::task::yield_now().await;
                        }
                        Ok(true)
                    })
                })
                .connect_lazy_with(connect);
            Self {
                pool,
                max,
                held: Mutex::new(Vec::new()),
                counts,
                cover,
                handing_over: AtomicBool::new(false),
                ahead: AtomicBool::new(false),
            }
        });
        for _ in 1..max {
            let holder = holder(&gate.pool);
            // Takes a permit of the pool, fails to connect, and keeps the
            // permit until it is dropped.
            let _ = holder.acquire().await;
            gate.held().push(holder);
        }
        if ahead {
            AHEAD.with_borrow_mut(|gates| gates.push(Arc::downgrade(&gate)));
        }
        let pool = gate.pool.clone();
        tokio::spawn(gate.watch(grow_after));
        pool
    }

    fn held(&self) -> MutexGuard<'_, Vec<PgPool>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many permits the gate lends the pool now.
    fn lent(&self) -> u32 {
        self.max - self.held().len() as u32
    }

    /// Lends one more permit whenever the pool has handed out no
    /// connection for `grow_after` while all of its connections are in use
    /// and a task waits for one, until it may open its maximum or closes.
    async fn watch(self: Arc<Self>, grow_after: Duration) {
        let pool = &self.pool;
        let mut last = self.counts.handouts.load(Ordering::Acquire);
        let mut quiet_since = Instant::now();
        while self.lent() < self.max && !pool.is_closed() {
            // Twice per wait: a test has one of these per process, and on
            // a busy machine every wake-up costs.
            tokio::time::sleep((grow_after / 2).max(Duration::from_millis(1))).await;
            let handouts = self.counts.handouts.load(Ordering::Acquire);
            let lent = self.lent();
            // Every connection it may open is open (none still connecting,
            // which can take long with a slow login) and in use.
            let opened = self.counts.opened.load(Ordering::Acquire);
            let (size, idle) = (pool.size(), pool.num_idle());
            let all_busy = idle == 0
                && size >= lent
                && size <= opened
                && !self.counts.on_its_way_back(idle)
                && !self.handing_over.load(Ordering::Acquire);
            if handouts != last || !all_busy {
                (last, quiet_since) = (handouts, Instant::now());
            } else if quiet_since.elapsed() >= grow_after {
                let lend = tokio::select! {
                    lend = self.lend_if_waited_for(lent) => lend,
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
        // Alive as long as the pool: the gate still tops up and hands over.
        // Once the pool closes, its holders go, so that closing, which
        // waits for every permit, ends.
        pool.close_event().await;
    }

    /// Lends one more permit if a task of the test waits for a connection
    /// (all `lent` are in use), after taking the slot that covers it; gives
    /// the slot back when none waits. Whether one waits, only the pool's
    /// queue knows: a new holder queues for the permit behind any task
    /// already waiting, and the permit goes to the first in line.
    async fn lend_if_waited_for(&self, lent: u32) -> Result<bool, Error> {
        self.cover.cover(lent + 1).await?;
        let holder = holder(&self.pool);
        let mut acquire = pin!(holder.acquire());
        // sqlx's child pool looks at its own permits first and at its
        // parent's on the next poll: two polls queue it on the pool.
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
            self.held().push(holder);
            self.cover.trim(self.lent()).await;
            return Ok(false);
        }
        drop(self.held().pop());
        let size = self.pool.size();
        let taken_by_test = async {
            while self.pool.size() <= size {
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
            self.held().push(holder);
            self.cover.trim(self.lent()).await;
        }
        Ok(waited_for)
    }

    /// Keeps a permit of the pool free beyond its connections (open, or
    /// opening), once the test's body runs: lends one when every permit
    /// lent has a connection (after taking a free slot), and another while
    /// a waiting task takes the last; whether a waiting task got one.
    fn top_up(&self) -> bool {
        if !self.ahead.load(Ordering::Acquire) || self.pool.is_closed() {
            return false;
        }
        let mut held = self.held();
        let mut served = false;
        if self.pool.size() < self.max - held.len() as u32 {
            return served;
        }
        while !held.is_empty() {
            let lent = self.max - held.len() as u32;
            if !self.cover.try_cover(lent + 1) {
                break;
            }
            drop(held.pop());
            tracing::debug!(lent = lent + 1, "pool: one more connection ready ahead");
            if has_free_permit(&self.pool) {
                break;
            }
            served = true;
        }
        served
    }
}

/// Tops up the permit that `gate`'s pool keeps ahead, if it still lives
/// (see [`Gate::top_up`]); whether a waiting task got one.
fn top_up(gate: &Weak<Gate>) -> bool {
    gate.upgrade().is_some_and(|gate| gate.top_up())
}

/// Whether `pool` has a permit free: a new holder, polled twice, then
/// takes it (and gives it back as it goes), else it queues, and is dropped.
fn has_free_permit(pool: &PgPool) -> bool {
    let probe = holder(pool);
    let mut acquire = pin!(probe.acquire());
    let mut cx = Context::from_waker(Waker::noop());
    (0..2).any(|_| acquire.as_mut().poll(&mut cx).is_ready())
}

/// A pool that takes one of `pool`'s permits when its `acquire` fails,
/// and holds it until it is dropped.
fn holder(pool: &PgPool) -> PgPool {
    quiet_pool()
        .max_connections(1)
        .parent(pool.clone())
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
/// what moves a permit from the test's pool to a holder.
fn nowhere() -> PgConnectOptions {
    PgConnectOptions::new().socket("/nonexistent/pgtest-gate")
}
