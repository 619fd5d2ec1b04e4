//! The connection budget: one slot per server connection, shared by every
//! test process of this user on the machine through file locks, so that a
//! suite stays inside the server's `max_connections` whatever the number
//! of processes and threads.
//!
//! Every connection a test opens is covered by a slot it took before: a
//! test starts with the slots of the connections it opens first (all at
//! once or none, holding nothing while it waits), and its pool's gate takes
//! one more before it lets the pool open one more connection
//! ([`Slots::grow`]). A pool that opens connections as sqlx's does keeps
//! one slot ahead of its connections, taken only when one is free at once
//! ([`Slots::try_grow`]), never waiting. So the server's limit is used by
//! the connections tests really open (and those ahead), not by the pools'
//! maxima.
//!
//! Growing is the one place where a test holds slots while it waits for
//! more, so it cannot deadlock: a grower takes a free slot when there is
//! one. Else it waits in line behind other growers, and the one at the head
//! takes all it may still need at once, or the **reserve**, a lock held by
//! one test at a time that stands for [`RESERVE`] slots kept out of
//! everyone's reach, which it keeps until it ends. The reserve's holder
//! never waits again, so it finishes and gives the reserve back: the head
//! of the line waits at most for that, and every other grower for the head.
//! Tests waiting to start leave freed slots to growers. Taking a slot ahead
//! waits for nothing, and adds to no pool's growth beyond its maximum, so
//! the argument holds as it is.
//!
//! The reserve's holder never waits again because a **test** (not a pool)
//! grows by at most the reserve beyond what it took up front, whatever the
//! number of its pools:
//!
//! - a test takes up front its other connections' slots and, for its pools,
//!   their maxima together less the reserve, at least one per pool
//!   ([`Budget::upfront_many`]): a test of two pools of five takes six, not
//!   one each, since two pools could otherwise grow by eight;
//! - its pools share one [`Slots`] (the pool's `Cover`s of one test share
//!   one account), so that they grow into one reserve, held once: two
//!   reserves, or a pool waiting for the reserve its sibling holds, would
//!   each break the argument;
//! - slots are given back down to what the test took up front, never below
//!   it ([`Slots::shrink_to`]), so a pool that grew, shrank and grows again
//!   still needs at most the reserve beyond what it holds.
//!
//! A test of several databases takes all its slots at once, before it
//! prepares any of them (see [`prepaid`]): were it to take them database
//! by database, tests holding their first database's slots could each wait
//! for a second database's, and none finish. In shared and transaction
//! modes it has the run's databases built before it takes any: a test
//! that had grown into the reserve while it prepared its first database
//! would otherwise wait for the build of its second, and the builder, who
//! builds on the reserve, for it.
//!
//! A slot is a locked file: a panicking test drops its guard, a killed
//! process has its locks released by the operating system.
//!
//! **Across machines** (see [`crate::share`]), a machine's share keeper
//! holds the slot files its machine may not use, lent to other runners of
//! the server, and lets go of one for each server slot it holds. The
//! argument above holds on each machine as long as its budget keeps the
//! reserve and one slot: the keeper gives its machine that much (its
//! minimum) all at once or not at all, takes only slots that are free (a
//! test never loses one), and never takes the reserve back while the run
//! lasts. So a machine with its minimum finishes every test on its own and
//! then gives its share back; a machine without it holds no server slot
//! while it waits, so machines cannot each hold part of what another needs.

use std::fs::{self, File, TryLockError};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Error;
use crate::lock::{Mode, open_no_follow};
use crate::state::{Entry, ServerDir, files_error};
use crate::wait::{Look, Pace, Wait, wait_until};

/// Slots kept for the one test at a time that grows while no slot is free:
/// the most a pool grows beyond what its test takes up front.
const RESERVE: u32 = 4;

tokio::task_local! {
    /// Set while a test that took all its slots at once prepares its
    /// databases.
    static PREPAID: ();
}

/// Runs `work`, the preparation of a test that has taken its slots for all
/// its databases at once (see the module's documentation): there,
/// [`Budget::take`] takes nothing more and waits for nothing.
pub(crate) async fn prepaid<F: std::future::Future>(work: F) -> F::Output {
    PREPAID.scope((), work).await
}

