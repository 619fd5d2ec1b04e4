//! Spare copies of templates, made between runs, so that a test in
//! `isolation = "database"` claims one by renaming it (a millisecond)
//! instead of copying the template on its critical path (60 to 300 ms,
//! most of it the server writing 8 MB and some 300 files).
//!
//! The work is done by a helper: a small detached shell loop per server
//! (`psql` and util-linux `flock`, like the embedded server's watchdog),
//! started by the first database-mode test that finds none. Every pgtest
//! process holds a shared lock on the server's `clients.lock` for as long
//! as it lives; once nobody has held it for two seconds (the run is over),
//! the helper drops the databases of passed tests and makes as many spares
//! of each template as the tests since its last pass asked for (at most
//! `PGTEST_SPARE_DATABASES`, and at most 2 GiB of copies per template). It
//! checks between statements that the server is still idle, leaves the
//! rest for later when a run starts, and exits once done. Without `psql`
//! or `flock` there is no helper: tests copy the template themselves and
//! sweep passed tests' databases beside their bodies.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;

use sqlx::postgres::PgConnection;

use crate::Error;
use crate::bootstrap::quote_ident;
use crate::budget::Budget;
use crate::detach;
use crate::server::Server;

/// How a spare's comment starts.
pub(crate) const SPARE_MARKER: &str = "pgtest: spare database";
/// The variable that caps the spares of a template.
pub(crate) const SPARES_VAR: &str = "PGTEST_SPARE_DATABASES";
/// The cap when the variable is unset.
pub(crate) const DEFAULT_SPARES: u32 = 256;
/// The file of the budget's directory that every pgtest process holds a
/// shared lock on while it lives.
pub(crate) const CLIENTS_LOCK: &str = "clients.lock";
/// How many spares a test tries to claim before copying the template (a
/// claim fails when another test renamed the same spare first).
const CLAIM_TRIES: i64 = 4;

