//! The slots of one test, shared by all its pools: a test of several
//! databases has a pool on each, and its pools grow into one set of slots
//! (and one reserve), as the budget's no-deadlock argument needs (see
//! [`crate::budget`]).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::budget::Slots;

tokio::task_local! {
    /// The account the pools made while a test of several databases
    /// prepares them join.
    static CURRENT: Arc<Account>;
}

/// The slots of one test and what each of its pools needs of them.
pub(crate) struct Account {
    /// `None` before the test takes its slots and after it gives them back.
    pub(super) slots: tokio::sync::Mutex<Option<Slots>>,
    members: Mutex<Vec<Member>>,
}

/// What one pool of the test needs.
#[derive(Clone, Copy)]
struct Member {
    /// The pool's maximum.
    max: u32,
    /// Connections the test opens beside the pool (an admin connection).
    others: u32,
    /// Permits the pool's gate lends, each with its slot.
    permits: u32,
    /// Until the pool's slots are given back.
    live: bool,
}

impl Account {
    /// An account holding `slots`, which the test took for all its pools.
    pub(crate) fn holding(slots: Slots) -> Arc<Self> {
        Arc::new(Self {
            slots: tokio::sync::Mutex::new(Some(slots)),
            members: Mutex::new(Vec::new()),
        })
    }

    /// The account a new pool of the current test joins: the one of
    /// [`Self::scope`], else one of its own.
    pub(super) fn for_new_pool() -> Arc<Self> {
        CURRENT.try_with(Arc::clone).unwrap_or_else(|_| {
            Arc::new(Self {
                slots: tokio::sync::Mutex::new(None),
                members: Mutex::new(Vec::new()),
            })
        })
    }

    /// Runs `work` with this account as the one new pools join.
    pub(crate) async fn scope<F: Future>(self: &Arc<Self>, work: F) -> F::Output {
        CURRENT.scope(Arc::clone(self), work).await
    }

    fn members(&self) -> MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a pool of at most `max` connections in, its first permit
    /// lent; its index.
    pub(super) fn join(&self, max: u32) -> usize {
        let mut members = self.members();
        members.push(Member {
            max,
            others: 0,
            permits: 1,
            live: true,
        });
        members.len() - 1
    }

    /// Sets the connections member `index` opens beside its pool.
    pub(super) fn set_others(&self, index: usize, others: u32) {
        self.members()[index].others = others;
    }

    /// Adds `more` connections beside member `index`'s pool.
    pub(super) fn add_others(&self, index: usize, more: u32) {
        self.members()[index].others += more;
    }

    /// The permits member `index` lends now.
    pub(super) fn permits(&self, index: usize) -> u32 {
        self.members()[index].permits
    }

    /// Sets the permits member `index` lends.
    pub(super) fn set_permits(&self, index: usize, permits: u32) {
        self.members()[index].permits = permits;
    }

    /// The slots the live pools need now: their connections and the others
    /// beside them.
    pub(super) fn needed(&self) -> u32 {
        let members = self.members();
        let live = members.iter().filter(|member| member.live);
        live.map(|member| member.others + member.permits).sum()
    }

    /// The most slots the live pools can need: what growing takes at once.
    pub(super) fn ceiling(&self) -> u32 {
        let members = self.members();
        let live = members.iter().filter(|member| member.live);
        live.map(|member| member.others + member.max).sum()
    }

    /// Member `index` gives its slots back: all of them, to the caller,
    /// when it is the last live member; else none (they stay with the test
    /// until its last pool ends).
    pub(super) async fn leave(&self, index: usize) -> Option<Slots> {
        let last = {
            let mut members = self.members();
            members[index].live = false;
            !members.iter().any(|member| member.live)
        };
        let mut slots = self.slots.lock().await;
        match last {
            true => slots.take(),
            false => slots.as_ref().map(Slots::none),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Account;
    use crate::budget::Budget;
    use crate::pool::cover::Cover;
    use crate::state::ServerDir;

    #[test]
    fn two_pools_of_one_test_grow_into_one_reserve_and_keep_what_it_took_up_front() {
        let dir = tempfile::tempdir().unwrap();
        // Six slots: the reserve's four and two free ones.
        let budget = Budget::new(ServerDir::unchecked(dir.path()), 6, Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A test of two pools of three: 6 - 4 = 2 slots up front.
            let upfront = budget.upfront_many(&[(3, 0), (3, 0)]);
            assert_eq!(upfront, 2);
            let account = Account::holding(budget.take(upfront, "t").await.unwrap());
            let (first, second) = account
                .scope(async { (Cover::new(3), Cover::new(3)) })
                .await;
            // No free slot left: the first pool grows into the reserve, and
            // the second into the same reserve, without waiting for it (a
            // reserve of its own would wait for the first's, past the
            // budget's timeout).
            first.cover(3).await.unwrap();
            second.cover(3).await.unwrap();
            assert_eq!(account.slots.lock().await.as_ref().unwrap().count(), 6);
            // Shrunk as the pools give permits back, never below the two
            // taken up front.
            first.trim(1).await;
            second.trim(0).await;
            assert_eq!(account.slots.lock().await.as_ref().unwrap().count(), 2);
            // The slots go back with the last pool.
            assert_eq!(first.release().await.map(|slots| slots.count()), Some(0));
            assert_eq!(second.release().await.map(|slots| slots.count()), Some(2));
        });
    }
}
