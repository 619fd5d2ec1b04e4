//! Readying a template as it is built, so that a reset can put its copies
//! back into what a fresh copy is.

use std::collections::HashMap;

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
///   lays out what it puts back: every table emptied, vacuumed to no
///   pages, its indexes built anew, then its rows copied back in the same
///   order (no dead rows, no space left by updates and deletes), and every
///   populated materialized view refreshed. Its `pg_class` statistics are
///   then a vacuumed table's (`reltuples` 0, not -1: the planner does not
///   take an empty table for 10 pages);
/// - each table with no rows is then [grown](grow): it gets the pages a
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
        empty.push_str(&format!("delete from {name}; "));
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
    let mut placeholders = Vec::new();
    for (name, _, _) in tables.iter().filter(|(_, _, data)| data.is_empty()) {
        if let Some(statements) = placeholder(&mut transaction, name).await? {
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

/// Literals a placeholder value is made of, in the order they are tried:
/// the first one a column's type takes (an enum's first label before them).
const CANDIDATES: [&str; 10] = [
    "0",
    "",
    "{}",
    "epoch",
    "00000000-0000-0000-0000-000000000000",
    "null",
    "empty",
    "()",
    "0.0.0.0",
    "(0,0)",
];

/// Gives each of the empty `tables` (names, quoted and schema-qualified,
/// with their [`placeholder`] statements) the pages a test's first rows
/// give it, without a row: the placeholder row goes in, in a transaction
/// that is rolled back, so that the table gets a page and each index that
/// takes the row a root page; `VACUUM` then removes the row and keeps the
/// pages (no truncation), all visible. A reset that deletes a test's few
/// rows and vacuums the same way finds the same pages and the same
/// `pg_class` statistics. A table that takes no placeholder row (its
/// partition's bounds, a domain's check) is left as it was. Which tables
/// grew.
pub(super) async fn grow(
    connection: &mut PgConnection,
    tables: &[(&str, &str)],
) -> sqlx::Result<Vec<bool>> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let mut grown = Vec::new();
    let mut transaction = connection.begin().await?;
    catalog::run(
        &mut transaction,
        &format!("{FORMATS}; set local session_replication_role = replica"),
    )
    .await?;
    for (_, statements) in tables {
        grown.push(attempt(&mut transaction, statements).await?);
    }
    transaction.rollback().await?;
    let names: Vec<&str> = tables
        .iter()
        .zip(&grown)
        .filter_map(|((name, _), grown)| grown.then_some(*name))
        .collect();
    if !names.is_empty() {
        let vacuum = format!(
            "vacuum (index_cleanup on, truncate off) {}",
            names.join(", ")
        );
        catalog::run(connection, &vacuum).await?;
    }
    Ok(grown)
}

/// The statements that put a placeholder row into the empty table `name`,
/// run with triggers and foreign keys off in a transaction that is rolled
/// back (see [`grow`]): its check constraints dropped, then a row with
/// null in every column that may be null and, in the others, the first of
/// [`CANDIDATES`] its type takes. `None` when one takes none.
/// Runs under [`FORMATS`], so that the same catalog gives the same
/// statements each time it is asked.
pub(super) async fn placeholder(
    connection: &mut PgConnection,
    name: &str,
) -> sqlx::Result<Option<String>> {
    let table = format!("{}::regclass", catalog::literal(name));
    let statement = format!(
        "select quote_ident(a.attname), format_type(a.atttypid, a.atttypmod), a.attnotnull, \
             (select quote_literal(e.enumlabel) from pg_enum e where e.enumtypid = a.atttypid \
                 order by e.enumsortorder limit 1) \
         from pg_attribute a where a.attrelid = {table} and a.attnum > 0 \
             and not a.attisdropped and a.attgenerated = '' order by a.attnum"
    );
    let columns = query(&statement).fetch_all(&mut *connection).await?;
    let mut names = Vec::new();
    let mut values = Vec::new();
    let mut taken: HashMap<String, Option<String>> = HashMap::new();
    for column in columns {
        let (column, kind, not_null, label): (String, String, bool, Option<String>) = (
            column.try_get(0)?,
            column.try_get(1)?,
            column.try_get(2)?,
            column.try_get(3)?,
        );
        names.push(column);
        if !not_null {
            // Null where it may be: a partial index for rows not deleted
            // (`where deleted_at is null`) takes the row.
            values.push("null".to_owned());
            continue;
        }
        let literal = match taken.get(&kind) {
            Some(literal) => literal.clone(),
            None => {
                let literal = first_taken(connection, &kind, label).await?;
                taken.insert(kind.clone(), literal.clone());
                literal
            }
        };
        let Some(literal) = literal else {
            return Ok(None);
        };
        values.push(format!("{literal}::{kind}"));
    }
    let checks: Option<String> = query(&format!(
        "select string_agg(format('drop constraint %I', conname), ', ' order by conname) \
         from pg_constraint where conrelid = {table} and contype = 'c' \
             and conislocal and coninhcount = 0"
    ))
    .fetch_one(&mut *connection)
    .await?
    .try_get(0)?;
    let mut statements = checks.map_or_else(String::new, |checks| {
        format!("alter table {name} {checks}; ")
    });
    match names.is_empty() {
        true => statements.push_str(&format!("insert into {name} default values")),
        false => statements.push_str(&format!(
            "insert into {name} ({}) overriding system value values ({})",
            names.join(", "),
            values.join(", ")
        )),
    }
    Ok(Some(statements))
}

/// The first of `label` (an enum's) and [`CANDIDATES`], quoted, that the
/// type `kind` takes.
async fn first_taken(
    connection: &mut PgConnection,
    kind: &str,
    label: Option<String>,
) -> sqlx::Result<Option<String>> {
    let quoted = CANDIDATES
        .iter()
        .map(|candidate| catalog::literal(candidate));
    for literal in label.into_iter().chain(quoted) {
        if attempt(connection, &format!("select {literal}::{kind}")).await? {
            return Ok(Some(literal));
        }
    }
    Ok(None)
}

/// Runs `statements` in a savepoint of the transaction `connection` is in:
/// whether they ran (an error the server gave is rolled back to it).
async fn attempt(connection: &mut PgConnection, statements: &str) -> sqlx::Result<bool> {
    catalog::run(connection, "savepoint attempt").await?;
    match catalog::run(connection, statements).await {
        Ok(()) => catalog::run(connection, "release savepoint attempt")
            .await
            .map(|()| true),
        Err(sqlx::Error::Database(_)) => catalog::run(connection, "rollback to savepoint attempt")
            .await
            .map(|()| false),
        Err(error) => Err(error),
    }
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
                let statement = format!("select exists (select from {name})");
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
