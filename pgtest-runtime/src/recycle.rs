//! Recycling a passed test's database in `isolation = "database"`: instead
//! of dropping it and copying the template again for the next test (the
//! server writes the whole template, 40 to 60 ms of its time), the test
//! puts back what it changed, and the next test gets the database.
//!
//! A [`Snapshot`] of a fresh copy, taken once per template on this machine
//! and kept in the server's directory, records what the reset compares
//! against: a fingerprint of the catalog (everything but data: tables,
//! columns, constraints, indexes, functions, types, extensions, ACLs,
//! comments, the database's settings), for each table and materialized
//! view whether it has rows and a hash of them in physical order, the rows
//! themselves (`COPY` text) where it has any, each sequence's state, and
//! the number of large objects. The reset, in one transaction:
//!
//! 1. compares the catalog's fingerprint: a test that changed the schema
//!    (DDL, `ALTER DATABASE … SET`, a grant, a comment) retires its
//!    database, which is dropped later, off the critical path;
//! 2. finds the tables that differ (an empty one that has rows; one whose
//!    rows, in physical order, hash otherwise: in-place updates and
//!    deletes included), deletes their rows, and copies the template's
//!    rows back where it had any, in the fresh copy's order, with triggers
//!    and foreign keys off (`session_replication_role = replica`, which
//!    needs a superuser: on a server where pgtest's role is not one,
//!    databases are not recycled);
//! 3. sets every sequence that moved back to the template's value and
//!    `is_called`, and unlinks large objects when the template has none.
//!
//! A materialized view whose contents changed is refreshed, and retires
//! the database if it then differs from the template's; large objects
//! retire it when the template has some. Temporary objects (schemas
//! `pg_temp_N`), TOAST tables (a refresh makes new ones), statistics and
//! storage details (`relfilenode`, `relpages`) are not compared: they
//! change without a schema change.
//!
//! Looking at every table and the catalog costs a new session 10 ms or
//! more (mostly loading what it has not touched yet). Where the server
//! counts the rows each session writes in each table, exactly and in time
//! (PostgreSQL 15 on: a session's counts reach the server before it is
//! gone, and a session can flush its own), the claim reads the counts of
//! the tables and of the catalogs above, and the reset looks only at the
//! tables whose counts moved; a catalog's count that moved (a truncation,
//! a refresh, a temporary table, DDL) sends it back to looking at it all.

use std::fmt::Write as _;
use std::fs;
use std::future::poll_fn;
use std::io::Write as _;
use std::path::Path;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Connection, Row};

use crate::catalog;
use crate::compat::{self, query};
use crate::lock::open_no_follow;
use crate::markers::Marker;

/// The most bytes of template rows a snapshot keeps: a template with more
/// is copied for each test, as before.
const MAX_ROWS_BYTES: usize = 16 << 20;

/// The session settings every comparison runs under, so that rows print
/// the same whatever the test's session had set.
const FORMATS: &str = "set local datestyle = 'ISO, YMD'; set local timezone = 'UTC'; \
    set local intervalstyle = 'postgres'; set local extra_float_digits = 3; \
    set local bytea_output = 'hex'; set local lock_timeout = 2000; \
    set local search_path = pg_catalog";