/// The slots of one server.
#[derive(Clone)]
pub(crate) struct Budget {
    dir: ServerDir,
    capacity: u32,
    timeout: Duration,
}

/// Slots taken by one test; dropping them gives them back.
#[derive(Debug)]
pub(crate) struct Slots {
    budget: Budget,
    holder: String,
    /// What the test took up front: [`Self::shrink_to`] keeps at least
    /// these (see the module's documentation).
    floor: u32,
    /// Free slots taken, each a locked slot file.
    locked: Vec<File>,
    /// Slots grown into the reserve, while `reserve` is held.
    from_reserve: u32,
    /// The reserve's lock, once this test has had to grow into it. Dropped
    /// after `locked` (field order), so the reserve's next holder never
    /// finds more in use than there is.
    reserve: Option<File>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Budget({} slots in {})",
            self.capacity,
            self.dir.path().display()
        )
    }
}

impl Budget {
    /// The budget of the server whose directory is `dir`: `capacity`
    /// slots, each wait for them at most `timeout`.
    pub(crate) fn new(dir: ServerDir, capacity: u32, timeout: Duration) -> Self {
        Self {
            dir,
            capacity,
            timeout,
        }
    }

    /// Slots kept for growing (see the module's documentation): none on a
    /// server so small that every slot must be free for the taking.
    pub(crate) fn reserve(&self) -> u32 {
        RESERVE.min(self.capacity.saturating_sub(2))
    }

    /// The slots anyone may take.
    pub(crate) fn free_for_all(&self) -> u32 {
        self.capacity - self.reserve()
    }

    /// How many slots a test whose pool opens at most `pool` connections,
    /// beside `others` connections of its own, takes when it starts: its
    /// first connection's, and more when the pool could otherwise grow by
    /// more than the reserve.
    pub(crate) fn upfront(&self, pool: u32, others: u32) -> u32 {
        self.upfront_many(&[(pool, others)])
    }

    /// How many slots a test takes when it starts whose pools open at most
    /// `max` connections each, beside `others` connections of their own,
    /// for each `(max, others)`: every other connection's slot, and the
    /// pools' maxima together less the reserve, at least one per pool, so
    /// that the test (all its pools together) can grow by the reserve at
    /// most.
    pub(crate) fn upfront_many(&self, pools: &[(u32, u32)]) -> u32 {
        let others: u32 = pools.iter().map(|(_, others)| others).sum();
        let maxima: u32 = pools.iter().map(|(max, _)| max).sum();
        let firsts = pools.len() as u32;
        others + maxima.saturating_sub(self.reserve()).max(firsts)
    }

    /// Whether a test may take `count` slots at once on this server.
    pub(crate) fn fits(&self, count: u32) -> bool {
        count <= self.free_for_all()
    }

    /// The largest pool a test with `others` connections of its own can
    /// have on this server.
    pub(crate) fn largest_pool(&self, others: u32) -> u32 {
        (1..=self.capacity)
            .rev()
            .find(|&pool| self.fits(self.upfront(pool, others)))
            .unwrap_or(1)
    }

    /// Takes `count` slots for `holder` (a test's name), all at once or
    /// none, waiting while other tests hold them, at most the budget
    /// timeout.
    ///
    /// Waiters queue on a lock file, so that only the first of them polls
    /// the slots while the others look at one file now and then.
    ///
    /// Inside [`prepaid`], the test has taken its slots already: none.
    pub(crate) async fn take(&self, count: u32, holder: &str) -> Result<Slots, Error> {
        if PREPAID.try_with(|()| ()).is_ok() {
            return Ok(self.empty_slots(holder));
        }
        self.take_free(count, holder).await
    }

