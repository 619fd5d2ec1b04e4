//! The blog's suite, as written for `#[sqlx::test]`: only the attribute's
//! path changed, from `sqlx::test` to `pgtest::sqlx_test`. Each test gets a
//! database of its own, so fixed ids and whole-table counts hold.

use std::sync::LazyLock;

use pgtest_example_blog::{Published, add_user, comment_count, publish, published, write_post};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, PgPool, Postgres};

#[pgtest::sqlx_test(fixtures("users", "posts"))]
async fn lists_exactly_the_published_posts(pool: PgPool) -> sqlx::Result<()> {
    let posts = published(&pool).await?;
    assert_eq!(
        posts,
        [
            Published {
                id: 1,
                title: "Hello".into(),
                author: "alice".into()
            },
            Published {
                id: 3,
                title: "Bob writes".into(),
                author: "bob".into()
            },
        ]
    );
    Ok(())
}

#[pgtest::sqlx_test(fixtures("users", "posts"), fixtures("../fixtures/comments.sql"))]
async fn several_fixture_groups_load_in_order(pool: PgPool) -> sqlx::Result<()> {
    assert_eq!(comment_count(&pool, 1).await?, 1);
    assert_eq!(comment_count(&pool, 2).await?, 0);
    Ok(())
}

#[pgtest::sqlx_test(
    fixtures(path = "../fixtures", scripts("comments")),
    fixtures("users", "posts")
)]
#[should_panic(expected = "comments_post_id_fkey")]
async fn fixtures_run_in_the_order_written(pool: PgPool) {
    // comments.sql refers to posts that are not there yet.
    let _ = pool;
}

#[pgtest::sqlx_test]
async fn counts_whole_tables_without_fixtures(pool: PgPool) -> sqlx::Result<()> {
    let alice = add_user(&pool, "alice").await?;
    write_post(&pool, alice, "first").await?;
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&pool)
        .await?;
    let posts: i64 = sqlx::query_scalar("select count(*) from posts")
        .fetch_one(&pool)
        .await?;
    assert_eq!((users, posts), (1, 1));
    Ok(())
}

#[pgtest::sqlx_test(fixtures("users"))]
async fn publishes_a_post_on_a_connection(mut conn: PoolConnection<Postgres>) -> sqlx::Result<()> {
    let mut tx = conn.begin().await?;
    let post = write_post(&mut *tx, 2, "Late").await?;
    assert!(publish(&mut *tx, post).await?);
    tx.commit().await?;
    let titles: Vec<String> = published(&mut *conn)
        .await?
        .into_iter()
        .map(|p| p.title)
        .collect();
    assert_eq!(titles, ["Late"]);
    Ok(())
}

#[pgtest::sqlx_test(fixtures("users"))]
async fn builds_a_pool_of_its_own(
    options: PgPoolOptions,
    connect: PgConnectOptions,
) -> sqlx::Result<()> {
    let pool = options.connect_with(connect).await?;
    let names: Vec<String> = sqlx::query_scalar("select name from users order by id")
        .fetch_all(&pool)
        .await?;
    assert_eq!(names, ["alice", "bob"]);
    pool.close().await;
    Ok(())
}

#[pgtest::sqlx_test(migrations = false)]
async fn without_migrations_the_database_is_empty(pool: PgPool) -> sqlx::Result<()> {
    let tables: i64 = sqlx::query_scalar(
        "select count(*) from information_schema.tables where table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(tables, 0);
    Ok(())
}

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("db/migrations");
    tokio::runtime::Builder::new_current_thread()
        .build()
        .and_then(|runtime| {
            runtime
                .block_on(Migrator::new(dir))
                .map_err(std::io::Error::other)
        })
        .expect("the migrations directory reads")
});

#[pgtest::sqlx_test(migrator = "MIGRATOR", fixtures("users"))]
async fn a_static_migrator_works_too(pool: PgPool) -> sqlx::Result<()> {
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&pool)
        .await?;
    assert_eq!(users, 2);
    Ok(())
}

macro_rules! counts_users {
    ($name:ident, $migrations:literal, $expected:literal) => {
        #[pgtest::sqlx_test(migrations = $migrations, fixtures("users"))]
        async fn $name(pool: PgPool) -> sqlx::Result<()> {
            let users: i64 = sqlx::query_scalar("select count(*) from users")
                .fetch_one(&pool)
                .await?;
            assert_eq!(users, $expected);
            Ok(())
        }
    };
}

counts_users!(a_macro_passes_the_migrations_directory, "db/migrations", 2);

#[pgtest::sqlx_test]
async fn an_async_test_without_arguments_runs_plainly() {
    let answer = async { 42 }.await;
    assert_eq!(answer, 42);
}

#[pgtest::sqlx_test]
fn a_plain_fn_is_a_plain_test() {
    assert_eq!(1 + 1, 2);
}
