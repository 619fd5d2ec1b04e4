//! The integration tests' harness: a real PostgreSQL cluster per test,
//! started with `pg_ctl` as an unprivileged user, and a way to run this
//! binary's own `#[ignore]`d fixture tests as separate processes against it.

#![allow(dead_code, unreachable_pub)]

use std::env;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The password of the `postgres` role over TCP. Tests assert that it never
/// appears in any output.
pub const PASSWORD: &str = "Sup3r-Secret-pw";

/// The user that runs the server when the tests run as root.
const SERVER_USER: &str = "postgres";

/// A throwaway cluster: its own data directory, port and unix socket, a
/// scram password for TCP logins and trust on the socket (for the harness's
/// own `psql`). Stopped when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    /// Starts a cluster with extra `postgres -c` settings.
    pub fn start(settings: &[(&str, &str)]) -> Self {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("pgtest-it-")
            .tempdir_in("/tmp")
            .expect("create a cluster directory");
        let data = dir.path().join("data");
        if running_as_root() {
            let status = Command::new("chown")
                .args([SERVER_USER, &dir.path().display().to_string()])
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown the cluster directory to {SERVER_USER}"
            );
        }
        let password_file = dir.path().join("pw");
        fs::write(&password_file, PASSWORD).expect("write the password file");
        if running_as_root() {
            Command::new("chown")
                .args([SERVER_USER, &password_file.display().to_string()])
                .status()
                .expect("chown");
        }
        run_as_server_user(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", password_file.display())),
        );
        let port = free_port();
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c log_connections=on",
            dir.path().display()
        );
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        run_as_server_user(
            Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .args(["-o", &options, "-w", "-t", "60", "start"]),
        );
        Self { dir, bin, port }
    }

    /// This test binary, ready to run fixtures against this cluster, with a
    /// temporary directory and a pgtest home (and so a connection budget)
    /// of the cluster's own.
    pub fn fixture(&self, filter: &str) -> Command {
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp).expect("create the cluster's temporary directory");
        let mut command = fixture(filter, &self.url());
        command.env("TMPDIR", &tmp).env("PGTEST_HOME", self.home());
        command
    }

    /// The `TMPDIR` of the fixtures run against this cluster.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// The `PGTEST_HOME` of the fixtures run against this cluster.
    pub fn home(&self) -> PathBuf {
        self.tmp_dir().join("pgtest")
    }

    /// The fixture test named `test` alone, against this cluster.
    pub fn exact(&self, test: &str) -> Command {
        let mut command = self.fixture(test);
        command.arg("--exact");
        command
    }

    /// A URL for the `postgres` superuser over TCP, with its password.
    pub fn url(&self) -> String {
        self.url_for("postgres", PASSWORD, "postgres")
    }

    /// A URL for the `postgres` superuser over the unix socket, where logins
    /// are trusted: no password exchange, which a debug build makes slow.
    pub fn socket_url(&self) -> String {
        self.socket_url_for("postgres")
    }

    /// A URL for `user` over the unix socket, where logins are trusted.
    pub fn socket_url_for(&self, user: &str) -> String {
        format!(
            "postgres://{user}@localhost/postgres?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A URL for any role, password and database over TCP.
    pub fn url_for(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections the server refused for want of slots so far.
    pub fn refusals(&self) -> usize {
        let log = self.log();
        log.matches("too many clients").count()
            + log
                .matches("remaining connection slots are reserved")
                .count()
    }

    /// Runs SQL as the superuser over the socket; returns the unaligned
    /// output rows.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// `pg_dump` of `database` (schema and data), as the superuser, less
    /// the random key of the `\restrict` lines that newer pg_dumps write.
    pub fn dump(&self, database: &str) -> String {
        let output = Command::new(self.bin.join("pg_dump"))
            .args(["-U", "postgres", "-d", database, "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .output()
            .expect("run pg_dump");
        assert!(
            output.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .filter(|line| !line.starts_with("\\restrict") && !line.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `psql`, to run `sql` in `database` as `user` over the socket.
    pub fn psql_command(&self, user: &str, database: &str, sql: &str) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                user,
                "-d",
                database,
            ])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql]);
        command
    }

    /// Runs SQL in `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        self.psql_as("postgres", database, sql)
    }

    /// Runs SQL in `database` as `user` (over the socket, where logins are
    /// trusted).
    pub fn psql_as(&self, user: &str, database: &str, sql: &str) -> String {
        let output = self
            .psql_command(user, database, sql)
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// The names of the databases pgtest made (or is making) to test in:
    /// all but the lock database.
    pub fn pgtest_databases(&self) -> Vec<String> {
        let names = self.psql(
            "select datname from pg_database \
             where datname like 'pgtest%' and datname <> 'pgtest_locks' order by 1",
        );
        names.lines().map(str::to_owned).collect()
    }

    /// The run's shared database (the copy of the template that the tests
    /// of one run share).
    pub fn run_database(&self) -> String {
        let copies: Vec<String> = self
            .pgtest_databases()
            .into_iter()
            .filter(|name| {
                name.rsplit_once('_')
                    .is_some_and(|(_, last)| last.len() == 8 && last.starts_with('r'))
            })
            .collect();
        assert_eq!(copies.len(), 1, "one run's shared database: {copies:?}");
        copies[0].clone()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Waits until `sql` returns `t`, at most `limit`; panics with the last
    /// answer and the log's tail when it never does.
    /// What the spares helpers of this cluster's runs said.
    pub fn spares_log(&self) -> String {
        fs::read_dir(self.home().join("budget"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|server| fs::read_to_string(server.path().join("pgtest-spares.log")).ok())
            .collect()
    }

    pub fn wait_until(&self, sql: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let answer = self.psql(sql);
            if answer == "t" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for `{sql}`, last answer {answer:?}; server log tail:\n{}\n\
                 spares helper log tail:\n{}",
                tail(&self.log(), 20),
                tail(&self.spares_log(), 20)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut command = Command::new(self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = as_server_user(&mut command).output();
    }
}

/// This test binary, ready to run one or more of its `#[ignore]`d fixture
/// tests against `url`, with no other server variable inherited.
pub fn fixture(filter: &str, url: &str) -> Command {
    let mut command = Command::new(env::current_exe().expect("the test binary"));
    command
        .args([filter, "--ignored", "--nocapture"])
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", url)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for a child, at most `limit`, killing it when it takes longer.
/// Its output is read while it runs, so that a full pipe cannot stall it.
pub fn finish(child: impl Into<Running>, limit: Duration) -> Output {
    let Running {
        mut child,
        stdout,
        stderr,
    } = child.into();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let printed = format!("{}{}", collect(stdout), collect(stderr));
            panic!("the child ran longer than {limit:?}; it printed:\n{printed}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: collect(stdout).into_bytes(),
        stderr: collect(stderr).into_bytes(),
    }
}

/// A child whose output is read as it prints: one that prints more than a
/// pipe holds (64 KiB) while nobody reads would stop until it is read.
pub struct Running {
    child: Child,
    stdout: thread::JoinHandle<Vec<u8>>,
    stderr: thread::JoinHandle<Vec<u8>>,
}

impl From<Child> for Running {
    fn from(mut child: Child) -> Self {
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Self {
            child,
            stdout,
            stderr,
        }
    }
}

/// Starts `command`, reading its output from now on (see [`Running`]).
pub fn start(command: &mut Command) -> Running {
    command.spawn().expect("start a child").into()
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

fn collect(reader: thread::JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned()
}

/// Runs `count` commands made by `make`, at most `at_once` at a time (as a
/// test runner's `-j` does); returns their outputs in order.
pub fn run_at_most(
    count: usize,
    at_once: usize,
    make: impl Fn(usize) -> Command + Sync,
) -> Vec<Output> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outputs = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..at_once {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= count {
                        break;
                    }
                    let child = make(index).spawn().expect("start a fixture");
                    let output = finish(child, Duration::from_secs(300));
                    outputs.lock().unwrap().push((index, output));
                }
            });
        }
    });
    let mut outputs = outputs.into_inner().unwrap();
    outputs.sort_by_key(|(index, _)| *index);
    outputs.into_iter().map(|(_, output)| output).collect()
}

/// Starts `count` commands at once (`make` gets each one's index) and waits
/// for them all (at most two minutes each), returning their outputs.
pub fn run_together(count: usize, make: impl Fn(usize) -> Command) -> Vec<Output> {
    let children: Vec<Running> = (0..count).map(|index| start(&mut make(index))).collect();
    children
        .into_iter()
        .map(|child| finish(child, Duration::from_secs(120)))
        .collect()
}

/// Runs a fixture to the end and returns its output. At most four minutes:
/// longer than the runtime's own limits on one start of the embedded server
/// (initdb 120 s, then the start 60 s), so that on a loaded machine a slow
/// fixture fails with the runtime's message rather than this one.
pub fn run(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    finish(
        command.borrow_mut().spawn().expect("start the fixture"),
        Duration::from_secs(240),
    )
}

/// Waits until `done`, at most `limit`, looking every 5 ms.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Stdout and stderr together.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts the fixture passed exactly `count` tests.
pub fn assert_passed(output: &Output, count: usize) {
    let text = text(output);
    assert!(
        output.status.success() && text.contains(&format!("test result: ok. {count} passed")),
        "expected {count} passing test(s), got:\n{text}"
    );
}

/// Asserts the fixture failed and returns what it printed, checking that
/// the password does not appear in it.
pub fn assert_failed_without_password(output: &Output) -> String {
    let text = text(output);
    assert!(
        !output.status.success(),
        "expected the fixture to fail, got:\n{text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "the password appears in the output:\n{text}"
    );
    text
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

/// The newest PostgreSQL binaries: `PGTEST_PG_BIN`, `pg_config --bindir`,
/// then `/usr/lib/postgresql/*/bin`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = env::var_os("PGTEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "no PostgreSQL binaries: install them (apt-get install postgresql) or set PGTEST_PG_BIN",
    )
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `initdb` and `postgres` refuse to run as root: run them as `postgres`.
fn as_server_user(command: &mut Command) -> Command {
    let mut wrapped = if running_as_root() {
        let mut runuser = Command::new("runuser");
        runuser
            .args(["-u", SERVER_USER, "--"])
            .arg(command.get_program());
        runuser
    } else {
        Command::new(command.get_program())
    };
    wrapped.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

fn run_as_server_user(command: &mut Command) {
    let output = as_server_user(command)
        .output()
        .expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{:?} failed:\n{}",
        command.get_program(),
        text(&output)
    );
}

/// The manifest of a project a test builds: package `name`, with pgtest
/// from this checkout, sqlx 0.9 and the dev-dependencies `more` (whole
/// lines), a workspace of its own.
pub fn project_manifest(name: &str, more: &str) -> String {
    format!(
        "\n[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\
         publish = false\n\n[dev-dependencies]\npgtest = {{ path = \"{}\" }}\n\
         sqlx = {{ version = \"0.9\", default-features = false, features = \
         [\"postgres\", \"runtime-tokio\"] }}\n{more}\n[workspace]\n",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `cargo`, to build a project a test made: every such project shares one
/// target directory, without incremental caches and with line tables for
/// debug information, whatever the caller's settings, so that the
/// dependencies are built once and `target/` stays small.
pub fn project_cargo() -> Command {
    let mut command = Command::new(env!("CARGO"));
    command
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pgtest-it-projects"),
        )
        .env("CARGO_INCREMENTAL", "0")
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only");
    command
}

/// The directory of this package's test fixtures.
pub fn fixtures_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// A `PGTEST_HOME` of its own for tests of the embedded server, traversable
/// by the server user. Whatever server runs in it is stopped when dropped.
pub struct EmbeddedHome {
    dir: tempfile::TempDir,
}

impl EmbeddedHome {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pgtest-home-")
            .tempdir_in("/tmp")
            .expect("create a home");
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the home");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster directory of the newest binaries (the test's side:
    /// locks and logs; the server's own files are in `server/`).
    pub fn cluster(&self) -> PathBuf {
        // `/usr/lib/postgresql/15/bin`, or `…/pg15/bin` as .ci/run installs them.
        let major = pg_bin()
            .parent()
            .and_then(|dir| dir.file_name())
            .map(|name| name.to_string_lossy().trim_start_matches("pg").to_owned());
        self.path().join(format!(
            "embedded-pg{}",
            major.expect("a versioned binary directory")
        ))
    }

    /// The server's directory: its socket and data directory.
    pub fn server_dir(&self) -> PathBuf {
        self.cluster().join("server")
    }

    /// The cluster's data directory, once `initdb` made it.
    pub fn data_dir(&self) -> Option<PathBuf> {
        let name = fs::read_to_string(self.cluster().join("data-dir")).ok()?;
        Some(self.server_dir().join(name.trim()))
    }

    /// This test binary, ready to run fixtures with no server URL at all.
    pub fn fixture(&self, filter: &str) -> Command {
        let mut command = fixture(filter, "");
        command
            .env_remove("PGTEST_DATABASE_URL")
            .env("PGTEST_HOME", self.path());
        command
    }

    /// The fixture test named `test` alone, with no server URL.
    pub fn exact(&self, test: &str) -> Command {
        let mut command = self.fixture(test);
        command.arg("--exact");
        command
    }

    /// The server's log.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.cluster().join("server.log")).unwrap_or_default()
    }

    /// The names of the running server's databases.
    pub fn databases(&self) -> Vec<String> {
        self.on_database("postgres", async |connection| {
            sqlx::query_scalar("select datname from pg_database")
                .fetch_all(connection)
                .await
                .expect("list the databases")
        })
    }

    /// Drops the running server's database `name`, ending its sessions.
    pub fn drop_database(&self, name: &str) {
        self.execute(
            "postgres",
            &format!("drop database \"{name}\" with (force)"),
        );
    }

    /// Runs `sql` in the running server's `database`, as its superuser.
    pub fn execute(&self, database: &str, sql: &str) {
        // 'static, as sqlx 0.9 wants a statement it cannot see is safe
        // (this file is built on 0.8 too, which has no `AssertSqlSafe`).
        let statement: &'static str = Box::leak(sql.to_owned().into_boxed_str());
        self.on_database(database, async |connection| {
            sqlx::raw_sql(statement)
                .execute(connection)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error}"))
        });
    }

    /// `work` on a connection to the running server's `database`, as its
    /// superuser.
    fn on_database<T>(
        &self,
        database: &str,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> T,
    ) -> T {
        let options = sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .socket(self.server_dir())
            .port(5432)
            .username("postgres")
            .database(database);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
                .await
                .expect("connect to the embedded server");
            work(&mut connection).await
        })
    }

    /// The pid of the running postmaster, if any.
    pub fn postmaster_pid(&self) -> Option<u32> {
        // Not a link or a FIFO that a test planted there.
        let path = self.data_dir()?.join("postmaster.pid");
        if !fs::symlink_metadata(&path).ok()?.is_file() {
            return None;
        }
        let text = fs::read_to_string(path).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for EmbeddedHome {
    fn drop(&mut self) {
        if let (Some(_), Some(data)) = (self.postmaster_pid(), self.data_dir()) {
            let mut command = Command::new(pg_bin().join("pg_ctl"));
            command
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = as_server_user(&mut command).output();
        }
    }
}

/// Runs a command as the server user when the tests run as root.
pub fn server_user_command(command: &mut Command) -> Option<Command> {
    running_as_root().then(|| as_server_user(command))
}

/// What application code does that holds several connections at once:
/// `count` tasks that each take a connection of `pool` and keep it until all
/// of them hold one, then run a query on it. The first error ends it.
pub async fn hold_together(pool: &sqlx::PgPool, count: usize) -> Result<(), sqlx::Error> {
    let all_in = std::sync::Arc::new(tokio::sync::Barrier::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (pool, all_in) = (pool.clone(), all_in.clone());
        tasks.spawn(async move {
            let mut connection = pool.acquire().await?;
            all_in.wait().await;
            sqlx::query("select 1")
                .execute(&mut *connection)
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a task panicked")?;
    }
    Ok(())
}

/// The path of the machine's snapshot of `template` under the pgtest
/// home `home`, if there is one.
pub fn snapshot_file(home: &Path, template: &str) -> Option<PathBuf> {
    let wanted = format!("snapshot-{template}");
    let mut dirs = vec![home.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_name().to_str() == Some(wanted.as_str()) {
                return Some(path);
            }
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                dirs.push(path);
            }
        }
    }
    None
}
