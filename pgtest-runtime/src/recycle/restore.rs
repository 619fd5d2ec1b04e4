//! Writing back what a reset found changed (see the module's
//! documentation): rows, pages and indexes, materialized views, statistics
//! and sequences, then the mark that makes the database a spare.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::changes::{Changed, no_extended_statistics};
use super::fingerprint::{EMPTY_HASH, FORMATS, rows_hash};
use super::grow::grow;
use super::snapshot::{Kind, Part, Role, Snapshot, Table, copy_in};
use super::{PutBack, Reset};
use crate::catalog;
use crate::compat::{self, query};
use crate::registry::statements;
use crate::wait::{Look, Pace, wait_until};

/// The indexes of `table` a reset builds anew: all of the table's (its
/// rows were deleted and vacuumed: `VACUUM` wrote their statistics), and
/// its TOAST table's when it has pages (`toasts`, the TOAST tables with
/// pages before the reset) or the template's has.
fn rebuilt<'a>(table: &'a Table, toasts: &[i64]) -> impl Iterator<Item = &'a Part> {
    let toasted = table
        .parts
        .iter()
        .any(|part| part.role == Role::Toast && (part.blocks > 0 || toasts.contains(&part.oid)));
    table
        .parts
        .iter()
        .filter(move |part| part.role == Role::Index || (part.role == Role::ToastIndex && toasted))
}

/// How long a reset runs `VACUUM` again while a session keeps the rows
/// it deleted alive.
const VACUUM_AGAIN: Duration = Duration::from_secs(1);

/// What a reset puts back, by what it found changed.
pub(super) struct Work<'a> {
    /// Tables a test wrote in or whose statistics moved: emptied and
    /// vacuumed; a grown one keeps its pages (grown again if the test
    /// filled it past them), any other gives them back, its indexes are
    /// built anew and it is filled again where the template has rows.
    tables: Vec<&'a Table>,
    /// Materialized views refreshed.
    views: Vec<&'a Table>,
    /// Tables whose statistics rows are deleted, and written back where
    /// the template has some.
    statistics: Vec<&'a Table>,
    /// Partitioned tables whose `pg_class` statistics are written back
    /// (PostgreSQL 18 on).
    parents: Vec<&'a Table>,
}

