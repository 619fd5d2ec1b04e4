//! File locks, the one way pgtest's processes wait for each other: a lock
//! file opened without following symbolic links, taken at once or waited
//! for until a deadline by polling (see [`crate::wait`]), so that no thread
//! blocks in the kernel (a tokio runtime's, or one a timeout could not
//! end) and every wait ends on time. The operating system drops a lock
//! when its process dies, however it dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::OFlag;

use crate::wait::{Look, Pace, Wait, wait_until_blocking};

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
    pub(crate) async fn lock_until(&self, mode: Mode, deadline: Instant) -> io::Result<bool> {
        // A loop of its own: budgets wait here in futures the gate spawns
        // (see `Wait`).
        let what = self.path.display().to_string();
        let mut wait = Wait::until(deadline, &what, Pace::Local);
        loop {
            match self.look(mode)? {
                Look::Ready(()) => return Ok(true),
                Look::Held(holder) => {
                    if wait.pause(holder).await.is_err() {
                        return Ok(false);
                    }
                }
            }
        }
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
    fn a_symbolic_link_is_not_a_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link.lock")).unwrap();
        assert!(LockFile::open(&dir.path().join("link.lock"), 0o600).is_err());
    }
}
