//! Compile time: one test file of N tests (the suite's body, migrations
//! from a directory) per attribute, `#[pg_test]`, `#[pgtest::sqlx_test]`
//! and `#[sqlx::test]`, and of the same bodies without one (see [`FILES`]),
//! in a crate of its own beside the suite (its dependencies built once,
//! shared with the suite). For each, in turn, run after run: the build of
//! the test binary from scratch and the rebuild after editing one test's
//! body, both as `cargo test --no-run` with cargo's defaults for the dev
//! profile (incremental), timed as wall time and as the CPU time of cargo
//! and the compiler (`getrusage` of the harness's children); then the size
//! of what the crate expands to, as the compiler's MIR of the test binary
//! (`--emit=mir`, stable rustc: every function the attributes and their
//! macros generate, the bodies included, before generic code of other
//! crates is instantiated), and the size of the test binary (which holds
//! those instances too).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{rusage, suite};

/// The attributes compared, then the baseline: the suite's flavour that
/// writes each, and how the table names it. The baseline (`body`) has the
/// same bodies, each in an async fn whose future a plain `#[test]` would
/// poll (so that it is compiled, as under any attribute) but does not run:
/// what each attribute costs is measured above it.
pub(crate) const FILES: [(&str, &str); 4] = [
    ("pgtest", "`#[pg_test]`"),
    ("pgtestsqlx", "`#[pgtest::sqlx_test]`"),
    ("sqlx", "`#[sqlx::test]`"),
    ("body", "no attribute (the bodies alone)"),
];

/// One build and rebuild of one attribute's file.
pub(crate) struct Build {
    pub(crate) build_wall: Duration,
    pub(crate) build_cpu: Duration,
    pub(crate) rebuild_wall: Duration,
    pub(crate) rebuild_cpu: Duration,
    pub(crate) binary_bytes: u64,
}

/// Each file's builds and the size of its MIR, in [`FILES`]' order.
pub(crate) struct Figures {
    pub(crate) tests: usize,
    pub(crate) builds: Vec<Vec<Build>>,
    pub(crate) mir_bytes: Vec<u64>,
}

/// Measures `tests` tests per attribute, `runs` times, in `work/compile`.
pub(crate) async fn measure(
    repo: &Path,
    work: &Path,
    tests: usize,
    runs: usize,
) -> anyhow::Result<Figures> {
    let dir = work.join("compile");
    suite::write_crate(&dir, "bench-compile", repo)?;
    std::fs::copy(repo.join("Cargo.lock"), dir.join("Cargo.lock"))?;
    for (flavour, _) in FILES {
        write_file(&dir, flavour, tests, None)?;
    }
    eprintln!("compile time: building {tests} tests per attribute once (dependencies)");
    cargo(&dir, work, &["test", "--no-run", "--quiet"])
        .await?
        .ok()?;
    let mut builds: Vec<Vec<Build>> = FILES.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (index, (flavour, name)) in FILES.iter().enumerate() {
            let clean = ["clean", "--quiet", "-p", "bench-compile"];
            cargo(&dir, work, &clean).await?.ok()?;
            write_file(&dir, flavour, tests, None)?;
            let build = cargo(&dir, work, &build_args(flavour)).await?.ok()?;
            write_file(&dir, flavour, tests, Some(run))?;
            let rebuild = cargo(&dir, work, &build_args(flavour)).await?.ok()?;
            let binary = executable(&rebuild.printed)
                .with_context(|| format!("cargo named no test binary for {name}"))?;
            eprintln!(
                "compile run {run} {name}: build {:.1} s, rebuild {:.1} s",
                build.wall.as_secs_f64(),
                rebuild.wall.as_secs_f64()
            );
            builds[index].push(Build {
                build_wall: build.wall,
                build_cpu: build.cpu,
                rebuild_wall: rebuild.wall,
                rebuild_cpu: rebuild.cpu,
                binary_bytes: std::fs::metadata(binary)?.len(),
            });
        }
    }
    let mut mir_bytes = Vec::new();
    for (flavour, _) in FILES {
        let args = ["rustc", "--quiet", "--test", flavour, "--", "--emit=mir"];
        cargo(&dir, work, &args).await?.ok()?;
        let mir = newest(&work.join("target/debug/deps"), flavour, "mir")
            .with_context(|| format!("rustc wrote no MIR for {flavour}"))?;
        mir_bytes.push(std::fs::metadata(mir)?.len());
    }
    Ok(Figures {
        tests,
        builds,
        mir_bytes,
    })
}

fn build_args(flavour: &str) -> [&str; 5] {
    [
        "test",
        "--no-run",
        "--message-format=json",
        "--test",
        flavour,
    ]
}

/// Writes the attribute's file of `tests` tests; `edit` changes one
/// test's body (a string in its first query), as a developer would.
fn write_file(dir: &Path, flavour: &str, tests: usize, edit: Option<usize>) -> anyhow::Result<()> {
    let names = (0..tests).map(|test| format!("case_{test}"));
    let mut file = suite::test_file(flavour, names, suite::BODY)?;
    if let Some(run) = edit {
        file = file.replacen("'acme'", &format!("'acme {run}'"), 1);
    }
    std::fs::write(dir.join("tests").join(format!("{flavour}.rs")), file)?;
    Ok(())
}

/// A finished cargo command.
struct Finished {
    wall: Duration,
    cpu: Duration,
    printed: String,
    success: bool,
}

impl Finished {
    fn ok(self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.success,
            "cargo failed:\n{}",
            self.printed
                .lines()
                .filter(|line| !line.starts_with('{'))
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(self)
    }
}

/// Runs cargo in `dir` with the suite's target directory and incremental
/// builds (cargo's default for the dev profile, which `CARGO_INCREMENTAL`
/// may have turned off), timed.
async fn cargo(dir: &Path, work: &Path, args: &[&str]) -> anyhow::Result<Finished> {
    let mut command = crate::cargo(dir, work, args);
    command
        .env("CARGO_INCREMENTAL", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cpu = rusage::children_cpu();
    let started = Instant::now();
    let output = command.output().await?;
    Ok(Finished {
        wall: started.elapsed(),
        cpu: rusage::children_cpu().saturating_sub(cpu),
        printed: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        success: output.status.success(),
    })
}

/// The test binary cargo's JSON messages name.
fn executable(printed: &str) -> Option<PathBuf> {
    printed
        .lines()
        .filter_map(|line| line.split("\"executable\":\"").nth(1)?.split('"').next())
        .next_back()
        .map(PathBuf::from)
}

/// The newest `<stem>-<hash>.<extension>` in `dir`.
fn newest(dir: &Path, stem: &str, extension: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&format!("{stem}-")) && name.ends_with(&format!(".{extension}"))
        })
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .map(|entry| entry.path())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn the_test_binary_is_the_one_cargo_names_last() {
        let printed = r#"{"reason":"compiler-artifact","executable":null}
{"reason":"compiler-artifact","target":{"name":"pgtest"},"executable":"/t/debug/deps/pgtest-0123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            super::executable(printed),
            Some(PathBuf::from("/t/debug/deps/pgtest-0123"))
        );
        assert_eq!(super::executable("Finished"), None);
    }
}
