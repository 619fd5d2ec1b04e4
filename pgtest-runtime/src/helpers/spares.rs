//! The spares helper: server work done after a run, off the tests'
//! critical path. It drops passed tests' databases that were retired (see
//! [`crate::recycle`]) and, for templates whose copies are not recycled (a
//! role that is not a superuser), makes spare copies, so that a test in
//! `isolation = "database"` claims one (a millisecond) instead of copying
//! the template (60 to 300 ms, most of it the server writing 8 MB and some
//! 300 files).
//!
//! The work is done by a helper per server (see [`super`]), started
//! by the first database-mode test that asks for a spare or retires its
//! database and finds none. Every pgtest process
//! holds a shared lock on the server's `clients.lock` for as long as it
//! lives; once nobody has held it for two seconds (the run is over), the
//! helper plans the run's work into a queue of jobs (drop the databases of
//! passed tests; make as many spares of each template as the tests since
//! its last pass asked for, at most `PGTEST_SPARE_DATABASES` and 2 GiB of
//! copies per template, none that would leave less than
//! `PGTEST_MIN_FREE_DISK` on the server's disk where it can look, none
//! after the server reported a full disk) and does them one by one,
//! checking before each that the server is still idle, and exits once the
//! queue is empty. A job leaves the queue only once done, and doing one
//! twice changes nothing, so a helper killed at any point leaves its work
//! to the next one. It connects as the tests do, the credentials passed
//! through a pipe.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::{Job, say};
use crate::Error;
use crate::budget::Budget;
use crate::config::Config;
use crate::error::{DISK_FULL, sqlstate};
use crate::lock::Mode;
use crate::registry::markers::Marker;
use crate::registry::statements::CreateError;
use crate::registry::{names, statements};
use crate::server::Server;
use crate::state::{Entry, ServerDir, append_no_follow};

/// The most disk a template's spares may take.
const SPARE_BYTES: u64 = 2 << 30;
/// How long the server must go without a client before the helper works.
const QUIET: Duration = Duration::from_secs(2);
/// How many passes the helper tries (each after a quiet spell) before it
/// gives up on a server it cannot reach or a queue it cannot use.
const WORK_TRIES: u32 = 5;
/// Beside the credentials the helper is given: where the server's data is,
/// when pgtest can look at its disk, and the room its copies leave there.
const DATA_DIR_KEY: &str = "PGTEST_DATA_DIR";
const MIN_FREE_KEY: &str = "PGTEST_MIN_FREE_DISK";
/// The server slots of a budget shared with other machines (see
/// [`crate::share`]): the helper's connection holds one of them.
const SHARE_SLOTS_KEY: &str = "PGTEST_SHARE_SLOTS";

/// Asks the helper for one more spare of `template` after this run, and
/// starts the helper if it is not running.
pub(crate) fn want(
    dir: &ServerDir,
    server: &Server,
    config: &Config,
    budget: &Budget,
    template: &str,
) {
    let limit = config.spare_databases;
    if limit == 0 {
        return;
    }
    let path = dir.entry(Entry::SparesWanted);
    let appended = append_no_follow(&path).and_then(|mut file| writeln!(file, "{template}"));
    if let Err(error) = appended {
        tracing::warn!(%error, path = %path.display(), "cannot ask for a spare database");
        return;
    }
    if !helper_running(dir) {
        start_helper(dir, server, config, budget);
    }
}

/// Starts the helper, if it is not running, for the server work the run
/// leaves (retired databases to drop); without spares (a limit of 0) the
/// tests' sweeps drop passed tests' databases as they go.
pub(crate) fn helper_after_run(dir: &ServerDir, server: &Server, config: &Config, budget: &Budget) {
    if config.spare_databases > 0 && !helper_running(dir) {
        start_helper(dir, server, config, budget);
    }
}

/// Whether a helper will drop passed tests' databases once the run ends.
pub(crate) fn helper_running(dir: &ServerDir) -> bool {
    dir.lock(Entry::SparesHelper)
        .is_ok_and(|lock| lock.is_held(Mode::Shared).unwrap_or(false))
}

