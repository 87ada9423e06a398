"""What counting costs: HEAD requests/s and OEHASHEQUIV get-stream lines/s of this checkout
against another checkout (a base commit), both running at the same time, in interleaved rounds.

    python bench/metrics_bench.py --base DIR [--workers 1] [--requests 30000] [--lines 20000]
                                  [--rounds 5]

DIR is a checkout of the commit to compare with (``git worktree add DIR <commit>``). Each
service runs ``serve --workers N`` from its own checkout (PYTHONPATH) with the access log off;
``ab -k -c 16`` sends HEAD of one stored object (a hit) and of one missing name (a miss), and
bitbake's client (tests/hashserv_client.py) sends pipelined get-stream lines over tcp. Prints
the median rate of each and the ratio this/base. Needs ab (apache2-utils).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hashserv_client import connect  # noqa: E402
from tests.service import Service, free_port  # noqa: E402
from tests.traffic import METHOD, h, object_key, seed  # noqa: E402


def ab(url: str, n: int) -> float:
    out = subprocess.run(["ab", "-k", "-i", "-q", "-c", "16", "-n", str(n), url],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))


async def stream_rate(address: str, lines: int) -> float:
    """get-stream lines/s, 1000 pipelined lines a batch, one connection."""
    client = await connect(address)
    try:
        batch = [(METHOD, h(f"line-{i}")) for i in range(1000)]
        await client.get_unihash_batch(batch)  # into stream mode
        t0 = time.perf_counter()
        for _ in range(lines // len(batch)):
            await client.get_unihash_batch(batch)
        return (lines // len(batch)) * len(batch) / (time.perf_counter() - t0)
    finally:
        await client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="checkout of the commit to compare with")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        services = {}
        hashserv = {}
        for name, code in (("base", args.base.resolve()), ("this", REPO)):
            hashserv[name] = f"127.0.0.1:{free_port()}"
            config = {"server": {"workers": args.workers, "access_log": False},
                      "hashserv": {"bind": hashserv[name]}}
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
                for name in services:
                    rates.setdefault(("get-stream", name), []).append(
                        asyncio.run(stream_rate(hashserv[name], args.lines)))
        finally:
            for svc in services.values():
                svc.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
          f"--workers {args.workers}, ab -k -c 16 -n {args.requests}, {args.rounds} interleaved rounds")
    print("| measurement | base /s | this /s | this/base |")
    print("|---|---|---|---|")
    for what in ("hit", "miss", "get-stream"):
        base = statistics.median(rates[(what, "base")])
        this = statistics.median(rates[(what, "this")])
        print(f"| {'HEAD ' + what if what != 'get-stream' else 'get-stream lines (tcp)'} | {base:,.0f} | {this:,.0f} | {this / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
