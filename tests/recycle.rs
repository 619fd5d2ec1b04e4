//! Database isolation recycles a passed test's database: the next test gets
//! the same database, holding exactly what a fresh copy of the template
//! holds, whatever the test before changed in its data; a test that changed
//! the schema, or was killed, never hands its database on. On the embedded
//! server (`PGTEST_PG_BIN` picks the PostgreSQL version).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{EmbeddedHome, assert_passed, run, run_together, wait_for};
use pgtest::{PgPool, pg_test};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row};

/// Appends the test's database name to the file `PGTEST_IT_FILE`, in one
/// write (tests that run at once append to the same file).
async fn record(pool: &PgPool) -> anyhow::Result<String> {
    let name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(std::env::var("PGTEST_IT_FILE")?)?;
    std::io::Write::write_all(&mut file, format!("{name}\n").as_bytes())?;
    Ok(name)
}

/// Changes every kind of data the template holds, then records its
/// database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_changes_everything(pool: PgPool) -> anyhow::Result<()> {
    let mut connection = pool.acquire().await?;
    connection
        .execute(
            "insert into teams (name) values ('violet');
             insert into members (team_id, name) values (4, 'barbara');
             insert into notes (body) values ('a note');
             update members set score = score + 1 where name = 'grace';
             delete from members where name = 'linus';
             refresh materialized view team_sizes;
             truncate teams cascade;
             insert into teams (name) values ('orange');
             insert into members (team_id, name) values (5, 'edsger');
             select setval('tickets', 1);
             select setval(pg_get_serial_sequence('members', 'id'), 100);
             create temporary table scratch (n int);
             insert into scratch values (1);
             select lo_create(0);",
        )
        .await?;
    drop(connection);
    record(&pool).await?;
    Ok(())
}

/// Changes rows and sequences alone (no catalog row: the reset goes by the
/// server's counts of rows written where it keeps them), then records its
/// database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_changes_rows(pool: PgPool) -> anyhow::Result<()> {
    let mut connection = pool.acquire().await?;
    connection
        .execute(
            "insert into teams (name) values ('violet');
             insert into members (team_id, name) values (4, 'barbara');
             update members set score = score + 1 where name = 'grace';
             delete from members where name = 'linus';
             delete from teams where name = 'blue';
             select setval('tickets', 1);
             select setval(pg_get_serial_sequence('members', 'id'), 100);
             select setval(pg_get_serial_sequence('notes', 'id'), 7, false);",
        )
        .await?;
    // Rolled back: the rows are gone, the sequence moved.
    let mut transaction = connection.begin().await?;
    transaction
        .execute("insert into notes (body) values ('a note')")
        .await?;
    transaction.rollback().await?;
    drop(connection);
    record(&pool).await?;
    Ok(())
}

/// Checks that it got the database of the test before, and that it holds
/// what a fresh copy of the template holds.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_sees_the_template(pool: PgPool) -> anyhow::Result<()> {
    let path = std::env::var("PGTEST_IT_FILE")?;
    let before = std::fs::read_to_string(&path)?;
    let mine = record(&pool).await?;
    anyhow::ensure!(
        before.lines().last() == Some(mine.as_str()),
        "got {mine}, not the database of the test before: {before}"
    );
    let template = &mine[..mine.rfind('_').expect("a copy's name")];
    let admin_options = (*pool.connect_options()).clone().database("postgres");
    let mut admin = PgConnection::connect_with(&admin_options).await?;
    admin
        .execute("drop database if exists recycle_fresh")
        .await?;
    admin
        .execute(AssertSqlSafe(format!(
            "create database recycle_fresh template \"{template}\""
        )))
        .await?;
    let mut fresh =
        PgConnection::connect_with(&admin_options.clone().database("recycle_fresh")).await?;
    let expected = dump(&mut fresh).await?;
    fresh.close().await?;
    admin
        .execute("drop database recycle_fresh with (force)")
        .await?;
    let mut connection = pool.acquire().await?;
    let found = dump(&mut connection).await?;
    if found != expected {
        let diff: Vec<String> = found
            .lines()
            .zip(expected.lines())
            .filter(|(found, expected)| found != expected)
            .map(|(found, expected)| format!("found    {found}\nexpected {expected}"))
            .collect();
        anyhow::bail!(
            "the recycled database differs from a fresh copy:\n{}",
            diff.join("\n")
        );
    }
    Ok(())
}

