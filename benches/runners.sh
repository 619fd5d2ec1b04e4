#!/usr/bin/env bash
# Many runners on one server: the figures of issue 21, printed as a
# markdown table of medians. The suite is tests/runners.rs's (448 tests
# that each hold three connections at once, generated into the same
# project, target/pgtest-it-projects/runners), on a new pg_ctl server for
# each run with max_connections = 50 (fsync off, connections and
# disconnections logged), against
#
#   split  N runners at once, each with a pgtest home of its own (a
#          machine), `cargo nextest run --partition count:i/N -j J`
#   alone  1 runner, the whole suite, `-j J`
#
# Per run: wall time until every runner has ended, tests passed, the most
# client connections open at once (pgtest's role; from the server's log:
# authorized, less disconnected or failed after login) and the connections
# the server refused (too many clients, reserved slots).
# With --load L, each run waits until the 1-minute load average is below L
# (a machine shared with other work). The table gives the load average at
# each run's start and end.
# Usage: benches/runners.sh [--runs N] [--runners N] [--jobs J] [--load L]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

runs=3
runners=4
jobs=64
load_limit=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --runners) runners="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --load) load_limit="$2"; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--runners N] [--jobs J] [--load L]" >&2; exit 2 ;;
    esac
done

pg_bin="${PGTEST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$pg_bin/initdb" ] || pg_bin="$(pg_config --bindir)"
as_server_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# The project, as tests/runners.rs writes it (the same bytes, so that
# either finds the other's build fresh), built by cargo with the settings
# the tests' projects share.
project="$repo/target/pgtest-it-projects/runners"
export CARGO_TARGET_DIR="$repo/target/pgtest-it-projects" CARGO_INCREMENTAL=0 \
    CARGO_PROFILE_DEV_DEBUG=line-tables-only
write() { # path, contents on stdin: written unless they are there already
    local new
    new="$(mktemp)"
    cat > "$new"
    mkdir -p "$(dirname "$1")"
    if cmp -s "$new" "$1"; then rm "$new"; else mv "$new" "$1"; fi
}
write "$project/Cargo.toml" <<EOF

[package]
name = "runners-suite"
version = "0.1.0"
edition = "2024"
publish = false

[dev-dependencies]
pgtest = { path = "$repo" }
sqlx = { version = "0.9", default-features = false, features = ["postgres", "runtime-tokio"] }
tokio = { version = "1", features = ["sync", "rt"] }

