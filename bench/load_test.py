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
The builders run in ``--procs`` processes of their own (``HeadConnection``: asyncio streams and
h11, one keep-alive connection per fetcher thread), the uploads and reports (aiohttp) in
this one; the CPU time of the service and of the load generator are printed, and how late the
generator sent its requests (if that lag grows, the generator, not the service, is the limit).

Verdict: every HEAD answered as expected (hit 200, equivalent 200 + ``X-Sstate-Source:
equivalent``, miss 404), no upload or report failed, HEAD p99 < ``--target-p99-ms`` (50).

    python bench/load_test.py [--builders 20] [--connections 50] [--builder-rate 70]
                              [--duration 30] [--workers 2] [--procs 2] [--objects 3000]
                              [--nginx] [--markdown FILE]

``--nginx`` first runs the same HEAD storm against Debian's nginx on the same directory with the
same worker count (no uploads, reports or rewrites; equivalents are misses there): the floor
this machine and this generator set, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
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
import h11

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import make_corpus  # noqa: E402
from tests.hashserv_client import connect  # noqa: E402
from tests.service import Service, free_port  # noqa: E402

ADMIN = ("admin", "load-test-admin-token")
METHOD = "oe.sstatesig.OEOuthashBasic"
WARM_UPLOADS = 8  # uploads before the storm (not measured): see _uploads


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


class HeadConnection:
    """One fetcher thread's cached keep-alive connection, sending HEADs one after another.

    Light on purpose: the generator shares the service's CPUs, and aiohttp's client spent more
    CPU per HEAD than the service did, which made the generator, not the service, set the tail
    (a builder's own client runs on the builder's machine). asyncio streams carry the bytes and
    h11 (a sans-I/O HTTP/1.1 library) frames the requests and parses the answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.http = h11.Connection(h11.CLIENT)

    async def head(self, path: str) -> tuple[int, str]:
        """(status, X-Sstate-Source) of ``HEAD path``; raises OSError or h11's errors."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.http = h11.Connection(h11.CLIENT)
        assert self.reader is not None
        try:
            self.writer.write(self.http.send(h11.Request(method="HEAD", target=path, headers=[("Host", self.host)])))
            self.writer.write(self.http.send(h11.EndOfMessage()))
            response = None
            while True:
                event = self.http.next_event()
                if event is h11.NEED_DATA:
                    data = await self.reader.read(65536)
                    if not data:
                        raise ConnectionResetError("the server closed the connection")
                    self.http.receive_data(data)
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.EndOfMessage):
                    break
        except BaseException:
            self.close()
            raise
        assert response is not None
        if self.http.our_state is h11.MUST_CLOSE:
            self.close()
        else:
            self.http.start_next_cycle()
        source = next((v.decode() for k, v in response.headers if k == b"x-sstate-source"), "")
        return response.status_code, source

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _builder(port: int, probes: list[Probe], n_conn: int, rate: float, t_start: float,
                   t_end: float, seed: int, out: BuilderResult, rewrites: bool) -> None:
    """One builder's checks; ``rewrites``: the server answers equivalents (nginx cannot: 404)."""
    rng = random.Random(seed)
    order = probes[:]
    rng.shuffle(order)
    it = itertools.cycle(order)
    per_conn = rate / n_conn

    async def head(conn: HeadConnection, probe: Probe, record: bool = True) -> int:
        t0 = time.monotonic()
        try:
            status, source = await conn.head(probe.path)
        except (OSError, h11.ProtocolError) as e:
            out.errors[f"{probe.kind}: {type(e).__name__}"] += 1
            return -1
        if record:
            out.latencies.setdefault(probe.kind, []).append(time.monotonic() - t0)
        out.statuses[status] += 1
        want = 404 if probe.kind == "miss" or (probe.kind == "equivalent" and not rewrites) else 200
        if status != want or (probe.kind == "equivalent" and rewrites and source != "equivalent"):
            out.errors[f"{probe.kind}: {status} {source}"] += 1
        return status

    async def thread(k: int) -> None:
        conn = HeadConnection(port)
        try:
            # Open the connection first (its first HEAD, not measured), the fleet's 1,000
            # spread over the ramp before t_start rather than all in one instant.
            await asyncio.sleep(rng.uniform(0, max(0.0, t_start - time.monotonic() - 1.0)))
            await head(conn, next(it), record=False)
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
                if await head(conn, probe) == 404:
                    await head(conn, probe)  # bitbake retries a miss once
                due += rng.expovariate(per_conn)
        finally:
            conn.close()

    await asyncio.gather(*(thread(k) for k in range(n_conn)))


