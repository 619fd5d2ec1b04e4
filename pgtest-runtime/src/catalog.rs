//! Every statement pgtest runs on its own behalf, and the quoting of the
//! names and texts in them: databases made, renamed, marked and dropped,
//! their markers read, advisory locks, and the server's settings and
//! sessions. Each function runs on a connection the caller owns and
//! returns sqlx's error, which the caller explains (see
//! [`crate::server::Server`]).

use sqlx::postgres::PgConnection;
use sqlx::{Executor, Row};

use crate::error::sqlstate;
use crate::markers::{Marker, PREFIX, SPARE};

/// First key of pgtest's advisory locks ("pgts"); the second is per name.
const LOCK_CLASS: i32 = 0x7067_7473;

/// `name` as a quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `prefix` as a `LIKE` pattern that matches the names starting with it.
fn starting_with(prefix: &str) -> String {
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("{escaped}%")
}

/// Runs `sql`, one statement or several, as it is.
pub(crate) async fn run(connection: &mut PgConnection, sql: &str) -> sqlx::Result<()> {
    connection.execute(crate::compat::raw(sql)).await.map(drop)
}

/// The marker of `database`: `None` when it does not exist or has no
/// marker of pgtest's; the comment itself when it has another.
pub(crate) async fn comment(
    connection: &mut PgConnection,
    database: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar::<_, Option<String>>(
        "select shobj_description(oid, 'pg_database') from pg_database where datname = $1",
    )
    .bind(database)
    .fetch_optional(connection)
    .await
    .map(Option::flatten)
}

/// The marker of the database `connection` is connected to.
pub(crate) async fn own_marker(connection: &mut PgConnection) -> sqlx::Result<Option<Marker>> {
    let comment: Option<String> = sqlx::query_scalar(
        "select shobj_description(oid, 'pg_database') from pg_database \
         where datname = current_database()",
    )
    .fetch_one(connection)
    .await?;
    Ok(comment.as_deref().and_then(Marker::parse))
}

/// Whether `database` exists.
pub(crate) async fn exists(connection: &mut PgConnection, database: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("select exists (select from pg_database where datname = $1)")
        .bind(database)
        .fetch_one(connection)
        .await
}

/// Every database with a marker of pgtest's, by name, with its marker
/// (`None` when pgtest cannot read it: a newer version's, say).
pub(crate) async fn marked(
    connection: &mut PgConnection,
) -> sqlx::Result<Vec<(String, Option<Marker>)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select datname, description from (select datname, \
         shobj_description(oid, 'pg_database') as description from pg_database) d \
         where description like $1 order by datname",
    )
    .bind(starting_with(PREFIX))
    .fetch_all(connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, comment)| (name, Marker::parse(&comment)))
        .collect())
}

/// Up to `limit` databases marked `marker`, in random order.
pub(crate) async fn marked_as(
    connection: &mut PgConnection,
    marker: &Marker,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "select datname from pg_database where shobj_description(oid, 'pg_database') = $1 \
         order by random() limit $2",
    )
    .bind(marker.to_string())
    .bind(limit)
    .fetch_all(connection)
    .await
}

/// How many other client sessions than this one are connected to the
/// database this one is (an SQL expression; autovacuum's do not count).
pub(crate) const OTHER_SESSIONS: &str = "(select count(*) from pg_stat_get_activity(null) a \
    where a.datid = (select oid from pg_database where datname = current_database()) \
    and a.pid <> pg_backend_pid() and a.backend_type <> 'autovacuum worker')";

/// How many spare databases there are, of every template (an SQL
/// expression).
pub(crate) fn spares_count() -> String {
    format!(
        "(select count(*) from pg_shdescription \
         where classoid = 'pg_database'::regclass and description like {})",
        literal(&starting_with(SPARE))
    )
}

/// How many databases are marked `marker` (an SQL expression).
pub(crate) fn marked_count(marker: &Marker) -> String {
    format!(
        "(select count(*) from pg_shdescription \
         where classoid = 'pg_database'::regclass and description = {})",
        literal(&marker.to_string())
    )
}

/// Lets the rest of the transaction commit without waiting for the write
/// ahead log to reach the disk: pgtest's own bookkeeping in a test's
/// database (a claim, a reset). A crash of the server loses at most the
/// last of them, never one a later commit builds on: a commit that waits
/// (a test's own) writes every earlier one first.
pub(crate) const NO_FLUSH_WAIT: &str = "set local synchronous_commit = off";