fn start_helper(dir: &ServerDir, server: &Server, config: &Config, budget: &Budget) {
    let job = Job::Spares {
        budget: dir.path().to_owned(),
        limit: config.spare_databases,
    };
    let mut settings = server.helper_credentials();
    if let Some(data) = &server.data_dir {
        settings.push((DATA_DIR_KEY, data.display().to_string()));
    }
    settings.push((MIN_FREE_KEY, config.min_free_disk.to_string()));
    if config.shared_budget && server.data_dir.is_none() {
        settings.push((SHARE_SLOTS_KEY, budget.capacity().to_string()));
    }
    let credentials: String = settings
        .into_iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect();
    let log = dir.entry(Entry::SparesLog);
    match super::start(&job, &log, Some(&credentials)) {
        Ok(()) => tracing::debug!("spares helper started"),
        Err(error) => tracing::warn!(%error, "the spares helper did not start"),
    }
}

/// A job of the queue: server work that changes nothing when done twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerJob {
    /// Drop a passed test's database.
    Drop { database: String },
    /// Copy `template` into the spare `database`.
    Copy { template: String, database: String },
}

impl ServerJob {
    /// One line, versioned, so that a later pgtest can read or skip it.
    fn encode(&self) -> String {
        match self {
            Self::Drop { database } => format!("v1 drop {database}"),
            Self::Copy { template, database } => format!("v1 copy {template} {database}"),
        }
    }

    fn decode(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["v1", "drop", database] => Some(Self::Drop {
                database: database.to_owned(),
            }),
            ["v1", "copy", template, database] => Some(Self::Copy {
                template: template.to_owned(),
                database: database.to_owned(),
            }),
            _ => None,
        }
    }
}

/// The jobs waiting in a budget's directory, one file each, done in the
/// order they were queued.
struct Queue {
    dir: PathBuf,
}

impl Queue {
    fn open(dir: &ServerDir) -> Result<Self, Error> {
        Ok(Self { dir: dir.queue()? })
    }

    /// Adds `job`: written under a temporary name, then renamed, so that a
    /// helper killed midway leaves no half job.
    fn push(&self, job: &ServerJob) -> std::io::Result<()> {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!(
            "{stamp:024}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let partial = self.dir.join(format!("{name}.partial"));
        fs::write(&partial, job.encode())?;
        fs::rename(&partial, self.dir.join(format!("{name}.job")))
    }

    /// The jobs, oldest first, with their files.
    fn jobs(&self) -> Vec<(PathBuf, ServerJob)> {
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "job"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|path| {
                let job = ServerJob::decode(&fs::read_to_string(&path).ok()?)?;
                Some((path, job))
            })
            .collect()
    }
}

/// The spares to make: for each template asked for `n` times in `wanted`,
/// as many as asked, at most `limit` and `SPARE_BYTES` of copies in all,
/// less those it has (`have`: spares on the server or queued, and the
/// template's size).
fn plan_copies(
    wanted: &[String],
    have: &HashMap<String, (u32, u64)>,
    limit: u32,
) -> Vec<(String, u32)> {
    let mut asked: Vec<(String, u32)> = Vec::new();
    for template in wanted {
        match asked.iter_mut().find(|(name, _)| name == template) {
            Some((_, count)) => *count += 1,
            None => asked.push((template.clone(), 1)),
        }
    }
    asked
        .into_iter()
        .filter_map(|(template, count)| {
            let (spares, size) = have.get(&template).copied().unwrap_or((0, 1));
            let by_disk = u32::try_from(SPARE_BYTES / size.max(1)).unwrap_or(u32::MAX);
            let missing = count.min(limit).min(by_disk).saturating_sub(spares);
            (missing > 0).then_some((template, missing))
        })
        .collect()
}