/// The catalog's fingerprint: every object a schema change makes or
/// touches (user objects, from `FirstNormalObjectId` on, and the `public`
/// schema), in every schema but temporary ones and TOAST's (whose tables a
/// refresh or truncation makes anew), without what changes on its own.
const FINGERPRINT: &str = "with hidden as (select oid from pg_namespace where nspname = 'pg_toast' \
        or nspname like 'pg\\_temp\\_%' or nspname like 'pg\\_toast\\_temp\\_%'), \
    rel as (select oid from pg_class where oid >= 16384 \
        and relnamespace not in (select oid from hidden)) \
    select md5(string_agg(part, E'\\n' order by part)) from ( \
    select 'class ' || (c.oid, relname, relnamespace, reltype, reloftype, relowner, relam, \
        reltablespace, relpersistence, relkind, relnatts, relchecks, relrowsecurity, \
        relforcerowsecurity, relispopulated, relreplident, relispartition, relacl, reloptions, \
        relpartbound)::text as part from pg_class c where c.oid in (select oid from rel) \
    union all select 'attribute ' || (attrelid, attname, atttypid, attlen, attnum, atttypmod, \
        attndims, attnotnull, atthasdef, attidentity, attgenerated, attisdropped, attislocal, \
        attinhcount, attcollation, attacl, attoptions, attfdwoptions)::text \
        from pg_attribute where attrelid >= 16384 and attrelid in (select oid from rel) \
    union all select 'namespace ' || n::text from pg_namespace n \
        where (oid >= 16384 or nspname = 'public') and oid not in (select oid from hidden) \
    union all select 'type ' || t::text from pg_type t \
        where oid >= 16384 and typnamespace not in (select oid from hidden) \
    union all select 'proc ' || p::text from pg_proc p where oid >= 16384 \
    union all select 'constraint ' || c::text from pg_constraint c \
        where oid >= 16384 and connamespace not in (select oid from hidden) \
    union all select 'index ' || i::text from pg_index i where indrelid >= 16384 and indrelid in (select oid from rel) \
    union all select 'attrdef ' || (adrelid, adnum, pg_get_expr(adbin, adrelid))::text \
        from pg_attrdef where adrelid >= 16384 and adrelid in (select oid from rel) \
    union all select 'trigger ' || (tgrelid, tgname, tgfoid, tgtype, tgenabled, tgisinternal, \
        tgconstraint, tgdeferrable, tginitdeferred, tgnargs, tgattr, tgargs)::text \
        from pg_trigger where tgrelid >= 16384 and tgrelid in (select oid from rel) \
    union all select 'rewrite ' || (ev_class, rulename, ev_type, ev_enabled, is_instead, \
        ev_qual, ev_action)::text from pg_rewrite where ev_class >= 16384 and ev_class in (select oid from rel) \
    union all select 'policy ' || p::text from pg_policy p where polrelid >= 16384 and polrelid in (select oid from rel) \
    union all select 'sequence ' || s::text from pg_sequence s where seqrelid >= 16384 and seqrelid in (select oid from rel) \
    union all select 'inherits ' || i::text from pg_inherits i where inhrelid >= 16384 and inhrelid in (select oid from rel) \
    union all select 'enum ' || e::text from pg_enum e where oid >= 16384 \
    union all select 'extension ' || e::text from pg_extension e \
    union all select 'cast ' || c::text from pg_cast c where oid >= 16384 \
    union all select 'operator ' || o::text from pg_operator o where oid >= 16384 \
    union all select 'collation ' || c::text from pg_collation c where oid >= 16384 \
    union all select 'default acl ' || d::text from pg_default_acl d \
    union all select 'event trigger ' || e::text from pg_event_trigger e \
    union all select 'statistics ' || (stxrelid, stxname, stxnamespace, stxkeys, stxkind)::text \
        from pg_statistic_ext where stxrelid >= 16384 and stxrelid in (select oid from rel) \
    union all select 'description ' || d::text from pg_description d \
        where (objoid >= 16384 or objoid = 2200) \
        and (classoid <> 'pg_class'::regclass or objoid in (select oid from rel)) \
    union all select 'settings ' || s::text from pg_db_role_setting s, pg_database d \
        where s.setdatabase = d.oid and d.datname = current_database() \
    union all select 'database ' || (datdba, encoding, datallowconn, datconnlimit, datacl)::text \
        from pg_database where datname = current_database() \
    ) parts";

/// The hash of a relation without rows: md5 of the empty string.
const EMPTY_HASH: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// The catalogs the fingerprint reads, each with which of its rows count:
/// user objects' (from `FirstNormalObjectId` on, found by the catalog's
/// index; temporary ones included, a cost only), the `public` schema's
/// (its fixed oid, 2200), and the database's own (last: see [`NOT_COUNTED`]).
const WRITTEN_IN: [(&str, &str); 24] = [
    ("pg_class", "oid >= 16384"),
    ("pg_attribute", "attrelid >= 16384"),
    ("pg_namespace", "(oid >= 16384 or oid = 2200)"),
    ("pg_type", "oid >= 16384"),
    ("pg_proc", "oid >= 16384"),
    ("pg_constraint", "oid >= 16384"),
    ("pg_index", "indexrelid >= 16384"),
    ("pg_attrdef", "oid >= 16384"),
    ("pg_trigger", "oid >= 16384"),
    ("pg_rewrite", "oid >= 16384"),
    ("pg_policy", "oid >= 16384"),
    ("pg_sequence", "seqrelid >= 16384"),
    ("pg_inherits", "inhrelid >= 16384"),
    ("pg_enum", "oid >= 16384"),
    ("pg_extension", "oid >= 16384"),
    ("pg_cast", "oid >= 16384"),
    ("pg_operator", "oid >= 16384"),
    ("pg_collation", "oid >= 16384"),
    ("pg_default_acl", "oid >= 16384"),
    ("pg_event_trigger", "oid >= 16384"),
    ("pg_statistic_ext", "oid >= 16384"),
    ("pg_description", "(objoid >= 16384 or objoid = 2200)"),
    (
        "pg_db_role_setting",
        "setdatabase = (select oid from pg_database where datname = current_database())",
    ),
    ("pg_database", "datname = current_database()"),
];

