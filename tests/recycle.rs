//! Database isolation recycles a passed test's database: the next test gets
//! the same database, holding exactly what a fresh copy of the template
//! holds, whatever the test before changed in its data; a test that changed
//! the schema, or was killed, never hands its database on. On the embedded
//! server (`PGTEST_PG_BIN` picks the PostgreSQL version).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{Cluster, EmbeddedHome, assert_passed, run, run_together, wait_for};
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
    connection.execute("vacuum full teams").await?;
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
/// server's counts of rows written where it keeps them; `tickets` only by
/// a `setval` that leaves its value as the template's, not called), then
/// records its database.
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
             select setval('tickets', 2, false);
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
    is_a_fresh_copy(&pool, &mine).await
}

/// Checks that it holds what a fresh copy of the template holds, then
/// records its database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_is_a_fresh_copy(pool: PgPool) -> anyhow::Result<()> {
    let mine: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await?;
    is_a_fresh_copy(&pool, &mine).await?;
    record(&pool).await.map(drop)
}

/// Whether the database `mine` that `pool` is on holds what a fresh copy
/// of its template holds.
async fn is_a_fresh_copy(pool: &PgPool, mine: &str) -> anyhow::Result<()> {
    let template = &mine[..mine.rfind('_').expect("a copy's name")];
    let expected = on_fresh_copy(pool, template, dump).await?;
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
/// objects, the settings and each table's and index's size in blocks of
/// the database `connection` is connected to.
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
         union all select format('blocks %s %s', relname, pg_relation_size(oid) / 8192) \
             from pg_class where relnamespace = 'public'::regnamespace and relkind in ('r', 'i') \
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

/// Runs the fixture `test` alone in `home`, recording its database in
/// `file`; it passes.
fn passes_recorded(home: &EmbeddedHome, test: &str, file: &Path) {
    assert_passed(&run(home.exact(test).env("PGTEST_IT_FILE", file)), 1);
}

#[test]
fn a_template_built_anew_is_snapshot_anew_and_no_test_gets_another_tests_rows() {
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    let changes = || passes_recorded(&home, "fixture_recycle_changes_rows", &file);
    let checks = || passes_recorded(&home, "fixture_recycle_is_a_fresh_copy", &file);
    // This machine's snapshot of the template, and a spare.
    changes();
    // The server's databases dropped (as a server made anew at the same
    // address would have none): the template is built again, its tables
    // get other oids than the snapshot's.
    for name in home.databases() {
        if name.starts_with("pgtest_") && name != "pgtest_locks" {
            home.drop_database(&name);
        }
    }
    changes();
    checks();
    // Recycled again, with a snapshot of the new template.
    changes();
    checks();
    let names = recorded(&file);
    assert_eq!(names.len(), 5, "{names:?}");
    assert_ne!(
        names[1], names[2],
        "the test after the rebuild got its rows: {names:?}"
    );
    assert_eq!(
        names[3], names[4],
        "the next tests share a recycled one: {names:?}"
    );
}

/// Makes `audit` anew in `database` (the same name, columns and rows, another
/// oid): as a copy of another build of the template would have it.
fn make_audit_anew(home: &EmbeddedHome, database: &str) {
    home.execute(
        database,
        "create table audit_anew (like audit including all); \
         insert into audit_anew select * from audit; \
         drop table audit; alter table audit_anew rename to audit",
    );
}

/// The id of the snapshot in `path` (see `common::snapshot_file`).
fn snapshot_id(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let words: Vec<&str> = text.splitn(5, ' ').collect();
    assert_eq!(words[..3], ["pgtest", "snapshot", "8"], "{path:?}");
    words[3].to_owned()
}

#[test]
fn a_spare_is_looked_at_anew_when_its_database_or_the_snapshot_is_not_the_one_it_was_put_back_with()
{
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    let changes = || passes_recorded(&home, "fixture_recycle_changes_rows", &file);
    let checks = || passes_recorded(&home, "fixture_recycle_is_a_fresh_copy", &file);
    changes();
    let spare = recorded(&file)[0].clone();
    let template = &spare[..spare.rfind('_').expect("a copy's name")];
    let snapshot = common::snapshot_file(home.path(), template)
        .unwrap_or_else(|| panic!("no snapshot of {template} under {}", home.path().display()));
    let first = snapshot_id(&snapshot);
    // Another database under the spare's name, its marker and owner as
    // pgtest's, whose `audit` is not the snapshot's.
    home.execute(
        "postgres",
        &format!("create database pgtest_it_anew template \"{template}\""),
    );
    make_audit_anew(&home, "pgtest_it_anew");
    home.execute(
        "postgres",
        &format!(
            "do $$ begin execute format('comment on database pgtest_it_anew is %L', \
             (select shobj_description(oid, 'pg_database') from pg_database \
             where datname = '{spare}')); end $$"
        ),
    );
    home.drop_database(&spare);
    home.execute(
        "postgres",
        &format!("alter database pgtest_it_anew rename to \"{spare}\""),
    );
    changes();
    checks();
    // Found not to be the snapshot's: forgotten and taken again.
    let second = snapshot_id(&snapshot);
    assert_ne!(first, second, "the snapshot was not taken anew");
    // The spare put back, then its `audit` made anew as the snapshot is
    // taken anew (its id changed).
    changes();
    let put_back = recorded(&file)[3].clone();
    make_audit_anew(&home, &put_back);
    let text = std::fs::read_to_string(&snapshot).unwrap();
    std::fs::write(&snapshot, text.replacen(&second, "0000", 1)).unwrap();
    changes();
    checks();
    assert_ne!(
        snapshot_id(&snapshot),
        "0000",
        "the snapshot was not taken anew"
    );
    let names = recorded(&file);
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(names[1], spare, "{names:?}");
    assert_ne!(
        names[1], names[2],
        "the test after the one on a database made anew got it: {names:?}"
    );
    assert_eq!(names[2], names[3], "{names:?}");
    assert_eq!(names[3], names[4], "{names:?}");
    assert_ne!(
        names[4], names[5],
        "the test after the snapshot was taken anew got a database of the old one: {names:?}"
    );
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
        "drop table events",
        "drop trigger members_audit on members",
        "create text search configuration pgtest_it (copy = english)",
        "alter text search configuration english alter mapping for word with simple",
        "create publication pgtest_it for all tables",
        "create foreign data wrapper pgtest_it",
        "alter table members alter column score set statistics 500",
        "grant execute on function pg_catalog.pg_ls_dir(text) to public",
        "revoke select on information_schema.tables from public",
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

/// The joins whose plans a recycled database must share with a fresh copy.
const SHOP_JOINS: [&str; 4] = [
    "select c.name, o.id, l.product from customers c join orders o on o.customer_id = c.id \
     join lines l on l.order_id = o.id where c.tier = 2",
    "select r.name, count(*) from regions r join customers c on c.region_id = r.id \
     join orders o on o.customer_id = c.id group by r.name",
    "select o.id, l.qty from orders o join lines l on l.order_id = o.id \
     where o.placed > date '2024-01-20'",
    "select c.id from customers c where c.region_id = 3 \
     and exists (select from orders o where o.customer_id = c.id)",
];

/// A join without `ORDER BY`: its rows come in the order the plan and the
/// pages give them.
const SHOP_UNORDERED: &str = "select c.name, o.total, l.product from customers c \
    join orders o on o.customer_id = c.id join lines l on l.order_id = o.id \
    join regions r on r.id = c.region_id";

/// What the planner and an unordered query see of the database
/// `connection` is connected to: each relation's size in blocks (TOAST
/// included; and its visibility map's: the free space map's file is the
/// one thing left out, see README), its `pg_class` statistics, the
/// `pg_statistic` and extended statistics rows, each table's rows with
/// their places, the plans of [`SHOP_JOINS`], the rows of
/// [`SHOP_UNORDERED`] in the order they come, and the place a new row of
/// a table empty in the template takes.
async fn planner_view(connection: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let mut view: Vec<String> = sqlx::query_scalar(
        "with rel as (select c.oid, c.relname::text as name from pg_class c \
             where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'i', 'm') \
         union all select t.oid, 'toast of ' || c.relname from pg_class c \
             join pg_class t on t.oid = c.reltoastrelid where c.relnamespace = 'public'::regnamespace \
         union all select i.indexrelid, 'toast index of ' || c.relname from pg_class c \
             join pg_index i on i.indrelid = c.reltoastrelid where c.relnamespace = 'public'::regnamespace) \
         select format('blocks %s: %s main, %s vm', name, pg_relation_size(oid, 'main') / 8192, \
             pg_relation_size(oid, 'vm') / 8192) from rel \
         union all select format('pg_class %s: relpages %s, reltuples %s, relallvisible %s, \
             relallfrozen %s', name, c.relpages, c.reltuples, c.relallvisible, \
             to_jsonb(c) ->> 'relallfrozen') from rel join pg_class c using (oid) \
         union all select format('pg_statistic %s: %s', s.starelid::regclass, s) \
             from pg_statistic s where s.starelid in (select oid from rel) \
         union all select format('extended statistics %s: %s', e.stxname, d) \
             from pg_statistic_ext_data d join pg_statistic_ext e on e.oid = d.stxoid \
         order by 1",
    )
    .fetch_all(&mut *connection)
    .await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "select relname::text from pg_class where relnamespace = 'public'::regnamespace \
         and relkind = 'r' order by 1",
    )
    .fetch_all(&mut *connection)
    .await?;
    for table in tables {
        let statement = format!(
            "select coalesce(string_agg(ctid::text || ' ' || x::text, ', ' order by ctid), '') \
             from {table} x"
        );
        let rows: String = sqlx::query_scalar(AssertSqlSafe(statement))
            .fetch_one(&mut *connection)
            .await?;
        view.push(format!("rows of {table}: {rows}"));
    }
    for join in SHOP_JOINS {
        let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("explain {join}")))
            .fetch_all(&mut *connection)
            .await?;
        view.push(format!("plan of {join}:\n{}", plan.join("\n")));
    }
    let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "select x::text from ({SHOP_UNORDERED}) x"
    )))
    .fetch_all(&mut *connection)
    .await?;
    view.push(format!("unordered join: {}", rows.join(", ")));
    // Where the next test's first row goes (the template has no payments).
    let mut transaction = connection.begin().await?;
    let place: String = sqlx::query_scalar(
        "insert into payments (order_id, amount) values (2, 1) returning ctid::text",
    )
    .fetch_one(&mut *transaction)
    .await?;
    transaction.rollback().await?;
    view.push(format!("a new payment's place: {place}"));
    Ok(view)
}

