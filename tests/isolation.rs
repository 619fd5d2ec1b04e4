//! The three isolation modes: what each test sees, what it leaves behind,
//! and the sweeping of test databases, against real servers.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Cluster, assert_failed_without_password, assert_passed, run, run_together, wait_for};
use pgtest::{PgPool, TestContext, pg_test};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, Connection, Postgres};

/// A database of its own: fixed ids and whole-table counts are safe, and
/// it is neither the shared database nor the template.
#[pg_test(
    isolation = "database",
    migrations = "tests/fixtures/posts",
    fixtures("fixtures/sql/posts.sql")
)]
async fn a_database_of_its_own_starts_from_the_template(ctx: TestContext) -> anyhow::Result<()> {
    let titles: Vec<String> = sqlx::query_scalar("select title from posts order by id")
        .fetch_all(ctx.pool())
        .await?;
    assert_eq!(titles, ["first", "second"]);
    sqlx::query("insert into posts (id, title) values (3, 'mine')")
        .execute(ctx.pool())
        .await?;
    let (database, description): (String, String) = sqlx::query_as(
        "select current_database(), shobj_description(oid, 'pg_database') from pg_database \
         where datname = current_database()",
    )
    .fetch_one(ctx.pool())
    .await?;
    assert_eq!(database, ctx.database());
    assert!(
        description.starts_with("pgtest: test database; test=isolation::a_database_of_its_own"),
        "{description}"
    );
    Ok(())
}

/// Inside a transaction: a nested `begin()` is a savepoint, its `commit()`
/// a release, and a rolled-back savepoint takes only its own rows.
#[pg_test(isolation = "transaction", migrations = "tests/fixtures/posts")]
async fn a_nested_transaction_is_a_savepoint(
    mut conn: PoolConnection<Postgres>,
) -> anyhow::Result<()> {
    let id: i32 = rand_id();
    let mut inner = conn.begin().await?;
    sqlx::query("insert into posts (id, title) values ($1, 'kept')")
        .bind(id)
        .execute(&mut *inner)
        .await?;
    inner.commit().await?;
    let mut undone = conn.begin().await?;
    sqlx::query("insert into posts (id, title) values ($1, 'undone')")
        .bind(id + 1)
        .execute(&mut *undone)
        .await?;
    undone.rollback().await?;
    let titles: Vec<String> =
        sqlx::query_scalar("select title from posts where id in ($1, $2) order by id")
            .bind(id)
            .bind(id + 1)
            .fetch_all(&mut *conn)
            .await?;
    assert_eq!(titles, ["kept"]);
    let depth: bool = sqlx::query_scalar("select now() = statement_timestamp()")
        .fetch_one(&mut *conn)
        .await?;
    assert!(!depth, "still inside the test's transaction");
    Ok(())
}

/// A post id no other test of this file uses.
fn rand_id() -> i32 {
    let uuid = uuid::Uuid::new_v4().as_u128();
    1_000 + (uuid % 1_000_000_000) as i32
}

/// Pool options and connect options point at the test's own database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
async fn options_point_at_the_tests_database(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) -> anyhow::Result<()> {
    let pool = options.connect_with(connect).await?;
    let count: i64 = sqlx::query_scalar("select count(*) from posts")
        .fetch_one(&pool)
        .await?;
    assert_eq!(count, 0, "no fixtures were asked for");
    pool.close().await;
    Ok(())
}

// Fixtures: run in their own processes, several at once, by the tests
// below.

/// Inserts fixed ids and counts the whole table while its neighbours do
/// the same.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_database_fixed_ids(pool: PgPool) -> anyhow::Result<()> {
    fixed_ids(&pool).await
}

/// Hangs, as a test that a runner's timeout ends.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_database_hangs(_pool: PgPool) {
    std::future::pending::<()>().await;
}

async fn fixed_ids(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("insert into posts (id, title) values (1, 'one')")
        .execute(pool)
        .await?;
    // Long enough for the neighbours started with it to be at work too.
    sqlx::query("select pg_sleep(0.3)").execute(pool).await?;
    let count: i64 = sqlx::query_scalar("select count(*) from posts")
        .fetch_one(pool)
        .await?;
    assert_eq!(count, 1, "a neighbour's row is visible");
    Ok(())
}

