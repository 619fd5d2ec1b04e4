//! CPU time of each test process, from the runner's side: the harness
//! binary is the target runner (`CARGO_TARGET_<triple>_RUNNER`) of the
//! runs it times, which `cargo nextest run` and `cargo test` both honour.
//! Each process they start is started by this runner, which waits for it
//! and appends a line with its user and system time (`getrusage` of its
//! children once it is reaped: the kernel's own accounting, to the
//! microsecond, of the test process and whatever it waited for; not the
//! runner's own start-up) to a file the harness reads after the run.
//!
//! Why not the alternatives: `/usr/bin/time` prints hundredths of a second,
//! too coarse for tests of a few ms each; the harness's own `getrusage` of
//! its children adds cargo's and nextest's time (listing the binaries,
//! scheduling) to the tests'; nextest's JUnit report and libtest's output
//! give wall times only.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Names the file the runner appends its lines to.
const RECORDS_VAR: &str = "PGTEST_BENCH_RUSAGE";
/// The first argument that makes the harness a runner.
const RUNNER_ARG: &str = "--as-runner";

/// What the processes of one run used.
#[derive(Clone, Copy, Default)]
pub(crate) struct Usage {
    /// User and system time of the processes that ran tests.
    pub(crate) cpu: Duration,
    /// How many processes ran tests (nextest: one per test; cargo test:
    /// one per binary), not counting those that listed them (nextest runs
    /// each binary with `--list` first).
    pub(crate) processes: usize,
}

/// The runner's work, when the harness was started as one: runs the
/// command in `args`, records its time, exits with its status.
pub(crate) fn run_if_runner() {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|arg| arg != RUNNER_ARG) {
        return;
    }
    let args: Vec<OsString> = args.collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("pgtest-bench {RUNNER_ARG}: no command");
        std::process::exit(2);
    };
    let status = Command::new(program).args(rest).status();
    let status = status.unwrap_or_else(|error| {
        eprintln!("pgtest-bench {RUNNER_ARG}: cannot run {program:?}: {error}");
        std::process::exit(2);
    });
    let cpu = children_cpu();
    let kind = match rest.iter().any(|arg| arg == "--list") {
        true => "list",
        false => "run",
    };
    if let Some(file) = std::env::var_os(RECORDS_VAR) {
        let line = format!(
            "{kind}\t{}\t{}\n",
            cpu.as_micros(),
            Path::new(program).file_name().unwrap_or_default().display()
        );
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(error) = appended {
            eprintln!("pgtest-bench {RUNNER_ARG}: cannot write {file:?}: {error}");
        }
    }
    use std::os::unix::process::ExitStatusExt as _;
    std::process::exit(
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    );
}

/// User and system time of this process's reaped children (for the
/// harness: cargo, and all it waited for).
pub(crate) fn children_cpu() -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value passed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The environment that makes runs started with it go through this runner
/// and record into `records`.
pub(crate) fn runner_env(records: &Path) -> anyhow::Result<Vec<(String, OsString)>> {
    let version = Command::new("rustc").arg("-vV").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .ok_or_else(|| anyhow::anyhow!("rustc -vV names no host"))?;
    let var = format!(
        "CARGO_TARGET_{}_RUNNER",
        host.to_uppercase().replace(['-', '.'], "_")
    );
    let mut runner = OsString::from(std::env::current_exe()?);
    anyhow::ensure!(
        !runner.to_string_lossy().contains(char::is_whitespace),
        "the harness's path has a space, which cargo would split the runner at"
    );
    runner.push(" ");
    runner.push(RUNNER_ARG);
    Ok(vec![
        (var, runner),
        (RECORDS_VAR.to_owned(), records.as_os_str().to_owned()),
    ])
}

/// What the runner recorded in `records`.
pub(crate) fn read(records: &Path) -> Usage {
    let text = std::fs::read_to_string(records).unwrap_or_default();
    let mut usage = Usage::default();
    for line in text.lines() {
        let mut fields = line.split('\t');
        let (Some(kind), Some(Ok(cpu))) = (fields.next(), fields.next().map(str::parse::<u64>))
        else {
            continue;
        };
        if kind == "run" {
            usage.cpu += Duration::from_micros(cpu);
            usage.processes += 1;
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn listings_are_counted_apart_from_test_processes() {
        let dir = std::env::temp_dir().join(format!("pgtest-bench-rusage-{}", std::process::id()));
        std::fs::write(
            &dir,
            "list\t1500\tpgtest_0-abc\nrun\t10250\tpgtest_0-abc\nrun\t9750\tpgtest_1-def\nbroken\n",
        )
        .unwrap();
        let usage = super::read(&dir);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(usage.processes, 2);
        assert_eq!(usage.cpu, Duration::from_micros(20_000));
    }
}
