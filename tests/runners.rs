//! Runners on several machines share one server's budget through the
//! server: four runners, each with a pgtest home of its own (a machine),
//! each `cargo nextest run --partition count:i/4 -j 64` of one 448-test
//! suite whose tests hold three connections at once, on a server of
//! `max_connections = 50`. None fails, the server refuses no connection,
//! and its log never shows more of pgtest's connections than the budget;
//! one runner killed mid-run, namespace and all, gives its share to the
//! others within seconds; a runner alone uses the whole budget, as before.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Cluster, Running, finish, start, text};

/// The server's connections: 47 for clients that are not superusers, of
/// which pgtest's budget is 44 (a margin of 3 for others).
const MAX_CONNECTIONS: &str = "50";
const BUDGET: usize = 44;

/// 448 tests in 56 modules of 8, each holding three connections at once.
fn suite() -> String {
    let mut suite = String::from(
        "async fn hold_three(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {\n\
         \x20   let all_in = std::sync::Arc::new(tokio::sync::Barrier::new(3));\n\
         \x20   let mut tasks = tokio::task::JoinSet::new();\n\
         \x20   for _ in 0..3 {\n\
         \x20       let (pool, all_in) = (pool.clone(), all_in.clone());\n\
         \x20       tasks.spawn(async move {\n\
         \x20           let mut connection = pool.acquire().await?;\n\
         \x20           all_in.wait().await;\n\
         \x20           sqlx::query(\"select pg_sleep(0.02)\").execute(&mut *connection).await.map(drop)\n\
         \x20       });\n\
         \x20   }\n\
         \x20   while let Some(done) = tasks.join_next().await {\n\
         \x20       done.expect(\"a task panicked\")?;\n\
         \x20   }\n\
         \x20   Ok(())\n\
         }\n",
    );
    for module in 0..56 {
        suite.push_str(&format!("mod m{module:02} {{\n"));
        for test in 0..8 {
            suite.push_str(&format!(
                "    #[pgtest::pg_test(migrations = false)]\n    \
                 async fn t{test}(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {{\n        \
                 super::hold_three(pool).await\n    }}\n"
            ));
        }
        suite.push_str("}\n");
    }
    suite
}

/// Writes `contents` at `path` unless it is there already (so that cargo
/// finds the project fresh).
fn write(path: &Path, contents: &str) {
    if fs::read_to_string(path).is_ok_and(|found| found == contents) {
        return;
    }
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// The suite's project, built once (cargo's lock keeps the tests of this
/// file from building it at once).
fn project() -> &'static Path {
    static PROJECT: OnceLock<PathBuf> = OnceLock::new();
    PROJECT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pgtest-it-projects/runners");
        write(
            &root.join("Cargo.toml"),
            &common::project_manifest(
                "runners-suite",
                "tokio = { version = \"1\", features = [\"sync\", \"rt\"] }\n",
            ),
        );
        write(
            &root.join("Cargo.lock"),
            &fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap(),
        );
        write(&root.join("src/lib.rs"), "");
        write(&root.join("tests/crowd.rs"), &suite());
        let build = common::project_cargo()
            .args(["nextest", "list", "--offline"])
            .current_dir(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cargo nextest list");
        let output = finish(build, Duration::from_secs(900));
        assert!(
            output.status.success(),
            "the suite does not build:\n{}",
            text(&output)
        );
        root
    })
}

/// `cargo nextest run -j 64` of the suite (of `partition`, if any) against
/// `cluster`, as the runner of a machine whose pgtest home is `home`.
fn runner(cluster: &Cluster, home: &Path, partition: Option<&str>) -> Command {
    let mut command = common::project_cargo();
    command
        // A failure's output last, where the harness's tail shows it.
        .args([
            "nextest",
            "run",
            "--offline",
            "--no-fail-fast",
            "--failure-output=final",
        ])
        .args(["-j", "64"])
        .args(partition.map(|partition| format!("--partition=count:{partition}")))
        .current_dir(project())
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", cluster.socket_url())
        .env("PGTEST_HOME", home)
        // Growing waits inside the pool's acquire; on 2 cores shared with
        // the rest of the suite some waits pass the default 30 s.
        .env("PGTEST_ACQUIRE_TIMEOUT", "120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The outer nextest's run, profile and settings are not the inner one's.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("NEXTEST") {
            command.env_remove(var);
        }
    }
    command
}

fn assert_all_passed(output: &Output, count: usize) {
    let printed = text(output);
    assert!(
        output.status.success() && printed.contains(&format!("{count} tests run: {count} passed")),
        "expected {count} passed tests:\n{}",
        common::tail(&printed, 120)
    );
}

/// The most client connections open at once, by the server's log
/// (`log_connections`, `log_disconnections`, and a session's `FATAL`
/// error, after which it logs no disconnection), the harness's `psql`
/// aside.
fn peak(log: &str) -> usize {
    let pid = |line: &str| -> Option<String> {
        let start = line.find('[')? + 1;
        Some(line[start..start + line[start..].find(']')?].to_owned())
    };
    let mut open: HashSet<String> = HashSet::new();
    let mut peak = 0;
    for line in log.lines() {
        if line.contains("connection authorized:") && !line.contains("application_name=psql") {
            open.extend(pid(line));
            peak = peak.max(open.len());
        } else if line.contains("disconnection:") || line.contains("FATAL:") {
            // A session that fails after its login (a database that is not
            // there yet, looked for on the warm path) logs no disconnection.
            if let Some(pid) = pid(line) {
                open.remove(&pid);
            }
        }
    }
    peak
}

fn cluster() -> Cluster {
    Cluster::start(&[
        ("max_connections", MAX_CONNECTIONS),
        ("log_disconnections", "on"),
    ])
}