[workspace]
EOF
write "$project/Cargo.lock" < "$repo/Cargo.lock"
write "$project/src/lib.rs" < /dev/null
{
    cat <<'EOF'
async fn hold_three(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
    let all_in = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (pool, all_in) = (pool.clone(), all_in.clone());
        tasks.spawn(async move {
            let mut connection = pool.acquire().await?;
            all_in.wait().await;
            sqlx::query("select pg_sleep(0.02)").execute(&mut *connection).await.map(drop)
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a task panicked")?;
    }
    Ok(())
}
EOF
    for module in $(seq 0 55); do
        printf 'mod m%02d {\n' "$module"
        for test in $(seq 0 7); do
            printf '    #[pgtest::pg_test(migrations = false)]\n'
            printf '    async fn t%d(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {\n' "$test"
            printf '        super::hold_three(pool).await\n    }\n'
        done
        printf '}\n'
    done
} | write "$project/tests/crowd.rs"
echo "building the suite..." >&2
(cd "$project" && cargo nextest list --offline >/dev/null)

# The runners' environment: none of an outer nextest's.
for var in $(env | grep -o '^NEXTEST[A-Z_]*' || true); do unset "$var"; done
unset DATABASE_URL

work="$(mktemp -d /tmp/pgtest-runners-XXXXXX)"
chmod 755 "$work"
server=""
stop_server() {
    if [ -n "$server" ]; then
        as_server_user "$pg_bin/pg_ctl" -D "$server/data" -m fast -w stop >/dev/null 2>&1 || true
        server=""
    fi
}
cleanup() { stop_server; rm -rf "$work"; }
trap cleanup EXIT

# A new server in $work/$1; sets $server and $port.
start_server() {
    server="$work/$1"
    mkdir -p "$server"
    [ "$(id -u)" = 0 ] && chown postgres "$server"
    as_server_user "$pg_bin/initdb" -D "$server/data" -U postgres --auth-local=trust \
        --auth-host=reject --no-sync >/dev/null
    port=$((20000 + RANDOM % 20000))
    as_server_user "$pg_bin/pg_ctl" -D "$server/data" -l "$server/log" -w -t 60 -o \
        "-p $port -k $server -c listen_addresses='' -c fsync=off -c max_connections=50 \
         -c log_connections=on -c log_disconnections=on -c log_line_prefix='%m [%p] '" \
        start >/dev/null
}

# The most client connections open at once, by the server's log.
peak() {
    awk '
        /connection authorized:/ { if (match($0, /\[[0-9]+\]/)) { open[substr($0, RSTART, RLENGTH)] = 1; n = length(open); if (n > peak) peak = n } }
        /disconnection:|FATAL:/ { if (match($0, /\[[0-9]+\]/)) delete open[substr($0, RSTART, RLENGTH)] }
        END { print peak + 0 }' "$1"
}
refused() {
    grep -c -e 'too many clients' -e 'remaining connection slots are reserved' "$1" || true
}

# One run of `split` or `alone`; prints "wall_s passed failed peak refused".
run() {
    local kind="$1" index="$2"
    start_server "$kind-$index"
    local url="postgres://postgres@localhost/postgres?host=$server&port=$port"
    local count=1
    [ "$kind" = split ] && count="$runners"
    local pids=() start end
    start="$(now_ms)"
    for i in $(seq 1 "$count"); do
        local partition=()
        [ "$kind" = split ] && partition=("--partition=count:$i/$count")
        (cd "$project" && PGTEST_DATABASE_URL="$url" PGTEST_HOME="$server/home-$i" \
            PGTEST_ACQUIRE_TIMEOUT=120 \
            cargo nextest run --offline --no-fail-fast -j "$jobs" "${partition[@]}" \
            > "$server/runner-$i.out" 2>&1) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    end="$(now_ms)"
    local passed failed
    passed="$(cat "$server"/runner-*.out | grep -o '[0-9]* passed' | awk '{ s += $1 } END { print s + 0 }')"
    failed="$(cat "$server"/runner-*.out | grep -o '[0-9]* failed' | awk '{ s += $1 } END { print s + 0 }')"
    stop_server
    echo "$(awk -v ms=$((end - start)) 'BEGIN { printf "%.2f", ms / 1000 }') $passed $failed \
$(peak "$work/$kind-$index/log") $(refused "$work/$kind-$index/log")"
}

results="$work/results"
touch "$results"
for index in $(seq 1 "$runs"); do
    for kind in split alone; do
        if [ -n "$load_limit" ]; then
            while awk -v limit="$load_limit" '{ exit !($1 >= limit) }' /proc/loadavg; do sleep 10; done
        fi
        load="$(cut -d' ' -f1 /proc/loadavg)"
        line="$(run "$kind" "$index")"
        load="$load–$(cut -d' ' -f1 /proc/loadavg)"
        echo "$kind $line $load" >> "$results"
        echo "run $index $kind: wall ${line%% *} s (passed, failed, peak, refused: ${line#* }), load $load" >&2
    done
done

echo "| runners | wall (s), median | each run (s) | passed | failed | peak connections | refused | load average (start–end) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for kind in split alone; do
    rows="$(grep "^$kind " "$results" || true)"
    col() { awk -v c="$1" '{ print $c }' <<< "$rows"; }
    label="1, \`-j $jobs\`"
    [ "$kind" = split ] && label="$runners, \`--partition count:i/$runners -j $jobs\` each"
    echo "| $label | $(col 2 | median) | $(col 2 | paste -sd' ') | $(col 3 | paste -sd' ') \
| $(col 4 | paste -sd' ') | $(col 5 | median) ($(col 5 | paste -sd' ')) \
| $(col 6 | median) ($(col 6 | paste -sd' ')) | $(col 7 | paste -sd' ') |"
done
