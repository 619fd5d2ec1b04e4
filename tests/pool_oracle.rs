//! The pool of `#[pgtest::sqlx_test]` against a plain sqlx pool of the same
//! size and options (what `#[sqlx::test]` builds), on the same database:
//! the same scenarios on each, every scenario run 20 times (20 tests, each
//! with a pool of its own). Where the plain pool's outcome (the values its
//! tasks see, the connections open after each step) is the same in all 20
//! runs, pgtest's is that outcome in all 20: on the pool a test is given,
//! and on one it builds from the options it is given (against one built
//! from the options `#[sqlx::test]` gives); with every test in a process of
//! its own (as nextest runs them) and with all of them on threads of one
//! process (as `cargo test` does). `tests/sqlx_versions.rs` runs this file
//! on sqlx 0.8 too.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use common::{Cluster, assert_passed, finish, run_at_most, text};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// How many times each scenario runs on each pool.
const RUNS: usize = 20;

/// The scenarios, each a module of `RUNS` fixtures.
const SCENARIOS: [&str; 11] = [
    "set_then_a_reader_while_it_returns",
    "set_then_a_spawned_reader",
    "three_at_once",
    "one_held_then_one_more",
    "five_held_then_a_sixth_waits",
    "an_idle_connection_is_reused",
    "a_killed_idle_connection_is_replaced",
    "queries_one_after_another",
    "options",
    "own_pool_three_at_once",
    "own_pool_five_held_then_a_sixth_waits",
];

/// The scenarios whose outcome on sqlx's pools does not depend on timing,
/// whatever the machine's load: the tasks ask in an order that decides.
const DETERMINED: [&str; 8] = [
    "set_then_a_reader_while_it_returns",
    "three_at_once",
    "one_held_then_one_more",
    "five_held_then_a_sixth_waits",
    "an_idle_connection_is_reused",
    "a_killed_idle_connection_is_replaced",
    "options",
    "own_pool_five_held_then_a_sixth_waits",
];

/// `RUNS` fixtures that each run `$scenario` on a plain pool and on their
/// own pool: the pool they are given, or (`own`) one they build from the
/// pool options and connect options they are given.
macro_rules! twenty {
    ($($scenario:ident)*) => {$(
        mod $scenario {
            twenty!(@runs $scenario $scenario r00 r01 r02 r03 r04 r05 r06 r07 r08 r09
                r10 r11 r12 r13 r14 r15 r16 r17 r18 r19);
        }
    )*};
    (own $($name:ident: $scenario:ident)*) => {$(
        mod $name {
            twenty!(@own $name $scenario r00 r01 r02 r03 r04 r05 r06 r07 r08 r09
                r10 r11 r12 r13 r14 r15 r16 r17 r18 r19);
        }
    )*};
    (@runs $name:ident $scenario:ident $($run:ident)*) => {$(
        #[pgtest::sqlx_test(migrations = false)]
        #[ignore = "a fixture, run by the tests of this file"]
        async fn $run(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
            crate::compare(stringify!($name), stringify!($run), &pool, crate::$scenario).await
        }
    )*};
    (@own $name:ident $scenario:ident $($run:ident)*) => {$(
        #[pgtest::sqlx_test(migrations = false)]
        #[ignore = "a fixture, run by the tests of this file"]
        async fn $run(
            options: sqlx::postgres::PgPoolOptions,
            connect: sqlx::postgres::PgConnectOptions,
        ) -> Result<(), sqlx::Error> {
            let pool = options.connect_with(connect).await?;
            crate::compare(stringify!($name), stringify!($run), &pool, crate::$scenario).await?;
            pool.close().await;
            Ok(())
        }
    )*};
}

mod oracle {
    twenty! {
        set_then_a_reader_while_it_returns set_then_a_spawned_reader three_at_once
        one_held_then_one_more five_held_then_a_sixth_waits an_idle_connection_is_reused
        a_killed_idle_connection_is_replaced queries_one_after_another options
    }
    twenty! {
        own
        own_pool_three_at_once: three_at_once
        own_pool_five_held_then_a_sixth_waits: five_held_then_a_sixth_waits
    }
}