/// What the planner sees of a copy of `template` made now.
async fn fresh_planner_view(pool: &PgPool, template: &str) -> anyhow::Result<Vec<String>> {
    on_fresh_copy(pool, template, planner_view).await
}

/// What `look` finds in a copy of `template` made now (and dropped after),
/// on the server of `pool`.
async fn on_fresh_copy<T>(
    pool: &PgPool,
    template: &str,
    look: impl AsyncFnOnce(&mut PgConnection) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
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
    let found = look(&mut fresh).await;
    fresh.close().await?;
    admin
        .execute("drop database recycle_fresh with (force)")
        .await?;
    found
}

/// Waits until autovacuum has been through the database of `pool`, from
/// a pass that began after now: it writes a catalog (a large object made
/// and unlinked: dead rows in `pg_largeobject_metadata`, which a server
/// whose thresholds are 0 vacuums at its next pass), waits until that
/// catalog was vacuumed, then until no autovacuum worker is left in the
/// database (the pass's later tables, the shop's among them, are done).
async fn autovacuum_went_through(pool: &PgPool) -> anyhow::Result<()> {
    let since: String =
        sqlx::query_scalar("select now()::text from (select lo_unlink(lo_create(0))) unlinked")
            .fetch_one(pool)
            .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (vacuumed, workers): (bool, i64) = sqlx::query_as(
            "select coalesce(pg_stat_get_last_autovacuum_time( \
                 'pg_largeobject_metadata'::regclass) > $1::timestamptz, false), \
             (select count(*) from pg_stat_activity where datname = current_database() \
                 and backend_type = 'autovacuum worker')",
        )
        .bind(&since)
        .fetch_one(pool)
        .await?;
        if vacuumed && workers == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "autovacuum did not go through the database within 30 s"
        );
        sqlx::query("select pg_stat_clear_snapshot()")
            .execute(pool)
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that its database, as it claimed it (and, with
/// `PGTEST_IT_AUTOVACUUM` set, once autovacuum went through it), is what
/// the planner sees of a fresh copy of the template; then writes several
/// hundred rows into the shop's tables, deletes and updates some of the
/// template's, and, in odd rounds (`PGTEST_IT_ROUND`), analyzes the
/// database, in rounds divisible by 3 vacuums the orders (as autovacuum
/// would: freed space reused by the next inserts), in round 4 updates the
/// last region to what it was. Records its database first.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle/fidelity")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_shop(pool: PgPool) -> anyhow::Result<()> {
    let round: i64 = std::env::var("PGTEST_IT_ROUND")?.parse()?;
    let mine = record(&pool).await?;
    if std::env::var_os("PGTEST_IT_AUTOVACUUM").is_some() {
        autovacuum_went_through(&pool).await?;
    }
    let template = &mine[..mine.rfind('_').expect("a copy's name")];
    let expected = fresh_planner_view(&pool, template).await?;
    let mut connection = pool.acquire().await?;
    let found = planner_view(&mut connection).await?;
    let differences: Vec<String> = found
        .iter()
        .filter(|line| !expected.contains(line))
        .map(|line| format!("recycled only: {line}"))
        .chain(
            expected
                .iter()
                .filter(|line| !found.contains(line))
                .map(|line| format!("fresh only:    {line}")),
        )
        .collect();
    anyhow::ensure!(
        differences.is_empty(),
        "round {round}: the planner sees the recycled database otherwise than a fresh copy:\n{}",
        differences.join("\n")
    );
    sqlx::query(
        "insert into customers (region_id, name, tier) \
         select 1 + (i * $1) % 12, 'new customer ' || i, i % 3 from generate_series(1, 8) i",
    )
    .bind(round)
    .execute(&mut *connection)
    .await?;
    sqlx::query(
        "insert into orders (customer_id, placed, total, note) \
         select 1 + (i * ($1 + 3)) % 60, date '2024-02-01' + i % 50, i * 1.25, \
             case when i % 25 = 0 then (select string_agg(md5(i::text || j::text), '') \
                 from generate_series(1, 250) j) end \
         from generate_series(1, 150) i",
    )
    .bind(round)
    .execute(&mut *connection)
    .await?;
    sqlx::query(
        "insert into lines select o.id, n, 'product ' || (o.id * n + $1) % 13, n \
         from orders o, generate_series(1, 3) n where o.id > 40",
    )
    .bind(round)
    .execute(&mut *connection)
    .await?;
    // A note of its own: the reset empties notes, not the notes of orders
    // that inherit from them.
    sqlx::query("insert into notes values (100 + $1, 'a note')")
        .bind(i32::try_from(round)?)
        .execute(&mut *connection)
        .await?;
    if round == 0 {
        // The only write to payments an insert that fails (no such order),
        // with a temporary table that sends the reset to looking at every
        // table (and no ANALYZE): a dead row is all it leaves.
        let failed = sqlx::query("insert into payments (order_id, amount) values (-1, 1)")
            .execute(&mut *connection)
            .await;
        anyhow::ensure!(failed.is_err(), "a payment of no order went in");
        connection
            .execute("create temporary table scratch (n int)")
            .await?;
    } else {
        sqlx::query(
            "insert into payments (order_id, amount, paid) \
             select id, total, case when id % 3 = 0 then placed end from orders \
             where id % 2 = $1 % 2",
        )
        .bind(round)
        .execute(&mut *connection)
        .await?;
    }
    if round == 4 {
        // A few payments, one with a memo long enough for TOAST: the
        // reset grows the table again, TOAST table included.
        sqlx::query(
            "insert into payments (order_id, amount, memo) select 2, 1, \
                 (select string_agg(md5(j::text), '') from generate_series(1, 250) j)",
        )
        .execute(&mut *connection)
        .await?;
    }
    if round % 3 == 2 {
        // More payments than the pages the template's table has take: the
        // reset grows it again.
        sqlx::query(
            "insert into payments (order_id, amount) select 2, i from generate_series(1, 600) i",
        )
        .execute(&mut *connection)
        .await?;
    }
    connection
        .execute(
            "delete from orders where id % 4 = 1 and id <= 40; \
             update customers set tier = tier + 1 where id % 3 = 0; \
             update lines set qty = qty + 1 where n = 2",
        )
        .await?;
    if round == 4 {
        // The last row moved, the values, their order and the table's
        // size as they were.
        connection
            .execute("update regions set name = name where id = 12")
            .await?;
    }
    if round % 2 == 1 {
        connection.execute("analyze").await?;
    }
    if round % 3 == 0 {
        connection.execute("vacuum orders").await?;
    }
    Ok(())
}

