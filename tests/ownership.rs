//! A database is pgtest's because the server says so: its owner is the
//! role pgtest logs in as, and pgtest marked it. Other roles on the same
//! server play the hostile side here for real, and two roles share one
//! server; the spares helper logs in as the tests do; a run is a run
//! however its binary is started; a template someone is in is waited for.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, assert_failed_without_password, assert_passed, run, run_together, text};
use pgtest::{PgPool, pg_test};

#[pg_test(migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_shared_posts(pool: PgPool) -> Result<(), sqlx::Error> {
    insert_a_post(&pool).await
}

#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_database_posts(pool: PgPool) -> Result<(), sqlx::Error> {
    insert_a_post(&pool).await
}

async fn insert_a_post(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("insert into posts (id, title) values (1, 'mine')")
        .execute(pool)
        .await?;
    Ok(())
}

/// Makes `role`, who may log in and create databases, nothing more.
fn create_role(cluster: &Cluster, role: &str, password: &str) {
    cluster.psql(&format!(
        "create role {role} login createdb password '{password}'"
    ));
}

fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster.psql(&format!(
        "select rolsuper from pg_roles where rolname = '{role}'"
    )) == "t"
}

/// The one template pgtest made for the posts fixtures (shared and
/// database mode share it: no fixtures), learned from a run; then every
/// database of pgtest's is dropped, as a new server would have none.
fn template_name(cluster: &Cluster) -> String {
    assert_passed(&run(cluster.exact("fixture_shared_posts")), 1);
    let template = cluster.psql(
        "select datname from pg_database \
         where shobj_description(oid, 'pg_database') like 'pgtest: template, ready%'",
    );
    for database in cluster.pgtest_databases() {
        cluster.psql(&format!("drop database \"{database}\" with (force)"));
    }
    template
}

/// What mallory makes of `database`: a `posts` table whose inserts grant
/// mallory superuser (a trigger runs as whoever inserts), functions that
/// shadow pg_catalog's put first on the database's search path, and
/// pgtest's `marker`. What it looks like, to compare after.
fn plant_hostile_database(cluster: &Cluster, database: &str, marker: &str) -> String {
    cluster.psql_as(
        "mallory",
        "postgres",
        &format!("create database \"{database}\""),
    );
    cluster.psql_as(
        "mallory",
        database,
        &format!(
            "create schema evil; \
             create table public.posts (id int primary key, tenant_id uuid, title text not null); \
             create function evil.escalate() returns trigger language plpgsql as \
                 $$ begin alter role mallory superuser; return new; end $$; \
             create trigger escalate before insert on public.posts \
                 for each row execute function evil.escalate(); \
             create function evil.current_database() returns name language sql as \
                 $$ alter role mallory superuser; select 'x'::name $$; \
             create function evil.shobj_description(oid, name) returns text language sql as \
                 $$ select '{marker}'::text $$; \
             alter database \"{database}\" set search_path = evil, public, pg_catalog; \
             comment on database \"{database}\" is '{marker}'"
        ),
    );
    look_at(cluster, database)
}

/// A database's comment, owner and rows: what must not change.
fn look_at(cluster: &Cluster, database: &str) -> String {
    let outside = cluster.psql(&format!(
        "select shobj_description(oid, 'pg_database') || ' / ' || pg_get_userbyid(datdba) \
         from pg_database where datname = '{database}'"
    ));
    let rows = cluster.psql_in(database, "select count(*) from public.posts");
    format!("{outside} / {rows} posts")
}

