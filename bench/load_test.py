"""Load: a fleet's setscene HEAD storms over many keep-alive connections while uploads and
reports run.

Models issue 16's fleet: ``--builders`` bitbake builders (20), each with ``--connections``
keep-alive connections (50: BB_NUMBER_THREADS fetcher threads, one cached socket each; 1,000 in
all). A builder checks its setscene tasks with HEADs: many distinct names, mostly misses
(bitbake asks a miss twice), some hits, some rewritten to an equivalent; names are shared
between builders (a fleet builds the same targets). A bitbake >= 2.0 issues about 50-70 HEAD/s
whatever its thread count (client CPU), so each builder is paced at ``--builder-rate`` HEAD/s
(Poisson arrivals spread over its connections; open loop, so a slow server shows as latency,
not as fewer requests). Meanwhile uploaders PUT new objects and OEHASHEQUIV clients (half tcp,
half WebSocket) report, each at a fixed rate.

The service runs with ``--workers`` workers and its access log on (to a file), as deployed.
The builders run in ``--procs`` processes of their own (aiohttp), the uploads and reports in
this one; the CPU time of the service and of the load generator are printed, and how late the
generator sent its requests (if that lag grows, the generator, not the service, is the limit).

Verdict: every HEAD answered as expected (hit 200, equivalent 200 + ``X-Sstate-Source:
equivalent``, miss 404), no upload or report failed, HEAD p99 < ``--target-p99-ms`` (50).

    python bench/load_test.py [--builders 20] [--connections 50] [--builder-rate 70]
                              [--duration 30] [--workers 2] [--procs 2] [--objects 3000]
                              [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import make_corpus  # noqa: E402
from tests.hashserv_client import connect  # noqa: E402
from tests.service import Service, free_port  # noqa: E402

ADMIN = ("admin", "load-test-admin-token")
METHOD = "oe.sstatesig.OEOuthashBasic"


@dataclass
class Probe:
    """One setscene check: the name asked, what a correct service answers."""

    path: str
    kind: str  # hit | equivalent | miss


@dataclass
class BuilderResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    lag: list[float] = field(default_factory=list)  # the generator woke late by (seconds)
    behind: int = 0  # checks due while their thread still waited for an answer
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    cpu_s: float = 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


# --- the builders (run in --procs processes) -------------------------------------------------------


async def _builder(port: int, probes: list[Probe], n_conn: int, rate: float, t_start: float,
                   t_end: float, seed: int, out: BuilderResult) -> None:
    rng = random.Random(seed)
    order = probes[:]
    rng.shuffle(order)
    it = itertools.cycle(order)
    base = f"http://127.0.0.1:{port}"
    per_conn = rate / n_conn

    async def head(session: aiohttp.ClientSession, probe: Probe, record: bool = True) -> int:
        t0 = time.monotonic()
        try:
            async with session.head(base + probe.path, allow_redirects=False) as r:
                status = r.status
                source = r.headers.get("X-Sstate-Source", "")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            out.errors[f"{probe.kind}: {type(e).__name__}"] += 1
            return -1
        if record:
            out.latencies.setdefault(probe.kind, []).append(time.monotonic() - t0)
        out.statuses[status] += 1
        want = 404 if probe.kind == "miss" else 200
        if status != want or (probe.kind == "equivalent" and source != "equivalent"):
            out.errors[f"{probe.kind}: {status} {source}"] += 1
        return status

    async def thread(k: int) -> None:
        # A fetcher thread: one cached keep-alive connection of its own (a session with a
        # one-connection pool), its checks one after another.
        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=300)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            # Open the connection first (its first HEAD, not measured), the fleet's 1,000
            # spread over the ramp before t_start rather than all in one instant.
            await asyncio.sleep(rng.uniform(0, max(0.0, t_start - time.monotonic() - 1.0)))
            await head(session, next(it), record=False)
            await asyncio.sleep(max(0.0, t_start - time.monotonic()))
            due = t_start + random.Random(seed * 1000 + k).expovariate(per_conn)
            while due < t_end:
                now = time.monotonic()
                if due > now:  # idle until due: how late the wake-up comes is the generator's lag
                    await asyncio.sleep(due - now)
                    out.lag.append(time.monotonic() - due)
                else:  # still busy with the previous check when this one was due: the service's
                    out.behind += 1
                probe = next(it)
                if await head(session, probe) == 404:
                    await head(session, probe)  # bitbake retries a miss once
                due += rng.expovariate(per_conn)

    await asyncio.gather(*(thread(k) for k in range(n_conn)))


def count_connections(port: int) -> int:
    """Established connections to ``port`` from this host (the client ends, from ``ss``)."""
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                       capture_output=True, text=True)
    return len([line for line in r.stdout.splitlines() if line.strip()]) if r.returncode == 0 else -1


def run_builders(port: int, probes: list[Probe], builders: list[int], n_conn: int, rate: float,
                 t_start: float, t_end: float) -> BuilderResult:
    """One generator process: ``builders`` (their seeds) sharing one event loop."""
    out = BuilderResult()
    cpu0 = time.process_time()

    async def main() -> None:
        await asyncio.gather(*(_builder(port, probes, n_conn, rate, t_start, t_end, b, out)
                               for b in builders))

    asyncio.run(main())
    out.cpu_s = time.process_time() - cpu0
    return out


# --- uploads and reports (in the main process) -------------------------------------------------------


@dataclass
class SideResult:
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


async def _uploads(port: int, rate: float, t_start: float, t_end: float, out: SideResult) -> None:
    import base64

    auth = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            h = rng.getrandbits(256).to_bytes(32, "big").hex()
            path = f"/{h[:2]}/{h[2:4]}/sstate:load:core2-64-poky-linux:1.0:r0:core2-64:14:{h}_package.tar.zst"
            body = rng.randbytes(rng.randint(20_000, 400_000))
            t0 = time.monotonic()
            try:
                async with session.put(f"http://127.0.0.1:{port}{path}", data=body,
                                       headers={"Authorization": auth}) as r:
                    await r.read()
                    if r.status != 201:
                        out.errors[f"PUT {r.status}"] += 1
                        return
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                out.errors[f"PUT {type(e).__name__}"] += 1
                return
            out.latencies.append(time.monotonic() - t0)

        await _paced(one, rate, t_start, t_end, rng)


async def _reports(address: str, rate: float, t_start: float, t_end: float, seed: int, out: SideResult) -> None:
    rng = random.Random(seed)
    client = await connect(address, *ADMIN, timeout=30)
    try:
        async def one() -> None:
            taskhash = rng.getrandbits(256).to_bytes(32, "big").hex()
            outhash = rng.getrandbits(256).to_bytes(32, "big").hex()
            t0 = time.monotonic()
            try:
                reply = await client.report_unihash(taskhash, METHOD, outhash, taskhash, {"owner": "load"})
                if reply.get("unihash") != taskhash:
                    out.errors["report: wrong unihash"] += 1
                    return
            except Exception as e:  # noqa: BLE001 - counted, shown
                out.errors[f"report {type(e).__name__}"] += 1
                return
            out.latencies.append(time.monotonic() - t0)

        await _paced(one, rate, t_start, t_end, rng, sequential=True)
    finally:
        await client.close()


async def _paced(one, rate: float, t_start: float, t_end: float, rng: random.Random,
                 sequential: bool = False) -> None:
    """Call ``one`` at Poisson arrivals of ``rate``/s between t_start and t_end (concurrently,
    unless ``sequential``: one connection's requests go one after another)."""
    if rate <= 0:
        return
    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    due = t_start + rng.expovariate(rate)
    running: set[asyncio.Task] = set()
    while due < t_end:
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        if sequential:
            await one()
        else:
            t = asyncio.create_task(one())
            running.add(t)
            t.add_done_callback(running.discard)
        due += rng.expovariate(rate)
    if running:
        await asyncio.gather(*running)


# --- set-up, CPU accounting ---------------------------------------------------------------------------------


def service_pids(pid: int) -> list[int]:
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / tick


def cpu_pressure() -> str:
    """The kernel's CPU pressure (PSI): the share of time runnable tasks waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return " ".join(some[1:3])  # avg10=.. avg60=..
    except OSError:
        return "n/a"


ACCESS_MS = re.compile(rb" HEAD \S+ (\d{3}) .* (\d+(?:\.\d+)?)ms ")


def service_head_times(log: Path) -> list[float]:
    """Seconds each HEAD took inside the service, from its access log (handler start to
    response written): what the service itself adds, without the client's or the kernel's."""
    out = []
    with open(log, "rb") as f:
        for line in f:
            m = ACCESS_MS.search(line)
            if m:
                out.append(float(m.group(2)) / 1000)
    return out


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}, load average before the run {os.getloadavg()[0]:.2f}")


def make_probes(corpus, rng: random.Random, n: int, hit: float, equivalent: float) -> list[Probe]:
    from urllib.parse import quote

    probes = []
    targets = {u for _, u, _ in corpus.equivalences}
    hits = [k for k in corpus.objects if k not in targets] or corpus.objects
    for _ in range(n):
        x = rng.random()
        if x < hit:
            probes.append(Probe("/" + quote(rng.choice(hits)), "hit"))
        elif x < hit + equivalent and corpus.equivalences:
            probes.append(Probe("/" + quote(rng.choice(corpus.equivalences)[0]), "equivalent"))
        else:
            h = rng.getrandbits(256).to_bytes(32, "big").hex()
            probes.append(Probe(f"/{h[:2]}/{h[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:"
                                f"{h}_populate_sysroot.tar.zst", "miss"))
    return probes


async def report_equivalences(address: str, corpus) -> None:
    client = await connect(address, *ADMIN, timeout=30)
    try:
        for d in corpus.details:
            await client.report_unihash(d.taskhash, d.method, d.outhash, d.unihash)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builders", type=int, default=20)
    ap.add_argument("--connections", type=int, default=50, help="keep-alive connections per builder")
    ap.add_argument("--builder-rate", type=float, default=70.0, help="HEAD/s per builder")
    ap.add_argument("--names", type=int, default=20_000, help="distinct setscene names in the fleet")
    ap.add_argument("--hit", type=float, default=0.2)
    ap.add_argument("--equivalent", type=float, default=0.1)
    ap.add_argument("--upload-rate", type=float, default=10.0, help="PUTs/s (20-400 KB each)")
    ap.add_argument("--report-rate", type=float, default=100.0, help="OEHASHEQUIV reports/s in all")
    ap.add_argument("--reporters", type=int, default=8, help="OEHASHEQUIV connections (half tcp, half ws)")
    ap.add_argument("--objects", type=int, default=3000)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes for the builders")
    ap.add_argument("--target-p99-ms", type=float, default=50.0)
    ap.add_argument("--markdown", type=Path, help="append the result table to this file")
    args = ap.parse_args(argv)

    rng = random.Random(16)
    with tempfile.TemporaryDirectory(prefix="load-test-") as d:
        work = Path(d)
        svc = Service(work / "svc", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                      args=["--workers", str(args.workers), "--hashserv-bind", f"127.0.0.1:{free_port()}"],
                      config={"server": {"log_level": "INFO", "access_log": True}})
        tcp = svc.args[-1]
        corpus = make_corpus(svc.storage, n=args.objects, seed=16, equiv_fraction=0.3)
        load_before = os.getloadavg()
        with svc:
            asyncio.run(report_equivalences(tcp, corpus))
            probes = make_probes(corpus, rng, args.names, args.hit, args.equivalent)
            assert svc.proc is not None
            pids = service_pids(svc.proc.pid)
            groups = [list(range(args.builders))[i::args.procs] for i in range(args.procs)]
            t_start = time.monotonic() + 3.0 + args.builders * args.connections / 2000  # connections open first
            t_end = t_start + args.duration
            pressure_before = cpu_pressure()
            cpu_svc0 = cpu_seconds(pids)
            cpu_main0 = time.process_time()
            with concurrent.futures.ProcessPoolExecutor(args.procs) as pool:
                futs = [pool.submit(run_builders, svc.port, probes, g, args.connections, args.builder_rate,
                                    t_start, t_end) for g in groups if g]
                uploads, reports = SideResult(), SideResult()
                conns = [0]

                async def count_mid_run() -> None:
                    await asyncio.sleep(max(0.0, (t_start + t_end) / 2 - time.monotonic()))
                    conns[0] = await asyncio.to_thread(count_connections, svc.port)

                async def side() -> None:
                    addresses = [tcp if i % 2 == 0 else f"ws://127.0.0.1:{svc.port}/ws"
                                 for i in range(args.reporters)]
                    await asyncio.gather(
                        count_mid_run(),
                        _uploads(svc.port, args.upload_rate, t_start, t_end, uploads),
                        *(_reports(a, args.report_rate / args.reporters, t_start, t_end, 100 + i, reports)
                          for i, a in enumerate(addresses)))

                asyncio.run(side())
                results = [f.result() for f in futs]
            wall = time.monotonic() - t_start
            cpu_svc = cpu_seconds(pids) - cpu_svc0
            cpu_main = time.process_time() - cpu_main0
            alive = svc.proc.poll() is None
            pressure_after = cpu_pressure()
        inside = service_head_times(svc.log_path)
        return summarize(args, results, uploads, reports, wall, cpu_svc, cpu_main, alive, load_before,
                         conns[0], inside, (pressure_before, pressure_after))


def summarize(args, results: list[BuilderResult], uploads: SideResult, reports: SideResult, wall: float,
              cpu_svc: float, cpu_main: float, alive: bool, load_before: tuple[float, float, float],
              conns: int, inside: list[float], pressure: tuple[str, str]) -> int:
    lat: dict[str, list[float]] = {}
    errors: Counter = Counter()
    statuses: Counter = Counter()
    lag: list[float] = []
    behind = 0
    for r in results:
        behind += r.behind
        for k, v in r.latencies.items():
            lat.setdefault(k, []).extend(v)
        errors.update(r.errors)
        statuses.update(r.statuses)
        lag.extend(r.lag)
    every = [x for v in lat.values() for x in v]
    p50, p99, mx = percentile(every, 50), percentile(every, 99), max(every, default=float("nan"))
    cpu_gen = sum(r.cpu_s for r in results) + cpu_main
    errors.update(uploads.errors)
    errors.update(reports.errors)
    ok = not errors and p99 * 1000 < args.target_p99_ms and alive
    lines = [
        f"command: python bench/load_test.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {machine()} (1/5/15-min load before: {' '.join(f'{x:.2f}' for x in load_before)})",
        f"service: sstate-proxy serve --workers {args.workers}, SQLite, local store, access log on; "
        f"generator: {args.procs} process(es) for the builders + 1 for uploads/reports",
        f"fleet: {args.builders} builders x {args.connections} keep-alive connections "
        f"({conns} connections to the HTTP port established mid-run, uploads' and ws reporters' included), {args.builder_rate:g} HEAD/s per builder (Poisson), "
        f"{args.names} distinct names ({args.hit:.0%} hits, {args.equivalent:.0%} equivalents, rest misses, "
        f"each miss asked twice); {args.duration:g} s",
        "",
        "| | count | rate /s | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
        f"| HEAD, all | {len(every)} | {len(every) / wall:.0f} | {ms(p50)} | {ms(p99)} | {ms(mx)} |",
    ]
    for k in ("hit", "equivalent", "miss"):
        v = lat.get(k, [])
        lines.append(f"| HEAD, {k} | {len(v)} | {len(v) / wall:.0f} | {ms(percentile(v, 50))} | "
                     f"{ms(percentile(v, 99))} | {ms(max(v, default=float('nan')))} |")
    for name, side in (("PUT (20-400 KB)", uploads), ("OEHASHEQUIV report", reports)):
        v = side.latencies
        lines.append(f"| {name} | {len(v)} | {len(v) / wall:.0f} | {ms(percentile(v, 50))} | "
                     f"{ms(percentile(v, 99))} | {ms(max(v, default=float('nan')))} |")
    lines += [
        "",
        f"HEAD statuses: {dict(sorted(statuses.items()))}; errors: {dict(errors) or 'none'}",
        f"CPU over {wall:.1f} s: service {cpu_svc:.1f} s ({cpu_svc / wall:.0%} of one core), load generator "
        f"{cpu_gen:.1f} s ({cpu_gen / wall:.0%}); generator wake-up lag p99 {ms(percentile(lag, 99))} ms, "
        f"max {ms(max(lag, default=0.0))} ms; checks due while the previous one was unanswered: {behind}",
        f"inside the service (access log, every HEAD incl. the connections' first): p50 "
        f"{ms(percentile(inside, 50))} ms, p99 {ms(percentile(inside, 99))} ms, max {ms(max(inside, default=0.0))} ms",
        f"machine CPU pressure (PSI 'some', share of time runnable tasks waited for a CPU): before the run "
        f"{pressure[0]}, at its end {pressure[1]}",
        f"verdict: {'PASS' if ok else 'FAIL'} (target: HEAD p99 < {args.target_p99_ms:g} ms, zero errors)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    print(json.dumps({"head_p50_ms": p50 * 1000, "head_p99_ms": p99 * 1000, "head_max_ms": mx * 1000,
                      "heads": len(every), "errors": sum(errors.values()), "connections": conns}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
