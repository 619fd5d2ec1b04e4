//! As root, the embedded server runs as another user (`postgres`), who owns
//! its directory. That user must not be able to steer root: these tests
//! play that user for real, on a real cluster, and check that root writes,
//! reads, signals and leaks nothing it should not, and that every refusal
//! names the path. Without root there is no other user to play: the tests
//! that need one return at once.

#![cfg(target_os = "linux")]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{EmbeddedHome, assert_failed_without_password, assert_passed, run, text, wait_for};
use pgtest::{PgPool, pg_test};

#[pg_test]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_root(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(&pool).await?;
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs `script` with `sh` as the server's user; asserts it succeeded.
fn as_server_user(script: &str, args: &[&str]) {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--", "sh", "-c", script, "sh"])
        .args(args);
    let output = command.output().expect("run runuser");
    assert!(output.status.success(), "{script}: {}", text(&output));
}

/// A file of root's in a directory only root may enter, that nothing
/// pgtest does may change or show.
struct RootSecret {
    dir: tempfile::TempDir,
    content: String,
}

impl RootSecret {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pgtest-root-only-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        // Looks like a pid file naming pid 1, ready: one that a reader that
        // followed it would act on.
        let content = format!(
            "1\n/nowhere\n0\n5432\n/tmp\n\n0 0\nready\nroot-only {}\n",
            uuid::Uuid::new_v4()
        );
        fs::write(dir.path().join("secret"), &content).unwrap();
        fs::set_permissions(dir.path().join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        Self { dir, content }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// The line only this file holds.
    fn marker(&self) -> &str {
        self.content.lines().last().unwrap()
    }

    fn assert_unchanged_and_unseen(&self, printed: &str) {
        let meta = fs::metadata(self.path()).unwrap();
        assert_eq!(fs::read_to_string(self.path()).unwrap(), self.content);
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
        assert!(
            !printed.contains(self.marker()),
            "root's file appears in the output:\n{printed}"
        );
    }
}

/// What the server's user (or, for a hard link, which Linux's
/// `protected_hardlinks` keeps that user from making, root standing in
/// for a system without it) puts in place of a file of the cluster.
#[derive(Clone, Copy, Debug)]
enum Plant {
    Symlink,
    HardLink,
    Fifo,
}

impl Plant {
    fn at(self, path: &Path, secret: &RootSecret) {
        let path = path.to_str().unwrap();
        let target = secret.path();
        match self {
            Self::Symlink => {
                as_server_user("ln -s \"$1\" \"$2\"", &[target.to_str().unwrap(), path])
            }
            Self::HardLink => fs::hard_link(&target, path).unwrap(),
            Self::Fifo => as_server_user("mkfifo \"$1\"", &[path]),
        }
    }

    /// What pgtest's refusal says of it.
    fn refusal(self) -> &'static str {
        match self {
            Self::Symlink => "it is a symbolic link",
            Self::HardLink => "it has 2 links",
            Self::Fifo => "it is not a regular file",
        }
    }
}

/// Stops the home's server as its user and waits until it is gone.
fn stop_server(home: &EmbeddedHome) {
    let data = home.data_dir().expect("an initialized cluster");
    let pg_ctl = common::pg_bin().join("pg_ctl");
    as_server_user(
        "\"$1\" -D \"$2\" -m fast -w stop >/dev/null",
        &[pg_ctl.to_str().unwrap(), data.to_str().unwrap()],
    );
    assert_eq!(home.postmaster_pid(), None);
}

/// Runs the fixture, which must fail within ten seconds (nothing hangs);
/// what it printed.
fn run_to_a_refusal(home: &EmbeddedHome) -> String {
    let started = Instant::now();
    let output = run(home.exact("fixture_root"));
    let printed = assert_failed_without_password(&output);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}:\n{printed}",
        started.elapsed()
    );
    printed
}

