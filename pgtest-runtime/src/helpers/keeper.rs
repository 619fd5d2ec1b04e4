//! The share keeper: the helper process (see [`super`]) that holds
//! one connection to the lock database for its machine while the machine
//! runs tests, and on it the machine's share of the server's slots (see
//! [`crate::share`]). It looks every [`TICK`]; it leaves once the machine
//! has had no test process for [`QUIET`], or when its connection fails (the
//! next test starts another).

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::{Job, say};
use crate::Error;
use crate::budget::Budget;
use crate::lock::{LockFile, Mode};
use crate::registry;
use crate::server::{Server, is_refused_for_slots};
use crate::share::policy::{self, View};
use crate::share::{Local, locks};
use crate::state::{Entry, ServerDir};
use crate::wait::{Look, Pace, wait_until};

/// How often the keeper looks.
const TICK: Duration = Duration::from_millis(100);
/// How long the machine goes without a test process before the keeper
/// leaves (nextest starts one process per test, with gaps between them).
const QUIET: Duration = Duration::from_secs(2);
/// The longest the keeper waits for the server to answer.
const ANSWER: Duration = Duration::from_secs(10);
/// How long the keeper keeps trying to connect to a full server.
const CONNECT_TRIES: Duration = Duration::from_secs(60);

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
    let what = "this machine's share of the server";
    let joined = wait_until(deadline, what, Pace::Local, async || {
        if is_ready(dir, &ready)? {
            return Ok(Look::Ready(()));
        }
        let running = keeper
            .is_held(Mode::Shared)
            .map_err(|error| dir.error(Entry::ShareKeeper, &error))?;
        let due = last_start.is_none_or(|at| at.elapsed() > KEEPER_START);
        // One process of the machine starts the keeper; the others wait.
        if !running && due && starter.try_lock(Mode::Exclusive).unwrap_or(false) {
            if last_start.is_none() {
                // The lock database, made if missing: once per run.
                let admin = registry::connect_admin(server).await?;
                let _ = admin.close().await;
            }
            start(dir, server, budget.capacity());
            last_start = Some(Instant::now());
        }
        Ok::<_, Error>(Look::Held(match running {
            true => "the keeper runs but has not got this machine's minimum share".to_owned(),
            false => "the keeper did not start".to_owned(),
        }))
    })
    .await?;
    match joined {
        Ok(()) => {
            tracing::debug!(waited = ?started.elapsed(), "this machine has its share of the server");
            Ok(())
        }
        Err(expired) => Err(Error::ShareTimeout {
            after: expired.after,
            log: dir.entry(Entry::ShareLog).display().to_string(),
            why: expired.holder,
        }),
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
    match super::start(&job, &dir.entry(Entry::ShareLog), Some(&credentials)) {
        Ok(()) => tracing::debug!("share keeper started"),
        Err(error) => tracing::warn!(%error, "the share keeper did not start"),
    }
}

/// The keeper's work, in its own process: its exit code. `capacity` is the
/// budget, in server slots.
pub(crate) fn run(dir: &Path, capacity: u32) -> i32 {
    let mut credentials = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut credentials) {
        say(&format!(
            "share keeper: cannot read its credentials: {error}"
        ));
        return 1;
    }
    let options = match Server::helper_options(&credentials) {
        Ok(options) => options
            .application_name("pgtest share")
            // The server notices a machine that vanished, and ends the
            // session that holds its share: some 25 s.
            .options([
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]),
        Err(error) => {
            say(&format!("share keeper: {error}"));
            return 1;
        }
    };
    let dir = match ServerDir::reopen(dir) {
        Ok(dir) => dir,
        Err(error) => {
            say(&format!("share keeper: {error}"));
            return 1;
        }
    };
    let me = match dir.lock(Entry::ShareKeeper) {
        Ok(me) => me,
        Err(error) => {
            say(&format!("share keeper: {error}"));
            return 1;
        }
    };
    // A keeper that is leaving lets go in a moment; one that stays keeps it.
    let deadline = Instant::now() + QUIET;
    if !me
        .lock_until_blocking(Mode::Exclusive, deadline)
        .unwrap_or(false)
    {
        // Another keeper runs.
        return 0;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            say(&format!("share keeper: cannot start a runtime: {error}"));
            return 1;
        }
    };
    let budget = Budget::new(dir.clone(), capacity, Duration::from_secs(1));
    match runtime.block_on(keep(&dir, &budget, &options)) {
        Ok(()) => 0,
        Err(error) => {
            say(&format!("share keeper: {error}"));
            1
        }
    }
}

/// The locks the keeper looks at.
struct Looks {
    clients: LockFile,
    start_line: LockFile,
    growers: LockFile,
    ready: LockFile,
}

impl Looks {
    fn open(dir: &ServerDir) -> Result<Self, crate::Error> {
        Ok(Self {
            clients: dir.lock(Entry::Clients)?,
            start_line: dir.lock(Entry::StartLine)?,
            growers: dir.lock(Entry::Growers)?,
            ready: dir.lock(Entry::ShareReady)?,
        })
    }

