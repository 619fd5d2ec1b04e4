//! File locks, the one way pgtest's processes wait for each other: a lock
//! file opened without following symbolic links, taken at once or waited
//! for until a deadline. The operating system drops a lock when its process
//! dies, however it dies.
//!
//! **How a test waits.** In a runtime, a thread of the wait's own blocks in
//! the kernel for the lock while the test's task waits for it until the
//! deadline: a suite of hundreds of processes waiting in line for the
//! connection budget spends no CPU until the lock is let go. Polling did:
//! a look every 20 ms per waiting process took the CPU of a 2-core machine
//! from the server, and a suite ran twice as long. No runtime's thread
//! blocks, and every wait ends on time: a waiter thread that is no longer
//! waited for lets go of the lock as soon as it gets it, and ends. Outside
//! a runtime (the embedded server's start, a few processes), the wait polls
//! (see [`crate::wait`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::OFlag;

use tokio::sync::oneshot;

use crate::wait::{Look, wait_until_blocking};

/// How a lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// By one process.
    Exclusive,
    /// By any number of processes, while none holds it exclusively.
    Shared,
}

/// A lock file. Dropping it releases its lock.
#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Opens (creating, with `mode` bits) the lock file at `path`.
    pub(crate) fn open(path: &Path, mode: u32) -> io::Result<Self> {
        Ok(Self {
            file: open_no_follow(path, mode)?,
            path: path.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, which keeps the lock while it is open.
    pub(crate) fn into_file(self) -> File {
        self.file
    }

    /// Takes the lock if no other process holds it in a way that excludes
    /// `mode`; whether it did.
    pub(crate) fn try_lock(&self, mode: Mode) -> io::Result<bool> {
        let taken = match mode {
            Mode::Exclusive => self.file.try_lock(),
            Mode::Shared => self.file.try_lock_shared(),
        };
        match taken {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(error)) => Err(error),
        }
    }

    /// Whether another process holds the lock now (taking and releasing
    /// it when free).
    pub(crate) fn is_held(&self, mode: Mode) -> io::Result<bool> {
        let taken = self.try_lock(mode)?;
        if taken {
            self.unlock();
        }
        Ok(!taken)
    }

    pub(crate) fn unlock(&self) {
        let _ = self.file.unlock();
    }

    /// Takes the lock, waiting until `deadline` at most; whether it did.
    /// The wait blocks a thread of its own, not the runtime's (see the
    /// module's documentation).
    pub(crate) async fn lock_until(&self, mode: Mode, deadline: Instant) -> io::Result<bool> {
        if self.try_lock(mode)? {
            return Ok(true);
        }
        // The same open file: the lock the waiter takes is this one's.
        let file = self.file.try_clone()?;
        let (taken, mut answer) = oneshot::channel();
        std::thread::Builder::new()
            .name("pgtest-waiter".to_owned())
            .spawn(move || {
                let locked = match mode {
                    Mode::Exclusive => file.lock(),
                    Mode::Shared => file.lock_shared(),
                };
                // Nobody waits any more (the deadline passed, or the test
                // gave up): let go at once.
                if let Err(Ok(())) = taken.send(locked) {
                    let _ = file.unlock();
                }
            })?;
        let answered =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), &mut answer).await;
        let locked = match answered {
            Ok(answered) => answered.ok(),
            // Past the deadline: taken if the waiter got it before the
            // answer closed; else it lets go when it does.
            Err(_) => {
                answer.close();
                answer.try_recv().ok()
            }
        };
        locked.map_or(Ok(false), |locked| locked.map(|()| true))
    }

    /// [`Self::lock_until`] for code that runs outside any runtime (the
    /// embedded server's start).
    pub(crate) fn lock_until_blocking(&self, mode: Mode, deadline: Instant) -> io::Result<bool> {
        let what = self.path.display().to_string();
        let taken = wait_until_blocking(deadline, &what, || self.look(mode))?;
        Ok(taken.is_ok())
    }

    /// One look at the lock while waiting for it.
    fn look(&self, mode: Mode) -> io::Result<Look<()>> {
        Ok(match self.try_lock(mode)? {
            true => Look::Ready(()),
            false => Look::Held(format!(
                "another process (`fuser {}` names it)",
                self.path.display()
            )),
        })
    }
}

/// Opens `path` for reading and writing, creating it (mode `mode`) if
/// missing; a symbolic link there is an error.
pub(crate) fn open_no_follow(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_held_lock_is_waited_for_until_the_deadline_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lock");
        let holder = LockFile::open(&path, 0o600).unwrap();
        assert!(holder.try_lock(Mode::Exclusive).unwrap());
        let waiter = LockFile::open(&path, 0o600).unwrap();
        assert!(waiter.is_held(Mode::Shared).unwrap());
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        assert!(!waiter.lock_until_blocking(Mode::Shared, deadline).unwrap());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        drop(holder);
        assert!(
            waiter
                .lock_until_blocking(Mode::Shared, Instant::now())
                .unwrap()
        );
    }

    #[test]
    fn in_a_runtime_a_lock_is_waited_for_until_let_go_or_the_deadline_and_a_late_waiter_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let holder = LockFile::open(&path, 0o600).unwrap();
        assert!(holder.try_lock(Mode::Exclusive).unwrap());

        // Held past the deadline: not taken, on time.
        let late = LockFile::open(&path, 0o600).unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        assert!(
            !runtime
                .block_on(late.lock_until(Mode::Exclusive, deadline))
                .unwrap()
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "{waited:?}"
        );

        // Let go mid-wait: taken, and held by the waiter's file.
        let waiter = LockFile::open(&path, 0o600).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let taken = runtime.block_on(async {
            let wait = waiter.lock_until(Mode::Exclusive, deadline);
            let let_go = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                holder.unlock();
            };
            tokio::join!(wait, let_go).0
        });
        assert!(taken.unwrap());
        let third = LockFile::open(&path, 0o600).unwrap();
        assert!(third.is_held(Mode::Shared).unwrap(), "the waiter holds it");

        // The waiter whose deadline passed took it once it was free, and
        // let go at once: a third process gets it.
        waiter.unlock();
        drop(late);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(
            third
                .lock_until_blocking(Mode::Exclusive, deadline)
                .unwrap()
        );
    }

    #[test]
    fn a_symbolic_link_is_not_a_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link.lock")).unwrap();
        assert!(LockFile::open(&dir.path().join("link.lock"), 0o600).is_err());
    }
}