/// Inserts a row of its own, committed by the test, and counts the table.
#[pg_test(isolation = "transaction", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run in its own processes by the tests of this file"]
async fn fixture_transaction_commits(mut conn: PoolConnection<Postgres>) -> anyhow::Result<()> {
    let mut transaction = conn.begin().await?;
    sqlx::query("insert into posts (id, title) values ($1, 'committed')")
        .bind(rand_id())
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    sqlx::query("select pg_sleep(0.3)")
        .execute(&mut *conn)
        .await?;
    let count: i64 = sqlx::query_scalar("select count(*) from posts")
        .fetch_one(&mut *conn)
        .await?;
    assert_eq!(count, 1, "a neighbour's row is visible");
    Ok(())
}

/// Fails after writing to its own database.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_database_fails(pool: PgPool) {
    fail_with_evidence(&pool).await;
}

/// Fails too, as another test.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_database_fails_too(pool: PgPool) {
    fail_with_evidence(&pool).await;
}

async fn fail_with_evidence(pool: &PgPool) {
    sqlx::query("insert into posts (id, title) values (7, 'evidence')")
        .execute(pool)
        .await
        .unwrap();
    panic!("failed on purpose");
}

/// Writes to its own database, closes every connection, waits for the file
/// `PGTEST_IT_GO` to appear, then reads its row back.
#[pg_test(isolation = "database", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_database_waits_unconnected(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) -> anyhow::Result<()> {
    let mut connection = sqlx::PgConnection::connect_with(&connect).await?;
    sqlx::query("insert into posts (id, title) values (1, 'still here')")
        .execute(&mut connection)
        .await?;
    connection.close().await?;
    let go = PathBuf::from(std::env::var("PGTEST_IT_GO")?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !go.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", go.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = options.connect_with(connect).await?;
    let title: String = sqlx::query_scalar("select title from posts where id = 1")
        .fetch_one(&pool)
        .await?;
    assert_eq!(title, "still here");
    pool.close().await;
    Ok(())
}

#[test]
fn parallel_tests_with_databases_of_their_own_never_see_each_others_rows() {
    let cluster = Cluster::start(&[]);
    for output in run_together(4, |_| cluster.exact("fixture_database_fixed_ids")) {
        assert_passed(&output, 1);
    }
}

#[test]
fn parallel_transactions_never_see_each_others_rows_and_leave_none_behind() {
    let cluster = Cluster::start(&[]);
    for output in run_together(4, |_| cluster.exact("fixture_transaction_commits")) {
        assert_passed(&output, 1);
    }
    assert_eq!(
        cluster.psql_in(&cluster.run_database(), "select count(*) from posts"),
        "0",
        "rows committed by the tests are gone"
    );
}

/// The database of a test of run `run`.
fn in_run(cluster: &Cluster, test: &str, run: &str) -> std::process::Command {
    let mut command = cluster.exact(test);
    command.env("NEXTEST_RUN_ID", run);
    command
}

/// Like [`in_run`], as a role that may create databases but is not a
/// superuser, whose copies pgtest cannot put back (see `recycle.rs`): the
/// spares helper makes copies ahead and drops passed tests' databases.
fn in_run_as_creator(cluster: &Cluster, test: &str, run: &str) -> std::process::Command {
    cluster.psql(
        "do $$ begin create role creator login createdb; \
         exception when duplicate_object then null; end $$",
    );
    let mut command = in_run(cluster, test, run);
    command.env("PGTEST_DATABASE_URL", cluster.socket_url_for("creator"));
    command
}

/// Like [`in_run`], without spares: the tests sweep passed tests'
/// databases themselves.
fn in_run_without_spares(cluster: &Cluster, test: &str, run: &str) -> std::process::Command {
    let mut command = in_run(cluster, test, run);
    command.env("PGTEST_SPARE_DATABASES", "0");
    command
}

fn test_databases(cluster: &Cluster) -> Vec<String> {
    let names = cluster.psql(
        "select datname from pg_database \
         where shobj_description(oid, 'pg_database') like 'pgtest: test database;%' order by 1",
    );
    names.lines().map(str::to_owned).collect()
}