#[test]
fn a_database_another_role_made_under_pgtests_names_is_never_used_and_is_named() {
    let cluster = Cluster::start(&[]);
    let template = template_name(&cluster);
    create_role(&cluster, "mallory", "mallory-pw");

    // The template's name, taken first, marked ready.
    let before = plant_hostile_database(&cluster, &template, "pgtest: template, ready; used=1");
    for fixture in ["fixture_shared_posts", "fixture_database_posts"] {
        let printed = assert_failed_without_password(&run(cluster.exact(fixture)));
        for part in [
            format!("database {template} has a name pgtest would use"),
            "its owner is role mallory, not postgres".to_owned(),
            format!("DROP DATABASE \"{template}\""),
        ] {
            assert!(
                printed.contains(&part),
                "{fixture}: no {part:?} in:\n{printed}"
            );
        }
        assert_eq!(look_at(&cluster, &template), before, "{fixture} changed it");
    }
    assert_eq!(
        cluster.pgtest_databases(),
        std::slice::from_ref(&template),
        "nothing was copied from it"
    );
    assert!(!is_superuser(&cluster, "mallory"));

    // A spare of the real template, on a machine with no spares of its own.
    cluster.psql_as(
        "mallory",
        "postgres",
        &format!("drop database \"{template}\""),
    );
    assert_passed(&run(cluster.exact("fixture_database_posts")), 1);
    for spare in cluster
        .psql(
            "select datname from pg_database \
         where shobj_description(oid, 'pg_database') like 'pgtest: spare database;%'",
        )
        .lines()
    {
        cluster.psql(&format!("drop database \"{spare}\" with (force)"));
    }
    let fake = format!("{template}_s0bad0bad");
    let before = plant_hostile_database(
        &cluster,
        &fake,
        &format!("pgtest: spare database; template={template}"),
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let output = run(cluster
        .exact("fixture_database_posts")
        .env("PGTEST_HOME", elsewhere.path()));
    assert_passed(&output, 1);
    assert_eq!(
        look_at(&cluster, &fake),
        before,
        "the fake spare was claimed"
    );
    assert!(!is_superuser(&cluster, "mallory"));
}

#[test]
fn two_roles_run_one_project_side_by_side_and_sweep_past_each_other() {
    let cluster = Cluster::start(&[]);
    create_role(&cluster, "alice", "alice-pw");
    create_role(&cluster, "bob", "bob-pw");
    create_role(&cluster, "dave", "dave-pw");
    // Dave's database, which sorts first and whose marker says it was made
    // days ago on another machine: alice's and bob's sweeps may not drop it
    // (and could not, as they are not superusers).
    let old = "pgtest_aaa_000000000000_00000000";
    cluster.psql_as("dave", "postgres", &format!("create database {old}"));
    cluster.psql_as(
        "dave",
        "postgres",
        &format!(
            "comment on database {old} is 'pgtest: test database; test=t; host=elsewhere; \
             run=r; created=1; lock=/nowhere/live-{old}.lock'"
        ),
    );
    let as_role = |role: &str, test: &str, run: &str| {
        let mut command = cluster.exact(test);
        command
            .env("PGTEST_DATABASE_URL", cluster.socket_url_for(role))
            .env("NEXTEST_RUN_ID", run);
        command
    };
    let outputs = run_together(8, |index| {
        let role = ["alice", "bob"][index % 2];
        as_role(role, "fixture_database_posts", "run-1")
    });
    for output in &outputs {
        assert_passed(output, 1);
    }
    let owners = cluster.psql(
        "select string_agg(distinct pg_get_userbyid(datdba), ',' order by pg_get_userbyid(datdba)) \
         from pg_database where shobj_description(oid, 'pg_database') like 'pgtest: template%'",
    );
    assert_eq!(owners, "alice,bob", "a template each");

    // Alice's next run sweeps her first run's shared database, past dave's.
    assert_passed(&run(as_role("alice", "fixture_shared_posts", "run-1")), 1);
    let alices_first = cluster.run_database();
    assert_passed(&run(as_role("alice", "fixture_shared_posts", "run-2")), 1);
    let databases = cluster.pgtest_databases();
    assert!(!databases.contains(&alices_first), "{databases:?}");
    assert!(databases.contains(&old.to_owned()), "{databases:?}");
}

/// Database-mode tests of a role that is not a superuser (their databases
/// are not put back: the spares helper drops them and makes copies ahead),
/// logging in over TCP with a password the URL does not hold.
fn helper_works_for_a_password_from(env: &[(&str, String)]) {
    let cluster = Cluster::start(&[]);
    create_role(&cluster, "carol", "carol-pw");
    let url = format!("postgres://carol@127.0.0.1:{}/postgres", cluster.port());
    let outputs = run_together(3, |_| {
        let mut command = cluster.exact("fixture_database_posts");
        command
            .env("PGTEST_DATABASE_URL", &url)
            .env("NEXTEST_RUN_ID", "r");
        command.envs(env.iter().map(|(key, value)| (key, value)));
        command
    });
    for output in &outputs {
        assert_passed(output, 1);
        assert!(!text(output).contains("carol-pw"));
    }
    // The helper's work, after the run: the passed tests' databases
    // dropped and copies made ahead.
    cluster.wait_until(
        "select not exists (select from pg_database \
             where shobj_description(oid, 'pg_database') like 'pgtest: test database;%') \
         and exists (select from pg_database \
             where shobj_description(oid, 'pg_database') like 'pgtest: spare database;%')",
        Duration::from_secs(60),
    );
    assert!(!cluster.spares_log().contains("carol-pw"));
}

#[test]
fn the_spares_helper_logs_in_with_pgpassword() {
    helper_works_for_a_password_from(&[("PGPASSWORD", "carol-pw".to_owned())]);
}

#[test]
fn the_spares_helper_logs_in_with_a_pgpass_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass");
    std::fs::write(&file, "127.0.0.1:*:*:carol:carol-pw\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    helper_works_for_a_password_from(&[("PGPASSFILE", file.display().to_string())]);
}

#[test]
fn a_binary_run_three_times_from_one_shell_makes_three_runs() {
    let cluster = Cluster::start(&[("log_statement", "ddl")]);
    let fixture = cluster.exact("fixture_shared_posts");
    let mut shell = Command::new("sh");
    shell
        .args(["-c", r#""$0" "$@" && "$0" "$@" && "$0" "$@""#])
        .arg(fixture.get_program())
        .args(fixture.get_args())
        // Not under nextest: this test's own run id is not theirs.
        .env_remove("NEXTEST_RUN_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in fixture.get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    let output = common::finish(shell.spawn().unwrap(), Duration::from_secs(120));
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        text(&output).matches("test result: ok. 1 passed").count(),
        3
    );
    let mut copies: Vec<&str> = Vec::new();
    let log = cluster.log();
    for line in log.lines() {
        let Some((_, made)) = line.split_once("create database \"") else {
            continue;
        };
        let name = made.split('"').next().unwrap();
        let is_run_copy = name
            .trim_end_matches("_building")
            .rsplit_once("_r")
            .is_some_and(|(_, key)| key.len() == 7);
        if is_run_copy && !copies.contains(&name) {
            copies.push(name);
        }
    }
    assert_eq!(copies.len(), 3, "three runs, three copies: {copies:?}");
}

#[test]
fn a_template_someone_is_in_is_waited_for_and_then_named_with_its_session() {
    let cluster = Cluster::start(&[]);
    let template = template_name(&cluster);
    assert_passed(&run(cluster.exact("fixture_database_posts")), 1);
    let copies = |home: &std::path::Path| {
        let mut command = cluster.exact("fixture_database_posts");
        // No spares: each test copies the template.
        command
            .env("PGTEST_SPARE_DATABASES", "0")
            .env("PGTEST_HOME", home);
        command
    };
    let in_template = |seconds: u32| {
        let session = cluster
            .psql_command(
                "postgres",
                &template,
                &format!("select pg_sleep({seconds})"),
            )
            .env("PGAPPNAME", "someone's psql")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        cluster.wait_until(
            &format!(
                "select exists (select from pg_stat_activity \
                 where datname = '{template}' and application_name = 'someone''s psql')"
            ),
            Duration::from_secs(10),
        );
        session
    };

    // Held for 7 s, past the server's own 5 s wait: copies wait longer.
    let home = tempfile::tempdir().unwrap();
    let mut session = in_template(7);
    for output in run_together(2, |_| copies(home.path())) {
        assert_passed(&output, 1);
    }
    session.wait().unwrap();

    // Held past pgtest's bound: the error names the session.
    let mut session = in_template(120);
    let started = Instant::now();
    let printed = assert_failed_without_password(&run(copies(home.path())));
    let _ = session.kill();
    let _ = session.wait();
    for part in [
        format!("could not be made from {template}"),
        "role postgres (someone's psql".to_owned(),
        "pg_terminate_backend".to_owned(),
    ] {
        assert!(printed.contains(&part), "no {part:?} in:\n{printed}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_unfinished_build_of_pgtests_role_is_dropped_and_another_roles_is_not() {
    let cluster = Cluster::start(&[]);
    let template = template_name(&cluster);
    let building = format!("{template}_building");
    // Left by a crash: made by pgtest's role, its marker's commit lost.
    cluster.psql(&format!("create database \"{building}\""));
    assert_passed(&run(cluster.exact("fixture_shared_posts")), 1);
    for database in cluster.pgtest_databases() {
        cluster.psql(&format!("drop database \"{database}\" with (force)"));
    }
    create_role(&cluster, "mallory", "mallory-pw");
    cluster.psql_as(
        "mallory",
        "postgres",
        &format!("create database \"{building}\""),
    );
    let printed = assert_failed_without_password(&run(cluster.exact("fixture_shared_posts")));
    assert!(
        printed.contains(&format!("database {building} has a name pgtest would use"))
            && printed.contains("its owner is role mallory"),
        "{printed}"
    );
    assert_eq!(cluster.pgtest_databases(), [building]);
}
