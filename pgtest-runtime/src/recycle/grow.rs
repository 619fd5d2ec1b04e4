//! Growing a template's empty tables (see [`grow`]), and growing them
//! again in a recycled database: a placeholder row put in and rolled back,
//! its pages kept.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::fingerprint::FORMATS;
use crate::catalog;
use crate::compat::query;

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
/// pages (no truncation), all visible, the page's line pointers truncated
/// (PostgreSQL 14 on). A reset that deletes a test's few rows and vacuums
/// the same way finds the same page counts, `pg_class` statistics and free
/// space. A table that takes no placeholder row (its partition's bounds,
/// a domain's or an inherited check) is left as it was. Which tables grew.
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
    taken: &mut Taken,
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

/// What each type takes of [`CANDIDATES`] (see [`first_taken`]), found
/// once for all the tables [`placeholder`] is asked for.
pub(super) type Taken = HashMap<String, Option<String>>;

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

/// Runs `statements` in a savepoint of the transaction `connection` is in,
/// then rolls back to it (what they wrote to pages stays, their rows and
/// catalog changes do not: one placeholder cannot change what the next
/// finds): whether they ran without an error from the server.
async fn attempt(connection: &mut PgConnection, statements: &str) -> sqlx::Result<bool> {
    catalog::run(connection, "savepoint attempt").await?;
    let ran = match catalog::run(connection, statements).await {
        Ok(()) => true,
        Err(sqlx::Error::Database(_)) => false,
        Err(error) => return Err(error),
    };
    catalog::run(connection, "rollback to savepoint attempt").await?;
    Ok(ran)
}