const SCRIPT: &str = r#"#!/bin/sh
# pgtest's spares helper for one server. Started by pgtest; psql connects
# through the PG* variables it was given. Once no test process has held
# clients.lock for 2 s: drops passed tests' databases, then copies each
# template asked for in spares.wanted into spare databases; exits when done.
dir=$1 limit=$2 marker=$3
exec 9>>"$dir/pgtest-spares.lock"
flock --nonblock 9 || exit 0
echo $$ > "$dir/pgtest-spares.pid"
idle() { flock --nonblock --exclusive "$dir/clients.lock" true; }
sql() { psql -X -q -At -c "$1"; }
# Runs the statements of the file $1, eight per psql, so long as no test
# uses the server; fails as soon as one does.
run_file() {
    while [ -s "$1" ]; do
        idle || return 1
        head -n 8 "$1" > "$1.batch"
        tail -n +9 "$1" > "$1.rest"
        mv "$1.rest" "$1"
        psql -X -q -f "$1.batch"
    done
    rm -f "$1" "$1.batch"
}
# One pass over the work; fails as soon as a test uses the server again.
work() {
    for passed in "$dir"/live-*.passed; do
        [ -e "$passed" ] || break
        lock=${passed%.passed}.lock
        name=${lock##*/live-}
        name=${name%.lock}
        echo "drop database if exists \"$name\";" >> "$dir/spares.drops"
        rm -f "$passed" "$lock"
    done
    run_file "$dir/spares.drops" || return 1
    if [ -s "$dir/spares.wanted" ] && mv "$dir/spares.wanted" "$dir/spares.taken"; then
        cat "$dir/spares.taken" >> "$dir/spares.todo"
        rm -f "$dir/spares.taken"
    fi
    # Counted again once the copies asked for before are made.
    if [ -s "$dir/spares.todo" ] && [ ! -s "$dir/spares.creates" ]; then
        sort "$dir/spares.todo" | uniq -c > "$dir/spares.counts"
        rm -f "$dir/spares.todo"
        while read -r count template; do
            pattern=$(printf %s "$template" | sed 's/_/\\_/g')
            missing=$(sql "select least($count, $limit, 2147483648 / greatest(pg_database_size('$template'), 1)) - count(*) from pg_database where datname like '${pattern}\_s%'") || missing=0
            while [ "${missing:-0}" -gt 0 ]; do
                spare="${template}_s$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n' | cut -c1-7)"
                echo "create database \"$spare\" template \"$template\";"
                echo "comment on database \"$spare\" is '$marker; template=$template';"
                missing=$((missing - 1))
            done
        done < "$dir/spares.counts" >> "$dir/spares.creates"
        rm -f "$dir/spares.counts"
    fi
    run_file "$dir/spares.creates"
}
quiet=0
while [ -d "$dir" ]; do
    sleep 1
    if idle; then quiet=$((quiet + 1)); else quiet=0; fi
    if [ "$quiet" -ge 2 ]; then
        if work; then break; fi
        quiet=0
    fi
done
rm -f "$dir/pgtest-spares.pid"
"#;

/// Claims a spare copy of `template` as `name`, giving it `comment`;
/// whether there was one to claim.
pub(crate) async fn claim(
    server: &Server,
    admin: &mut PgConnection,
    template: &str,
    name: &str,
    comment: &str,
) -> Result<bool, Error> {
    let spares: Vec<String> = sqlx::query_scalar(
        "select datname from pg_database where datname like $1 order by random() limit $2",
    )
    .bind(format!("{}\\_s%", template.replace('_', "\\_")))
    .bind(CLAIM_TRIES)
    .fetch_all(&mut *admin)
    .await
    .map_err(|error| server.query_error(format!("listing spare copies of {template}"), &error))?;
    for spare in spares {
        // One simple query is one transaction: renamed and marked, or not.
        let claim = format!(
            "alter database {} rename to {name}; comment on database {name} is '{comment}'",
            quote_ident(&spare),
            name = quote_ident(name),
        );
        match crate::compat::raw(&claim).execute(&mut *admin).await {
            Ok(_) => return Ok(true),
            // Another test took it first: try the next.
            Err(error) => tracing::debug!(spare, %error, "claiming a spare failed"),
        }
    }
    Ok(false)
}

/// Asks the helper for one more spare of `template` after this run, and
/// starts the helper if it is not running.
pub(crate) fn want(server: &Server, budget: &Budget, template: &str, limit: u32) {
    if limit == 0 {
        return;
    }
    let path = budget.file("spares.wanted");
    let appended = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(format!("{template}\n").as_bytes()));
    if let Err(error) = appended {
        tracing::warn!(%error, path = %path.display(), "cannot ask for a spare database");
        return;
    }
    if !helper_running(budget) {
        start_helper(server, budget, limit);
    }
}

/// Whether a helper will drop passed tests' databases once the run ends.
pub(crate) fn helper_running(budget: &Budget) -> bool {
    detach::running(
        &budget.file("pgtest-spares.pid"),
        &budget.file("pgtest-spares.sh"),
    )
}

fn start_helper(server: &Server, budget: &Budget, limit: u32) {
    if !tools_present() {
        return;
    }
    let mut sh = Command::new("sh");
    sh.envs(server.psql_env());
    let started = detach::start(
        sh,
        &budget.file("pgtest-spares.sh"),
        SCRIPT,
        &budget.file("pgtest-spares.log"),
        [
            budget.file("").into_os_string(),
            limit.to_string().into(),
            SPARE_MARKER.into(),
        ],
    );
    match started {
        Ok(()) => tracing::debug!("spares helper started"),
        Err(error) => tracing::warn!(%error, "the spares helper did not start"),
    }
}

/// Whether `psql` and `flock` can be run, asked once per process.
fn tools_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        let present = detach::runs("psql") && detach::runs("flock");
        if !present {
            tracing::debug!(
                "no psql or flock: tests in isolation = \"database\" copy the template themselves"
            );
        }
        present
    })
}
