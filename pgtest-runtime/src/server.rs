//! The server: how to reach it, and what its refusals mean.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Connection};

use crate::config::{Config, Target, URL_VAR, UrlOrigin};
use crate::error::{DISK_FULL, describe, sqlstate};
use crate::redact::redact_url;
use crate::state::StateDir;
use crate::{Error, catalog, embedded};

/// The database pgtest connects to for admin work when the URL names none.
const DEFAULT_ADMIN_DATABASE: &str = "postgres";
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

/// The password of a URL, decoded.
fn url_password(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let password = parsed.password()?;
    Some(
        percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned(),
    )
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
    /// The URL's password, for the spares helper (through its pipe). Never
    /// printed.
    password: Option<String>,
    admin_database: String,
    url: String,
    origin: String,
    /// What the server takes from non-superuser clients, when known without
    /// asking it (the embedded server's own settings).
    known_capacity: Option<u32>,
    /// Where its data is, when it is on this machine where pgtest can look
    /// (the embedded server's).
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) connect_timeout: Duration,
    pub(crate) bootstrap_timeout: Duration,
}

impl Server {
    /// The server `config` names; the embedded one (in `home`) is started
    /// if it is not running.
    pub(crate) fn new(config: &Config, home: &StateDir) -> Result<Self, Error> {
        let (options, password, url, origin, known_capacity, data_dir) = match &config.target {
            Target::Url { url, origin } => {
                let options = parse_url(url, origin)?;
                let password = url_password(url);
                (
                    options,
                    password,
                    redact_url(url),
                    origin.to_string(),
                    None,
                    None,
                )
            }
            Target::Embedded => {
                let embedded = embedded::ensure(
                    home,
                    &config.binaries,
                    config.server_user.as_deref(),
                    config.embedded_idle,
                )?;
                let capacity = Some(embedded.client_connections);
                (
                    embedded.options,
                    None,
                    embedded.description,
                    URL_VAR.to_owned(),
                    capacity,
                    Some(embedded.data_dir),
                )
            }
        };
        let admin_database = options
            .get_database()
            .unwrap_or(DEFAULT_ADMIN_DATABASE)
            .to_owned();
        Ok(Self {
            options,
            password,
            admin_database,
            url,
            origin,
            known_capacity,
            data_dir,
            connect_timeout: config.connect_timeout,
            bootstrap_timeout: config.bootstrap_timeout,
        })
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

    /// Asks the server for `max_connections` less
    /// `superuser_reserved_connections`.
    pub(crate) async fn max_client_connections(&self) -> Result<u32, Error> {
        let mut admin = self.connect(self.admin_database()).await?;
        let asked = catalog::client_connections(&mut admin).await;
        let _ = admin.close().await;
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

    /// How to connect to the admin database as pgtest's role, as the
    /// variables `psql` takes (the password, if any, in `PGPASSWORD`): what
    /// the spares helper is sent through its pipe.
    pub(crate) fn connection_vars(&self) -> Vec<(&'static str, String)> {
        let host = self.psql_host();
        let ssl_mode = match self.options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        };
        let mut env = vec![
            ("PGHOST", host),
            ("PGPORT", self.options.get_port().to_string()),
            ("PGUSER", self.user().to_owned()),
            ("PGDATABASE", self.admin_database.clone()),
            ("PGSSLMODE", ssl_mode.to_owned()),
            ("PGAPPNAME", "pgtest spares".to_owned()),
            ("PGCONNECT_TIMEOUT", "10".to_owned()),
        ];
        if let Some(password) = &self.password {
            env.push(("PGPASSWORD", password.clone()));
        }
        env
    }

    /// Options that connect to `database` on this server.
    pub(crate) fn options_for(&self, database: &str) -> PgConnectOptions {
        self.options.clone().database(database)
    }

    /// The database that admin work (locks, `CREATE DATABASE`) goes through:
    /// the one named in the URL, so that every process locks in the same one.
    pub(crate) fn admin_database(&self) -> &str {
        &self.admin_database
    }

    /// One connection to `database` for pgtest's own work. Each try is
    /// bounded by the connect timeout; a server that refuses for want of
    /// slots (53300) is retried with backoff until `REFUSED_RETRY` has passed.
    pub(crate) async fn connect(&self, database: &str) -> Result<PgConnection, Error> {
        let options = self
            .options_for(database)
            .application_name(ADMIN_APPLICATION_NAME)
            .disable_statement_logging();
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            match tokio::time::timeout(self.connect_timeout, PgConnection::connect_with(&options))
                .await
            {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(error)) if is_refused_for_slots(&error) => {
                    if started.elapsed() > REFUSED_RETRY {
                        return Err(self.too_many_clients(started.elapsed()).await);
                    }
                    tracing::debug!(database, "the server has no free connection; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Ok(Err(error)) => return Err(self.connect_error(error, database, None)),
                Err(_) => return Err(self.timeout_error()),
            }
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

    /// Explains a failed `CREATE DATABASE` of `database`.
    pub(crate) fn create_error(&self, database: &str, error: &sqlx::Error) -> Error {
        match sqlstate(error).as_deref() {
            Some("42501") => {}
            Some(DISK_FULL) => {
                return Error::DiskFull {
                    database: database.to_owned(),
                    url: self.url.clone(),
                    message: describe(error),
                };
            }
            _ => return self.query_error(format!("creating database {database}"), error),
        }
        self.privilege_error(
            "create databases",
            describe(error),
            format!(
                "Grant it as a superuser: ALTER ROLE \"{}\" CREATEDB",
                self.user()
            ),
        )
    }

    pub(crate) fn query_error(&self, action: impl Into<String>, error: &sqlx::Error) -> Error {
        Error::Query {
            action: action.into(),
            url: self.url.clone(),
            message: describe(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::url_password;

    #[test]
    fn a_urls_password_is_decoded_for_psql() {
        assert_eq!(
            url_password("postgres://app:p%40ss%3Aword@db:5432/app").as_deref(),
            Some("p@ss:word")
        );
        assert_eq!(url_password("postgres://app@db/app"), None);
    }
}
