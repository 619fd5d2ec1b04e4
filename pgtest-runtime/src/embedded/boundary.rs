//! The boundary between the test process and the embedded server's user.
//!
//! As root, pgtest runs the server as another user (`initdb` and `postgres`
//! refuse root), who then owns the cluster's `server/` directory and
//! everything in it. Root must not be steerable by that user, so, as
//! privilege-separated daemons do, root never acts on what the other side
//! controls:
//!
//! - everything inside `server/` is done by processes of the server's user
//!   (`initdb`, `postgres`, `pg_ctl stop`), started with settings on their
//!   command line and a clean environment ([`ServerUser::command`]);
//! - root's own files (locks, logs, which data directory is the cluster's)
//!   live beside `server/`, in a directory only root may write;
//! - the one file root reads inside (`postmaster.pid`, to learn whether the
//!   server runs) is opened through directory handles without following a
//!   link or blocking on a FIFO, checked (a regular file of the server's
//!   user with one link) and read within a bound ([`read_server_file`]);
//! - root signals no process: the server is stopped by `pg_ctl stop` run as
//!   its user, whom the kernel lets signal only that user's processes.
//!
//! When pgtest does not run as root the server's user is the test's own,
//! and the same code runs with nothing to cross.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use nix::unistd::{Gid, Uid, User};

use crate::config;
use crate::wait::{Look, wait_until_blocking};

/// The most of a program's output pgtest keeps.
const MAX_OUTPUT: u64 = 64 * 1024;

/// Runs `command` (a process of the server's user) to its end, at most
/// `limit`: its user could stop it (ptrace) or keep its output open
/// forever, so past the limit it is killed (this process's own child,
/// not yet reaped: its pid cannot be another's) and the wait ends; what it
/// printed is read by threads that are not waited for past the limit
/// either.
pub(crate) fn output_within(command: &mut Command, limit: Duration) -> io::Result<Output> {
    let deadline = Instant::now() + limit;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (sender, receiver) = mpsc::channel();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
    ];
    for (index, pipe) in pipes.into_iter().enumerate() {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
            }
            let _ = sender.send((index, bytes));
        });
    }
    let ended = wait_until_blocking(deadline, "a program to end", || {
        Ok::<_, io::Error>(match child.try_wait()? {
            Some(status) => Look::Ready(status),
            None => Look::Held(format!("pid {}", child.id())),
        })
    })?;
    let status = match ended {
        Ok(status) => status,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("it did not end within {} s and was killed", limit.as_secs()),
            ));
        }
    };
    let mut output = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    for _ in 0..2 {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match receiver.recv_timeout(wait) {
            Ok((0, bytes)) => output.stdout = bytes,
            Ok((_, bytes)) => output.stderr = bytes,
            Err(_) => break,
        }
    }
    Ok(output)
}

/// The most of a server file pgtest reads (`postmaster.pid` is some 100
/// bytes).
const MAX_READ: u64 = 64 * 1024;

/// The user that runs the embedded server.
#[derive(Clone, Debug)]
pub(crate) struct ServerUser {
    pub(crate) name: String,
    pub(crate) uid: Uid,
    gid: Gid,
    /// Whether it is another user than the test's (pgtest runs as root).
    other: bool,
}

impl ServerUser {
    /// The test's own user.
    pub(crate) fn me() -> Self {
        let uid = Uid::effective();
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |user| user.name);
        Self {
            name,
            uid,
            gid: Gid::effective(),
            other: false,
        }
    }

    /// The user `name`, for a root test process.
    pub(crate) fn named(name: &str) -> Option<Self> {
        let user = User::from_name(name).ok().flatten()?;
        Some(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            other: user.uid != Uid::effective(),
        })
    }

    /// The user with this uid (the owner of a cluster's `server/`).
    pub(crate) fn with_uid(uid: Uid) -> Option<Self> {
        if uid == Uid::effective() {
            return Some(Self::me());
        }
        let user = User::from_uid(uid).ok().flatten()?;
        Some(Self {
            name: user.name,
            uid,
            gid: user.gid,
            other: true,
        })
    }

    /// `program` as this user, in `dir` (the cluster's `server/`), with a
    /// clean environment, no input, in a session of its own so that signals
    /// sent to the test's process group do not reach the server.
    pub(crate) fn command(&self, program: &Path, dir: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(dir)
            .env_clear()
            .envs(config::server_environment())
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .stdin(Stdio::null());
        if self.other {
            // As root, std also drops the supplementary groups.
            command
                .uid(self.uid.as_raw())
                .gid(self.gid.as_raw())
                .env("HOME", dir);
        } else if let Some(home) = config::user_home() {
            command.env("HOME", home);
        }
        // SAFETY: `setsid` is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        command
    }

    /// Whether `pid` is a live process of this user (never pid 0 or 1):
    /// what a `postmaster.pid` must name to be taken as a running server.
    pub(crate) fn runs(&self, pid: i32) -> bool {
        if pid <= 1 {
            return false;
        }
        if !self.other {
            // What PostgreSQL itself asks: another user's process is not ours.
            return nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        }
        crate::process::describe(pid).is_some_and(|process| process.owner == self.uid.as_raw())
    }
}

