//! What a fresh copy of a template holds, taken once from one (see the
//! module's documentation): the reset's reference.

use std::collections::HashMap;
use std::future::poll_fn;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Connection, Row};

use super::fingerprint::{
    COUNTED, COUNTED_TOO, FINGERPRINT, FORMATS, LARGE_OBJECTS, STATISTICS_CATALOGS,
    STATISTICS_FOUND, class_of, rows_hash,
};
use super::grow::{Taken, placeholder};
use crate::catalog;
use crate::compat::query;

/// The most bytes of template rows a snapshot keeps: a template with more
/// is copied for each test, as before.
pub(super) const MAX_ROWS_BYTES: usize = 16 << 20;

/// The relations of the schemas a test's objects live in (`n` is the
/// relation's `pg_namespace` row): not the system's, TOAST's or temporary
/// ones.
pub(super) const USER_SCHEMAS: &str = "n.nspname not in ('pg_catalog', 'information_schema') \
    and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp\\_%'";

/// Whether the template was readied by [`super::settle`]: every table
/// keeps autovacuum out (a template built before, or by another version,
/// is not recycled).
const SETTLED: &str = "not exists (select from pg_class c join pg_namespace n \
    on n.oid = c.relnamespace where c.relkind in ('r', 'm') and {USER_SCHEMAS} \
    and not coalesce('autovacuum_enabled=false' = any(c.reloptions), false))";

/// What a fresh copy of a template holds (see the module's documentation).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Names this snapshot among those this machine takes: a spare whose
    /// relations a reset found under the snapshot's oids and names is
    /// listed with it (see [`Self::spare_note`]).
    pub(super) id: String,
    pub(super) fingerprint: String,
    /// What [`LARGE_OBJECTS`] reads of a fresh copy.
    pub(super) large_objects: String,
    /// The catalogs of [`COUNTED`], [`COUNTED_TOO`] and
    /// [`STATISTICS_CATALOGS`] (last), by oid, when the server counts each
    /// row its sessions write (PostgreSQL 15 on, with `track_counts`): a
    /// reset then looks only at what the counts say changed.
    pub(super) catalogs: Option<Vec<i64>>,
    /// The server's major version: from 18 on, statistics are written
    /// back.
    pub(super) major: u32,
    pub(super) tables: Vec<Table>,
    pub(super) sequences: Vec<Sequence>,
}

/// A table, materialized view or partitioned table.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Table {
    pub(super) oid: i64,
    /// Its name, schema-qualified and quoted.
    pub(super) name: String,
    pub(super) kind: Kind,
    /// Its rows, when it has any.
    pub(super) rows: Option<Rows>,
    /// Its relations the planner reads: itself, its indexes, and a
    /// table's TOAST table and that one's index (a refresh gives a view new
    /// ones).
    pub(super) parts: Vec<Part>,
    /// Its statistics rows, its indexes' and its extended statistics'.
    pub(super) statistics: Option<Statistics>,
    /// For a table with no rows that has pages (the template's were
    /// [grown](super::grow::grow)): the statements that put the
    /// placeholder row in, for a reset that must grow it again.
    pub(super) grown: Option<String>,
}

/// What a table of the snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Table,
    /// A materialized view: its contents are refreshed, never put back.
    View,
    /// A partitioned table: no rows or pages of its own (its partitions
    /// are tables), statistics only.
    Parent,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Rows {
    /// The md5 of its rows as text with their places, in physical order.
    pub(super) hash: String,
    /// The columns `COPY` writes, quoted, comma-separated (no generated one).
    pub(super) columns: String,
    /// `COPY … TO STDOUT` of those columns, in physical order.
    pub(super) data: String,
}

/// A relation the planner reads, as a fresh copy has it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Part {
    pub(super) oid: i64,
    /// Its name, schema-qualified and quoted.
    pub(super) name: String,
    pub(super) role: Role,
    /// Its size in blocks (the main fork).
    pub(super) blocks: i64,
    /// Its `pg_class` statistics, as [`class_of`] prints them.
    pub(super) class: String,
}

