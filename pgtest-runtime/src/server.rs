//! The server: how to reach it, and what its refusals mean.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::config::{Config, Target, URL_VAR, UrlOrigin};
use crate::error::{describe, sqlstate};
use crate::redact::redact_url;
use crate::state::StateDir;
use crate::wait::{Look, Pace, wait_until};
use crate::{Error, catalog, embedded};

/// The database pgtest connects to for admin work when the URL names none.
const DEFAULT_ADMIN_DATABASE: &str = "postgres";
/// The database where pgtest's admin connections go and its advisory
/// locks live, the same on every server whatever database a URL names, so
/// that builders whose URLs differ take the same locks. Not `template1`,
/// which copies would find in use.
pub(crate) const LOCK_DATABASE: &str = "pgtest_locks";
/// The line of the spares helper's credentials that holds the URL.
const HELPER_URL_KEY: &str = "PGTEST_URL";
/// The `application_name` of pgtest's own connections.
pub(crate) const ADMIN_APPLICATION_NAME: &str = "pgtest bootstrap";

/// Connect options from a URL, which must be a `postgres://` one.
fn parse_url(url: &str, origin: &UrlOrigin) -> Result<PgConnectOptions, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        origin: origin.to_string(),
        url: redact_url(url),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(format!(
            "the scheme is {:?}, and pgtest needs postgres:// or postgresql://",
            parsed.scheme()
        )));
    }
    PgConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))
}

/// Whether this user may run `program` without running what another user
/// put there: a file, and every directory above it, owned by root or this
/// user and writable by no one else (but a sticky one, `/tmp`), no link on
/// the way (the embedded server's binaries may be the server user's,
/// which root must not run).
fn safe_to_run(program: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::Uid::effective().as_raw();
    let trusted = |path: &std::path::Path, sticky_ok: bool| {
        std::fs::symlink_metadata(path).is_ok_and(|meta| {
            let owner = meta.uid() == 0 || meta.uid() == me;
            let writable = meta.mode() & 0o022 != 0 && !(sticky_ok && meta.mode() & 0o1000 != 0);
            owner && !writable && !meta.file_type().is_symlink()
        })
    };
    program.is_absolute()
        && program.is_file()
        && trusted(program, false)
        && program.ancestors().skip(1).all(|dir| trusted(dir, true))
}

/// How long a server that refuses connections for want of slots is retried.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// Whether the server refused a connection for want of slots (SQLSTATE
/// 53300, "too many clients" or "remaining connection slots are
/// reserved"), or because it is starting or stopping (57P03).
pub(crate) fn is_refused_for_slots(error: &sqlx::Error) -> bool {
    matches!(sqlstate(error).as_deref(), Some("53300" | "57P03"))
}

/// A PostgreSQL server and the role pgtest logs in as. Holds the password:
/// it has no `Debug`, and only its redacted URL is ever shown.
#[derive(Clone)]
pub(crate) struct Server {
    options: PgConnectOptions,
    /// The URL as given, password and all, and `PGPASSWORD`, for the spares
    /// helper (through its pipe), which connects as the tests do. Never
    /// printed.
    secret_url: Option<String>,
    env_password: Option<String>,
    admin_database: String,
    url: String,
    origin: String,
    /// What the server takes from non-superuser clients, when known without
    /// asking it (the embedded server's own settings).
    known_capacity: Option<u32>,
    /// Where its data is, when it is on this machine where pgtest can look
    /// (the embedded server's).
    pub(crate) data_dir: Option<PathBuf>,
    /// The `psql` beside the embedded server's binaries, else on `PATH`.
    psql_program: PathBuf,
    /// Whether this process started the embedded server.
    pub(crate) started_embedded: bool,
    /// The embedded server's cluster directory and binaries, for its
    /// watchdog.
    pub(crate) embedded_cluster: Option<(PathBuf, PathBuf)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) bootstrap_timeout: Duration,
}

