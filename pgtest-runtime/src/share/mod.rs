//! The budget across machines, kept by the server: runners on different
//! machines (a machine is a pgtest home) that use one server share its
//! connections through advisory locks in [`crate::server::LOCK_DATABASE`],
//! so that together they stay inside its `max_connections`.
//!
//! The server's budget (the capacity a machine computes for it, see
//! [`crate::budget`]) is cut into **server slots**, one session advisory
//! lock each. Per machine, one **share keeper** (a helper process, see
//! [`crate::helper`], started by the first test of a run and gone two
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
//! that, its **minimum** (its own slot, the reserve and one), all at once or
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

mod keeper;
mod local;
mod locks;
pub(crate) mod policy;

use std::time::{Duration, Instant};

use crate::Error;
use crate::budget::Budget;
use crate::helper::{self, Job};
use crate::lock::{Mode, Pauses};
use crate::server::Server;
use crate::state::{Entry, ServerDir};

pub(crate) use keeper::run as run_keeper;
pub(crate) use locks::hold_slot_for_self;

/// How long a keeper that was started may take to show up before it is
/// started again (its process may have failed before it locked anything).
const KEEPER_START: Duration = Duration::from_secs(5);

/// Makes sure this machine's keeper runs and holds the machine's share of
/// the server, starting it if needed, waiting for it at most the budget's
/// timeout. The warm path is one look at a lock file.
///
/// The caller holds [`Entry::Clients`], so a keeper that sees no client
/// cannot be leaving while this looks.
pub(crate) async fn join(dir: &ServerDir, server: &Server, budget: &Budget) -> Result<(), Error> {
    let ready = dir.lock(Entry::ShareReady)?;
    if is_ready(dir, &ready)? {
        return Ok(());
    }
    let keeper = dir.lock(Entry::ShareKeeper)?;
    let starter = dir.lock(Entry::ShareStarter)?;
    let started = Instant::now();
    let deadline = started + budget.timeout();
    let mut last_start: Option<Instant> = None;
    let mut pauses = Pauses::new();
    loop {
        if is_ready(dir, &ready)? {
            tracing::debug!(waited = ?started.elapsed(), "this machine has its share of the server");
            return Ok(());
        }
        let running = keeper
            .is_held(Mode::Shared)
            .map_err(|error| dir.error(Entry::ShareKeeper, &error))?;
        let due = last_start.is_none_or(|at| at.elapsed() > KEEPER_START);
        // One process of the machine starts the keeper; the others wait.
        if !running && due && starter.try_lock(Mode::Exclusive).unwrap_or(false) {
            if last_start.is_none() {
                // The lock database, made if missing: once per run.
                let admin = server.connect_admin().await?;
                let _ = sqlx::Connection::close(admin).await;
            }
            start(dir, server, budget.capacity());
            last_start = Some(Instant::now());
        }
        if Instant::now() >= deadline {
            let why = match running {
                true => "the keeper runs but has not got this machine's minimum share".to_owned(),
                false => "the keeper did not start".to_owned(),
            };
            return Err(Error::ShareTimeout {
                after: started.elapsed(),
                log: dir.entry(Entry::ShareLog).display().to_string(),
                why,
            });
        }
        // Pauses of at most 20 ms: a test waits for the keeper's first look.
        tokio::time::sleep(pauses.next_until(deadline)).await;
    }
}

fn is_ready(dir: &ServerDir, ready: &crate::lock::LockFile) -> Result<bool, Error> {
    ready
        .is_held(Mode::Shared)
        .map_err(|error| dir.error(Entry::ShareReady, &error))
}

fn start(dir: &ServerDir, server: &Server, capacity: u32) {
    let job = Job::Share {
        budget: dir.path().to_owned(),
        capacity,
    };
    let credentials: String = server
        .helper_credentials()
        .into_iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect();
    match helper::start(&job, &dir.entry(Entry::ShareLog), Some(&credentials)) {
        Ok(()) => tracing::debug!("share keeper started"),
        Err(error) => tracing::warn!(%error, "the share keeper did not start"),
    }
}