/// What a part is to its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The table (or view) itself.
    Itself,
    Index,
    Toast,
    ToastIndex,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Statistics {
    /// The md5 of the rows as text (see [`STATISTICS_FOUND`]).
    pub(super) hash: String,
    /// Whether extended statistics data is among them: no version writes
    /// it back.
    pub(super) extended: bool,
    /// The statements that write the column statistics back, from
    /// PostgreSQL 18 on (empty before).
    pub(super) restore: String,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Sequence {
    pub(super) oid: i64,
    /// Its name, schema-qualified and quoted.
    pub(super) name: String,
    pub(super) last_value: i64,
    pub(super) is_called: bool,
}

impl Snapshot {
    /// Takes the snapshot of the fresh copy `connection` is connected to;
    /// `None` when its databases cannot be recycled: pgtest's role is not
    /// a superuser, the template was not readied for it, or its rows are
    /// too many to keep.
    pub(crate) async fn take(connection: &mut PgConnection) -> sqlx::Result<Option<Self>> {
        let mut transaction = connection.begin().await?;
        catalog::run(&mut transaction, FORMATS).await?;
        let statement = format!(
            "select (select rolsuper from pg_roles where rolname = current_user), {}, \
             current_setting('server_version_num')::int / 10000",
            SETTLED.replace("{USER_SCHEMAS}", USER_SCHEMAS)
        );
        let row = query(&statement).fetch_one(&mut *transaction).await?;
        let (superuser, settled, major): (bool, bool, i32) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if !superuser || !settled {
            return Ok(None);
        }
        let major = u32::try_from(major).unwrap_or_default();
        let fingerprint: String = sqlx::query_scalar(FINGERPRINT)
            .fetch_one(&mut *transaction)
            .await?;
        let large_objects: String = sqlx::query_scalar(LARGE_OBJECTS)
            .fetch_one(&mut *transaction)
            .await?;
        let names: Vec<&str> = COUNTED
            .into_iter()
            .chain(COUNTED_TOO)
            .chain(STATISTICS_CATALOGS)
            .collect();
        let catalogs: Option<Vec<i64>> = sqlx::query_scalar(
            "select case when current_setting('server_version_num')::int >= 150000 \
                 and current_setting('track_counts')::bool \
             then (select array_agg(c::oid::int8 order by n) \
                 from unnest($1::text[]::regclass[]) with ordinality as u(c, n)) end",
        )
        .bind(names)
        .fetch_one(&mut *transaction)
        .await?;
        let relations = rows_of(
            &mut transaction,
            &format!(
                "select c.oid::int8, c.oid::regclass::text, c.relkind::text, \
                 coalesce((select string_agg(quote_ident(attname), ', ' order by attnum) \
                     from pg_attribute where attrelid = c.oid and attnum > 0 \
                     and not attisdropped and attgenerated = ''), '') \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind in ('r', 'm', 'p', 'S') and {USER_SCHEMAS} order by c.oid"
            ),
        )
        .await?;
        let mut tables = Vec::new();
        let mut sequences = Vec::new();
        let mut bytes = 0;
        for row in relations {
            let (oid, name, kind, columns): (i64, String, String, String) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            let kind = match kind.as_str() {
                "S" => {
                    let statement = format!("select last_value, is_called from {name}");
                    let row = query(&statement).fetch_one(&mut *transaction).await?;
                    let (last_value, is_called) = (row.try_get(0)?, row.try_get(1)?);
                    sequences.push(Sequence {
                        oid,
                        name,
                        last_value,
                        is_called,
                    });
                    continue;
                }
                "m" => Kind::View,
                "p" => Kind::Parent,
                _ => Kind::Table,
            };
            let rows = match kind {
                Kind::Parent => None,
                _ => {
                    let rows = take_rows(&mut transaction, &name, kind, columns).await?;
                    match rows {
                        Ok(rows) => rows,
                        // Rows without columns cannot be copied back.
                        Err(()) => return Ok(None),
                    }
                }
            };
            bytes += rows.as_ref().map_or(0, |rows| rows.data.len());
            tables.push(Table {
                oid,
                name,
                kind,
                rows,
                parts: Vec::new(),
                statistics: None,
                grown: None,
            });
        }
        if bytes > MAX_ROWS_BYTES {
            transaction.rollback().await?;
            return Ok(None);
        }
        take_parts(&mut transaction, &mut tables, major).await?;
        let mut taken = Taken::new();
        for table in &mut tables {
            if table.is_grown_shape() {
                table.grown = placeholder(&mut transaction, &table.name, &mut taken).await?;
            }
        }
        take_statistics(&mut transaction, &mut tables, major).await?;
        transaction.rollback().await?;
        Ok(Some(Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            fingerprint,
            large_objects,
            catalogs,
            major,
            tables,
            sequences,
        }))
    }

    /// What this machine lists with a spare whose relations a reset
    /// found under this snapshot's oids and names: the snapshot's id and
    /// the spare's database oid `database` (so that a database made anew
    /// under the same name is not taken for it). The next reset of the
    /// spare, finding the same and the server's counts of the schema's
    /// catalogs unmoved, need not look again (see [`super::Reset::Stale`]).
    pub(crate) fn spare_note(&self, database: i64) -> String {
        format!("{} {database}", self.id)
    }

    /// The counts a new copy starts with (never reset, nothing written in
    /// it yet).
    pub(crate) fn fresh_counts(&self) -> Option<Vec<i64>> {
        let catalogs = self.catalogs.as_ref()?;
        Some(vec![
            0;
            1 + catalogs.len()
                + self.tables.len()
                + self.sequences.len()
        ])
    }
}

