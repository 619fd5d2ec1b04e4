//! The watchdog: a small detached shell loop that stops the embedded server
//! once no test process has used it for a while.
//!
//! Every process that uses the server holds a shared lock on
//! `clients.lock` for as long as it lives (the OS drops it when the process
//! dies, however it dies). The watchdog counts the seconds during which it
//! could take that lock exclusively, and stops the server while holding it,
//! so that no process can start using the server during the stop.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use super::cluster::Cluster;
use crate::detach;

const SCRIPT: &str = r#"#!/bin/sh
# pgtest's watchdog for one embedded cluster: stops the server once no test
# process has held clients.lock for IDLE seconds. Started by pgtest.
dir=$1 bin=$2 idle=$3
echo $$ > "$dir/watchdog.pid"
quiet=0
while [ -f "$dir/data/postmaster.pid" ]; do
    sleep 1
    if flock --nonblock --exclusive "$dir/clients.lock" true; then
        quiet=$((quiet + 1))
    else
        quiet=0
    fi
    if [ "$quiet" -ge "$idle" ] &&
        flock --nonblock --exclusive "$dir/clients.lock" \
            "$bin/pg_ctl" -D "$dir/data" -m fast -w -s stop; then
        echo "$(date): stopped the server after $idle s without a client"
        break
    fi
done
if [ "$(cat "$dir/watchdog.pid" 2>/dev/null)" = "$$" ]; then
    rm -f "$dir/watchdog.pid"
fi
"#;

/// Starts a watchdog for `cluster` unless one is running. Without the
/// `flock` command (util-linux) there is none, and the server keeps running
/// until stopped by hand.
pub(crate) fn ensure(cluster: &Cluster, idle: Duration) {
    if is_running(cluster) {
        return;
    }
    if !detach::runs("flock") {
        tracing::warn!(
            "no `flock` command (util-linux): the embedded server will not stop by itself"
        );
        return;
    }
    let idle_secs = idle.as_secs_f64().ceil().max(1.0) as u64;
    let started = detach::start(
        cluster.server_command("sh"),
        &script_path(cluster),
        SCRIPT,
        &cluster.dir().join("watchdog.log"),
        [
            cluster.dir().as_os_str(),
            cluster.binaries().dir.as_os_str(),
            OsStr::new(&idle_secs.to_string()),
        ],
    );
    match started {
        Ok(()) => tracing::debug!(idle_secs, "watchdog started"),
        Err(error) => tracing::warn!(
            %error,
            "the watchdog did not start; the embedded server will not stop by itself"
        ),
    }
}

fn script_path(cluster: &Cluster) -> PathBuf {
    cluster.dir().join("watchdog.sh")
}

fn is_running(cluster: &Cluster) -> bool {
    detach::running(&cluster.dir().join("watchdog.pid"), &script_path(cluster))
}
