//! Helpers that outlive the test process that starts them (the embedded
//! server's watchdog): the test binary itself, run again for one of its
//! pgtest tests with a marker that makes pgtest's runner do the helper's
//! work instead of the test (the technique of rusty-fork and of nextest's
//! double spawn). The helper runs in a session and process group of its
//! own, so that signals to the test's group (a nextest timeout) do not
//! reach it, with its input empty and its output on a log file, holding no
//! pipe of the test runner's, and with no environment but what it needs:
//! no credentials.

use std::env;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::fcntl::OFlag;

use crate::embedded::watchdog;

/// Set in a helper's environment: which helper it is and its arguments.
const HELPER_VAR: &str = "PGTEST_HELPER";
/// What a helper keeps of the test process's environment.
const KEPT_VARS: [&str; 4] = [
    "PATH",
    "HOME",
    "LD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
];

/// A helper's work.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// Stop the embedded server in `cluster` once it has had no client for
    /// `idle`.
    Watchdog { cluster: PathBuf, idle: Duration },
}

impl Job {
    /// The marker's value: the job's name and arguments.
    fn encode(&self) -> OsString {
        match self {
            Self::Watchdog { cluster, idle } => {
                let mut value = OsString::from(format!("watchdog {} ", idle.as_secs()));
                value.push(cluster);
                value
            }
        }
    }

    fn decode(value: &str) -> Option<Self> {
        let (name, rest) = value.split_once(' ')?;
        match name {
            "watchdog" => {
                let (idle, cluster) = rest.split_once(' ')?;
                Some(Self::Watchdog {
                    cluster: PathBuf::from(cluster),
                    idle: Duration::from_secs(idle.parse().ok()?),
                })
            }
            _ => None,
        }
    }
}

/// The libtest name of a pgtest test of this process, which a helper
/// re-runs: the first one that started.
static TEST: OnceLock<String> = OnceLock::new();

/// Notes that the test `name` (a module path, crate first) runs in this
/// process; when this process is a helper, does the helper's work instead
/// and exits.
pub(crate) fn enter(name: &str) {
    if let Some(value) = env::var_os(HELPER_VAR) {
        let code = match value.to_str().and_then(Job::decode) {
            Some(Job::Watchdog { cluster, idle }) => watchdog::run(&cluster, idle),
            None => {
                let _ = writeln!(io::stderr(), "pgtest: unknown helper {value:?}");
                2
            }
        };
        std::process::exit(code);
    }
    let libtest_name = name.split_once("::").map_or(name, |(_, path)| path);
    let _ = TEST.set(libtest_name.to_owned());
}

/// Starts a helper for `job`, its output appended to `log`.
pub(crate) fn start(job: &Job, log: &Path) -> io::Result<()> {
    let test = TEST
        .get()
        .ok_or_else(|| io::Error::other("no pgtest test runs in this process"))?;
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(log)?;
    let mut command = Command::new(env::current_exe()?);
    command
        .args(["--exact", test, "--include-ignored", "--test-threads=1"])
        .env_clear()
        .envs(
            KEPT_VARS
                .iter()
                .filter_map(|var| Some((var, env::var_os(var)?))),
        )
        .env(HELPER_VAR, job.encode())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
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
            cluster: PathBuf::from("/home/a user/.cache/pgtest/pg15"),
            idle: Duration::from_secs(30),
        };
        let marker = job.encode().into_string().unwrap();
        assert_eq!(Job::decode(&marker), Some(job));
        assert_eq!(Job::decode("sweeper 1 /x"), None);
    }
}
