//! The statements pgtest runs on its own behalf that are not about its
//! databases (those are the registry's: see [`crate::registry`]), and the
//! quoting of the names and texts in them: advisory locks, the server's
//! settings and sessions, the transaction horizon. Each function runs on a
//! connection the caller owns and returns sqlx's error, which the caller
//! explains (see [`crate::server::Server`]).

use sqlx::Executor;
use sqlx::postgres::PgConnection;

/// First key of pgtest's advisory locks ("pgts"); the second is per name.
pub(crate) const LOCK_CLASS: i32 = 0x7067_7473;

/// `name` as a quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs `sql`, one statement or several, as it is.
pub(crate) async fn run(connection: &mut PgConnection, sql: &str) -> sqlx::Result<()> {
    connection.execute(crate::compat::raw(sql)).await.map(drop)
}

/// How many other client sessions than this one are connected to the
/// database this one is (an SQL expression; autovacuum's do not count).
pub(crate) const OTHER_SESSIONS: &str = "(select count(*) from pg_stat_get_activity(null) a \
    where a.datid = (select oid from pg_database where datname = current_database()) \
    and a.pid <> pg_backend_pid() and a.backend_type <> 'autovacuum worker')";

/// Lets the rest of the transaction commit without waiting for the write
/// ahead log to reach the disk: pgtest's own bookkeeping in a test's
/// database (a claim, a reset). A crash of the server loses at most the
/// last of them, never one a later commit builds on: a commit that waits
/// (a test's own) writes every earlier one first.
pub(crate) const NO_FLUSH_WAIT: &str = "set local synchronous_commit = off";

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
pub(crate) fn lock_key(name: &str) -> i32 {
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
    }
}
