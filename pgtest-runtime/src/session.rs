//! What a test process sets up once, by its first test, and every later
//! test of the process shares: the configuration, pgtest's home, the server
//! (the embedded one started), the server's directory and connection
//! budget, the locks the process holds while it lives, and which databases
//! are known to be ready.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use sqlx::Connection;
use tokio::sync::OnceCell;

use crate::budget::{self, Budget};
use crate::config::{Config, Target};
use crate::lock::{LockFile, Mode};
use crate::server::Server;
use crate::state::{Entry, ServerDir, StateDir};
use crate::{Error, helpers, registry};

/// How long a learned capacity is trusted before the server is asked again.
const CAPACITY_TTL: Duration = Duration::from_secs(600);

/// One test process's view of pgtest (see the module's documentation).
pub(crate) struct Session {
    pub(crate) config: Config,
    pub(crate) home: StateDir,
    pub(crate) server: Server,
    /// The server's directory in the home.
    pub(crate) dir: ServerDir,
    pub(crate) budget: Budget,
    /// The shared locks this process holds until it ends, by path: the
    /// server's clients lock, and the run locks of shared databases.
    held: Mutex<HashMap<PathBuf, LockFile>>,
    /// Set once a database is known to be ready, by name.
    ready: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
}

impl Session {
    /// The session of the package at `manifest_dir` (a test binary has
    /// one), set up by the first test that asks; a failed setup is tried
    /// again by the next test.
    pub(crate) async fn get(manifest_dir: &'static str) -> Result<Arc<Self>, Error> {
        type Sessions = HashMap<&'static str, Arc<OnceCell<Arc<Session>>>>;
        static SESSIONS: LazyLock<Mutex<Sessions>> = LazyLock::new(Default::default);
        let cell = SESSIONS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(manifest_dir)
            .or_default()
            .clone();
        let session = cell
            .get_or_try_init(|| Self::start(Path::new(manifest_dir)))
            .await?;
        Ok(Arc::clone(session))
    }

    async fn start(manifest_dir: &Path) -> Result<Arc<Self>, Error> {
        let config = Config::load(manifest_dir)?;
        let home = StateDir::home(&config.home)?;
        let server = Server::new(&config, &home)?;
        helpers::watchdog::ensure(&server, config.embedded_idle);
        let dir = home.server(&server.address())?;
        let capacity = capacity(&config, &server, &dir).await?;
        let budget = Budget::new(dir.clone(), capacity, config.budget_timeout);
        let session = Self {
            config,
            home,
            server,
            dir,
            budget,
            held: Mutex::default(),
            ready: Mutex::default(),
        };
        // The spares helper and the share keeper work only while no
        // process holds this.
        session.hold_while_alive(Entry::Clients).await?;
        session.keep_share().await?;
        Ok(Arc::new(session))
    }

    /// Makes sure this machine holds its share of a server that runners on
    /// other machines may use (the embedded server is this machine's
    /// alone): one look at a lock file while its share keeper holds it.
    /// Before each test too, so that a keeper that died mid-run (its lent
    /// slots then free) is replaced before this process's next test takes
    /// more than the machine's share.
    pub(crate) async fn keep_share(&self) -> Result<(), Error> {
        if self.config.shared_budget && matches!(self.config.target, Target::Url { .. }) {
            helpers::keeper::join(&self.dir, &self.server, &self.budget).await?;
        }
        Ok(())
    }

    /// Holds a shared lock on `entry` until the process ends (once per
    /// process), so that whoever takes it exclusively knows that no process
    /// uses what it stands for. Waits while someone holds it exclusively,
    /// at most the budget timeout.
    pub(crate) async fn hold_while_alive(&self, entry: Entry<'_>) -> Result<(), Error> {
        let path = self.dir.entry(entry);
        if self.held().contains_key(&path) {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.budget_timeout;
        let Some(lock) = self.dir.lock_until(entry, Mode::Shared, deadline).await? else {
            let held_for = format!(
                "held exclusively for more than {} s",
                self.config.budget_timeout.as_secs()
            );
            return Err(self.dir.error(entry, &std::io::Error::other(held_for)));
        };
        self.held().insert(path, lock);
        Ok(())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, LockFile>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Set once `database` is known to be ready, for the whole process.
    pub(crate) fn readiness(&self, database: &str) -> Arc<OnceCell<()>> {
        let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        ready.entry(database.to_owned()).or_default().clone()
    }
}

/// How many connections the suite may use on `server`: as configured, as
/// the embedded server's settings say, or as the server says when asked
/// (once per `CAPACITY_TTL` on this machine: one process asks while the
/// others wait for its answer), less a margin for other clients.
async fn capacity(config: &Config, server: &Server, dir: &ServerDir) -> Result<u32, Error> {
    if let Some(capacity) = config.max_connections {
        return Ok(capacity);
    }
    if let Some(connections) = server.known_capacity() {
        return Ok(budget::usable(connections));
    }
    let file = dir.entry(Entry::Capacity);
    if let Some(connections) = fresh_capacity(&file) {
        return Ok(budget::usable(connections));
    }
    let deadline = Instant::now() + server.connect_timeout * 3;
    let lock = dir.lock_until(Entry::CapacityLock, Mode::Exclusive, deadline);
    let Some(_lock) = lock.await? else {
        return Err(server.timeout_error());
    };
    if let Some(connections) = fresh_capacity(&file) {
        return Ok(budget::usable(connections));
    }
    let mut admin = registry::connect_admin(server).await?;
    let connections = server.max_client_connections(&mut admin).await;
    let _ = admin.close().await;
    let connections = connections?;
    let partial = file.with_extension("new");
    let written =
        fs::write(&partial, connections.to_string()).and_then(|()| fs::rename(&partial, &file));
    written.map_err(|error| dir.error(Entry::Capacity, &error))?;
    Ok(budget::usable(connections))
}

/// The connections the file says the server takes, unless it is stale.
fn fresh_capacity(file: &Path) -> Option<u32> {
    let age = fs::metadata(file).ok()?.modified().ok()?;
    if SystemTime::now().duration_since(age).unwrap_or_default() > CAPACITY_TTL {
        return None;
    }
    fs::read_to_string(file).ok()?.trim().parse().ok()
}
