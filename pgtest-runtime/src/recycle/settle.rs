//! Readying a template as it is built, so that a reset can put its copies
//! back into what a fresh copy is.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::fingerprint::FORMATS;
use super::grow::{Taken, grow, placeholder};
use super::snapshot::{MAX_ROWS_BYTES, USER_SCHEMAS, copy_in, copy_out};
use crate::catalog;
use crate::compat::query;

/// Readies the template `connection` (its builder's) is connected to,
/// once its migrations and fixtures ran:
///
/// - its tables and materialized views keep autovacuum out (the storage
///   settings `autovacuum_enabled` and `toast.autovacuum_enabled`, copied
///   with them): autovacuum neither analyzes nor vacuums the template or
///   its copies, so a copy's statistics and pages stay as they were made
///   (those of tables its role does not own are left alone);
/// - where its copies may be recycled (the role is a superuser) and its
///   rows are few enough to keep in a snapshot, it is laid out as a reset
///   lays out what it puts back: every table emptied, vacuumed to no
///   pages, its indexes built anew, then its rows copied back in the same
///   order (no dead rows, no space left by updates and deletes), and every
///   populated materialized view refreshed. Its `pg_class` statistics are
///   then a vacuumed table's (`reltuples` 0, not -1: the planner does not
///   take an empty table for 10 pages);
/// - each table with no rows is then [grown](grow), where a reset can put
///   it back so (see [`growable`]): it gets the pages a
///   test's first few rows would give it, empty, so that a reset of a
///   test that wrote a few rows into it needs neither to truncate it nor
///   to build its indexes anew (an index build waits for a sync of its
///   file to disk before PostgreSQL 17).
pub(crate) async fn settle(connection: &mut PgConnection) -> sqlx::Result<()> {
    let settings = format!(
        "select format('alter %s %s set (autovacuum_enabled = false, \
                 toast.autovacuum_enabled = false)', \
             case c.relkind when 'm' then 'materialized view' else 'table' end, c.oid::regclass) \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'm') and {USER_SCHEMAS} \
         and pg_has_role(c.relowner, 'MEMBER') order by c.oid"
    );
    let settings = texts(connection, &settings).await?;
    if !settings.is_empty() {
        catalog::run(connection, &settings.join("; ")).await?;
    }
    let superuser: bool =
        sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
            .fetch_one(&mut *connection)
            .await?;
    if !superuser {
        return Ok(());
    }
    let Some(tables) = take_rows(connection).await? else {
        return Ok(());
    };
    if tables.is_empty() {
        return Ok(());
    }
    let mut empty = "set synchronous_commit = off; \
        begin; set local session_replication_role = replica; "
        .to_owned();
    for (name, _, _) in &tables {
        empty.push_str(&format!("delete from only {name}; "));
    }
    empty.push_str("commit");
    catalog::run(connection, &empty).await?;
    let names: Vec<&str> = tables.iter().map(|(name, _, _)| name.as_str()).collect();
    catalog::run(
        connection,
        &format!(
            "vacuum (index_cleanup on, truncate on) {}",
            names.join(", ")
        ),
    )
    .await?;
    let mut transaction = connection.begin().await?;
    let mut fill = format!("{FORMATS}; set local session_replication_role = replica");
    for name in &names {
        fill.push_str(&format!("; reindex table {name}"));
    }
    catalog::run(&mut transaction, &fill).await?;
    for (name, columns, data) in &tables {
        if !data.is_empty() {
            copy_in(&mut transaction, name, columns, data).await?;
        }
    }
    let views = format!(
        "select format('refresh materialized view %s', c.oid::regclass) \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind = 'm' and c.relispopulated and {USER_SCHEMAS} order by c.oid"
    );
    let views = texts(&mut transaction, &views).await?;
    if !views.is_empty() {
        catalog::run(&mut transaction, &views.join("; ")).await?;
    }
    transaction.commit().await?;
    let mut transaction = connection.begin().await?;
    catalog::run(&mut transaction, FORMATS).await?;
    let growable = texts(&mut transaction, &growable()).await?;
    let mut placeholders = Vec::new();
    let mut taken = Taken::new();
    let empty = tables
        .iter()
        .filter(|(name, _, data)| data.is_empty() && growable.contains(name));
    for (name, _, _) in empty {
        if let Some(statements) = placeholder(&mut transaction, name, &mut taken).await? {
            placeholders.push((name.as_str(), statements));
        }
    }
    transaction.rollback().await?;
    let placeholders: Vec<(&str, &str)> = placeholders
        .iter()
        .map(|(name, statements)| (*name, statements.as_str()))
        .collect();
    grow(connection, &placeholders).await.map(drop)
}

/// The tables that a reset which deletes and vacuums without truncation
/// puts back as a fresh copy has them once grown (see [`grow`]), by name:
/// from PostgreSQL 14 on (before, `VACUUM` leaves a page's line pointers
/// as many as it had rows), those whose indexes are all btrees (a GIN
/// index keeps its keys, and its metapage counts them for the planner),
/// and from 17 on, those with an index (`VACUUM` of one without truncates
/// no line pointers).
fn growable() -> String {
    format!(
        "select c.oid::regclass::text from pg_class c \
             join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind = 'r' and {USER_SCHEMAS} \
             and current_setting('server_version_num')::int >= 140000 \
             and not exists (select from pg_index i join pg_class ic on ic.oid = i.indexrelid \
                 join pg_am am on am.oid = ic.relam where i.indrelid = c.oid \
                 and am.amname <> 'btree') \
             and (current_setting('server_version_num')::int < 170000 \
                 or exists (select from pg_index i where i.indrelid = c.oid))"
    )
}

/// Each table's name, columns and rows (`COPY` text, in physical order);
/// `None` when they are too many to keep, or a table has rows but no
/// columns to copy them back with (its copies are not recycled either).
async fn take_rows(
    connection: &mut PgConnection,
) -> sqlx::Result<Option<Vec<(String, String, String)>>> {
    let mut transaction = connection.begin().await?;
    catalog::run(&mut transaction, FORMATS).await?;
    let statement = format!(
        "select c.oid::regclass::text, \
             coalesce((select string_agg(quote_ident(attname), ', ' order by attnum) \
                 from pg_attribute where attrelid = c.oid and attnum > 0 \
                 and not attisdropped and attgenerated = ''), '') \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind = 'r' and {USER_SCHEMAS} order by c.oid"
    );
    let found = query(&statement).fetch_all(&mut *transaction).await?;
    let mut tables = Vec::new();
    let mut bytes = 0;
    for row in found {
        let (name, columns): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        let data = match columns.is_empty() {
            true => {
                let statement = format!("select exists (select from only {name})");
                let has_rows: bool = query(&statement)
                    .fetch_one(&mut *transaction)
                    .await?
                    .try_get(0)?;
                if has_rows {
                    return Ok(None);
                }
                String::new()
            }
            false => copy_out(&mut transaction, &name, &columns).await?,
        };
        bytes += data.len();
        if bytes > MAX_ROWS_BYTES {
            return Ok(None);
        }
        tables.push((name, columns, data));
    }
    transaction.rollback().await?;
    Ok(Some(tables))
}

/// The first column of each row of `statement`, a query pgtest built.
async fn texts(connection: &mut PgConnection, statement: &str) -> sqlx::Result<Vec<String>> {
    let rows = query(statement).fetch_all(connection).await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}
