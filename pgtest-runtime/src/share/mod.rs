//! The budget across machines, kept by the server: runners on different
//! machines (a machine is a pgtest home) that use one server share its
//! connections through advisory locks in [`crate::server::LOCK_DATABASE`],
//! so that together they stay inside its `max_connections`.
//!
//! The server's budget (the capacity a machine computes for it, see
//! [`crate::budget`]) is cut into **server slots**, one session advisory
//! lock each. Per machine, one **share keeper** (a helper process, see
//! `helpers::keeper`, started by the first test of a run and gone two
//! seconds after the last) holds one connection to the lock database, and
//! on it: a lock that announces its machine as a runner, the server slots
//! of the machine's share, and, while the machine wants more than it has, a
//! lock that says so. The machine's tests take slots from the file-lock
//! budget as before; the keeper holds the file slots its machine may not use
//! (lent to the others) and lets go of one for each server slot it takes.
//! So a machine's connections never outnumber its server slots, and no two
//! machines hold the same server slot: together they stay inside the budget.
//!
//! **Every connection counts.** The keeper's own connection holds a server
//! slot; a test's admin connections come out of the machine's file slots
//! (the reserve, see [`crate::budget`]); the spares helper's connection
//! holds a server slot of its own. The keeper's connection before it has
//! its slot, and the question for `max_connections` a run asks once, come
//! out of the margin the budget leaves for other clients.
//!
//! **Fairness.** With `n` runners announced, no runner holds more than
//! `ceil(budget / n)` server slots while another runner wants more than it
//! has; a runner that wants none of what it holds gives back what it does
//! not use beyond its minimum; a runner alone takes the whole budget, as a
//! machine does without this module. See [`policy`].
//!
//! **A runner that ends or dies** gives its share back: its keeper's
//! session ends (the keeper exits two seconds after the machine's last test
//! process; a killed keeper's socket is closed by the kernel), and with it
//! every advisory lock it held, so the others take the slots at their next
//! look (every 100 ms). A machine that vanishes is noticed by the server's
//! TCP keepalives, which the keeper asks for (about 25 s).
//!
//! **No deadlock across machines.** Within a machine, the file-lock budget
//! cannot deadlock as long as its capacity includes the reserve and one
//! slot (see [`crate::budget`]); the keeper gives its machine at least
//! that, its **minimum** (its own slot, the reserve, one for a test and one
//! for the sweep a run's first copy starts beside its test), all at once or
//! not at all, and never takes back a file slot that a test holds (it takes
//! only slots that are free, as they free up), nor the reserve while the
//! run lasts. So a machine that has its minimum finishes every test without
//! anything from another machine, and gives back what it holds as its run
//! ends; a machine that waits for its minimum holds no server slot while it
//! waits, so no two machines can each hold part of what the other needs.
//!
//! The warm path is one look at a lock file (the keeper holds
//! [`Entry::ShareReady`] once its machine has its minimum): no connection.
//! The embedded server is the machine's own, and a machine with
//! `PGTEST_SHARED_BUDGET=off` budgets the server alone: neither has a keeper.

mod local;
pub(crate) mod locks;
pub(crate) mod policy;

pub(crate) use self::local::Local;
pub(crate) use self::locks::hold_slot_for_self;
