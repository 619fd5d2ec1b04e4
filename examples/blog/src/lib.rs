//! A small blog: users write posts, others comment. Its test suite was
//! written for `#[sqlx::test]` (fixed ids in fixtures, whole-table counts)
//! and moved to pgtest by changing the attribute's path to
//! `#[pgtest::sqlx_test]`.

use sqlx::PgExecutor;

/// A published post and its author's name.
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    /// The post's id.
    pub id: i64,
    /// The post's title.
    pub title: String,
    /// Who wrote it.
    pub author: String,
}

/// Adds a user; returns the new id.
pub async fn add_user(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("insert into users (name) values ($1) returning id")
        .bind(name)
        .fetch_one(db)
        .await
}

/// Writes an unpublished post; returns the new id.
pub async fn write_post(db: impl PgExecutor<'_>, author_id: i64, title: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("insert into posts (author_id, title) values ($1, $2) returning id")
        .bind(author_id)
        .bind(title)
        .fetch_one(db)
        .await
}

/// Publishes a post; whether it existed.
pub async fn publish(db: impl PgExecutor<'_>, post_id: i64) -> sqlx::Result<bool> {
    let done = sqlx::query("update posts set published = true where id = $1")
        .bind(post_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The published posts, oldest first.
pub async fn published(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Published>> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "select p.id, p.title, u.name from posts p join users u on u.id = p.author_id \
         where p.published order by p.id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, title, author)| Published { id, title, author })
        .collect())
}

/// How many comments a post has.
pub async fn comment_count(db: impl PgExecutor<'_>, post_id: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar("select count(*) from comments where post_id = $1")
        .bind(post_id)
        .fetch_one(db)
        .await
}