/// Runs `statements` on `cluster` as the superuser; the first column of
/// the last one's first row, as text.
fn on_cluster(cluster: &Cluster, statements: &[&str]) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut admin = PgConnection::connect(&cluster.url()).await.unwrap();
        let mut last = None;
        for statement in statements {
            let row = sqlx::query(AssertSqlSafe(*statement))
                .fetch_optional(&mut admin)
                .await
                .unwrap();
            last = row.and_then(|row| row.try_get::<String, _>(0).ok());
        }
        last
    })
}

/// Makes `cluster`'s autovacuum work at once: a second between passes,
/// thresholds of 0 (any row written or dead is enough).
fn eager_autovacuum(cluster: &Cluster) {
    on_cluster(
        cluster,
        &[
            "alter system set autovacuum_naptime = 1",
            "alter system set autovacuum_vacuum_threshold = 0",
            "alter system set autovacuum_vacuum_scale_factor = 0",
            "alter system set autovacuum_vacuum_insert_threshold = 0",
            "alter system set autovacuum_vacuum_insert_scale_factor = 0",
            "alter system set autovacuum_analyze_threshold = 0",
            "alter system set autovacuum_analyze_scale_factor = 0",
            "select pg_reload_conf()::text",
        ],
    );
}

/// Runs `rounds` of the shop's fixture on `cluster`, autovacuum eager
/// from the second on (after the first built the template): each round
/// checks, at its claim, once autovacuum went through, that the planner
/// sees its database as it sees a fresh copy.
fn shop_rounds(cluster: &Cluster, file: &Path, rounds: std::ops::Range<usize>) {
    for round in rounds {
        if round > 0 {
            eager_autovacuum(cluster);
        }
        let mut command = cluster.exact("fixture_recycle_shop");
        command
            .env("PGTEST_IT_FILE", file)
            .env("PGTEST_IT_ROUND", round.to_string());
        if round > 0 {
            command.env("PGTEST_IT_AUTOVACUUM", "1");
        }
        assert_passed(&run(command), 1);
    }
}

