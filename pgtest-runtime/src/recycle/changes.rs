//! What a test changed in its database since its claim, by the server's
//! counts of rows written where it keeps them in time (PostgreSQL 15 on),
//! else by looking at it all; and what the planner would see otherwise
//! than in a fresh copy (`pg_class` and `pg_statistic`), looked at every
//! time: an `ANALYZE` or a `VACUUM` writes neither rows nor the catalogs'
//! counted rows.

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::Since;
use super::fingerprint::{
    ANY_LARGE_OBJECTS, DATABASE_ROW, LARGE_OBJECTS, NO_LARGE_OBJECTS, STATISTICS_CATALOGS,
    STATISTICS_FOUND, class_of, rows_hash, written_in,
};
use super::snapshot::{Kind, Part, Role, Snapshot, Table};
use crate::catalog;
use crate::compat::query;

/// What a test may have changed, found by a reset.
pub(super) struct Changed {
    /// For each table, whether its rows or their pages differ.
    pub(super) tables: Vec<bool>,
    /// For each sequence, whether it is to be set back.
    pub(super) sequences: Vec<bool>,
    /// What [`LARGE_OBJECTS`] reads (where a fresh copy has none, whether
    /// there are some).
    pub(super) large_objects: String,
}

/// What empties the extended statistics data of the tables `oids` (an SQL
/// array) on a server of version `major`: before 15, the rows stay (an
/// `ANALYZE` updates them), their data set back to null.
pub(super) fn no_extended_statistics(oids: &str, major: u32) -> String {
    let objects = format!("(select oid from pg_statistic_ext where stxrelid = any({oids}))");
    match major {
        ..=13 => format!(
            "update pg_statistic_ext_data set stxdndistinct = null, stxddependencies = null, \
             stxdmcv = null where stxoid in {objects}"
        ),
        14 => format!(
            "update pg_statistic_ext_data set stxdndistinct = null, stxddependencies = null, \
             stxdmcv = null, stxdexpr = null where stxoid in {objects}"
        ),
        _ => format!("delete from pg_statistic_ext_data where stxoid in {objects}"),
    }
}

/// `values` as the text of an SQL array. Written out by hand, as are the
/// other lists a test's claim and reset send: in a test binary pgtest is
/// built without optimisation, where formatting each number costs more
/// than the server's work on it.
fn array_text(values: impl Iterator<Item = i64>) -> String {
    let mut text = String::with_capacity(1024);
    text.push_str("'{");
    for (index, value) in values.enumerate() {
        if index > 0 {
            text.push(',');
        }
        push_number(&mut text, value);
    }
    text.push_str("}'");
    text
}

/// Appends `value` in decimal to `text`.
fn push_number(text: &mut String, value: i64) {
    if value < 0 {
        text.push('-');
    }
    let mut digits = [0u8; 20];
    let mut rest = value.unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    text.push_str(std::str::from_utf8(&digits[start..]).unwrap_or_default());
}

/// The `pg_class` statistics of `parts` as the literal of a text array
/// (each is numbers and commas, quoted as an element).
fn classes<'a>(parts: impl Iterator<Item = &'a Part>) -> String {
    let mut text = String::with_capacity(1024);
    text.push('{');
    for (index, part) in parts.enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push('"');
        text.push_str(&part.class);
        text.push('"');
    }
    text.push('}');
    catalog::literal(&text)
}

impl Snapshot {
    /// An SQL expression: the oids of the tables whose relations' `pg_class`
    /// statistics differ from a fresh copy's.
    pub(super) fn class_look(&self) -> String {
        let parts: Vec<(&Part, i64)> = self
            .tables
            .iter()
            .flat_map(|table| table.parts.iter().map(|part| (part, table.oid)))
            .collect();
        if parts.is_empty() {
            return "'{}'::int8[]".to_owned();
        }
        format!(
            "(select coalesce(array_agg(distinct e.t), '{{}}') \
             from unnest({}::oid[], {}::int8[], {}::text[]) e(oid, t, class) \
             join pg_class c on c.oid = e.oid where {} <> e.class)",
            array_text(parts.iter().map(|(part, _)| part.oid)),
            array_text(parts.iter().map(|(_, table)| *table)),
            classes(parts.iter().map(|(part, _)| *part)),
            class_of("c", self.major)
        )
    }

    /// An SQL expression: whether a relation of this snapshot (a table, its
    /// indexes and TOAST table, a sequence) is not in the database under
    /// its oid and name (see [`super::Reset::Stale`]). Every one: a
    /// template built anew while other work took oids can have the same
    /// first and last oids and others between them.
    pub(super) fn stale_look(&self) -> String {
        let relations = self
            .tables
            .iter()
            .flat_map(|table| &table.parts)
            .map(|part| (part.oid, &part.name))
            .chain(
                self.sequences
                    .iter()
                    .map(|sequence| (sequence.oid, &sequence.name)),
            );
        let (mut found, mut expected) = (String::new(), String::new());
        for (index, (oid, name)) in relations.enumerate() {
            if index > 0 {
                found.push_str(", ");
                expected.push_str(", ");
            }
            push_number(&mut found, oid);
            found.push_str("::oid::regclass::text");
            expected.push_str(&catalog::literal(name));
        }
        format!("array[{found}]::text[] is distinct from array[{expected}]::text[]")
    }

