//! Finding the PostgreSQL server binaries installed on the machine.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::boundary::{ServerUser, output_within};
use crate::Error;
use crate::config::{BIN_VAR, BinariesSearch};
use crate::lock::open_no_follow;
use crate::state::StateDir;

/// How long `postgres --version` may take before it is killed.
const VERSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A directory holding `initdb`, `pg_ctl` and `postgres`, and their major
/// version.
#[derive(Clone, Debug)]
pub(crate) struct Binaries {
    pub(crate) dir: PathBuf,
    pub(crate) major: u32,
}

impl Binaries {
    pub(crate) fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `PGTEST_PG_BIN` if set (and then nothing else), else `pg_config
/// --bindir`, `PATH`, and `/usr/lib/postgresql/*/bin`, newest major first.
/// `pg_config`'s answer is remembered in `cache_dir`, since running it
/// (a script on Debian) costs more than the rest of a hot start.
/// A version is asked of `postgres` as `user`, who runs the server.
pub(crate) fn find(
    home: &StateDir,
    search: &BinariesSearch,
    user: &ServerUser,
) -> Result<Binaries, Error> {
    let usable = |dir: &Path| usable(dir, user);
    let path = match search {
        BinariesSearch::Dir(dir) => {
            return usable(dir).ok_or_else(|| Error::NoBinaries {
                searched: format!("{BIN_VAR}={}", dir.display()),
            });
        }
        BinariesSearch::Path(path) => path,
    };
    pg_config_bindir(path, &home.pg_config_answer())
        .into_iter()
        .chain(env::split_paths(path))
        .find_map(|dir| usable(&dir))
        .or_else(|| newest_debian(user))
        .ok_or_else(|| Error::NoBinaries {
            searched: "pg_config --bindir, PATH, /usr/lib/postgresql/*/bin".to_owned(),
        })
}

/// What `pg_config --bindir` says, from the cache while the `pg_config`
/// found on `PATH` resolves to the same unchanged file and no PostgreSQL
/// version was added to or removed from `/usr/lib/postgresql`.
fn pg_config_bindir(path: &OsStr, cache: &Path) -> Option<PathBuf> {
    let pg_config = env::split_paths(path)
        .map(|dir| dir.join("pg_config"))
        .find(|candidate| candidate.is_file())?;
    let modified = |path: &Path| fs::metadata(path).and_then(|meta| meta.modified()).ok();
    let key = format!(
        "{} {:?} {:?}",
        fs::canonicalize(&pg_config)
            .unwrap_or_else(|_| pg_config.clone())
            .display(),
        modified(&pg_config),
        modified(Path::new("/usr/lib/postgresql")),
    );
    let cached = fs::read_to_string(cache).unwrap_or_default();
    if let Some((cached_key, bindir)) = cached.split_once('\n')
        && cached_key == key
    {
        return Some(PathBuf::from(bindir.trim_end()));
    }
    let output = Command::new(&pg_config).arg("--bindir").output().ok()?;
    let bindir = output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())?;
    let _ = open_no_follow(cache, 0o600).and_then(|mut file| {
        file.set_len(0)?;
        file.write_all(format!("{key}\n{bindir}\n").as_bytes())
    });
    Some(PathBuf::from(bindir))
}

/// The newest `/usr/lib/postgresql/<major>/bin` (Debian and Ubuntu, which
/// do not put the server binaries on `PATH`).
fn newest_debian(user: &ServerUser) -> Option<Binaries> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| usable(&entry.path().join("bin"), user))
        .max_by_key(|binaries| binaries.major)
}

/// The directory's binaries when it has all pgtest needs.
fn usable(dir: &Path, user: &ServerUser) -> Option<Binaries> {
    let complete = ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|name| dir.join(name).is_file());
    if !complete {
        return None;
    }
    Some(Binaries {
        dir: dir.to_owned(),
        major: major_version(dir, user)?,
    })
}

/// The major version, from a Debian-style path or from `postgres --version`
/// ("postgres (PostgreSQL) 15.18 (Debian ...)"), run as `user` like every
/// program of the directory.
fn major_version(dir: &Path, user: &ServerUser) -> Option<u32> {
    let from_path = dir
        .parent()
        .and_then(|versioned| versioned.file_name()?.to_str()?.parse().ok());
    if from_path.is_some() {
        return from_path;
    }
    let mut command = user.command(&dir.join("postgres"), Path::new("/"));
    command.arg("--version");
    let output = output_within(&mut command, VERSION_TIMEOUT).ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    version.split(['.', 'b', 'r']).next()?.parse().ok()
}
