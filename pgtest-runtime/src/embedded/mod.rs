//! The embedded server: when no URL is configured, a cluster of the
//! machine's own PostgreSQL binaries, one per user and major version, kept
//! in a cache directory between runs, started by the first test process
//! that needs it and reused by every later one. As root the server runs as
//! another user, kept at arm's length (see [`boundary`]).

mod binaries;
mod boundary;
mod cluster;

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;

use self::boundary::ServerUser;
use self::cluster::PORT;
pub(crate) use self::cluster::{Cluster, State};
use crate::Error;
use crate::config::BinariesSearch;
use crate::lock::{LockFile, Mode};
use crate::state::StateDir;
/// How long a process may wait for another to finish starting the server.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// A running embedded server, as this process sees it.
#[derive(Clone)]
pub(crate) struct Embedded {
    pub(crate) options: PgConnectOptions,
    /// Names the server in messages: version, directory, log.
    pub(crate) description: String,
    /// The connections it takes from clients other than superusers.
    pub(crate) client_connections: u32,
    /// Where its data is.
    pub(crate) data_dir: PathBuf,
    /// Where its binaries are (`psql` may be there too).
    pub(crate) bin: PathBuf,
    /// Whether this process started it.
    pub(crate) started: bool,
}

/// This process's use of the server: its description, and the shared lock
/// that tells the watchdog the server is in use while the process lives.
struct InUse {
    embedded: Embedded,
    _clients: LockFile,
}

/// Starts the embedded server of the binaries `search` finds, its cluster
/// in `home`, or finds it running (its watchdog, which stops it, is a
/// helper: see `helpers::watchdog`). As root, `server_user` (else
/// `postgres`) runs it. Once per process: later calls reuse the answer.
pub(crate) fn ensure(
    home: &StateDir,
    search: &BinariesSearch,
    server_user: Option<&str>,
) -> Result<Embedded, Error> {
    static IN_USE: Mutex<Option<InUse>> = Mutex::new(None);
    let mut in_use = IN_USE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(in_use) = in_use.as_ref() {
        return Ok(in_use.embedded.clone());
    }
    let user = self::server_user(server_user)?;
    let binaries = binaries::find(home, search, &user)?;
    let dir = home.make_cluster(binaries.major, user.uid)?;
    let cluster = Cluster::new(binaries, dir, user)?;
    let started = Instant::now();
    let start_lock = cluster.lock_file("start.lock")?;
    wait_for_lock(&cluster, &start_lock, Mode::Exclusive)?;
    let clients = cluster.lock_file("clients.lock")?;
    wait_for_lock(&cluster, &clients, Mode::Shared)?;
    let stopped = cluster.settle()?;
    if let State::Stopped(stale) = &stopped {
        cluster.init()?;
        cluster.start(stale.as_deref())?;
        tracing::debug!(elapsed = ?started.elapsed(), "embedded server started");
    }
    drop(start_lock);
    let embedded = Embedded {
        options: PgConnectOptions::new_without_pgpass()
            .socket(cluster.socket_dir())
            .port(PORT)
            .username("postgres")
            .database("postgres"),
        description: format!(
            "the embedded PostgreSQL {} server in {} (log: {})",
            cluster.binaries().major,
            cluster.dir().display(),
            cluster.log().display()
        ),
        client_connections: cluster::client_connections(),
        // This user's directory, on the disk of the data: the server's own
        // is not looked at (see `boundary`).
        data_dir: cluster.dir().to_owned(),
        bin: cluster.binaries().dir.clone(),
        started: matches!(stopped, State::Stopped(_)),
    };
    *in_use = Some(InUse {
        embedded: embedded.clone(),
        _clients: clients,
    });
    Ok(embedded)
}

/// Stops the embedded server of the binaries `search` finds, in `home`,
/// if it runs, waiting for a test that is starting it; whether it ran.
pub(crate) fn stop(
    home: &StateDir,
    search: &BinariesSearch,
    server_user: Option<&str>,
) -> Result<bool, Error> {
    let user = self::server_user(server_user)?;
    let binaries = binaries::find(home, search, &user)?;
    let dir = home.make_cluster(binaries.major, user.uid)?;
    let cluster = Cluster::new(binaries, dir, user)?;
    let start_lock = cluster.lock_file("start.lock")?;
    wait_for_lock(&cluster, &start_lock, Mode::Exclusive)?;
    if let State::Stopped(_) = cluster.settle()? {
        return Ok(false);
    }
    cluster
        .stop()
        .map(|()| true)
        .map_err(|reason| cluster.failure("stop", reason, String::new()))
}

/// The user that runs the server: this one, or as root `name` (default
/// `postgres`), never root. `nobody` only when named: other services run
/// as `nobody`, and could then reach the cluster.
fn server_user(name: Option<&str>) -> Result<ServerUser, Error> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(ServerUser::me());
    }
    // macOS names the server's account `_postgres`.
    let wanted = name.unwrap_or(
        if cfg!(target_os = "macos") && ServerUser::named("postgres").is_none() {
            "_postgres"
        } else {
            "postgres"
        },
    );
    match ServerUser::named(wanted) {
        Some(user) if user.uid.is_root() => Err(Error::ServerUser {
            name: wanted.to_owned(),
            problem: "it is root, whom initdb and postgres refuse".to_owned(),
        }),
        Some(user) => {
            if user.name == "nobody" {
                // Straight to stderr: the test harness captures eprintln!.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    b"pgtest: warning: the embedded server runs as nobody (PGTEST_SERVER_USER): \
                     every process of nobody on this machine can read and change its data\n",
                );
            }
            Ok(user)
        }
        None => Err(Error::ServerUser {
            name: wanted.to_owned(),
            problem: "there is no such user".to_owned(),
        }),
    }
}

/// Takes `lock` in `mode`, waiting at most `LOCK_TIMEOUT` for its holder.
fn wait_for_lock(cluster: &Cluster, lock: &LockFile, mode: Mode) -> Result<(), Error> {
    let name = lock
        .path()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    match lock.lock_until_blocking(mode, Instant::now() + LOCK_TIMEOUT) {
        Ok(true) => Ok(()),
        Ok(false) => Err(cluster.failure(
            &format!(
                "be shared: another process held {name} for {} s",
                LOCK_TIMEOUT.as_secs()
            ),
            "that process may hang".to_owned(),
            format!("Find it with `fuser {}` and stop it", lock.path().display()),
        )),
        Err(error) => {
            Err(cluster.failure(&format!("lock {name}"), error.to_string(), String::new()))
        }
    }
}