/// The schema, the data (in physical order), the sequences, the large
/// objects and the settings of the database `connection` is connected to.
async fn dump(connection: &mut PgConnection) -> anyhow::Result<String> {
    let mut dump = Vec::new();
    let catalog: Vec<String> = sqlx::query_scalar(
        "select format('column %s.%s %s %s %s', table_name, column_name, data_type, \
             is_nullable, column_default) from information_schema.columns \
             where table_schema = 'public' \
         union all select 'index ' || indexdef from pg_indexes where schemaname = 'public' \
         union all select format('constraint %s %s', conname, pg_get_constraintdef(oid)) \
             from pg_constraint where connamespace = 'public'::regnamespace \
         union all select format('function %s %s', proname, prosrc) from pg_proc \
             where pronamespace = 'public'::regnamespace \
         union all select 'trigger ' || pg_get_triggerdef(oid) from pg_trigger where not tgisinternal \
         union all select 'extension ' || extname from pg_extension \
         union all select 'view ' || matviewname || ' ' || definition from pg_matviews \
         union all select 'settings ' || array_to_string(setconfig, ',') from pg_db_role_setting \
             where setdatabase = (select oid from pg_database where datname = current_database()) \
         union all select 'large objects ' || count(*) from pg_largeobject_metadata \
         order by 1",
    )
    .fetch_all(&mut *connection)
    .await?;
    dump.extend(catalog);
    let relations: Vec<(String, String)> = sqlx::query_as(
        "select c.oid::regclass::text, c.relkind::text from pg_class c \
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'm', 'S') order by 1",
    )
    .fetch_all(&mut *connection)
    .await?;
    for (name, kind) in relations {
        let statement = match kind.as_str() {
            "S" => format!("select format('%s %s', last_value, is_called) from {name}"),
            _ => format!(
                "select coalesce(string_agg(x::text, ' | ' order by ctid), '') from {name} x"
            ),
        };
        let row = sqlx::query(AssertSqlSafe(statement))
            .fetch_one(&mut *connection)
            .await?;
        dump.push(format!("{name}: {}", row.try_get::<String, _>(0)?));
    }
    Ok(dump.join("\n"))
}

/// Runs the DDL in `PGTEST_IT_SQL` (`{db}` names its database), then
/// records its database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_runs_ddl(pool: PgPool) -> anyhow::Result<()> {
    let name = record(&pool).await?;
    let sql = std::env::var("PGTEST_IT_SQL")?.replace("{db}", &name);
    pool.execute(AssertSqlSafe(sql)).await?;
    Ok(())
}

/// Only reads, then records its database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_reads(pool: PgPool) -> anyhow::Result<()> {
    let teams: i64 = sqlx::query_scalar("select count(*) from teams")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(teams == 3, "{teams} teams, not the template's 3");
    record(&pool).await?;
    Ok(())
}

/// Inserts a fixed id and counts whole tables, as suites written for a
/// database per test do, then records its database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_fixed_ids(pool: PgPool) -> anyhow::Result<()> {
    sqlx::query("insert into members (id, team_id, name) values (100, 1, 'fixed')")
        .execute(&pool)
        .await?;
    let members: i64 = sqlx::query_scalar("select count(*) from members")
        .fetch_one(&pool)
        .await?;
    let audit: i64 = sqlx::query_scalar("select count(*) from audit")
        .fetch_one(&pool)
        .await?;
    // The template's 3 and 4 (its inserts and an update), and this test's.
    anyhow::ensure!(
        members == 4 && audit == 5,
        "{members} members, {audit} audit rows"
    );
    record(&pool).await?;
    Ok(())
}

/// Records its database, then waits until `PGTEST_IT_TOGETHER` tests
/// have (a minute at most): tests that hold
/// their databases until the others have theirs.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_waits_for_the_others(pool: PgPool) -> anyhow::Result<()> {
    record(&pool).await?;
    let path = std::env::var("PGTEST_IT_FILE")?;
    let together: usize = std::env::var("PGTEST_IT_TOGETHER")?.parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&path)?.lines().count() < together {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the other tests did not get a database within a minute"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Writes, records its database, then hangs until it is killed.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_hangs(pool: PgPool) -> anyhow::Result<()> {
    sqlx::query("delete from members").execute(&pool).await?;
    record(&pool).await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// The databases recorded in `file`, in order.
fn recorded(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs `fixture`, then a test that checks it sees a fresh copy of the
/// template, `rounds` times, each test in a process of its own: every test
/// gets the first one's database.
fn the_next_test_sees_the_template_after(fixture: &str, rounds: usize) {
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    for _ in 0..rounds {
        for test in [fixture, "fixture_recycle_sees_the_template"] {
            let output = run(home.exact(test).env("PGTEST_IT_FILE", &file));
            assert_passed(&output, 1);
        }
    }
    let names = recorded(&file);
    assert_eq!(names.len(), 2 * rounds, "{names:?}");
    assert!(
        names.iter().all(|name| *name == names[0]),
        "every test got the first one's database: {names:?}"
    );
}

#[test]
fn the_next_test_gets_the_same_database_exactly_as_a_fresh_copy() {
    the_next_test_sees_the_template_after("fixture_recycle_changes_everything", 2);
}

#[test]
fn after_changes_to_rows_alone_the_next_test_gets_the_same_database_exactly_as_a_fresh_copy() {
    the_next_test_sees_the_template_after("fixture_recycle_changes_rows", 3);
}

#[test]
fn fixed_ids_and_whole_table_counts_pass_with_many_tests_per_database() {
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    for _ in 0..4 {
        for output in run_together(3, |_| {
            let mut command = home.exact("fixture_recycle_fixed_ids");
            command.env("PGTEST_IT_FILE", &file);
            command
        }) {
            assert_passed(&output, 1);
        }
    }
    let names = recorded(&file);
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(
        distinct.len() <= 3,
        "12 tests, 3 at a time, used {} databases: {names:?}",
        distinct.len()
    );
}

#[test]
fn tests_that_hold_a_templates_only_copy_do_not_keep_the_others_waiting() {
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    let output = run(home
        .exact("fixture_recycle_fixed_ids")
        .env("PGTEST_IT_FILE", home.path().join("first")));
    assert_passed(&output, 1);
    // One copy to take turns on, put back by the test above; three tests
    // at once that each hold theirs until all three have one.
    for output in run_together(3, |_| {
        let mut command = home.exact("fixture_recycle_waits_for_the_others");
        command
            .env("PGTEST_IT_FILE", &file)
            .env("PGTEST_IT_TOGETHER", "3")
            .env("PGTEST_TEMPLATE_COPIES", "1");
        command
    }) {
        assert_passed(&output, 1);
    }
    let names = recorded(&file);
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), 3, "{names:?}");
}

