//! The connection budget keeps a suite inside the server's connection
//! limit however many processes run, and gives slots back whatever way a
//! test ends.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{Cluster, assert_failed_without_password, assert_passed, run, run_together, text};
use pgtest::{PgPool, pg_test};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Holds all four connections of its pool at once for a moment, as a busy
/// test may.
#[pg_test(migrations = false, max_connections = 4)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_budget_four_connections(pool: PgPool) -> Result<(), sqlx::Error> {
    let sleep = || sqlx::query("select pg_sleep(0.1)").execute(&pool);
    let (a, b, c, d) = tokio::join!(sleep(), sleep(), sleep(), sleep());
    for done in [a, b, c, d] {
        done?;
    }
    Ok(())
}

#[pg_test(migrations = false, max_connections = 4)]
#[ignore = "a fixture, run by the tests of this file"]
#[should_panic(expected = "panicked while holding every slot")]
async fn fixture_budget_1_panics_holding_every_slot(pool: PgPool) {
    let _held = pool.acquire().await.unwrap();
    panic!("panicked while holding every slot");
}

#[pg_test(migrations = false, max_connections = 4)]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_budget_2_needs_every_slot(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(&pool).await?;
    Ok(())
}

/// One query at a time on a pool of one connection: it never holds a
/// connection while it waits for another. It holds it for two seconds, so
/// that processes started together overlap.
#[pg_test(migrations = false, max_connections = 1)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_budget_one_at_a_time(pool: PgPool) -> Result<(), sqlx::Error> {
    for _ in 0..2 {
        sqlx::query("select pg_sleep(1)").execute(&pool).await?;
    }
    Ok(())
}

#[pg_test(migrations = false, max_connections = 4)]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_budget_holds_every_slot(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_sleep(600)").execute(&pool).await?;
    Ok(())
}

#[test]
fn sixty_four_processes_fit_a_server_of_twenty_connections() {
    let cluster = Cluster::start(&[("max_connections", "20")]);
    let outputs = run_together(64, |_| cluster.exact("fixture_budget_four_connections"));
    for output in &outputs {
        assert_passed(output, 1);
    }
    assert_eq!(cluster.refusals(), 0, "the server refused no connection");
}

#[test]
fn two_runners_without_a_shared_budget_still_finish() {
    let cluster = Cluster::start(&[("max_connections", "20")]);
    let other_tmp = tempfile::tempdir().unwrap();
    let outputs = run_together(48, |index| {
        // Runners unaware of each other can fill the server with tests that
        // each hold connections while waiting for one more; tests that use
        // one connection at a time always finish, on the retry alone.
        let mut command = cluster.fixture("fixture_budget_one_at_a_time");
        // 16 each (12 to take, 4 kept for growing): together more than the
        // server's 20.
        // Unaware of each other: no budget shared through the server.
        command
            .arg("--exact")
            .env("PGTEST_MAX_CONNECTIONS", "16")
            .env("PGTEST_SHARED_BUDGET", "off");
        if index.is_multiple_of(2) {
            // A second runner: a budget of its own, unaware of the first.
            command.env("PGTEST_HOME", other_tmp.path().join("pgtest"));
        }
        command
    });
    for output in &outputs {
        assert_passed(output, 1);
    }
    // Each runner let 12 tests run on a server that takes 20 clients in
    // all: the server refused some, and the retry carried them.
    assert!(
        cluster.refusals() > 0,
        "the runners never overcommitted the server"
    );
}

#[test]
fn a_panicking_test_gives_its_slots_back() {
    let cluster = Cluster::start(&[]);
    let output = run(cluster
        .fixture("fixture_budget_")
        .args([
            "--skip",
            "holds",
            "--skip",
            "four_connections",
            "--skip",
            "one_at_a_time",
            "--test-threads=1",
        ])
        .env("PGTEST_MAX_CONNECTIONS", "4")
        // One machine's budget, every slot of it (a share keeper would
        // hold one for its own connection).
        .env("PGTEST_SHARED_BUDGET", "off")
        .env("PGTEST_BUDGET_TIMEOUT", "5"));
    assert_passed(&output, 2);
}

/// `test` alone against `cluster`, on one machine's budget of four slots,
/// every slot of it (a share keeper would hold one for its own connection).
fn with_four_slots(cluster: &Cluster, test: &str) -> Command {
    let mut command = cluster.exact(test);
    command
        .env("PGTEST_MAX_CONNECTIONS", "4")
        .env("PGTEST_SHARED_BUDGET", "off");
    command
}

/// A test process that holds every one of the four slots (see
/// [`with_four_slots`]), once it holds them.
fn every_slot_held(cluster: &Cluster) -> Child {
    let holder = with_four_slots(cluster, "fixture_budget_holds_every_slot")
        .spawn()
        .unwrap();
    cluster.wait_until(
        "select exists (select from pg_stat_activity where application_name like '%fixture_budget_holds_every_slot' \
         and query like '%pg_sleep%')",
        Duration::from_secs(60),
    );
    holder
}

