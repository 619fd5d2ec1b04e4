#!/usr/bin/env bash
# The embedded server's start-up figures, measured on the example suite
# (examples/projects), printed as a markdown table of medians:
#
#   cold  no cluster yet: initdb + start + building the shared database
#   warm  cluster directory kept, server stopped: start + warm bootstrap
#   hot   server running
#   new   server running, the first test of a new run (copies the template
#         into the run's shared database, sweeps the previous run's copy)
#
# each timed as the wall time of a process that runs the suite's first test
# (its queries take a few ms), and the whole suite under nextest on the
# embedded server against an external server (started here with pg_ctl and
# default durability). Usage: benches/embedded.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        *) echo "usage: $0 [--runs N]" >&2; exit 2 ;;
    esac
done

pg_bin="${PGTEST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$pg_bin/initdb" ] || pg_bin="$(pg_config --bindir)"
as_server_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "building the example suite..." >&2
binary="$(cargo test -p pgtest-example-projects --test projects --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)"
first_test=a_new_org_has_no_projects

home="$(mktemp -d /tmp/pgtest-bench-XXXXXX)"
chmod 755 "$home"
external="$(mktemp -d /tmp/pgtest-bench-external-XXXXXX)"
[ "$(id -u)" = 0 ] && chown postgres "$external"
port=$((20000 + RANDOM % 20000))
stop_embedded() {
    local data
    data="$(ls -d "$home"/embedded-pg*/server/data-* 2>/dev/null | head -n 1 || true)"
    if [ -n "$data" ] && [ -f "$data/postmaster.pid" ]; then
        # The watchdog sees the server gone within a second and exits.
        as_server_user "$pg_bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
}
cleanup() {
    stop_embedded || true
    as_server_user "$pg_bin/pg_ctl" -D "$external/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$home" "$external"
}
trap cleanup EXIT

# The first test, as a test of run $1 (a run's first test copies the
# template into the run's shared database).
first_test_ms() {
    local start end
    start="$(now_ms)"
    env -u DATABASE_URL PGTEST_DATABASE_URL=embedded PGTEST_HOME="$home" NEXTEST_RUN_ID="$1" \
        "$binary" --exact "$first_test" --quiet >/dev/null
    end="$(now_ms)"
    echo $(( end - start ))
}

cold=() warm=() hot=() new_run=()
for run in $(seq "$runs"); do
    stop_embedded
    rm -rf "${home:?}"/*
    cold+=("$(first_test_ms "bench-$run")")
    stop_embedded
    warm+=("$(first_test_ms "bench-$run")")
    hot+=("$(first_test_ms "bench-$run")")
    new_run+=("$(first_test_ms "bench-$run-next")")
done

echo "starting an external server on port $port..." >&2
as_server_user "$pg_bin/initdb" -D "$external/data" -U postgres --auth=trust --no-sync >/dev/null
as_server_user "$pg_bin/pg_ctl" -D "$external/data" -l "$external/log" -w \
    -o "-p $port -k $external -c listen_addresses=127.0.0.1" start >/dev/null

suite_ms() {
    local start end
    start="$(now_ms)"
    env -u DATABASE_URL PGTEST_HOME="$home" PGTEST_DATABASE_URL="$1" \
        cargo nextest run -p pgtest-example-projects --no-fail-fast >/dev/null 2>&1
    end="$(now_ms)"
    echo $(( end - start ))
}
external_url="postgres://postgres@127.0.0.1:$port/postgres"
suite_ms embedded >/dev/null
suite_ms "$external_url" >/dev/null
on_embedded=() on_external=()
for _ in $(seq "$runs"); do
    on_embedded+=("$(suite_ms embedded)")
    on_external+=("$(suite_ms "$external_url")")
done

m() { printf '%s\n' "$@" | median; }
cold_m="$(m "${cold[@]}")" warm_m="$(m "${warm[@]}")" hot_m="$(m "${hot[@]}")"
new_run_m="$(m "${new_run[@]}")"
emb_m="$(m "${on_embedded[@]}")" ext_m="$(m "${on_external[@]}")"
cat <<TABLE

Embedded server, PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}'), $(nproc) cores, medians of $runs runs

| measure | median (ms) | target (ms) | runs (ms) |
|---|---:|---:|---|
| cold start to first test done | $cold_m | 2000 | ${cold[*]} |
| warm start to first test done | $warm_m | 300 | ${warm[*]} |
| hot start to first test done | $hot_m | 50 | ${hot[*]} |
| hot start, first test of a new run | $new_run_m | | ${new_run[*]} |
| example suite, nextest, embedded | $emb_m | | ${on_embedded[*]} |
| example suite, nextest, external | $ext_m | | ${on_external[*]} |
| ratio embedded / external | $(awk -v a="$emb_m" -v b="$ext_m" 'BEGIN { printf "%.2f", a / b }') | | |
TABLE
