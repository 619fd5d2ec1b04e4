//! The watchdog: a helper process (see [`crate::helper`]) that stops the
//! embedded server once no test process has used it for a while.
//!
//! Every process that uses the server holds a shared lock on
//! `clients.lock` for as long as it lives (the OS drops it when the process
//! dies, however it dies). The watchdog counts the seconds during which it
//! could take that lock exclusively, and stops the server while holding it,
//! so that no process can start using the server during the stop. It holds
//! `watchdog.lock` while it lives, which is how a test process knows that
//! one runs.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::cluster::Cluster;
use crate::helper::{self, Job, say};
use crate::lock::{LockFile, Mode};

/// How long the watchdog waits for the server to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);

/// Starts a watchdog for `cluster` unless one is running.
pub(crate) fn ensure(cluster: &Cluster, idle: Duration) {
    let running = LockFile::open(&cluster.dir().join("watchdog.lock"), 0o644)
        .and_then(|lock| lock.is_held(Mode::Shared))
        .unwrap_or(false);
    if running {
        return;
    }
    let job = Job::Watchdog {
        cluster: cluster.dir().to_owned(),
        idle: idle.max(TICK),
    };
    match helper::start(&job, &cluster.dir().join("watchdog.log"), None) {
        Ok(()) => tracing::debug!(?idle, "watchdog started"),
        Err(error) => tracing::warn!(
            %error,
            "the watchdog did not start; the embedded server will not stop by itself"
        ),
    }
}

/// The watchdog's work, in its own process: returns its exit code.
pub(crate) fn run(cluster: &Path, idle: Duration) -> i32 {
    let open = |name: &str| LockFile::open(&cluster.join(name), 0o644);
    let (me, clients) = match (open("watchdog.lock"), open("clients.lock")) {
        (Ok(me), Ok(clients)) => (me, clients),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!(
                "watchdog: cannot open its lock files in {}: {error}",
                cluster.display()
            );
            return 1;
        }
    };
    if !me.try_lock(Mode::Exclusive).unwrap_or(false) {
        // Another watchdog runs.
        return 0;
    }
    let pid_file = cluster.join("data/postmaster.pid");
    let mut quiet_since = Instant::now();
    while pid_file.exists() {
        std::thread::sleep(TICK);
        match clients.try_lock(Mode::Exclusive) {
            Ok(true) if quiet_since.elapsed() >= idle => {
                let stopped = stop(&pid_file);
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
                        say(&error);
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

/// Asks the postmaster of `pid_file` for a fast shutdown and waits until
/// it is done. Works as root too: root may signal the server's user.
fn stop(pid_file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(pid_file).unwrap_or_default();
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
    else {
        return Ok(());
    };
    kill(Pid::from_raw(pid), Signal::SIGINT)
        .map_err(|error| format!("cannot signal the server (pid {pid}): {error}"))?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pid_file.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "the server (pid {pid}) did not stop within {} s",
                STOP_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