#[test]
fn a_test_that_changes_the_schema_never_hands_its_database_on() {
    let home = EmbeddedHome::new();
    let (reads, ddl) = (home.path().join("reads"), home.path().join("ddl"));
    let statements = [
        "create table extra (n int)",
        "alter table notes add column seen boolean",
        "create index notes_body on notes (body)",
        "create extension pg_trgm",
        "alter database \"{db}\" set work_mem = '8MB'",
        "comment on table teams is 'changed'",
        "grant select on teams to public",
    ];
    for sql in statements {
        let output = run(home
            .exact("fixture_recycle_reads")
            .env("PGTEST_IT_FILE", &reads));
        assert_passed(&output, 1);
        let output = run(home
            .exact("fixture_recycle_runs_ddl")
            .env("PGTEST_IT_FILE", &ddl)
            .env("PGTEST_IT_SQL", sql));
        assert_passed(&output, 1);
        let (read, changed) = (recorded(&reads), recorded(&ddl));
        assert_eq!(
            read.last(),
            changed.last(),
            "the test before `{sql}` handed its database on"
        );
    }
    let output = run(home
        .exact("fixture_recycle_reads")
        .env("PGTEST_IT_FILE", &reads));
    assert_passed(&output, 1);
    let (read, changed) = (recorded(&reads), recorded(&ddl));
    let distinct: BTreeSet<&String> = changed.iter().collect();
    assert_eq!(distinct.len(), statements.len(), "{changed:?}");
    for (index, name) in read.iter().enumerate() {
        assert!(
            !changed[..index].contains(name),
            "a test got {name}, whose schema a test before changed: {read:?} / {changed:?}"
        );
    }
    // The last test of the run retires its database: no test sweeps after
    // it, the spares helper drops it.
    let output = run(home
        .exact("fixture_recycle_runs_ddl")
        .env("PGTEST_IT_FILE", &ddl)
        .env("PGTEST_IT_SQL", statements[0]));
    assert_passed(&output, 1);
    let changed = recorded(&ddl);
    wait_for(
        "the spares helper to drop the retired databases after the run",
        Duration::from_secs(60),
        || {
            let databases = home.databases();
            changed.iter().all(|name| !databases.contains(name))
        },
    );
}

#[test]
fn a_killed_tests_database_is_never_handed_on() {
    let home = EmbeddedHome::new();
    let (reads, killed) = (home.path().join("reads"), home.path().join("killed"));
    let output = run(home
        .exact("fixture_recycle_reads")
        .env("PGTEST_IT_FILE", &reads));
    assert_passed(&output, 1);
    let mut hung = home
        .exact("fixture_recycle_hangs")
        .env("PGTEST_IT_FILE", &killed)
        .spawn()
        .unwrap();
    wait_for(
        "the test to record its database",
        Duration::from_secs(60),
        || recorded(&killed).len() == 1,
    );
    hung.kill().unwrap();
    let _ = hung.wait();
    assert_eq!(recorded(&reads), recorded(&killed), "it got the spare");
    for _ in 0..2 {
        let output = run(home
            .exact("fixture_recycle_reads")
            .env("PGTEST_IT_FILE", &reads));
        assert_passed(&output, 1);
    }
    let read = recorded(&reads);
    assert!(
        read[1..].iter().all(|name| *name != recorded(&killed)[0]),
        "the killed test's database was handed on: {read:?}"
    );
    assert_eq!(read[1], read[2], "the next tests share a recycled one");
}