def count_connections(port: int) -> int:
    """Established connections to ``port`` from this host (the client ends, from ``ss``)."""
    r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                       capture_output=True, text=True)
    return len([line for line in r.stdout.splitlines() if line.strip()]) if r.returncode == 0 else -1


def run_builders(port: int, probes: list[Probe], builders: list[int], n_conn: int, rate: float,
                 t_start: float, t_end: float, rewrites: bool = True) -> BuilderResult:
    """One generator process: ``builders`` (their seeds) sharing one event loop."""
    out = BuilderResult()
    cpu0 = time.process_time()

    async def main() -> None:
        await asyncio.gather(*(_builder(port, probes, n_conn, rate, t_start, t_end, b, out, rewrites)
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
    async def one(session: aiohttp.ClientSession, record: bool = True) -> None:
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
        if record:
            out.latencies.append(time.monotonic() - t0)

    if rate > 0:
        # Before the storm, a few uploads on new connections (so every worker gets some): a
        # worker starts its archive-identity process at its first archive, once in its life;
        # the storm measures the steady state, not that start.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as warm:
            for _ in range(WARM_UPLOADS):
                await one(warm, record=False)
    async with aiohttp.ClientSession() as session:
        await _paced(lambda: one(session), rate, t_start, t_end, rng)


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
            f"aiohttp {aiohttp.__version__}")


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


@dataclass
class Storm:
    """One storm's measurements, against one server."""

    server: str
    builders: list[BuilderResult]
    uploads: SideResult
    reports: SideResult
    wall: float
    cpu_server: float
    cpu_generator: float
    connections: int
    pressure: tuple[str, str]
    alive: bool = True

    def heads(self) -> dict[str, list[float]]:
        lat: dict[str, list[float]] = {}
        for r in self.builders:
            for k, v in r.latencies.items():
                lat.setdefault(k, []).extend(v)
        return lat

    def errors(self) -> Counter:
        errors: Counter = Counter()
        for r in self.builders:
            errors.update(r.errors)
        errors.update(self.uploads.errors)
        errors.update(self.reports.errors)
        return errors


def storm(args: argparse.Namespace, server: str, port: int, pids: list[int], probes: list[Probe],
          rewrites: bool, side_load: tuple[str, str] | None) -> Storm:
    """The fleet's HEAD storm against ``port`` for ``--duration`` seconds; with ``side_load``
    (hashserv tcp address, ws URL) the uploads and reports run meanwhile."""
    groups = [g for g in (list(range(args.builders))[i::args.procs] for i in range(args.procs)) if g]
    t_start = time.monotonic() + 3.0 + args.builders * args.connections / 2000  # connections open first
    t_end = t_start + args.duration
    pressure_before = cpu_pressure()
    cpu_server0 = cpu_seconds(pids)
    cpu_main0 = time.process_time()
    uploads, reports = SideResult(), SideResult()
    conns = [0]
    with concurrent.futures.ProcessPoolExecutor(len(groups)) as pool:
        futs = [pool.submit(run_builders, port, probes, g, args.connections, args.builder_rate,
                            t_start, t_end, rewrites) for g in groups]

        async def count_mid_run() -> None:
            await asyncio.sleep(max(0.0, (t_start + t_end) / 2 - time.monotonic()))
            conns[0] = await asyncio.to_thread(count_connections, port)

        async def side() -> None:
            jobs = [count_mid_run()]
            if side_load is not None:
                tcp, ws = side_load
                jobs.append(_uploads(port, args.upload_rate, t_start, t_end, uploads))
                jobs += [_reports(tcp if i % 2 == 0 else ws, args.report_rate / args.reporters,
                                  t_start, t_end, 100 + i, reports) for i in range(args.reporters)]
            await asyncio.gather(*jobs)

        asyncio.run(side())
        results = [f.result() for f in futs]
    wall = time.monotonic() - t_start
    return Storm(server, results, uploads, reports, wall, cpu_seconds(pids) - cpu_server0,
                 sum(r.cpu_s for r in results) + time.process_time() - cpu_main0, conns[0],
                 (pressure_before, cpu_pressure()))


def start_nginx(d: Path, root: Path, workers: int) -> tuple[subprocess.Popen, int]:
    """Debian's nginx on the same directory, as bench/serve_bench.py runs it (enough
    worker_connections for the fleet)."""
    from bench.serve_bench import NGINX_CONF

    port = free_port()
    (d / "nginx-tmp").mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, d=d, port=port, root=root)
                    .replace("worker_connections 1024", "worker_connections 4096"))
    proc = subprocess.Popen(["nginx", "-p", str(d), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=open(d / "nginx-stderr.log", "ab"), start_new_session=True)
    deadline = time.monotonic() + 10
    while count_listening(port) == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start: {(d / 'nginx-stderr.log').read_text()}")
        time.sleep(0.05)
    return proc, port


def count_listening(port: int) -> int:
    r = subprocess.run(["ss", "-Htln", f"( sport = :{port} )"], capture_output=True, text=True)
    return len(r.stdout.splitlines())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builders", type=int, default=20)
    ap.add_argument("--connections", type=int, default=50, help="keep-alive connections per builder")
    ap.add_argument("--builder-rate", type=float, default=70.0, help="HEAD/s per builder")
    ap.add_argument("--names", type=int, default=20_000, help="distinct setscene names in the fleet")
    ap.add_argument("--hit", type=float, default=0.2)
    ap.add_argument("--equivalent", type=float, default=0.1)
    ap.add_argument("--upload-rate", type=float, default=10.0, help="PUTs/s (20-400 KB each)")
    ap.add_argument("--no-dedup", action="store_true",
                    help="serve with [storage] dedup = false (no archive identity for uploads)")
    ap.add_argument("--report-rate", type=float, default=100.0, help="OEHASHEQUIV reports/s in all")
    ap.add_argument("--reporters", type=int, default=8, help="OEHASHEQUIV connections (half tcp, half ws)")
    ap.add_argument("--objects", type=int, default=3000)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes for the builders")
    ap.add_argument("--nginx", action="store_true",
                    help="first the same HEAD storm against nginx on the same directory and worker "
                         "count (no uploads, reports or rewrites): the machine's and generator's floor")
    ap.add_argument("--target-p99-ms", type=float, default=50.0)
    ap.add_argument("--markdown", type=Path, help="append the result to this file")
    args = ap.parse_args(argv)

    rng = random.Random(16)
    load_before = os.getloadavg()
    storms: list[Storm] = []
    with tempfile.TemporaryDirectory(prefix="load-test-") as d:
        work = Path(d)
        work.chmod(0o755)  # nginx's workers (another user) read the corpus below it
        svc = Service(work / "svc", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                      args=["--workers", str(args.workers), "--hashserv-bind", f"127.0.0.1:{free_port()}"],
                      config={"server": {"log_level": "INFO", "access_log": True},
                              "storage": {"dedup": not args.no_dedup}})
        tcp = svc.args[-1]
        corpus = make_corpus(svc.storage, n=args.objects, seed=16, equiv_fraction=0.3)
        probes = make_probes(corpus, rng, args.names, args.hit, args.equivalent)
        if args.nginx:
            nginx, nport = start_nginx(work, svc.storage, args.workers)
            try:
                storms.append(storm(args, "nginx", nport, service_pids(nginx.pid),
                                    probes, rewrites=False, side_load=None))
            finally:
                nginx.terminate()
                nginx.wait(10)
        with svc:
            asyncio.run(report_equivalences(tcp, corpus))
            assert svc.proc is not None
            run = storm(args, "sstate-proxy", svc.port, service_pids(svc.proc.pid), probes, rewrites=True,
                        side_load=(tcp, f"ws://127.0.0.1:{svc.port}/ws"))
            run.alive = svc.proc.poll() is None
            storms.append(run)
        inside = service_head_times(svc.log_path)
    return summarize(args, storms, inside, load_before)


def row(name: str, v: list[float], wall: float) -> str:
    return (f"| {name} | {len(v)} | {len(v) / wall:.0f} | {ms(percentile(v, 50))} | {ms(percentile(v, 99))} | "
            f"{ms(max(v, default=float('nan')))} |")


def summarize(args: argparse.Namespace, storms: list[Storm], inside: list[float],
              load_before: tuple[float, float, float]) -> int:
    proxy = storms[-1]
    lines = [
        f"command: python bench/load_test.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {machine()} (1/5/15-min load before: {' '.join(f'{x:.2f}' for x in load_before)})",
        f"servers: sstate-proxy serve --workers {args.workers} (SQLite, local store, access log on)"
        + (f", nginx worker_processes {args.workers} on the same directory (first)" if len(storms) > 1 else "")
        + f"; generator: {args.procs} process(es) for the builders + 1 for uploads/reports",
        f"fleet: {args.builders} builders x {args.connections} keep-alive connections, {args.builder_rate:g} HEAD "
        f"checks/s per builder (Poisson), {args.names} distinct names ({args.hit:.0%} hits, "
        f"{args.equivalent:.0%} equivalents, rest misses, each miss asked twice); {args.duration:g} s each; "
        f"sstate-proxy also takes {args.upload_rate:g} PUT/s and {args.report_rate:g} OEHASHEQUIV reports/s "
        f"({args.reporters} connections, half tcp, half ws)",
        "",
        "| server, request | count | rate /s | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for st in storms:
        lat = st.heads()
        lines.append(row(f"{st.server}: HEAD, all", [x for v in lat.values() for x in v], st.wall))
        for k in ("hit", "equivalent", "miss"):
            lines.append(row(f"{st.server}: HEAD, {k}", lat.get(k, []), st.wall))
    lines.append(row("sstate-proxy: PUT (20-400 KB)", proxy.uploads.latencies, proxy.wall))
    lines.append(row("sstate-proxy: OEHASHEQUIV report", proxy.reports.latencies, proxy.wall))
    lines.append("")
    for st in storms:
        statuses: Counter = Counter()
        lag: list[float] = []
        for r in st.builders:
            statuses.update(r.statuses)
            lag.extend(r.lag)
        behind = sum(r.behind for r in st.builders)
        lines += [
            f"{st.server}: {st.connections} connections established mid-run; HEAD statuses "
            f"{dict(sorted(statuses.items()))}; errors {dict(st.errors()) or 'none'}",
            f"{st.server}: CPU over {st.wall:.1f} s: server {st.cpu_server:.1f} s ({st.cpu_server / st.wall:.0%} of "
            f"one core), load generator {st.cpu_generator:.1f} s ({st.cpu_generator / st.wall:.0%}); generator "
            f"wake-up lag p99 {ms(percentile(lag, 99))} ms, max {ms(max(lag, default=0.0))} ms; checks due while "
            f"the previous one was unanswered: {behind}; CPU pressure (PSI some) before {st.pressure[0]}, "
            f"after {st.pressure[1]}",
        ]
    lines.append(f"sstate-proxy, inside the service (access log, every HEAD incl. the connections' first): "
                 f"p50 {ms(percentile(inside, 50))} ms, p99 {ms(percentile(inside, 99))} ms, "
                 f"max {ms(max(inside, default=0.0))} ms")
    every = [x for v in proxy.heads().values() for x in v]
    p99 = percentile(every, 99)
    ok = not proxy.errors() and p99 * 1000 < args.target_p99_ms and proxy.alive
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'} (sstate-proxy HEAD p99 {ms(p99)} ms, target < "
                 f"{args.target_p99_ms:g} ms; {sum(proxy.errors().values())} errors, target 0)")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