/// How many databases are marked `marker`, and the size of `database` in
/// bytes (0 when it does not exist).
pub(crate) async fn count_and_size(
    connection: &mut PgConnection,
    marker: &Marker,
    database: &str,
) -> sqlx::Result<(u32, u64)> {
    let statement = format!(
        "select {}, coalesce((select pg_database_size(datname) from pg_database \
             where datname = $1), 0)",
        marked_count(marker)
    );
    let row = crate::compat::query(&statement)
        .bind(database)
        .fetch_one(connection)
        .await?;
    let (count, size): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok((
        u32::try_from(count).unwrap_or(u32::MAX),
        u64::try_from(size).unwrap_or(0),
    ))
}

/// Creates `database`, a copy of `template` if given, marked `marker`.
/// Two statements: `CREATE DATABASE` cannot run inside a transaction block.
pub(crate) async fn create(
    connection: &mut PgConnection,
    database: &str,
    template: Option<&str>,
    marker: &Marker,
) -> sqlx::Result<()> {
    let template = template
        .map(|template| format!(" template {}", ident(template)))
        .unwrap_or_default();
    run(
        connection,
        &format!("create database {}{template}", ident(database)),
    )
    .await?;
    mark(connection, database, marker).await
}

/// Gives `database` the marker `marker`.
pub(crate) async fn mark(
    connection: &mut PgConnection,
    database: &str,
    marker: &Marker,
) -> sqlx::Result<()> {
    run(connection, &mark_statement(database, marker)).await
}

/// The statement that marks `database` with `marker`.
pub(crate) fn mark_statement(database: &str, marker: &Marker) -> String {
    format!(
        "comment on database {} is {}",
        ident(database),
        literal(&marker.to_string())
    )
}

/// Marks `from` with `marker` and renames it to `to`, in one transaction.
pub(crate) async fn mark_and_rename(
    connection: &mut PgConnection,
    from: &str,
    marker: &Marker,
    to: &str,
) -> sqlx::Result<()> {
    let statement = format!(
        "comment on database {from} is {marker}; alter database {from} rename to {to}",
        from = ident(from),
        to = ident(to),
        marker = literal(&marker.to_string()),
    );
    run(connection, &statement).await
}

/// Drops `database` if it exists, ending its sessions.
pub(crate) async fn drop_forced(connection: &mut PgConnection, database: &str) -> sqlx::Result<()> {
    let statement = format!("drop database if exists {} with (force)", ident(database));
    run(connection, &statement).await
}

/// Drops `database` if it exists, unless someone is connected to it;
/// whether it is gone.
pub(crate) async fn drop_unused(
    connection: &mut PgConnection,
    database: &str,
) -> sqlx::Result<bool> {
    let statement = format!("drop database if exists {}", ident(database));
    match run(connection, &statement).await {
        Ok(()) => Ok(true),
        // 55006: "database … is being accessed by other users".
        Err(error) if sqlstate(&error).as_deref() == Some("55006") => Ok(false),
        Err(error) => Err(error),
    }
}