    /// An SQL expression: the oids of the TOAST tables that have pages.
    pub(super) fn toast_look(&self) -> String {
        let toasts: Vec<String> = self
            .tables
            .iter()
            .flat_map(|table| &table.parts)
            .filter(|part| part.role == Role::Toast)
            .map(|part| part.oid.to_string())
            .collect();
        format!(
            "(select coalesce(array_agg(t::int8), '{{}}') from unnest('{{{}}}'::oid[]) t \
             where pg_relation_size(t) > 0)",
            toasts.join(",")
        )
    }

    /// An SQL expression: the oids of the relations of `tables` whose size
    /// in blocks or `pg_class` statistics differ from a fresh copy's.
    pub(super) fn parts_look(&self, tables: &[&Table]) -> String {
        let parts: Vec<&Part> = tables.iter().flat_map(|table| &table.parts).collect();
        format!(
            "(select coalesce(array_agg(e.oid::int8), '{{}}') \
             from unnest({}::oid[], {}::int8[], {}::text[]) e(oid, blocks, class) \
             left join pg_class c on c.oid = e.oid where c.oid is null \
             or pg_relation_size(e.oid) / 8192 <> e.blocks or {} <> e.class)",
            array_text(parts.iter().map(|part| part.oid)),
            array_text(parts.iter().map(|part| part.blocks)),
            classes(parts.iter().copied()),
            class_of("c", self.major)
        )
    }

    /// Whether the server's counts of rows written in the catalogs of
    /// statistics rows moved since the claim (`since`), by the row that
    /// [`Self::counted_statement`] read: only then can a table's
    /// statistics rows differ from a fresh copy's. Also when the counts
    /// cannot tell.
    pub(super) fn statistics_written(&self, row: &PgRow, since: &Since) -> sqlx::Result<bool> {
        let (Some(catalogs), Some(before)) = (&self.catalogs, &since.counts) else {
            return Ok(true);
        };
        let after: Option<Vec<i64>> = row.try_get(0)?;
        let Some(after) = after.filter(|after| after.len() == before.len()) else {
            return Ok(true);
        };
        // The reset time, then the catalogs, those of statistics rows last.
        let statistics = 1 + catalogs.len() - STATISTICS_CATALOGS.len()..1 + catalogs.len();
        Ok(after[0] != before[0] || after[statistics.clone()] != before[statistics])
    }

    /// An SQL expression: the oids of the tables whose statistics rows
    /// differ from a fresh copy's (see [`STATISTICS_FOUND`]), looking at
    /// them all.
    pub(super) fn statistics_compared(&self) -> String {
        let expected: Vec<String> = self
            .tables
            .iter()
            .filter_map(|table| {
                let statistics = table.statistics.as_ref()?;
                Some(format!(
                    "({}::int8, {})",
                    table.oid,
                    catalog::literal(&statistics.hash)
                ))
            })
            .collect();
        let expected = match expected.is_empty() {
            true => "select null::int8, null::text where false".to_owned(),
            false => format!("values {}", expected.join(", ")),
        };
        format!(
            "(select coalesce(array_agg(coalesce(f.t, e.t)), '{{}}') \
             from ({STATISTICS_FOUND}) f(t, h, extended) full join ({expected}) e(t, h) \
             on e.t = f.t where f.h is distinct from e.h)"
        )
    }

    /// An SQL expression: when the database's counts were last reset (0:
    /// never; a reset of one table's counts is the database's too), then
    /// the number of rows written (inserted, updated, deleted, in
    /// transactions committed or not) in each catalog and table this
    /// snapshot counts, then the number of times each sequence's page was
    /// read (`nextval` and `setval` read it, even `setval(…, false)`,
    /// which leaves no other trace), since then; null when the server does
    /// not count now. `None` when the snapshot does not count.
    pub(crate) fn written_counts(&self) -> Option<String> {
        let catalogs = self.catalogs.as_ref()?;
        let oids = catalogs
            .iter()
            .copied()
            .chain(self.tables.iter().map(|table| table.oid));
        let sequences = self.sequences.iter().map(|sequence| sequence.oid);
        Some(format!(
            "case when current_setting('track_counts')::bool then \
                 array[coalesce((extract(epoch from pg_stat_get_db_stat_reset_time( \
                     (select oid from pg_database where datname = current_database()))) \
                     * 1000000)::int8, 0)] \
                 || (select array_agg(pg_stat_get_tuples_inserted(o) \
                     + pg_stat_get_tuples_updated(o) + pg_stat_get_tuples_deleted(o) order by n) \
                     from unnest({}::oid[]) with ordinality as u(o, n)) \
                 || (select array_agg(pg_stat_get_blocks_fetched(o) order by n) \
                     from unnest({}::oid[]) with ordinality as u(o, n)) end",
            array_text(oids),
            array_text(sequences)
        ))
    }