/// Whether a catalog the fingerprint reads holds a row written after the
/// transaction `horizon` (its low 32 bits): far cheaper than the
/// fingerprint, which runs only when this says yes (a test's truncation or
/// refresh writes `pg_class` without changing the schema).
fn catalog_written(horizon: u32) -> String {
    let checks: Vec<String> = WRITTEN_IN
        .iter()
        .map(|(catalog, rows)| written_in(catalog, rows, horizon))
        .collect();
    checks.join(" or ")
}

/// Whether the rows `rows` of `catalog` hold one written after the
/// transaction `horizon`.
fn written_in(catalog: &str, rows: &str, horizon: u32) -> String {
    format!("exists (select from {catalog} where {rows} and age(xmin) < age('{horizon}'::xid))")
}

/// The catalog of [`WRITTEN_IN`] whose counts cannot tell: the whole
/// server's (it is shared), which every copy of a template writes. Its
/// row is looked at instead.
const NOT_COUNTED: usize = WRITTEN_IN.len() - 1;

/// The catalogs a test may write outside the catalog's fingerprint that
/// still change what the next test sees: large objects.
const COUNTED_TOO: &str = "pg_largeobject_metadata";

/// What a fresh copy of a template holds (see the module's documentation).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    fingerprint: String,
    large_objects: i64,
    /// The catalogs of [`WRITTEN_IN`] (less the one [`NOT_COUNTED`]) and
    /// [`COUNTED_TOO`], by oid, when the server counts each row its
    /// sessions write (PostgreSQL 15 on, with `track_counts`): a reset
    /// then looks only at what the counts say changed.
    catalogs: Option<Vec<i64>>,
    tables: Vec<Table>,
    sequences: Vec<Sequence>,
}

/// A table or materialized view.
#[derive(Debug, PartialEq, Eq)]
struct Table {
    oid: i64,
    /// Its name, schema-qualified and quoted.
    name: String,
    /// A materialized view: its contents cannot be put back.
    view: bool,
    /// Its rows, when it has any.
    rows: Option<Rows>,
}

#[derive(Debug, PartialEq, Eq)]
struct Rows {
    /// The md5 of its rows as text, in physical order.
    hash: String,
    /// The columns `COPY` writes, quoted, comma-separated (no generated one).
    columns: String,
    /// `COPY … TO STDOUT` of those columns, in physical order.
    data: String,
}

#[derive(Debug, PartialEq, Eq)]
struct Sequence {
    oid: i64,
    /// Its name, schema-qualified and quoted.
    name: String,
    last_value: i64,
    is_called: bool,
}

/// What is known of a template's snapshot on this machine.
pub(crate) enum Stored {
    /// Not taken yet.
    Missing,
    /// Its copies cannot be recycled (see [`Snapshot::take`]).
    Unrecyclable,
    Snapshot(Snapshot),
}

impl Stored {
    /// What `path` holds.
    pub(crate) fn load(path: &Path) -> Self {
        match fs::read_to_string(path) {
            Err(_) => Self::Missing,
            Ok(text) if text == UNRECYCLABLE => Self::Unrecyclable,
            Ok(text) => Snapshot::parse(&text).map_or(Self::Missing, Self::Snapshot),
        }
    }

    /// Writes `snapshot` (or that there is none) to `path`, whole or not at
    /// all.
    pub(crate) fn store(snapshot: Option<&Snapshot>, path: &Path) -> std::io::Result<()> {
        let text = snapshot.map_or_else(|| UNRECYCLABLE.to_owned(), Snapshot::to_text);
        let partial = path.with_extension(uuid::Uuid::new_v4().simple().to_string());
        let mut file = open_no_follow(&partial, 0o600)?;
        file.write_all(text.as_bytes())?;
        fs::rename(&partial, path)
    }

