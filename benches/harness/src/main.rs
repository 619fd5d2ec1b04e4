//! Runs one generated suite as `#[pg_test]`, `#[sqlx::test]` and plain
//! `#[tokio::test]` with a pre-migrated database, under `cargo nextest run
//! -j J` and `cargo test -- --test-threads=J`, against a server started with
//! `max_connections = 100`, and prints a markdown table of medians. After
//! each run it waits for pgtest's spares helper and reports how long it
//! worked. With `--new-server`, each run gets a new server and a new
//! pgtest home, as a CI run does: nothing of pgtest's exists.
//!
//! ```text
//! cargo run -p pgtest-bench --release -- [--tests 200] [--binaries 8] [--jobs 16,64] [--runs 3] [--cargo-test] [--via-library] [--new-server] [--server fsync=off]
//! cargo run -p pgtest-bench -- --smoke
//! ```

mod compile;
mod report;
mod rusage;
mod server;
mod suite;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

use crate::server::Server;
use crate::suite::FLAVOURS;

const USAGE: &str = "\
usage: cargo run -p pgtest-bench --release -- [options]
  --tests N          tests per flavour (200)
  --binaries N       test binaries the suite is split into (8)
  --jobs J[,J…]      tests at once: nextest -j J, cargo test --test-threads=J (16)
  --runs N           runs of each flavour; the table shows medians (3)
  --flavours LIST    some of pgtest,pgtestdb,pgtesttx,pgtestsqlx,sqlx,plain,floor (all), or none
  --cargo-test       also run each flavour under cargo test
  --new-server       a new server and pgtest home for each run, as in CI
  --via-library      the bodies' queries run in a function of the suite's library
  --compile N        first, the build, rebuild and expanded size of N tests per
                     attribute (#[pg_test], #[pgtest::sqlx_test], #[sqlx::test]), --runs times
  --server NAME=VALUE  a setting of the server (repeatable), e.g. fsync=off
  --pgtest DIR       the pgtest to measure: a checkout of another revision, say
                     (this one's by default); the work goes in its target/
  --smoke            4 tests per flavour, one run of each runner, 6 tests per
                     attribute compiled once: checks the harness
";

pub(crate) struct Options {
    pub(crate) tests: usize,
    pub(crate) binaries: usize,
    pub(crate) jobs: Vec<usize>,
    pub(crate) runs: usize,
    pub(crate) cargo_test: bool,
    pub(crate) flavours: Vec<&'static str>,
    pub(crate) via_library: bool,
    pub(crate) new_server: bool,
    pub(crate) compile: Option<usize>,
    /// Settings of the server, `NAME=VALUE`.
    pub(crate) server: Vec<String>,
    /// The checkout of pgtest the suite depends on (this one by default).
    pub(crate) pgtest: Option<PathBuf>,
}

/// One flavour's run.
pub(crate) struct Sample {
    pub(crate) wall: Duration,
    /// How long pgtest's spares helper worked once the run was over.
    pub(crate) after: Duration,
    /// The server's time in the helper's sessions, from its log.
    pub(crate) helper_sessions: Duration,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) peak: i64,
    pub(crate) refusals: usize,
    pub(crate) connections: usize,
    pub(crate) leftover: i64,
    /// Test databases the run used that pgtest retired (dropped, not put
    /// back for the next test).
    pub(crate) retired: usize,
    /// What the test processes used, as their runner saw it.
    pub(crate) tests: rusage::Usage,
    /// The server's CPU time during the run (the harness's sessions not
    /// counted).
    pub(crate) server_cpu: Duration,
    /// The CPU time of cargo, the runner and the test processes together.
    pub(crate) client_cpu: Duration,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        tests: 200,
        binaries: 8,
        jobs: vec![16],
        runs: 3,
        cargo_test: false,
        flavours: FLAVOURS.to_vec(),
        via_library: false,
        new_server: false,
        compile: None,
        server: Vec::new(),
        pgtest: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing");
        match arg.as_str() {
            "--tests" => options.tests = value()?.parse()?,
            "--binaries" => options.binaries = value()?.parse()?,
            "--jobs" => {
                options.jobs = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--runs" => options.runs = value()?.parse()?,
            "--cargo-test" => options.cargo_test = true,
            "--via-library" => options.via_library = true,
            "--new-server" => options.new_server = true,
            "--compile" => options.compile = Some(value()?.parse()?),
            "--pgtest" => options.pgtest = Some(PathBuf::from(value()?).canonicalize()?),
            "--server" => {
                let setting = value()?;
                if !setting.contains('=') || setting.contains(char::is_whitespace) {
                    bail!("--server takes NAME=VALUE, got {setting}");
                }
                options.server.push(setting);
            }
            "--flavours" => {
                let wanted = value()?;
                let wanted = match wanted.as_str() {
                    "none" => String::new(),
                    _ => wanted,
                };
                if let Some(unknown) = wanted
                    .split(',')
                    .find(|w| !w.is_empty() && !FLAVOURS.contains(w))
                {
                    bail!(
                        "unknown flavour {unknown}; the flavours are {}",
                        FLAVOURS.join(",")
                    );
                }
                options.flavours = FLAVOURS
                    .into_iter()
                    .filter(|f| wanted.split(',').any(|w| w == *f))
                    .collect();
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--smoke" => {
                options = Options {
                    tests: 4,
                    binaries: 2,
                    jobs: vec![4],
                    runs: 1,
                    cargo_test: true,
                    flavours: FLAVOURS.to_vec(),
                    via_library: options.via_library,
                    new_server: options.new_server,
                    compile: Some(6),
                    server: options.server.clone(),
                    pgtest: options.pgtest.clone(),
                }
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn main() -> anyhow::Result<()> {
    rusage::run_if_runner();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let options = parse_options()?;
    let repo = match &options.pgtest {
        Some(checkout) => checkout.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()?,
    };
    let work = repo.join("target/pgtest-bench");
    let compiled = match options.compile {
        Some(tests) => Some(compile::measure(&repo, &work, tests, options.runs).await?),
        None => None,
    };
    if !options.flavours.is_empty() {
        let rows = run_flavours(&options, &repo, &work).await?;
        report::print(&options, &rows);
    }
    if let Some(figures) = compiled {
        report::print_compile(&figures, options.runs);
    }
    Ok(())
}

/// Generates and builds the suite, runs each flavour under each runner,
/// `--runs` times, on a server of the harness's own.
async fn run_flavours(
    options: &Options,
    repo: &Path,
    work: &Path,
) -> anyhow::Result<Vec<report::Row>> {
    let suite_dir = work.join("suite");
    eprintln!(
        "generating {} tests per flavour in {}",
        options.tests,
        suite_dir.display()
    );
    suite::write(
        &suite_dir,
        repo,
        options.tests,
        options.binaries,
        options.via_library,
    )?;
    std::fs::copy(repo.join("Cargo.lock"), suite_dir.join("Cargo.lock"))?;

    // Long before the first server starts (see `server::set_aside`).
    server::empty_trash(&work.join("server"));
    eprintln!("building the suite (the first time compiles its dependencies)");
    let build = cargo(&suite_dir, work, &["test", "--no-run", "--quiet"])
        .status()
        .await?;
    anyhow::ensure!(build.success(), "the generated suite does not build");

    let (mut server, mut admin) = start_server(work, &suite_dir, &options.server).await?;

    let mut rows = Vec::new();
    let runners: &[&str] = if options.cargo_test {
        &["nextest", "cargo test"]
    } else {
        &["nextest"]
    };
    for &jobs in &options.jobs {
        for &runner in runners {
            let mut samples: Vec<Vec<Sample>> =
                options.flavours.iter().map(|_| Vec::new()).collect();
            for run in 0..options.runs {
                for (index, flavour) in options.flavours.iter().enumerate() {
                    if options.new_server {
                        let _ = admin.close().await;
                        drop(server);
                        let _ = std::fs::remove_dir_all(work.join("home"));
                        (server, admin) = start_server(work, &suite_dir, &options.server).await?;
                    }
                    let sample =
                        measure(&server, &mut admin, &suite_dir, work, flavour, runner, jobs)
                            .await?;
                    eprintln!(
                        "{runner} -j {jobs} run {run} {flavour}: {:.2} s, {} passed, {} failed",
                        sample.wall.as_secs_f64(),
                        sample.passed,
                        sample.failed
                    );
                    samples[index].push(sample);
                }
            }
            rows.push((runner, jobs, samples));
        }
    }
    drop(server);
    server::empty_trash(&work.join("server"));
    Ok(rows)
}

/// A new server in `work`, with the plain flavour's database migrated.
async fn start_server(
    work: &Path,
    suite_dir: &Path,
    settings: &[String],
) -> anyhow::Result<(Server, PgConnection)> {
    let server = Server::start(
        &work.join("server"),
        20000 + (std::process::id() % 20000) as u16,
        settings,
    )?;
    let mut admin = PgConnection::connect(&server.url("postgres")).await?;
    sqlx::query("create database bench_plain")
        .execute(&mut admin)
        .await?;
    let mut plain = PgConnection::connect(&server.url("bench_plain")).await?;
    Migrator::new(suite::migrations_dir(suite_dir))
        .await?
        .run(&mut plain)
        .await?;
    plain.close().await?;
    Ok((server, admin))
}

/// Cargo in `suite_dir`, building as a new project would: cargo's own
/// settings for its profiles, whatever this shell's environment says
/// (`CARGO_PROFILE_DEV_DEBUG`, `RUSTFLAGS`, compiler wrappers and the like
/// change what is measured: line tables alone halve the build of a test
/// binary). The machine's cargo configuration files still apply.
fn cargo(suite_dir: &Path, work: &Path, args: &[&str]) -> Command {
    const BUILD_SETTINGS: [&str; 8] = [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_INCREMENTAL",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    ];
    let mut command = Command::new(env!("CARGO"));
    // The rustc beside the cargo this harness was built with: run directly
    // (not under `cargo run`, which names its toolchain to its children),
    // rustup's `rustc` would follow a dependency's own `rust-toolchain.toml`
    // (atoi's names 1.57).
    let rustc = Path::new(env!("CARGO")).with_file_name("rustc");
    if rustc.is_file() && std::env::var_os("RUSTC").is_none() {
        command.env("RUSTC", rustc);
    }
    command
        .args(args)
        .current_dir(suite_dir)
        .env("CARGO_TARGET_DIR", work.join("target"))
        .env_remove("DATABASE_URL")
        .env_remove("PGTEST_DATABASE_URL");
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        let target_flags = name.starts_with("CARGO_TARGET_") && name.ends_with("_RUSTFLAGS");
        if name.starts_with("CARGO_PROFILE_")
            || target_flags
            || BUILD_SETTINGS.contains(&name.as_ref())
        {
            command.env_remove(&key);
        }
    }
    command
}

async fn measure(
    server: &Server,
    admin: &mut PgConnection,
    suite_dir: &Path,
    work: &Path,
    flavour: &str,
    runner: &str,
    jobs: usize,
) -> anyhow::Result<Sample> {
    // Each flavour starts from a clean slate: the WAL that the one before
    // wrote (a copy of the template per test, say) is not its cost.
    sqlx::query("checkpoint").execute(&mut *admin).await?;
    let log_before = server.log().len();
    let leftover_before = test_databases(admin).await?;
    let jobs_arg = jobs.to_string();
    let pattern = format!("{flavour}_*");
    let mut command = match runner {
        "nextest" => {
            let filter = format!("binary(/^{flavour}_/)");
            let mut command = cargo(
                suite_dir,
                work,
                &[
                    "nextest",
                    "run",
                    "--no-fail-fast",
                    "-j",
                    &jobs_arg,
                    "-E",
                    &filter,
                ],
            );
            command
                .arg("--status-level=none")
                .arg("--final-status-level=none");
            command
        }
        _ => {
            let mut command = cargo(
                suite_dir,
                work,
                &[
                    "test",
                    "--no-fail-fast",
                    "--test",
                    &pattern,
                    "--",
                    "--test-threads",
                    &jobs_arg,
                ],
            );
            // pgtest takes the test binaries a `cargo test` starts for one
            // run by their parent, cargo; under the harness's runner (see
            // `rusage`) their parent is the runner, one per binary. The
            // run's id, as nextest would give it, keeps them one run.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let run = format!("cargo-test-{}-{}", std::process::id(), now.as_nanos());
            command.env("NEXTEST_RUN_ID", run);
            command
        }
    };
    let records = work.join("rusage");
    let _ = std::fs::remove_file(&records);
    command
        .env("DATABASE_URL", server.url("postgres"))
        .env("PGTEST_DATABASE_URL", server.url("postgres"))
        .env("PLAIN_DATABASE_URL", server.url("bench_plain"))
        .env("PGTEST_HOME", work.join("home"))
        .envs(rusage::runner_env(&records)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let peak = Arc::new(AtomicI64::new(0));
    let (sampler_pid, sampling) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample_connections(
        server.url("postgres"),
        peak.clone(),
        sampler_pid,
    ));
    // The harness's own sessions are not the run's work.
    let admin_pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *admin)
        .await?;
    let harness_sessions = [admin_pid, sampling.await?].map(|pid| pid as u32);
    let server_before = server.cpu(&harness_sessions);
    let client_before = rusage::children_cpu();
    let started = Instant::now();
    let output = command.output().await?;
    let wall = started.elapsed();
    let server_cpu = server.cpu(&harness_sessions).saturating_sub(server_before);
    let client_cpu = rusage::children_cpu().saturating_sub(client_before);
    sampler.abort();
    let after = wait_for_spares_helper(&work.join("home/budget")).await;

    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (passed, failed) = counts(&printed);
    if passed + failed == 0 {
        let tail: String = printed
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!("{runner} ran no {flavour} test (did the suite build?):\n{tail}");
    }
    let log = server.log();
    let log = &log[log_before..];
    let leftover = test_databases(admin).await? - leftover_before;
    let existing: Vec<String> = sqlx::query_scalar("select datname from pg_database")
        .fetch_all(&mut *admin)
        .await?;
    let retired = test_databases_used(log)
        .iter()
        .filter(|name| !existing.contains(name))
        .count();
    Ok(Sample {
        wall,
        after,
        helper_sessions: helper_sessions(log),
        passed,
        failed,
        peak: peak.load(Ordering::Relaxed),
        refusals: log.matches("too many clients").count()
            + log.matches("remaining connection slots").count(),
        // Less the sampler's own connection.
        connections: log
            .matches("connection authorized")
            .count()
            .saturating_sub(1),
        leftover,
        retired,
        tests: rusage::read(&records),
        server_cpu,
        client_cpu,
    })
}

/// The databases of pgtest's tests that sessions connected to, from the
/// `connection authorized: … database=NAME` lines of `log`: a test's own
/// copy of a template, `<template>_<8 hex>`, or a spare made ahead,
/// `<template>_s<7 hex>` (see pgtest-runtime/src/names.rs). One that is
/// gone after the run and its spares helper was retired: dropped rather
/// than put back for the next test.
fn test_databases_used(log: &str) -> std::collections::BTreeSet<String> {
    log.lines()
        .filter_map(|line| line.split("connection authorized: ").nth(1))
        .filter_map(|rest| rest.split(" database=").nth(1)?.split_whitespace().next())
        .filter(|name| {
            let Some((template, key)) = name.rsplit_once('_') else {
                return false;
            };
            let hex = |text: &str| text.bytes().all(|byte| byte.is_ascii_hexdigit());
            let key = key.strip_prefix('s').unwrap_or(key);
            template.starts_with("pgtest_") && (key.len() == 8 || key.len() == 7) && hex(key)
        })
        .map(str::to_owned)
        .collect()
}

/// The time the server spent in sessions of pgtest's spares helper (its
/// application name), from the `disconnection: session time: H:MM:SS.mmm`
/// lines of `log` (each line starts with the application's name).
fn helper_sessions(log: &str) -> Duration {
    log.lines()
        .filter(|line| line.contains("pgtest spares"))
        .filter_map(|line| {
            line.split("session time: ")
                .nth(1)?
                .split_whitespace()
                .next()
        })
        .filter_map(|time| {
            let mut parts = time.split(':');
            let (hours, minutes, seconds) = (parts.next()?, parts.next()?, parts.next()?);
            let seconds = hours.parse::<f64>().ok()? * 3600.0
                + minutes.parse::<f64>().ok()? * 60.0
                + seconds.parse::<f64>().ok()?;
            Some(Duration::from_secs_f64(seconds))
        })
        .sum()
}

/// Waits for pgtest's spares helper (see pgtest-runtime/src/spares.rs),
/// which drops passed tests' databases and copies templates once a run is
/// over, so that its work is neither charged to the next flavour nor
/// hidden; how long it worked.
async fn wait_for_spares_helper(budgets: &Path) -> Duration {
    let started = Instant::now();
    // A helper holds its lock file while it lives.
    let running = || {
        let Ok(servers) = std::fs::read_dir(budgets) else {
            return false;
        };
        servers
            .flatten()
            .filter_map(|server| std::fs::File::open(server.path().join("pgtest-spares.lock")).ok())
            .any(|lock| {
                matches!(
                    lock.try_lock_shared(),
                    Err(std::fs::TryLockError::WouldBlock)
                )
            })
    };
    // The helper starts its work 2 s after the last test process ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while running() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Per-test databases left on the server: sqlx's, and pgtest's (its tests'
/// databases, which a later run sweeps, and its spares).
async fn test_databases(admin: &mut PgConnection) -> anyhow::Result<i64> {
    let count = sqlx::query_scalar(
        "select count(*) from pg_database where datname like '\\_sqlx\\_test%' \
         or shobj_description(oid, 'pg_database') like 'pgtest: test database;%' \
         or shobj_description(oid, 'pg_database') like 'pgtest: spare database;%'",
    )
    .fetch_one(admin)
    .await?;
    Ok(count)
}

/// Samples the number of client connections every 10 ms, once it has
/// sent its session's process id to `pid`.
async fn sample_connections(
    url: String,
    peak: Arc<AtomicI64>,
    pid: tokio::sync::oneshot::Sender<i32>,
) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(&url).await?;
    let _ = pid.send(
        sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&mut connection)
            .await?,
    );
    loop {
        let now: i64 = sqlx::query_scalar(
            "select count(*) - 1 from pg_stat_activity where backend_type = 'client backend'",
        )
        .fetch_one(&mut connection)
        .await?;
        peak.fetch_max(now, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Passed and failed tests, from nextest's summary or libtest's lines.
fn counts(printed: &str) -> (usize, usize) {
    let mut passed = 0;
    let mut failed = 0;
    for line in printed.lines() {
        let line = line.trim();
        if line.starts_with("Summary [") {
            let tally = line.split_once("run: ").map_or("", |(_, tally)| tally);
            // "373 passed (2 slow), 75 failed, 3 skipped"
            let number = |word: &str| {
                tally
                    .split(", ")
                    .find_map(|part| {
                        let mut words = part.split_whitespace();
                        let count = words.next()?.parse().ok()?;
                        (words.next()? == word).then_some(count)
                    })
                    .unwrap_or(0)
            };
            return (number("passed"), number("failed"));
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let field = |word: &str| -> usize {
                rest.split(&[';', '.'][..])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += field("passed");
            failed += field("failed");
        }
    }
    (passed, failed)
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn nextest_summaries_are_counted_with_their_notes() {
        let printed =
            "     Summary [ 104.040s] 448 tests run: 373 passed (2 slow), 75 failed, 0 skipped";
        assert_eq!(counts(printed), (373, 75));
        assert_eq!(
            counts("Summary [ 1.0s] 4 tests run: 4 passed, 0 skipped"),
            (4, 0)
        );
    }

    #[test]
    fn libtest_results_are_added_up() {
        let printed = "test result: ok. 3 passed; 0 failed; 0 ignored\ntest result: FAILED. 1 passed; 2 failed;";
        assert_eq!(counts(printed), (4, 2));
    }
}
