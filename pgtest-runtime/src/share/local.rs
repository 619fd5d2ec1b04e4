//! The machine's side of the budget across machines: the file slots of its
//! budget (see [`crate::budget`]) that the keeper holds, lent to other
//! runners, so that the machine's tests take no more than its share. The
//! keeper lends only slots that are free, and never takes one from a test.

use std::fs::{File, TryLockError};

use crate::Error;
use crate::budget::{Budget, note_holder};
use crate::lock::open_no_follow;
use crate::state::{Entry, ServerDir, files_error};

/// What a lent slot says to a test that waits for slots and reads it.
const LENT: &str = "pgtest's share keeper, lent to other runners of this server";

/// The budget's slot files and reserve, and which of them are lent.
pub(crate) struct Local {
    slots: Vec<Slot>,
    reserve: Slot,
    /// How many slots the reserve stands for.
    reserve_units: u32,
}

struct Slot {
    file: File,
    path: std::path::PathBuf,
    lent: bool,
}

impl Slot {
    fn open(path: std::path::PathBuf) -> Result<Self, Error> {
        let file = open_no_follow(&path, 0o600).map_err(|error| files_error(&path, &error))?;
        Ok(Self {
            file,
            path,
            lent: false,
        })
    }

    /// Takes the slot if it is free; whether it did.
    fn try_lend(&mut self) -> Result<bool, Error> {
        match self.file.try_lock() {
            Ok(()) => {
                note_holder(&self.file, LENT);
                self.lent = true;
                Ok(true)
            }
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(error)) => Err(files_error(&self.path, &error)),
        }
    }

    /// Whether a test holds it now.
    fn in_use(&self) -> Result<bool, Error> {
        match self.file.try_lock() {
            Ok(()) => {
                let _ = self.file.unlock();
                Ok(false)
            }
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(error)) => Err(files_error(&self.path, &error)),
        }
    }

    fn give_back(&mut self) {
        let _ = self.file.unlock();
        self.lent = false;
    }
}

impl Local {
    /// The slots of `budget`, in `dir`, none lent yet.
    pub(crate) fn open(budget: &Budget, dir: &ServerDir) -> Result<Self, Error> {
        let slots = (0..budget.free_for_all())
            .map(|index| Slot::open(budget.slot(index)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            slots,
            reserve: Slot::open(dir.entry(Entry::Reserve))?,
            reserve_units: budget.reserve(),
        })
    }

    /// Lends every free slot and the reserve, as the keeper starts with no
    /// share. Slots that tests hold (a keeper before this one died) stay
    /// theirs: the keeper's first share covers them.
    pub(crate) fn lend_all(&mut self) -> Result<(), Error> {
        if self.reserve_units > 0 {
            self.reserve.try_lend()?;
        }
        for slot in &mut self.slots {
            slot.try_lend()?;
        }
        Ok(())
    }

    /// The slots the machine's tests may use: those not lent.
    pub(crate) fn granted(&self) -> u32 {
        let slots = self.slots.iter().filter(|slot| !slot.lent).count() as u32;
        let reserve = match self.reserve.lent || self.reserve_units == 0 {
            true => 0,
            false => self.reserve_units,
        };
        slots + reserve
    }

    /// The reserve's slots, while the reserve is lent (as the keeper starts).
    pub(crate) fn lent_reserve(&self) -> u32 {
        match self.reserve.lent {
            true => self.reserve_units,
            false => 0,
        }
    }

    /// Gives the machine's tests `count` more slots (the reserve first, if
    /// lent and `count` covers it); how many it gave.
    pub(crate) fn grant(&mut self, count: u32) -> u32 {
        let mut given = 0;
        if self.reserve.lent && count >= self.reserve_units {
            self.reserve.give_back();
            given += self.reserve_units;
        }
        for slot in self.slots.iter_mut().filter(|slot| slot.lent) {
            if given >= count {
                break;
            }
            slot.give_back();
            given += 1;
        }
        given
    }

    /// How many of the machine's slots tests hold now (the reserve aside).
    pub(crate) fn in_use(&self) -> Result<u32, Error> {
        let mut count = 0;
        for slot in self.slots.iter().filter(|slot| !slot.lent) {
            count += u32::from(slot.in_use()?);
        }
        Ok(count)
    }

    /// Lends at most `count` of the machine's slots that are free now (never
    /// the reserve, which the machine keeps while its run lasts); how many
    /// it lent.
    pub(crate) fn reclaim(&mut self, count: u32) -> Result<u32, Error> {
        let mut lent = 0;
        for slot in self.slots.iter_mut().filter(|slot| !slot.lent) {
            if lent >= count {
                break;
            }
            lent += u32::from(slot.try_lend()?);
        }
        Ok(lent)
    }
}
