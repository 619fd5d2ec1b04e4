//! The embedded cluster's files and processes: where it lives, who runs
//! it, `initdb`, `pg_ctl start`, and what its `postmaster.pid` says.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::{Pid, Uid, User};

use super::binaries::Binaries;
use crate::Error;
use crate::lock::LockFile;
use crate::state::StateDir;

/// The port number in the socket's name; the server listens on no TCP port.
pub(crate) const PORT: u16 = 5432;
/// The longest unix socket path the kernel accepts, less its terminator.
#[cfg(target_os = "macos")]
const MAX_SOCKET_PATH: usize = 103;
/// The longest unix socket path the kernel accepts, less its terminator.
#[cfg(not(target_os = "macos"))]
const MAX_SOCKET_PATH: usize = 107;
/// How long to wait for `pg_ctl start`, and for another process's start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One cluster directory: `data/`, `server.log`, the locks, the socket.
pub(crate) struct Cluster {
    binaries: Binaries,
    dir: PathBuf,
    /// The user that runs the server when pgtest runs as root.
    server_user: Option<User>,
}

/// What `postmaster.pid` says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum State {
    Stopped,
    Ready,
    /// Starting or stopping: wait.
    Busy,
}

impl Cluster {
    /// The cluster of these binaries in `home`, its directory made and
    /// owned by whoever runs the server.
    pub(crate) fn prepare(binaries: Binaries, home: &StateDir) -> Result<Self, Error> {
        let server_user = server_user()?;
        let major = binaries.major;
        let cluster = Self {
            dir: home.cluster(major),
            binaries,
            server_user,
        };
        let socket = cluster.dir.join(format!(".s.PGSQL.{PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(cluster.failure(
                "start",
                format!(
                    "its socket path {} is longer than the {MAX_SOCKET_PATH} bytes a unix socket may have",
                    socket.display()
                ),
                "Set PGTEST_HOME to a shorter directory".to_owned(),
            ));
        }
        let owner = match &cluster.server_user {
            Some(user) => user.uid,
            None => Uid::effective(),
        };
        home.make_cluster(major, owner)?;
        Ok(cluster)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Opens (creating) one of the cluster's lock files, readable by the
    /// server user so that the watchdog can lock it too.
    pub(crate) fn lock_file(&self, name: &str) -> Result<LockFile, Error> {
        let path = self.dir.join(name);
        let file = LockFile::open(&path, 0o644).map_err(|error| {
            self.failure(
                "open its lock file",
                format!("{}: {error}", path.display()),
                "Check the directory's permissions".to_owned(),
            )
        })?;
        if let Some(user) = &self.server_user {
            let _ =
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()));
        }
        Ok(file)
    }

    /// A command run as the server user (when pgtest runs as root), in the
    /// cluster directory, in a process group of its own so that signals
    /// sent to the test's group do not reach the server.
    pub(crate) fn server_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(user) = &self.server_user {
            command
                .uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &self.dir)
                .env("USER", &user.name);
        }
        command
    }

    /// What `postmaster.pid` says; a file left by a dead server is removed.
    pub(crate) fn state(&self) -> State {
        let pid_file = self.data().join("postmaster.pid");
        let Ok(text) = fs::read_to_string(&pid_file) else {
            return State::Stopped;
        };
        let mut lines = text.lines();
        let pid = lines
            .next()
            .and_then(|line| line.trim().parse::<i32>().ok());
        match pid {
            Some(pid) if is_alive(Pid::from_raw(pid)) => {
                let status = lines.nth(6).map(str::trim);
                if status == Some("ready") {
                    State::Ready
                } else {
                    State::Busy
                }
            }
            _ => {
                tracing::debug!(path = %pid_file.display(), "removing the pid file of a dead server");
                let _ = fs::remove_file(&pid_file);
                State::Stopped
            }
        }
    }

    /// Waits while another process starts or stops the server.
    pub(crate) fn settle(&self) -> Result<State, Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let state = self.state();
            if state != State::Busy {
                return Ok(state);
            }
            if Instant::now() > deadline {
                return Err(self.failure(
                    "settle",
                    format!(
                        "it was still starting or stopping after {} s",
                        START_TIMEOUT.as_secs()
                    ),
                    "Stop it with pg_ctl, or remove the directory to start afresh".to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `initdb` once per cluster directory, into a temporary directory
    /// renamed into place, so that a crash midway leaves nothing half made.
    pub(crate) fn init(&self) -> Result<(), Error> {
        if self.data().join("PG_VERSION").is_file() {
            return Ok(());
        }
        let fresh = self.dir.join("data.initdb");
        let _ = fs::remove_dir_all(&fresh);
        let _ = fs::remove_dir_all(self.data());
        tracing::debug!(dir = %self.dir.display(), "initdb for the embedded server");
        let output = self
            .server_command(self.binaries.program("initdb"))
            .arg("-D")
            .arg(&fresh)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                // Not --no-instructions: PostgreSQL 13's initdb lacks it, and
                // the output is captured anyway.
                "--no-sync",
            ])
            .output();
        self.check("initialize its data directory (initdb)", output)?;
        let include =
            "\n# Added by pgtest: settings for tests.\ninclude_if_exists = 'pgtest.conf'\n";
        let conf = fresh.join("postgresql.conf");
        let appended = fs::read_to_string(&conf).and_then(|text| fs::write(&conf, text + include));
        appended
            .and_then(|()| fs::rename(&fresh, self.data()))
            .map_err(|error| {
                self.failure(
                    "configure its data directory",
                    error.to_string(),
                    String::new(),
                )
            })
    }

    /// Writes the test settings and starts the server, detached, waiting
    /// until it accepts connections.
    pub(crate) fn start(&self) -> Result<(), Error> {
        let settings = self.settings();
        fs::write(self.data().join("pgtest.conf"), settings).map_err(|error| {
            self.failure("write its settings", error.to_string(), String::new())
        })?;
        if let Some(user) = &self.server_user {
            let _ = std::os::unix::fs::chown(
                self.data().join("pgtest.conf"),
                Some(user.uid.as_raw()),
                Some(user.gid.as_raw()),
            );
        }
        tracing::debug!(dir = %self.dir.display(), "starting the embedded server");
        let output = self
            .server_command(self.binaries.program("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args([
                "-w",
                "-t",
                &START_TIMEOUT.as_secs().to_string(),
                "-s",
                "start",
            ])
            .output();
        self.check("start (pg_ctl start)", output)
    }

    fn settings(&self) -> String {
        let max_connections = max_connections();
        format!(
            "# Written by pgtest at every start.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{socket}'\n\
             unix_socket_permissions = 0700\n\
             port = {PORT}\n\
             max_connections = {max_connections}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            socket = self.dir.display().to_string().replace('\'', "''"),
        )
    }

    fn check(&self, action: &str, output: io::Result<Output>) -> Result<(), Error> {
        match output {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => {
                let printed = format!(
                    "{} {}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                Err(self.failure(
                    action,
                    format!("{} ({printed})", output.status),
                    String::new(),
                ))
            }
            Err(error) => Err(self.failure(action, error.to_string(), String::new())),
        }
    }

    pub(crate) fn failure(&self, action: &str, reason: String, remedy: String) -> Error {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        Error::Embedded {
            action: action.to_owned(),
            reason,
            remedy: if remedy.is_empty() {
                remedy
            } else {
                format!("{remedy}. ")
            },
            dir: self.dir.clone(),
            log_tail: lines[lines.len().saturating_sub(15)..].join("\n"),
        }
    }
}

/// The server's `max_connections`: 100, and 25 more per core.
pub(crate) fn max_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    100 + 25
        * u32::try_from(cores)
            .unwrap_or(u32::MAX / 50)
            .min(u32::MAX / 50)
}

/// The connections clients other than superusers may use: the server keeps
/// `superuser_reserved_connections` (3 by default, untouched here) back.
pub(crate) fn client_connections() -> u32 {
    max_connections() - 3
}

/// `postgres` (else `nobody`) when pgtest runs as root, since `initdb` and
/// `postgres` refuse to; nobody otherwise.
fn server_user() -> Result<Option<User>, Error> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = User::from_name(name) {
            return Ok(Some(user));
        }
    }
    Err(Error::NoServerUser)
}

/// Whether a process with this pid exists (possibly another user's).
pub(crate) fn is_alive(pid: Pid) -> bool {
    matches!(kill(pid, None), Ok(()) | Err(Errno::EPERM))
}