/// Claims the database `connection` is connected to, `name`, if it is
/// marked `spare`: marks it `marker`, under a transaction advisory lock (the
/// database's own: claimers elsewhere are connected to it too). The
/// claim's transaction id (its low 32 bits: catalog rows written later
/// are newer) and the value of the SQL expression `counts` if given (an
/// array, read in the same transaction), or `None` when it was not spare.
pub(crate) async fn claim(
    connection: &mut PgConnection,
    name: &str,
    spare: &Marker,
    marker: &Marker,
    counts: Option<&str>,
) -> sqlx::Result<Option<(u32, Option<Vec<i64>>)>> {
    // Two round trips, the test's first: look, then mark or give up.
    let look = format!(
        "begin; select pg_try_advisory_xact_lock({LOCK_CLASS}, {}), \
             (select shobj_description(oid, 'pg_database') from pg_database \
                 where datname = current_database()), \
             txid_current() % 4294967296, {}",
        lock_key(name),
        counts.unwrap_or("null::int8[]")
    );
    let claimed = async {
        let rows = crate::compat::raw(&look)
            .fetch_all(&mut *connection)
            .await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let (locked, current): (bool, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
        if !locked || current.as_deref().and_then(Marker::parse).as_ref() != Some(spare) {
            return Ok(None);
        }
        let (horizon, counts): (i64, Option<Vec<i64>>) = (row.try_get(2)?, row.try_get(3)?);
        let mark = format!("{NO_FLUSH_WAIT}; {}; commit", mark_statement(name, marker));
        run(&mut *connection, &mark).await?;
        Ok(Some((u32::try_from(horizon).unwrap_or_default(), counts)))
    };
    let claimed = claimed.await;
    if !matches!(claimed, Ok(Some(_))) {
        let _ = run(connection, "rollback").await;
    }
    claimed
}

/// This transaction's id (its low 32 bits), assigned if it has none.
pub(crate) async fn horizon(connection: &mut PgConnection) -> sqlx::Result<u32> {
    let id: i64 = sqlx::query_scalar("select txid_current() % 4294967296")
        .fetch_one(connection)
        .await?;
    Ok(u32::try_from(id).unwrap_or_default())
}

/// Makes later lock waits of this session end after `milliseconds`.
pub(crate) async fn set_lock_timeout(
    connection: &mut PgConnection,
    milliseconds: u128,
    local: bool,
) -> sqlx::Result<()> {
    let scope = if local { "local " } else { "" };
    run(
        connection,
        &format!("set {scope}lock_timeout = {}", milliseconds.max(1)),
    )
    .await
}

/// Takes the session advisory lock of `name`, waiting for it (at most the
/// session's lock timeout).
pub(crate) async fn advisory_lock(connection: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("select pg_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(name))
        .execute(connection)
        .await
        .map(drop)
}

/// Takes the session advisory lock of `name` if it is free; whether it did.
pub(crate) async fn try_advisory_lock(
    connection: &mut PgConnection,
    name: &str,
) -> sqlx::Result<bool> {
    sqlx::query_scalar("select pg_try_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(name))
        .fetch_one(connection)
        .await
}

/// Lets go of the session advisory lock of `name`.
pub(crate) async fn advisory_unlock(connection: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("select pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(name))
        .execute(connection)
        .await
        .map(drop)
}

/// The sessions that hold the advisory lock of `name`, one line each.
pub(crate) async fn advisory_holders(
    connection: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "select format('pid %s (%s, %s, since %s)', a.pid, \
                coalesce(nullif(a.application_name, ''), 'no application_name'), \
                a.client_addr, a.backend_start) \
         from pg_locks l join pg_stat_activity a using (pid) \
         where l.locktype = 'advisory' and l.granted and l.classid = $1::oid and l.objid = $2::oid",
    )
    .bind(i64::from(LOCK_CLASS))
    .bind(i64::from(u32::from_ne_bytes(lock_key(name).to_ne_bytes())))
    .fetch_all(connection)
    .await
}

/// The second key of the advisory lock of `name`.
fn lock_key(name: &str) -> i32 {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// `max_connections` less `superuser_reserved_connections`.
pub(crate) async fn client_connections(connection: &mut PgConnection) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "select current_setting('max_connections')::int \
              - current_setting('superuser_reserved_connections')::int",
    )
    .fetch_one(connection)
    .await
}

/// `max_connections`, and who holds the server's client sessions: counts
/// per `application_name`, most first.
pub(crate) async fn sessions(connection: &mut PgConnection) -> sqlx::Result<(String, Vec<String>)> {
    let allowed: String = sqlx::query_scalar("select current_setting('max_connections')")
        .fetch_one(&mut *connection)
        .await?;
    let holders: Vec<String> = sqlx::query_scalar(
        "select format('%s × %s', count(*), coalesce(nullif(application_name, ''), 'unnamed')) \
         from pg_stat_activity where backend_type = 'client backend' \
         group by application_name order by count(*) desc limit 20",
    )
    .fetch_all(connection)
    .await?;
    Ok((allowed, holders))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_between_names_and_are_stable() {
        assert_eq!(
            lock_key("pgtest_a_000000000000"),
            lock_key("pgtest_a_000000000000")
        );
        assert_ne!(
            lock_key("pgtest_a_000000000000"),
            lock_key("pgtest_a_000000000001")
        );
    }

    #[test]
    fn names_and_texts_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(starting_with("pgtest_a_s"), "pgtest\\_a\\_s%");
    }
}
