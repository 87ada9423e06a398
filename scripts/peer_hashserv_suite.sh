#!/usr/bin/env bash
# Run bitbake's own hash-equivalence test class (hashserv.tests.TestHashEquivalenceExternalServer)
# against sstate-proxy over tcp, ws and unix. See --help.
set -u

usage() {
    cat <<'EOF'
Usage: BITBAKE_DIR=DIR [PYTHON=python3] scripts/peer_hashserv_suite.sh [TRANSPORT ...]

Runs bitbake's own hashserv test class (hashserv.tests.TestHashEquivalenceExternalServer)
against sstate-proxy over each TRANSPORT (default: tcp ws unix). For each transport it starts
a fresh sstate-proxy (`python -m proxy.cli serve` from this repo, a temporary storage
directory and SQLite database, anonymous permissions @read, an admin user "admin" with token
"password"), runs the class with BB_TEST_HASHSERV pointing at it (tcp: --hashserv-bind on a
free loopback port; ws: ws://HOST:PORT/ws on the HTTP port; unix: --hashserv-bind unix://...),
stops it, and prints "TRANSPORT: N passed, N failed, N skipped". Exit status: 0 if every
transport had no failure, 1 otherwise, 2 on a usage or start-up error.

Environment:
  BITBAKE_DIR   an extracted bitbake tree (needs lib/hashserv/tests.py). Required.
  PYTHON        interpreter with sstate-proxy's dependencies and `websockets` (the test extras
                of pyproject.toml). Default: python3.
  TEST_TIMEOUT  seconds allowed per transport (default 900).
  KEEP=1        keep the temporary directory (server logs, databases) and print its path.
  DATABASE      a database URL to use instead of a temporary SQLite file, e.g.
                postgresql://postgres@127.0.0.1:5432/peer_{transport}: "{transport}" is replaced
                by the transport's name; each database must exist and should be empty.

Excluded tests (not counted): test_auth_read_perms and test_auth_report_perms. They give a
user no permissions and expect `get` / `report` to be refused, but bitbake's rule is that a
logged-in user also holds everything anonymous users hold, so they pass only when anonymous
users lack @read (@report). Other tests (test_report_rejects_invalid_unihash,
test_equivreport_rejects_invalid_unihash) use an anonymous client and need anonymous @read. No
single anonymous setting passes all of them against one external server, bitbake-hashserv
2.19 included; anonymous @read with these two excluded is the configuration in which
bitbake-hashserv itself passes the class (36 passed, 0 failed, 4 skipped).

WARNING: the class is destructive (it removes rows and runs gc-sweep); it only ever runs here
against the temporary servers this script starts.
EOF
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac

if [ -z "${BITBAKE_DIR:-}" ] || [ ! -f "$BITBAKE_DIR/lib/hashserv/tests.py" ]; then
    echo "error: set BITBAKE_DIR to an extracted bitbake tree (lib/hashserv/tests.py not found)" >&2
    exit 2
fi
BITBAKE_DIR=$(cd "$BITBAKE_DIR" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
TRANSPORTS=("$@")
[ ${#TRANSPORTS[@]} -eq 0 ] && TRANSPORTS=(tcp ws unix)
for t in "${TRANSPORTS[@]}"; do
    case "$t" in tcp|ws|unix) ;; *) echo "error: unknown transport '$t' (tcp, ws, unix)" >&2; exit 2 ;; esac
done
export BITBAKE_DIR PYTHON

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sstate-proxy-peer.XXXXXX")
SERVER_PID=""
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}
cleanup() {
    stop_server
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# Waits until ADDR answers a hashserv ping through bitbake's own client, or the server exits.
wait_ready() { # ADDR
    for _ in $(seq 100); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        if ADDR="$1" "$PYTHON" - >/dev/null 2>&1 <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.environ["BITBAKE_DIR"], "lib"))
import hashserv
with hashserv.create_client(os.environ["ADDR"]) as c:
    c.ping()
PY
        then return 0; fi
        sleep 0.2
    done
    return 1
}

