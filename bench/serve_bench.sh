#!/bin/sh
# Serving benchmark: sstate-proxy vs nginx (see bench/serve_bench.py). Installs the tools it
# needs (Debian, as root) if missing, then runs the bench with the given arguments, e.g.
#   bench/serve_bench.sh --no-log --profile --markdown /tmp/serve.md
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-/work/venv/bin/python}
if ! command -v nginx >/dev/null || ! command -v ab >/dev/null || ! command -v wrk >/dev/null \
   || ! command -v curl >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nginx-light apache2-utils wrk curl >/dev/null
fi
case " $* " in
    *" --profile "*) "$py" -m pip show py-spy >/dev/null 2>&1 || "$py" -m pip install -q py-spy ;;
esac
cd "$here/.."
exec "$py" bench/serve_bench.py "$@"
