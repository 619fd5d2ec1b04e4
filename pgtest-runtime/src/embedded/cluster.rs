//! The embedded cluster's files and processes: where it lives, `initdb`,
//! the server's start and stop, and what its `postmaster.pid` says.
//!
//! A cluster is two directories (see [`crate::state::StateDir::make_cluster`]):
//!
//! ```text
//! embedded-pg15/          this user's: start.lock, clients.lock,
//!                         watchdog.lock, watchdog.log, server.log, data-dir
//!     server/             the server's user's: the socket and data-<id>/
//! ```
//!
//! The test's side writes only in the first; the second is left to the
//! server's user (see [`super::boundary`]).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use super::binaries::Binaries;
use super::boundary::{ServerUser, Unread, dir_identity, output_within, read_server_file};
use crate::Error;
use crate::lock::{LockFile, open_no_follow};
use crate::state::append_no_follow;
use crate::wait::{Look, wait_until_blocking};

/// The port number in the socket's name; the server listens on no TCP port.
pub(crate) const PORT: u16 = 5432;
/// The longest unix socket path the kernel accepts, less its terminator.
#[cfg(target_os = "macos")]
const MAX_SOCKET_PATH: usize = 103;
/// The longest unix socket path the kernel accepts, less its terminator.
#[cfg(not(target_os = "macos"))]
const MAX_SOCKET_PATH: usize = 107;
/// How long to wait for the server to start or stop, and for another
/// process's start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `initdb` or `pg_ctl stop` may take before it is killed.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);
/// The file of this user's directory that names the data directory in
/// `server/`, written once `initdb` made it.
const DATA_DIR_FILE: &str = "data-dir";
/// How many of the server log's last bytes a message shows at most.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// One cluster (see the module's docs).
pub(crate) struct Cluster {
    binaries: Binaries,
    /// This user's directory.
    dir: PathBuf,
    /// The server's user's directory, in `dir`.
    server_dir: PathBuf,
    user: ServerUser,
}

/// What a `postmaster.pid` holds that pgtest reads: the postmaster's pid
/// (line 1) and its status (line 8).
struct PidFile {
    pid: Option<i32>,
    ready: bool,
}

/// What the cluster's `postmaster.pid` says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// No server runs; `Some` says what a stale pid file named.
    Stopped(Option<String>),
    Ready,
    /// Starting or stopping: wait.
    Busy,
}

impl Cluster {
    /// The cluster of these binaries in `dir`, this user's directory,
    /// whose `server/` is `user`'s (both made and checked by the caller).
    pub(crate) fn new(binaries: Binaries, dir: PathBuf, user: ServerUser) -> Result<Self, Error> {
        let cluster = Self {
            server_dir: dir.join("server"),
            dir,
            binaries,
            user,
        };
        let socket = cluster.server_dir.join(format!(".s.PGSQL.{PORT}"));
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
        Ok(cluster)
    }