    /// The snapshot, when there is one.
    pub(crate) fn snapshot(&self) -> Option<&Snapshot> {
        match self {
            Self::Snapshot(snapshot) => Some(snapshot),
            _ => None,
        }
    }
}

/// What a template whose copies cannot be recycled stores.
const UNRECYCLABLE: &str = "pgtest snapshot 2 none\n";

/// What a test's database looked like when the test claimed it.
#[derive(Debug)]
pub(crate) struct Since {
    /// A transaction id from before the test (its low 32 bits): catalog
    /// rows written since are the test's.
    pub(crate) horizon: u32,
    /// The counts of rows written in each counted relation (see
    /// [`Snapshot::written_counts`]), when the snapshot counts.
    pub(crate) counts: Option<Vec<i64>>,
}

/// What a reset did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The database holds exactly what a fresh copy does again and is
    /// marked spare; what it put back (table and sequence counts), for the
    /// log.
    Done { tables: usize, sequences: usize },
    /// Another session is still connected to it: nothing was done.
    Busy,
    /// It cannot be put back: retire the database.
    Retire(&'static str),
}

/// Where a reset database goes: marked `spare`, unless `limit` databases
/// of any template already are.
pub(crate) struct PutBack<'a> {
    pub(crate) database: &'a str,
    pub(crate) spare: &'a Marker,
    pub(crate) limit: u32,
}

/// What a test may have changed, found by a reset.
struct Changed {
    /// A catalog the fingerprint reads was written.
    catalog: bool,
    /// For each table, whether it differs.
    tables: Vec<bool>,
    /// For each sequence, whether it is to be set back.
    sequences: Vec<bool>,
    large_objects: i64,
}

/// The hash of a relation's rows as text, in physical order.
fn rows_hash(name: &str) -> String {
    format!("(select md5(coalesce(string_agg(x::text, E'\\n' order by ctid), '')) from {name} x)")
}

/// `values` as the text of an SQL array.
fn array_text(values: impl Iterator<Item = i64>) -> String {
    let values: Vec<String> = values.map(|value| value.to_string()).collect();
    format!("'{{{}}}'", values.join(","))
}

