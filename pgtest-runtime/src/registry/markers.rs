//! The comment pgtest puts on each database it makes: what the database is
//! for and, for copies, who made it. One type, [`Marker`], writes and reads
//! every form; a database without a marker is not pgtest's and is never
//! touched.
//!
//! ```text
//! pgtest: template, building
//! pgtest: template, ready; used=1764800000
//! pgtest: shared database, building
//! pgtest: shared database, ready; test=…; host=…; run=…; created=…; lock=…
//! pgtest: test database; test=…; host=…; run=…; created=…; lock=…
//! pgtest: spare database; template=…
//! pgtest: lock database
//! ```

use std::fmt;
use std::path::PathBuf;

/// Every marker starts so.
pub(crate) const PREFIX: &str = "pgtest:";

const TEMPLATE_BUILDING: &str = "pgtest: template, building";
const TEMPLATE_READY: &str = "pgtest: template, ready";
const SHARED_BUILDING: &str = "pgtest: shared database, building";
const SHARED_READY: &str = "pgtest: shared database, ready";
const TEST: &str = "pgtest: test database";
pub(crate) const SPARE: &str = "pgtest: spare database";
const LOCK_DATABASE: &str = "pgtest: lock database";

/// What a database built from a migration set is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The shared database of `isolation = "shared"` and `"transaction"`,
    /// a run's copy of the template.
    Shared,
    /// The template that copies are made from; never connected to once
    /// built, so that copies never find it in use.
    Template,
}

/// A pgtest database's comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Marker {
    /// Under construction, under a temporary name.
    Building(Kind),
    /// A complete template, copied last at `used` (seconds since the epoch).
    Template { used: u64 },
    /// A run's complete shared database.
    Shared(Origin),
    /// A test's own database.
    Test(Origin),
    /// A copy of `template` made ahead, waiting for a test.
    Spare { template: String },
    /// Where pgtest's advisory locks live (see [`crate::server`]).
    LockDatabase,
}

/// Who made a copy, and the lock file its users hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The test that made it.
    pub(crate) test: String,
    pub(crate) host: String,
    pub(crate) run: String,
    pub(crate) created: u64,
    /// Last, as a path may hold anything but a quote.
    pub(crate) lock: PathBuf,
}

impl Origin {
    /// A copy made by `test` of `run`, on this machine; its time is the
    /// server's, stamped when it is written (see [`Marker::at`]).
    pub(crate) fn new(test: &str, run: &str, lock: PathBuf) -> Self {
        Self {
            test: test.to_owned(),
            host: host(),
            run: run.to_owned(),
            created: 0,
            lock,
        }
    }

    fn parse(fields: &str) -> Option<Self> {
        let (fields, lock) = fields.split_once("; lock=")?;
        let field = |key: &str| {
            fields
                .split("; ")
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            test: field("test")?,
            host: field("host")?,
            run: field("run")?,
            created: field("created")?.parse().ok()?,
            lock: PathBuf::from(lock),
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test={}; host={}; run={}; created={}; lock={}",
            self.test,
            self.host,
            self.run,
            self.created,
            self.lock.display()
        )
    }
}

impl Marker {
    /// A complete template's marker, its last use to be stamped.
    pub(crate) const TEMPLATE: Self = Self::Template { used: 0 };

    /// This marker stamped with the server's clock, `now` (seconds since
    /// the epoch): a template's last use, a copy's making. Machines'
    /// clocks differ; a server's is the one all of them read.
    pub(crate) fn at(&self, now: u64) -> Self {
        match self {
            Self::Template { .. } => Self::Template { used: now },
            Self::Shared(origin) => Self::Shared(Origin {
                created: now,
                ..origin.clone()
            }),
            Self::Test(origin) => Self::Test(Origin {
                created: now,
                ..origin.clone()
            }),
            other => other.clone(),
        }
    }

    /// Reads a comment; `None` when it is not a marker of pgtest's.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (head, rest) = text.split_once("; ").unwrap_or((text, ""));
        match head {
            TEMPLATE_BUILDING => Some(Self::Building(Kind::Template)),
            SHARED_BUILDING => Some(Self::Building(Kind::Shared)),
            TEMPLATE_READY => {
                let used = rest
                    .split("; ")
                    .find_map(|field| field.strip_prefix("used="));
                Some(Self::Template {
                    used: used.and_then(|used| used.parse().ok()).unwrap_or(0),
                })
            }
            SHARED_READY => Origin::parse(rest).map(Self::Shared),
            TEST => Origin::parse(rest).map(Self::Test),
            SPARE => Some(Self::Spare {
                template: rest.strip_prefix("template=")?.to_owned(),
            }),
            LOCK_DATABASE => Some(Self::LockDatabase),
            _ => None,
        }
    }

    /// Whether this marks a complete database of `kind`.
    pub(crate) fn is_ready(&self, kind: Kind) -> bool {
        matches!(
            (self, kind),
            (Self::Template { .. }, Kind::Template) | (Self::Shared(_), Kind::Shared)
        )
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Building(Kind::Template) => f.write_str(TEMPLATE_BUILDING),
            Self::Building(Kind::Shared) => f.write_str(SHARED_BUILDING),
            Self::Template { used } => write!(f, "{TEMPLATE_READY}; used={used}"),
            Self::Shared(origin) => write!(f, "{SHARED_READY}; {origin}"),
            Self::Test(origin) => write!(f, "{TEST}; {origin}"),
            Self::Spare { template } => write!(f, "{SPARE}; template={template}"),
            Self::LockDatabase => f.write_str(LOCK_DATABASE),
        }
    }
}

/// This machine's name, from the system call (every platform has it).
pub(crate) fn host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            test: "blog::tests::lists_posts".to_owned(),
            host: "ci-1".to_owned(),
            run: "run-a".to_owned(),
            created: 1_764_800_000,
            lock: PathBuf::from("/tmp/x; y/live-a.lock"),
        }
    }

    #[test]
    fn every_marker_reads_back_what_was_written() {
        for marker in [
            Marker::Building(Kind::Template),
            Marker::Building(Kind::Shared),
            Marker::Template {
                used: 1_764_800_000,
            },
            Marker::Shared(origin()),
            Marker::Test(origin()),
            Marker::Spare {
                template: "pgtest_app_0123456789ab".to_owned(),
            },
            Marker::LockDatabase,
        ] {
            assert_eq!(Marker::parse(&marker.to_string()), Some(marker));
        }
    }

    #[test]
    fn the_written_forms_stay_those_of_earlier_versions() {
        assert_eq!(
            Marker::Test(origin()).to_string(),
            "pgtest: test database; test=blog::tests::lists_posts; host=ci-1; run=run-a; \
             created=1764800000; lock=/tmp/x; y/live-a.lock"
        );
        assert_eq!(
            Marker::parse("pgtest: template, ready"),
            Some(Marker::Template { used: 0 })
        );
    }

    #[test]
    fn other_comments_are_not_markers() {
        for text in [
            "",
            "my app's database",
            "pgtest: something new",
            "pgtest: test database; test=a",
        ] {
            assert_eq!(Marker::parse(text), None, "{text}");
        }
    }
}
