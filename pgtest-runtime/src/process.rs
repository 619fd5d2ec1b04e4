//! What the kernel says of a process: who owns it, what it is called and
//! when it started. Linux reads `/proc`, macOS asks `proc_pidinfo`; other
//! systems say nothing, and callers fall back.

/// One process, as the kernel describes it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Process {
    /// The uid it runs as.
    pub(crate) owner: u32,
    /// Its command's name, as the kernel keeps it (at most 15 or 16 bytes).
    pub(crate) name: String,
    /// When it started, as a text that no other process of this boot has
    /// (with the pid).
    pub(crate) started: String,
}

/// The process `pid`, if it lives and the kernel says.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn describe(pid: i32) -> Option<Process> {
    use std::os::unix::fs::MetadataExt;
    let dir = format!("/proc/{pid}");
    let owner = std::fs::metadata(&dir).ok()?.uid();
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // "pid (name) state ppid …": the name may hold spaces and parentheses.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    // Field 22, the start time in clock ticks since boot; the rest starts
    // at field 3.
    let ticks = rest.split_whitespace().nth(19)?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    Some(Process {
        owner,
        name,
        started: format!("{}-{ticks}", boot.trim()),
    })
}

/// Whether process `pid` works in the directory whose device and inode
/// are `dir` (a postmaster works in its data directory); `None` where the
/// kernel is not asked, or will not say.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn works_in(pid: i32, dir: (u64, u64)) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    // The kernel's link to the process's current directory.
    let cwd = std::fs::metadata(format!("/proc/{pid}/cwd")).ok()?;
    Some((cwd.dev(), cwd.ino()) == dir)
}

/// Whether process `pid` works in the directory `dir`: not asked here.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn works_in(_pid: i32, _dir: (u64, u64)) -> Option<bool> {
    None
}

/// The process `pid`, if it lives and the kernel says.
#[cfg(target_os = "macos")]
pub(crate) fn describe(pid: i32) -> Option<Process> {
    // SAFETY: the buffer is a zeroed `proc_bsdinfo` of the size passed.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = libc::c_int::try_from(std::mem::size_of::<libc::proc_bsdinfo>()).ok()?;
    let got =
        unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast(), size) };
    if got != size {
        return None;
    }
    let name: Vec<u8> = info
        .pbi_comm
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(Process {
        owner: info.pbi_uid,
        name: String::from_utf8_lossy(&name).into_owned(),
        started: format!("{}.{:06}", info.pbi_start_tvsec, info.pbi_start_tvusec),
    })
}

/// The process `pid`: this system's kernel is not asked.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "macos")))]
pub(crate) fn describe(_pid: i32) -> Option<Process> {
    None
}

#[cfg(all(test, any(target_os = "linux", target_os = "macos")))]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_described_the_same_twice_and_unlike_its_parent() {
        let me = describe(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert_eq!(me.owner, nix::unistd::Uid::effective().as_raw());
        assert!(!me.name.is_empty());
        assert_eq!(
            describe(i32::try_from(std::process::id()).unwrap()),
            Some(me)
        );
        assert_eq!(describe(-5), None);
    }
}