/// The spares helper's work, in its own process (see the module's docs):
/// returns its exit code.
pub(crate) fn run(dir: &Path, limit: u32) -> i32 {
    let mut credentials = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut credentials) {
        say(&format!("cannot read its credentials: {error}"));
        return 1;
    }
    if credentials.is_empty() {
        say("no credentials came through its pipe: nothing to connect with");
        return 1;
    }
    let options = match Server::helper_options(&credentials) {
        Ok(options) => options,
        Err(error) => {
            say(&error);
            return 1;
        }
    };
    let mut room = Room::given(&credentials, &options);
    let share_slots: Option<u32> = credentials
        .lines()
        .find_map(|line| line.strip_prefix(SHARE_SLOTS_KEY)?.strip_prefix('='))
        .and_then(|slots| slots.parse().ok());
    let opened = ServerDir::reopen(dir).and_then(|dir| {
        let locks = (dir.lock(Entry::SparesHelper)?, dir.lock(Entry::Clients)?);
        Ok((dir, locks))
    });
    let (dir, (me, clients)) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            say(&error.to_string());
            return 1;
        }
    };
    if !me.try_lock(Mode::Exclusive).unwrap_or(false) {
        // Another helper runs.
        return 0;
    }
    let idle = || !clients.is_held(Mode::Exclusive).unwrap_or(true);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            say(&format!("cannot start a runtime: {error}"));
            return 1;
        }
    };
    let mut quiet_since = Instant::now();
    let mut failures = 0;
    while dir.path().is_dir() {
        std::thread::sleep(Duration::from_millis(500));
        if !idle() {
            quiet_since = Instant::now();
            continue;
        }
        if quiet_since.elapsed() < QUIET {
            continue;
        }
        let pass = work(&dir, limit, &options, &mut room, share_slots, &idle);
        match runtime.block_on(pass) {
            Ok(true) => return 0,
            // A test came: later.
            Ok(false) => quiet_since = Instant::now(),
            // The server unreachable for a moment (busy, restarting): later,
            // a few times.
            Err(error) => {
                say(&error);
                failures += 1;
                if failures == WORK_TRIES {
                    return 1;
                }
                quiet_since = Instant::now();
            }
        }
    }
    0
}

/// One pass: plans the run's work into the queue, then does the queued
/// jobs while `idle`. Whether it got through the queue.
async fn work(
    dir: &ServerDir,
    limit: u32,
    options: &PgConnectOptions,
    room: &mut Room,
    share_slots: Option<u32>,
    idle: &dyn Fn() -> bool,
) -> Result<bool, String> {
    let queue = Queue::open(dir).map_err(|error| format!("cannot open its queue: {error}"))?;
    queue_drops(dir, &queue).map_err(|error| format!("cannot queue drops: {error}"))?;
    let mut admin = PgConnection::connect_with(options).await.map_err(|error| {
        let host = options.get_socket().map_or_else(
            || options.get_host().to_owned(),
            |socket| socket.display().to_string(),
        );
        format!(
            "cannot connect to {host}, port {}, as {}: {error}",
            options.get_port(),
            options.get_username()
        )
    })?;
    // Other machines' runners may use the server: this connection counts.
    if let Some(slots) = share_slots {
        let held = crate::share::hold_slot_for_self(&mut admin, slots).await;
        if !held.map_err(|error| format!("cannot take a server slot: {error}"))? {
            let _ = admin.close().await;
            return Ok(false);
        }
    }
    queue_copies(dir, &queue, &mut admin, limit).await?;
    let mut finished = true;
    // Once the disk is short of room, no copy is made in this pass: the
    // copies queued are forgotten (tests ask again).
    let mut no_room = None;
    for (path, job) in queue.jobs() {
        if !idle() {
            let _ = admin.close().await;
            return Ok(false);
        }
        if let ServerJob::Copy { template, .. } = &job {
            if no_room.is_none() {
                no_room = room.short_for(&mut admin, template).await;
                if let Some(why) = &no_room {
                    say(&format!("copies made ahead stop: {why}"));
                }
            }
            if no_room.is_some() {
                let _ = fs::remove_file(&path);
                continue;
            }
        }
        match run_job(&mut admin, &job).await {
            Ok(true) => {
                let _ = fs::remove_file(&path);
            }
            Ok(false) => {
                // Kept for the next helper.
                say(&format!("{}: someone is connected to it", job.encode()));
                finished = false;
            }
            // The disk filled up all the same.
            Err(error) if sqlstate(&error).as_deref() == Some(DISK_FULL) => {
                say(&format!(
                    "copies made ahead stop: {}: {error}",
                    job.encode()
                ));
                no_room = Some(error.to_string());
                let _ = fs::remove_file(&path);
            }
            Err(error) => {
                // Kept for the next helper (a session still on the
                // database, say).
                say(&format!("{}: {error}", job.encode()));
                finished = false;
            }
        }
    }
    let _ = admin.close().await;
    if !finished {
        say("some jobs failed; the next helper retries them");
    }
    Ok(true)
}

