//! New projects, made from scratch the way a user would: the README's
//! dependency lines, migration and test copied as they stand (in each form:
//! git, path, sqlx 0.8), and a project whose suite runs twice with a
//! migration edited in between and no rebuild, so that the second run builds
//! and uses a new shared database.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cluster, assert_passed, finish, text};

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
    let child = common::project_cargo()
        .args([
            "test",
            "--no-run",
            "--offline",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(project)
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
        &common::project_manifest("fresh-app", ""),
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

/// The fenced blocks under the README's heading `heading`, in order.
fn readme_blocks(heading: &str) -> Vec<String> {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read the README");
    let section = readme
        .split("\n## ")
        .find(|section| section.starts_with(heading))
        .expect("the README has the section");
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| block.split_once('\n').expect("a fenced block").1.to_owned())
        .collect()
}

/// A project of the README's `dependencies`, migration and test, its tests
/// run with `cargo test` against `cluster`.
fn run_readme_project(dir: &Path, dependencies: &str, cluster: &Cluster) {
    let blocks = readme_blocks("A minimal test");
    let [_, migration, test, ..] = &blocks[..] else {
        panic!("the README's minimal test has its migration and test: {blocks:?}");
    };
    write(
        dir,
        "Cargo.toml",
        &format!(
            "[package]\nname = \"readme-app\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\
             publish = false\n\n{dependencies}\n[workspace]\n"
        ),
    );
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
        dir.join("Cargo.lock"),
    )
    .unwrap();
    write(dir, "src/lib.rs", "");
    write(dir, "migrations/20250101000000_orgs.sql", migration);
    write(dir, "tests/orgs.rs", test);
    // Not offline: a git dependency is fetched, here from this checkout.
    assert_passed(&cargo_test(dir, &["--test", "orgs"], cluster), 1);
}

/// `cargo test args` in `dir`, in the projects' target directory, against
/// `cluster`.
fn cargo_test(dir: &Path, args: &[&str], cluster: &Cluster) -> std::process::Output {
    fs::create_dir_all(cluster.tmp_dir()).unwrap();
    let child = common::project_cargo()
        .arg("test")
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env("PGTEST_DATABASE_URL", cluster.url())
        .env("TMPDIR", cluster.tmp_dir())
        .env("PGTEST_HOME", cluster.home())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cargo");
    finish(child, Duration::from_secs(900))
}

#[test]
fn the_readme_example_runs_as_written() {
    let blocks = readme_blocks("A minimal test");
    let [dependencies, _, _, dependencies_0_8, ..] = &blocks[..] else {
        panic!("the README's minimal test has two dependency blocks: {blocks:?}");
    };
    let git = "https://github.com/pgtest-rs/pgtest";
    assert!(dependencies.contains(git) && dependencies_0_8.contains(git));
    // The git form, from this checkout's history instead of the network.
    let checkout = format!("file://{}", env!("CARGO_MANIFEST_DIR"));
    let from_here = |lines: &str| lines.replace(git, &checkout);
    // The path form, uncommented, for a checkout beside the project.
    let by_path = dependencies
        .replace("pgtest = { git", "# pgtest = { git")
        .replace("# pgtest = { path", "pgtest = { path");
    assert!(
        by_path.contains("\npgtest = { path = \"../pgtest\" }"),
        "{by_path}"
    );

    let cluster = Cluster::start(&[]);
    let projects = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_MANIFEST_DIR"), projects.path().join("pgtest")).unwrap();
    for (name, lines) in [
        ("git", from_here(dependencies)),
        ("path", by_path),
        ("sqlx-0.8", from_here(dependencies_0_8)),
    ] {
        run_readme_project(&projects.path().join(name), &lines, &cluster);
    }
}

/// Two tests of a package, in shared and in database isolation.
const NAMED_SUITE: &str = r#"
#[pgtest::pg_test]
async fn shared(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
    let things: i64 = sqlx::query_scalar("select count(*) from things").fetch_one(&pool).await?;
    assert_eq!(things, 1);
    Ok(())
}

#[pgtest::pg_test(isolation = "database")]
async fn own_database(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("insert into things values (2)").execute(&pool).await?;
    let things: i64 = sqlx::query_scalar("select count(*) from things").fetch_one(&pool).await?;
    assert_eq!(things, 2);
    Ok(())
}
"#;

#[test]
fn packages_with_names_of_any_length_pass_twice() {
    // PostgreSQL cuts names at 63 bytes; from 26 characters on, a run's
    // copy under construction once took its finished name.
    let mut names: Vec<String> = [1, 26, 33, 34, 35, 40, 70]
        .map(|length| "billing-service-integration-tests-v2-".repeat(2)[..length].to_owned())
        .into();
    names[0] = "b".to_owned();
    names.push("Billing-Service-MixedCase".to_owned());
    let workspace = tempfile::tempdir().unwrap();
    let root = workspace.path();
    let members: Vec<String> = (0..names.len())
        .map(|index| format!("\"m{index}\""))
        .collect();
    write(
        root,
        "Cargo.toml",
        &format!(
            "[workspace]\nresolver = \"3\"\nmembers = [{}]\n",
            members.join(", ")
        ),
    );
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    for (index, name) in names.iter().enumerate() {
        let member = root.join(format!("m{index}"));
        write(
            &member,
            "Cargo.toml",
            &common::project_manifest(name, "").replace("\n[workspace]\n", ""),
        );
        write(&member, "src/lib.rs", "");
        write(&member, "tests/names.rs", NAMED_SUITE);
        write(
            &member,
            MIGRATION,
            "create table things (id int);\ninsert into things values (1);\n",
        );
    }

    let cluster = Cluster::start(&[]);
    for run in ["first", "second"] {
        let args = ["--offline", "--workspace", "--test", "names"];
        let output = cargo_test(root, &args, &cluster);
        let printed = text(&output);
        assert!(
            output.status.success()
                && printed.matches("test result: ok. 2 passed").count() == names.len(),
            "{run} run: expected 2 passing tests in each of {} packages, got:\n{printed}",
            names.len()
        );
    }
    for name in cluster.pgtest_databases() {
        assert!(name.len() <= 63, "{name} was cut");
    }
}