    /// The cluster in `dir` as the watchdog finds it: its server's user is
    /// the owner of `server/` (which only this user could have given it).
    pub(crate) fn open(dir: &Path, bin: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let owner = fs::symlink_metadata(dir.join("server"))?.uid();
        let user = ServerUser::with_uid(nix::unistd::Uid::from_raw(owner))
            .ok_or_else(|| io::Error::other(format!("no user has uid {owner}")))?;
        let binaries = Binaries {
            dir: bin.to_owned(),
            major: 0,
        };
        Ok(Self {
            server_dir: dir.join("server"),
            dir: dir.to_owned(),
            binaries,
            user,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the server listens: the directory of its unix socket.
    pub(crate) fn socket_dir(&self) -> &Path {
        &self.server_dir
    }

    pub(crate) fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Opens (creating) one of the cluster's lock files.
    pub(crate) fn lock_file(&self, name: &str) -> Result<LockFile, Error> {
        let path = self.dir.join(name);
        LockFile::open(&path, 0o600).map_err(|error| {
            self.failure(
                "open its lock file",
                format!("{}: {error}", path.display()),
                "Check the directory's permissions".to_owned(),
            )
        })
    }

    /// The name of the data directory in `server/`, once `initdb` made it.
    fn data_name(&self) -> Option<String> {
        let name = fs::read_to_string(self.dir.join(DATA_DIR_FILE)).ok()?;
        let name = name.trim();
        let id = name.strip_prefix("data-")?;
        (id.len() == 16 && id.bytes().all(|byte| byte.is_ascii_hexdigit())).then(|| name.to_owned())
    }

    /// What `postmaster.pid` says. A file that is not a plain file of the
    /// server's user (a link, a FIFO) is an error naming it; one that names
    /// no live process of that user is stale, and PostgreSQL replaces it.
    pub(crate) fn state(&self) -> Result<State, Error> {
        let Some(data) = self.data_name() else {
            return Ok(State::Stopped(None));
        };
        let Some(pid_file) = self.pid_file(&data)? else {
            return Ok(State::Stopped(None));
        };
        let named = pid_file
            .pid
            .map_or_else(|| "no pid".to_owned(), |pid| format!("pid {pid}"));
        let stale = |what: String| {
            State::Stopped(Some(format!(
                "its stale {}/{data}/postmaster.pid names {named}, {what}",
                self.server_dir.display(),
            )))
        };
        let Some(pid) = pid_file.pid.filter(|&pid| self.user.runs(pid)) else {
            return Ok(stale(format!("which is no process of {}", self.user.name)));
        };
        // A postmaster works in its data directory; a process of the same
        // user elsewhere (another server, a reused pid) is not this one.
        let identity = dir_identity(&self.server_dir, &data);
        if identity.and_then(|dir| crate::process::works_in(pid, dir)) == Some(false) {
            return Ok(stale(format!(
                "a process of {} that is not this directory's server: if no server runs in \
                 it, remove that file",
                self.user.name
            )));
        }
        match pid_file.ready {
            true => Ok(State::Ready),
            false => Ok(State::Busy),
        }
    }

    /// The data directory's `postmaster.pid`, read through handles (see
    /// [`read_server_file`]); `None` when there is none.
    fn pid_file(&self, data: &str) -> Result<Option<PidFile>, Error> {
        match read_server_file(&self.server_dir, data, "postmaster.pid", &self.user) {
            Ok(text) => {
                let mut lines = text.lines().map(str::trim);
                Ok(Some(PidFile {
                    pid: lines.next().and_then(|line| line.parse().ok()),
                    ready: lines.nth(6) == Some("ready"),
                }))
            }
            Err(Unread::Missing) => Ok(None),
            Err(Unread::Refused(reason)) => Err(self.failure(
                "read its pid file",
                format!("pgtest does not read {reason}"),
                format!(
                    "Only the server's user ({}) can have put it there: if no server runs, \
                     remove it",
                    self.user.name
                ),
            )),
        }
    }

    /// Waits while another process starts or stops the server.
    pub(crate) fn settle(&self) -> Result<State, Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        let settled = wait_until_blocking(deadline, "the server to start or stop", || {
            Ok(match self.state()? {
                State::Busy => Look::Held("the process starting or stopping it".to_owned()),
                state => Look::Ready(state),
            })
        })?;
        settled.map_err(|expired| {
            self.failure(
                "settle",
                format!(
                    "it was still starting or stopping after {:.0} s",
                    expired.after.as_secs_f64()
                ),
                "Stop it with pg_ctl, or remove the directory to start afresh".to_owned(),
            )
        })
    }

    /// Runs `initdb` (as the server's user) into a data directory of a new
    /// name, then notes that name here: a crash midway leaves a directory
    /// no later run uses, never a half-made cluster.
    pub(crate) fn init(&self) -> Result<(), Error> {
        if self.data_name().is_some() {
            return Ok(());
        }
        let name = format!("data-{:016x}", uuid::Uuid::new_v4().as_u64_pair().0);
        tracing::debug!(dir = %self.dir.display(), %name, "initdb for the embedded server");
        let mut command = self.server_command("initdb");
        command.arg("-D").arg(self.server_dir.join(&name)).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            // Not --no-instructions: PostgreSQL 13's initdb lacks it, and
            // the output is captured anyway.
            "--no-sync",
        ]);
        let output = output_within(&mut command, PROGRAM_TIMEOUT);
        self.check("initialize its data directory (initdb)", output)?;
        let fresh = self.dir.join(format!("{DATA_DIR_FILE}.new"));
        let _ = fs::remove_file(&fresh);
        open_no_follow(&fresh, 0o600)
            .and_then(|mut file| file.write_all(format!("{name}\n").as_bytes()))
            .and_then(|()| fs::rename(&fresh, self.dir.join(DATA_DIR_FILE)))
            .map_err(|error| {
                self.failure("note its data directory", error.to_string(), String::new())
            })
    }