/// Queues a drop of each passed test's database, then forgets the test's
/// files (a helper killed in between queues the drop again: harmless).
fn queue_drops(dir: &ServerDir, queue: &Queue) -> std::io::Result<()> {
    for database in dir.passed_databases() {
        queue.push(&ServerJob::Drop {
            database: database.clone(),
        })?;
        dir.forget(&database);
    }
    Ok(())
}

/// Queues the spares the tests asked for since the last pass.
async fn queue_copies(
    dir: &ServerDir,
    queue: &Queue,
    admin: &mut PgConnection,
    limit: u32,
) -> Result<(), String> {
    let (wanted, taken) = (
        dir.entry(Entry::SparesWanted),
        dir.entry(Entry::SparesTaken),
    );
    // What a killed helper took stays in `TAKEN`; new asks join it.
    if let Ok(text) = fs::read_to_string(&wanted) {
        let appended =
            append_no_follow(&taken).and_then(|mut file| file.write_all(text.as_bytes()));
        appended.map_err(|error| format!("cannot take {}: {error}", wanted.display()))?;
        let _ = fs::remove_file(&wanted);
    }
    let asked: Vec<String> = fs::read_to_string(&taken)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    if asked.is_empty() {
        return Ok(());
    }
    let mut have: HashMap<String, (u32, u64)> = HashMap::new();
    for template in &asked {
        if have.contains_key(template) {
            continue;
        }
        let spare = Marker::Spare {
            template: template.clone(),
        };
        let (spares, size) = statements::count_and_size(admin, &spare, template)
            .await
            .map_err(|error| format!("cannot count the spares of {template}: {error}"))?;
        if size == 0 {
            // The template is gone: nothing to copy.
            have.insert(template.clone(), (u32::MAX, 1));
            continue;
        }
        have.insert(template.clone(), (spares, size));
    }
    for (_, job) in queue.jobs() {
        if let ServerJob::Copy { template, .. } = job
            && let Some((spares, _)) = have.get_mut(&template)
        {
            *spares = spares.saturating_add(1);
        }
    }
    for (template, missing) in plan_copies(&asked, &have, limit) {
        for _ in 0..missing {
            let key = uuid::Uuid::new_v4().simple().to_string();
            let database = names::spare(&template, &key);
            let job = ServerJob::Copy {
                template: template.clone(),
                database,
            };
            queue
                .push(&job)
                .map_err(|error| format!("cannot queue a copy: {error}"))?;
        }
    }
    let _ = fs::remove_file(&taken);
    Ok(())
}

/// Where the helper may look at the server's disk, and the room its copies
/// leave there.
struct Room {
    /// The server's data directory, when on this machine: the embedded
    /// server's, or a local server's that lets pgtest's role read it.
    dir: Option<PathBuf>,
    /// The server is reached through a socket or the loopback address.
    local: bool,
    keep_mib: u32,
}

impl Room {
    /// What the lines the helper was given say, for a server `options`
    /// reach.
    fn given(settings: &str, options: &PgConnectOptions) -> Self {
        let value = |key: &str| {
            settings
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        };
        let local = options.get_socket().is_some()
            || ["localhost", "127.0.0.1", "::1"].contains(&options.get_host());
        Self {
            dir: value(DATA_DIR_KEY).map(PathBuf::from),
            local,
            keep_mib: value(MIN_FREE_KEY)
                .and_then(|mib| mib.parse().ok())
                .unwrap_or(crate::config::DEFAULT_MIN_FREE_DISK),
        }
    }