#[test]
fn links_and_fifos_at_the_pid_file_are_refused_by_name_and_roots_files_are_untouched() {
    if !is_root() {
        return;
    }
    let home = EmbeddedHome::new();
    assert_passed(&run(home.exact("fixture_root")), 1);
    stop_server(&home);
    let secret = RootSecret::new();
    let data = home.data_dir().unwrap();
    let pid_file = data.join("postmaster.pid");
    for plant in [Plant::Symlink, Plant::HardLink, Plant::Fifo] {
        plant.at(&pid_file, &secret);
        let printed = run_to_a_refusal(&home);
        for part in [&pid_file.display().to_string(), plant.refusal(), "postgres"] {
            assert!(
                printed.contains(part),
                "{plant:?}: no {part:?} in:\n{printed}"
            );
        }
        secret.assert_unchanged_and_unseen(&printed);
        fs::remove_file(&pid_file).unwrap();
    }

    // The data directory itself swapped for a link to a root-only one
    // holding a pid file.
    let moved = home.server_dir().join("moved");
    as_server_user(
        "mv \"$1\" \"$2\"",
        &[data.to_str().unwrap(), moved.to_str().unwrap()],
    );
    fs::copy(secret.path(), secret.dir.path().join("postmaster.pid")).unwrap();
    as_server_user(
        "ln -s \"$1\" \"$2\"",
        &[secret.dir.path().to_str().unwrap(), data.to_str().unwrap()],
    );
    let printed = run_to_a_refusal(&home);
    assert!(
        printed.contains(&format!("{}: it is a symbolic link", data.display())),
        "{printed}"
    );
    secret.assert_unchanged_and_unseen(&printed);

    // Put back, the cluster starts again.
    fs::remove_file(&data).unwrap();
    as_server_user(
        "mv \"$1\" \"$2\"",
        &[moved.to_str().unwrap(), data.to_str().unwrap()],
    );
    assert_passed(&run(home.exact("fixture_root")), 1);
}