impl Snapshot {
    /// Puts back what `work` names and the sequences `changed` says moved
    /// (and the large objects of a template with none), then marks the
    /// database as `back` says, in the transaction the reset began (ended
    /// and others begun where tables are emptied: see [`Self::empty`]).
    /// `toasts`: the TOAST tables with pages before the reset; `note`: the
    /// database's, for the spare's listing here.
    pub(super) async fn restore(
        &self,
        connection: &mut PgConnection,
        changed: &Changed,
        work: &Work<'_>,
        toasts: &[i64],
        back: &PutBack<'_>,
        note: String,
    ) -> sqlx::Result<Reset> {
        // What the last transaction writes before the mark.
        let mut last = String::new();
        self.write_statistics(work, &mut last);
        for (sequence, changed) in self.sequences.iter().zip(&changed.sequences) {
            if *changed {
                let _ = write!(
                    last,
                    "select setval({}, {}, {}); ",
                    sequence.oid, sequence.last_value, sequence.is_called
                );
            }
        }
        if changed.large_objects != self.large_objects {
            last.push_str("select lo_unlink(oid) from pg_largeobject_metadata; ");
        }
        let mut mark = String::new();
        if self.catalogs.is_some() {
            // Counted before the next test's claim reads the counts.
            mark.push_str("select pg_stat_force_next_flush(); ");
        }
        mark.push_str(&statements::mark_statement(back.database, back.spare));
        mark.push_str("; commit");
        if work.tables.is_empty() && work.views.is_empty() {
            catalog::run(connection, &format!("{last}{mark}")).await?;
            return Ok(Reset::Done {
                tables: 0,
                sequences: changed.sequences.iter().filter(|changed| **changed).count(),
                note,
            });
        }
        if !work.tables.is_empty() {
            self.empty(connection, &work.tables).await?;
            last = format!(
                "begin; {FORMATS}; {}; set local session_replication_role = replica; {last}",
                catalog::NO_FLUSH_WAIT
            );
            // A grown table's indexes keep their pages (see `empty`).
            let full = work.tables.iter().filter(|table| table.grown.is_none());
            for part in full.flat_map(|table| rebuilt(table, toasts)) {
                let _ = write!(last, "reindex index {}; ", part.name);
            }
        }
        let refilled = work.tables.iter().any(|table| table.rows.is_some());
        let check = format!("select {}", self.parts_look(&work.tables));
        let checked_now = !work.tables.is_empty() && !refilled && work.views.is_empty();
        if checked_now {
            last.push_str(&check);
        }
        let rows = match last.is_empty() {
            true => Vec::new(),
            false => compat::raw(&last).fetch_all(&mut *connection).await?,
        };
        for table in &work.tables {
            if let Some(rows) = &table.rows {
                // Into the empty pages, in the fresh copy's order: laid
                // out as the template's were when it was built.
                copy_in(connection, &table.name, &rows.columns, &rows.data).await?;
            }
        }
        for view in &work.views {
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
        if !work.tables.is_empty() {
            // Differs after a grown table was filled past its pages, or a
            // `VACUUM` that found the deleted rows still seen by a session.
            let differ: Vec<i64> = match checked_now {
                true => rows.last().ok_or(sqlx::Error::RowNotFound)?.try_get(0)?,
                false => query(&check)
                    .fetch_one(&mut *connection)
                    .await?
                    .try_get(0)?,
            };
            if !differ.is_empty() {
                let again: Vec<&Table> = work
                    .tables
                    .iter()
                    .copied()
                    .filter(|table| table.parts.iter().any(|part| differ.contains(&part.oid)))
                    .collect();
                if again.iter().any(|table| table.grown.is_none()) {
                    return Ok(Reset::Retire(
                        "a table put back has other pages than a fresh copy's (VACUUM could \
                         not give them back: a session held rows a test had deleted)",
                    ));
                }
                if !self.grow_again(connection, &again, &check).await? {
                    return Ok(Reset::Retire(
                        "a table grown again has other pages than a fresh copy's",
                    ));
                }
                mark = format!("begin; {}; {mark}", catalog::NO_FLUSH_WAIT);
            }
        }
        catalog::run(connection, &mark).await?;
        Ok(Reset::Done {
            tables: work.tables.len() + work.views.len(),
            sequences: changed.sequences.iter().filter(|changed| **changed).count(),
            note,
        })
    }

    /// Empties `tables` and gives their pages back, ending the reset's
    /// transaction: their rows deleted (triggers and foreign keys off) and
    /// committed, then `VACUUM`, which needs no transaction around it, and
    /// finds the deleted rows dead to every session (none is left in the
    /// database) and removes them, from the indexes too. A grown table
    /// (see [`Table::grown`]) keeps its pages, as the template's did: a
    /// test that wrote a few rows into it leaves its pages as they were.
    /// Any other is truncated (with its TOAST table) to no pages: a session
    /// that began before the deletes committed (autovacuum analyzing a
    /// catalog, say) keeps them alive until it ends, so `VACUUM` runs
    /// again, for a second at most. Until the reset is done, the database
    /// is still the test's: a reset that stops here retires it.
    async fn empty(&self, connection: &mut PgConnection, tables: &[&Table]) -> sqlx::Result<()> {
        let mut statements = "set local session_replication_role = replica; ".to_owned();
        for table in tables {
            let _ = write!(statements, "delete from only {}; ", table.name);
        }
        statements.push_str("set synchronous_commit = off; commit");
        catalog::run(connection, &statements).await?;
        let (grown, full): (Vec<&Table>, Vec<&Table>) =
            tables.iter().partition(|table| table.grown.is_some());
        if !grown.is_empty() {
            catalog::run(connection, &self.vacuum(&grown, false)).await?;
        }
        if full.is_empty() {
            return Ok(());
        }
        let vacuum = self.vacuum(&full, true);
        let pages: Vec<String> = full
            .iter()
            .flat_map(|table| &table.parts)
            .filter(|part| matches!(part.role, Role::Itself | Role::Toast))
            .map(|part| part.oid.to_string())
            .collect();
        let emptied = format!(
            "select coalesce(bool_and(pg_relation_size(t) = 0), true) \
             from unnest('{{{}}}'::oid[]) t",
            pages.join(",")
        );
        let deadline = Instant::now() + VACUUM_AGAIN;
        let what = "the deleted rows' pages to be emptied";
        let waited = wait_until(deadline, what, Pace::Local, async || {
            catalog::run(connection, &vacuum).await?;
            let done: bool = query(&emptied)
                .fetch_one(&mut *connection)
                .await?
                .try_get(0)?;
            Ok::<_, sqlx::Error>(match done {
                true => Look::Ready(()),
                false => Look::Held("a session older than the deletes".to_owned()),
            })
        });
        // Not emptied in time: the fidelity check that follows retires it.
        waited.await.map(drop)
    }

    /// `VACUUM` of `tables`, their empty pages at the end truncated or not.
    /// Without truncation (grown tables), their TOAST tables are left out
    /// from PostgreSQL 14 on (each is a transaction of `VACUUM`'s own): a
    /// test that wrote into one left it pages that the check finds, and
    /// the table is grown again, TOAST table included.
    fn vacuum(&self, tables: &[&Table], truncate: bool) -> String {
        let names: Vec<&str> = tables.iter().map(|table| table.name.as_str()).collect();
        let mut options = match truncate {
            true => "index_cleanup on, truncate on".to_owned(),
            false if self.major >= 14 => {
                "index_cleanup on, truncate off, process_toast off".to_owned()
            }
            false => "index_cleanup on, truncate off".to_owned(),
        };
        // From 16 on, the database's frozen ids are not looked at (a scan
        // of pg_class).
        if self.major >= 16 {
            options.push_str(", skip_database_stats on");
        }
        format!("vacuum ({options}) {}", names.join(", "))
    }

    /// Grows `tables` again, grown tables whose pages a test left other
    /// than a fresh copy's (it wrote more rows than their first pages
    /// take): the reset's transaction committed (unmarked), they are
    /// truncated to no pages, their indexes built anew and grown as the
    /// template's were (see [`grow`]); then `check` (their pages against a
    /// fresh copy's) says whether they are.
    async fn grow_again(
        &self,
        connection: &mut PgConnection,
        tables: &[&Table],
        check: &str,
    ) -> sqlx::Result<bool> {
        catalog::run(connection, "commit").await?;
        catalog::run(connection, &self.vacuum(tables, true)).await?;
        let mut statements = format!(
            "begin; {FORMATS}; {}; set local session_replication_role = replica; ",
            catalog::NO_FLUSH_WAIT
        );
        for table in tables {
            let _ = write!(statements, "reindex table {}; ", table.name);
        }
        statements.push_str("commit");
        catalog::run(connection, &statements).await?;
        let placeholders: Vec<(&str, &str)> = tables
            .iter()
            .filter_map(|table| Some((table.name.as_str(), table.grown.as_deref()?)))
            .collect();
        let grown = grow(connection, &placeholders).await?;
        if grown.contains(&false) {
            return Ok(false);
        }
        let check = format!("begin; {FORMATS}; {check}; commit");
        let rows = compat::raw(&check).fetch_all(&mut *connection).await?;
        let differ: Vec<i64> = rows.first().ok_or(sqlx::Error::RowNotFound)?.try_get(0)?;
        Ok(differ.is_empty())
    }

    /// What to put back, by what `changed` says and the tables whose
    /// `pg_class` statistics (`class`) or statistics rows (`statistics`)
    /// differ from a fresh copy's; why the database is retired instead.
    pub(super) fn work(
        &self,
        changed: &Changed,
        class: &[i64],
        statistics: &[i64],
    ) -> Result<Work<'_>, &'static str> {
        let mut work = Work {
            tables: Vec::new(),
            views: Vec::new(),
            statistics: Vec::new(),
            parents: Vec::new(),
        };
        for (table, written) in self.tables.iter().zip(&changed.tables) {
            let moved = class.contains(&table.oid);
            if !written && !moved {
                continue;
            }
            match table.kind {
                Kind::Table => work.tables.push(table),
                Kind::View => work.views.push(table),
                Kind::Parent if !moved => {}
                Kind::Parent if self.major < 18 => {
                    return Err("a partitioned table's statistics changed, and PostgreSQL \
                        before 18 cannot write them back");
                }
                Kind::Parent => work.parents.push(table),
            }
        }
        for table in self.tables.iter().filter(|t| statistics.contains(&t.oid)) {
            match &table.statistics {
                Some(kept) if kept.extended => {
                    return Err("its extended statistics changed, which no PostgreSQL \
                        version writes back");
                }
                Some(_) if self.major < 18 => {
                    return Err(
                        "the statistics of a table whose template has some changed, \
                        and PostgreSQL before 18 cannot write them back",
                    );
                }
                _ => work.statistics.push(table),
            }
        }
        Ok(work)
    }

    /// Appends to `statements` what writes back the statistics `work`
    /// names: their rows deleted (the template has none, or they are
    /// written anew), the template's written back, and partitioned
    /// tables' `pg_class` statistics.
    fn write_statistics(&self, work: &Work<'_>, statements: &mut String) {
        if !work.statistics.is_empty() {
            let oids: Vec<String> = work.statistics.iter().map(|t| t.oid.to_string()).collect();
            let oids = format!("'{{{}}}'::oid[]", oids.join(","));
            let _ = write!(
                statements,
                "delete from pg_statistic where starelid = any({oids}) \
                     or starelid in (select indexrelid from pg_index where indrelid = any({oids})); \
                 {}; ",
                no_extended_statistics(&oids, self.major)
            );
            for table in &work.statistics {
                if let Some(kept) = &table.statistics {
                    let _ = write!(statements, "{}; ", kept.restore);
                }
            }
        }
        for part in work.parents.iter().flat_map(|table| &table.parts) {
            let values: Vec<&str> = part.class.split(',').collect();
            let names = ["relpages", "reltuples", "relallvisible", "relallfrozen"];
            let types = ["int", "real", "int", "int"];
            let arguments: Vec<String> = values
                .iter()
                .zip(names.iter().zip(types))
                .map(|(value, (name, kind))| format!("'{name}', {value}::{kind}"))
                .collect();
            let _ = write!(
                statements,
                "select pg_restore_relation_stats('schemaname', n.nspname::text, \
                     'relname', c.relname::text, {}) \
                 from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where c.oid = {}; ",
                arguments.join(", "),
                part.oid
            );
        }
    }
}
