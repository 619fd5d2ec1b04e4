//! A snapshot as the text kept in the server's directory: each record a
//! line of numbers, words and the lengths of the texts that follow it.

use std::fmt::Write as _;

use super::snapshot::{Kind, Part, Role, Rows, Sequence, Snapshot, Statistics, Table};

/// What a template whose copies cannot be recycled stores.
pub(super) const UNRECYCLABLE: &str = "pgtest snapshot 8 none\n";

impl Snapshot {
    /// The snapshot as text.
    pub(super) fn to_text(&self) -> String {
        let catalogs = self
            .catalogs
            .as_ref()
            .map_or_else(|| "-".to_owned(), |oids| list(oids.iter()));
        let mut text = format!(
            "pgtest snapshot 8 {} {} {} {catalogs} {}\n",
            self.id, self.fingerprint, self.large_objects, self.major
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
            let kind = match table.kind {
                Kind::Table => "t",
                Kind::View => "v",
                Kind::Parent => "p",
            };
            let (statistics, extended, restore) = match &table.statistics {
                None => ("-", false, ""),
                Some(kept) => (kept.hash.as_str(), kept.extended, kept.restore.as_str()),
            };
            let mut parts = String::new();
            for part in &table.parts {
                let _ = writeln!(
                    parts,
                    "{} {} {} {} {}",
                    part.oid,
                    part.role.letter(),
                    part.blocks,
                    part.class,
                    part.name.len()
                );
                parts.push_str(&part.name);
            }
            let grown = table.grown.as_deref().unwrap_or_default();
            let texts = [table.name.as_str(), columns, data, &parts, restore, grown];
            let lengths: Vec<String> = texts.iter().map(|text| text.len().to_string()).collect();
            let _ = writeln!(
                text,
                "table {} {kind} {hash} {statistics} {extended} {}",
                table.oid,
                lengths.join(" ")
            );
            texts.iter().for_each(|part| text.push_str(part));
        }
        text
    }

    /// Reads what [`Self::to_text`] wrote; `None` when this version cannot.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut rest = text;
        let header = next_line(&mut rest)?;
        let [
            "pgtest",
            "snapshot",
            "8",
            id,
            fingerprint,
            large_objects,
            catalogs,
            major,
        ] = header[..]
        else {
            return None;
        };
        let mut snapshot = Self {
            id: id.to_owned(),
            fingerprint: fingerprint.to_owned(),
            large_objects: large_objects.to_owned(),
            catalogs: parse_list(catalogs)?,
            major: major.parse().ok()?,
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
                [
                    "table",
                    oid,
                    kind,
                    hash,
                    statistics,
                    extended,
                    name,
                    columns,
                    data,
                    parts,
                    restore,
                    grown,
                ] => {
                    let name = next_text(&mut rest, name)?;
                    let columns = next_text(&mut rest, columns)?;
                    let data = next_text(&mut rest, data)?;
                    let parts = next_text(&mut rest, parts)?;
                    let restore = next_text(&mut rest, restore)?;
                    let grown = next_text(&mut rest, grown)?;
                    snapshot.tables.push(Table {
                        oid: oid.parse().ok()?,
                        name,
                        kind: match kind {
                            "t" => Kind::Table,
                            "v" => Kind::View,
                            "p" => Kind::Parent,
                            _ => return None,
                        },
                        rows: (hash != "-").then(|| Rows {
                            hash: hash.to_owned(),
                            columns,
                            data,
                        }),
                        parts: parse_parts(&parts)?,
                        statistics: match statistics {
                            "-" => None,
                            hash => Some(Statistics {
                                hash: hash.to_owned(),
                                extended: extended.parse().ok()?,
                                restore,
                            }),
                        },
                        grown: (!grown.is_empty()).then_some(grown),
                    });
                }
                _ => return None,
            }
        }
        Some(snapshot)
    }
}

/// `values`, comma-separated.
fn list<T: ToString>(values: impl Iterator<Item = T>) -> String {
    let values: Vec<String> = values.map(|value| value.to_string()).collect();
    values.join(",")
}

/// What [`list`] wrote, or `-` for none: `None` when it cannot be read.
fn parse_list<T: std::str::FromStr>(text: &str) -> Option<Option<Vec<T>>> {
    match text {
        "-" => Some(None),
        values => values
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<T>, _>>()
            .ok()
            .map(Some),
    }
}

/// Parts, each a line (oid, role, blocks, `pg_class` statistics, the
/// length of its name) and its name.
fn parse_parts(text: &str) -> Option<Vec<Part>> {
    let mut rest = text;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let [oid, role, blocks, class, name] = next_line(&mut rest)?[..] else {
            return None;
        };
        parts.push(Part {
            oid: oid.parse().ok()?,
            name: next_text(&mut rest, name)?,
            role: Role::parse(role)?,
            blocks: blocks.parse().ok()?,
            class: class.to_owned(),
        });
    }
    Some(parts)
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::Stored;
    use super::super::fingerprint::NO_LARGE_OBJECTS;
    use super::*;

    #[test]
    fn a_snapshot_reads_back_what_was_written() {
        let part = |oid, blocks, class: &str| Part {
            oid,
            name: format!("public.\"part {oid}\""),
            role: match blocks {
                0 => Role::Itself,
                _ => Role::ToastIndex,
            },
            blocks,
            class: class.to_owned(),
        };
        let snapshot = Snapshot {
            id: "5f0e".to_owned(),
            fingerprint: "0123abcd".to_owned(),
            large_objects: NO_LARGE_OBJECTS.to_owned(),
            catalogs: Some(vec![1259, 2613]),
            major: 18,
            tables: vec![
                Table {
                    oid: 16390,
                    name: "public.plain".to_owned(),
                    kind: Kind::Table,
                    rows: None,
                    parts: vec![part(16390, 1, "1,0,1,0"), part(16393, 2, "2,0,0,0")],
                    statistics: None,
                    grown: Some(
                        "insert into public.plain (\"id\")\nvalues ('0'::integer)".to_owned(),
                    ),
                },
                Table {
                    oid: 16391,
                    name: "public.\"two\nlines\"".to_owned(),
                    kind: Kind::Table,
                    rows: Some(Rows {
                        hash: "feed".to_owned(),
                        columns: "\"id\", \"a b\"".to_owned(),
                        data: "1\tx\\ny\n2\t\\N\n".to_owned(),
                    }),
                    parts: vec![part(16391, 1, "0,-1,0,0")],
                    statistics: Some(Statistics {
                        hash: "cafe".to_owned(),
                        extended: false,
                        restore: "select pg_restore_attribute_stats('relname', 'x y')".to_owned(),
                    }),
                    grown: None,
                },
                Table {
                    oid: 16392,
                    name: "a view".to_owned(),
                    kind: Kind::View,
                    rows: Some(Rows {
                        hash: "beef".to_owned(),
                        columns: "\"n\"".to_owned(),
                        data: String::new(),
                    }),
                    parts: Vec::new(),
                    statistics: Some(Statistics {
                        hash: "d00d".to_owned(),
                        extended: true,
                        restore: String::new(),
                    }),
                    grown: None,
                },
                Table {
                    oid: 16394,
                    name: "public.parent".to_owned(),
                    kind: Kind::Parent,
                    rows: None,
                    parts: vec![part(16394, 0, "0,-1,0,0")],
                    statistics: None,
                    grown: None,
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
        fs::write(&path, "pgtest snapshot 2 x 0 -\n").unwrap();
        assert!(matches!(Stored::load(&path), Stored::Missing));
    }
}
