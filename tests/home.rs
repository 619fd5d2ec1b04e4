//! pgtest's home on a machine shared with other users: a home that another
//! user owns or may write to, one under a parent anyone may write to
//! without the sticky bit, or a symbolic link planted in it, is refused
//! with a message naming it, and pgtest writes nothing there. Needs root
//! (to give a directory to another user); without it the tests say they
//! were skipped.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Cluster, EmbeddedHome, assert_failed_without_password, assert_passed, run};
use nix::unistd::{Uid, User};
use pgtest::{PgPool, pg_test};

#[pg_test(migrations = false)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_home_one_query(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(&pool).await?;
    Ok(())
}

fn give_to_nobody(path: &Path) {
    let nobody = User::from_name("nobody").unwrap().expect("a user `nobody`");
    std::os::unix::fs::chown(path, Some(nobody.uid.as_raw()), Some(nobody.gid.as_raw())).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A cluster, and a directory `pgtest` made in a temporary parent; `None`
/// (said so) without root.
fn cluster_and_home() -> Option<(Cluster, tempfile::TempDir, PathBuf)> {
    if !Uid::effective().is_root() {
        eprintln!("SKIPPED: giving a directory to another user needs root");
        return None;
    }
    let parent = tempfile::tempdir().unwrap();
    let home = parent.path().join("pgtest");
    fs::create_dir(&home).unwrap();
    Some((Cluster::start(&[]), parent, home))
}

/// The fixture, run with `home` as its pgtest home.
fn run_in(cluster: &Cluster, home: &Path) -> Output {
    let mut fixture = cluster.exact("fixture_home_one_query");
    fixture.env("PGTEST_HOME", home);
    run(fixture)
}

/// Checks that a run with `home` as its pgtest home is refused for
/// `problem`.
fn assert_refused(cluster: &Cluster, home: &Path, problem: &str) {
    let printed = assert_failed_without_password(&run_in(cluster, home));
    assert!(
        printed.contains("pgtest will not use") && printed.contains(problem),
        "expected a refusal naming {problem:?}:\n{printed}"
    );
}

#[test]
fn a_home_another_user_owns_is_refused_and_left_untouched() {
    let Some((cluster, _parent, home)) = cluster_and_home() else {
        return;
    };
    chmod(&home, 0o755);
    give_to_nobody(&home);
    assert_refused(&cluster, &home, "owned by nobody");
    assert!(entries(&home).is_empty(), "{:?}", entries(&home));
}

#[test]
fn a_home_others_may_write_to_is_refused() {
    let Some((cluster, parent, home)) = cluster_and_home() else {
        return;
    };
    chmod(&home, 0o777);
    assert_refused(&cluster, &home, "others may write to it (mode 777)");
    assert!(entries(&home).is_empty(), "{:?}", entries(&home));

    // Under a parent anyone may write to, someone else could replace it.
    chmod(&home, 0o700);
    chmod(parent.path(), 0o777);
    assert_refused(&cluster, &home, "without the sticky bit");
    // With the sticky bit (as /tmp has), it is safe.
    chmod(parent.path(), 0o1777);
    assert_passed(&run_in(&cluster, &home), 1);
}

#[test]
fn a_symbolic_link_in_the_home_is_not_followed() {
    let Some((cluster, parent, home)) = cluster_and_home() else {
        return;
    };
    let elsewhere = parent.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, home.join("budget")).unwrap();
    assert_refused(&cluster, &home, "it is a symbolic link");
    assert!(entries(&elsewhere).is_empty(), "{:?}", entries(&elsewhere));

    // A file of the budget that links to another file.
    fs::remove_file(home.join("budget")).unwrap();
    assert_passed(&run_in(&cluster, &home), 1);
    let victim = parent.path().join("victim");
    fs::write(&victim, "keep me\n").unwrap();
    let budgets = home.join("budget");
    for server in fs::read_dir(&budgets).unwrap() {
        for file in fs::read_dir(server.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            fs::remove_file(&path).unwrap();
            symlink(&victim, &path).unwrap();
        }
    }
    let printed = assert_failed_without_password(&run_in(&cluster, &home));
    assert!(
        printed.contains("Too many levels of symbolic links") || printed.contains("symbolic link"),
        "{printed}"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me\n");
}

#[test]
fn an_embedded_home_another_user_owns_is_refused() {
    if !Uid::effective().is_root() {
        eprintln!("SKIPPED: giving a directory to another user needs root");
        return;
    }
    let home = EmbeddedHome::new();
    give_to_nobody(home.path());
    let printed = assert_failed_without_password(&run(home.exact("fixture_home_one_query")));
    assert!(
        printed.contains("pgtest will not use") && printed.contains("owned by nobody"),
        "{printed}"
    );
    assert!(
        entries(home.path()).is_empty(),
        "{:?}",
        entries(home.path())
    );
}
