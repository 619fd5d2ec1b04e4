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
//! the gate takes a slot and, when the test's runtime is about to wait
//! (every task has run by then, so a connection given back has started on
//! its way), queues for a permit of the pool itself and lets one go: the
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
//! open a connection wait; they get one when the test's runtime is about
//! to wait, before it looks for I/O (through which a connection on its way
//! back could reach them first). The pool hands permits to tasks in the
//! order they wait, so the gate lends until one stays free.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::{Notify, oneshot};

use super::cover::Cover;
use crate::Error;

/// The longest a connection given back counts as on its way to idle: its
/// ping took over a second in CI, beside 64 test processes on 2 cores (a
/// pool running one query at a time then opened a second connection).
const RETURN_LIMIT: Duration = Duration::from_secs(5);

/// Lends a test's pool the permits for its connections (see the module's
/// docs).
pub(super) struct Gate {
    /// The test's pool.
    pub(super) pool: PgPool,
    /// The pool's maximum.
    max: u32,
    /// One holder per permit held back; dropping one lends its permit to
    /// the first task in the pool's queue, or to the next that asks.
    held: Mutex<Vec<PgPool>>,
    /// What the test's pool did so far, counted by its hooks.
    counts: Arc<Counts>,
    /// The test's slots, which cover every permit lent.
    cover: Arc<Cover>,
    /// Whether the pool keeps a permit ahead, as sqlx's opens connections,
    /// once handed to the test's body.
    pub(super) one_ahead: bool,
    /// Whether the pool is being handed to the test's body.
    pub(super) handing_over: AtomicBool,
    /// Whether the test's body has it.
    pub(super) handed_over: AtomicBool,
    /// Whether the test built a pool of its own on the permits, whose
    /// connections the gate does not see.
    own_pool: AtomicBool,
    /// Where to answer the lend the watch has taken a slot for, decided
    /// when the runtime is about to wait: whether a task waited.
    lend: Mutex<Option<oneshot::Sender<bool>>>,
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
    /// Told when a connection opens.
    connected: Notify,
}