    /// [`Self::take`], whether or not the test's slots are prepaid.
    async fn take_free(&self, count: u32, holder: &str) -> Result<Slots, Error> {
        if !self.fits(count) {
            return Err(Error::BudgetTooSmall {
                needed: count,
                capacity: self.free_for_all(),
            });
        }
        let mut files = SlotFiles::new(self);
        let mut slots = self.empty_slots(holder);
        if files.try_take(count, &mut slots)? {
            slots.floor = count;
            return Ok(slots);
        }
        let started = Instant::now();
        let deadline = started + self.timeout;
        let line = self
            .dir
            .lock_until(Entry::StartLine, Mode::Exclusive, deadline);
        let Some(_line) = line.await? else {
            return Err(self.timeout_error(count));
        };
        let growers = self.dir.lock(Entry::Growers)?;
        let taken = wait_until(deadline, "free slots", Pace::Local, async || {
            // Slots that free up go to tests that wait to grow first: they
            // hold connections already, and finish sooner with more.
            let nobody_grows = !growers
                .is_held(Mode::Exclusive)
                .map_err(|error| self.dir.error(Entry::Growers, &error))?;
            Ok::<_, Error>(match nobody_grows && files.try_take(count, &mut slots)? {
                true => Look::Ready(()),
                // Named by the timeout's error (see `holders`).
                false => Look::Held("other tests".to_owned()),
            })
        })
        .await?;
        match taken {
            Ok(()) => {
                tracing::debug!(waited = ?started.elapsed(), count, "took connection slots");
                slots.floor = count;
                Ok(slots)
            }
            Err(_) => Err(self.timeout_error(count)),
        }
    }

    /// `count` slots for `holder` if they are free now.
    pub(crate) fn try_take(&self, count: u32, holder: &str) -> Result<Option<Slots>, Error> {
        let mut slots = self.empty_slots(holder);
        let taken = self.fits(count) && SlotFiles::new(self).try_take(count, &mut slots)?;
        slots.floor = count;
        Ok(taken.then_some(slots))
    }

    /// The `count` slots a build needs, which tests that wait for the build
    /// may hold all of: the reserve, whose holder never waits for anyone
    /// (see the module's documentation), on a server large enough to have
    /// one; else free slots.
    pub(crate) async fn take_for_build(&self, count: u32, holder: &str) -> Result<Slots, Error> {
        if count > self.reserve() {
            return self.take_free(count, holder).await;
        }
        let deadline = Instant::now() + self.timeout;
        let reserve = self
            .dir
            .lock_until(Entry::Reserve, Mode::Exclusive, deadline);
        let Some(reserve) = reserve.await? else {
            return Err(self.timeout_error(count));
        };
        let reserve = reserve.into_file();
        note_holder(&reserve, holder);
        let mut slots = self.empty_slots(holder);
        slots.from_reserve = count;
        slots.reserve = Some(reserve);
        Ok(slots)
    }

    fn empty_slots(&self, holder: &str) -> Slots {
        Slots {
            budget: self.clone(),
            holder: holder.to_owned(),
            floor: 0,
            locked: Vec::new(),
            from_reserve: 0,
            reserve: None,
        }
    }

    fn timeout_error(&self, count: u32) -> Error {
        Error::BudgetTimeout {
            needed: count,
            capacity: self.capacity,
            after: self.timeout,
            holders: self.holders(),
        }
    }

    /// How many connections the suite may use on this server.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// How long a test waits for slots at most.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The lock file of the slot `index`.
    pub(crate) fn slot(&self, index: u32) -> PathBuf {
        self.dir.entry(Entry::Slot(index))
    }

    /// Who holds slots now, for the timeout message and `cargo pgtest`.
    pub(crate) fn holders(&self) -> String {
        let mut holders: Vec<String> = (0..self.free_for_all())
            .map(|index| self.slot(index))
            .chain([self.dir.entry(Entry::Reserve)])
            .filter(|path| {
                open(path)
                    .is_ok_and(|file| matches!(file.try_lock(), Err(TryLockError::WouldBlock)))
            })
            .filter_map(|path| fs::read_to_string(path).ok())
            .map(|holder| holder.trim().to_owned())
            .collect();
        holders.sort();
        holders.dedup();
        holders.join("; ")
    }
}

impl Slots {
    /// Takes over `other`'s slots (free slots only), and what it took up
    /// front.
    pub(crate) fn absorb(&mut self, mut other: Slots) {
        self.locked.append(&mut other.locked);
        self.floor += std::mem::take(&mut other.floor);
    }

