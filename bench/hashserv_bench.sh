#!/usr/bin/env bash
# hashserv_bench.sh -- benchmark sstate-proxy's OEHASHEQUIV face side by side with bitbake's own
# bitbake-hashserv, using the shared harness (bitbake's own client library + bitbake-hashclient).
#
# Starts, on loopback, each with a fresh SQLite database:
#   ref-tcp / ref-ws / ref-unix       bin/bitbake-hashserv (anon perms: bitbake's default
#                                     @read,@report,@db-admin; exactly what the harness starts)
#   proxy-tcp / proxy-ws / proxy-unix `sstate-proxy serve` (one process per transport, 1 worker,
#                                     same anonymous permissions, websocket at /ws)
# then runs the harness BENCH_ROUNDS times over all six and prints the median rates, the
# proxy/reference ratios and the server CPU time each server used (from /proc: a measure that
# suffers less from a busy machine than the rates do).
#
# Order: within a round each reference runs right next to the proxy on the same transport, and
# which of the two goes first alternates from pair to pair and from round to round (ABBA). A
# shared VM drifts between fast and slow spells lasting seconds; with a fixed order (all
# references, then all proxies) such a spell lands on one side only. The per-round ratios of
# each pair are printed too (their median is a second estimate, less sensitive to drift).
#
# Environment:
#   BITBAKE_DIR   extracted bitbake tree (required; see the harness --help)
#   PYTHON        interpreter of the venv holding sstate-proxy + websockets (default: python3)
#   HARNESS       path of the shared harness (default /work/shared/harness/hashserv_bench.sh)
#   BENCH_ROUNDS  harness runs (default 7); BENCH_N, BENCH_* are passed to the harness
#   BENCH_JSON    keep the per-round JSON results in this file (default: a temp file)
set -u
PYTHON=${PYTHON:-python3}
HARNESS=${HARNESS:-/work/shared/harness/hashserv_bench.sh}
HERE=$(cd "$(dirname "$0")/.." && pwd)
: "${BITBAKE_DIR:?set BITBAKE_DIR to an extracted bitbake tree}"
BITBAKE_DIR=$(cd "$BITBAKE_DIR" && pwd)
export BITBAKE_DIR PYTHON
ANON="@read,@report,@db-admin"
ROUNDS=${BENCH_ROUNDS:-7}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sstate-proxy-bench.XXXXXX")
JSON=${BENCH_JSON:-$WORK/bench.jsonl}
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

