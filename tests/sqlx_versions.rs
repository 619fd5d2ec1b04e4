//! The example suites, copied into workspaces of their own whose crates are
//! on sqlx 0.8, or on 0.8 and 0.9 side by side (so that pgtest is built
//! with both runtimes), pass under `cargo test` as they do in this
//! workspace on sqlx 0.9; so does `tests/pool_oracle.rs`, the drop-in's
//! pool against sqlx's.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{Cluster, finish, text};

/// The sqlx dependency of a crate on `version`, with the features the
/// examples use.
fn sqlx(version: &str) -> String {
    format!(
        r#"sqlx = {{ version = "{version}", default-features = false, features = ["postgres", "runtime-tokio", "migrate", "uuid"] }}"#
    )
}

/// pgtest with the feature for `version`; with its default features when
/// `version` is `None`.
fn pgtest(version: Option<&str>) -> String {
    let repo = env!("CARGO_MANIFEST_DIR");
    match version {
        Some(version) => {
            let feature = version.replace('.', "_");
            format!(
                r#"pgtest = {{ path = "{repo}", default-features = false, features = ["sqlx-{feature}"] }}"#
            )
        }
        None => format!(r#"pgtest = {{ path = "{repo}" }}"#),
    }
}

/// The tokio of the crates these tests build.
const TOKIO: &str = r#"tokio = { version = "1", features = ["rt", "time", "sync", "macros"] }"#;

/// The `[package]` section of a crate named `name`.
fn package(name: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n"
    )
}

/// Copies `examples/<name>` into `workspace`, on sqlx `version` (`+` after
/// it: with pgtest's default features instead of that version's).
fn add_example(workspace: &Path, name: &str, version: &str) {
    let (version, pgtest_version) = match version.strip_suffix('+') {
        Some(version) => (version, None),
        None => (version, Some(version)),
    };
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let to = workspace.join(name);
    copy_dir(&from, &to);
    let manifest = format!(
        "{package}\n[dependencies]\n{sqlx}\n{TOKIO}\n\n[dev-dependencies]\nanyhow = \"1\"\n{pgtest}\n",
        package = package(&format!("pgtest-example-{name}")),
        sqlx = sqlx(version),
        pgtest = pgtest(pgtest_version),
    );
    fs::write(to.join("Cargo.toml"), manifest).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A workspace of the `examples` on their sqlx versions, its suites run
/// with `cargo test` against `cluster`; returns how many tests passed.
fn run_workspace(cluster: &Cluster, examples: &[(&str, &str)]) -> usize {
    let (output, shown) = cargo_test(cluster, examples);
    assert!(output.status.success(), "the suites failed:\n{shown}");
    shown
        .lines()
        .filter_map(|line| line.strip_prefix("test result: ok. "))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

/// `cargo test` in a workspace of the `examples`; its output and text.
fn cargo_test(cluster: &Cluster, examples: &[(&str, &str)]) -> (Output, String) {
    let workspace = tempfile::tempdir().unwrap();
    let members: Vec<String> = examples
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    fs::write(
        workspace.path().join("Cargo.toml"),
        format!(
            "[workspace]\nmembers = [{}]\nresolver = \"3\"\n",
            members.join(", ")
        ),
    )
    .unwrap();
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
        workspace.path().join("Cargo.lock"),
    )
    .unwrap();
    for (name, version) in examples {
        add_example(workspace.path(), name, version);
    }
    let child = common::project_cargo()
        .args(["test", "--workspace", "--offline"])
        .current_dir(workspace.path())
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", cluster.url())
        .env("TMPDIR", cluster.tmp_dir())
        .env("PGTEST_HOME", cluster.home())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo test");
    let output = finish(child, Duration::from_secs(1200));
    let shown = text(&output);
    (output, shown)
}

#[test]
fn the_example_suites_pass_on_sqlx_0_8() {
    let cluster = Cluster::start(&[]);
    fs::create_dir_all(cluster.tmp_dir()).unwrap();
    let passed = run_workspace(
        &cluster,
        &[("projects", "0.8"), ("blog", "0.8"), ("service", "0.8")],
    );
    // 6 + 11 + 9 tests.
    assert_eq!(passed, 26);
}

#[test]
fn crates_on_sqlx_0_8_and_0_9_share_a_workspace() {
    let cluster = Cluster::start(&[]);
    fs::create_dir_all(cluster.tmp_dir()).unwrap();
    // Features unify: pgtest is built with both runtimes, and each test
    // runs on its own sqlx's. (A crate on 0.8 in such a workspace names
    // its context `pgtest::sqlx_0_8::TestContext`; projects takes one.)
    let passed = run_workspace(&cluster, &[("projects", "0.9"), ("blog", "0.8")]);
    assert_eq!(passed, 17);
}

#[test]
fn the_drop_ins_pool_hands_out_connections_as_sqlxs_on_sqlx_0_8() {
    let workspace = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = workspace.path().join("tests");
    fs::create_dir_all(tests.join("common")).unwrap();
    fs::copy(
        repo.join("tests/pool_oracle.rs"),
        tests.join("pool_oracle.rs"),
    )
    .unwrap();
    fs::copy(
        repo.join("tests/common/mod.rs"),
        tests.join("common/mod.rs"),
    )
    .unwrap();
    fs::create_dir_all(workspace.path().join("src")).unwrap();
    fs::write(workspace.path().join("src/lib.rs"), "").unwrap();
    fs::copy(repo.join("Cargo.lock"), workspace.path().join("Cargo.lock")).unwrap();
    let manifest = format!(
        "{package}\n[dev-dependencies]\n{sqlx}\n{pgtest}\n{TOKIO}\ntempfile = \"3\"\n\n[workspace]\n",
        package = package("pgtest-pool-oracle"),
        sqlx = sqlx("0.8"),
        pgtest = pgtest(Some("0.8")),
    );
    fs::write(workspace.path().join("Cargo.toml"), manifest).unwrap();
    let child = common::project_cargo()
        .args([
            "test",
            "--offline",
            "--test",
            "pool_oracle",
            "--",
            "--nocapture",
        ])
        .current_dir(workspace.path())
        .env_remove("DATABASE_URL")
        .env_remove("PGTEST_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo test");
    let output = finish(child, Duration::from_secs(1200));
    let shown = text(&output);
    assert!(
        output.status.success(),
        "the oracle failed on sqlx 0.8:\n{shown}"
    );
    // Its tables, for the record.
    for line in shown.lines().filter(|line| line.contains(" | ")) {
        println!("{line}");
    }
    assert!(
        shown.contains("test result: ok. 3 passed"),
        "expected the oracle's three tests:\n{shown}"
    );
}

#[test]
fn a_crate_on_sqlx_0_8_without_the_feature_is_told_which_to_enable() {
    let cluster = Cluster::start(&[]);
    let (output, shown) = cargo_test(&cluster, &[("service", "0.8+")]);
    assert!(!output.status.success(), "it built:\n{shown}");
    for part in [
        "`#[pg_test]` does not support a test with the signature",
        "on sqlx 0.9",
        r#"default-features = false, features = ["sqlx-0_8"]"#,
    ] {
        assert!(shown.contains(part), "expected {part:?} in:\n{shown}");
    }
    // The feature to turn on leads, before the list of signatures.
    let feature = shown.find("default-features = false").unwrap();
    let signatures = shown.find("a #[pg_test] fn is async").unwrap();
    assert!(feature < signatures, "{shown}");
}
