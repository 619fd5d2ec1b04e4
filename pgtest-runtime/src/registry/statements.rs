//! The statements that make, mark, list, claim and drop pgtest's
//! databases, and the server's word on whose a database is ([`OURS`]).
//! Each runs on a connection the caller owns and returns sqlx's error,
//! which the caller explains.

use std::time::{Duration, Instant};

use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::markers::{Marker, PREFIX, SPARE};
use crate::catalog::{LOCK_CLASS, NO_FLUSH_WAIT, ident, literal, lock_key, run};
use crate::error::sqlstate;
use crate::wait::{Look, Pace, wait_until};

/// `prefix` as a `LIKE` pattern that matches the names starting with it.
fn starting_with(prefix: &str) -> String {
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("{escaped}%")
}

/// Whether the database of the row `d` of `pg_database` is owned by the
/// role this session logged in as (pgtest's role: test pools `SET ROLE`,
/// their login stays), the server's word on whose it is. Fully qualified,
/// so that it means the same in a database whose owner set a search path.
/// By name (role names are unique, and a role that owns a database cannot
/// be dropped): `pg_roles`, a view, costs a new session a millisecond to
/// plan.
pub(crate) const OURS: &str =
    "pg_catalog.pg_get_userbyid(d.datdba) operator(pg_catalog.=) session_user";

/// A database, as the server describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// Its owner's name.
    pub(crate) owner: String,
    /// Whether its owner is pgtest's role (see [`OURS`]).
    pub(crate) ours: bool,
    /// Its marker, when its comment is one of pgtest's.
    pub(crate) marker: Option<Marker>,
}

impl Found {
    /// Its marker, when it is pgtest's: owned by its role and marked.
    pub(crate) fn pgtest_marker(&self) -> Option<&Marker> {
        self.marker.as_ref().filter(|_| self.ours)
    }
}

/// The server's clock, in seconds since the epoch, and `database` as it
/// describes it (`None` when it does not exist), in one round trip.
pub(crate) async fn lookup(
    connection: &mut PgConnection,
    database: &str,
) -> sqlx::Result<(u64, Option<Found>)> {
    let statement = format!(
        "select extract(epoch from pg_catalog.now())::int8, d.owner, d.ours, d.comment \
         from (select 1) one left join (select pg_catalog.pg_get_userbyid(d.datdba) as owner, \
             {OURS} as ours, pg_catalog.shobj_description(d.oid, 'pg_database') as comment \
             from pg_catalog.pg_database d where d.datname operator(pg_catalog.=) $1) d on true"
    );
    let row = crate::compat::query(&statement)
        .bind(database)
        .fetch_one(connection)
        .await?;
    let now: i64 = row.try_get(0)?;
    let owner: Option<String> = row.try_get(1)?;
    let found = match owner {
        Some(owner) => {
            let comment: Option<String> = row.try_get(3)?;
            Some(Found {
                owner,
                ours: row.try_get(2)?,
                marker: comment.as_deref().and_then(Marker::parse),
            })
        }
        None => None,
    };
    Ok((u64::try_from(now).unwrap_or(0), found))
}

/// The database `connection` is connected to, as the server describes it:
/// the first query on a test's connection to a database pgtest has not
/// looked at over an admin connection (the warm path), fully qualified,
/// so that an owner's search path cannot make it run another's function.
pub(crate) async fn this_database(connection: &mut PgConnection) -> sqlx::Result<Found> {
    let statement = format!(
        "select pg_catalog.pg_get_userbyid(d.datdba), {OURS}, \
             pg_catalog.shobj_description(d.oid, 'pg_database') \
         from pg_catalog.pg_database d \
         where d.datname operator(pg_catalog.=) pg_catalog.current_database()"
    );
    let row = crate::compat::query(&statement)
        .fetch_one(connection)
        .await?;
    let comment: Option<String> = row.try_get(2)?;
    Ok(Found {
        owner: row.try_get(0)?,
        ours: row.try_get(1)?,
        marker: comment.as_deref().and_then(Marker::parse),
    })
}

