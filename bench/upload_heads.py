"""HEAD latency beside uploads of real sstate archives: what an upload costs the event loop.

bench/load_test.py uploads random bytes, which have no archive identity (the zstd magic is
wrong), so it never parses a tar. Here every PUT is a real ``.tar.zst`` of ``--members`` small
files (a ``package`` archive of a large recipe), each with content of its own: the worker stores
it, computes its archive identity (dedup) and records it. Meanwhile ``--connections`` keep-alive
connections HEAD stored objects at ``--head-rate`` in all (fixed pacing, open loop). After a
few warm-up uploads (unless ``--cold``: they start the workers' identity processes), a phase
without uploads, then one with ``--upload-rate`` PUT/s, in the same service run.

    python bench/upload_heads.py [--workers 1] [--members 2000] [--upload-rate 5] [--no-dedup]
                                 [--random-bodies] [--cold]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load_test import cpu_seconds, machine, ms, percentile, service_pids  # noqa: E402
from tests.service import Service  # noqa: E402
from tests.test_upload import make_archive, obj_key  # noqa: E402

ADMIN = ("admin", "upload-heads-admin-token")


async def heads(port: int, keys: list[str], n_conn: int, rate: float, t_end: float) -> list[float]:
    """Latencies of HEADs paced at ``rate``/s over ``n_conn`` connections until ``t_end``."""
    out: list[float] = []
    interval = n_conn / rate

    async def conn(i: int) -> None:
        rng = random.Random(i)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            due = time.monotonic() + rng.random() * interval
            while due < t_end:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                t0 = time.monotonic()
                async with s.head(f"http://127.0.0.1:{port}/{rng.choice(keys)}") as r:
                    assert r.status == 200, r.status
                out.append(time.monotonic() - t0)
                due += interval

    await asyncio.gather(*(conn(i) for i in range(n_conn)))
    return out


async def uploads(port: int, bodies: list[bytes], rate: float, t_end: float) -> list[float]:
    out: list[float] = []
    auth = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()

    async with aiohttp.ClientSession() as s:
        async def one(body: bytes) -> None:
            t0 = time.monotonic()
            async with s.put(f"http://127.0.0.1:{port}/{obj_key(task='package')}", data=body,
                             headers={"Authorization": auth}) as r:
                assert r.status == 201, r.status
            out.append(time.monotonic() - t0)

        tasks = []
        due = time.monotonic()
        for body in bodies:
            if due >= t_end:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(body)))
            due += 1 / rate
        await asyncio.gather(*tasks)
    return out


def line(name: str, v: list[float]) -> str:
    return f"| {name} | {len(v)} | {ms(percentile(v, 50))} | {ms(percentile(v, 99))} | {ms(max(v, default=0.0))} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--head-rate", type=float, default=400.0, help="HEAD/s in all")
    ap.add_argument("--upload-rate", type=float, default=5.0, help="PUT/s of archives")
    ap.add_argument("--members", type=int, default=2000, help="files in each archive (200 bytes each)")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of each phase")
    ap.add_argument("--no-dedup", action="store_true", help="[storage] dedup = false")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up uploads: the identity pool starts during the measured phase")
    ap.add_argument("--random-bodies", action="store_true",
                    help="random bytes of 20-400 KB instead of archives, as bench/load_test.py sends")
    args = ap.parse_args(argv)

    rng = random.Random(16)
    n_bodies = int(args.upload_rate * args.duration) + 1
    if args.random_bodies:
        bodies = [rng.randbytes(rng.randint(20_000, 400_000)) for _ in range(n_bodies)]
    else:
        bodies = [make_archive({f"usr/share/pkg/d{i % 50}/f{i}": rng.randbytes(200) for i in range(args.members)})
                  for _ in range(n_bodies)]
    with tempfile.TemporaryDirectory(prefix="upload-heads-") as d:
        svc = Service(Path(d) / "svc", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                      args=["--workers", str(args.workers)], config={"storage": {"dedup": not args.no_dedup}})
        keys = [obj_key() for _ in range(300)]
        for k in keys:
            (svc.storage / k).parent.mkdir(parents=True, exist_ok=True)
            (svc.storage / k).write_bytes(rng.randbytes(1000))
        with svc:
            assert svc.proc is not None
            pid = svc.proc.pid

            async def phase(upload: bool) -> tuple[list[float], list[float], float]:
                t_end = time.monotonic() + args.duration
                cpu0 = cpu_seconds(service_pids(pid))
                h, u = await asyncio.gather(
                    heads(svc.port, keys, args.connections, args.head_rate, t_end),
                    uploads(svc.port, bodies, args.upload_rate, t_end) if upload else asyncio.sleep(0, []))
                return h, u, cpu_seconds(service_pids(pid)) - cpu0

            if not args.cold:  # steady state: each worker's identity pool started before measuring
                warm = [make_archive({"warm": rng.randbytes(100)}) for _ in range(2 * args.workers)]
                asyncio.run(uploads(svc.port, warm, 100.0, time.monotonic() + 60))
            quiet = asyncio.run(phase(False))
            loaded = asyncio.run(phase(True))
    print(f"command: python bench/upload_heads.py {' '.join(sys.argv[1:])}".rstrip())
    what = "random bodies of 20-400 KB" if args.random_bodies else \
        f"archives of {args.members} files, {len(bodies[0]) // 1000} KB"
    print(f"machine: {machine()}; {what}; "
          f"{args.head_rate:g} HEAD/s over {args.connections} connections, {args.duration:g} s a phase")
    print("\n| phase, request | count | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")
    print(line("no uploads: HEAD", quiet[0]))
    print(line(f"{args.upload_rate:g} PUT/s: HEAD", loaded[0]))
    print(line(f"{args.upload_rate:g} PUT/s: PUT", loaded[1]))
    print(f"\nservice CPU: {quiet[2]:.1f} s without uploads, {loaded[2]:.1f} s with (its direct children included: with --workers 1, the identity processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