impl Snapshot {
    /// Takes the snapshot of the fresh copy `connection` is connected to;
    /// `None` when its databases cannot be recycled: pgtest's role is not
    /// a superuser, or its rows are too many to keep.
    pub(crate) async fn take(connection: &mut PgConnection) -> sqlx::Result<Option<Self>> {
        let mut transaction = connection.begin().await?;
        catalog::run(&mut transaction, FORMATS).await?;
        let superuser: bool =
            sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
                .fetch_one(&mut *transaction)
                .await?;
        if !superuser {
            return Ok(None);
        }
        let fingerprint: String = sqlx::query_scalar(FINGERPRINT)
            .fetch_one(&mut *transaction)
            .await?;
        let large_objects: i64 = sqlx::query_scalar("select count(*) from pg_largeobject_metadata")
            .fetch_one(&mut *transaction)
            .await?;
        let names: Vec<&str> = WRITTEN_IN[..NOT_COUNTED]
            .iter()
            .map(|(catalog, _)| *catalog)
            .chain([COUNTED_TOO])
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
        let relations: Vec<(i64, String, String, String)> = sqlx::query_as(
            "select c.oid::int8, c.oid::regclass::text, c.relkind::text, \
                 coalesce((select string_agg(quote_ident(attname), ', ' order by attnum) \
                     from pg_attribute where attrelid = c.oid and attnum > 0 \
                     and not attisdropped and attgenerated = ''), '') \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind in ('r', 'm', 'S') and n.nspname not in ('pg_catalog', 'information_schema') \
             and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp\\_%' \
             order by c.oid",
        )
        .fetch_all(&mut *transaction)
        .await?;
        let mut tables = Vec::new();
        let mut sequences = Vec::new();
        let mut bytes = 0;
        for (oid, name, kind, columns) in relations {
            if kind == "S" {
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
            let view = kind == "m";
            let statement = format!("select exists (select from {name})");
            let has_rows: bool = query(&statement)
                .fetch_one(&mut *transaction)
                .await?
                .try_get(0)?;
            let rows = match has_rows {
                false => None,
                // Rows without columns cannot be copied back.
                true if columns.is_empty() && !view => return Ok(None),
                true => {
                    let statement = format!("select {}", rows_hash(&name));
                    let hash: String = query(&statement)
                        .fetch_one(&mut *transaction)
                        .await?
                        .try_get(0)?;
                    let data = match view {
                        // A view's rows are compared, never put back.
                        true => String::new(),
                        false => copy_out(&mut transaction, &name, &columns).await?,
                    };
                    bytes += data.len();
                    Some(Rows {
                        hash,
                        columns,
                        data,
                    })
                }
            };
            tables.push(Table {
                oid,
                name,
                view,
                rows,
            });
        }
        transaction.rollback().await?;
        if bytes > MAX_ROWS_BYTES {
            return Ok(None);
        }
        Ok(Some(Self {
            fingerprint,
            large_objects,
            catalogs,
            tables,
            sequences,
        }))
    }

    /// An SQL expression: when the database's counts were last reset (0:
    /// never; a reset of one table's counts is the database's too), then
    /// the number of rows written (inserted, updated, deleted, in
    /// transactions committed or not) in each catalog and table this
    /// snapshot counts, since then; null when the server does not count
    /// now. `None` when the snapshot does not count.
    pub(crate) fn written_counts(&self) -> Option<String> {
        let catalogs = self.catalogs.as_ref()?;
        let oids = catalogs
            .iter()
            .copied()
            .chain(self.tables.iter().map(|table| table.oid));
        Some(format!(
            "case when current_setting('track_counts')::bool then \
                 array[coalesce((extract(epoch from pg_stat_get_db_stat_reset_time( \
                     (select oid from pg_database where datname = current_database()))) \
                     * 1000000)::int8, 0)] \
                 || (select array_agg(pg_stat_get_tuples_inserted(o) \
                     + pg_stat_get_tuples_updated(o) + pg_stat_get_tuples_deleted(o) order by n) \
                     from unnest({}::oid[]) with ordinality as u(o, n)) end",
            array_text(oids)
        ))
    }

    /// The counts a new copy starts with (never reset, nothing written in
    /// it yet).
    pub(crate) fn fresh_counts(&self) -> Option<Vec<i64>> {
        let catalogs = self.catalogs.as_ref()?;
        Some(vec![0; 1 + catalogs.len() + self.tables.len()])
    }

    /// Readies `connection`, one of the test's, for [`Self::reset`]: what
    /// the test set in its session undone, its temporary tables dropped,
    /// and what it wrote counted at the server.
    pub(crate) async fn ready(&self, connection: &mut PgConnection) -> sqlx::Result<()> {
        let mut statement = "reset session authorization; reset all; discard temp".to_owned();
        if self.catalogs.is_some() {
            statement.push_str("; select pg_stat_force_next_flush()");
        }
        catalog::run(connection, &statement).await
    }

    /// Puts back what a test changed in the database `connection` is
    /// connected to and marks it spare as `back` says, in one transaction,
    /// when no other session is connected to it; what the database was
    /// like at the claim (`since`) spares looking at what cannot have
    /// changed. Nothing of it stays unless it is done.
    pub(crate) async fn reset(
        &self,
        connection: &mut PgConnection,
        since: &Since,
        back: &PutBack<'_>,
    ) -> sqlx::Result<Reset> {
        let reset = self.reset_in_transaction(connection, since, back).await;
        if !matches!(reset, Ok(Reset::Done { .. })) {
            let _ = catalog::run(connection, "rollback").await;
        }
        reset
    }

    /// [`Self::reset`] in a transaction it begins, and commits when done.
    /// Two round trips unless a table with template rows, or a view, has
    /// to be filled again: the first begins, looks for other sessions and
    /// reads the counts; the second puts back and commits.
    async fn reset_in_transaction(
        &self,
        connection: &mut PgConnection,
        since: &Since,
        back: &PutBack<'_>,
    ) -> sqlx::Result<Reset> {
        let mut look = format!(
            "begin; {FORMATS}; {}; select {}, {}",
            catalog::NO_FLUSH_WAIT,
            catalog::OTHER_SESSIONS,
            catalog::spares_count()
        );
        // Read after the other sessions are found gone (the statements of
        // one query string run in order): what they wrote is counted.
        let counted = self.counted_statement(since);
        if let Some(statement) = &counted {
            let _ = write!(look, "; {statement}");
        }
        let rows = compat::raw(&look).fetch_all(&mut *connection).await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let (others, spares): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if others > 0 {
            return Ok(Reset::Busy);
        }
        if spares >= i64::from(back.limit) {
            return Ok(Reset::Retire(
                "PGTEST_SPARE_DATABASES spares are kept already",
            ));
        }
        let changed = match rows.get(1).map(|row| self.counted(row, since)) {
            Some(changed) => changed?,
            None => None,
        };
        let changed = match changed {
            Some(changed) => changed,
            None => self.compared(connection, since.horizon).await?,
        };
        if changed.catalog {
            let fingerprint: String = query(FINGERPRINT)
                .fetch_one(&mut *connection)
                .await?
                .try_get(0)?;
            if fingerprint != self.fingerprint {
                return Ok(Reset::Retire("its schema or settings changed"));
            }
        }
        let large_objects = changed.large_objects;
        if large_objects != self.large_objects && self.large_objects > 0 {
            return Ok(Reset::Retire("its large objects changed"));
        }
        let (views, tables): (Vec<&Table>, Vec<&Table>) = self
            .tables
            .iter()
            .zip(&changed.tables)
            .filter_map(|(table, changed)| changed.then_some(table))
            .partition(|table| table.view);
        let mut statements = String::new();
        if !tables.is_empty() {
            // Triggers and foreign keys off: each table that differs is
            // emptied on its own (no cascade), its rows put back after.
            // Deleting a test's few rows costs a tenth of truncating the
            // tables (new files for each table and index).
            statements.push_str("set local session_replication_role = replica; ");
            for table in &tables {
                let _ = write!(statements, "delete from {}; ", table.name);
            }
        }
        for (sequence, changed) in self.sequences.iter().zip(&changed.sequences) {
            if *changed {
                let _ = write!(
                    statements,
                    "select setval({}, {}, {}); ",
                    sequence.oid, sequence.last_value, sequence.is_called
                );
            }
        }
        if large_objects > 0 && self.large_objects == 0 {
            statements.push_str("select lo_unlink(oid) from pg_largeobject_metadata; ");
        }
        if self.catalogs.is_some() {
            // Counted before the next test's claim reads the counts.
            statements.push_str("select pg_stat_force_next_flush(); ");
        }
        statements.push_str(&catalog::mark_statement(back.database, back.spare));
        let refill = views.len() + tables.iter().filter(|table| table.rows.is_some()).count();
        if refill == 0 {
            statements.push_str("; commit");
        }
        catalog::run(connection, &statements).await?;
        if refill > 0 {
            // After the deletes: in the fresh copy's physical order.
            for table in &tables {
                if let Some(rows) = &table.rows {
                    copy_in(connection, &table.name, rows).await?;
                }
            }
            for view in &views {
                let refresh = format!("refresh materialized view {}", view.name);
                catalog::run(connection, &refresh).await?;
                let statement = format!("select {}", rows_hash(&view.name));
                let hash: String = query(&statement)
                    .fetch_one(&mut *connection)
                    .await?
                    .try_get(0)?;
                let expected = view
                    .rows
                    .as_ref()
                    .map_or(EMPTY_HASH, |rows| rows.hash.as_str());
                if hash != expected {
                    return Ok(Reset::Retire(
                        "a materialized view, refreshed, differs from the template's",
                    ));
                }
            }
            catalog::run(connection, "commit").await?;
        }
        Ok(Reset::Done {
            tables: tables.len() + views.len(),
            sequences: changed.sequences.iter().filter(|changed| **changed).count(),
        })
    }

    /// The query that reads the server's counts of rows written, the
    /// sequences that may have moved (every one that was not called in
    /// the template: `setval(…, false)` leaves no trace) and whether the
    /// database's own row changed, for [`Self::counted`]; `None` when this
    /// snapshot or the claim kept no counts.
    fn counted_statement(&self, since: &Since) -> Option<String> {
        since.counts.as_ref()?;
        let counts = self.written_counts()?;
        let sequences: Vec<String> = self
            .sequences
            .iter()
            .map(|sequence| match sequence.is_called {
                true => format!(
                    "pg_sequence_last_value({}) is distinct from {}",
                    sequence.oid, sequence.last_value
                ),
                false => "true".to_owned(),
            })
            .collect();
        let (catalog, rows) = WRITTEN_IN[NOT_COUNTED];
        Some(format!(
            "select {counts}, array[{}]::bool[], {}",
            sequences.join(", "),
            written_in(catalog, rows, since.horizon)
        ))
    }

    /// What changed since the claim by the server's counts of rows written
    /// (`row`, read by [`Self::counted_statement`]): the tables written in,
    /// the sequences that may have moved; `None` when the counts cannot
    /// tell (the server does not count now, or a catalog was written: a
    /// truncation, a refresh, a temporary table, DDL).
    fn counted(&self, row: &PgRow, since: &Since) -> sqlx::Result<Option<Changed>> {
        let (Some(catalogs), Some(before)) = (&self.catalogs, &since.counts) else {
            return Ok(None);
        };
        let after: Option<Vec<i64>> = row.try_get(0)?;
        let written: bool = row.try_get(2)?;
        let Some(after) = after.filter(|after| after.len() == before.len() && !written) else {
            return Ok(None);
        };
        // The reset time, then the catalogs.
        let (catalogs_after, tables_after) = after.split_at(1 + catalogs.len());
        let (catalogs_before, tables_before) = before.split_at(1 + catalogs.len());
        if catalogs_after != catalogs_before {
            return Ok(None);
        }
        Ok(Some(Changed {
            catalog: false,
            tables: tables_after
                .iter()
                .zip(tables_before)
                .map(|(after, before)| after != before)
                .collect(),
            sequences: row.try_get(1)?,
            large_objects: self.large_objects,
        }))
    }

    /// What changed since the transaction `horizon` by looking at it all:
    /// whether a catalog the fingerprint reads holds a newer row, each
    /// table's rows against the template's, each sequence's state, the
    /// count of large objects.
    async fn compared(&self, connection: &mut PgConnection, horizon: u32) -> sqlx::Result<Changed> {
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|table| match &table.rows {
                None => format!("exists (select from {})", table.name),
                Some(rows) => format!(
                    "{} <> {}",
                    rows_hash(&table.name),
                    catalog::literal(&rows.hash)
                ),
            })
            .collect();
        let sequences: Vec<String> = self
            .sequences
            .iter()
            .map(|sequence| {
                format!(
                    "(select (last_value, is_called) is distinct from ({}::int8, {}) from {})",
                    sequence.last_value, sequence.is_called, sequence.name
                )
            })
            .collect();
        let statement = format!(
            "select ({}), array[{}]::bool[], array[{}]::bool[], \
             (select count(*) from pg_largeobject_metadata)",
            catalog_written(horizon),
            tables.join(", "),
            sequences.join(", ")
        );
        let row = query(&statement).fetch_one(connection).await?;
        Ok(Changed {
            catalog: row.try_get(0)?,
            tables: row.try_get(1)?,
            sequences: row.try_get(2)?,
            large_objects: row.try_get(3)?,
        })
    }