/// The server's clock (seconds since the epoch) and every database of
/// pgtest's role with a marker of pgtest's, by name, with its marker
/// (`None` when pgtest cannot read it: a newer version's, say). Other
/// roles' databases are not listed, whatever their comments say.
pub(crate) async fn marked(
    connection: &mut PgConnection,
) -> sqlx::Result<(u64, Vec<(String, Option<Marker>)>)> {
    let statement = format!(
        "select d.datname::text, pg_catalog.shobj_description(d.oid, 'pg_database'), \
             extract(epoch from pg_catalog.now())::int8 \
         from pg_catalog.pg_database d \
         where pg_catalog.shobj_description(d.oid, 'pg_database') like $1 and {OURS} \
         order by 1"
    );
    let rows = crate::compat::query(&statement)
        .bind(starting_with(PREFIX))
        .fetch_all(&mut *connection)
        .await?;
    let now: i64 = match rows.first() {
        Some(row) => row.try_get(2)?,
        None => {
            sqlx::query_scalar("select extract(epoch from pg_catalog.now())::int8")
                .fetch_one(connection)
                .await?
        }
    };
    let mut marked = Vec::with_capacity(rows.len());
    for row in rows {
        let (name, comment): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        marked.push((name, Marker::parse(&comment)));
    }
    Ok((u64::try_from(now).unwrap_or(0), marked))
}

/// Up to `limit` databases of pgtest's role marked `marker`, in random
/// order.
pub(crate) async fn marked_as(
    connection: &mut PgConnection,
    marker: &Marker,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    let statement = format!(
        "select d.datname::text from pg_catalog.pg_database d \
         where pg_catalog.shobj_description(d.oid, 'pg_database') operator(pg_catalog.=) $1 \
             and {OURS} \
         order by pg_catalog.random() limit $2"
    );
    let rows = crate::compat::query(&statement)
        .bind(marker.to_string())
        .bind(limit)
        .fetch_all(connection)
        .await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// How many spare databases pgtest's role has, of every template (an SQL
/// expression).
pub(crate) fn spares_count() -> String {
    format!(
        "(select count(*) from pg_catalog.pg_shdescription s \
             join pg_catalog.pg_database d on d.oid operator(pg_catalog.=) s.objoid \
         where s.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass \
             and s.description like {} and {OURS})",
        literal(&starting_with(SPARE))
    )
}

/// How many databases of pgtest's role are marked `marker` (an SQL
/// expression).
pub(crate) fn marked_count(marker: &Marker) -> String {
    format!(
        "(select count(*) from pg_catalog.pg_shdescription s \
             join pg_catalog.pg_database d on d.oid operator(pg_catalog.=) s.objoid \
         where s.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass \
             and s.description operator(pg_catalog.=) {} and {OURS})",
        literal(&marker.to_string())
    )
}

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

/// How long a copy is tried again while another session is in its
/// template (55006, after the server's own 5 s wait): a test that has
/// just copied it, or someone's `psql`.
pub(crate) const COPY_RETRY: Duration = Duration::from_secs(20);

/// Why a database could not be created.
#[derive(Debug)]
pub(crate) enum CreateError {
    /// The server's error.
    Sql(sqlx::Error),
    /// Sessions stayed in the template for [`COPY_RETRY`]: one line each.
    TemplateInUse {
        template: String,
        sessions: Vec<String>,
    },
}

impl From<sqlx::Error> for CreateError {
    fn from(error: sqlx::Error) -> Self {
        Self::Sql(error)
    }
}

/// Creates `database`, a copy of `template` if given, marked `marker`,
/// that only pgtest's role (and superusers) may connect to: access
/// privileges are not copied from a template. A copy whose template
/// another session is in is tried again for [`COPY_RETRY`]. Two round
/// trips: `CREATE DATABASE` cannot run inside a transaction block.
pub(crate) async fn create(
    connection: &mut PgConnection,
    database: &str,
    template: Option<&str>,
    marker: &Marker,
) -> Result<(), CreateError> {
    let statement = format!(
        "create database {}{}",
        ident(database),
        template
            .map(|template| format!(" template {}", ident(template)))
            .unwrap_or_default()
    );
    let deadline = Instant::now() + COPY_RETRY;
    let what = format!("{} to be free to copy", template.unwrap_or(database));
    let made = wait_until(deadline, &what, Pace::Server, async || {
        match run(connection, &statement).await {
            Ok(()) => Ok(Look::Ready(())),
            // 55006: "source database … is being accessed by other users".
            Err(error) if template.is_some() && sqlstate(&error).as_deref() == Some("55006") => {
                Ok(Look::Held("another session".to_owned()))
            }
            Err(error) => Err(CreateError::from(error)),
        }
    })
    .await?;
    if made.is_err()
        && let Some(template) = template
    {
        let sessions = sessions_in(connection, template).await?;
        return Err(CreateError::TemplateInUse {
            template: template.to_owned(),
            sessions,
        });
    }
    let statement = format!(
        "{}; revoke all on database {} from public",
        mark_statement(database, marker),
        ident(database)
    );
    run(connection, &statement).await.map_err(CreateError::Sql)
}

/// The sessions connected to `database`, one line each.
async fn sessions_in(connection: &mut PgConnection, database: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "select format('pid %s, role %s (%s, from %s, since %s, %s)', a.pid, a.usename, \
                coalesce(nullif(a.application_name, ''), 'no application_name'), \
                coalesce(a.client_addr::text, 'a local socket'), a.backend_start, a.state) \
         from pg_catalog.pg_stat_activity a where a.datname = $1 order by a.backend_start",
    )
    .bind(database)
    .fetch_all(connection)
    .await
}