/// Why a file of the server's directory was not read.
#[derive(Debug)]
pub(crate) enum Unread {
    /// Nothing there.
    Missing,
    /// Something pgtest will not read: says what.
    Refused(String),
}

/// Reads `dir/sub/name` (at most 64 KiB), where `dir` is a directory whose
/// parent the server's user cannot write (so that `dir` itself cannot be
/// replaced), and `sub` and `name` are the server's user's: `sub` is
/// opened as a directory without following a link, `name` without
/// following a link or waiting on a FIFO, and only a regular file of
/// `user` with one link is read.
pub(crate) fn read_server_file(
    dir: &Path,
    sub: &str,
    name: &str,
    user: &ServerUser,
) -> Result<String, Unread> {
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = open(dir, dir_flags, Mode::empty())
        .map_err(|errno| Unread::Refused(format!("{}: {}", dir.display(), errno.desc())))?;
    let sub_dir = openat(&top, sub, dir_flags, Mode::empty())
        .map_err(|errno| refused(&top, dir, sub, errno))?;
    let path = dir.join(sub).join(name);
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let file = File::from(
        openat(&sub_dir, name, flags, Mode::empty())
            .map_err(|errno| refused(&sub_dir, &dir.join(sub), name, errno))?,
    );
    let meta = file
        .metadata()
        .map_err(|error| Unread::Refused(format!("{}: {error}", path.display())))?;
    let problem = if !meta.is_file() {
        Some("it is not a regular file".to_owned())
    } else if meta.nlink() != 1 {
        Some(format!("it has {} links", meta.nlink()))
    } else if meta.uid() != user.uid.as_raw() {
        Some(format!(
            "it is owned by uid {}, not by {}",
            meta.uid(),
            user.name
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(Unread::Refused(format!("{}: {problem}", path.display())));
    }
    let mut text = String::new();
    file.take(MAX_READ)
        .read_to_string(&mut text)
        .map_err(|error| Unread::Refused(format!("{}: {error}", path.display())))?;
    Ok(text)
}

/// Why `name` in the directory `dir` (at `path`) could not be opened:
/// what it is, looked at through `dir`'s handle, when it is not what was
/// asked for.
/// The device and inode of `dir/sub`, opened as in [`read_server_file`]
/// (through `dir`'s handle, not following a link).
pub(crate) fn dir_identity(dir: &Path, sub: &str) -> Option<(u64, u64)> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = open(dir, flags, Mode::empty()).ok()?;
    let sub = File::from(openat(&top, sub, flags, Mode::empty()).ok()?);
    let meta = sub.metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

fn refused(dir: &OwnedFd, path: &Path, name: &str, errno: Errno) -> Unread {
    if errno == Errno::ENOENT {
        return Unread::Missing;
    }
    let found = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
    let reason = match found.map(|stat| SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT) {
        Some(kind) if kind == SFlag::S_IFLNK => "it is a symbolic link".to_owned(),
        Some(_) if errno == Errno::ENOTDIR => "it is not a directory".to_owned(),
        _ => errno.desc().to_owned(),
    };
    Unread::Refused(format!("{}: {reason}", path.join(name).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_file_of_the_user_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let me = ServerUser::me();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let data = dir.path().join("data");
        std::fs::write(data.join("plain"), "1234\n").unwrap();
        assert_eq!(
            read_server_file(dir.path(), "data", "plain", &me).unwrap(),
            "1234\n"
        );
        assert!(matches!(
            read_server_file(dir.path(), "data", "absent", &me),
            Err(Unread::Missing)
        ));

        std::os::unix::fs::symlink(data.join("plain"), data.join("link")).unwrap();
        std::fs::hard_link(data.join("plain"), data.join("hard")).unwrap();
        nix::unistd::mkfifo(&data.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        for (name, why) in [
            ("link", "symbolic link"),
            ("hard", "2 links"),
            ("fifo", "not a regular file"),
        ] {
            match read_server_file(dir.path(), "data", name, &me) {
                Err(Unread::Refused(reason)) => assert!(
                    reason.contains(why) && reason.contains(name),
                    "{name}: {reason}"
                ),
                other => panic!("{name} was not refused: {other:?}"),
            }
        }

        // A directory swapped for a link is not followed either.
        std::fs::rename(&data, dir.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &data).unwrap();
        assert!(matches!(
            read_server_file(dir.path(), "data", "plain", &me),
            Err(Unread::Refused(reason)) if reason.contains("symbolic link")
        ));
    }

    #[test]
    fn a_live_process_of_the_user_runs_and_pids_zero_and_one_never_do() {
        let me = ServerUser::me();
        assert!(me.runs(i32::try_from(std::process::id()).unwrap()));
        assert!(!me.runs(0) && !me.runs(1) && !me.runs(-1));
    }
}