#[test]
fn a_failed_tests_database_is_kept_named_and_swept_by_the_next_run() {
    let cluster = Cluster::start(&[]);
    let output = run(in_run_without_spares(
        &cluster,
        "fixture_database_fails",
        "run-1",
    ));
    let printed = assert_failed_without_password(&output);
    let kept = test_databases(&cluster);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        printed.contains(&format!(
            "its database {} is kept until a later run sweeps it",
            kept[0]
        )) && printed.contains(&format!("psql -h '127.0.0.1' -p {}", cluster.port())),
        "{printed}"
    );
    assert_eq!(
        cluster.psql_in(&kept[0], "select title from posts"),
        "evidence"
    );
    // The same run leaves it alone.
    assert_passed(
        &run(in_run_without_spares(
            &cluster,
            "fixture_database_fixed_ids",
            "run-1",
        )),
        1,
    );
    assert!(test_databases(&cluster).contains(&kept[0]));
    // The next one sweeps it (and the passed test's database too).
    assert_passed(
        &run(in_run_without_spares(
            &cluster,
            "fixture_database_fixed_ids",
            "run-2",
        )),
        1,
    );
    let left = test_databases(&cluster);
    assert!(!left.contains(&kept[0]), "{left:?}");
    assert_eq!(
        left.len(),
        1,
        "only the sweeper's own database is left: {left:?}"
    );
}

#[test]
fn failed_tests_databases_are_kept_the_newest_of_each_and_within_the_limit() {
    let cluster = Cluster::start(&[]);
    let failing = |test| {
        let mut command = in_run(&cluster, test, "run-1");
        command.env("PGTEST_KEEP_FAILED", "1");
        assert_failed_without_password(&run(&mut command))
    };
    failing("fixture_database_fails");
    let first = test_databases(&cluster);
    assert_eq!(first.len(), 1, "{first:?}");
    // The same test fails again: its newer database is the one kept.
    let printed = failing("fixture_database_fails");
    let second = test_databases(&cluster);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    assert!(
        printed.contains(&format!(
            "its database {} is kept until a later run sweeps it (the one its failure \
             before kept, {}, is dropped)",
            second[0], first[0]
        )),
        "{printed}"
    );
    // Another test fails with the limit reached: its own is dropped.
    let printed = failing("fixture_database_fails_too");
    assert_eq!(test_databases(&cluster), second);
    assert!(
        printed.contains(
            "was dropped: 1 failed tests' databases are kept already (PGTEST_KEEP_FAILED=1)"
        ),
        "{printed}"
    );
}

#[test]
fn a_concurrent_run_never_sweeps_a_live_tests_database() {
    let cluster = Cluster::start(&[]);
    let go = tempfile::tempdir().unwrap();
    let go_file = go.path().join("go");
    let waiter = in_run(&cluster, "fixture_database_waits_unconnected", "run-a")
        .env("PGTEST_IT_GO", &go_file)
        .spawn()
        .unwrap();
    // Its row written and its connection closed.
    cluster.wait_until(
        "select exists (select from pg_database d join pg_stat_database s using (datname) \
         where shobj_description(d.oid, 'pg_database') like 'pgtest: test database;%' \
         and s.xact_commit > 0 \
         and not exists (select from pg_stat_activity a where a.datname = d.datname))",
        Duration::from_secs(60),
    );
    let waiting = test_databases(&cluster);
    // Another run sweeps while the waiter holds no connection.
    for output in run_together(3, |_| {
        in_run(&cluster, "fixture_database_fixed_ids", "run-b")
    }) {
        assert_passed(&output, 1);
    }
    assert!(
        waiting
            .iter()
            .all(|name| test_databases(&cluster).contains(name)),
        "the live test's database survived the other run's sweeps"
    );
    std::fs::write(&go_file, b"").unwrap();
    assert_passed(&common::finish(waiter, Duration::from_secs(60)), 1);
}

#[tokio::test]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_remove_all() {
    let removed = pgtest::remove_all().await.unwrap();
    println!("dropped {} databases: {removed:?}", removed.dropped.len());
}