#[test]
fn a_killed_process_gives_its_slots_back_and_a_waiter_is_told_who_holds_them() {
    let cluster = Cluster::start(&[]);
    let mut holder = every_slot_held(&cluster);

    let started = std::time::Instant::now();
    let refused = run(
        with_four_slots(&cluster, "fixture_budget_2_needs_every_slot")
            .env("PGTEST_BUDGET_TIMEOUT", "1"),
    );
    // The timeout and a second, and a second for the process to start: not
    // whenever the holder lets go.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the wait took {took:?}");
    let text = assert_failed_without_password(&refused);
    for part in [
        // A pool of 4 starts with its first connection's slot and a spare;
        // with 4 slots, 2 of them are the reserve, for growing only.
        "waited 1 s for 2 of the 4 connection slots",
        &format!(
            "pid {} (budget::fixture_budget_holds_every_slot)",
            holder.id()
        ),
        "PGTEST_BUDGET_TIMEOUT",
    ] {
        assert!(text.contains(part), "expected {part:?} in:\n{text}");
    }

    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let output = run(
        with_four_slots(&cluster, "fixture_budget_2_needs_every_slot")
            .env("PGTEST_BUDGET_TIMEOUT", "20"),
    );
    assert_passed(&output, 1);
}

/// The context switches a process has made, all its threads together
/// (each time one slept, or was made to wait for a CPU).
#[cfg(target_os = "linux")]
fn switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Whether one of `pid`'s threads is named `name`.
#[cfg(target_os = "linux")]
fn has_thread(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
    })
}

/// A suite of hundreds of processes spends most of its time waiting for
/// slots: a waiting test must not wake. Each of three tests waits while
/// another holds every slot: the first in line looks for free slots, the
/// two behind it sleep in the kernel until the line moves. Their pools,
/// made before the wait, do not wake them either (their gates' watch ticked
/// every 5 ms: four runners of a 448-test suite ran four times as long).
#[cfg(target_os = "linux")]
#[test]
fn tests_waiting_in_line_for_slots_do_not_wake_until_it_moves() {
    let cluster = Cluster::start(&[]);
    let mut holder = every_slot_held(&cluster);
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            with_four_slots(&cluster, "fixture_budget_2_needs_every_slot")
                .env("PGTEST_BUDGET_TIMEOUT", "120")
                .spawn()
                .unwrap()
        })
        .collect();
    // Behind the first: a thread of each waits for the line's lock.
    let in_line = || -> Vec<u32> {
        let pids = waiters.iter().map(std::process::Child::id);
        pids.filter(|&pid| has_thread(pid, "pgtest-waiter"))
            .collect()
    };
    common::wait_for("two tests waiting in line", Duration::from_secs(60), || {
        in_line().len() == 2
    });
    let behind = in_line();
    let before: Vec<u64> = behind.iter().map(|&pid| switches(pid)).collect();
    // The window the switches are counted in: polling every 20 ms, or a
    // watch every 5 ms, makes hundreds of them in it.
    std::thread::sleep(Duration::from_secs(3));
    let during: Vec<u64> = behind
        .iter()
        .zip(&before)
        .map(|(&pid, before)| switches(pid) - before)
        .collect();
    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    for waiter in waiters {
        assert_passed(&common::finish(waiter, Duration::from_secs(120)), 1);
    }
    assert!(
        during.iter().all(|&switches| switches < 30),
        "tests waiting in line made {during:?} context switches in 3 s"
    );
}

/// Runs its queries one after another, on the default pool, some of them
/// far slower than the gate's wait (10 ms).
#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_pool_one_query_at_a_time(pool: PgPool) -> Result<(), sqlx::Error> {
    for _ in 0..20 {
        sqlx::query("select 1").execute(&pool).await?;
        let _: i32 = sqlx::query_scalar("select 1").fetch_one(&pool).await?;
    }
    for _ in 0..5 {
        sqlx::query("select pg_sleep(0.1)").execute(&pool).await?;
    }
    Ok(())
}

/// Three tasks that each hold a connection until all three do, then
/// queries one after another.
#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_pool_three_at_once(pool: PgPool) -> Result<(), sqlx::Error> {
    common::hold_together(&pool, 3).await?;
    for _ in 0..20 {
        sqlx::query("select 1").execute(&pool).await?;
    }
    Ok(())
}

/// The same three tasks on a pool the test builds from the options it is
/// given: a child of the test's pool, which grows as it does.
#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_pool_of_its_own_three_at_once(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) -> Result<(), sqlx::Error> {
    let pool = options.connect_with(connect).await?;
    common::hold_together(&pool, 3).await?;
    pool.close().await;
    Ok(())
}

#[test]
fn a_pool_opens_only_the_connections_its_test_uses_at_once() {
    let cluster = Cluster::start(&[]);
    // The run's first test builds the shared database, retrying its pool's
    // connection while it waits: not what is measured here.
    assert_passed(&run(cluster.exact("fixture_budget_one_at_a_time")), 1);
    for (test, expected) in [
        ("fixture_pool_one_query_at_a_time", 1),
        ("fixture_pool_three_at_once", 3),
        // The test's pool's own connection (which checks the run's shared
        // database), then its pool's three.
        ("fixture_pool_of_its_own_three_at_once", 4),
    ] {
        let out = run(cluster.exact(test));
        eprintln!(
            "{}",
            text(&out)
                .lines()
                .filter(|l| l.contains("DBG"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_passed(&out, 1);
        let log = cluster.log();
        let opened: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("connection authorized") && line.contains(test))
            .collect();
        assert_eq!(opened.len(), expected, "{test}:\n{}", opened.join("\n"));
    }
}
