//! Readying a template as it is built, so that a reset can put its copies
//! back into what a fresh copy is.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::snapshot::{FORMATS, MAX_ROWS_BYTES, USER_SCHEMAS, copy_in, copy_out};
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
///   lays out what it puts back: every table emptied and its rows copied
///   back in the same order, in one transaction (no dead rows, no space
///   that updates and deletes left; indexes and TOAST filled anew), and
///   every populated materialized view refreshed.
pub(crate) async fn settle(connection: &mut PgConnection) -> sqlx::Result<()> {
    let settings = texts(
        &mut *connection,
        &format!(
            "select format('alter %s %s set (autovacuum_enabled = false, \
                 toast.autovacuum_enabled = false)', \
             case c.relkind when 'm' then 'materialized view' else 'table' end, c.oid::regclass) \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'm') and {USER_SCHEMAS} \
         and pg_has_role(c.relowner, 'MEMBER') order by c.oid"
        ),
    )
    .await?;
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
    let mut transaction = connection.begin().await?;
    catalog::run(
        &mut transaction,
        &format!("{FORMATS}; set local session_replication_role = replica"),
    )
    .await?;
    let tables = query(&format!(
        "select c.oid::regclass::text, \
             coalesce((select string_agg(quote_ident(attname), ', ' order by attnum) \
                 from pg_attribute where attrelid = c.oid and attnum > 0 \
                 and not attisdropped and attgenerated = ''), ''), c.relkind = 'r' \
         from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'p') and {USER_SCHEMAS} order by c.oid"
    ))
    .fetch_all(&mut *transaction)
    .await?;
    let tables: Vec<(String, String, bool)> = tables
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect::<sqlx::Result<_>>()?;
    if tables.is_empty() {
        return transaction.rollback().await;
    }
    let mut rows = Vec::new();
    let mut bytes = 0;
    for (name, columns, _) in tables.iter().filter(|(_, _, stored)| *stored) {
        if columns.is_empty() {
            let statement = format!("select exists (select from {name})");
            let has_rows: bool = query(&statement)
                .fetch_one(&mut *transaction)
                .await?
                .try_get(0)?;
            // Rows without columns cannot be copied back; its copies are
            // not recycled either.
            if has_rows {
                return transaction.rollback().await;
            }
            continue;
        }
        let data = copy_out(&mut transaction, name, columns).await?;
        bytes += data.len();
        if bytes > MAX_ROWS_BYTES {
            // Its copies are not recycled (see `Snapshot::take`).
            return transaction.rollback().await;
        }
        if !data.is_empty() {
            rows.push((name, columns, data));
        }
    }
    let names: Vec<&str> = tables.iter().map(|(name, _, _)| name.as_str()).collect();
    catalog::run(&mut transaction, &format!("truncate {}", names.join(", "))).await?;
    for (name, columns, data) in rows {
        copy_in(&mut transaction, name, columns, &data).await?;
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
    transaction.commit().await
}

/// The first column of each row of `statement`, a query pgtest built.
async fn texts(connection: &mut PgConnection, statement: &str) -> sqlx::Result<Vec<String>> {
    let rows = query(statement).fetch_all(connection).await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}
