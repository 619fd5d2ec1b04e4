//! The one error type. Each message says what happened and what to do, and
//! none shows a password: URLs are redacted before they get here.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::PgDatabaseError;

/// Why pgtest could not prepare a test.
///
/// The runner turns it into the test's panic message, prefixed with the
/// test's name. Every message names the next step; none contains a password.
///
/// ```
/// let error = pgtest_runtime::Error::NoBinaries {
///     searched: "PATH".to_owned(),
/// };
/// assert!(error.to_string().contains("PGTEST_DATABASE_URL"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PostgreSQL binaries for the embedded server.
    #[error(
        "no PostgreSQL server binaries for the embedded server (looked in: {searched}). Install \
         them (apt-get install postgresql, or brew install postgresql@17), set PGTEST_PG_BIN to \
         the directory that holds initdb, pg_ctl and postgres, or set PGTEST_DATABASE_URL to a \
         running server"
    )]
    NoBinaries {
        /// Where pgtest looked.
        searched: String,
    },

    /// Running as root with no usable user to run the embedded server as.
    #[error(
        "pgtest runs as root, which initdb and postgres refuse, so it runs the embedded server \
         as another user, but cannot use `{name}`: {problem}. Create a user of the server's own \
         (useradd --system --user-group --no-create-home postgres), name another with \
         PGTEST_SERVER_USER (one no other service runs as: not nobody), or set \
         PGTEST_DATABASE_URL to a running server"
    )]
    ServerUser {
        /// The user asked for.
        name: String,
        /// Why it cannot run the server.
        problem: String,
    },

    /// The embedded server failed.
    #[error(
        "the embedded PostgreSQL server in {} could not {action}: {reason}. {remedy}Remove that \
         directory to start afresh, or set PGTEST_DATABASE_URL to a running server. The server \
         log ends with:\n{log_tail}",
        dir.display()
    )]
    Embedded {
        /// What pgtest tried to do.
        action: String,
        /// What went wrong.
        reason: String,
        /// What to do first, as a sentence ending in ". ", or empty.
        remedy: String,
        /// The cluster's directory.
        dir: PathBuf,
        /// The last lines of the server's log.
        log_tail: String,
    },

    /// The server URL does not parse.
    #[error(
        "{origin} is not a usable PostgreSQL URL ({url}): {reason}. Write it as \
         postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )]
    InvalidUrl {
        /// Where the URL came from.
        origin: String,
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A `.env` or `sqlx.toml` file exists but cannot be read.
    #[error("cannot read {}: {reason}. Fix the file or remove it", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What went wrong, without the file's contents.
        reason: String,
    },

    /// A pgtest setting has a value it cannot use.
    #[error("{var}={value:?} is not valid: expected {expected}. Fix or unset {var}")]
    InvalidSetting {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },

    /// Nothing answers at the server's address.
    #[error(
        "cannot reach PostgreSQL at {url}: {reason}. Start the server, or point {origin} at one \
         that is running"
    )]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// Where the URL came from.
        origin: String,
        /// The operating system's words.
        reason: String,
    },

    /// The server did not accept a connection in time.
    #[error(
        "PostgreSQL at {url} did not accept a connection within {:.1} s. Check the host and port \
         in {origin}; set PGTEST_CONNECT_TIMEOUT (seconds) to wait longer",
        after.as_secs_f64()
    )]
    ConnectTimeout {
        /// The URL, redacted.
        url: String,
        /// Where the URL came from.
        origin: String,
        /// How long pgtest waited.
        after: Duration,
    },

    /// The server refused the login.
    #[error(
        "PostgreSQL at {url} refused the login of role \"{user}\": {message}. Check the user and \
         password in {origin}"
    )]
    AuthFailed {
        /// The URL, redacted.
        url: String,
        /// Where the URL came from.
        origin: String,
        /// The role that tried to log in.
        user: String,
        /// The server's words.
        message: String,
    },

    /// The role lacks a privilege pgtest needs.
    #[error(
        "role \"{user}\" may not {action} on {url}: {message}. {remedy}, or point {origin} at a \
         role that may"
    )]
    Privilege {
        /// The URL, redacted.
        url: String,
        /// Where the URL came from.
        origin: String,
        /// The role.
        user: String,
        /// What pgtest tried to do.
        action: &'static str,
        /// The server's words.
        message: String,
        /// How to grant what is missing.
        remedy: String,
    },

    /// The test asked for a role its connections cannot take.
    #[error(
        "the test's connections cannot act as role \"{role}\": {message}. Create the role (for \
         example in a migration) and grant it to the login role: GRANT \"{role}\" TO \"{user}\""
    )]
    Role {
        /// The role the test asked for.
        role: String,
        /// The login role.
        user: String,
        /// The server's words.
        message: String,
    },

    /// The migrations cannot be read.
    #[error("cannot read the migrations in {origin}: {reason}. Fix the migration files")]
    Migrations {
        /// The directory or migrator.
        origin: String,
        /// What went wrong.
        reason: String,
    },

    /// A migration failed while the shared database was built.
    #[error(
        "migration {version} ({description}) from {origin} failed while building the shared \
         database {database}: {message}. Fix the migration: the next run builds the database \
         again from scratch"
    )]
    MigrationFailed {
        /// The migration's version.
        version: i64,
        /// The migration's description.
        description: String,
        /// The directory or migrator.
        origin: String,
        /// The database being built.
        database: String,
        /// The server's words.
        message: String,
    },

    /// A database of a name pgtest would use exists, but the server does
    /// not say it is pgtest's: another role owns it, or it has no marker.
    #[error(
        "database {database} has a name pgtest would use, but {why}, so pgtest will neither use, \
         copy, claim nor drop it: a database is pgtest's only when its owner is the role pgtest \
         logs in as ({role}) and pgtest marked it. If you made it, drop or rename it; if you did \
         not, a role that may create databases on this server did: find out why, then drop it \
         as {owner} or a superuser: DROP DATABASE \"{database}\""
    )]
    ForeignDatabase {
        /// The database.
        database: String,
        /// Its owner.
        owner: String,
        /// The role pgtest logs in as.
        role: String,
        /// Why it is not pgtest's.
        why: String,
    },

    /// `psql` could not be run.
    #[error(
        "psql could not be run: {reason}. Install PostgreSQL's client (apt-get install \
         postgresql-client, or brew install libpq) or put its directory on PATH"
    )]
    Psql {
        /// Why.
        reason: String,
    },

    /// `cargo pgtest psql` was given a name it knows nothing of.
    #[error(
        "no failed test's kept database and no database of pgtest's is named {name}: \
         `cargo pgtest status` lists both"
    )]
    UnknownDatabase {
        /// The name given.
        name: String,
    },

    /// A template stayed in use while it was to be copied.
    #[error(
        "database {database} could not be made from {template}: other sessions stayed connected \
         to the template for {} s (a template is copied only while no one is in it): {sessions}. \
         End them (SELECT pg_terminate_backend(pid)), or find what keeps connecting there",
        waited.as_secs()
    )]
    TemplateInUse {
        /// The copy.
        database: String,
        /// The template.
        template: String,
        /// How long pgtest tried.
        waited: Duration,
        /// The sessions in it, one each.
        sessions: String,
    },

    /// Another process held the bootstrap lock for too long.
    #[error(
        "waited {:.0} s for another process to build the shared database {database} (the lock is \
         held by: {holders}). If that process hangs, stop it; set PGTEST_BOOTSTRAP_TIMEOUT \
         (seconds) to wait longer",
        after.as_secs_f64()
    )]
    BootstrapTimeout {
        /// The database being built.
        database: String,
        /// How long pgtest waited.
        after: Duration,
        /// Who holds the lock, from `pg_stat_activity`.
        holders: String,
    },

    /// A test asks for more connections than the whole budget.
    #[error(
        "the test's pool may open {needed} connections, but the suite may use only {capacity} on \
         this server. Lower the test's max_connections, raise the server's max_connections, or \
         set PGTEST_MAX_CONNECTIONS"
    )]
    BudgetTooSmall {
        /// Slots the test needs.
        needed: u32,
        /// Slots there are.
        capacity: u32,
    },

    /// Other tests held the connection slots for too long.
    #[error(
        "waited {:.0} s for {needed} of the {capacity} connection slots on this server; they are \
         held by: {holders}. If one of those hangs, stop it; set PGTEST_BUDGET_TIMEOUT (seconds) \
         to wait longer",
        after.as_secs_f64()
    )]
    BudgetTimeout {
        /// Slots the test needs.
        needed: u32,
        /// Slots there are.
        capacity: u32,
        /// How long pgtest waited.
        after: Duration,
        /// Who holds slots.
        holders: String,
    },

    /// The share keeper did not get this machine its share of the server
    /// in time.
    #[error(
        "waited {:.0} s for this machine's share of the server's connections, which pgtest \
         keeps with the other runners that use the server (see {log} for what the keeper \
         said): {why}. If other runners hold the whole server, wait for them or set \
         PGTEST_BUDGET_TIMEOUT (seconds) to wait longer; set PGTEST_SHARED_BUDGET=off to \
         budget this machine alone",
        after.as_secs_f64()
    )]
    ShareTimeout {
        /// How long pgtest waited.
        after: Duration,
        /// The keeper's log.
        log: String,
        /// What was seen: the keeper never started, or started and waits.
        why: String,
    },

    /// No database came free for `isolation = "database"` in time.
    #[error(
        "waited {:.0} s for a database of template {template}: no test put one back, and {holder}. \
         If one of those hangs, stop it (`fuser` on those files finds it); set \
         PGTEST_BUDGET_TIMEOUT (seconds) to wait longer",
        after.as_secs_f64()
    )]
    CopyTimeout {
        /// The template the test's database is a copy of.
        template: String,
        /// How long pgtest waited.
        after: Duration,
        /// Who held it up, and their lock files.
        holder: String,
    },

    /// The budget's lock files cannot be used.
    #[error("cannot use the connection budget's file {}: {reason}. Check pgtest's home (PGTEST_HOME)", path.display())]
    BudgetFiles {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// pgtest's home, or a directory in it, is not safe to use on a
    /// machine shared with other users.
    #[error(
        "pgtest will not use {}: {problem}. pgtest keeps its locks and the embedded server \
         there, and another user could make it overwrite or run what they put there. Remove \
         it if it is not yours, or set PGTEST_HOME to a directory of your own",
        path.display()
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// The server refused connections for want of slots until the deadline.
    #[error(
        "PostgreSQL at {url} refused connections (too many clients) for {:.0} s: it allows \
         {allowed}, held by: {holders}. Other clients share this server: stop them, raise \
         max_connections, or lower PGTEST_MAX_CONNECTIONS",
        after.as_secs_f64()
    )]
    TooManyClients {
        /// The URL, redacted.
        url: String,
        /// How long pgtest retried.
        after: Duration,
        /// What the server allows, if it could be asked.
        allowed: String,
        /// Connections by application name, if they could be listed.
        holders: String,
    },

    /// A seed or fixture script failed.
    #[error("script {path} failed: {message}. Fix the script")]
    Script {
        /// The script, as written in the attribute.
        path: &'static str,
        /// The server's words.
        message: String,
    },

    /// The server's disk filled up while pgtest made a database.
    #[error(
        "creating database {database} failed on {url}: the server's disk is full ({message}). \
         Free space on it: pgtest's own databases there are failed tests' kept ones (at most \
         PGTEST_KEEP_FAILED, dropped by the next run) and spares (at most PGTEST_SPARE_DATABASES; \
         set it lower)"
    )]
    DiskFull {
        /// The database pgtest was making.
        database: String,
        /// The URL, redacted.
        url: String,
        /// The server's words.
        message: String,
    },

    /// Any other query pgtest runs failed.
    #[error("{action} failed on {url}: {message}. The server's log may say more")]
    Query {
        /// What pgtest was doing.
        action: String,
        /// The URL, redacted.
        url: String,
        /// The server's words.
        message: String,
    },
}

impl Error {
    /// The error for `script` failing with the server's `message`.
    pub(crate) fn script(script: &pgtest_core::Script, message: String) -> Self {
        Self::Script {
            path: script.path,
            message,
        }
    }
}

/// A database error's message with its SQLSTATE, detail and hint; any other
/// error's own words. Server messages never contain the password.
pub(crate) fn describe(error: &sqlx::Error) -> String {
    let Some(db) = error.as_database_error() else {
        return error.to_string();
    };
    let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() else {
        return db.message().to_owned();
    };
    let mut text = format!("{} (SQLSTATE {})", pg.message(), pg.code());
    if let Some(detail) = pg.detail() {
        text.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = pg.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// The SQLSTATE of a full disk on the server.
pub(crate) const DISK_FULL: &str = "53100";

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()?
        .code()
        .map(|code| code.into_owned())
}
