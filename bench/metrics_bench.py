"""What counting costs: HEAD requests/s of this checkout against another checkout (a base
commit), both serving the same directory at the same time, in interleaved rounds.

    python bench/metrics_bench.py --base DIR [--workers 1] [--requests 30000] [--rounds 5]

DIR is a checkout of the commit to compare with (``git worktree add DIR <commit>``). Each
service runs ``serve --workers N`` from its own checkout (PYTHONPATH) with the access log off;
``ab -k -c 16`` sends HEAD of one stored object (a hit) and of one missing name (a miss). Prints
the median requests/s of each and the ratio this/base. Needs ab (apache2-utils).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service import Service  # noqa: E402
from tests.traffic import h, object_key, seed  # noqa: E402


def ab(url: str, n: int) -> float:
    out = subprocess.run(["ab", "-k", "-i", "-q", "-c", "16", "-n", str(n), url],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="checkout of the commit to compare with")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = {"server": {"workers": args.workers, "access_log": False}}
        services = {}
        for name, code in (("base", args.base.resolve()), ("this", REPO)):
            svc = Service(Path(tmp) / name, config=config, env={"PYTHONPATH": str(code)})
            seed(svc.storage)
            services[name] = svc.start()
        hit = "/" + object_key("zlib", h("zlib-1"))
        miss = "/" + object_key("zlib", h("nowhere"))
        rates: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(args.rounds):
                for what, path in (("hit", hit), ("miss", miss)):
                    for name, svc in services.items():
                        rates.setdefault((what, name), []).append(ab(svc.url + path, args.requests))
        finally:
            for svc in services.values():
                svc.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
          f"--workers {args.workers}, ab -k -c 16 -n {args.requests}, {args.rounds} interleaved rounds")
    print("| HEAD | base req/s | this req/s | this/base |")
    print("|---|---|---|---|")
    for what in ("hit", "miss"):
        base = statistics.median(rates[(what, "base")])
        this = statistics.median(rates[(what, "this")])
        print(f"| {what} | {base:,.0f} | {this:,.0f} | {this / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