/// The rows of the table or view `name`, if any, with its `columns`;
/// `Err` when it has rows but no columns to copy them back with.
async fn take_rows(
    connection: &mut PgConnection,
    name: &str,
    kind: Kind,
    columns: String,
) -> sqlx::Result<Result<Option<Rows>, ()>> {
    let statement = format!("select exists (select from only {name})");
    let has_rows: bool = query(&statement)
        .fetch_one(&mut *connection)
        .await?
        .try_get(0)?;
    if !has_rows {
        return Ok(Ok(None));
    }
    if columns.is_empty() && kind == Kind::Table {
        return Ok(Err(()));
    }
    let statement = format!("select {}", rows_hash(name));
    let hash: String = query(&statement)
        .fetch_one(&mut *connection)
        .await?
        .try_get(0)?;
    let data = match kind {
        // A view's rows are compared, never put back.
        Kind::View => String::new(),
        _ => copy_out(connection, name, &columns).await?,
    };
    Ok(Ok(Some(Rows {
        hash,
        columns,
        data,
    })))
}

/// Fills each table's parts (see [`Table::parts`]).
async fn take_parts(
    connection: &mut PgConnection,
    tables: &mut [Table],
    major: u32,
) -> sqlx::Result<()> {
    let parts = rows_of(
        &mut *connection,
        &format!(
            "select t.oid::int8, c.oid::int8, c.oid::regclass::text, r.role, \
                 pg_relation_size(c.oid) / 8192, {} \
         from pg_class t join pg_namespace n on n.oid = t.relnamespace \
         join lateral (select t.oid, 's' union all select indexrelid, 'i' from pg_index \
                 where indrelid = t.oid \
             union all select t.reltoastrelid, 't' where t.reltoastrelid <> 0 and t.relkind = 'r' \
             union all select indexrelid, 'x' from pg_index where t.reltoastrelid <> 0 \
                 and t.relkind = 'r' and indrelid = t.reltoastrelid) r(oid, role) on true \
         join pg_class c on c.oid = r.oid \
         where t.relkind in ('r', 'm', 'p') and {USER_SCHEMAS} order by 1, 2",
            class_of("c", major)
        ),
    )
    .await?;
    for row in parts {
        let (table, oid, name): (i64, i64, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let (role, blocks, class): (String, i64, String) =
            (row.try_get(3)?, row.try_get(4)?, row.try_get(5)?);
        let Some(role) = Role::parse(&role) else {
            continue;
        };
        if let Some(table) = tables.iter_mut().find(|found| found.oid == table) {
            table.parts.push(Part {
                oid,
                name,
                role,
                blocks,
                class,
            });
        }
    }
    Ok(())
}

/// Fills each table's statistics (see [`Table::statistics`]): their hash,
/// and from PostgreSQL 18 on, the statements that write the column
/// statistics back (`pg_restore_attribute_stats`, with the values the
/// `pg_stats` view shows, an index's columns by number).
async fn take_statistics(
    connection: &mut PgConnection,
    tables: &mut [Table],
    major: u32,
) -> sqlx::Result<()> {
    let found: Vec<(i64, String, bool)> = sqlx::query_as(STATISTICS_FOUND)
        .fetch_all(&mut *connection)
        .await?;
    let mut restores: HashMap<i64, String> = HashMap::new();
    if major >= 18 {
        restores = sqlx::query_as::<_, (i64, String)>(RESTORE_STATEMENTS)
            .fetch_all(&mut *connection)
            .await?
            .into_iter()
            .collect();
    }
    for (table, hash, extended) in found {
        if let Some(table) = tables.iter_mut().find(|found| found.oid == table) {
            table.statistics = Some(Statistics {
                hash,
                extended,
                restore: restores.remove(&table.oid).unwrap_or_default(),
            });
        }
    }
    Ok(())
}

impl Table {
    /// Whether it is a table with no rows that has pages: one the template
    /// grew (see [`Table::grown`]).
    fn is_grown_shape(&self) -> bool {
        self.kind == Kind::Table
            && self.rows.is_none()
            && self
                .parts
                .iter()
                .any(|part| part.role == Role::Itself && part.blocks > 0)
    }
}

impl Role {
    /// The letter a role is kept as.
    pub(super) fn letter(self) -> &'static str {
        match self {
            Self::Itself => "s",
            Self::Index => "i",
            Self::Toast => "t",
            Self::ToastIndex => "x",
        }
    }

    /// The role of `letter`.
    pub(super) fn parse(letter: &str) -> Option<Self> {
        [Self::Itself, Self::Index, Self::Toast, Self::ToastIndex]
            .into_iter()
            .find(|role| role.letter() == letter)
    }
}