# The test driver: runs the class against $BB_TEST_HASHSERV; the last line is the summary.
DRIVER=$WORK/driver.py
cat >"$DRIVER" <<'PY'
import os
import sys
import threading
import unittest

sys.path.insert(0, os.path.join(os.environ["BITBAKE_DIR"], "lib"))
import hashserv.tests  # noqa: E402

EXCLUDED = {"test_auth_read_perms", "test_auth_report_perms"}

# bitbake's test_stress starts reader threads that fail inside the thread (upstream bug: they
# call an undefined name); unittest does not see those, so count them instead of printing 100
# tracebacks.
thread_errors = []
threading.excepthook = lambda args: thread_errors.append(f"{args.exc_type.__name__}: {args.exc_value}")

loaded = unittest.TestLoader().loadTestsFromTestCase(hashserv.tests.TestHashEquivalenceExternalServer)
tests = [t for t in loaded if t.id().rsplit(".", 1)[-1] not in EXCLUDED]
result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(unittest.TestSuite(tests))
failed = {t.id() for t, _ in result.failures + result.errors + result.unexpectedSuccesses}
skipped = len(result.skipped)
passed = result.testsRun - len(failed) - skipped
if thread_errors:
    print(f"note: {len(thread_errors)} exception(s) in test threads, e.g. {thread_errors[0]}")
print(f"{passed} passed, {len(failed)} failed, {skipped} skipped")
sys.exit(0 if not failed and passed else 1)
PY

run_transport() { # KIND; prints the summary line; returns non-zero on failure
    local kind=$1 dir=$WORK/$1 http addr extra=()
    mkdir -p "$dir"
    local db_url="sqlite:///$dir/db.sqlite"
    if [ -n "${DATABASE:-}" ]; then db_url=${DATABASE//\{transport\}/$kind}; fi
    http=$(free_port)
    case "$kind" in
        tcp)  local p; p=$(free_port); addr="127.0.0.1:$p"; extra=(--hashserv-bind "$addr") ;;
        ws)   addr="ws://127.0.0.1:$http/ws" ;;
        unix) addr="unix://$dir/hashserv.sock"; extra=(--hashserv-bind "$addr") ;;
    esac
    (cd "$dir" && SSTATE_PROXY_ADMIN_USER=admin SSTATE_PROXY_ADMIN_TOKEN=password PYTHONPATH="$REPO" \
        exec "$PYTHON" -m proxy.cli serve --bind "127.0.0.1:$http" --storage "$dir/storage" \
        --database "$db_url" --anon-perms @read --log-level WARNING "${extra[@]}") \
        >"$dir/server.log" 2>&1 &
    SERVER_PID=$!
    if ! wait_ready "$addr"; then
        echo "$kind: sstate-proxy did not answer at $addr; its log:" >&2
        tail -n 30 "$dir/server.log" >&2
        stop_server
        return 2
    fi
    local rc=0
    BB_TEST_HASHSERV=$addr BB_TEST_HASHSERV_USERNAME=admin BB_TEST_HASHSERV_PASSWORD=password \
        timeout "$TEST_TIMEOUT" "$PYTHON" "$DRIVER" >"$dir/tests.log" 2>&1 || rc=$?
    stop_server
    local summary
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$dir/tests.log" | tail -n 1)
    if [ "$rc" -ne 0 ]; then
        grep -E '^(FAIL|ERROR):' "$dir/tests.log" | sed 's/^/    /' >&2
        [ -n "$summary" ] || summary="no summary (exit $rc; timeout after ${TEST_TIMEOUT}s is 124)"
    fi
    echo "$kind ($addr): $summary"
    return $rc
}

echo "bitbake: $BITBAKE_DIR; python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
status=0
for kind in "${TRANSPORTS[@]}"; do
    run_transport "$kind"
    rc=$?
    [ "$rc" -ne 0 ] && [ "$status" -ne 2 ] && status=$(( rc == 2 ? 2 : 1 ))
done
exit $status
