//! The spares helper's shell loop, which outlives the test process that
//! starts it (the embedded server's watchdog is a [`crate::helper`]).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Whether `program --version` runs and succeeds (`flock`, `psql`).
pub(crate) fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Writes `script` to `path` and starts it under `sh` (the command `sh`,
/// which sets its user and environment) with `args`, its output appended
/// to `log`. `sh -c '… &'` exits at once, leaving the loop to init: no
/// zombie, no child for the test runner to wait for.
pub(crate) fn start<I>(
    mut sh: Command,
    path: &Path,
    script: &str,
    log: &Path,
    args: I,
) -> io::Result<()>
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    fs::write(path, script)?;
    let status = sh
        .args([
            "-c",
            r#"log=$1; shift; sh "$0" "$@" < /dev/null >> "$log" 2>&1 &"#,
        ])
        .arg(path)
        .arg(log)
        .args(args)
        .status()?;
    match status.success() {
        true => Ok(()),
        false => Err(io::Error::other(format!("sh exited with {status}"))),
    }
}

/// Whether the pid in `pid_file` is alive and runs `script` (a script
/// killed before it removed its pid file may have left a pid that another
/// process now has). Where there is no `/proc`, a live pid is trusted.
pub(crate) fn running(pid_file: &Path, script: &Path) -> bool {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let alive = matches!(kill(Pid::from_raw(pid), None), Ok(()) | Err(Errno::EPERM));
    alive && runs_script(pid, script)
}

/// Whether the process `pid` runs `script`, from its command line.
#[cfg(target_os = "linux")]
fn runs_script(pid: i32, script: &Path) -> bool {
    let name = script
        .file_name()
        .map(OsStr::as_encoded_bytes)
        .unwrap_or_default();
    fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |cmdline| {
        !name.is_empty() && cmdline.windows(name.len()).any(|window| window == name)
    })
}

/// Whether the process `pid` runs `script`: trusted, with no `/proc`.
#[cfg(not(target_os = "linux"))]
fn runs_script(_pid: i32, _script: &Path) -> bool {
    true
}