/// The size in bytes of each of `databases` (0 for one that is gone), in
/// their order.
pub(crate) async fn sizes(
    connection: &mut PgConnection,
    databases: &[String],
) -> sqlx::Result<Vec<u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select d.datname::text, pg_catalog.pg_database_size(d.oid) \
         from pg_catalog.pg_database d where d.datname = any($1)",
    )
    .bind(databases)
    .fetch_all(connection)
    .await?;
    Ok(databases
        .iter()
        .map(|name| {
            rows.iter()
                .find(|(found, _)| found == name)
                .map_or(0, |(_, size)| u64::try_from(*size).unwrap_or(0))
        })
        .collect())
}

/// Makes the lock database `name`, marked so, unless it exists (another
/// process made it at the same time: fine). Any role may connect to it:
/// pgtest's roles all lock there; nothing but locks is kept in it.
pub(crate) async fn create_lock_database(
    connection: &mut PgConnection,
    name: &str,
) -> sqlx::Result<()> {
    match run(connection, &format!("create database {}", ident(name))).await {
        Ok(()) => mark(connection, name, &Marker::LockDatabase).await,
        // 42P04: it exists; 23505: made at the same moment by another.
        Err(error) if matches!(sqlstate(&error).as_deref(), Some("42P04" | "23505")) => Ok(()),
        Err(error) => Err(error),
    }
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

/// What [`drop_ours`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Dropped, or not there.
    Gone,
    /// Someone is connected to it.
    InUse,
    /// It is not pgtest's role's: left alone.
    NotOurs,
}