declare -A ADDR PID
start_ref() { # KIND BIND
    "$PYTHON" "$BITBAKE_DIR/bin/bitbake-hashserv" --bind "$2" --database "$WORK/ref-$1.db" \
        --log WARNING >"$WORK/ref-$1.log" 2>&1 &
    PIDS+=("$!"); PID[ref-$1]=$!; ADDR[ref-$1]=$2
}
start_proxy() { # KIND HASHSERV_BIND(or "") CLIENT_ADDR
    local http; http=$(free_port)
    local addr=${3//HTTP/$http}
    local extra=()
    [ -n "$2" ] && extra=(--hashserv-bind "$2")
    (cd "$HERE" && exec "$PYTHON" -m proxy.cli serve --bind "127.0.0.1:$http" "${extra[@]}" \
        --database "sqlite:///$WORK/proxy-$1.db" --storage "$WORK/proxy-$1-cache" --anon-perms "$ANON" \
        --workers 1 --log-level WARNING) >"$WORK/proxy-$1.log" 2>&1 &
    PIDS+=("$!"); PID[proxy-$1]=$!; ADDR[proxy-$1]=$addr
}

wait_ping() { # LABEL
    for _ in $(seq 1 60); do
        if BENCH_ADDR="${ADDR[$1]}" "$PYTHON" - <<'PY' >/dev/null 2>&1
import os, sys
sys.path.insert(0, os.path.join(os.environ["BITBAKE_DIR"], "lib"))
import hashserv
with hashserv.create_client(os.environ["BENCH_ADDR"]) as c:
    c.ping()
PY
        then return 0; fi
        sleep 0.25
    done
    echo "error: $1 at ${ADDR[$1]} did not answer; log:" >&2
    cat "$WORK/$1.log" >&2
    return 1
}

p=$(free_port); start_ref tcp "127.0.0.1:$p"
p=$(free_port); start_ref ws "ws://127.0.0.1:$p"
start_ref unix "unix://$WORK/ref-unix.sock"
p=$(free_port); start_proxy tcp "127.0.0.1:$p" "127.0.0.1:$p"
start_proxy ws "" "ws://127.0.0.1:HTTP/ws"
start_proxy unix "unix://$WORK/proxy-unix.sock" "unix://$WORK/proxy-unix.sock"
LABELS=(ref-tcp ref-ws ref-unix proxy-tcp proxy-ws proxy-unix)
for l in "${LABELS[@]}"; do wait_ping "$l" || exit 2; done

cpu() { awk -v t="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); print ($12 + $13) / t}' "/proc/$1/stat"; }
# a supervisor with --workers 1 runs the worker in-process, so the serve pid is the server
echo "machine: $(nproc)-core $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for l in "${LABELS[@]}"; do echo "  $l: ${ADDR[$l]} (pid ${PID[$l]})"; done

rc=0
CPUS="$WORK/cpu.txt"
for round in $(seq 1 "$ROUNDS"); do
    echo "=== round $round/$ROUNDS (load average: $(cut -d' ' -f1-3 /proc/loadavg)) ==="
    declare -A C0
    for l in "${LABELS[@]}"; do C0[$l]=$(cpu "${PID[$l]}"); done
    args=()
    for i in 0 1 2; do  # pairs by transport; the first of each pair alternates (ABBA)
        k=(tcp ws unix); k=${k[$i]}
        if (( (round + i) % 2 )); then pair=("ref-$k" "proxy-$k"); else pair=("proxy-$k" "ref-$k"); fi
        for l in "${pair[@]}"; do args+=("$l=${ADDR[$l]}"); done
    done
    BENCH_REFERENCE=none BENCH_JSON="$JSON" bash "$HARNESS" "${args[@]}" || rc=$?
    for l in "${LABELS[@]}"; do
        echo "$l $(echo "$(cpu "${PID[$l]}") - ${C0[$l]}" | bc)" >>"$CPUS"
    done
done

# Medians over the rounds, ratios proxy / reference, server CPU seconds per round.
"$PYTHON" - "$JSON" "$CPUS" <<'PY'
import json, statistics, sys
runs, per_round, cpu = {}, {}, {}  # per_round[label][phase] = [rate or None, one per round]
for line in open(sys.argv[1]):
    if line.strip():
        d = json.loads(line)
        rounds = per_round.setdefault(d["label"], {})
        n = max((len(v) for v in rounds.values()), default=0)
        for p, v in d["phases"].items():
            col = rounds.setdefault(p, [])
            col.extend([None] * (n - len(col)))
            col.append(v.get("rate"))
            if "rate" in v:
                runs.setdefault(d["label"], {}).setdefault(p, []).append((v["rate"], v.get("errors", 0)))
for line in open(sys.argv[2]):
    label, secs = line.split()
    cpu.setdefault(label, []).append(float(secs))
labels = [f"{w}-{k}" for w in ("ref", "proxy") for k in ("tcp", "ws", "unix") if f"{w}-{k}" in runs]
phases = list(next(iter(runs.values()))) if runs else []
med = {(l, p): statistics.median(r for r, _ in runs[l].get(p, [(0, 0)])) for l in labels for p in phases}
nrounds = max(len(v) for l in runs.values() for v in l.values()) if runs else 0
print()
print(f"median of {nrounds} round(s); ops/s (connect phase: connections/s; stress: requests/s)")
print("| phase | " + " | ".join(labels) + " |")
print("|---|" + "---:|" * len(labels))
for p in phases:
    print(f"| {p} | " + " | ".join(f"{med[(l, p)]:.0f}" for l in labels) + " |")
print("| server CPU s per round (median) | " + " | ".join(
    f"{statistics.median(cpu.get(l, [0])):.2f}" for l in labels) + " |")
kinds = [k for k in ("tcp", "ws", "unix") if f"ref-{k}" in runs and f"proxy-{k}" in runs]


def ratio_table(title, cell):
    """One row per phase, one column per transport; cell(kind, phase) -> text."""
    print()
    print(title)
    print("| phase | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for p in phases:
        print(f"| {p} | " + " | ".join(cell(k, p) for k in kinds) + " |")


def median_ratio(k, p):
    a, b = med[(f"proxy-{k}", p)], med[(f"ref-{k}", p)]
    return f"{a / b:.2f}x" if a and b else "-"


def paired_ratio(k, p):
    """Median of the per-round proxy/reference ratios (the two ran next to each other)."""
    a = per_round.get(f"proxy-{k}", {}).get(p, [])
    b = per_round.get(f"ref-{k}", {}).get(p, [])
    r = [x / y for x, y in zip(a, b) if x and y]
    return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]" if r else "-"


ratio_table("ratio proxy / reference (median rates; >= 1.0 means the proxy is faster)", median_ratio)
cells = []
for k in kinds:
    a, b = statistics.median(cpu.get(f"proxy-{k}", [0])), statistics.median(cpu.get(f"ref-{k}", [0]))
    cells.append(f"{b / a:.2f}x" if a and b else "-")
print("| server CPU efficiency (ref CPU / proxy CPU) | " + " | ".join(cells) + " |")
ratio_table("paired ratios: median of the per-round proxy/reference ratios [lowest-highest round]", paired_ratio)
wrong = sorted({(l, p) for l in runs for p, v in runs[l].items() if any(e for _, e in v)})
print("wrong results:", wrong or "none")
PY
exit $rc
