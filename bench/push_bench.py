"""Publishing an SSTATE_DIR: `sstate-proxy push` against the shell loop of curl PUTs the README
showed before it (one `curl -T` per file), into a fresh service each round, rounds interleaved.

    python bench/push_bench.py [-n 400] [--rounds 2]

Prints one table row per method: files/s of the first publication (empty service) and of a
rerun (everything there already: push skips with a HEAD, curl sends every body again), median
over the rounds, and the ratio to the curl loop of the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.corpus import make_corpus  # noqa: E402
from tests.service import Service  # noqa: E402
from tests.test_upload import add_user  # noqa: E402

CURL_LOOP = """cd "$1" && find . -type f -printf '%P\\n' | while read -r f; do
    curl -sS -o /dev/null --fail-with-body --netrc-file "$2" -T "$f" "$3/$f" || exit 1; done"""


def timed(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=400, help="objects in the corpus (plus companions)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="push-bench-"))
    corpus = make_corpus(work / "sstate", n=a.n, seed=1, big_objects=0)
    files = len(corpus.files)
    print(f"{files} files, {sum(corpus.sizes.values()) / 1e6:.1f} MB", file=sys.stderr)
    methods = {
        "curl loop (one `curl -T` per file)": "curl",
        "sstate-proxy push --jobs 1": "1",
        "sstate-proxy push --jobs 8": "8",
    }
    first: dict[str, list[float]] = {m: [] for m in methods}
    rerun: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(a.rounds):
        for name, how in methods.items():
            svc = Service(work / f"svc-{r}-{how}", config={"server": {"access_log": False}})
            token = add_user(svc, "ci", "@read,@upload")
            netrc = work / "netrc"
            netrc.write_text(f"machine 127.0.0.1 login ci password {token}\n")
            env = {**os.environ, "SSTATE_PROXY_USER": "ci", "SSTATE_PROXY_TOKEN": token,
                   "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            if how == "curl":
                args = ["sh", "-c", CURL_LOOP, "sh", str(corpus.root), str(netrc), None]
            else:
                args = [sys.executable, "-m", "proxy.cli", "push", str(corpus.root), "--url", None,
                        "--jobs", how, "--no-progress"]
            with svc:
                args[args.index(None)] = svc.url
                first[name].append(timed(args, env))
                rerun[name].append(timed(args, env))
            stored = sum(1 for p in svc.storage.rglob("*") if p.is_file())
            assert stored == files, (name, stored, files)
    base_first = statistics.median(first["curl loop (one `curl -T` per file)"])
    base_rerun = statistics.median(rerun["curl loop (one `curl -T` per file)"])
    print("| method | first publication, files/s | ratio | rerun, files/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in methods:
        f, rr = statistics.median(first[name]), statistics.median(rerun[name])
        print(f"| {name} | {files / f:,.0f} | {base_first / f:.1f}x | {files / rr:,.0f} | {base_rerun / rr:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
