//! Recycling a passed test's database in `isolation = "database"`: instead
//! of dropping it and copying the template again for the next test (the
//! server writes the whole template, 40 to 60 ms of its time), the test
//! puts back what it changed, and the next test gets the database: what a
//! fresh copy of the template is, to its queries and to the planner, or
//! the database is retired and never handed on.
//!
//! A template is readied for this when it is built ([`settle`]): its
//! tables keep autovacuum out (a setting of each table, copied with it),
//! each is laid out as a reset lays it out (below), and each with no rows
//! is grown: it gets the pages a test's first rows give it, empty (a
//! placeholder row put in and rolled back, then vacuumed away). A [`Snapshot`] of
//! a fresh copy, taken once per template on this machine and kept in the
//! server's directory, records what a reset compares against: a
//! fingerprint of the catalog (everything but data: tables, columns,
//! constraints, indexes, functions, types, extensions, ACLs, comments, the
//! database's settings), each table's rows (a hash of them with their
//! places, and their `COPY` text where it has any), each sequence's state,
//! the large objects (a hash of their owners, privileges, comments and
//! pages), and what the planner reads: each table's, index's and TOAST
//! relation's size in blocks and `pg_class` statistics
//! (`relpages`, `reltuples`, `relallvisible`), and the `pg_statistic` and
//! extended statistics rows. The reset:
//!
//! 1. compares the catalog's fingerprint: a test that changed the schema
//!    (DDL, `ALTER DATABASE … SET`, a grant, a comment) retires its
//!    database, which is dropped later, off the critical path;
//! 2. finds the tables that differ (see [`changes`]) and those whose
//!    `pg_class` statistics differ (a test's `ANALYZE` or `VACUUM`),
//!    deletes their rows with triggers and foreign keys off
//!    (`session_replication_role = replica`, which needs a superuser: on a
//!    server where pgtest's role is not one, databases are not recycled)
//!    and commits, then `VACUUM`s them (in a transaction of their own: a
//!    reset that stops after this retires the database): a grown table
//!    keeps its pages, emptied, as the template's are; any other is
//!    truncated to no pages;
//! 3. in a last transaction, builds the indexes of the tables that are
//!    not grown anew (a btree never gives pages back), copies the
//!    template's rows back where it had any, in the fresh copy's order:
//!    pages, row places, index pages and `pg_class` statistics are then
//!    the fresh copy's, as the template was laid out the same way; then
//!    checks that they are. A grown table that a test wrote more rows
//!    into than its first pages take is grown again (truncated, its
//!    indexes built anew, the placeholder row put in and vacuumed away);
//!    any other difference (a `VACUUM` that could not free the pages)
//!    retires the database. A test that writes a few rows into tables
//!    with none in the template so costs its reset no index build (each
//!    waits for a sync of its file to disk before PostgreSQL 17) and no
//!    truncation (each waits for the write-ahead log to reach the disk);
//! 4. deletes the statistics rows a test's `ANALYZE` wrote where the
//!    template had none, and writes the template's back where it had some
//!    (PostgreSQL 18 on: `pg_restore_attribute_stats`; before, such a
//!    database is retired);
//! 5. sets every sequence that moved back to the template's value and
//!    `is_called`, unlinks large objects when the template has none, and
//!    marks the database spare.
//!
//! A materialized view whose contents or statistics changed is refreshed,
//! and retires the database if it then differs from the template's; large
//! objects that differ retire it when the template has some, and so do extended
//! statistics the template has and a test changed (no version writes them
//! back). Temporary objects (schemas `pg_temp_N`), the free space map's
//! file (a vacuumed table keeps one, empty), TOAST tables' names (a
//! refresh makes new ones) and storage details the planner does not read
//! (`relfilenode`, `relfrozenxid`, hint bits) are not compared.
//!
//! Looking at every table and the catalog costs a new session 10 ms or
//! more (mostly loading what it has not touched yet). Where the server
//! counts the rows each session writes in each table, exactly and in time
//! (PostgreSQL 15 on: a session's counts reach the server before it is
//! gone, and a session can flush its own), the claim reads the counts of
//! the tables and of the catalogs above, and the reset looks only at the
//! tables whose counts moved; a catalog's count that moved (a truncation,
//! a refresh, a temporary table, DDL) sends it back to looking at it all.

mod changes;
mod fingerprint;
mod grow;
mod reset;
mod restore;
mod settle;
mod snapshot;
mod text;

use std::fs;
use std::io::Write as _;
use std::path::Path;

pub(crate) use self::settle::settle;
pub(crate) use self::snapshot::Snapshot;
use crate::lock::open_no_follow;
use crate::registry::markers::Marker;

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
            Ok(text) if text == text::UNRECYCLABLE => Self::Unrecyclable,
            Ok(text) => Snapshot::parse(&text).map_or(Self::Missing, Self::Snapshot),
        }
    }

    /// Writes `snapshot` (or that there is none) to `path`, whole or not at
    /// all.
    pub(crate) fn store(snapshot: Option<&Snapshot>, path: &Path) -> std::io::Result<()> {
        let text = snapshot.map_or_else(|| text::UNRECYCLABLE.to_owned(), Snapshot::to_text);
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

/// What a test's database looked like when the test claimed it.
#[derive(Debug)]
pub(crate) struct Since {
    /// A transaction id from before the test (its low 32 bits): catalog
    /// rows written since are the test's.
    pub(crate) horizon: u32,
    /// The counts of rows written in each counted relation (see
    /// [`Snapshot::written_counts`]), when the snapshot counts.
    pub(crate) counts: Option<Vec<i64>>,
    /// What this machine listed with the database when it was put back
    /// here ([`Snapshot::spare_note`]), when the test claimed it from
    /// this machine's spares.
    pub(crate) noted: Option<String>,
}

/// What a reset did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The database is what a fresh copy is again and is marked spare;
    /// what it put back (tables truncated and filled again, sequences),
    /// for the log, and what this machine lists with the spare
    /// ([`Snapshot::spare_note`]).
    Done {
        tables: usize,
        sequences: usize,
        note: String,
    },
    /// Another session is still connected to it: nothing was done.
    Busy,
    /// It cannot be put back: retire the database.
    Retire(&'static str),
    /// A relation of the snapshot is not in the database under its oid
    /// and name: the template was built anew since the snapshot was taken
    /// (a server made anew at the same address, or its databases
    /// dropped), or the test dropped or renamed it. Retire the database,
    /// and take the snapshot again.
    Stale,
}

/// Where a reset database goes: marked `spare`, unless `limit` databases
/// of any template already are.
pub(crate) struct PutBack<'a> {
    pub(crate) database: &'a str,
    pub(crate) spare: &'a Marker,
    pub(crate) limit: u32,
}
