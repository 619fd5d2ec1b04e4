//! The server: how to reach it, and what its refusals mean.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::Error;
use crate::config::{Config, Target, URL_VAR, UrlOrigin};
use crate::embedded;
use crate::error::{describe, sqlstate};
use crate::redact::redact_url;

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

/// A PostgreSQL server and the role pgtest logs in as. Holds the password:
/// it has no `Debug`, and only its redacted URL is ever shown.
pub(crate) struct Server {
    options: PgConnectOptions,
    admin_database: String,
    url: String,
    origin: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) bootstrap_timeout: Duration,
}

impl Server {
    pub(crate) fn new(config: Config) -> Result<Self, Error> {
        let (options, url, origin) = match config.target {
            Target::Url { url, origin } => {
                let options = parse_url(&url, &origin)?;
                (options, redact_url(&url), origin.to_string())
            }
            Target::Embedded => {
                let embedded = embedded::ensure(config.embedded_idle)?;
                (embedded.options, embedded.description, URL_VAR.to_owned())
            }
        };
        let admin_database = options
            .get_database()
            .unwrap_or(DEFAULT_ADMIN_DATABASE)
            .to_owned();
        Ok(Self {
            options,
            admin_database,
            url,
            origin,
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

    /// Names this server within the process (host, port, socket, role),
    /// without the password.
    pub(crate) fn identity(&self) -> String {
        let socket = self
            .options
            .get_socket()
            .map(|path| path.display().to_string());
        format!(
            "{}@{}:{}{}",
            self.user(),
            self.options.get_host(),
            self.options.get_port(),
            socket.unwrap_or_default()
        )
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

    /// One connection to `database` for pgtest's own work, bounded by the
    /// connect timeout.
    pub(crate) async fn connect(&self, database: &str) -> Result<PgConnection, Error> {
        let options = self
            .options_for(database)
            .application_name(ADMIN_APPLICATION_NAME)
            .disable_statement_logging();
        match tokio::time::timeout(self.connect_timeout, PgConnection::connect_with(&options)).await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(self.connect_error(error, database, None)),
            Err(_) => Err(self.timeout_error()),
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