/// The server slots held, and the runners announced, by `pg_locks`.
fn shares(cluster: &Cluster) -> (usize, usize) {
    // Asked in `postgres`: `pgtest_locks` may not be there yet, and
    // `pg_locks` shows every database's locks.
    let counts = cluster.psql(
        "select count(*) filter (where classid::int8 = 1885827889) || ' ' || \
         count(distinct pid) filter (where classid::int8 = 1885827890) \
         from pg_locks where locktype = 'advisory' and granted",
    );
    let (slots, runners) = counts.trim().split_once(' ').expect("two counts");
    (slots.parse().unwrap(), runners.parse().unwrap())
}

/// No refusal, and at most the budget of connections at once, and one more
/// per runner (`machines`): a machine's share keeper connects before it
/// holds a server slot (it takes one through that connection), so for a
/// moment each machine may have one connection outside the budget, in the
/// margin the budget leaves other clients (seen once: 45 of 44, four
/// runners).
fn assert_within_budget(cluster: &Cluster, machines: usize) {
    assert_eq!(cluster.refusals(), 0, "the server refused no connection");
    let peak = peak(&cluster.log());
    let most = BUDGET + machines;
    assert!(
        peak <= most,
        "at most {BUDGET} connections at once and one more per runner ({most}), the \
         server's log shows {peak}"
    );
}

/// Runners `indexes` of four, each on partition `index/4` with a home of
/// its own under `homes` (`m<index>`), started, their output read as they
/// print (the harness waits for one at a time).
fn spawn_runners(
    cluster: &Cluster,
    homes: &Path,
    indexes: std::ops::RangeInclusive<usize>,
) -> Vec<Running> {
    indexes
        .map(|index| {
            start(&mut runner(
                cluster,
                &homes.join(format!("m{index}")),
                Some(&format!("{index}/4")),
            ))
        })
        .collect()
}

#[test]
fn four_runners_with_homes_of_their_own_share_one_server_of_fifty() {
    let cluster = cluster();
    project();
    let homes = tempfile::tempdir().unwrap();
    for child in spawn_runners(&cluster, homes.path(), 1..=4) {
        assert_all_passed(&finish(child, Duration::from_secs(600)), 112);
    }
    assert_within_budget(&cluster, 4);
}

#[test]
fn a_runner_killed_mid_run_gives_its_share_to_the_others_within_seconds() {
    let cluster = cluster();
    project();
    let homes = tempfile::tempdir().unwrap();
    // The first runner in a pid namespace of its own: killing unshare kills
    // the namespace's init, and the kernel every process in it (nextest's
    // test processes, in groups of their own, and the share keeper).
    let mut doomed = Command::new("unshare");
    let inner = runner(&cluster, &homes.path().join("m1"), Some("1/4"));
    doomed
        .args(["-fp", "--mount-proc", "--kill-child"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .current_dir(project())
        .stdout(fs::File::create(homes.path().join("doomed.log")).unwrap())
        .stderr(fs::File::create(homes.path().join("doomed.err")).unwrap());
    for (var, value) in inner.get_envs() {
        match value {
            Some(value) => doomed.env(var, value),
            None => doomed.env_remove(var),
        };
    }
    let mut doomed = doomed.spawn().expect("start a runner in a namespace");
    let others = spawn_runners(&cluster, homes.path(), 2..=4);
    // Mid-run: every runner announced, and some hundreds of connections made.
    let deadline = Instant::now() + Duration::from_secs(300);
    while shares(&cluster).1 < 4 || cluster.log().matches("connection authorized").count() < 300 {
        assert!(
            Instant::now() < deadline,
            "the runners never got going: {:?}; the runner in a namespace printed:\n{}",
            shares(&cluster),
            common::tail(
                &fs::read_to_string(homes.path().join("doomed.err")).unwrap_or_default(),
                40
            )
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (before, _) = shares(&cluster);
    doomed.kill().expect("kill the runner's namespace");
    let _ = doomed.wait();
    let killed = Instant::now();
    // Its keeper's session ends, and the others take its slots.
    let mut runners = 4;
    while killed.elapsed() < Duration::from_secs(5) {
        let (slots, announced) = shares(&cluster);
        runners = announced;
        if announced <= 3 && slots + 3 >= BUDGET {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken = killed.elapsed();
    let (slots, _) = shares(&cluster);
    assert!(
        runners <= 3 && slots + 3 >= BUDGET && taken < Duration::from_secs(5),
        "5 s after the kill: {runners} runners, {slots} of {BUDGET} slots held \
         ({before} before the kill)"
    );
    for child in others {
        assert_all_passed(&finish(child, Duration::from_secs(600)), 112);
    }
    assert_within_budget(&cluster, 4);
}

#[test]
fn a_runner_alone_uses_the_whole_budget() {
    let cluster = cluster();
    project();
    let home = tempfile::tempdir().unwrap();
    let child = runner(&cluster, home.path(), None)
        .spawn()
        .expect("start the runner");
    // Its keeper takes every server slot: the whole budget is the machine's.
    let deadline = Instant::now() + Duration::from_secs(300);
    while shares(&cluster).0 < BUDGET {
        assert!(
            Instant::now() < deadline,
            "the keeper never held the whole budget: {:?}",
            shares(&cluster)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_all_passed(&finish(child, Duration::from_secs(600)), 448);
    assert_eq!(cluster.refusals(), 0, "the server refused no connection");
    // As on one machine without sharing: every slot open to all in use at
    // once (the budget less the reserve's 4, which one growing test at a
    // time uses as far as it needs), and never more than the budget.
    let peak = peak(&cluster.log());
    assert!(
        (BUDGET - 4..=BUDGET).contains(&peak),
        "a runner alone peaks at {peak} connections, not {} to {BUDGET}",
        BUDGET - 4
    );
}