/// A directory of wrappers of the PostgreSQL binaries, which run the real
/// ones but first (or, for `initdb`, after) run `plant` as the server's
/// user, with `$DATA` the data directory.
fn wrapped_binaries(initdb_after: &str, postgres_before: &str) -> tempfile::TempDir {
    let real = common::pg_bin();
    let major = real
        .parent()
        .and_then(|dir| dir.file_name())
        .map(|name| name.to_string_lossy().trim_start_matches("pg").to_owned())
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("pgtest-wrapped-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The major version from the path, as for Debian's directories.
    let bin = dir.path().join(&major).join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::set_permissions(dir.path().join(&major), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let find_data =
        r#"DATA=; prev=; for arg in "$@"; do [ "$prev" = -D ] && DATA=$arg; prev=$arg; done"#;
    let scripts = [
        (
            "initdb",
            format!(
                "{find_data}\n\"{}\" \"$@\" || exit $?\n{initdb_after}\n",
                real.join("initdb").display()
            ),
        ),
        (
            "postgres",
            format!(
                "{find_data}\n{postgres_before}\nexec \"{}\" \"$@\"\n",
                real.join("postgres").display()
            ),
        ),
        (
            "pg_ctl",
            format!("exec \"{}\" \"$@\"\n", real.join("pg_ctl").display()),
        ),
    ];
    for (name, body) in scripts {
        let path = bin.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

#[test]
fn links_and_fifos_planted_between_initdb_and_the_start_are_refused_by_name() {
    if !is_root() {
        return;
    }
    let secret = RootSecret::new();
    let target = secret.path().display().to_string();
    let plants = [
        (
            "after initdb, a link",
            format!("ln -s '{target}' \"$DATA/postmaster.pid\""),
            String::new(),
        ),
        (
            "after initdb, a FIFO",
            "mkfifo \"$DATA/postmaster.pid\"".to_owned(),
            String::new(),
        ),
        (
            "as postgres starts, a link",
            String::new(),
            format!("rm -f \"$DATA/postmaster.pid\"; ln -s '{target}' \"$DATA/postmaster.pid\""),
        ),
    ];
    for (when, after_initdb, before_postgres) in plants {
        let wrapped = wrapped_binaries(&after_initdb, &before_postgres);
        let home = EmbeddedHome::new();
        let major = fs::read_dir(wrapped.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let bin = wrapped.path().join(major).join("bin");
        let started = Instant::now();
        let output = run(home.exact("fixture_root").env("PGTEST_PG_BIN", &bin));
        let printed = assert_failed_without_password(&output);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{when}: took {:?}",
            started.elapsed()
        );
        // pgtest's refusal, or PostgreSQL's own (it could not use the file
        // either) when it gave up first; root's file is checked below.
        assert!(
            printed.contains("postmaster.pid")
                && (printed.contains("pgtest does not read")
                    || printed.contains("postgres exited")),
            "{when}: the path is not named:\n{printed}"
        );
        secret.assert_unchanged_and_unseen(&printed);
    }
}

/// A process of root's that writes each signal it gets to its file.
struct Recorder {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Recorder {
    /// A recorder of root's.
    fn start() -> Self {
        Self::start_as(None)
    }

    /// A recorder of the server's user: a process it could signal itself,
    /// but that is not its server.
    fn start_as_server_user() -> Self {
        let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        Self::start_as(Some(postgres.uid.as_raw()))
    }

    fn start_as(uid: Option<u32>) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        if let Some(uid) = uid {
            std::os::unix::fs::chown(log.path(), Some(uid), None).unwrap();
        }
        let traps: String = ["INT", "TERM", "QUIT", "HUP", "USR1", "USR2", "ALRM"]
            .iter()
            .map(|signal| format!("trap 'echo {signal} >> \"$1\"' {signal}; "))
            .collect();
        let mut command = Command::new("bash");
        command
            .args([
                "-c",
                &format!("{traps} echo ready >> \"$1\"; while :; do sleep 0.05; done"),
                "bash",
            ])
            .arg(log.path())
            .stdin(Stdio::null());
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
        }
        let child = command.spawn().unwrap();
        let recorder = Self { child, log };
        wait_for("the recorder to be ready", Duration::from_secs(10), || {
            recorder.lines() == ["ready"]
        });
        recorder
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn lines(&self) -> Vec<String> {
        fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Asserts that it recorded no signal, then that it does record one.
    fn assert_got_no_signal(self) {
        assert_eq!(self.lines(), ["ready"], "the recorder got a signal");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        wait_for(
            "the recorder to record a signal",
            Duration::from_secs(10),
            || self.lines().len() == 2,
        );
        assert_eq!(self.lines(), ["ready", "USR1"]);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the home's server (idle after 1 s), then, while holding it as
/// a test does, rewrites its pid file as the server's user would, to name
/// `pid` on its first line; lets the watchdog act on it and another test
/// start; restores the file. What that test printed.
fn rewrite_the_pid_file_and_let_root_act(home: &EmbeddedHome, pid: &str) -> String {
    let fixture = || {
        let mut command = home.exact("fixture_root");
        command.env("PGTEST_EMBEDDED_IDLE", "1");
        command
    };
    // The test's side of the cluster, made as pgtest makes it, so that the
    // test can hold the server from the start.
    fs::create_dir(home.cluster()).unwrap();
    fs::set_permissions(home.cluster(), fs::Permissions::from_mode(0o711)).unwrap();
    let clients = fs::File::create(home.cluster().join("clients.lock")).unwrap();
    clients.lock_shared().unwrap();
    assert_passed(&run(fixture()), 1);
    let pid_file = home.data_dir().unwrap().join("postmaster.pid");
    let original = fs::read_to_string(&pid_file).unwrap();
    let (_, rest) = original.split_once('\n').unwrap();
    let rewritten = format!("{pid}\n{rest}");
    let write = "printf '%s' \"$1\" > \"$2\"";
    as_server_user(write, &[&rewritten, pid_file.to_str().unwrap()]);
    drop(clients);

    // The watchdog, which would stop an idle server, sees no server of
    // its user and ends.
    let watchdog = fs::File::open(home.cluster().join("watchdog.lock")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchdog.try_lock().is_err() {
        assert!(
            Instant::now() < deadline,
            "waited 30 s for the watchdog to end; it said:\n{}",
            fs::read_to_string(home.cluster().join("watchdog.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = run(fixture());
    as_server_user(write, &[&original, pid_file.to_str().unwrap()]);
    text(&output)
}

/// Rewrites a running server's pid file to name `recorder` (see
/// [`rewrite_the_pid_file_and_let_root_act`]): the next test's message
/// names it as `what`, and the recorder gets no signal.
fn pid_file_naming(recorder: Recorder, what: &str) {
    let home = EmbeddedHome::new();
    let printed = rewrite_the_pid_file_and_let_root_act(&home, &recorder.pid().to_string());
    let named = format!("postmaster.pid names pid {}, {what}", recorder.pid());
    assert!(printed.contains(&named), "no {named:?} in:\n{printed}");
    recorder.assert_got_no_signal();
}

#[test]
fn a_pid_file_rewritten_to_name_a_process_of_root_gets_that_process_no_signal() {
    if is_root() {
        pid_file_naming(Recorder::start(), "which is no process of postgres");
    }
}

#[test]
fn a_pid_file_naming_another_process_of_the_server_user_gets_it_no_signal() {
    // The server's user may signal its own processes: only what the pid
    // file names keeps pg_ctl stop off this one, unless pgtest sees that
    // it is not this directory's server.
    if is_root() {
        pid_file_naming(
            Recorder::start_as_server_user(),
            "a process of postgres that is not this directory's server",
        );
    }
}

#[test]
#[ignore = "run by the test below, as pid 1 of a pid namespace of its own"]
fn in_a_pid_namespace_a_pid_file_naming_minus_one_gets_no_process_a_signal() {
    assert_eq!(
        std::process::id(),
        1,
        "run inside `unshare -fp --mount-proc`"
    );
    let recorder = Recorder::start();
    let home = EmbeddedHome::new();
    let printed = rewrite_the_pid_file_and_let_root_act(&home, "-1");
    assert!(printed.contains("postmaster.pid names pid -1"), "{printed}");
    recorder.assert_got_no_signal();
}

#[test]
fn a_pid_file_naming_minus_one_signals_nothing_in_a_pid_namespace() {
    if !is_root() {
        return;
    }
    // Inside a pid namespace of its own, where `kill(-1)` would reach only
    // the processes of the namespace, the recorder among them.
    let output = Command::new("unshare")
        .args(["-fp", "--mount-proc"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "in_a_pid_namespace_a_pid_file_naming_minus_one_gets_no_process_a_signal",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .unwrap();
    assert_passed(&output, 1);
}

#[test]
fn a_stale_pid_file_naming_another_users_live_process_does_not_stop_the_start() {
    if !is_root() {
        return;
    }
    let home = EmbeddedHome::new();
    assert_passed(&run(home.exact("fixture_root")), 1);
    stop_server(&home);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let mut other =
        std::os::unix::process::CommandExt::uid(&mut Command::new("sleep"), nobody.uid.as_raw())
            .arg("120")
            .spawn()
            .unwrap();
    let pid_file = home.data_dir().unwrap().join("postmaster.pid");
    as_server_user(
        "printf '%s\\n' \"$1\" > \"$2\"",
        &[&other.id().to_string(), pid_file.to_str().unwrap()],
    );
    let output = run(home.exact("fixture_root"));
    assert_passed(&output, 1);
    let pid = home.postmaster_pid().expect("a server runs");
    assert_ne!(pid, other.id());
    assert!(
        fs::exists(format!("/proc/{}", other.id())).unwrap(),
        "the other process lives"
    );
    let _ = other.kill();
    let _ = other.wait();
}

#[cfg(target_os = "linux")]
#[test]
fn the_server_gets_none_of_the_tests_environment() {
    let home = EmbeddedHome::new();
    let canary = format!("canary-{}", uuid::Uuid::new_v4());
    let output = run(home.exact("fixture_root").env("PGTEST_IT_CANARY", &canary));
    assert_passed(&output, 1);
    let pid = home.postmaster_pid().expect("a server runs");
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let names: Vec<&str> = environ
        .split('\0')
        .filter_map(|entry| entry.split_once('=').map(|(name, _)| name))
        .collect();
    assert!(
        !environ.contains(&canary),
        "the test's variable reached the server: {names:?}"
    );
    assert!(names.contains(&"PATH"), "{names:?}");
    let allowed = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "LD_LIBRARY_PATH",
        "LC_ALL",
        "LC_CTYPE",
        "LC_MESSAGES",
        "LC_COLLATE",
        "LC_NUMERIC",
        "LC_TIME",
    ];
    let unexpected: Vec<&&str> = names
        .iter()
        .filter(|name| !allowed.contains(name))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the server has more than it needs: {unexpected:?}"
    );
    if is_root() {
        assert!(environ.contains("USER=postgres"), "{names:?}");
    }
}

#[test]
fn roots_files_are_in_a_directory_the_server_user_cannot_write() {
    if !is_root() {
        return;
    }
    let home = EmbeddedHome::new();
    assert_passed(&run(home.exact("fixture_root")), 1);
    let postgres = nix::unistd::User::from_name("postgres")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let cluster = fs::symlink_metadata(home.cluster()).unwrap();
    assert_eq!((cluster.uid(), cluster.mode() & 0o7777), (0, 0o711));
    for entry in fs::read_dir(home.cluster()).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "server" {
            assert_eq!((meta.uid(), meta.mode() & 0o7777), (postgres, 0o700));
        } else {
            assert!(meta.is_file(), "{name}");
            assert_eq!((meta.uid(), meta.mode() & 0o077), (0, 0), "{name}");
        }
    }
    let planted = home.cluster().join("planted");
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--", "sh", "-c", "echo x > \"$1\"", "sh"])
        .arg(&planted)
        .output()
        .unwrap();
    assert!(!output.status.success() && !planted.exists());
}

#[test]
fn as_root_the_server_user_is_never_root_nor_a_missing_user_and_the_message_says_what_to_do() {
    if !is_root() {
        return;
    }
    let home = EmbeddedHome::new();
    for (user, problem) in [
        ("root", "it is root"),
        ("pgtest-no-such-user", "there is no such user"),
    ] {
        let output: Output = run(home.exact("fixture_root").env("PGTEST_SERVER_USER", user));
        let printed = assert_failed_without_password(&output);
        for part in [
            &format!("cannot use `{user}`: {problem}"),
            "useradd --system",
            "PGTEST_SERVER_USER",
            "PGTEST_DATABASE_URL",
        ] {
            assert!(printed.contains(part), "no {part:?} in:\n{printed}");
        }
    }
    assert_eq!(home.postmaster_pid(), None);
}
