//! The slots that cover one pool of a test: taken before its connections
//! open, grown by its pool's gate before it lends the pool a permit, so
//! that every connection the pool may open has its slot. The pools of one
//! test share their slots (see [`super::account`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};

use super::account::Account;
use crate::Error;
use crate::budget::Slots;

/// The slots that cover one pool of a test, grown by its gate before it
/// lends the pool a permit, so that every connection the pool may open has
/// its slot.
pub(crate) struct Cover {
    /// The pool's maximum.
    max: u32,
    /// The test's slots, shared by its pools.
    account: Arc<Account>,
    /// This pool's place in the account.
    member: usize,
    /// Whether growing ever had to wait for a slot, for the failure message.
    waited: AtomicBool,
    /// Whether a task of the test was seen waiting for a connection while
    /// all of the pool's were in use, for the failure message.
    pub(super) starved: AtomicBool,
    /// The budget's error, when growing failed.
    failure: Mutex<Option<String>>,
}

impl Cover {
    /// The cover of a pool of at most `max` connections, in the test's
    /// account (see [`Account::for_new_pool`]).
    pub(super) fn new(max: u32) -> Self {
        let account = Account::for_new_pool();
        let member = account.join(max);
        Self {
            max,
            account,
            member,
            waited: AtomicBool::new(false),
            starved: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// Holds `slots`, taken with [`crate::budget::Budget::upfront`] for
    /// this pool and `others` connections beside it (none when the test
    /// took its slots for all its pools at once).
    pub(crate) async fn hold(&self, slots: Slots, others: u32) {
        self.account.set_others(self.member, others);
        let mut held = self.account.slots.lock().await;
        match held.as_mut() {
            Some(held) => held.absorb(slots),
            None => *held = Some(slots),
        }
    }

    /// Adds `more` slots, for `others` more connections beside the pool.
    pub(crate) async fn add(&self, more: Slots, others: u32) {
        self.account.add_others(self.member, others);
        if let Some(slots) = self.account.slots.lock().await.as_mut() {
            slots.absorb(more);
        }
    }

    /// The pool's maximum.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Gives the slots back (the test's, once its last pool gives them
    /// back); the pool opens nothing more once closed.
    pub(crate) async fn release(&self) -> Option<Slots> {
        self.account.leave(self.member).await
    }

    /// Whether growing the pool ever found no slot free at once.
    pub(crate) fn waited(&self) -> bool {
        self.waited.load(Ordering::Relaxed)
    }

    /// Whether a task of the test was seen waiting for a connection while
    /// all of the pool's were in use.
    pub(crate) fn starved(&self) -> bool {
        self.starved.load(Ordering::Relaxed)
    }

    /// What the budget said when growing failed.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the slots cover `permits` connections of the pool, beside the
    /// test's other pools and connections, growing them as needed (see
    /// [`Slots::grow`]).
    pub(super) async fn cover(&self, permits: u32) -> Result<(), Error> {
        let mut slots = self.account.slots.lock().await;
        let Some(slots) = slots.as_mut() else {
            return Ok(());
        };
        let before = self.account.permits(self.member);
        self.account.set_permits(self.member, permits);
        while slots.count() < self.account.needed() {
            let ceiling = self.account.ceiling();
            if let Err(error) = slots.grow(ceiling, &self.waited).await {
                self.account.set_permits(self.member, before);
                *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(error.to_string());
                return Err(error);
            }
        }
        Ok(())
    }

    /// Makes the slots cover `permits` connections of the pool if that
    /// needs no wait (see [`Slots::try_grow`]); whether they do. Slots not
    /// taken yet, or given back, cover nothing.
    pub(super) fn try_cover(&self, permits: u32) -> bool {
        let Ok(mut slots) = self.account.slots.try_lock() else {
            return false;
        };
        let Some(slots) = slots.as_mut() else {
            return false;
        };
        let before = self.account.permits(self.member);
        self.account.set_permits(self.member, permits);
        while slots.count() < self.account.needed() {
            if !matches!(slots.try_grow(), Ok(true)) {
                self.account.set_permits(self.member, before);
                return false;
            }
        }
        true
    }

    /// Gives back the slots beyond `permits` connections of the pool (and
    /// what the test's other pools need, and what it took up front).
    pub(super) async fn trim(&self, permits: u32) {
        let mut slots = self.account.slots.lock().await;
        self.account.set_permits(self.member, permits);
        if let Some(slots) = slots.as_mut() {
            slots.shrink_to(self.account.needed());
        }
    }
}
