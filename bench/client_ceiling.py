"""How fast can bitbake's own client go? The ceiling of the client-bound hashserv phases.

Several phases of ``hashserv_bench.sh`` (``get-stream x8 conns``, ``hashclient stress``) are
bound by bitbake's client, not by the server.
This measures the same workloads against three servers, in alternating order:

* ``null``: the cheapest OEHASHEQUIV server asyncio can run: a dict, no database, no
  permissions, one ``Protocol`` (below; it answers only what these workloads send), on the
  proxy's busy-polling event loop (``proxy/busypoll.py``, 200 us);
* ``ref``: bitbake-hashserv 2.19 (``$BITBAKE_DIR/bin/bitbake-hashserv``);
* ``proxy``: ``sstate-proxy serve --workers 1``.

``null / ref`` is the most any server could gain over the reference in that phase on this
machine; ``proxy / ref`` is what sstate-proxy gains. Usage:

    BITBAKE_DIR=... python bench/client_ceiling.py [--rounds 7] [--n 2000] [--transport unix|tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- the null server (run as a child process: python client_ceiling.py --null ADDR) ----------
class NullServer(asyncio.Protocol):
    """Handshake, ping, report (first writer wins) and get-stream, from a dict."""

    table: dict[tuple[str, str], str] = {}

    def connection_made(self, transport):  # type: ignore[override]
        self.t = transport
        self.buf = b""
        self.lines_seen = 0
        self.stream = False

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for raw in lines:
            line = raw.decode()
            self.lines_seen += 1
            if self.lines_seen == 1 or (not self.stream and not line.startswith("{")):
                continue  # "OEHASHEQUIV 1.1", then the (empty) header block
            if self.stream:
                if line == "END":
                    self.stream = False
                    out.append("ok\n")
                else:
                    method, taskhash = line.split()
                    out.append(self.table.get((method, taskhash), "") + "\n")
                continue
            msg = json.loads(line)
            if "get-stream" in msg:
                self.stream = True
                out.append('"ok"\n')
            elif "report" in msg:
                r = msg["report"]
                uh = self.table.setdefault((r["method"], r["taskhash"]), r["unihash"])
                out.append(json.dumps({"taskhash": r["taskhash"], "method": r["method"], "unihash": uh}) + "\n")
            elif "remove" in msg:
                out.append(json.dumps({"count": 0}) + "\n")
            else:
                out.append(json.dumps({"alive": True}) + "\n")
        if out:
            self.t.write("".join(out).encode())


async def serve_null(addr: str) -> None:
    loop = asyncio.get_running_loop()
    if addr.startswith("unix://"):
        await loop.create_unix_server(NullServer, addr[len("unix://"):])
    else:
        host, port = addr.rsplit(":", 1)
        await loop.create_server(NullServer, host, int(port))
    await asyncio.Event().wait()


# --- workloads -----------------------------------------------------------------------------
def h(*parts) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def workloads(hashserv, addr: str, n: int, conns: int, bitbake: str) -> dict[str, float]:
    """ops/s of: ping, get-stream 1 per round trip, get-stream over `conns` connections, and
    `bitbake-hashclient stress` (10 threads x 200 lookups, after priming them, as the harness)."""
    run = uuid.uuid4().hex[:8]
    method = f"ceiling.{run}"
    tasks = [(h(run, "t", i), h(run, "u", i)) for i in range(n)]
    out = {}
    with hashserv.create_client(addr) as c:
        for th, uh in tasks:
            c.report_unihash(th, method, h(run, "o", th), uh)
        t = time.perf_counter()
        for _ in range(n):
            c.ping()
        out["ping (sequential)"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for th, uh in tasks:
            assert c.get_unihash(method, th) == uh
        out["get-stream, 1 per round trip"] = n / (time.perf_counter() - t)

        async def worker(chunk):
            cl = await hashserv.create_async_client(addr)
            try:
                for th, uh in chunk:
                    assert await cl.get_unihash(method, th) == uh
            finally:
                await cl.close()

        async def concurrent() -> float:
            t = time.perf_counter()
            await asyncio.gather(*(worker(tasks[i::conns]) for i in range(conns)))
            return n / (time.perf_counter() - t)

        loop = asyncio.new_event_loop()
        try:
            out[f"get-stream x{conns} conns (1 loop)"] = loop.run_until_complete(concurrent())
        finally:
            loop.close()
            asyncio.set_event_loop(c.loop)
        c.remove({"method": method})
    cmd = [sys.executable, f"{bitbake}/bin/bitbake-hashclient", "--no-netrc", "--address", addr, "stress",
           "--taskhash-seed", f"ceiling-{run}", "--requests", "200"]
    subprocess.run(cmd + ["--clients", "1", "--report"], check=True, capture_output=True, timeout=600)
    p = subprocess.run(cmd + ["--clients", "10"], check=True, capture_output=True, text=True, timeout=600)
    # (over unix, bitbake's client sometimes loses a thread to a chdir race: count what ran)
    found = re.search(r"Hashes found:\s+(\d+)", p.stdout)
    ran = re.search(r"Number of requests:\s+(\d+)", p.stdout)
    assert found and ran and found.group(1) == ran.group(1), p.stdout
    out["hashclient stress 10x200 thr"] = float(re.search(r"Total request rate:\s+([\d.]+)", p.stdout).group(1))
    return out


def free_addr(transport: str, work: str, name: str) -> str:
    if transport == "unix":
        return f"unix://{work}/{name}.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--null", metavar="ADDR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.null:
        sys.path.insert(0, str(REPO))
        from proxy import busypoll  # the same polling as the proxy's default, or the null
        # server would lose to the proxy on wake-ups alone (BENCHMARKS.md §3)

        with asyncio.Runner(loop_factory=busypoll.loop_factory(200)) as runner:
            runner.run(serve_null(args.null))
        return 0
    bitbake = os.environ.get("BITBAKE_DIR")
    if not bitbake or not Path(bitbake, "lib", "hashserv").is_dir():
        ap.error("set BITBAKE_DIR to an extracted bitbake tree")
    sys.path.insert(0, os.path.join(bitbake, "lib"))
    import hashserv

    work = tempfile.mkdtemp(prefix="client-ceiling.")
    addrs = {k: free_addr(args.transport, work, k) for k in ("null", "ref", "proxy")}
    anon = "@read,@report,@db-admin"
    cmds = {
        "null": [sys.executable, __file__, "--null", addrs["null"]],
        "ref": [sys.executable, f"{bitbake}/bin/bitbake-hashserv", "--bind", addrs["ref"],
                "--database", f"{work}/ref.db", "--log", "WARNING"],
        "proxy": [sys.executable, "-m", "proxy.cli", "serve", "--bind", free_addr("tcp", work, "http"),
                  "--hashserv-bind", addrs["proxy"], "--database", f"sqlite:///{work}/proxy.db",
                  "--storage", f"{work}/cache", "--anon-perms", anon, "--workers", "1",
                  "--log-level", "WARNING"],
    }
    procs = {k: subprocess.Popen(cmd, cwd=REPO) for k, cmd in cmds.items()}
    try:
        for k, addr in addrs.items():
            for _ in range(80):
                try:
                    with hashserv.create_client(addr) as c:
                        c.ping()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(0.25)
            else:
                raise SystemExit(f"{k} did not start")
        results: dict[str, dict[str, list[float]]] = {k: {} for k in addrs}
        order = list(addrs)
        for r in range(args.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                for phase, rate in workloads(hashserv, addrs[k], args.n, args.conns, bitbake).items():
                    results[k].setdefault(phase, []).append(rate)
        print(f"{args.transport}, median of {args.rounds} rounds (ops/s), N={args.n}, {os.cpu_count()} cpus")
        print("| phase | null | ref | proxy | null / ref (ceiling) | proxy / ref |")
        print("|---|---:|---:|---:|---:|---:|")
        for phase in results["ref"]:
            m = {k: statistics.median(results[k][phase]) for k in addrs}
            print(f"| {phase} | {m['null']:.0f} | {m['ref']:.0f} | {m['proxy']:.0f} | "
                  f"{m['null'] / m['ref']:.2f}x | {m['proxy'] / m['ref']:.2f}x |")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