    /// Starts the server (as the server's user, its settings on its
    /// command line, its output appended to this user's `server.log`),
    /// detached, and waits until it accepts connections. `stale` is what
    /// a stale pid file named, for the message if the start fails.
    pub(crate) fn start(&self, stale: Option<&str>) -> Result<(), Error> {
        let data = self.data_name().ok_or_else(|| {
            self.failure(
                "start",
                "it has no data directory".to_owned(),
                String::new(),
            )
        })?;
        let log = append_no_follow(&self.log()).map_err(|error| {
            self.failure(
                "open its log",
                format!("{}: {error}", self.log().display()),
                String::new(),
            )
        })?;
        tracing::debug!(dir = %self.dir.display(), "starting the embedded server");
        let mut command = self.server_command("postgres");
        command.arg("-D").arg(self.server_dir.join(&data));
        for (name, value) in self.settings() {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let started = log
            .try_clone()
            .and_then(|stdout| command.stdout(stdout).stderr(log).spawn());
        let mut postmaster = started
            .map_err(|error| self.failure("start (postgres)", error.to_string(), String::new()))?;
        let stale_note = stale.map_or_else(String::new, |stale| format!("; {stale}"));
        let waited = self.wait_for_start(&data, &mut postmaster, &stale_note);
        if waited.is_err() {
            // Our own child, not yet reaped: its pid cannot have been reused.
            let _ = postmaster.kill();
            let _ = postmaster.wait();
        }
        // Otherwise not waited for: it outlives this process, and init
        // reaps it.
        waited
    }

    /// Waits until the pid file says that `postmaster`, the server this
    /// process started, accepts connections.
    fn wait_for_start(
        &self,
        data: &str,
        postmaster: &mut Child,
        stale_note: &str,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid = i32::try_from(postmaster.id()).ok();
        let started = wait_until_blocking(deadline, "the server to accept connections", || {
            if let Ok(Some(status)) = postmaster.try_wait() {
                return Err(self.failure(
                    "start",
                    format!("postgres exited ({status}){stale_note}"),
                    String::new(),
                ));
            }
            let ready = self
                .pid_file(data)?
                .is_some_and(|file| file.ready && file.pid == pid);
            Ok(match ready {
                true => Look::Ready(()),
                false => Look::Held(format!("postgres (pid {})", postmaster.id())),
            })
        })?;
        started.map_err(|expired| {
            self.failure(
                "start",
                format!(
                    "it did not accept connections within {:.0} s{stale_note}",
                    expired.after.as_secs_f64()
                ),
                String::new(),
            )
        })
    }

    /// Stops the server with `pg_ctl stop`, run as the server's user: root
    /// signals nothing, so a pid file that the server's user rewrote can
    /// make it signal no process of another user.
    pub(crate) fn stop(&self) -> Result<(), String> {
        let Some(data) = self.data_name() else {
            return Ok(());
        };
        let mut command = self.server_command("pg_ctl");
        command
            .arg("-D")
            .arg(self.server_dir.join(data))
            .args(["-m", "fast", "-w", "-t"])
            .arg(START_TIMEOUT.as_secs().to_string())
            .args(["-s", "stop"]);
        let output = output_within(&mut command, PROGRAM_TIMEOUT);
        match output {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "pg_ctl stop failed ({}): {}",
                output.status,
                printed(&output)
            )),
            Err(error) => Err(format!("cannot run pg_ctl stop: {error}")),
        }
    }

    /// One of the binaries, as the server's user, in `server/`.
    fn server_command(&self, program: &str) -> Command {
        self.user
            .command(&self.binaries.program(program), &self.server_dir)
    }

    /// The server's settings for tests.
    fn settings(&self) -> [(&'static str, String); 8] {
        // A list of directories: quoted, with quotes doubled.
        let socket_dir = format!(
            "\"{}\"",
            self.server_dir.display().to_string().replace('"', "\"\"")
        );
        [
            ("listen_addresses", String::new()),
            ("unix_socket_directories", socket_dir),
            ("unix_socket_permissions", "0700".to_owned()),
            ("port", PORT.to_string()),
            ("max_connections", max_connections().to_string()),
            ("fsync", "off".to_owned()),
            ("synchronous_commit", "off".to_owned()),
            ("full_page_writes", "off".to_owned()),
        ]
    }

    fn check(&self, action: &str, output: io::Result<Output>) -> Result<(), Error> {
        match output {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(self.failure(
                action,
                format!("{} ({})", output.status, printed(&output)),
                String::new(),
            )),
            Err(error) => Err(self.failure(action, error.to_string(), String::new())),
        }
    }

    pub(crate) fn failure(&self, action: &str, reason: String, remedy: String) -> Error {
        Error::Embedded {
            action: action.to_owned(),
            reason,
            remedy: if remedy.is_empty() {
                remedy
            } else {
                format!("{remedy}. ")
            },
            dir: self.dir.clone(),
            log_tail: self.log_tail(),
        }
    }

    /// The last lines of `server.log` (this user's file, which the server
    /// writes through the descriptor it was started with), from its last
    /// 16 KiB at most.
    fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(self.log()) else {
            return String::new();
        };
        let length = file.metadata().map_or(0, |meta| meta.len());
        let mut bytes = Vec::new();
        let read = file
            .seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))
            .and_then(|_| file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes));
        if read.is_err() {
            return String::new();
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// What a program printed, its last lines.
fn printed(output: &Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
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
