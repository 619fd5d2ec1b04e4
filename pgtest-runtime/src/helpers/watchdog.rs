//! The watchdog: a helper process (see [`super`]) that stops the
//! embedded server once no test process has used it for a while.
//!
//! Every process that uses the server holds a shared lock on
//! `clients.lock` for as long as it lives (the OS drops it when the process
//! dies, however it dies). The watchdog counts the seconds during which it
//! could take that lock exclusively, and stops the server while holding it,
//! so that no process can start using the server during the stop. It holds
//! `watchdog.lock` while it lives, which is how a test process knows that
//! one runs. It stops the server with `pg_ctl stop` run as the server's
//! user, and signals no process itself (see the embedded server's
//! `boundary`).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Job, say};
use crate::embedded::{Cluster, State};
use crate::lock::{LockFile, Mode};
use crate::server::Server;

/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);

/// Starts a watchdog for `server`, if it is the embedded one, unless one
/// is running: it stops the server after `idle` without a client.
pub(crate) fn ensure(server: &Server, idle: Duration) {
    let Some((cluster, bin)) = &server.embedded_cluster else {
        return;
    };
    let running = LockFile::open(&cluster.join("watchdog.lock"), 0o600)
        .and_then(|lock| lock.is_held(Mode::Shared))
        .unwrap_or(false);
    if running {
        return;
    }
    let job = Job::Watchdog {
        cluster: cluster.clone(),
        bin: bin.clone(),
        idle: idle.max(TICK),
    };
    match super::start(&job, &cluster.join("watchdog.log"), None) {
        Ok(()) => tracing::debug!(?idle, "watchdog started"),
        Err(error) => tracing::warn!(
            %error,
            "the watchdog did not start; the embedded server will not stop by itself"
        ),
    }
}

/// The watchdog's work, in its own process: returns its exit code.
pub(crate) fn run(dir: &Path, bin: &Path, idle: Duration) -> i32 {
    let open = |name: &str| LockFile::open(&dir.join(name), 0o600);
    let opened = (
        open("watchdog.lock"),
        open("clients.lock"),
        Cluster::open(dir, bin),
    );
    let (me, clients, cluster) = match opened {
        (Ok(me), Ok(clients), Ok(cluster)) => (me, clients, cluster),
        (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
            say(&format!(
                "watchdog: cannot open the cluster in {}: {error}",
                dir.display()
            ));
            return 1;
        }
    };
    if !me.try_lock(Mode::Exclusive).unwrap_or(false) {
        // Another watchdog runs.
        return 0;
    }
    let mut quiet_since = Instant::now();
    while runs(&cluster) {
        std::thread::sleep(TICK);
        match clients.try_lock(Mode::Exclusive) {
            // Looked at again under the lock: the pid file may have changed
            // during the pause, and pg_ctl stop signals what it names.
            Ok(true) if quiet_since.elapsed() >= idle && runs(&cluster) => {
                let stopped = cluster.stop();
                clients.unlock();
                match stopped {
                    Ok(()) => {
                        say(&format!(
                            "stopped the server after {} s without a client",
                            idle.as_secs()
                        ));
                        return 0;
                    }
                    Err(error) => {
                        say(&format!("watchdog: {error}"));
                        return 1;
                    }
                }
            }
            Ok(true) => clients.unlock(),
            Ok(false) | Err(_) => quiet_since = Instant::now(),
        }
    }
    0
}

/// Whether the cluster's server runs (starting, ready or stopping), as its
/// pid file says.
fn runs(cluster: &Cluster) -> bool {
    matches!(cluster.state(), Ok(State::Ready | State::Busy))
}