    /// The query that reads the server's counts (see
    /// [`Self::written_counts`]) and whether the database's own row
    /// changed, for [`Self::counted`]; `None` when this snapshot or the
    /// claim kept no counts.
    pub(super) fn counted_statement(&self, since: &Since) -> Option<String> {
        since.counts.as_ref()?;
        let counts = self.written_counts()?;
        let (catalog, rows) = DATABASE_ROW;
        Some(format!(
            "select {counts}, {}",
            written_in(catalog, rows, since.horizon)
        ))
    }

    /// What changed since the claim by the server's counts (`row`, read by
    /// [`Self::counted_statement`]): the tables written in, the sequences
    /// read or written; `None` when the counts cannot
    /// tell (the server does not count now, or a catalog was written: a
    /// truncation, a refresh, a temporary table, DDL).
    pub(super) fn counted(&self, row: &PgRow, since: &Since) -> sqlx::Result<Option<Changed>> {
        let (Some(catalogs), Some(before)) = (&self.catalogs, &since.counts) else {
            return Ok(None);
        };
        let after: Option<Vec<i64>> = row.try_get(0)?;
        let written: bool = row.try_get(1)?;
        let Some(after) = after.filter(|after| after.len() == before.len() && !written) else {
            return Ok(None);
        };
        // The reset time, then the catalogs (those of statistics rows
        // last: see `Self::statistics_written`), the tables, the sequences.
        let (catalogs_after, others_after) = after.split_at(1 + catalogs.len());
        let (catalogs_before, others_before) = before.split_at(1 + catalogs.len());
        let schema = catalogs_after.len() - STATISTICS_CATALOGS.len();
        if catalogs_after[..schema] != catalogs_before[..schema] {
            return Ok(None);
        }
        let moved: Vec<bool> = others_after
            .iter()
            .zip(others_before)
            .map(|(after, before)| after != before)
            .collect();
        let (tables, sequences) = moved.split_at(self.tables.len());
        Ok(Some(Changed {
            tables: tables.to_vec(),
            sequences: sequences.to_vec(),
            large_objects: self.large_objects.clone(),
        }))
    }

    /// What changed, by looking at it all: each table's rows (with their
    /// places) and its relations' sizes against the template's, each
    /// sequence's state, the large objects. Not the catalogs: a
    /// row deleted (a trigger dropped) leaves no trace but in the counts.
    pub(super) async fn compared(&self, connection: &mut PgConnection) -> sqlx::Result<Changed> {
        let tables: Vec<String> = self.tables.iter().map(table_differs).collect();
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
        let large_objects = match self.large_objects == NO_LARGE_OBJECTS {
            true => ANY_LARGE_OBJECTS,
            false => LARGE_OBJECTS,
        };
        let statement = format!(
            "select array[{}]::bool[], array[{}]::bool[], ({large_objects})",
            tables.join(", "),
            sequences.join(", ")
        );
        let row = query(&statement).fetch_one(connection).await?;
        Ok(Changed {
            tables: row.try_get(0)?,
            sequences: row.try_get(1)?,
            large_objects: row.try_get(2)?,
        })
    }
}

/// An SQL expression: whether `table`'s rows, their places or its
/// relations' sizes differ from a fresh copy's (a partitioned table's are
/// its partitions').
fn table_differs(table: &Table) -> String {
    if table.kind == Kind::Parent {
        return "false".to_owned();
    }
    // A grown table keeps its pages whatever a test left in them, dead
    // rows too (an insert that failed): it is put back as if written.
    if table.grown.is_some() {
        return "true".to_owned();
    }
    let rows = match &table.rows {
        None => format!("exists (select from only {})", table.name),
        Some(rows) => format!(
            "{} <> {}",
            rows_hash(&table.name),
            catalog::literal(&rows.hash)
        ),
    };
    let sizes: Vec<String> = table
        .parts
        .iter()
        .map(|part| {
            format!(
                "coalesce(pg_relation_size({}) / 8192 <> {}, true)",
                part.oid, part.blocks
            )
        })
        .collect();
    if sizes.is_empty() {
        return rows;
    }
    format!("({rows} or {})", sizes.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_from_their_array_text() {
        let values = [0, 7, -1, 4_294_967_296, i64::MIN, i64::MAX];
        let expected: Vec<String> = values.iter().map(i64::to_string).collect();
        assert_eq!(
            array_text(values.into_iter()),
            format!("'{{{}}}'", expected.join(","))
        );
        assert_eq!(array_text(std::iter::empty()), "'{}'");
    }
}