    /// The snapshot as text: each record a line of numbers and the lengths
    /// of the texts that follow it.
    fn to_text(&self) -> String {
        let catalogs = self.catalogs.as_ref().map_or_else(
            || "-".to_owned(),
            |oids| {
                let oids: Vec<String> = oids.iter().map(i64::to_string).collect();
                oids.join(",")
            },
        );
        let mut text = format!(
            "pgtest snapshot 2 {} {} {catalogs}\n",
            self.fingerprint, self.large_objects
        );
        for sequence in &self.sequences {
            let name = &sequence.name;
            let _ = writeln!(
                text,
                "sequence {} {} {} {}",
                sequence.oid,
                sequence.last_value,
                sequence.is_called,
                name.len()
            );
            text.push_str(name);
        }
        for table in &self.tables {
            let (hash, columns, data) = match &table.rows {
                None => ("-", "", ""),
                Some(rows) => (
                    rows.hash.as_str(),
                    rows.columns.as_str(),
                    rows.data.as_str(),
                ),
            };
            let _ = writeln!(
                text,
                "table {} {} {hash} {} {} {}",
                table.oid,
                table.view,
                table.name.len(),
                columns.len(),
                data.len()
            );
            text.push_str(&table.name);
            text.push_str(columns);
            text.push_str(data);
        }
        text
    }