    /// No slots, of the same test.
    pub(crate) fn none(&self) -> Slots {
        self.budget.empty_slots(&self.holder)
    }

    /// How many slots these are.
    pub(crate) fn count(&self) -> u32 {
        self.locked.len() as u32 + self.from_reserve
    }

    /// Gives back slots beyond `count`, but never those the test took up
    /// front: free slots first, then slots of the reserve (whose lock it
    /// keeps, to grow into again).
    pub(crate) fn shrink_to(&mut self, count: u32) {
        let count = count.max(self.floor);
        while self.count() > count && self.locked.pop().is_some() {}
        if self.count() > count {
            // No free slot left: only the reserve's.
            self.from_reserve = count;
        }
    }

    /// Takes one slot more if that needs no wait: a free one, else one of
    /// the reserve when it holds it; whether it did.
    pub(crate) fn try_grow(&mut self) -> Result<bool, Error> {
        // A free slot before the reserve's, even when this test holds the
        // reserve: [`Self::shrink_to`] gives free slots back first, so
        // growing into the reserve first would, shrink after grow, move a
        // test's slots into the reserve one by one.
        let budget = self.budget.clone();
        if SlotFiles::new(&budget).try_take(1, self)? {
            return Ok(true);
        }
        if self.reserve.is_some() && self.from_reserve < budget.reserve() {
            self.from_reserve += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Takes one slot more, of at most `ceiling` in all: a free one when
    /// there is one, else one of the reserve when it holds it. Else it
    /// waits (at most the budget timeout), in line behind other tests that
    /// wait to grow, for all it may still need at once, up to `ceiling`, or
    /// for the reserve: so that it never waits again, and the slots that
    /// free up are not split among waiters that each still need more (see
    /// the module's documentation). Sets `waited` when it has to wait
    /// (before the wait, which a timeout of the caller's may cut short).
    pub(crate) async fn grow(&mut self, ceiling: u32, waited: &AtomicBool) -> Result<(), Error> {
        if self.try_grow()? {
            return Ok(());
        }
        let budget = self.budget.clone();
        let mut files = SlotFiles::new(&budget);
        waited.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let deadline = started + budget.timeout;
        // Held shared while this test waits, so that tests waiting to start
        // leave it the slots that free up. Refused only for the instant a
        // starting test looks.
        let growers = budget.dir.lock(Entry::Growers)?;
        let _waiting = growers
            .try_lock(Mode::Shared)
            .is_ok_and(|taken| taken)
            .then_some(growers);
        let line = budget
            .dir
            .lock_until(Entry::GrowersLine, Mode::Exclusive, deadline);
        let Some(_line) = line.await? else {
            return Err(budget.timeout_error(1));
        };
        // Spawned by the gate: a loop of its own (see `Wait`).
        let mut wait = Wait::until(deadline, "a slot to grow into", Pace::Local);
        loop {
            let missing = ceiling.saturating_sub(self.count()).max(1);
            if files.try_take(missing, self)? {
                return Ok(());
            }
            if budget.reserve() > 0 {
                let path = budget.dir.entry(Entry::Reserve);
                let file = open(&path)?;
                match file.try_lock() {
                    Ok(()) => {
                        note_holder(&file, &self.holder);
                        tracing::debug!(waited = ?started.elapsed(), "took the reserve");
                        self.reserve = Some(file);
                        self.from_reserve = 1;
                        return Ok(());
                    }
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(error)) => return Err(files_error(&path, &error)),
                }
            }
            // Named by the timeout's error (see `holders`).
            if wait.pause("other tests".to_owned()).await.is_err() {
                return Err(budget.timeout_error(missing));
            }
        }
    }
}

/// The slot files of one budget, opened as they are first needed.
struct SlotFiles {
    paths: Vec<PathBuf>,
    files: Vec<Option<File>>,
    /// Where this process starts looking, so that processes spread out.
    start: usize,
}

impl SlotFiles {
    fn new(budget: &Budget) -> Self {
        let paths: Vec<PathBuf> = (0..budget.free_for_all())
            .map(|index| budget.slot(index))
            .collect();
        Self {
            files: paths.iter().map(|_| None).collect(),
            start: std::process::id() as usize % paths.len(),
            paths,
        }
    }

