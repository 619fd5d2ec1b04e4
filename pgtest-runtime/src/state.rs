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

use std::env;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::unistd::Uid;

use crate::Error;

/// Where pgtest keeps its state, overriding the default.
pub(crate) const HOME_VAR: &str = "PGTEST_HOME";

/// Write permission for the group or for others.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// The sticky bit: only a file's owner may remove or rename it.
const STICKY: u32 = 0o1000;

/// The user's pgtest home: `PGTEST_HOME`, else `$XDG_CACHE_HOME/pgtest` or
/// `~/.cache/pgtest`. As root it is `/var/tmp/pgtest-root`, since the
/// embedded server runs as another user, who cannot enter `/root`; without
/// a home directory, `pgtest-<uid>` in the temporary directory.
pub(crate) fn home() -> PathBuf {
    if let Some(home) = env::var_os(HOME_VAR).filter(|home| !home.is_empty()) {
        return PathBuf::from(home);
    }
    if Uid::effective().is_root() {
        return PathBuf::from("/var/tmp/pgtest-root");
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache {
        Some(cache) => cache.join("pgtest"),
        None => env::temp_dir().join(format!("pgtest-{}", Uid::effective())),
    }
}

/// A directory of pgtest's, checked when opened (see the module's docs).
#[derive(Clone, Debug)]
pub(crate) struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// The user's home (see [`home`]), made if missing: private, but as
    /// root others may pass through it (not list it) to reach the embedded
    /// server's cluster, which is theirs.
    pub(crate) fn home() -> Result<Self, Error> {
        let path = home();
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|error| unusable(&path, &error.to_string()))?;
        }
        let mode = match Uid::effective().is_root() {
            true => 0o711,
            false => 0o700,
        };
        make_checked(&path, mode, Uid::effective())?;
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
    pub(crate) fn dir(&self, name: &str, owner: Uid) -> Result<Self, Error> {
        let path = self.path.join(name);
        make_checked(&path, 0o700, owner)?;
        Ok(Self { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the file `name` in this directory.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
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