/// For each table with column statistics (its own, or its indexes'), the
/// statements that write them back as they are (PostgreSQL 18 on).
const RESTORE_STATEMENTS: &str = "select coalesce(i.indrelid, c.oid)::int8, \
        string_agg(format('select pg_restore_attribute_stats(%s)', concat_ws(', ', \
            '''schemaname'', ' || quote_literal(s.schemaname), \
            '''relname'', ' || quote_literal(s.tablename), \
            case when c.relkind = 'i' then '''attnum'', ' || a.attnum || '::int2' \
                else '''attname'', ' || quote_literal(s.attname) end, \
            '''inherited'', ' || s.inherited, \
            '''null_frac'', ' || s.null_frac || '::real', \
            '''avg_width'', ' || s.avg_width || '::int', \
            '''n_distinct'', ' || s.n_distinct || '::real', \
            '''most_common_vals'', ' || quote_literal(s.most_common_vals::text) || '::text', \
            '''most_common_freqs'', ' || quote_literal(s.most_common_freqs::text) || '::real[]', \
            '''histogram_bounds'', ' || quote_literal(s.histogram_bounds::text) || '::text', \
            '''correlation'', ' || s.correlation || '::real', \
            '''most_common_elems'', ' || quote_literal(s.most_common_elems::text) || '::text', \
            '''most_common_elem_freqs'', ' || quote_literal(s.most_common_elem_freqs::text) \
                || '::real[]', \
            '''elem_count_histogram'', ' || quote_literal(s.elem_count_histogram::text) \
                || '::real[]', \
            '''range_length_histogram'', ' || quote_literal(s.range_length_histogram::text) \
                || '::text', \
            '''range_empty_frac'', ' || s.range_empty_frac || '::real', \
            '''range_bounds_histogram'', ' || quote_literal(s.range_bounds_histogram::text) \
                || '::text')), '; ' order by c.oid, a.attnum, s.inherited) \
    from pg_stats s join pg_namespace n on n.nspname = s.schemaname \
    join pg_class c on c.relnamespace = n.oid and c.relname = s.tablename \
    join pg_attribute a on a.attrelid = c.oid and a.attname = s.attname \
    left join pg_index i on i.indexrelid = c.oid \
    where c.oid >= 16384 group by 1";

/// The rows of `statement`, a query pgtest built.
async fn rows_of(connection: &mut PgConnection, statement: &str) -> sqlx::Result<Vec<PgRow>> {
    query(statement).fetch_all(connection).await
}

/// `COPY` of `columns` of the table `name`, as text, in physical order.
pub(super) async fn copy_out(
    connection: &mut PgConnection,
    name: &str,
    columns: &str,
) -> sqlx::Result<String> {
    let statement = format!("copy {name} ({columns}) to stdout");
    let mut stream = connection.copy_out_raw(&statement).await?;
    let mut data = Vec::new();
    while let Some(chunk) = poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        data.extend_from_slice(&chunk?);
    }
    String::from_utf8(data).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// Puts `rows` (`COPY` text of `columns`) into the table `name`.
pub(super) async fn copy_in(
    connection: &mut PgConnection,
    name: &str,
    columns: &str,
    rows: &str,
) -> sqlx::Result<()> {
    let statement = format!("copy {name} ({columns}) from stdin");
    let mut copy = connection.copy_in_raw(&statement).await?;
    copy.send(rows.as_bytes()).await?;
    copy.finish().await.map(drop)
}
