//! A new project, made from scratch the way a user would, depends on pgtest
//! by path and runs its suite twice, with a migration edited in between and
//! no rebuild: the second run builds and uses a new shared database.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cluster, assert_passed, finish, text};

const MANIFEST: &str = r#"
[package]
name = "fresh-app"
version = "0.1.0"
edition = "2024"
publish = false

[dev-dependencies]
pgtest = { path = "PGTEST_PATH" }
sqlx = { version = "0.9", default-features = false, features = ["postgres", "runtime-tokio"] }

[workspace]
"#;

const SUITE: &str = r#"
use pgtest::{PgPool, pg_test};

#[pg_test]
async fn sees_the_migrated_things(pool: PgPool) -> Result<(), sqlx::Error> {
    let expected: i64 = std::env::var("EXPECTED_THINGS").unwrap().parse().unwrap();
    let things: i64 = sqlx::query_scalar("select count(*) from things").fetch_one(&pool).await?;
    assert_eq!(things, expected);
    Ok(())
}
"#;

const MIGRATION: &str = "migrations/20250101000000_things.sql";

fn write(root: &Path, path: &str, contents: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// Builds the project's test binary in a target directory of its own
/// (kept between runs, so only the first run compiles the dependencies).
fn build_tests(project: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = repo.join("target").join("pgtest-it-new-project");
    let child = Command::new(env!("CARGO"))
        .args([
            "test",
            "--no-run",
            "--offline",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(project)
        .env("CARGO_TARGET_DIR", &target)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cargo");
    let output = finish(child, Duration::from_secs(900));
    assert!(
        output.status.success(),
        "the new project does not build:\n{}",
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            line.contains("\"reason\":\"compiler-artifact\"")
                && line.contains("\"kind\":[\"test\"]")
        })
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .expect("cargo names the test executable")
}

fn run_suite(binary: &Path, cluster: &Cluster, expected_things: u32) {
    let child = Command::new(binary)
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", cluster.url())
        .env("EXPECTED_THINGS", expected_things.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the suite");
    assert_passed(&finish(child, Duration::from_secs(60)), 1);
}

#[test]
fn an_edited_migration_gets_a_new_database_without_a_rebuild() {
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    write(
        root,
        "Cargo.toml",
        &MANIFEST.replace("PGTEST_PATH", env!("CARGO_MANIFEST_DIR")),
    );
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    write(root, "src/lib.rs", "");
    write(root, "tests/things.rs", SUITE);
    write(
        root,
        MIGRATION,
        "create table things (id int);\ninsert into things values (1);\n",
    );
    let binary = build_tests(root);

    let cluster = Cluster::start(&[]);
    run_suite(&binary, &cluster, 1);
    let first = cluster.pgtest_databases();
    assert_eq!(first.len(), 2, "a template and the run's copy: {first:?}");
    assert!(first[0].starts_with("pgtest_fresh_app_"), "{first:?}");

    write(
        root,
        MIGRATION,
        "create table things (id int);\ninsert into things values (1), (2);\n",
    );
    run_suite(&binary, &cluster, 2);
    let second = cluster.pgtest_databases();
    let new: Vec<&String> = second.iter().filter(|name| !first.contains(name)).collect();
    assert_eq!(
        new.len(),
        2,
        "a second template and copy for the edited migrations: {second:?}"
    );
    let copy = new.iter().find(|name| name.contains("_r")).unwrap();
    assert_eq!(cluster.psql_in(copy, "select count(*) from things"), "2");
}
