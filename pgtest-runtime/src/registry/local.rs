//! What this machine keeps of pgtest's databases: entries in the server's
//! directory (see [`crate::state`]) beside each database a test of this
//! machine made or claimed: its lock while a test holds it (`live-…`),
//! whether its test passed or failed, and the spares put back here, which
//! the next test claims with no admin connection. Only the registry and
//! database mode's lifecycle read or write them, through these.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;

use crate::Error;
use crate::lock::{LockFile, Mode, open_no_follow};
use crate::state::{Entry, ServerDir};

impl ServerDir {
    /// The spare databases of `template` listed here, in an order of this
    /// process's (so that processes spread out).
    pub(crate) fn spares(&self, template: &str) -> Vec<String> {
        let prefix = format!("spare-{template}_");
        let names = fs::read_dir(self.path()).into_iter().flatten().flatten();
        let mut spares: Vec<String> = names
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                Some(name.strip_prefix(&prefix)?.to_owned())
            })
            .map(|key| format!("{template}_{key}"))
            .collect();
        spares.sort();
        if !spares.is_empty() {
            let start = std::process::id() as usize % spares.len();
            spares.rotate_left(start);
        }
        spares
    }

    /// How many databases of `template` this machine's tests use, have put
    /// back or are making: those with a lock file here that no test marked
    /// passed (to be dropped) or failed (kept for inspection).
    pub(crate) fn databases_of(&self, template: &str) -> usize {
        let prefix = format!("live-{template}_");
        let names: HashSet<String> = fs::read_dir(self.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        names
            .iter()
            .filter_map(|name| name.strip_suffix(".lock"))
            .filter(|live| !live[prefix.len()..].contains('_'))
            .filter(|live| {
                !names.contains(&format!("{live}.passed"))
                    && !names.contains(&format!("{live}.failed"))
            })
            .count()
    }

    /// The databases marked passed by their tests.
    pub(crate) fn passed_databases(&self) -> Vec<String> {
        self.marked_databases(".passed")
    }

    /// The failed tests' databases kept here, each with its test.
    pub(crate) fn failed_databases(&self) -> Vec<(String, String)> {
        self.marked_databases(".failed")
            .into_iter()
            .filter_map(|database| {
                let test = fs::read_to_string(self.entry(Entry::Failed(&database))).ok()?;
                Some((database, test))
            })
            .collect()
    }

    /// The databases whose entry here ends with `suffix`.
    fn marked_databases(&self, suffix: &str) -> Vec<String> {
        let names = fs::read_dir(self.path()).into_iter().flatten().flatten();
        names
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let database = name.strip_prefix("live-")?.strip_suffix(suffix)?;
                Some(database.to_owned())
            })
            .collect()
    }

    /// The lock of `database`, taken: held while a test of this machine
    /// makes, claims or uses it (and until the process ends when the test
    /// failed); `None` when another process holds it.
    pub(crate) fn hold(&self, database: &str) -> Result<Option<LockFile>, Error> {
        let entry = Entry::Live(database);
        let lock = self.lock(entry)?;
        let taken = lock.try_lock(Mode::Exclusive);
        Ok(taken
            .map_err(|error| self.error(entry, &error))?
            .then_some(lock))
    }

    /// Lists `database`, put back, as a spare of this machine's, with
    /// what its reset found (`note`: see
    /// [`crate::recycle::Snapshot::spare_note`]).
    pub(crate) fn note_spare(&self, database: &str, note: &str) {
        let noted =
            open_no_follow(&self.entry(Entry::Spare(database)), 0o600).and_then(|mut file| {
                file.set_len(0)?;
                // Ended, so that a note cut short is never taken for another.
                file.write_all(format!("{note}\n").as_bytes())
            });
        if let Err(error) = noted {
            tracing::warn!(%error, database, "cannot list a spare database");
        }
    }

    /// What the reset that listed the spare `database` here found, when
    /// it is listed with a whole note.
    pub(crate) fn spare_note(&self, database: &str) -> Option<String> {
        let text = fs::read_to_string(self.entry(Entry::Spare(database))).ok()?;
        text.strip_suffix('\n').map(str::to_owned)
    }

    /// Forgets that `database` is a spare here (a test claims it, or it is
    /// gone).
    pub(crate) fn forget_spare(&self, database: &str) {
        let _ = fs::remove_file(self.entry(Entry::Spare(database)));
    }

    /// Forgets the snapshot of `template`, dropped or another template's
    /// (see [`crate::recycle::Reset::Stale`]): the next copy takes it anew.
    pub(crate) fn forget_snapshot(&self, template: &str) {
        let _ = fs::remove_file(self.entry(Entry::Snapshot(template)));
    }

    /// Marks `database` as its test's, passed and retired: the spares
    /// helper or a sweep drops it.
    pub(crate) fn note_passed(&self, database: &str) {
        if let Err(error) = open_no_follow(&self.entry(Entry::Passed(database)), 0o600) {
            tracing::warn!(%error, database, "cannot mark a retired database");
        }
    }

    /// Marks `database` as kept for inspection, its `test` failed.
    pub(crate) fn note_failed(&self, database: &str, test: &str) {
        let entry = self.entry(Entry::Failed(database));
        if let Err(error) = fs::write(&entry, test) {
            tracing::warn!(%error, path = %entry.display(), "cannot list a kept database");
        }
    }

    /// Forgets that a failed test's `database` is kept (it is gone).
    pub(crate) fn forget_failed(&self, database: &str) {
        let _ = fs::remove_file(self.entry(Entry::Failed(database)));
    }

    /// Forgets `database`, dropped or gone: its entries here.
    pub(crate) fn forget(&self, database: &str) {
        for entry in [
            Entry::Failed(database),
            Entry::Passed(database),
            Entry::Spare(database),
            Entry::Live(database),
        ] {
            let _ = fs::remove_file(self.entry(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Entry, ServerDir};

    #[test]
    fn a_templates_databases_are_those_in_play_here() {
        let home = tempfile::tempdir().unwrap();
        let dir = ServerDir::unchecked(home.path());
        let template = "pgtest_app_0123456789ab";
        let copy = |key: &str| format!("{template}_{key}");
        for key in ["0000aaaa", "1111bbbb", "2222cccc", "s333dddd", "4444eeee"] {
            drop(dir.lock(Entry::Live(&copy(key))).unwrap());
        }
        // Marked to be dropped, kept for inspection: not in play.
        fs::write(dir.entry(Entry::Passed(&copy("2222cccc"))), "").unwrap();
        fs::write(dir.entry(Entry::Failed(&copy("4444eeee"))), "a test").unwrap();
        // Another template whose name starts with this one's; a run copy.
        drop(dir.lock(Entry::Live(&copy("x_5555ffff"))).unwrap());
        drop(dir.lock(Entry::Run(&copy("r666666"))).unwrap());
        assert_eq!(dir.databases_of(template), 3);
        assert_eq!(dir.databases_of("pgtest_app_ba9876543210"), 0);
    }
}