/// Drops `database` if it exists and pgtest's role owns it (the server's
/// word: a superuser could drop anyone's), unless someone is connected
/// to it, or, `forced`, ending their sessions. Two round trips: the look,
/// then `DROP DATABASE`, which cannot run inside a transaction block; in
/// between, only its owner or a superuser could rename or drop it.
pub(crate) async fn drop_ours(
    connection: &mut PgConnection,
    database: &str,
    forced: bool,
) -> sqlx::Result<Dropped> {
    let look = format!(
        "select {OURS} from pg_catalog.pg_database d where d.datname operator(pg_catalog.=) $1"
    );
    let ours: Option<bool> = crate::compat::query(&look)
        .bind(database)
        .fetch_optional(&mut *connection)
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    match ours {
        None => return Ok(Dropped::Gone),
        Some(false) => return Ok(Dropped::NotOurs),
        Some(true) => {}
    }
    let force = if forced { " with (force)" } else { "" };
    let statement = format!("drop database if exists {}{force}", ident(database));
    match run(connection, &statement).await {
        Ok(()) => Ok(Dropped::Gone),
        // 55006: "database … is being accessed by other users".
        Err(error) if sqlstate(&error).as_deref() == Some("55006") => Ok(Dropped::InUse),
        Err(error) => Err(error),
    }
}

/// What a [`claim`] found.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// Claimed: the claim's transaction id (its low 32 bits: catalog rows
    /// written later are newer) and the counts it read.
    Ours {
        horizon: u32,
        counts: Option<Vec<i64>>,
    },
    /// Not spare (any more): another test took it.
    Taken,
    /// Not pgtest's role's, whatever its marker says: its owner.
    NotOurs(String),
}

/// Claims the database `connection` is connected to, `name`, if pgtest's
/// role owns it and it is marked `spare`: marks it `marker` (stamped with
/// the server's clock), under a transaction advisory lock (the database's
/// own: claimers elsewhere are connected to it too). Reads the value of
/// the SQL expression `counts` if given (an array) in the same
/// transaction. The look runs with a search path of `pg_catalog` alone,
/// so that an owner's search path cannot make it run another's function.
pub(crate) async fn claim(
    connection: &mut PgConnection,
    name: &str,
    spare: &Marker,
    marker: &Marker,
    counts: Option<&str>,
) -> sqlx::Result<Claimed> {
    // Two round trips, the test's first: look, then mark or give up.
    let look = format!(
        "begin; set local search_path = pg_catalog, pg_temp; \
         select pg_try_advisory_xact_lock({LOCK_CLASS}, {}), d.comment, \
             txid_current() % 4294967296, {}, d.ours, d.owner, \
             extract(epoch from now())::int8 \
         from (select shobj_description(d.oid, 'pg_database') as comment, {OURS} as ours, \
                 pg_get_userbyid(d.datdba) as owner \
             from pg_database d where d.datname = current_database()) d",
        lock_key(name),
        counts.unwrap_or("null::int8[]")
    );
    let claimed = async {
        let rows = crate::compat::raw(&look)
            .fetch_all(&mut *connection)
            .await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let (locked, current): (bool, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
        let (ours, owner): (bool, String) = (row.try_get(4)?, row.try_get(5)?);
        if !ours {
            return Ok(Claimed::NotOurs(owner));
        }
        if !locked || current.as_deref().and_then(Marker::parse).as_ref() != Some(spare) {
            return Ok(Claimed::Taken);
        }
        let (horizon, counts, now): (i64, Option<Vec<i64>>, i64) =
            (row.try_get(2)?, row.try_get(3)?, row.try_get(6)?);
        let marker = marker.at(u64::try_from(now).unwrap_or(0));
        let mark = format!("{NO_FLUSH_WAIT}; {}; commit", mark_statement(name, &marker));
        run(&mut *connection, &mark).await?;
        Ok(Claimed::Ours {
            horizon: u32::try_from(horizon).unwrap_or_default(),
            counts,
        })
    };
    let claimed = claimed.await;
    if !matches!(claimed, Ok(Claimed::Ours { .. })) {
        let _ = run(connection, "rollback").await;
    }
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_as_it_is_written() {
        assert_eq!(starting_with("pgtest_a_s"), "pgtest\\_a\\_s%");
    }
}