/// Runs `scenario` on the test's `pool` as it is handed over, and on a
/// plain pool built as `#[sqlx::test]` builds its own (sqlx's defaults,
/// five connections, idle ones closed after a second; `connect_with`, so
/// one connection idle), on the same database with the same connect
/// options, the plain pool first in every other run; prints both
/// outcomes. A pool the test built from the options it was given is
/// compared with one built from the options `#[sqlx::test]` gives, a child
/// of a pool of twenty.
async fn compare<F, Fut>(
    name: &str,
    run: &str,
    pool: &PgPool,
    scenario: F,
) -> Result<(), sqlx::Error>
where
    F: Fn(PgPool) -> Fut,
    Fut: Future<Output = Result<String, sqlx::Error>>,
{
    let connect = (*pool.connect_options()).clone();
    let options = PgPoolOptions::new()
        .max_connections(5)
        .idle_timeout(Duration::from_secs(1));
    let options = match name.starts_with("own_pool") {
        true => options.parent(
            PgPoolOptions::new()
                .max_connections(20)
                .connect_lazy_with(connect.clone()),
        ),
        false => options,
    };
    let plain_first = run.ends_with(['1', '3', '5', '7', '9']);
    let mut pgtest = None;
    if !plain_first {
        pgtest = Some(outcome(pool.clone(), &scenario).await?);
    }
    let plain = options.connect_with(connect).await?;
    let of_plain = outcome(plain.clone(), &scenario).await?;
    plain.close().await;
    let pgtest = match pgtest {
        Some(pgtest) => pgtest,
        None => outcome(pool.clone(), &scenario).await?,
    };
    println!("oracle {name} plain {of_plain}");
    println!("oracle {name} pgtest {pgtest}");
    Ok(())
}

/// `scenario`'s outcome on `pool`, after what the pool held to begin with.
async fn outcome<F, Fut>(pool: PgPool, scenario: &F) -> Result<String, sqlx::Error>
where
    F: Fn(PgPool) -> Fut,
    Fut: Future<Output = Result<String, sqlx::Error>>,
{
    let start = format!("{} open, {} idle", pool.size(), pool.num_idle());
    Ok(format!("from {start}: {}", scenario(pool).await?))
}

/// The connections of one run, named by the order they first serve.
#[derive(Default)]
struct Seen(Vec<i32>);

impl Seen {
    fn name(&mut self, pid: i32) -> usize {
        match self.0.iter().position(|seen| *seen == pid) {
            Some(index) => index,
            None => {
                self.0.push(pid);
                self.0.len() - 1
            }
        }
    }
}

async fn pid<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(executor)
        .await
}

/// The session variable the scenarios set, as the fake clock.
async fn clock<'c, E: sqlx::PgExecutor<'c>>(executor: E) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select current_setting('oracle.clock', true)")
        .fetch_one(executor)
        .await
}