/// Changes the template's large object as `PGTEST_IT_SQL` says, or only
/// reads it (when unset), then records its database.
#[pg_test(
    isolation = "database",
    migrations = "tests/fixtures/recycle/large_objects"
)]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_large_object(pool: PgPool) -> anyhow::Result<()> {
    record(&pool).await?;
    let body: String =
        sqlx::query_scalar("select convert_from(lo_get(body), 'UTF8') from documents")
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(
        body == "first draft",
        "the template's large object reads {body:?}"
    );
    if let Ok(sql) = std::env::var("PGTEST_IT_SQL") {
        pool.execute(AssertSqlSafe(sql)).await?;
    }
    Ok(())
}

#[test]
fn a_test_that_changes_the_templates_large_objects_never_hands_its_database_on() {
    let home = EmbeddedHome::new();
    let file = home.path().join("recorded");
    let test = "fixture_recycle_large_object";
    let reads = || run(home.exact(test).env("PGTEST_IT_FILE", &file));
    assert_passed(&reads(), 1);
    assert_passed(&reads(), 1);
    let names = recorded(&file);
    assert_eq!(names[0], names[1], "a reading test's database is recycled");
    for sql in [
        "select lo_put(body, 0, convert_to('FIRST', 'UTF8')) from documents",
        "select lo_truncate(lo_open(body, 131072), 5) from documents",
        "grant select on large object 4242 to public",
        "create role pgtest_it_reader; alter large object 4242 owner to pgtest_it_reader",
        // Below the oids of objects made after initdb: outside the
        // catalog's fingerprint.
        "comment on large object 4242 is 'left by a test'",
    ] {
        assert_passed(
            &run(home
                .exact(test)
                .env("PGTEST_IT_FILE", &file)
                .env("PGTEST_IT_SQL", sql)),
            1,
        );
        // The next test reads the template's large object as it is.
        assert_passed(&reads(), 1);
        let names = recorded(&file);
        let [.., changed, next] = &names[..] else {
            unreachable!()
        };
        assert_ne!(changed, next, "handed on after `{sql}`");
    }
}

