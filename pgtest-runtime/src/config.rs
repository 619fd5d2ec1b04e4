//! Configuration: every environment variable pgtest reads, with the
//! `.env` file and `sqlx.toml` of the test's package and the defaults,
//! resolved once per test process (see [`crate::session`]). No other
//! module reads the environment.

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;

/// The variable that names pgtest's server, read before `DATABASE_URL`.
pub(crate) const URL_VAR: &str = "PGTEST_DATABASE_URL";
/// The variable sqlx users already set.
pub(crate) const FALLBACK_URL_VAR: &str = "DATABASE_URL";
/// How long to wait for a server to accept a connection, in seconds.
const CONNECT_TIMEOUT_VAR: &str = "PGTEST_CONNECT_TIMEOUT";
/// How long to wait for another process to build the shared database.
const BOOTSTRAP_TIMEOUT_VAR: &str = "PGTEST_BOOTSTRAP_TIMEOUT";
/// How long a test may wait for a connection of its own pool.
const ACQUIRE_TIMEOUT_VAR: &str = "PGTEST_ACQUIRE_TIMEOUT";
/// How long a pool whose connections are all in use hands out none before
/// it may open one more.
const GROW_AFTER_VAR: &str = "PGTEST_GROW_AFTER";
/// Seconds without a client after which the embedded server stops itself.
const IDLE_VAR: &str = "PGTEST_EMBEDDED_IDLE";
/// How long a test may wait for connection slots.
const BUDGET_TIMEOUT_VAR: &str = "PGTEST_BUDGET_TIMEOUT";
/// Overrides the number of connections the suite may use.
const MAX_CONNECTIONS_VAR: &str = "PGTEST_MAX_CONNECTIONS";
/// Whether runners on other machines share the server's budget through
/// the server (`on`, the default for a server given by URL) or this
/// machine budgets the server alone (`off`).
const SHARED_BUDGET_VAR: &str = "PGTEST_SHARED_BUDGET";
/// Caps the spare databases, all templates together.
const SPARES_VAR: &str = "PGTEST_SPARE_DATABASES";
/// How many databases of a template database mode makes before its tests
/// take turns on them.
const TEMPLATE_COPIES_VAR: &str = "PGTEST_TEMPLATE_COPIES";
/// Caps failed tests' databases kept for inspection.
const KEEP_FAILED_VAR: &str = "PGTEST_KEEP_FAILED";
/// The free disk space pgtest's copies made ahead leave, in MiB.
const MIN_FREE_DISK_VAR: &str = "PGTEST_MIN_FREE_DISK";
/// The user that runs the embedded server when pgtest runs as root.
const SERVER_USER_VAR: &str = "PGTEST_SERVER_USER";
/// Where pgtest keeps its state, overriding the default.
const HOME_VAR: &str = "PGTEST_HOME";
/// Where a user points pgtest at server binaries explicitly.
pub(crate) const BIN_VAR: &str = "PGTEST_PG_BIN";
/// Set in a helper's environment: which helper it is and its arguments.
pub(crate) const HELPER_VAR: &str = "PGTEST_HELPER";
/// What a helper keeps of the test process's environment: where programs
/// and libraries are, and the files and TLS settings a connection reads
/// (its password comes through its pipe).
const HELPER_KEEPS: [&str; 9] = [
    "PATH",
    "HOME",
    "LD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
];

/// What a process of the embedded server keeps of the test process's
/// environment: where programs and libraries are (relocatable builds) and
/// the locale, nothing else (`HOME` and `USER` are the server user's).
const SERVER_KEEPS: [&str; 13] = [
    "PATH",
    "LD_LIBRARY_PATH",
    "DYLD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_COLLATE",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
];

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_EMBEDDED_IDLE: Duration = Duration::from_secs(60);
const DEFAULT_BUDGET_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_GROW_AFTER: Duration = Duration::from_millis(10);
const DEFAULT_SPARES: u32 = 128;
const DEFAULT_KEEP_FAILED: u32 = 16;
pub(crate) const DEFAULT_MIN_FREE_DISK: u32 = 1024;