/// Waits until every connection of `pool` is idle (back from its task).
async fn until_idle(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.num_idle() < pool.size() as usize {
        assert!(
            Instant::now() < deadline,
            "the pool's connections never came back"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A `SET` on a connection of the pool; a task spawned to read it through
/// the pool; the connection given back; the reader awaited while the test
/// holds nothing. The reader asks before the connection is back.
async fn set_then_a_reader_while_it_returns(pool: PgPool) -> Result<String, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    sqlx::query("set oracle.clock = 'fake'")
        .execute(&mut *connection)
        .await?;
    let reader = tokio::spawn({
        let pool = pool.clone();
        async move { clock(&pool).await }
    });
    drop(connection);
    let seen = reader.await.expect("the reader panicked")?;
    Ok(format!("the reader saw {seen:?}; {} open", pool.size()))
}

/// The test: a `SET` through the pool, then a task spawned to read
/// it through the pool, awaited while the test holds nothing.
async fn set_then_a_spawned_reader(pool: PgPool) -> Result<String, sqlx::Error> {
    sqlx::query("set oracle.clock = 'fake'")
        .execute(&pool)
        .await?;
    let reader = tokio::spawn({
        let pool = pool.clone();
        async move { clock(&pool).await }
    });
    let seen = reader.await.expect("the reader panicked")?;
    Ok(format!("the reader saw {seen:?}; {} open", pool.size()))
}

/// Three queries at once, from the pool as it is handed over.
async fn three_at_once(pool: PgPool) -> Result<String, sqlx::Error> {
    let (a, b, c) = tokio::join!(pid(&pool), pid(&pool), pid(&pool));
    let mut seen = Seen::default();
    let names = [seen.name(a?), seen.name(b?), seen.name(c?)];
    Ok(format!("on {names:?}; {} open", pool.size()))
}

/// A connection held, and a query through the pool meanwhile.
async fn one_held_then_one_more(pool: PgPool) -> Result<String, sqlx::Error> {
    let mut held = pool.acquire().await?;
    let mut seen = Seen::default();
    let first = seen.name(pid(&mut *held).await?);
    let other = seen.name(pid(&pool).await?);
    Ok(format!("on {first} then {other}; {} open", pool.size()))
}

/// Five connections held; a sixth asked for; one of the five given back.
async fn five_held_then_a_sixth_waits(pool: PgPool) -> Result<String, sqlx::Error> {
    let mut held = Vec::new();
    let mut seen = Seen::default();
    for _ in 0..5 {
        let mut connection = pool.acquire().await?;
        seen.name(pid(&mut *connection).await?);
        held.push(connection);
    }
    let five = pool.size();
    let sixth = tokio::spawn({
        let pool = pool.clone();
        async move { pid(&pool).await }
    });
    drop(held.remove(0));
    let got = seen.name(sixth.await.expect("the sixth panicked")?);
    Ok(format!(
        "{five} open; the sixth on {got}; {} open",
        pool.size()
    ))
}

/// A query, its connection back, another query.
async fn an_idle_connection_is_reused(pool: PgPool) -> Result<String, sqlx::Error> {
    let mut seen = Seen::default();
    let first = seen.name(pid(&pool).await?);
    until_idle(&pool).await;
    let second = seen.name(pid(&pool).await?);
    Ok(format!("on {first} then {second}; {} open", pool.size()))
}

/// An idle connection whose server process is terminated, then a query.
async fn a_killed_idle_connection_is_replaced(pool: PgPool) -> Result<String, sqlx::Error> {
    let victim = pid(&pool).await?;
    until_idle(&pool).await;
    let mut other = PgConnection::connect_with(&pool.connect_options()).await?;
    sqlx::query("select pg_terminate_backend($1)")
        .bind(victim)
        .execute(&mut other)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone: bool =
            sqlx::query_scalar("select not exists (select from pg_stat_activity where pid = $1)")
                .bind(victim)
                .fetch_one(&mut other)
                .await?;
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "the terminated backend stayed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    other.close().await?;
    let after = pid(&pool).await;
    let replaced = after.as_ref().is_ok_and(|after| *after != victim);
    Ok(format!(
        "the query {}; replaced {replaced}; {} open",
        if after.is_ok() { "ran" } else { "failed" },
        pool.size()
    ))
}

/// Six queries, one after another.
async fn queries_one_after_another(pool: PgPool) -> Result<String, sqlx::Error> {
    let mut seen = Seen::default();
    let mut on = Vec::new();
    for _ in 0..6 {
        on.push(seen.name(pid(&pool).await?));
    }
    Ok(format!("on {on:?}; {} open", pool.size()))
}

/// The pool's options.
async fn options(pool: PgPool) -> Result<String, sqlx::Error> {
    let options = pool.options();
    Ok(format!(
        "max {} min {} idle timeout {:?} lifetime {:?} acquire timeout {:?} test before acquire {}",
        options.get_max_connections(),
        options.get_min_connections(),
        options.get_idle_timeout(),
        options.get_max_lifetime(),
        options.get_acquire_timeout(),
        options.get_test_before_acquire(),
    ))
}

/// The outcomes printed by fixtures: by scenario, then pool.
type Outcomes = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn outcomes(printed: &str) -> Outcomes {
    let mut outcomes = Outcomes::new();
    for line in printed.lines() {
        // Anywhere in the line: on threads of one process, libtest may have
        // written "test … ... " (its result follows on a line of its own)
        // just before a fixture's line.
        let Some(at) = line.find("oracle ") else {
            continue;
        };
        let rest = &line[at + "oracle ".len()..];
        let mut parts = rest.splitn(3, ' ');
        let (Some(scenario), Some(pool), Some(outcome)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        outcomes
            .entry(scenario.to_owned())
            .or_default()
            .entry(pool.to_owned())
            .or_default()
            .push(outcome.to_owned());
    }
    outcomes
}

/// Checks the outcomes: every scenario ran `RUNS` times on each pool; the
/// plain pool's outcome of each scenario in [`DETERMINED`] is the same in
/// all runs, and pgtest's is that one in all. The others depend on timing
/// on sqlx's own pools (whether the server answers the ping of a
/// connection on its way back before a task asks for one: a server
/// process on the same core answers at once); where the plain pool's
/// reader mostly opened a connection of its own, pgtest's did at least
/// once (its old pool never did). Prints a table of them.
fn check(runner: &str, outcomes: &Outcomes) {
    let mut table = format!("\n{runner}: scenario | plain pool | pgtest's pool\n");
    let mut mismatches = Vec::new();
    let fresh = |outcomes: &[String]| {
        outcomes
            .iter()
            .filter(|outcome| outcome.contains("the reader saw None"))
            .count()
    };
    for scenario in SCENARIOS {
        let by_pool = &outcomes[scenario];
        let (plain, pgtest) = (&by_pool["plain"], &by_pool["pgtest"]);
        assert_eq!((plain.len(), pgtest.len()), (RUNS, RUNS), "{scenario}");
        table.push_str(&format!(
            "{scenario} | {} | {}\n",
            tally(plain),
            tally(pgtest)
        ));
        if DETERMINED.contains(&scenario) {
            assert!(
                plain.iter().all(|outcome| *outcome == plain[0]),
                "{scenario}: the plain pool itself varied:{table}"
            );
            if pgtest.iter().any(|outcome| *outcome != plain[0]) {
                mismatches.push(scenario);
            }
        }
        if scenario == "set_then_a_spawned_reader" && fresh(plain) * 2 >= RUNS && fresh(pgtest) == 0
        {
            mismatches.push(scenario);
        }
    }
    println!("{table}");
    assert!(
        mismatches.is_empty(),
        "pgtest's pool differs from the plain pool in {mismatches:?}:{table}"
    );
}

/// How many runs had each outcome.
fn tally(outcomes: &[String]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for outcome in outcomes {
        *counts.entry(outcome).or_default() += 1;
    }
    counts
        .iter()
        .map(|(outcome, count)| format!("{count}/{RUNS} {outcome}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// The fixtures connect over the unix socket, where logins are trusted: a
// debug build's password exchanges would cost more than the scenarios.

fn fixtures() -> Vec<String> {
    SCENARIOS
        .iter()
        .flat_map(|scenario| (0..RUNS).map(move |run| format!("oracle::{scenario}::r{run:02}")))
        .collect()
}

#[test]
fn the_drop_ins_pool_hands_out_connections_as_sqlxs_with_a_process_per_test() {
    let cluster = Cluster::start(&[]);
    let fixtures = fixtures();
    // Two at a time, as nextest on this file's two cores.
    let outputs = run_at_most(fixtures.len(), 2, |index| {
        let mut command = cluster.exact(&fixtures[index]);
        command.env("PGTEST_DATABASE_URL", cluster.socket_url());
        command
    });
    let mut printed = String::new();
    for output in &outputs {
        assert_passed(output, 1);
        printed.push_str(&text(output));
    }
    check("a process per test", &outcomes(&printed));
}

#[test]
fn the_drop_ins_pool_hands_out_connections_as_sqlxs_on_threads_of_one_process() {
    let cluster = Cluster::start(&[]);
    let child = cluster
        .fixture("oracle::")
        .env("PGTEST_DATABASE_URL", cluster.socket_url())
        .spawn()
        .expect("run the fixtures");
    let output = finish(child, Duration::from_secs(600));
    assert_passed(&output, SCENARIOS.len() * RUNS);
    check("threads of one process", &outcomes(&text(&output)));
}

/// What `#[sqlx::test]` connects with: the URL, naming the test's database.
fn sqlx_tests_options(database: &str) -> PgConnectOptions {
    let url = std::env::var("PGTEST_DATABASE_URL").expect("the driver sets the URL");
    url.parse::<PgConnectOptions>()
        .expect("a URL")
        .database(database)
}

/// The settings of a connection of the test's pool that differ from those
/// of a connection made as `#[sqlx::test]` makes them, to the same
/// database.
#[pgtest::sqlx_test(migrations = false)]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_settings_beside_sqlx_tests(pool: PgPool) -> Result<(), sqlx::Error> {
    let database: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await?;
    let settings = "select name, setting from pg_settings order by name";
    let ours: Vec<(String, String)> = sqlx::query_as(settings).fetch_all(&pool).await?;
    let mut theirs = PgConnection::connect_with(&sqlx_tests_options(&database)).await?;
    let sqlxs: Vec<(String, String)> = sqlx::query_as(settings).fetch_all(&mut theirs).await?;
    theirs.close().await?;
    for (name, setting) in &ours {
        if !sqlxs.contains(&(name.clone(), setting.clone())) {
            println!("differs {name}");
        }
    }
    for (name, _) in &sqlxs {
        if !ours.iter().any(|(ours, _)| ours == name) {
            println!("differs {name}");
        }
    }
    Ok(())
}

#[test]
fn the_drop_ins_connections_differ_from_sqlxs_only_in_the_name_and_tenant() {
    let cluster = Cluster::start(&[]);
    let output = common::run(cluster.exact("fixture_settings_beside_sqlx_tests"));
    assert_passed(&output, 1);
    let printed = text(&output);
    let differs: Vec<&str> = printed
        .lines()
        .filter_map(|line| line.strip_prefix("differs "))
        .collect();
    // `pgtest.tenant_id` is a setting only once set, and pg_settings lists
    // none of those: it differs too, but is not listed.
    assert_eq!(differs, ["application_name"], "{printed}");
}