impl Server {
    /// The server `config` names; the embedded one (in `home`) is started
    /// if it is not running.
    pub(crate) fn new(config: &Config, home: &StateDir) -> Result<Self, Error> {
        let (options, secret_url, url, origin, embedded) = match &config.target {
            Target::Url { url, origin } => (
                parse_url(url, origin)?,
                Some(url.clone()),
                redact_url(url),
                origin.to_string(),
                None,
            ),
            Target::Embedded => {
                let embedded =
                    embedded::ensure(home, &config.binaries, config.server_user.as_deref())?;
                (
                    embedded.options.clone(),
                    None,
                    embedded.description.clone(),
                    URL_VAR.to_owned(),
                    Some(embedded),
                )
            }
        };
        let admin_database = options
            .get_database()
            .unwrap_or(DEFAULT_ADMIN_DATABASE)
            .to_owned();
        Ok(Self {
            options,
            secret_url,
            env_password: config.env_password.clone(),
            admin_database,
            url,
            origin,
            known_capacity: embedded
                .as_ref()
                .map(|embedded| embedded.client_connections),
            data_dir: embedded.as_ref().map(|embedded| embedded.data_dir.clone()),
            psql_program: embedded
                .as_ref()
                .map(|embedded| embedded.bin.join("psql"))
                .filter(|psql| safe_to_run(psql))
                .unwrap_or_else(|| PathBuf::from("psql")),
            embedded_cluster: embedded
                .as_ref()
                .map(|embedded| (embedded.data_dir.clone(), embedded.bin.clone())),
            started_embedded: embedded.is_some_and(|embedded| embedded.started),
            connect_timeout: config.connect_timeout,
            bootstrap_timeout: config.bootstrap_timeout,
        })
    }

    /// How the server was chosen: the variable (and file) of its URL, or
    /// the embedded server's.
    pub(crate) fn origin(&self) -> &str {
        &self.origin
    }

    /// `psql` on `database` as pgtest's role, with the password, if any,
    /// in its environment (never on its command line, which `ps` shows).
    pub(crate) fn psql(&self, database: &str) -> std::process::Command {
        let mut command = std::process::Command::new(&self.psql_program);
        command
            .arg("-h")
            .arg(self.psql_host())
            .args([
                "-p",
                &self.options.get_port().to_string(),
                "-U",
                self.user(),
            ])
            .arg(database);
        let password = self
            .secret_url
            .as_deref()
            .and_then(|url| url::Url::parse(url).ok())
            .and_then(|url| {
                let password = url.password()?;
                Some(
                    percent_encoding::percent_decode_str(password)
                        .decode_utf8_lossy()
                        .into_owned(),
                )
            })
            .or_else(|| self.env_password.clone());
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        command
    }

    /// The redacted URL, for messages.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The role pgtest logs in as.
    pub(crate) fn user(&self) -> &str {
        self.options.get_username()
    }

    /// Where the server is (host and port, or socket), without the role.
    pub(crate) fn address(&self) -> String {
        match self.options.get_socket() {
            Some(socket) => format!("{}:{}", socket.display(), self.options.get_port()),
            None => format!("{}:{}", self.options.get_host(), self.options.get_port()),
        }
    }

    /// The connections the server takes from non-superuser clients, when
    /// known without asking it.
    pub(crate) fn known_capacity(&self) -> Option<u32> {
        self.known_capacity
    }

    /// Asks the server, over the admin connection `admin`, for
    /// `max_connections` less `superuser_reserved_connections`.
    pub(crate) async fn max_client_connections(
        &self,
        admin: &mut PgConnection,
    ) -> Result<u32, Error> {
        let asked = catalog::client_connections(admin).await;
        let connections =
            asked.map_err(|error| self.query_error("reading max_connections", &error))?;
        Ok(u32::try_from(connections).unwrap_or(1).max(1))
    }

    /// A `psql` command that opens `database` as pgtest's role; it asks for
    /// the password rather than showing it.
    pub(crate) fn psql_command(&self, database: &str) -> String {
        let host = self.psql_host();
        format!(
            "psql -h '{host}' -p {} -U '{}' '{database}'",
            self.options.get_port(),
            self.user()
        )
    }