    /// Whether a test of the machine waits for slots: to start (in line)
    /// or to grow.
    fn hungry(&self) -> bool {
        self.start_line.is_held(Mode::Exclusive).unwrap_or(false)
            || self.growers.is_held(Mode::Exclusive).unwrap_or(false)
    }

    /// Whether any test process of the machine lives.
    fn clients(&self) -> bool {
        self.clients.is_held(Mode::Exclusive).unwrap_or(true)
    }
}

async fn keep(dir: &ServerDir, budget: &Budget, options: &PgConnectOptions) -> Result<(), String> {
    let looks = Looks::open(dir).map_err(|error| error.to_string())?;
    let mut local = Local::open(budget, dir).map_err(|error| error.to_string())?;
    local.lend_all().map_err(|error| error.to_string())?;
    let mut connection = connect(options).await?;
    let id = answer(locks::announce(&mut connection)).await?;
    let capacity = budget.capacity();
    // Its own slot, the reserve, one for a test, and one for the sweep the
    // run's first copy starts beside its test (taken only when free at
    // once: without it a machine alone would never sweep).
    let minimum = (budget.reserve() + 3).min(capacity);
    let mut held: Vec<i32> = Vec::new();
    let mut wanting = false;
    let mut ready = false;
    let mut quiet_since: Option<Instant> = None;
    say(&format!(
        "share keeper: pid {} keeps this machine's share of {capacity} connections",
        std::process::id()
    ));
    loop {
        if looks.clients() {
            quiet_since = None;
        } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET
            && looks.clients.try_lock(Mode::Exclusive).unwrap_or(false)
        {
            // No test process can start while this holds `clients`: none
            // finds this keeper ready as it leaves.
            looks.ready.unlock();
            let _ = connection.close().await;
            return Ok(());
        }
        let census = answer(locks::census(&mut connection)).await?;
        let hungry = looks.hungry();
        let in_use = local.in_use().map_err(|error| error.to_string())?;
        let count = held.len() as u32;
        let view = View {
            budget: capacity,
            runners: census.runners,
            others_want: census.others_want,
            held: count,
            in_use,
            hungry,
            minimum,
        };
        let wants = if count < minimum {
            // All or nothing: a runner that waits for its minimum holds
            // no slot while it waits.
            // Enough to give the reserve back too: a keeper that starts
            // while tests hold slots (one before it died) counts those as
            // granted, and the reserve goes back only whole.
            let need = minimum
                .max(1 + local.granted() + local.lent_reserve())
                .min(capacity)
                - count;
            let taken = answer(locks::take_slots(&mut connection, capacity, need)).await?;
            if (taken.len() as u32) < need {
                answer(locks::release_slots(&mut connection, &taken)).await?;
                true
            } else {
                held.extend(taken);
                let granted = local.granted();
                local.grant(held.len() as u32 - 1 - granted);
                false
            }
        } else {
            let target = policy::target(&view);
            if target > count {
                let taken =
                    answer(locks::take_slots(&mut connection, capacity, target - count)).await?;
                let more = taken.len() as u32;
                held.extend(taken);
                local.grant(more);
            } else if target < count {
                let lent = local
                    .reclaim(count - target)
                    .map_err(|error| error.to_string())?;
                let given = held.split_off(held.len() - lent as usize);
                answer(locks::release_slots(&mut connection, &given)).await?;
            }
            policy::wants(&View {
                held: held.len() as u32,
                ..view
            })
        };
        if wants != wanting {
            answer(locks::want(&mut connection, id, wants)).await?;
            wanting = wants;
        }
        if !ready && held.len() as u32 >= minimum {
            ready = looks.ready.try_lock(Mode::Exclusive).unwrap_or(false);
            if ready {
                say(&format!(
                    "share keeper: ready with {} of {capacity} slots, {} runners",
                    held.len(),
                    census.runners
                ));
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The keeper's connection: retried while the server is full (its tests
/// wait for it), at most [`CONNECT_TRIES`].
async fn connect(options: &PgConnectOptions) -> Result<PgConnection, String> {
    let deadline = Instant::now() + CONNECT_TRIES;
    let what = "a free connection to the lock database";
    let connected = wait_until(deadline, what, Pace::Server, async || {
        match answer(PgConnection::connect_with(options)).await {
            Ok(connection) => Ok(Look::Ready(connection)),
            Err(error) if error.contains("53300") => Ok(Look::Held(error)),
            Err(error) => Err(format!("cannot connect to the lock database: {error}")),
        }
    })
    .await?;
    connected.map_err(|expired| format!("cannot connect to the lock database: {expired}"))
}

/// The server's answer to `query`, at most [`ANSWER`] later.
async fn answer<T>(query: impl Future<Output = sqlx::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(ANSWER, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) if is_refused_for_slots(&error) => Err(format!("53300: {error}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "the server did not answer in {} s",
            ANSWER.as_secs()
        )),
    }
}
