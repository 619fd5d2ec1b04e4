//! Putting a passed test's database back into what a fresh copy of its
//! template is (see the module's documentation): what the test changed,
//! looked at in the reset's first round trip, and whether the database can
//! be put back at all; the writing back is [`super::restore`]'s.

use std::fmt::Write as _;

use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::fingerprint::{FINGERPRINT, FORMATS, NO_LARGE_OBJECTS};
use super::snapshot::Snapshot;
use super::{PutBack, Reset, Since};
use crate::catalog;
use crate::compat::{self, query};
use crate::registry::statements;

impl Snapshot {
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
    /// connected to and marks it spare as `back` says, when no other
    /// session is connected to it; what the database was like at the claim
    /// (`since`) spares looking at what cannot have changed. The mark is
    /// the last transaction's: a database not done stays the test's, and
    /// is retired.
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

    /// [`Self::reset`], from a transaction it begins. Three round trips
    /// when no table is put back and the server's counts tell: one begins,
    /// looks for other sessions and prepared transactions, reads the
    /// counts and compares what the planner reads (and, for a database
    /// not listed here as found with this snapshot's relations, looks for
    /// them); one writes statistics and sequences back; one marks and
    /// commits. One more where a listed database's note is not the same or
    /// the counts do not tell (its relations looked for), two more where
    /// the counts do not tell (the tables compared, the fingerprint), one
    /// more where the counts say statistics rows were written (they are
    /// compared). When tables are put back, their rows are deleted in the
    /// first transaction, which commits, then a `VACUUM` of its own (two:
    /// grown tables and others), then a last transaction builds the
    /// indexes of tables that are not grown, fills them again (a round
    /// trip per table with rows), checks their pages and marks; grown
    /// tables a test filled past their pages are grown again before the
    /// mark (see [`Self::grow_again`]).
    async fn reset_in_transaction(
        &self,
        connection: &mut PgConnection,
        since: &Since,
        back: &PutBack<'_>,
    ) -> sqlx::Result<Reset> {
        // Read after the other sessions are found gone (the statements of
        // one query string run in order): what they wrote is counted.
        // Where the server counts, statistics rows are compared only when
        // their catalogs' counts moved, in a round trip of their own: the
        // comparison's plan alone costs a new session milliseconds.
        let counted = self.counted_statement(since);
        let statistics = match counted {
            Some(_) => "'{}'::int8[]".to_owned(),
            None => self.statistics_compared(),
        };
        // A spare of this machine's whose relations a reset found as the
        // snapshot has them is looked at again only if the database or
        // the snapshot is not the same, or the server's counts do not
        // show the catalogs unwritten (below).
        let casts_skipped = since.noted.is_some() && counted.is_some();
        let stale_look = match casts_skipped {
            true => "false".to_owned(),
            false => self.stale_look(),
        };
        let mut look = format!(
            "begin; {FORMATS}; {}; select {}, {}, {}, {statistics}, {}, {stale_look}, \
             (select oid from pg_database where datname = current_database())::int8, \
             array(select gid from pg_prepared_xacts where database = current_database())",
            catalog::NO_FLUSH_WAIT,
            catalog::OTHER_SESSIONS,
            statements::spares_count(),
            self.class_look(),
            self.toast_look(),
        );
        if let Some(statement) = &counted {
            let _ = write!(look, "; {statement}");
        }
        let rows = compat::raw(&look).fetch_all(&mut *connection).await?;
        let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
        let (others, spares): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if others > 0 {
            return Ok(Reset::Busy);
        }
        // Its rows and locks would stay, and the database could not be
        // dropped.
        let prepared: Vec<String> = row.try_get(7)?;
        if !prepared.is_empty() {
            catalog::run(connection, "rollback").await?;
            for gid in &prepared {
                let rollback = format!("rollback prepared {}", catalog::literal(gid));
                catalog::run(connection, &rollback).await?;
            }
            return Ok(Reset::Retire(
                "the test left a prepared transaction (PREPARE TRANSACTION) in it: rolled back",
            ));
        }
        if spares >= i64::from(back.limit) {
            return Ok(Reset::Retire(
                "PGTEST_SPARE_DATABASES spares are kept already",
            ));
        }
        let (class, mut statistics): (Vec<i64>, Vec<i64>) = (row.try_get(2)?, row.try_get(3)?);
        let toasts: Vec<i64> = row.try_get(4)?;
        let stale: bool = row.try_get(5)?;
        let note = self.spare_note(row.try_get(6)?);
        let statistics_written = match (&counted, rows.get(1)) {
            (Some(_), Some(counts)) => self.statistics_written(counts, since)?,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if statistics_written {
            let compare = format!("select {}", self.statistics_compared());
            statistics = query(&compare)
                .fetch_one(&mut *connection)
                .await?
                .try_get(0)?;
        }
        let by_counts = match rows.get(1).map(|row| self.counted(row, since)) {
            Some(changed) => changed?,
            None => None,
        };
        // Where the counts do not tell, a catalog may have been written:
        // the fingerprint decides (below).
        let counts_tell = by_counts.is_some();
        // Skipped where the note is the same and the counts show no
        // catalog row inserted, updated or deleted (nothing else sees a
        // row deleted): the relations are as the note found them.
        let stale = match &since.noted {
            Some(noted) if casts_skipped && (*noted != note || !counts_tell) => {
                let look = format!("select {}", self.stale_look());
                query(&look).fetch_one(&mut *connection).await?.try_get(0)?
            }
            _ => stale,
        };
        // The snapshot is another template's, or the test renamed or
        // dropped a relation: taken again either way.
        if stale {
            return Ok(Reset::Stale);
        }
        let changed = match by_counts {
            Some(changed) => changed,
            None => self.compared(connection).await?,
        };
        if !counts_tell {
            let fingerprint: String = query(FINGERPRINT)
                .fetch_one(&mut *connection)
                .await?
                .try_get(0)?;
            if fingerprint != self.fingerprint {
                return Ok(Reset::Retire("its schema or settings changed"));
            }
        }
        // Where a fresh copy has none, those the test made are unlinked.
        if changed.large_objects != self.large_objects && self.large_objects != NO_LARGE_OBJECTS {
            return Ok(Reset::Retire("its large objects changed"));
        }
        let work = match self.work(&changed, &class, &statistics) {
            Ok(work) => work,
            Err(why) => return Ok(Reset::Retire(why)),
        };
        self.restore(connection, &changed, &work, &toasts, back, note)
            .await
    }
}
