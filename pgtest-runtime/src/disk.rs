//! Room on the disk of the server's data, where pgtest can look at it (the
//! embedded server's directory): the copies the spares helper makes ahead
//! stop short of filling it.

use std::path::Path;

/// Why a copy of `size` bytes is not to be made in `dir`'s file system:
/// it would leave less than `keep_mib` MiB free. `None` when there is room
/// (or the disk cannot be looked at: the server's own error stops copies
/// when it fills up).
pub(crate) fn short_of_room(dir: &Path, size: u64, keep_mib: u32) -> Option<String> {
    let free = match free_bytes(dir) {
        Ok(free) => free,
        Err(error) => {
            tracing::debug!(%error, dir = %dir.display(), "cannot look at the disk");
            return None;
        }
    };
    let keep = u64::from(keep_mib) << 20;
    (free < size.saturating_add(keep)).then(|| {
        format!(
            "the disk of {} has {} MiB free; a copy of {} MiB would leave less than \
             PGTEST_MIN_FREE_DISK={keep_mib} MiB",
            dir.display(),
            free >> 20,
            size.div_ceil(1 << 20),
        )
    })
}

/// The bytes an unprivileged user may still write on the file system of
/// `dir`.
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn free_bytes(dir: &Path) -> nix::Result<u64> {
    let stats = nix::sys::statvfs::statvfs(dir)?;
    // The field types differ between Linux and macOS.
    Ok((stats.blocks_available() as u64).saturating_mul(stats.fragment_size() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_that_would_leave_too_little_room_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert_eq!(short_of_room(dir.path(), 1 << 20, 0), None);
        let refused = short_of_room(dir.path(), free, 1).expect("refused");
        assert!(refused.contains("PGTEST_MIN_FREE_DISK=1 MiB"), "{refused}");
        assert_eq!(short_of_room(&dir.path().join("gone"), u64::MAX, 0), None);
    }
}