/// Where the server URL came from, so that messages name the right knob.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum UrlOrigin {
    /// A variable of the process environment.
    Env(String),
    /// A variable in a `.env` file.
    DotEnv(String, PathBuf),
}

impl fmt::Display for UrlOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "{var}"),
            Self::DotEnv(var, path) => write!(f, "{var} in {}", path.display()),
        }
    }
}

/// The value of `PGTEST_DATABASE_URL` that asks for the embedded server
/// even when `DATABASE_URL` names another.
pub(crate) const EMBEDDED: &str = "embedded";

/// Which server the tests use.
pub(crate) enum Target {
    /// A server at a URL. The URL may hold a password: never print it.
    Url { url: String, origin: UrlOrigin },
    /// The embedded server.
    Embedded,
}

/// The resolved configuration of one test process. It has no `Debug`, as a
/// URL may hold a password.
pub(crate) struct Config {
    pub(crate) target: Target,
    pub(crate) connect_timeout: Duration,
    pub(crate) bootstrap_timeout: Duration,
    /// How long the embedded server may sit without a client.
    pub(crate) embedded_idle: Duration,
    /// How long a test may wait for connection slots.
    pub(crate) budget_timeout: Duration,
    /// How long a test may wait for a connection of its own pool.
    pub(crate) acquire_timeout: Duration,
    /// How long a starved pool waits before it opens one more connection.
    pub(crate) grow_after: Duration,
    /// At most how many spare databases to keep, all templates together
    /// (0: none).
    pub(crate) spare_databases: u32,
    /// How many databases of a template this machine's tests make before
    /// they wait for one to be put back (at least 1).
    pub(crate) template_copies: u32,
    /// At most how many failed tests' databases to keep (0: none).
    pub(crate) keep_failed: u32,
    /// The free space, in MiB, a copy made ahead must leave on the disk of
    /// the server's data, where pgtest can see it.
    pub(crate) min_free_disk: u32,
    /// The connections the suite may use, when set rather than learned.
    pub(crate) max_connections: Option<u32>,
    /// Whether the budget is shared with other machines through the server
    /// (`PGTEST_SHARED_BUDGET`; see [`crate::share`]), for a server given by URL.
    pub(crate) shared_budget: bool,
    /// pgtest's home on this machine (see [`crate::state`]).
    pub(crate) home: PathBuf,
    /// Where to look for the embedded server's binaries.
    pub(crate) binaries: BinariesSearch,
    /// Who runs the embedded server when pgtest runs as root, when set.
    pub(crate) server_user: Option<String>,
    /// `PGPASSWORD`, which connections read when the URL has no password.
    pub(crate) env_password: Option<String>,
    /// Names the run this process belongs to.
    pub(crate) run_id: String,
}

/// Where the embedded server's binaries are looked for.
pub(crate) enum BinariesSearch {
    /// `PGTEST_PG_BIN`, and nowhere else.
    Dir(PathBuf),
    /// `pg_config` and the directories of this `PATH`, then the
    /// distribution's places.
    Path(OsString),
}