    /// Reads what [`Self::to_text`] wrote; `None` when this version cannot.
    fn parse(text: &str) -> Option<Self> {
        let mut rest = text;
        let header = next_line(&mut rest)?;
        let [
            "pgtest",
            "snapshot",
            "2",
            fingerprint,
            large_objects,
            catalogs,
        ] = header[..]
        else {
            return None;
        };
        let catalogs = match catalogs {
            "-" => None,
            oids => Some(
                oids.split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<i64>, _>>()
                    .ok()?,
            ),
        };
        let mut snapshot = Self {
            fingerprint: fingerprint.to_owned(),
            large_objects: large_objects.parse().ok()?,
            catalogs,
            tables: Vec::new(),
            sequences: Vec::new(),
        };
        while !rest.is_empty() {
            match next_line(&mut rest)?[..] {
                ["sequence", oid, last_value, is_called, name] => {
                    snapshot.sequences.push(Sequence {
                        oid: oid.parse().ok()?,
                        name: next_text(&mut rest, name)?,
                        last_value: last_value.parse().ok()?,
                        is_called: is_called.parse().ok()?,
                    });
                }
                ["table", oid, view, hash, name, columns, data] => {
                    let name = next_text(&mut rest, name)?;
                    let columns = next_text(&mut rest, columns)?;
                    let data = next_text(&mut rest, data)?;
                    snapshot.tables.push(Table {
                        oid: oid.parse().ok()?,
                        name,
                        view: view.parse().ok()?,
                        rows: (hash != "-").then(|| Rows {
                            hash: hash.to_owned(),
                            columns,
                            data,
                        }),
                    });
                }
                _ => return None,
            }
        }
        Some(snapshot)
    }
}