#[test]
fn remove_all_drops_what_pgtest_made_and_nothing_else() {
    let cluster = Cluster::start(&[]);
    let _ = run(cluster.exact("fixture_database_fails"));
    // A passed test's database, put back as a spare.
    assert_passed(&run(cluster.exact("fixture_database_fixed_ids")), 1);
    assert_eq!(oids(&cluster, SPARES).len(), 1);
    assert_passed(&run(cluster.exact("fixture_transaction_commits")), 1);
    cluster.psql("create database mine");
    let made = cluster.pgtest_databases();
    let template = made
        .iter()
        .find(|name| common::snapshot_file(&cluster.home(), name).is_some())
        .expect("the template's snapshot, taken by the passed test")
        .clone();
    assert_eq!(
        made.len(),
        4,
        "a template, its spare, a kept test database, the shared one: {made:?}"
    );
    let output = run(cluster.exact("fixture_remove_all"));
    assert_passed(&output, 1);
    let printed = common::text(&output);
    assert!(printed.contains("dropped 4 databases"), "{printed}");
    assert_eq!(cluster.pgtest_databases(), Vec::<String>::new());
    assert_eq!(
        cluster.psql("select count(*) from pg_database where datname = 'mine'"),
        "1"
    );
    // The template is gone: its next build takes a snapshot of its own.
    assert_eq!(common::snapshot_file(&cluster.home(), &template), None);
}

#[pg_test(migrations = "tests/fixtures/notes")]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_shared_notes(pool: PgPool) -> anyhow::Result<()> {
    sqlx::query("insert into notes (body) values ('hi')")
        .execute(&pool)
        .await?;
    Ok(())
}

/// Stamps `template` as last copied `days` ago.
fn last_used(cluster: &Cluster, template: &str, days: u64) {
    let then = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - days * 24 * 60 * 60;
    cluster.psql(&format!(
        "comment on database {template} is 'pgtest: template, ready; used={then}'"
    ));
}

#[test]
fn a_template_unused_for_a_week_is_swept_and_one_in_use_is_kept() {
    let cluster = Cluster::start(&[]);
    assert_passed(&run(in_run(&cluster, "fixture_shared_notes", "run-1")), 1);
    let notes_template = cluster.pgtest_databases().remove(0);
    last_used(&cluster, &notes_template, 8);
    assert_passed(
        &run(in_run_without_spares(
            &cluster,
            "fixture_database_fixed_ids",
            "run-2",
        )),
        1,
    );
    let left = cluster.pgtest_databases();
    assert!(
        !left.iter().any(|name| name.starts_with(&notes_template)),
        "the stale template and its run's copy are gone: {left:?}"
    );
    assert_eq!(
        left.len(),
        2,
        "the posts template and the test's copy: {left:?}"
    );
    let stamp = cluster.psql(&format!(
        "select shobj_description(oid, 'pg_database') from pg_database where datname = '{}'",
        left[0]
    ));
    assert!(
        stamp.starts_with("pgtest: template, ready; used="),
        "{stamp}"
    );
}

#[test]
fn spares_of_a_template_unused_for_a_day_are_swept() {
    let cluster = Cluster::start(&[]);
    assert_passed(
        &run(in_run(&cluster, "fixture_database_fixed_ids", "run-1")),
        1,
    );
    wait_for_the_helper(&cluster, 1);
    let posts_template = cluster.pgtest_databases().remove(0);
    last_used(&cluster, &posts_template, 2);
    // A run of another template sweeps beside its first test.
    assert_passed(&run(in_run(&cluster, "fixture_shared_notes", "run-2")), 1);
    assert_eq!(oids(&cluster, SPARES), Vec::<String>::new());
    assert!(
        cluster.pgtest_databases().contains(&posts_template),
        "the template itself stays until it is a week unused"
    );
}