impl Config {
    /// Reads the configuration for a test of the package at `manifest_dir`.
    pub(crate) fn load(manifest_dir: &Path) -> Result<Self, Error> {
        let target = match server_url(manifest_dir, non_empty_var)? {
            Some((url, _)) if url.trim().eq_ignore_ascii_case(EMBEDDED) => Target::Embedded,
            Some((url, origin)) => Target::Url { url, origin },
            None => Target::Embedded,
        };
        let binaries = match env::var_os(BIN_VAR).filter(|dir| !dir.is_empty()) {
            Some(dir) => BinariesSearch::Dir(PathBuf::from(dir)),
            None => BinariesSearch::Path(env::var_os("PATH").unwrap_or_default()),
        };
        Ok(Self {
            target,
            connect_timeout: seconds(CONNECT_TIMEOUT_VAR, DEFAULT_CONNECT_TIMEOUT)?,
            bootstrap_timeout: seconds(BOOTSTRAP_TIMEOUT_VAR, DEFAULT_BOOTSTRAP_TIMEOUT)?,
            embedded_idle: seconds(IDLE_VAR, DEFAULT_EMBEDDED_IDLE)?,
            budget_timeout: seconds(BUDGET_TIMEOUT_VAR, DEFAULT_BUDGET_TIMEOUT)?,
            acquire_timeout: seconds(ACQUIRE_TIMEOUT_VAR, DEFAULT_ACQUIRE_TIMEOUT)?,
            grow_after: seconds(GROW_AFTER_VAR, DEFAULT_GROW_AFTER)?,
            spare_databases: count(SPARES_VAR, DEFAULT_SPARES)?,
            template_copies: count(TEMPLATE_COPIES_VAR, default_template_copies())?.max(1),
            keep_failed: count(KEEP_FAILED_VAR, DEFAULT_KEEP_FAILED)?,
            min_free_disk: count(MIN_FREE_DISK_VAR, DEFAULT_MIN_FREE_DISK)?,
            max_connections: connections(MAX_CONNECTIONS_VAR)?,
            shared_budget: switch(SHARED_BUDGET_VAR, true)?,
            home: home(),
            binaries,
            server_user: non_empty_var(SERVER_USER_VAR),
            env_password: env::var("PGPASSWORD").ok(),
            run_id: run_id(),
        })
    }
}

/// Three databases of a template per core of this machine: where the
/// server runs beside the tests (the embedded server, a local service or
/// container), more tests at once than that only queue for the cores, and
/// each copy is some 100 ms of the server's time they would wait for.
fn default_template_copies() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |cores| cores.get());
    u32::try_from(3 * cores).unwrap_or(u32::MAX)
}

