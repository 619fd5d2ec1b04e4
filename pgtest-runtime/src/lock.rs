//! File locks, the one way pgtest's processes wait for each other: a lock
//! file opened without following symbolic links, taken at once or waited
//! for until a deadline by polling with growing pauses, so that no thread
//! blocks in the kernel (a tokio runtime's, or one a timeout could not
//! end) and every wait ends on time. The operating system drops a lock
//! when its process dies, however it dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::OFlag;

/// The first pause between two looks at a lock held by another process.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause between two looks.
const MAX_PAUSE: Duration = Duration::from_millis(20);

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
        let mut pauses = Pauses::new();
        loop {
            match self.look(mode, deadline, &mut pauses)? {
                Look::Wait(pause) => tokio::time::sleep(pause).await,
                Look::Done(taken) => return Ok(taken),
            }
        }
    }

    /// [`Self::lock_until`] for code that runs outside any runtime (the
    /// embedded server's start).
    pub(crate) fn lock_until_blocking(&self, mode: Mode, deadline: Instant) -> io::Result<bool> {
        let mut pauses = Pauses::new();
        loop {
            match self.look(mode, deadline, &mut pauses)? {
                Look::Wait(pause) => std::thread::sleep(pause),
                Look::Done(taken) => return Ok(taken),
            }
        }
    }

    /// One look at the lock while waiting for it.
    fn look(&self, mode: Mode, deadline: Instant, pauses: &mut Pauses) -> io::Result<Look> {
        if self.try_lock(mode)? {
            return Ok(Look::Done(true));
        }
        if Instant::now() >= deadline {
            return Ok(Look::Done(false));
        }
        Ok(Look::Wait(pauses.next_until(deadline)))
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

/// What one look at a lock found.
enum Look {
    /// Taken, or not by the deadline.
    Done(bool),
    /// Held: look again after this pause.
    Wait(Duration),
}

/// Pauses that double from 1 ms to 20 ms, each give or take a quarter, so
/// that processes waiting for the same thing spread out.
pub(crate) struct Pauses {
    pause: Duration,
}

impl Pauses {
    pub(crate) fn new() -> Self {
        Self { pause: FIRST_PAUSE }
    }

    /// The next pause, ending by `deadline`.
    pub(crate) fn next_until(&mut self, deadline: Instant) -> Duration {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let spread = self.pause / 2;
        let pause = self.pause - self.pause / 4 + spread.mul_f64(f64::from(nanos % 1000) / 1000.0);
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        pause.min(deadline.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