    /// Why a copy of `template` is not to be made, when the disk is short
    /// of room for it.
    async fn short_for(&mut self, admin: &mut PgConnection, template: &str) -> Option<String> {
        if self.dir.is_none() && self.local {
            // Hidden from roles that may not read it: no row.
            let setting: Option<String> =
                sqlx::query_scalar("select setting from pg_settings where name = 'data_directory'")
                    .fetch_optional(&mut *admin)
                    .await
                    .ok()
                    .flatten();
            self.dir = setting.map(PathBuf::from).filter(|dir| dir.is_dir());
            self.local = false;
        }
        let dir = self.dir.as_ref()?;
        let spare = Marker::Spare {
            template: template.to_owned(),
        };
        let size = match statements::count_and_size(admin, &spare, template).await {
            Ok((_, size)) => size,
            Err(error) => return Some(format!("cannot read the size of {template}: {error}")),
        };
        crate::disk::short_of_room(dir, size, self.keep_mib)
    }
}

/// Does `job`; done twice, it changes nothing. Whether it is done: a
/// database someone is connected to is not dropped.
async fn run_job(admin: &mut PgConnection, job: &ServerJob) -> sqlx::Result<bool> {
    match job {
        // Not pgtest's role's any more: nothing to drop.
        ServerJob::Drop { database } => statements::drop_ours(admin, database, false)
            .await
            .map(|dropped| dropped != statements::Dropped::InUse),
        ServerJob::Copy { template, database } => {
            let marker = Marker::Spare {
                template: template.clone(),
            };
            // The template must be pgtest's role's: not copied otherwise.
            let (_, template_found) = statements::lookup(admin, template).await?;
            if template_found.is_none_or(|found| found.pgtest_marker().is_none()) {
                return Ok(true);
            }
            match statements::create(admin, database, Some(template), &marker).await {
                Ok(()) => Ok(true),
                // Made before the helper that queued it was killed: marked
                // again if it is pgtest's role's.
                Err(CreateError::Sql(error)) if sqlstate(&error).as_deref() == Some("42P04") => {
                    match statements::lookup(admin, database).await? {
                        (_, Some(found)) if found.ours => {
                            statements::mark(admin, database, &marker)
                                .await
                                .map(|()| true)
                        }
                        _ => Ok(true),
                    }
                }
                Err(CreateError::Sql(error)) => Err(error),
                Err(CreateError::TemplateInUse { .. }) => Ok(false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_back_and_an_unknown_one_is_skipped() {
        for job in [
            ServerJob::Drop {
                database: "pgtest_app_0123456789ab_1f2e3d4c".to_owned(),
            },
            ServerJob::Copy {
                template: "pgtest_app_0123456789ab".to_owned(),
                database: "pgtest_app_0123456789ab_s5e77a01".to_owned(),
            },
        ] {
            assert_eq!(ServerJob::decode(&job.encode()), Some(job));
        }
        assert_eq!(ServerJob::decode("v2 truncate pgtest_app"), None);
    }

    #[test]
    fn copies_are_planned_per_template_within_the_limits() {
        let wanted: Vec<String> = ["a", "b", "a", "a", "c", "c"].map(str::to_owned).into();
        let have = HashMap::from([
            ("a".to_owned(), (1, 8 << 20)),
            ("b".to_owned(), (0, 1 << 30)),
            ("c".to_owned(), (5, 8 << 20)),
        ]);
        // a: asked 3, has 1; b: asked 1, 2 GiB / 1 GiB allows 2; c: has enough.
        assert_eq!(
            plan_copies(&wanted, &have, 256),
            [("a".to_owned(), 2), ("b".to_owned(), 1)]
        );
        // At most the limit of spares per template.
        assert_eq!(
            plan_copies(&wanted, &have, 2),
            [("a".to_owned(), 1), ("b".to_owned(), 1)]
        );
        assert_eq!(plan_copies(&wanted, &have, 0), []);
    }

    #[test]
    fn the_queue_keeps_its_order_and_a_job_until_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(&ServerDir::unchecked(dir.path())).unwrap();
        let jobs: Vec<ServerJob> = (0..3)
            .map(|index| ServerJob::Drop {
                database: format!("d{index}"),
            })
            .collect();
        for job in &jobs {
            queue.push(job).unwrap();
        }
        let queued = queue.jobs();
        assert_eq!(
            queued
                .iter()
                .map(|(_, job)| job.clone())
                .collect::<Vec<_>>(),
            jobs
        );
        fs::remove_file(&queued[0].0).unwrap();
        let reopened = Queue::open(&ServerDir::unchecked(dir.path())).unwrap();
        assert_eq!(reopened.jobs().len(), 2);
    }
}
