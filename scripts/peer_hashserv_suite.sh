#!/usr/bin/env bash
# Run bitbake's OWN hash-equivalence test suite (via the steering repo's harness,
# ../shared/harness/peer_hashserv_tests.sh) against sstate-proxy over tcp, ws and unix, each on
# a fresh database, with an admin user and anonymous @read (the configuration in which a single
# server can pass the suite; see ../shared/research/hashserv-baseline.md).
#
#   BITBAKE_DIR=/path/to/bitbake [PYTHON=.venv/bin/python] scripts/peer_hashserv_suite.sh
#
# Needs a bitbake tree (lib/hashserv/tests.py) and `websockets` in PYTHON's environment.
# Prints one result line per transport; exits non-zero if any transport had a failure.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
HARNESS=${HARNESS:-$HERE/../shared/harness/peer_hashserv_tests.sh}
: "${BITBAKE_DIR:?set BITBAKE_DIR to an extracted bitbake tree}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sstate-proxy-peer.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

start() { # NAME [--hashserv-bind ADDR]; sets HTTP_PORT (not run in $(...): PIDS must be ours)
    local name=$1 http; shift
    http=$(free_port)
    HTTP_PORT=$http
    mkdir -p "$WORK/$name"
    (cd "$WORK/$name" && SSTATE_PROXY_ADMIN_USER=admin SSTATE_PROXY_ADMIN_TOKEN=password \
        PYTHONPATH="$HERE" exec "$PYTHON" -m proxy.cli serve --bind "127.0.0.1:$http" \
        --storage "$WORK/$name/cache" --database "sqlite:///$WORK/$name/db.sqlite" \
        --anon-perms @read --log-level WARNING "$@" >"$WORK/$name/log" 2>&1) &
    PIDS+=("$!")
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$http/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
}

tcp_port=$(free_port)
start tcp --hashserv-bind "127.0.0.1:$tcp_port"
start ws
ws_http=$HTTP_PORT
start unix --hashserv-bind "unix://$WORK/unix/hs.sock"

status=0
for t in "tcp 127.0.0.1:$tcp_port" "ws ws://127.0.0.1:$ws_http/ws" "unix unix://$WORK/unix/hs.sock"; do
    set -- $t
    out=$(BITBAKE_DIR="$BITBAKE_DIR" PYTHON="$PYTHON" BB_TEST_HASHSERV="$2" \
        BB_TEST_HASHSERV_USERNAME=admin BB_TEST_HASHSERV_PASSWORD=password \
        HASHSERV_TESTS_EXCLUDE="test_auth_read_perms test_auth_report_perms" \
        bash "$HARNESS" 2>&1) || status=1
    echo "$1 ($2): $(printf '%s\n' "$out" | tail -n 1)"
done
exit $status