impl Counts {
    /// Whether a connection given back is still on its way to idle (the
    /// ping sqlx sends first can take long on a busy server): a task that
    /// waits for it is not starved. A connection that never arrives (its
    /// ping failed) counts for [`RETURN_LIMIT`] at most.
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
    /// the others back; the gate watches it until it closes. With
    /// `one_ahead`, the pool keeps a permit ahead once it is handed to the
    /// test's body ([`super::thread::before_body`]).
    pub(super) async fn open(
        options: PgPoolOptions,
        connect: PgConnectOptions,
        cover: Arc<Cover>,
        grow_after: Duration,
        one_ahead: bool,
    ) -> PgPool {
        let counts = Arc::new(Counts {
            handouts: AtomicU64::new(0),
            opened: AtomicU32::new(0),
            released: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            last_release: AtomicU64::new(0),
            since: Instant::now(),
            connected: Notify::new(),
        });
        let gate = Arc::new_cyclic(|gate: &Weak<Self>| Self {
            max: options.get_max_connections(),
            pool: with_hooks(options, gate, Some(&counts)).connect_lazy_with(connect),
            held: Mutex::new(Vec::new()),
            counts,
            cover,
            one_ahead,
            handing_over: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            own_pool: AtomicBool::new(false),
            lend: Mutex::new(None),
        });
        for _ in 1..gate.max {
            let holder = holder(&gate.pool);
            // Takes a permit of the pool, fails to connect, and keeps the
            // permit until it is dropped.
            let _ = holder.acquire().await;
            gate.held().push(holder);
        }
        add(&gate);
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

    /// Whether the pool keeps a permit ahead now: it is of sqlx's kind, and
    /// the test's body has it.
    fn keeps_one_ahead(&self) -> bool {
        self.one_ahead && self.handed_over.load(Ordering::Acquire)
    }

    /// Lends one more permit whenever the pool has handed out no
    /// connection for `grow_after` while all of its connections are in use
    /// and a task waits for one, until it may open its maximum or closes.
    async fn watch(self: Arc<Self>, grow_after: Duration) {
        let pool = &self.pool;
        let mut last = self.counts.handouts.load(Ordering::Acquire);
        let mut quiet_since = Instant::now();
        while self.lent() < self.max && !pool.is_closed() {
            // While a permit lent has no connection, a task that asks opens
            // one: nothing to watch until one opens. So a test that waits
            // for its slots, its pool made, does not wake (hundreds of
            // processes waiting in line took the CPU from the server).
            if !self.own_pool.load(Ordering::Acquire) && pool.size() < self.lent() {
                tokio::select! {
                    () = self.counts.connected.notified() => {}
                    () = pool.close_event() => break,
                }
                (last, quiet_since) =
                    (self.counts.handouts.load(Ordering::Acquire), Instant::now());
                continue;
            }
            // Twice per wait: a test has one of these per process, and on
            // a busy machine every wake-up costs.
            tokio::time::sleep((grow_after / 2).max(Duration::from_millis(1))).await;
            let handouts = self.counts.handouts.load(Ordering::Acquire);
            let lent = self.lent();
            if handouts != last || !self.starved(lent) {
                (last, quiet_since) = (handouts, Instant::now());
            } else if quiet_since.elapsed() >= grow_after {
                let lend = tokio::select! {
                    lend = self.lend_if_waited_for(lent, grow_after) => lend,
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

    /// Whether every connection the pool may open with the `lent` permits
    /// is open (none still connecting, which can take long with a slow
    /// login) and in use, none on its way back; for a pool of the test's
    /// own, whether no permit is free.
    fn starved(&self, lent: u32) -> bool {
        if self.own_pool.load(Ordering::Acquire) {
            return !has_free_permit(&self.pool);
        }
        let opened = self.counts.opened.load(Ordering::Acquire);
        let (size, idle) = (self.pool.size(), self.pool.num_idle());
        idle == 0
            && size >= lent
            && size <= opened
            && !self.counts.on_its_way_back(idle)
            && !self.handing_over.load(Ordering::Acquire)
    }

    /// Lends one more permit if a task of the test waits for a connection
    /// (all `lent` are in use), after taking the slot that covers it; gives
    /// the slot back when none waits. Asked of the runtime's next park
    /// ([`Self::at_park`]), decided here if none comes within `grow_after`.
    async fn lend_if_waited_for(&self, lent: u32, grow_after: Duration) -> Result<bool, Error> {
        self.cover.cover(lent + 1).await?;
        let (answer, mut answered) = oneshot::channel();
        *self.asked() = Some(answer);
        let waited_for = match tokio::time::timeout(grow_after, &mut answered).await {
            Ok(answer) => answer.unwrap_or(false),
            // No park came: decided here, unless one took the question
            // meanwhile.
            Err(_) => {
                let unanswered = self.asked().take().is_some();
                match unanswered {
                    true => self.starved(self.lent()) && self.lend_to_a_waiting_task(),
                    false => answered.await.unwrap_or(false),
                }
            }
        };
        if waited_for {
            self.cover.starved.store(true, Ordering::Relaxed);
        } else {
            self.cover.trim(self.lent()).await;
        }
        Ok(waited_for)
    }

    fn asked(&self) -> MutexGuard<'_, Option<oneshot::Sender<bool>>> {
        self.lend.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the gate does when the test's runtime is about to wait: every
    /// task has run, none is about to; answers the watch's lend, and tops
    /// up the permit ahead.
    pub(super) fn at_park(&self) {
        let asked = self.asked().take();
        if let Some(answer) = asked {
            let _ = answer.send(self.starved(self.lent()) && self.lend_to_a_waiting_task());
        }
        self.top_up();
    }

    /// Options for a pool the test builds itself on the pool's permits,
    /// from `options`: with the hooks through which one of sqlx's kind
    /// keeps a permit ahead; the gate then watches its permits instead of
    /// its connections.
    pub(super) fn own_pool(self: &Arc<Self>, options: PgPoolOptions) -> PgPoolOptions {
        self.own_pool.store(true, Ordering::Release);
        with_hooks(options, &Arc::downgrade(self), None)
    }

    /// Lends a permit to the task of the test that waits first for one, if
    /// any; whether one did.
    fn lend_to_a_waiting_task(&self) -> bool {
        let holder = holder(&self.pool);
        let mut acquire = pin!(probe(holder.clone()));
        let mut cx = Context::from_waker(Waker::noop());
        // sqlx's child pool looks at its own permits first and at its
        // parent's on the next poll: two polls queue it on the pool.
        if (0..2).any(|_| acquire.as_mut().poll(&mut cx).is_ready()) {
            // A permit nobody holds: one a failed connection attempt gave
            // back is held back again; the one a pool keeps ahead goes
            // back to it.
            if !self.keeps_one_ahead() {
                self.held().push(holder);
            }
            return false;
        }
        // Every permit lent meanwhile (a pool that keeps one ahead): none
        // to lend.
        let Some(lent) = self.held().pop() else {
            return false;
        };
        drop(lent);
        let waited_for = acquire.as_mut().poll(&mut cx).is_pending();
        if !waited_for {
            self.held().push(holder);
        }
        waited_for
    }

    /// Keeps a permit of the pool free beyond its connections (open, or
    /// opening), once the test's body runs: lends one when every permit
    /// lent has a connection (or, with a pool of the test's own, when none
    /// is free), after taking a free slot, and another while a waiting task
    /// takes the last; whether a waiting task got one.
    pub(super) fn top_up(&self) -> bool {
        if !self.keeps_one_ahead() || self.pool.is_closed() {
            return false;
        }
        let mut held = self.held();
        let lent = self.max - held.len() as u32;
        let none_free = match self.own_pool.load(Ordering::Acquire) {
            true => !has_free_permit(&self.pool),
            false => self.pool.size() >= lent,
        };
        let mut served = false;
        while none_free && !held.is_empty() {
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

/// `options` with the hooks through which `gate`'s pool keeps a permit
/// ahead (each runs as the pool hands a connection out or takes one back)
/// and, for the test's pool, counts what it does.
fn with_hooks(
    options: PgPoolOptions,
    gate: &Weak<Gate>,
    counts: Option<&Arc<Counts>>,
) -> PgPoolOptions {
    let (on_new, on_reuse, on_release) = (gate.clone(), gate.clone(), gate.clone());
    let (new_counts, reuse_counts) = (counts.cloned(), counts.cloned());
    let release_counts = counts.cloned();
    options
        .after_connect(move |_, _| {
            if let Some(counts) = &new_counts {
                counts.handouts.fetch_add(1, Ordering::AcqRel);
                counts.opened.fetch_add(1, Ordering::AcqRel);
                counts.connected.notify_one();
            }
            top_up(&on_new);
            Box::pin(async { Ok(()) })
        })
        .before_acquire(move |_, _| {
            if let Some(counts) = &reuse_counts {
                counts.handouts.fetch_add(1, Ordering::AcqRel);
                counts.reused.fetch_add(1, Ordering::AcqRel);
            }
            top_up(&on_reuse);
            Box::pin(async { Ok(true) })
        })
        .after_release(move |_, _| {
            if let Some(counts) = &release_counts {
                let now = counts.since.elapsed().as_millis() as u64;
                counts.last_release.store(now, Ordering::Release);
                counts.released.fetch_add(1, Ordering::AcqRel);
            }
            let served = top_up(&on_release);
            Box::pin(async move {
                // A task that waited got a permit: it goes first, before
                // this connection can be back.
                if served {
                    tokio::task::yield_now().await;
                }
                Ok(true)
            })
        })
}

/// Tops up the permit that `gate`'s pool keeps ahead, if it still lives
/// (see [`Gate::top_up`]); whether a waiting task got one.
fn top_up(gate: &Weak<Gate>) -> bool {
    gate.upgrade().is_some_and(|gate| gate.top_up())
}

/// Whether `pool` has a permit free: a new holder, polled twice, then
/// takes it (and gives it back as it goes), else it queues, and is dropped.
fn has_free_permit(pool: &PgPool) -> bool {
    let holder = holder(pool);
    let mut acquire = pin!(probe(holder.clone()));
    let mut cx = Context::from_waker(Waker::noop());
    (0..2).any(|_| acquire.as_mut().poll(&mut cx).is_ready())
}

/// `holder`'s attempt to take a permit, polled by the gate, which takes
/// nothing from the budget of the task it runs in (tokio's cooperative
/// scheduling): a task of the test that asks for a connection next is not
/// made to wait by it.
fn probe(holder: PgPool) -> impl Future<Output = ()> {
    tokio::task::unconstrained(async move {
        let _ = holder.acquire().await;
    })
}

/// A pool that takes one of `pool`'s permits when its `acquire` fails,
/// and holds it until it is dropped.
fn holder(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .parent(pool.clone())
        .connect_lazy_with(nowhere())
}

/// Where nothing listens: a connection attempt fails at once, which is
/// what moves a permit from the test's pool to a holder.
fn nowhere() -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass().socket("/nonexistent/pgtest-gate")
}

thread_local! {
    static GATES: RefCell<Vec<Weak<Gate>>> = const { RefCell::new(Vec::new()) };
}

/// Counts `gate` among this thread's.
fn add(gate: &Arc<Gate>) {
    GATES.with_borrow_mut(|gates| gates.push(Arc::downgrade(gate)));
}

/// The live gates of this thread (see `thread`).
pub(super) fn gates() -> Vec<Arc<Gate>> {
    GATES.with_borrow_mut(|gates| {
        gates.retain(|gate| gate.strong_count() > 0);
        gates.iter().filter_map(Weak::upgrade).collect()
    })
}