/// Writes post 42 in its transaction, then keeps the transaction open until
/// the file `PGTEST_IT_GO` appears (when `PGTEST_IT_GO` is set).
#[pg_test(isolation = "transaction", migrations = "tests/fixtures/posts")]
#[ignore = "a fixture, run by the tests of this file"]
async fn fixture_transaction_same_key(mut conn: PoolConnection<Postgres>) -> anyhow::Result<()> {
    sqlx::query("insert into posts (id, title) values (42, 'same key')")
        .execute(&mut *conn)
        .await?;
    if let Ok(go) = std::env::var("PGTEST_IT_GO") {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !PathBuf::from(&go).exists() {
            assert!(Instant::now() < deadline, "{go} never appeared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[test]
fn two_transactions_writing_the_same_key_fail_with_a_message_not_a_hang() {
    let cluster = Cluster::start(&[]);
    let go = tempfile::tempdir().unwrap();
    let go_file = go.path().join("go");
    let holder = cluster
        .exact("fixture_transaction_same_key")
        .env("PGTEST_IT_GO", &go_file)
        .spawn()
        .unwrap();
    cluster.wait_until(
        "select exists (select from pg_stat_activity where state = 'idle in transaction' \
         and application_name like '%fixture_transaction_same_key')",
        Duration::from_secs(60),
    );
    let output = run(cluster.exact("fixture_transaction_same_key"));
    let printed = assert_failed_without_password(&output);
    assert!(
        printed.contains("lock timeout")
            && printed.contains("waited 5s for a lock held by another test's transaction")
            && printed.contains("or isolation = \"database\""),
        "{printed}"
    );
    std::fs::write(&go_file, b"").unwrap();
    assert_passed(&common::finish(holder, Duration::from_secs(60)), 1);
}

#[test]
fn passed_tests_databases_are_swept_by_the_next_tests() {
    let cluster = Cluster::start(&[]);
    for _ in 0..4 {
        assert_passed(
            &run(in_run_without_spares(
                &cluster,
                "fixture_database_fixed_ids",
                "run-1",
            )),
            1,
        );
    }
    let left = test_databases(&cluster);
    assert_eq!(left.len(), 1, "only the last test's database: {left:?}");
}

/// The databases whose comment starts with a marker.
const SPARES: &str = "pgtest: spare database;";
const TEST_DATABASES: &str = "pgtest: test database;";

/// A query that tells whether `count` databases are marked with `marker`.
fn count_is(marker: &str, count: usize) -> String {
    format!(
        "select count(*) = {count} from pg_database \
         where shobj_description(oid, 'pg_database') like '{marker}%'"
    )
}

/// The oids of the databases marked with `marker`.
fn oids(cluster: &Cluster, marker: &str) -> Vec<String> {
    let oids = cluster.psql(&format!(
        "select oid from pg_database where shobj_description(oid, 'pg_database') like '{marker}%' \
         order by oid"
    ));
    oids.lines().map(str::to_owned).collect()
}

/// The connection budget's `clients.lock` of the cluster's runs.
fn clients_lock(cluster: &Cluster) -> std::fs::File {
    let budgets = cluster.home().join("budget");
    let found = std::fs::read_dir(&budgets)
        .unwrap()
        .flatten()
        .map(|server| server.path().join("clients.lock"))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("no clients.lock under {}", budgets.display()));
    std::fs::File::open(found).unwrap()
}

/// Waits until the spares helper has done its work after a run of `tests`
/// passing tests: no test database left, a spare for each test.
fn wait_for_the_helper(cluster: &Cluster, tests: usize) {
    let done = format!(
        "select ({}) and ({})",
        count_is(SPARES, tests),
        count_is(TEST_DATABASES, 0)
    );
    cluster.wait_until(&done, Duration::from_secs(60));
}

/// Runs `count` database-mode tests of the run `run` at once, as a role
/// whose copies are not put back; all pass.
fn fixed_ids_together(cluster: &Cluster, count: usize, run: &str) {
    for output in run_together(count, |_| {
        in_run_as_creator(cluster, "fixture_database_fixed_ids", run)
    }) {
        assert_passed(&output, 1);
    }
}

#[test]
fn after_a_run_the_helper_drops_passed_databases_and_the_next_run_claims_its_spares() {
    let cluster = Cluster::start(&[]);
    fixed_ids_together(&cluster, 3, "run-1");
    wait_for_the_helper(&cluster, 3);
    let spares = oids(&cluster, SPARES);
    // Held as a test process would, so that the helper waits while the
    // next run's databases are looked at.
    let clients = clients_lock(&cluster);
    clients.lock_shared().unwrap();
    fixed_ids_together(&cluster, 3, "run-2");
    assert_eq!(
        oids(&cluster, TEST_DATABASES),
        spares,
        "the second run's tests got the spares, renamed"
    );
    assert_eq!(oids(&cluster, SPARES), Vec::<String>::new());
    drop(clients);
    wait_for_the_helper(&cluster, 3);
}

#[test]
fn the_helper_makes_no_copy_that_would_leave_the_disk_short_of_room() {
    let cluster = Cluster::start(&[]);
    let tests = |run| {
        run_together(3, |_| {
            let mut command = in_run_as_creator(&cluster, "fixture_database_fixed_ids", run);
            // More room than any disk has.
            command.env("PGTEST_MIN_FREE_DISK", "1000000000");
            command
        })
    };
    // The helper may read where the server's data is.
    cluster.psql(
        "do $$ begin create role creator login createdb; \
         exception when duplicate_object then null; end $$; \
         grant pg_read_all_settings to creator",
    );
    for output in tests("run-1") {
        assert_passed(&output, 1);
    }
    cluster.wait_until(&count_is(TEST_DATABASES, 0), Duration::from_secs(60));
    let said = wait_for_helper(&cluster, "copies made ahead stop");
    assert!(
        said.contains("would leave less than PGTEST_MIN_FREE_DISK=1000000000 MiB"),
        "{said}"
    );
    assert_eq!(oids(&cluster, SPARES), Vec::<String>::new());
}

/// Waits until the cluster's spares helper says `what` (a minute at most);
/// what it said, all of it when it never does.
fn wait_for_helper(cluster: &Cluster, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let said = cluster.spares_log();
        if said.contains(what) {
            return said;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for the spares helper to say {what:?}; it said:\n{said}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The spares helper of the cluster's runs: the process whose environment
/// names the helper and the cluster's home (Linux: read from `/proc`).
fn spares_helper(cluster: &Cluster) -> Option<i32> {
    let home = cluster.home();
    let home = home.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let mine = environ.split(|&byte| byte == 0).any(|var| {
                var.starts_with(b"PGTEST_HELPER=spares ")
                    && var.windows(home.len()).any(|w| w == home)
            });
            mine.then_some(pid)
        })
}

#[test]
fn a_helper_killed_midway_leaves_its_work_to_the_next() {
    let cluster = Cluster::start(&[]);
    fixed_ids_together(&cluster, 8, "run-1");
    // Held as a test process would (before the helper's 2 s of quiet), so
    // that the helper waits until it is watched.
    let clients = clients_lock(&cluster);
    clients.lock_shared().unwrap();
    let helper = spares_helper(&cluster).expect("a spares helper runs");
    let budgets = cluster.home().join("budget");
    let queued = || {
        std::fs::read_dir(&budgets)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|server| {
                std::fs::read_dir(server.path().join("jobs"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .filter(|job| job.path().extension().is_some_and(|ext| ext == "job"))
            .count()
    };
    drop(clients);
    // Killed once it has queued its work, before it is done.
    wait_for(
        "the helper to queue its work",
        Duration::from_secs(30),
        || queued() > 0,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let left = queued();
    assert!(left > 0, "the helper finished before it was killed");

    // The next run's test starts the next helper, which does it all.
    assert_passed(
        &run(in_run_as_creator(
            &cluster,
            "fixture_database_fixed_ids",
            "run-2",
        )),
        1,
    );
    cluster.wait_until(&count_is(TEST_DATABASES, 0), Duration::from_secs(60));
    wait_for(
        "the next helper to do every job",
        Duration::from_secs(60),
        || queued() == 0,
    );
    let spares = oids(&cluster, SPARES).len();
    assert!(
        spares >= 8,
        "the spares asked for were made: {spares} ({left} jobs were left)"
    );
}

#[test]
fn a_helper_outlives_a_test_its_runner_kills_and_does_the_runs_work() {
    use std::os::unix::process::CommandExt;

    let cluster = Cluster::start(&[]);
    let mut hung = in_run_as_creator(&cluster, "fixture_database_hangs", "run-1");
    // In a process group of its own, as nextest runs each test.
    let mut hung = hung.process_group(0).spawn().unwrap();
    let mut helper = None;
    wait_for("a helper to start", Duration::from_secs(30), || {
        helper = spares_helper(&cluster);
        helper.is_some()
    });
    let helper = helper.unwrap();
    // What nextest does on a timeout: SIGTERM, then SIGKILL, to the group.
    let group = nix::unistd::Pid::from_raw(-(hung.id() as i32));
    nix::sys::signal::kill(group, nix::sys::signal::SIGTERM).unwrap();
    nix::sys::signal::kill(group, nix::sys::signal::SIGKILL).unwrap();
    let _ = hung.wait();
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper), None).is_ok(),
        "the helper died with the test's group"
    );
    // The spare the test asked for is made once the server is idle.
    cluster.wait_until(&count_is(SPARES, 1), Duration::from_secs(60));
}
