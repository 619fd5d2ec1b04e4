//! The slots of one test: taken before its connections open, grown by its
//! pool's gate before it lends the pool a permit, so that every connection
//! the pool may open has its slot.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::Error;
use crate::budget::Slots;

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
    /// Whether a task of the test was seen waiting for a connection while
    /// all of the pool's were in use, for the failure message.
    pub(super) starved: AtomicBool,
    /// The budget's error, when growing failed.
    failure: Mutex<Option<String>>,
}

impl Cover {
    /// The cover of a pool of at most `max` connections, holding no slot
    /// yet.
    pub(super) fn new(max: u32) -> Self {
        Self {
            max,
            others: AtomicU32::new(0),
            slots: tokio::sync::Mutex::new(None),
            waited: AtomicBool::new(false),
            starved: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

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
    /// test's others, growing them as needed (see [`Slots::grow`]).
    pub(super) async fn cover(&self, permits: u32) -> Result<(), Error> {
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

    /// Makes the slots cover `permits` connections of the pool if that
    /// needs no wait (see [`Slots::try_grow`]); whether they do. Slots not
    /// taken yet, or given back, cover nothing.
    pub(super) fn try_cover(&self, permits: u32) -> bool {
        let Ok(mut slots) = self.slots.try_lock() else {
            return false;
        };
        let Some(slots) = slots.as_mut() else {
            return false;
        };
        let others = self.others.load(Ordering::Acquire);
        while slots.count() < others + permits {
            if !matches!(slots.try_grow(), Ok(true)) {
                return false;
            }
        }
        true
    }

    /// Gives back the slots beyond `permits` connections of the pool.
    pub(super) async fn trim(&self, permits: u32) {
        let others = self.others.load(Ordering::Acquire);
        if let Some(slots) = self.slots.lock().await.as_mut() {
            slots.shrink_to(others + permits);
        }
    }
}
