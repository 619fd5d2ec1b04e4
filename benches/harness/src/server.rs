//! The benchmark's own PostgreSQL server: started with `pg_ctl` (as the
//! `postgres` user when run as root) with `max_connections = 100` and
//! default durability (unless `--server` says otherwise), logging
//! connections and refusals.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

pub(crate) struct Server {
    dir: PathBuf,
    bin: PathBuf,
    pub(crate) port: u16,
}

impl Server {
    /// Starts a server in `dir` on `port`, with `settings` (`NAME=VALUE`)
    /// besides the harness's own.
    pub(crate) fn start(dir: &Path, port: u16, settings: &[String]) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        set_aside(dir)?;
        fs::create_dir_all(dir)?;
        let server = Self {
            dir: dir.to_owned(),
            bin,
            port,
        };
        if is_root() {
            run(Command::new("chown").arg("postgres").arg(dir))?;
        }
        server.as_server_user(&[
            "initdb",
            "-D",
            "data",
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ])?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c log_connections=on \
             -c log_disconnections=on -c log_line_prefix='%a [%p] '",
            dir.display()
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        server.as_server_user(&[
            "pg_ctl", "-D", "data", "-l", "log", "-w", "-o", &options, "start",
        ])?;
        Ok(server)
    }

    pub(crate) fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// CPU time the server's processes have used so far, less that of the
    /// backends `except` (the harness's own sessions): the processes that
    /// live now by the kernel's scheduler (`/proc/<pid>/schedstat`, in ns;
    /// PostgreSQL's processes have one thread), those gone by their parent
    /// the postmaster's `cutime` and `cstime` (clock ticks, summed by the
    /// kernel in ns and cut once when read). Linux only; zero elsewhere.
    pub(crate) fn cpu(&self, except: &[u32]) -> Duration {
        let Some(postmaster) = fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Duration::ZERO;
        };
        let on_cpu = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()
                .and_then(|line| line.split_whitespace().next()?.parse().ok())
                .map_or(Duration::ZERO, Duration::from_nanos)
        };
        // Fields after the command's name: state is 3, ppid 4, cutime 16,
        // cstime 17.
        let stat = |pid: u32| -> Option<Vec<u64>> {
            let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = text.rsplit_once(')')?.1;
            Some(
                rest.split_whitespace()
                    .map(|field| field.parse().unwrap_or(0))
                    .collect(),
            )
        };
        let Some(own) = stat(postmaster) else {
            return Duration::ZERO;
        };
        // SAFETY: sysconf reads a constant of the system.
        let tick = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let gone = Duration::from_nanos((own[13] + own[14]) * tick);
        let live: Duration = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| !except.contains(pid))
            .filter(|&pid| {
                pid == postmaster || stat(pid).is_some_and(|s| s[1] == u64::from(postmaster))
            })
            .map(on_cpu)
            .sum();
        gone + live
    }

    fn as_server_user(&self, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(args[0]);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.args(&args[1..]).current_dir(&self.dir);
        run(&mut command)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.as_server_user(&["pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop"]);
    }
}

/// Moves an earlier server's directory out of the way, into `trash`
/// beside it, rather than deleting it: a file system that has just freed
/// thousands of inodes makes the next ones slower to create (ext4 skips
/// recently freed inodes), which would slow whatever creates the most
/// files, `CREATE DATABASE`, in the first seconds of the next run.
fn set_aside(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let trash = trash_of(dir);
    fs::create_dir_all(&trash)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    fs::rename(dir, trash.join(nanos.to_string()))?;
    Ok(())
}

/// Deletes the directories of earlier servers set aside beside `dir`.
pub(crate) fn empty_trash(dir: &Path) {
    let _ = fs::remove_dir_all(trash_of(dir));
}

fn trash_of(dir: &Path) -> PathBuf {
    dir.with_file_name("trash")
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

fn pg_bin() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PGTEST_PG_BIN") {
        return Ok(dir.into());
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: set PGTEST_PG_BIN")?
        .flatten()
        .filter_map(|entry| {
            Some((
                entry.file_name().to_str()?.parse().ok()?,
                entry.path().join("bin"),
            ))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL binaries: set PGTEST_PG_BIN")
}