    /// Locks `count` more slots into `slots`; none when fewer are free.
    fn try_take(&mut self, count: u32, slots: &mut Slots) -> Result<bool, Error> {
        let mut locked = Vec::new();
        for offset in 0..self.paths.len() {
            let index = (self.start + offset) % self.paths.len();
            let path = &self.paths[index];
            let file = match &mut self.files[index] {
                Some(file) => file,
                empty => empty.insert(open(path)?),
            };
            match file.try_lock() {
                Ok(()) => locked.push(index),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(error)) => return Err(files_error(path, &error)),
            }
            if locked.len() == count as usize {
                for index in locked {
                    if let Some(file) = self.files[index].take() {
                        note_holder(&file, &slots.holder);
                        slots.locked.push(file);
                    }
                }
                return Ok(true);
            }
        }
        for index in locked {
            if let Some(file) = &self.files[index] {
                let _ = file.unlock();
            }
        }
        Ok(false)
    }
}

/// The server's connections less a margin for other clients (psql, a
/// monitoring agent): 5%, at least 3.
pub(crate) fn usable(connections: u32) -> u32 {
    connections.saturating_sub((connections / 20).max(3)).max(1)
}

fn open(path: &std::path::Path) -> Result<File, Error> {
    open_no_follow(path, 0o600).map_err(|error| files_error(path, &error))
}

/// Writes who holds a slot into it, for others' timeout messages.
pub(crate) fn note_holder(file: &File, holder: &str) {
    let mut file = file;
    let _ = file
        .set_len(0)
        .and_then(|()| writeln!(file, "pid {} ({holder})", std::process::id()));
}

#[cfg(test)]
mod tests {
    use super::{Budget, usable};
    use crate::state::ServerDir;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn budget(capacity: u32) -> Budget {
        let dir = ServerDir::unchecked(&std::env::temp_dir());
        Budget::new(dir, capacity, Duration::from_secs(1))
    }

    #[test]
    fn a_test_takes_its_first_connection_and_never_grows_past_the_reserve() {
        let large = budget(93);
        assert_eq!(large.upfront(1, 0), 1);
        assert_eq!(large.upfront(5, 0), 1);
        assert_eq!(large.upfront(5, 1), 2);
        // A pool of 10 takes 6 up front: it can grow by the reserve's 4 at most.
        assert_eq!(large.upfront(10, 0), 6);
        for pool in 1..=20 {
            assert!(pool - large.upfront(pool, 0).min(pool) <= large.reserve());
        }
        // A server of 2 has no reserve: a test takes its whole pool at once.
        let tiny = budget(2);
        assert_eq!(tiny.upfront(2, 0), 2);
        assert_eq!(tiny.largest_pool(0), 2);
        assert_eq!(tiny.largest_pool(1), 1);
    }

    #[test]
    fn growing_takes_a_free_slot_before_the_reserve_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Budget::new(ServerDir::unchecked(dir.path()), 4, Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let waited = AtomicBool::new(false);
            let mut slots = budget.take(1, "a").await.unwrap();
            let other = budget.take(1, "b").await.unwrap();
            // No free slot left: it grows into the reserve.
            slots.grow(4, &waited).await.unwrap();
            assert_eq!((slots.locked.len(), slots.from_reserve), (1, 1));
            drop(other);
            // A pool's gate grows, then shrinks back, again and again.
            for _ in 0..3 {
                slots.grow(4, &waited).await.unwrap();
                slots.shrink_to(2);
            }
            assert_eq!((slots.locked.len(), slots.from_reserve), (1, 1));
            assert!(
                budget.try_take(2, "c").unwrap().is_none(),
                "its free slot stays"
            );
        });
    }

    #[test]
    fn the_margin_is_five_percent_and_at_least_three() {
        assert_eq!(usable(97), 93);
        assert_eq!(usable(497), 473);
        assert_eq!(usable(17), 14);
        assert_eq!(usable(2), 1);
    }
}
