#!/bin/sh
# Serving benchmark: sstate-proxy vs Debian's nginx (see bench/serve_bench.py). Installs the
# Debian packages it needs (as root) if missing, then runs the bench with the given arguments:
#   PYTHON=.venv/bin/python bench/serve_bench.sh [--workers 1,2] [--markdown FILE] ...
# PYTHON: the interpreter of sstate-proxy's venv (default: python3 on PATH).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
# Debian packages: nginx (the baseline), apache2-utils (ab), wrk, curl
if ! command -v nginx >/dev/null || ! command -v ab >/dev/null || ! command -v wrk >/dev/null \
   || ! command -v curl >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx apache2-utils wrk curl >/dev/null
fi
case " $* " in
    *" --profile "*) "$py" -m pip show py-spy >/dev/null 2>&1 || "$py" -m pip install -q py-spy ;;
esac
cd "$here/.."
exec "$py" bench/serve_bench.py "$@"
