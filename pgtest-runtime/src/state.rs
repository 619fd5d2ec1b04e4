//! pgtest's home on this machine: one directory per user, the same for all
//! of the user's processes (terminal, cron, ssh), where the connection
//! budget keeps its lock files and the embedded server its clusters.
//!
//! Another local user must not be able to own it, write into it or plant a
//! symbolic link in it: pgtest locks, writes and runs what is there. So the
//! home and every directory pgtest makes in it are checked each time they
//! are opened: a directory (not a link), owned by who should own it, that
//! no one else may write to, under a parent that others cannot write to or
//! that has the sticky bit (`/tmp`, `/var/tmp`). Files in them are opened
//! without following symbolic links.
//!
//! [`StateDir`] owns the home and hands out its directories; [`ServerDir`]
//! owns the directory of one server (its connection budget, its run locks,
//! its helper's queue) and hands out every path and lock in it, by
//! [`Entry`]: no other module names a file there.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::unistd::Uid;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::lock::{LockFile, Mode};

/// Write permission for the group or for others.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// The sticky bit: only a file's owner may remove or rename it.
const STICKY: u32 = 0o1000;

/// A directory of pgtest's, checked when opened (see the module's docs).
#[derive(Clone, Debug)]
pub(crate) struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// The user's home at `path` (see [`crate::config`]), made if missing:
    /// private, but as root others may pass through it (not list it) to
    /// reach the embedded server's cluster, which is theirs.
    pub(crate) fn home(path: &Path) -> Result<Self, Error> {
        let path = path.to_owned();
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|error| unusable(&path, &error.to_string()))?;
        }
        make_checked(&path, passable_mode(), Uid::effective())?;
        if Uid::effective().is_root() {
            // Made by an earlier version, or by hand: others must pass.
            let current = fs::metadata(&path).map_or(0, |metadata| metadata.mode());
            if current & 0o011 != 0o011 {
                fs::set_permissions(&path, fs::Permissions::from_mode(current | 0o011))
                    .map_err(|error| unusable(&path, &error.to_string()))?;
            }
        }
        Ok(Self { path })
    }

    /// The directory `name` in this one, made private if missing, owned by
    /// `owner` (this user, unless the directory is the server user's).
    fn dir(&self, name: &str, owner: Uid) -> Result<Self, Error> {
        let path = self.path.join(name);
        make_checked(&path, 0o700, owner)?;
        Ok(Self { path })
    }

    /// The directory `name` in this one, this user's, made if missing with
    /// [`passable_mode`].
    fn passable_dir(&self, name: &str) -> Result<Self, Error> {
        let path = self.path.join(name);
        make_checked(&path, passable_mode(), Uid::effective())?;
        Ok(Self { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the file `name` in this directory.
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory of the embedded server of PostgreSQL `major`,
    /// `embedded-pg<major>`, made if missing, with the server's own
    /// directory `server/` in it, owned by `server_user`, who runs the
    /// server. The first is this user's and holds its locks and logs: as
    /// root, the server's user may pass through it to `server/` but write
    /// nothing in it (see [`crate::embedded`]).
    pub(crate) fn make_cluster(&self, major: u32, server_user: Uid) -> Result<PathBuf, Error> {
        let cluster = self.passable_dir(&format!("embedded-pg{major}"))?;
        cluster.dir("server", server_user)?;
        Ok(cluster.path)
    }

    /// Where what `pg_config --bindir` said is remembered.
    pub(crate) fn pg_config_answer(&self) -> PathBuf {
        self.file("pg_config.cache")
    }

    /// The directory of the server at `address` in the home,
    /// `budget/<hash of the address>`: per user, since another user's
    /// locks may not be shared (the retry on refused connections covers
    /// what this cannot).
    pub(crate) fn server(&self, address: &str) -> Result<ServerDir, Error> {
        let hash = hex(&Sha256::digest(address.as_bytes())[..8]);
        let me = Uid::effective();
        let dir = self.dir("budget", me)?.dir(&hash, me)?;
        Ok(ServerDir { dir })
    }

    /// Where the migration hash of a directory whose files look like
    /// `stamp` is remembered.
    pub(crate) fn migrations_hash(&self, stamp: &str) -> Result<PathBuf, Error> {
        let key = hex(&Sha256::digest(stamp.as_bytes())[..16]);
        Ok(self.dir("migrations", Uid::effective())?.file(&key))
    }
}

/// How many tests of a machine copy a template for `isolation = "database"`
/// at once while others wait for a spare to be put back.
pub(crate) const COPIERS: u32 = 2;

/// What pgtest keeps in a server's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// A connection slot anyone may take.
    Slot(u32),
    /// Stands for the reserve's slots (see [`crate::budget`]).
    Reserve,
    /// Tests that wait to start queue on it.
    StartLine,
    /// Held shared by tests that wait to grow.
    Growers,
    /// Tests that wait to grow queue on it.
    GrowersLine,
    /// The server's capacity as last asked, and the lock of whoever asks.
    Capacity,
    CapacityLock,
    /// Held shared by every pgtest process while it lives.
    Clients,
    /// Held while a database of this name is built on this machine.
    Bootstrap(&'a str),
    /// Held shared by the processes of the run using this shared database.
    Run(&'a str),
    /// Held by the test whose own database this is.
    Live(&'a str),
    /// Marks this test database as its test's, passed.
    Passed(&'a str),
    /// Marks this test database as kept for inspection, its test failed;
    /// holds the test's name.
    Failed(&'a str),
    /// Held by the spares helper while it lives; its log.
    SparesHelper,
    SparesLog,
    /// Templates tests asked spares of; those the helper took.
    SparesWanted,
    SparesTaken,
    /// The helper's queue of jobs, a directory.
    Jobs,
    /// What a fresh copy of this template holds (see [`crate::recycle`]).
    Snapshot(&'a str),
    /// Lists this spare database, put back on this machine.
    Spare(&'a str),
    /// Held by a test that copies a template for `isolation = "database"`.
    Copier(u32),
    /// Held by the share keeper while it lives; held by it once the
    /// machine has its share of the server (see [`crate::share`]); its log.
    ShareKeeper,
    ShareReady,
    ShareLog,
    /// Held by the test process that starts the share keeper.
    ShareStarter,
}

impl Entry<'_> {
    fn name(self) -> String {
        match self {
            Self::Slot(index) => format!("slot-{index}"),
            Self::Reserve => "reserve.lock".to_owned(),
            Self::StartLine => "queue.lock".to_owned(),
            Self::Growers => "growers.lock".to_owned(),
            Self::GrowersLine => "growers-line.lock".to_owned(),
            Self::Capacity => "capacity".to_owned(),
            Self::CapacityLock => "capacity.lock".to_owned(),
            Self::Clients => "clients.lock".to_owned(),
            Self::Bootstrap(database) => format!("bootstrap-{database}.lock"),
            Self::Run(database) => format!("run-{database}.lock"),
            Self::Live(database) => format!("live-{database}.lock"),
            Self::Passed(database) => format!("live-{database}.passed"),
            Self::Failed(database) => format!("live-{database}.failed"),
            Self::SparesHelper => "pgtest-spares.lock".to_owned(),
            Self::SparesLog => "pgtest-spares.log".to_owned(),
            Self::SparesWanted => "spares.wanted".to_owned(),
            Self::SparesTaken => "spares.taken".to_owned(),
            Self::Jobs => "jobs".to_owned(),
            Self::Snapshot(template) => format!("snapshot-{template}"),
            Self::Spare(database) => format!("spare-{database}"),
            Self::Copier(index) => format!("copier-{index}.lock"),
            Self::ShareKeeper => "share-keeper.lock".to_owned(),
            Self::ShareReady => "share-ready.lock".to_owned(),
            Self::ShareLog => "share-keeper.log".to_owned(),
            Self::ShareStarter => "share-starter.lock".to_owned(),
        }
    }
}

/// The directory of one server in pgtest's home (see [`StateDir::server`]).
#[derive(Clone, Debug)]
pub(crate) struct ServerDir {
    dir: StateDir,
}

impl ServerDir {
    /// The directory at `path`, as a helper is told it; checked again.
    pub(crate) fn reopen(path: &Path) -> Result<Self, Error> {
        check(path, Uid::effective())?;
        Ok(Self {
            dir: StateDir {
                path: path.to_owned(),
            },
        })
    }

    /// The directory at `path`, unchecked, for unit tests of what never
    /// touches it.
    #[cfg(test)]
    pub(crate) fn unchecked(path: &Path) -> Self {
        Self {
            dir: StateDir {
                path: path.to_owned(),
            },
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where `entry` is.
    pub(crate) fn entry(&self, entry: Entry<'_>) -> PathBuf {
        self.dir.file(&entry.name())
    }

    /// The lock file of `entry`, opened (made if missing).
    pub(crate) fn lock(&self, entry: Entry<'_>) -> Result<LockFile, Error> {
        let path = self.entry(entry);
        LockFile::open(&path, 0o600).map_err(|error| files_error(&path, &error))
    }

    /// The lock of `entry`, taken in `mode`, waiting until `deadline` at
    /// most (see [`crate::lock`]); `None` when its holder kept it.
    pub(crate) async fn lock_until(
        &self,
        entry: Entry<'_>,
        mode: Mode,
        deadline: std::time::Instant,
    ) -> Result<Option<LockFile>, Error> {
        let lock = self.lock(entry)?;
        match lock.lock_until(mode, deadline).await {
            Ok(true) => Ok(Some(lock)),
            Ok(false) => Ok(None),
            Err(error) => Err(self.error(entry, &error)),
        }
    }

    /// The directory of the helper's queue of jobs, made if missing.
    pub(crate) fn queue(&self) -> Result<PathBuf, Error> {
        let dir = self.dir.dir(&Entry::Jobs.name(), Uid::effective())?;
        Ok(dir.path().to_owned())
    }

    /// One of the [`COPIERS`] locks of tests that copy a template, taken,
    /// if one is free.
    pub(crate) fn try_copier(&self) -> Result<Option<LockFile>, Error> {
        for index in 0..COPIERS {
            let lock = self.lock(Entry::Copier(index))?;
            if lock
                .try_lock(Mode::Exclusive)
                .map_err(|error| self.error(Entry::Copier(index), &error))?
            {
                return Ok(Some(lock));
            }
        }
        Ok(None)
    }

    /// The error for a file of this directory that could not be used.
    pub(crate) fn error(&self, entry: Entry<'_>, error: &io::Error) -> Error {
        files_error(&self.entry(entry), error)
    }
}

pub(crate) fn files_error(path: &Path, error: &io::Error) -> Error {
    Error::BudgetFiles {
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A private directory's mode: 0700, and 0711 as root, so that the
/// embedded server's user can pass through it to its own directory.
fn passable_mode() -> u32 {
    match Uid::effective().is_root() {
        true => 0o711,
        false => 0o700,
    }
}

/// Opens `path` for appending, creating it (mode 0600) if missing; a
/// symbolic link there is an error.
pub(crate) fn append_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Makes the directory `path` (mode `mode`) unless it exists, and checks
/// it either way. Processes and threads make it side by side: `mkdir`
/// makes it once, and whoever finds it still this user's while it should
/// be `owner`'s (made by another, not yet given away) gives it away.
fn make_checked(path: &Path, mode: u32, owner: Uid) -> Result<(), Error> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        // The umask may have taken bits away; none may be added.
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|error| unusable(path, &error.to_string()))?,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(unusable(path, &error.to_string())),
    }
    if owner != Uid::effective() {
        let mine = fs::symlink_metadata(path)
            .is_ok_and(|metadata| metadata.is_dir() && metadata.uid() == Uid::effective().as_raw());
        if mine {
            std::os::unix::fs::chown(path, Some(owner.as_raw()), None)
                .map_err(|error| unusable(path, &error.to_string()))?;
        }
    }
    check(path, owner)
}

/// Refuses a directory that another user owns or may write to, or whose
/// parent lets another user replace it.
fn check(path: &Path, owner: Uid) -> Result<(), Error> {
    let metadata =
        fs::symlink_metadata(path).map_err(|error| unusable(path, &error.to_string()))?;
    if metadata.file_type().is_symlink() {
        return Err(unsafe_dir(path, "it is a symbolic link".to_owned()));
    }
    if !metadata.is_dir() {
        return Err(unsafe_dir(path, "it is not a directory".to_owned()));
    }
    if metadata.uid() != owner.as_raw() {
        return Err(unsafe_dir(
            path,
            format!(
                "it is owned by {}, not by {}",
                user_name(metadata.uid()),
                user_name(owner.as_raw())
            ),
        ));
    }
    if metadata.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(unsafe_dir(
            path,
            format!(
                "others may write to it (mode {:o})",
                metadata.mode() & 0o7777
            ),
        ));
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent_mode = fs::metadata(parent)
        .map_err(|error| unusable(parent, &error.to_string()))?
        .mode();
    if parent_mode & WRITABLE_BY_OTHERS != 0 && parent_mode & STICKY == 0 {
        return Err(unsafe_dir(
            path,
            format!(
                "others may write to {} (mode {:o}, without the sticky bit), so they could replace it",
                parent.display(),
                parent_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn unsafe_dir(path: &Path, problem: String) -> Error {
    Error::UnsafeDirectory {
        path: path.to_owned(),
        problem,
    }
}

fn unusable(path: &Path, reason: &str) -> Error {
    Error::UnsafeDirectory {
        path: path.to_owned(),
        problem: format!("it cannot be made or read: {reason}"),
    }
}