/// The user's pgtest home: `PGTEST_HOME`, else `$XDG_CACHE_HOME/pgtest` or
/// `~/.cache/pgtest`. As root it is `/var/tmp/pgtest-root`, since the
/// embedded server runs as another user, who cannot enter `/root`; without
/// a home directory, `pgtest-<uid>` in the temporary directory.
fn home() -> PathBuf {
    if let Some(home) = env::var_os(HOME_VAR).filter(|home| !home.is_empty()) {
        return PathBuf::from(home);
    }
    let me = nix::unistd::Uid::effective();
    if me.is_root() {
        return PathBuf::from("/var/tmp/pgtest-root");
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache {
        Some(cache) => cache.join("pgtest"),
        None => env::temp_dir().join(format!("pgtest-{me}")),
    }
}

/// Names the run this process belongs to: nextest's run id; else, when
/// `cargo test` started it, that cargo process (its pid and start: every
/// test binary it runs is one run); else this process alone (a binary run
/// by hand, by an IDE or a script: each time a run of its own).
fn run_id() -> String {
    if let Ok(id) = env::var("NEXTEST_RUN_ID") {
        return id;
    }
    let parent = nix::unistd::getppid().as_raw();
    match crate::process::describe(parent) {
        Some(cargo) if cargo.name == "cargo" => format!("cargo-{parent}-{}", cargo.started),
        _ => format!(
            "process-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ),
    }
}

/// The helper's marker, when this process is a helper (see
/// [`crate::helpers`]).
pub(crate) fn helper_marker() -> Option<OsString> {
    env::var_os(HELPER_VAR)
}

/// The variables a helper keeps of this process's environment.
pub(crate) fn helper_environment() -> Vec<(&'static str, OsString)> {
    kept(&HELPER_KEEPS)
}

/// The variables a process of the embedded server keeps of this process's
/// environment.
pub(crate) fn server_environment() -> Vec<(&'static str, OsString)> {
    kept(&SERVER_KEEPS)
}

/// This user's home directory.
pub(crate) fn user_home() -> Option<OsString> {
    env::var_os("HOME")
}

fn kept(vars: &[&'static str]) -> Vec<(&'static str, OsString)> {
    vars.iter()
        .filter_map(|&var| Some((var, env::var_os(var)?)))
        .collect()
}

/// `PGTEST_DATABASE_URL`, else `DATABASE_URL`, else the variable that the
/// package's `sqlx.toml` names (`[common] database-url-var`, as sqlx 0.9's
/// macros and CLI read it), each first from the process environment, then
/// from the nearest `.env` file at or above `manifest_dir`.
///
/// The files are looked for only when needed: a process whose environment
/// names the server (as in CI) reads neither.
fn server_url(
    manifest_dir: &Path,
    env_var: impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, UrlOrigin)>, Error> {
    let mut dotenv = None;
    for var in [Some(URL_VAR), Some(FALLBACK_URL_VAR), None] {
        let var = match var {
            Some(var) => var.to_owned(),
            None => match sqlx_toml_value(manifest_dir, "common", "database-url-var")? {
                Some(named) => named,
                None => break,
            },
        };
        if let Some(url) = env_var(&var) {
            return Ok(Some((url, UrlOrigin::Env(var))));
        }
        if let Some(path) = dotenv.get_or_insert_with(|| find_dotenv(manifest_dir))
            && let Some(url) = dotenv_var(path, &var)?
        {
            return Ok(Some((url, UrlOrigin::DotEnv(var, path.clone()))));
        }
    }
    Ok(None)
}

/// The string `key` of `[section]` in the package's `sqlx.toml`, if the
/// file and the key are there.
pub(crate) fn sqlx_toml_value(
    manifest_dir: &Path,
    section: &str,
    key: &str,
) -> Result<Option<String>, Error> {
    let path = manifest_dir.join("sqlx.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let unreadable = |reason: String| Error::ConfigFile {
        path: path.clone(),
        reason,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| unreadable(e.message().to_owned()))?;
    match table.get(section).and_then(|table| table.get(key)) {
        None => Ok(None),
        Some(toml::Value::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(unreadable(format!("`[{section}] {key}` must be a string"))),
    }
}

fn non_empty_var(var: &str) -> Option<String> {
    env::var(var).ok().filter(|value| !value.trim().is_empty())
}

fn find_dotenv(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(".env"))
        .find(|path| path.is_file())
}

/// One variable of a `.env` file, read without touching the process
/// environment (setting variables is unsound while tests run on threads).
fn dotenv_var(path: &Path, var: &str) -> Result<Option<String>, Error> {
    let unreadable = |error: dotenvy::Error| Error::ConfigFile {
        path: path.to_owned(),
        reason: match error {
            // The line itself may hold a password: say where, not what.
            dotenvy::Error::LineParse(_, at) => {
                format!("a line cannot be parsed (at character {at})")
            }
            other => other.to_string(),
        },
    };
    let entries = dotenvy::from_path_iter(path).map_err(unreadable)?;
    for entry in entries {
        let (key, value) = entry.map_err(unreadable)?;
        if key == var && !value.trim().is_empty() {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn seconds(var: &'static str, default: Duration) -> Result<Duration, Error> {
    let Some(value) = non_empty_var(var) else {
        return Ok(default);
    };
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Ok(Duration::from_secs_f64(secs)),
        _ => Err(Error::InvalidSetting {
            var,
            value,
            expected: "a positive number of seconds",
        }),
    }
}

fn connections(var: &'static str) -> Result<Option<u32>, Error> {
    let Some(value) = non_empty_var(var) else {
        return Ok(None);
    };
    match value.trim().parse::<u32>() {
        Ok(capacity) if capacity >= 1 => Ok(Some(capacity)),
        _ => Err(Error::InvalidSetting {
            var,
            value,
            expected: "a whole number of connections, at least 1",
        }),
    }
}

fn switch(var: &'static str, default: bool) -> Result<bool, Error> {
    let Some(value) = non_empty_var(var) else {
        return Ok(default);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "on" | "1" | "true" | "yes" => Ok(true),
        "off" | "0" | "false" | "no" => Ok(false),
        _ => Err(Error::InvalidSetting {
            var,
            value,
            expected: "on or off",
        }),
    }
}

fn count(var: &'static str, default: u32) -> Result<u32, Error> {
    let Some(value) = non_empty_var(var) else {
        return Ok(default);
    };
    value.trim().parse().map_err(|_| Error::InvalidSetting {
        var,
        value,
        expected: "a whole number (0 for none)",
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |var| {
            pairs
                .iter()
                .find(|(key, _)| *key == var)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn pgtest_database_url_wins_over_database_url() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[
            ("DATABASE_URL", "postgres://b"),
            ("PGTEST_DATABASE_URL", "postgres://a"),
        ]);
        let (url, origin) = server_url(dir.path(), env).unwrap().unwrap();
        assert_eq!(
            (url.as_str(), origin),
            ("postgres://a", UrlOrigin::Env(URL_VAR.to_owned()))
        );
    }

    #[test]
    fn a_dotenv_file_above_the_package_is_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".env"),
            "OTHER=1\nDATABASE_URL=postgres://from-file/app\n",
        )
        .unwrap();
        let package = dir.path().join("crates/app");
        fs::create_dir_all(&package).unwrap();
        let (url, origin) = server_url(&package, env_of(&[])).unwrap().unwrap();
        assert_eq!(url, "postgres://from-file/app");
        assert_eq!(
            origin.to_string(),
            format!("DATABASE_URL in {}", dir.path().join(".env").display())
        );
    }

    #[test]
    fn the_environment_wins_over_the_dotenv_file_for_the_same_variable() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".env"),
            "PGTEST_DATABASE_URL=postgres://file\n",
        )
        .unwrap();
        let (url, _) = server_url(
            dir.path(),
            env_of(&[("PGTEST_DATABASE_URL", "postgres://env")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(url, "postgres://env");
    }

    #[test]
    fn pgtest_database_url_in_dotenv_wins_over_database_url_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".env"),
            "PGTEST_DATABASE_URL=postgres://file\n",
        )
        .unwrap();
        let (url, _) = server_url(dir.path(), env_of(&[("DATABASE_URL", "postgres://env")]))
            .unwrap()
            .unwrap();
        assert_eq!(url, "postgres://file");
    }

    #[test]
    fn the_variable_sqlx_toml_names_comes_after_database_url() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("sqlx.toml"),
            "[common]\ndatabase-url-var = \"APP_DATABASE_URL\"\n",
        )
        .unwrap();
        let named = env_of(&[("APP_DATABASE_URL", "postgres://named")]);
        let (url, origin) = server_url(dir.path(), named).unwrap().unwrap();
        assert_eq!(url, "postgres://named");
        assert_eq!(origin.to_string(), "APP_DATABASE_URL");
        let both = env_of(&[
            ("APP_DATABASE_URL", "postgres://named"),
            ("DATABASE_URL", "postgres://plain"),
        ]);
        let (url, _) = server_url(dir.path(), both).unwrap().unwrap();
        assert_eq!(url, "postgres://plain");
        fs::write(
            dir.path().join(".env"),
            "APP_DATABASE_URL=postgres://file\n",
        )
        .unwrap();
        let (url, _) = server_url(dir.path(), env_of(&[])).unwrap().unwrap();
        assert_eq!(url, "postgres://file");
    }

    #[test]
    fn nothing_configured_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(server_url(dir.path(), env_of(&[])).unwrap().is_none());
    }

    #[test]
    fn a_broken_dotenv_line_is_reported_without_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(".env"),
            "DATABASE_URL='postgres://u:s3cret@h/db\n",
        )
        .unwrap();
        let error = server_url(dir.path(), env_of(&[])).unwrap_err().to_string();
        assert!(
            error.contains("cannot read") && !error.contains("s3cret"),
            "{error}"
        );
    }
}