/// The words of the next line of `rest`, which moves past it.
fn next_line<'a>(rest: &mut &'a str) -> Option<Vec<&'a str>> {
    let (line, after) = rest.split_once('\n')?;
    *rest = after;
    Some(line.split(' ').collect())
}

/// The next `length` bytes of `rest`, which moves past them.
fn next_text(rest: &mut &str, length: &str) -> Option<String> {
    let length: usize = length.parse().ok()?;
    let text = rest.get(..length)?.to_owned();
    *rest = &rest[length..];
    Some(text)
}

/// `COPY` of `columns` of the table `name`, as text, in physical order.
async fn copy_out(
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

/// Puts `rows` back into the table `name`.
async fn copy_in(connection: &mut PgConnection, name: &str, rows: &Rows) -> sqlx::Result<()> {
    let statement = format!("copy {name} ({}) from stdin", rows.columns);
    let mut copy = connection.copy_in_raw(&statement).await?;
    copy.send(rows.data.as_bytes()).await?;
    copy.finish().await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_back_what_was_written() {
        let snapshot = Snapshot {
            fingerprint: "0123abcd".to_owned(),
            large_objects: 0,
            catalogs: Some(vec![1259, 2613]),
            tables: vec![
                Table {
                    oid: 16390,
                    name: "public.plain".to_owned(),
                    view: false,
                    rows: None,
                },
                Table {
                    oid: 16390,
                    name: "public.\"two\nlines\"".to_owned(),
                    view: false,
                    rows: Some(Rows {
                        hash: "feed".to_owned(),
                        columns: "\"id\", \"a b\"".to_owned(),
                        data: "1\tx\\ny\n2\t\\N\n".to_owned(),
                    }),
                },
                Table {
                    oid: 16390,
                    name: "a view".to_owned(),
                    view: true,
                    rows: Some(Rows {
                        hash: "beef".to_owned(),
                        columns: "\"n\"".to_owned(),
                        data: String::new(),
                    }),
                },
            ],
            sequences: vec![Sequence {
                oid: 16400,
                name: "public.plain_id_seq".to_owned(),
                last_value: 7,
                is_called: true,
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        assert!(matches!(Stored::load(&path), Stored::Missing));
        Stored::store(Some(&snapshot), &path).unwrap();
        assert!(matches!(Stored::load(&path), Stored::Snapshot(read) if read == snapshot));
        Stored::store(None, &path).unwrap();
        assert!(matches!(Stored::load(&path), Stored::Unrecyclable));
        fs::write(&path, "pgtest snapshot 1 x 0\n").unwrap();
        assert!(matches!(Stored::load(&path), Stored::Missing));
    }
}