/// Leaves a prepared transaction that inserted a team, then records its
/// database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_prepares_a_transaction(pool: PgPool) -> anyhow::Result<()> {
    let mut connection = pool.acquire().await?;
    connection
        .execute(
            "begin; insert into teams (name) values ('prepared'); \
             prepare transaction 'pgtest_it'",
        )
        .await?;
    drop(connection);
    record(&pool).await.map(drop)
}

#[test]
fn a_database_left_with_a_prepared_transaction_is_never_handed_on() {
    let cluster = Cluster::start(&[("max_prepared_transactions", "2")]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recorded");
    for fixture in [
        "fixture_recycle_reads",
        "fixture_recycle_prepares_a_transaction",
        "fixture_recycle_is_a_fresh_copy",
    ] {
        assert_passed(&run(cluster.exact(fixture).env("PGTEST_IT_FILE", &file)), 1);
    }
    let names = recorded(&file);
    assert_eq!(names[0], names[1], "recycled before: {names:?}");
    assert_ne!(
        names[1], names[2],
        "the database with a prepared transaction was handed on: {names:?}"
    );
    // Its prepared transaction rolled back, the spares helper can drop it.
    let gone = format!(
        "select (not exists (select from pg_database where datname = '{}'))::text",
        names[1]
    );
    wait_for(
        "the spares helper to drop the retired database",
        Duration::from_secs(60),
        || on_cluster(&cluster, &[&gone]).as_deref() == Some("true"),
    );
}

#[test]
fn a_recycled_database_is_what_the_planner_sees_of_a_fresh_copy_at_each_claim() {
    let cluster = Cluster::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recorded");
    shop_rounds(&cluster, &file, 0..6);
    let names = recorded(&file);
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(
        names.iter().all(|name| *name == names[0]),
        "every test got the first one's database: {names:?}"
    );
}

/// Changes rows of a table whose statistics the template has (regions)
/// and analyzes it, then records its database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/recycle/fidelity")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_recycle_changes_template_statistics(pool: PgPool) -> anyhow::Result<()> {
    pool.execute(
        "update regions set name = name || ' (renamed)' where id % 2 = 0; analyze regions",
    )
    .await?;
    record(&pool).await?;
    Ok(())
}

#[test]
fn statistics_the_template_has_are_written_back_from_postgresql_18_on_and_retire_the_database_before()
 {
    let cluster = Cluster::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recorded");
    shop_rounds(&cluster, &file, 0..1);
    let output = run(cluster
        .exact("fixture_recycle_changes_template_statistics")
        .env("PGTEST_IT_FILE", &file));
    assert_passed(&output, 1);
    shop_rounds(&cluster, &file, 2..3);
    let names = recorded(&file);
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(
        names[0], names[1],
        "the second test got the first's database"
    );
    let version = on_cluster(&cluster, &["show server_version_num"]).unwrap();
    let major = version.parse::<u32>().unwrap() / 10000;
    match major >= 18 {
        true => assert_eq!(
            names[1], names[2],
            "PostgreSQL {major} writes statistics back"
        ),
        false => assert_ne!(
            names[1], names[2],
            "PostgreSQL {major} cannot write them back"
        ),
    }
}