    /// The host as `psql -h` takes it: a socket's directory, or a name.
    fn psql_host(&self) -> String {
        match self.options.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => self.options.get_host().to_owned(),
        }
    }

    /// What the spares helper is sent through its pipe to connect as the
    /// tests do: `KEY=VALUE` lines, the URL as given (`PGTEST_URL`) or the
    /// embedded server's socket and role, and `PGPASSWORD` when set (the
    /// helper keeps `PGPASSFILE` and the `PGSSL…` variables in its
    /// environment: see [`crate::config`]).
    pub(crate) fn helper_credentials(&self) -> Vec<(&'static str, String)> {
        let mut lines = match &self.secret_url {
            Some(url) => vec![(HELPER_URL_KEY, url.clone())],
            None => vec![
                ("PGHOST", self.psql_host()),
                ("PGPORT", self.options.get_port().to_string()),
                ("PGUSER", self.user().to_owned()),
            ],
        };
        if let Some(password) = &self.env_password {
            lines.push(("PGPASSWORD", password.clone()));
        }
        lines
    }

    /// The options of the spares helper's admin connection, from the
    /// lines of [`Self::helper_credentials`]: as the tests connect, to the
    /// lock database, with the search path of an admin connection.
    pub(crate) fn helper_options(lines: &str) -> Result<PgConnectOptions, String> {
        let value = |key: &str| {
            lines
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        };
        let options = match value(HELPER_URL_KEY) {
            Some(url) => {
                let has_password = url::Url::parse(url).is_ok_and(|url| url.password().is_some());
                let options = PgConnectOptions::from_str(url)
                    .map_err(|_| "the URL it was given does not parse".to_owned())?;
                match value("PGPASSWORD") {
                    Some(password) if !has_password => options.password(password),
                    _ => options,
                }
            }
            None => PgConnectOptions::new_without_pgpass()
                .socket(value("PGHOST").unwrap_or_default())
                .port(
                    value("PGPORT")
                        .and_then(|port| port.parse().ok())
                        .unwrap_or(5432),
                )
                .username(value("PGUSER").unwrap_or_default()),
        };
        Ok(options
            .database(LOCK_DATABASE)
            .application_name("pgtest spares")
            .options([("search_path", "pg_catalog,pg_temp")]))
    }

    /// Options that connect to `database` on this server.
    pub(crate) fn options_for(&self, database: &str) -> PgConnectOptions {
        self.options.clone().database(database)
    }

    /// A connection to `database` for pgtest's own work (see
    /// `registry::connect_admin`), with a search path of `pg_catalog`
    /// alone (given at connect, it overrides what the database's owner
    /// set), so that what pgtest runs there means what it says. The
    /// server's refusals are the inner error, for the caller to explain.
    pub(crate) async fn open_admin(
        &self,
        database: &str,
    ) -> Result<Result<PgConnection, sqlx::Error>, Error> {
        self.open(&self.admin_options(database), database).await
    }

    /// The database pgtest connects to when its lock database is missing
    /// (the URL's, else `postgres`).
    pub(crate) fn admin_database(&self) -> &str {
        &self.admin_database
    }

    /// How pgtest's own connections to `database` connect.
    fn admin_options(&self, database: &str) -> PgConnectOptions {
        self.options_for(database)
            .application_name(ADMIN_APPLICATION_NAME)
            .options([("search_path", "pg_catalog,pg_temp")])
            .disable_statement_logging()
    }

    /// One connection to `database` for pgtest's own work in it (building,
    /// putting back).
    pub(crate) async fn connect(&self, database: &str) -> Result<PgConnection, Error> {
        let options = self
            .options_for(database)
            .application_name(ADMIN_APPLICATION_NAME)
            .disable_statement_logging();
        match self.open(&options, database).await? {
            Ok(connection) => Ok(connection),
            Err(error) => Err(self.connect_error(error, database, None)),
        }
    }

    /// One connection with `options`. Each try is bounded by the connect
    /// timeout; a server that refuses for want of slots (53300) is retried
    /// with backoff until `REFUSED_RETRY` has passed. The server's other
    /// refusals are the inner error, for the caller to explain.
    async fn open(
        &self,
        options: &PgConnectOptions,
        database: &str,
    ) -> Result<Result<PgConnection, sqlx::Error>, Error> {
        let deadline = Instant::now() + REFUSED_RETRY;
        let opened = wait_until(deadline, "a free connection", Pace::Server, async || {
            let connection = PgConnection::connect_with(options);
            match tokio::time::timeout(self.connect_timeout, connection).await {
                Ok(Ok(connection)) => Ok(Look::Ready(Ok(connection))),
                Ok(Err(error)) if is_refused_for_slots(&error) => {
                    tracing::debug!(database, "the server has no free connection; retrying");
                    Ok(Look::Held("other clients of the server".to_owned()))
                }
                Ok(Err(error)) => Ok(Look::Ready(Err(error))),
                Err(_) => Err(self.timeout_error()),
            }
        })
        .await?;
        match opened {
            Ok(connection) => Ok(connection),
            // Who holds the server's connections, as the error says.
            Err(expired) => Err(self.too_many_clients(expired.after).await),
        }
    }

    /// The error for a server that kept refusing connections: what it
    /// allows and who holds its connections, when it can still be asked.
    pub(crate) async fn too_many_clients(&self, after: Duration) -> Error {
        let options = self
            .options_for(&self.admin_database)
            .application_name(ADMIN_APPLICATION_NAME)
            .disable_statement_logging();
        let asked = async {
            let mut connection = PgConnection::connect_with(&options).await?;
            let (allowed, holders) = catalog::sessions(&mut connection).await?;
            let _ = connection.close().await;
            Ok::<_, sqlx::Error>((allowed, holders.join(", ")))
        };
        let (allowed, holders) = match tokio::time::timeout(self.connect_timeout, asked).await {
            Ok(Ok((allowed, holders))) => (format!("{allowed} connections"), holders),
            _ => (
                "an unknown number of connections".to_owned(),
                "unknown (the server refused this question too)".to_owned(),
            ),
        };
        Error::TooManyClients {
            url: self.url.clone(),
            after,
            allowed,
            holders,
        }
    }

    pub(crate) fn timeout_error(&self) -> Error {
        Error::ConnectTimeout {
            url: self.url.clone(),
            origin: self.origin.clone(),
            after: self.connect_timeout,
        }
    }

    /// Explains a failed connection to `database`, made as `role` when the
    /// test asked for one.
    pub(crate) fn connect_error(
        &self,
        error: sqlx::Error,
        database: &str,
        role: Option<&str>,
    ) -> Error {
        let message = describe(&error);
        if let Some(role) = role.filter(|role| message.contains(&format!("\"{role}\""))) {
            return Error::Role {
                role: role.to_owned(),
                user: self.user().to_owned(),
                message,
            };
        }
        match (&error, sqlstate(&error).as_deref()) {
            (sqlx::Error::Io(io), _) => Error::Unreachable {
                url: self.url.clone(),
                origin: self.origin.clone(),
                reason: io.to_string(),
            },
            (sqlx::Error::PoolTimedOut, _) => self.timeout_error(),
            (_, Some("28P01" | "28000")) => Error::AuthFailed {
                url: self.url.clone(),
                origin: self.origin.clone(),
                user: self.user().to_owned(),
                message,
            },
            (_, Some("42501")) => self.privilege_error(
                "connect to this database",
                message,
                format!(
                    "Grant it as a superuser: GRANT CONNECT ON DATABASE \"{database}\" TO \"{}\"",
                    self.user()
                ),
            ),
            _ => self.query_error(format!("connecting to database {database}"), &error),
        }
    }

    pub(crate) fn privilege_error(
        &self,
        action: &'static str,
        message: String,
        remedy: String,
    ) -> Error {
        Error::Privilege {
            url: self.url.clone(),
            origin: self.origin.clone(),
            user: self.user().to_owned(),
            action,
            message,
            remedy,
        }
    }

    pub(crate) fn query_error(&self, action: impl Into<String>, error: &sqlx::Error) -> Error {
        Error::Query {
            action: action.into(),
            url: self.url.clone(),
            message: describe(error),
        }
    }
}
