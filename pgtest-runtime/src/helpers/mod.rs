//! Helpers: processes that outlive the test process that starts them, the
//! embedded server's watchdog ([`watchdog`]), the spares helper
//! ([`spares`]) and the share keeper ([`keeper`]), and how they are started
//! and recognised (here): the test
//! binary itself, run again
//! for one of its pgtest tests with a marker that makes pgtest's runner do
//! the helper's work instead of the test (the technique of rusty-fork and
//! of nextest's double spawn). A helper runs in a session and process group
//! of its own, so that signals to the test's group (a nextest timeout) do
//! not reach it; its output goes to a log file and its input is empty or a
//! pipe of its own, so it holds no pipe of the test runner's; and it keeps
//! no environment but what it needs: credentials reach it through that
//! pipe.

use std::env;
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{self, HELPER_VAR};
use crate::state::append_no_follow;

pub(crate) mod keeper;
pub(crate) mod spares;
pub(crate) mod watchdog;

/// A helper's work.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// Stop the embedded server in `cluster` (with the `pg_ctl` of `bin`)
    /// once it has had no client for `idle`.
    Watchdog {
        cluster: PathBuf,
        bin: PathBuf,
        idle: Duration,
    },
    /// Do the server work queued in the budget directory `budget` once no
    /// test uses the server, making at most `limit` spares of a template.
    Spares { budget: PathBuf, limit: u32 },
    /// Keep this machine's share of the server's `capacity` connections,
    /// for the budget directory `budget` (see [`crate::share`] and
    /// [`keeper`]).
    Share { budget: PathBuf, capacity: u32 },
}

impl Job {
    /// The marker's value: the job's name and arguments.
    fn encode(&self) -> OsString {
        match self {
            Self::Watchdog { cluster, bin, idle } => {
                // Two paths: one per line (a path with a line break in it
                // makes a marker that reads back as no job).
                let mut value = OsString::from(format!("watchdog {} ", idle.as_secs()));
                value.push(bin);
                value.push("\n");
                value.push(cluster);
                value
            }
            Self::Spares { budget, limit } => {
                let mut value = OsString::from(format!("spares {limit} "));
                value.push(budget);
                value
            }
            Self::Share { budget, capacity } => {
                let mut value = OsString::from(format!("share {capacity} "));
                value.push(budget);
                value
            }
        }
    }

    fn decode(value: &str) -> Option<Self> {
        let (name, rest) = value.split_once(' ')?;
        match name {
            "watchdog" => {
                let (idle, paths) = rest.split_once(' ')?;
                let (bin, cluster) = paths.split_once('\n')?;
                if cluster.contains('\n') {
                    return None;
                }
                Some(Self::Watchdog {
                    cluster: PathBuf::from(cluster),
                    bin: PathBuf::from(bin),
                    idle: Duration::from_secs(idle.parse().ok()?),
                })
            }
            "spares" => {
                let (limit, budget) = rest.split_once(' ')?;
                Some(Self::Spares {
                    budget: PathBuf::from(budget),
                    limit: limit.parse().ok()?,
                })
            }
            "share" => {
                let (capacity, budget) = rest.split_once(' ')?;
                Some(Self::Share {
                    budget: PathBuf::from(budget),
                    capacity: capacity.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// The libtest name of a pgtest test of this process, which a helper
/// re-runs: the first one that started.
static TEST: OnceLock<String> = OnceLock::new();

/// The job of this process when it is a helper: `None` for a test process,
/// `Some(Err(marker))` for a marker this version cannot read.
fn this_process() -> Option<Result<Job, OsString>> {
    let value = config::helper_marker()?;
    Some(value.to_str().and_then(Job::decode).ok_or(value))
}

/// Does a helper's work if this process was started as one (not to run a
/// test): its exit code.
pub(crate) fn run_if_asked() -> Option<i32> {
    let job = this_process()?;
    Some(match job {
        Ok(Job::Watchdog { cluster, bin, idle }) => watchdog::run(&cluster, &bin, idle),
        Ok(Job::Spares { budget, limit }) => spares::run(&budget, limit),
        Ok(Job::Share { budget, capacity }) => keeper::run(&budget, capacity),
        Err(marker) => {
            say(&format!("pgtest: unknown helper {marker:?}"));
            2
        }
    })
}

/// Notes that the test `name` (a module path, crate first) runs in this
/// process, for helpers to re-run.
pub(crate) fn note_test(name: &str) {
    let libtest_name = name.split_once("::").map_or(name, |(_, path)| path);
    let _ = TEST.set(libtest_name.to_owned());
}

/// Writes `line` to a helper's log (its stderr; not `eprintln!`, which the
/// test harness captures).
pub(crate) fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// Starts a helper for `job`, its output appended to `log`, `secret` (if
/// any) written to its input through a pipe.
/// A process with no pgtest test (`cargo pgtest`) is run again with no
/// arguments: it looks for the marker first (see
/// [`crate::manage::run_helper_if_asked`]).
pub(crate) fn start(job: &Job, log: &Path, secret: Option<&str>) -> io::Result<()> {
    let log = append_no_follow(log)?;
    let mut command = Command::new(env::current_exe()?);
    if let Some(test) = TEST.get() {
        command.args(["--exact", test, "--include-ignored", "--test-threads=1"]);
    }
    command
        .env_clear()
        .envs(config::helper_environment())
        .env(HELPER_VAR, job.encode())
        .stdout(log.try_clone()?)
        .stderr(log);
    // The secret is in the pipe before the helper starts: a test killed
    // right after (a runner's timeout) still hands it over.
    match secret {
        Some(secret) => {
            let (reader, mut writer) = io::pipe()?;
            writer.write_all(secret.as_bytes())?;
            drop(writer);
            command.stdin(reader);
        }
        None => {
            command.stdin(Stdio::null());
        }
    }
    // SAFETY: `setsid` is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    // Not waited for: it outlives this process, and init reaps it then.
    command.spawn().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_back_from_its_marker() {
        let job = Job::Watchdog {
            cluster: PathBuf::from("/home/a user/.cache/pgtest/embedded-pg15"),
            bin: PathBuf::from("/opt/post gres/bin"),
            idle: Duration::from_secs(30),
        };
        let marker = job.encode().into_string().unwrap();
        assert_eq!(Job::decode(&marker), Some(job));
        let job = Job::Spares {
            budget: PathBuf::from("/var/tmp/pgtest-root/budget/0123abcd"),
            limit: 256,
        };
        let marker = job.encode().into_string().unwrap();
        assert_eq!(Job::decode(&marker), Some(job));
        let job = Job::Share {
            budget: PathBuf::from("/var/tmp/pgtest-root/budget/0123abcd"),
            capacity: 44,
        };
        let marker = job.encode().into_string().unwrap();
        assert_eq!(Job::decode(&marker), Some(job));
        assert_eq!(Job::decode("sweeper 1 /x"), None);
    }
}
