"""Hash-equivalence benchmark: sstate-proxy side by side with bitbake's own bitbake-hashserv.

For each transport (tcp, ws, unix) it starts, on loopback, one bitbake-hashserv (its SQLite
engine, run by ``--ref-python``) and one sstate-proxy (``python -m proxy.cli serve`` from this
repo, 1 worker, run by ``--python``), each with its own database and the same anonymous
permissions (bitbake's default ``@read,@report,@db-admin``; ``@db-admin`` lets a round remove
its rows). Then, for each round, it runs the phases below against every server through
bitbake's own client library (``hashserv.create_client``) and ``bitbake-hashclient stress``,
in a fresh client process per server, and finally prints per phase the median over the rounds
for each server and the ratio sstate-proxy / bitbake-hashserv per transport (>= 1.0 means
sstate-proxy is faster).

Phases (N = ``--n``): connect (connect + handshake + ping, connections/s); ping; report (N
sequential reports, every 4th reuses the previous task's outhash, so a quarter take the
equivalence path); get, one per round trip; get batch and exists batch (pipelined, N + N/10
misses); get all=True (JSON); report-equiv; get over 8 async connections in one loop;
``bitbake-hashclient stress`` (10 threads x 200 requests after priming 200 hashes). Every
answer is checked; a wrong answer is counted and printed.

Order (ABBA): within a round each bitbake-hashserv runs right next to the sstate-proxy of the
same transport, and which of the two goes first alternates from pair to pair and from round to
round, so a slow spell of a shared machine does not land on one side only. The median of the
per-round ratios of each pair is printed too.

``--prefill ROWS`` first builds one SQLite file with bitbake's schema (created by bitbake's own
``hashserv.sqlite`` engine) holding ROWS distinct reports, in one transaction, and gives every
server a copy of it (each server adapts its copy to its own indexes when it opens it, before
any timing): the phases, ``report`` above all, then run on a database of realistic size.

    BITBAKE_DIR=DIR PYTHON=python REF_PYTHON=REFVENV/bin/python \\
        python bench/hashserv_bench.py [--rounds 7] [--transports tcp,ws,unix] [--prefill 1000000]

``PYTHON`` needs sstate-proxy's dependencies and ``websockets``; ``REF_PYTHON`` needs
``websockets`` (bitbake-hashserv's ws face). Both run bitbake's code from ``BITBAKE_DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANON_PERMS = "@read,@report,@db-admin"
KINDS = ("tcp", "ws", "unix")
PREFILL_METHOD = "bench.prefill"


# --------------------------------------------------------------------------------------------
# client side: one process per server and round (``--client``)
# --------------------------------------------------------------------------------------------

def h(*parts: object) -> str:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()


def run_client(label: str, addr: str, out: Path, n: int, conns: int, s_clients: int, s_requests: int) -> None:
    """Runs every phase against ``addr`` and appends one JSON line to ``out``."""
    bitbake = os.environ["BITBAKE_DIR"]
    sys.path.insert(0, os.path.join(bitbake, "lib"))
    import hashserv

    run_id = uuid.uuid4().hex[:12]
    method = f"bench.{run_id}"
    tasks: list[tuple[str, str, str, str]] = []  # taskhash, outhash, offered unihash, expected unihash
    for i in range(n):
        th, uh = h(run_id, "task", i), h(run_id, "uni", i)
        if i % 4 == 3:  # same output as the previous task: the server answers its unihash
            tasks.append((th, tasks[-1][1], uh, tasks[-1][3]))
        else:
            tasks.append((th, h(run_id, "out", i), uh, uh))
    phases: dict[str, dict] = {}

    def record(name: str, ops: int, secs: float, unit: str = "ops/s", wrong: int = 0) -> None:
        phases[name] = {"rate": ops / secs, "unit": unit, "wrong": wrong}
        print(f"  [{label}] {name:28} {ops / secs:10.0f} {unit}" + (f"  {wrong} WRONG" if wrong else ""),
              flush=True)

    client = hashserv.create_client(addr)

    def p_connect() -> None:
        k = max(10, min(100, n // 20))
        t = time.perf_counter()
        for _ in range(k):
            with hashserv.create_client(addr) as c:
                c.ping()
        record("connect", k, time.perf_counter() - t, "conn/s")

    def p_ping() -> None:
        client.ping()
        t = time.perf_counter()
        for _ in range(n):
            client.ping()
        record("ping", n, time.perf_counter() - t)

    def p_report() -> None:
        t = time.perf_counter()
        wrong = sum(client.report_unihash(th, method, oh, uh)["unihash"] != exp for th, oh, uh, exp in tasks)
        record("report", n, time.perf_counter() - t, wrong=wrong)

    def p_get() -> None:
        t = time.perf_counter()
        wrong = sum(client.get_unihash(method, th) != exp for th, _, _, exp in tasks)
        record("get", n, time.perf_counter() - t, wrong=wrong)

    def p_get_batch() -> None:
        q = [(method, th) for th, *_ in tasks] + [(method, h(run_id, "missing", i)) for i in range(n // 10)]
        expected = [exp for *_, exp in tasks] + [None] * (n // 10)
        t = time.perf_counter()
        got = client.get_unihash_batch(q)
        secs = time.perf_counter() - t
        record("get batch", len(q), secs, wrong=sum(a != b for a, b in zip(got, expected, strict=False))
               + abs(len(got) - len(expected)))

    def p_exists_batch() -> None:
        q = [exp for *_, exp in tasks] + [h(run_id, "nouni", i) for i in range(n // 10)]
        expected = [True] * n + [False] * (n // 10)
        t = time.perf_counter()
        got = client.unihash_exists_batch(q)
        secs = time.perf_counter() - t
        record("exists batch", len(q), secs, wrong=sum(a != b for a, b in zip(got, expected, strict=False))
               + abs(len(got) - len(expected)))

    def p_get_all() -> None:
        k = min(n, 1000)
        t = time.perf_counter()
        wrong = 0
        for th, _, _, exp in tasks[:k]:
            r = client.get_taskhash(method, th, True)
            wrong += not r or r.get("unihash") != exp or r.get("taskhash") != th
        record("get all=True", k, time.perf_counter() - t, wrong=wrong)

    def p_report_equiv() -> None:
        k = min(n, 500)
        t = time.perf_counter()
        wrong = 0
        for i in range(k):
            uh = h(run_id, "equiv-uni", i)
            r = client.report_unihash_equiv(h(run_id, "equiv-task", i), method, uh)
            wrong += not r or r.get("unihash") != uh
        record("report-equiv", k, time.perf_counter() - t, wrong=wrong)

    def p_async_conns() -> None:
        async def worker(chunk: list[tuple[str, str]]) -> int:
            c = await hashserv.create_async_client(addr)
            try:
                return sum([await c.get_unihash(method, th) != exp for th, exp in chunk])
            finally:
                await c.close()

        async def main() -> tuple[float, int]:
            items = [(th, exp) for th, _, _, exp in tasks]
            t = time.perf_counter()
            wrong = await asyncio.gather(*(worker(items[i::conns]) for i in range(conns)))
            return time.perf_counter() - t, sum(wrong)

        box: list = []
        # its own thread and loop: the synchronous client keeps its loop in this thread
        th = threading.Thread(target=lambda: box.append(asyncio.run(main())))
        th.start()
        th.join()
        secs, wrong = box[0]
        record(f"get x{conns} conns", n, secs, wrong=wrong)

    def p_stress() -> None:
        cmd = [sys.executable, os.path.join(bitbake, "bin", "bitbake-hashclient"), "--no-netrc", "--address", addr,
               "stress", "--requests", str(s_requests), "--taskhash-seed", f"bench-{run_id}"]
        # prime: every lookup misses, then --report inserts the hashes the timed run finds
        subprocess.run(cmd + ["--clients", "1", "--report"], check=True, capture_output=True, timeout=900)
        p = subprocess.run(cmd + ["--clients", str(s_clients)], check=True, capture_output=True, text=True,
                           timeout=900)
        rate = float(re.search(r"Total request rate:\s+([\d.]+)", p.stdout).group(1))
        total = int(re.search(r"Number of requests:\s+(\d+)", p.stdout).group(1))
        found = int(re.search(r"Hashes found:\s+(\d+)", p.stdout).group(1))
        record("stress", total, total / rate, "req/s", wrong=total - found)

    steps = [p_connect, p_ping, p_report, p_get, p_get_batch, p_exists_batch, p_get_all, p_report_equiv,
             p_async_conns] + ([p_stress] if s_clients > 0 else [])
    errors = []
    for step in steps:
        try:
            step()
        except Exception as e:  # keep going with the other phases; the error is reported
            errors.append(f"{step.__name__[2:]}: {type(e).__name__}: {e}")
            print(f"  [{label}] {step.__name__[2:]} ERROR {type(e).__name__}: {e}", flush=True)
    try:  # keep the database at its starting size from round to round
        client.remove({"method": method})
        client.remove({"method": "stress.test.method"})
    except Exception as e:
        errors.append(f"cleanup: {type(e).__name__}: {e}")
    client.close()
    with open(out, "a") as f:
        f.write(json.dumps({"label": label, "phases": phases, "errors": errors}) + "\n")


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    label: str  # ref-tcp, proxy-ws, ...
    addr: str  # what bitbake's client connects to
    proc: subprocess.Popen
    log: Path

    def cpu_seconds(self) -> float:
        """user + system CPU of the server and its live descendants (the proxy's workers)."""
        tick = os.sysconf("SC_CLK_TCK")
        total, todo = 0.0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except (OSError, IndexError, ValueError):
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_server(label: str, work: Path, python: str, bitbake: Path, db: Path) -> Server:
    side, kind = label.split("-")
    port = free_port()
    sock = work / f"{label}.sock"
    log = work / f"{label}.log"
    env = dict(os.environ)
    if side == "ref":
        bind = {"tcp": f"127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "unix": f"unix://{sock}"}[kind]
        cmd = [python, str(bitbake / "bin" / "bitbake-hashserv"), "--bind", bind, "--database", str(db),
               "--anon-perms", ANON_PERMS, "--log", "WARNING"]
        addr = bind
    else:
        http = free_port()
        cmd = [python, "-m", "proxy.cli", "serve", "--bind", f"127.0.0.1:{http}", "--storage",
               str(work / f"{label}-storage"), "--database", f"sqlite:///{db}", "--anon-perms", ANON_PERMS,
               "--workers", "1", "--log-level", "WARNING"]
        addr = {"tcp": f"127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{http}/ws", "unix": f"unix://{sock}"}[kind]
        if kind != "ws":
            cmd += ["--hashserv-bind", addr]
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            start_new_session=True)
    return Server(label, addr, proc, log)


def wait_ready(server: Server, python: str, bitbake: Path, timeout: float) -> None:
    """Until bitbake's client gets a ping answered (a prefilled database takes a while to open)."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import hashserv\n"
             "with hashserv.create_client(sys.argv[2]) as c: c.ping()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        r = subprocess.run([python, "-c", probe, str(bitbake / "lib"), server.addr], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.25)
    raise RuntimeError(f"{server.label} at {server.addr} did not answer; its log:\n"
                       + server.log.read_text(errors="replace")[-3000:])


def prefill(path: Path, rows: int, python: str, bitbake: Path) -> None:
    """One SQLite file with bitbake's schema and ``rows`` reports (every 4th one equivalent to
    the one before it, as in the report phase), written in one transaction."""
    create = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); import hashserv.sqlite as s\n"
              "asyncio.run(s.DatabaseEngine(sys.argv[2], True).create())")
    subprocess.run([python, "-c", create, str(bitbake / "lib"), str(path)], check=True)
    conn = sqlite3.connect(path, isolation_level=None)
    # a throw-away build: no rollback journal, no fsync, the indexes' pages held in memory
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    created = "2026-01-01T00:00:00+00:00"

    def unihash_rows():
        uni = ""
        for i in range(rows):
            if i % 4 != 3:
                uni = h("prefill-uni", i)
            yield PREFILL_METHOD, h("prefill-task", i), uni, ""

    def outhash_rows():
        out = ""
        for i in range(rows):
            if i % 4 != 3:
                out = h("prefill-out", i)
            yield PREFILL_METHOD, h("prefill-task", i), out, created, None, "pn", "1.0", "r0", "do_x", None

    conn.execute("BEGIN")
    conn.executemany("INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, ?)",
                     unihash_rows())
    conn.executemany("INSERT INTO outhashes_v2 (method, taskhash, outhash, created, owner, PN, PV, PR, task, "
                     "outhash_siginfo) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", outhash_rows())
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")  # what both servers run with
    conn.close()


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------

def machine(python: str, ref_python: str) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    ver = "import sys, sqlite3; print(sys.version.split()[0], 'sqlite', sqlite3.sqlite_version)"
    return (f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}; "
            f"proxy/client Python {subprocess.run([python, '-c', ver], capture_output=True, text=True).stdout.strip()}; "
            f"reference Python {subprocess.run([ref_python, '-c', ver], capture_output=True, text=True).stdout.strip()}")


def summarize(results: Path, cpu: dict[str, list[float]], kinds: list[str]) -> int:
    per_round: dict[str, dict[str, list[float]]] = {}
    wrong: set[tuple[str, str]] = set()
    errors: list[str] = []
    phases: list[str] = []
    for line in results.read_text().splitlines():
        d = json.loads(line)
        for p, v in d["phases"].items():
            per_round.setdefault(d["label"], {}).setdefault(p, []).append(v["rate"])
            if p not in phases:
                phases.append(p)
            if v["wrong"]:
                wrong.add((d["label"], p))
        errors += [f"{d['label']} {e}" for e in d["errors"]]
    labels = [f"{side}-{k}" for side in ("ref", "proxy") for k in kinds]

    def med(label: str, p: str) -> float | None:
        v = per_round.get(label, {}).get(p)
        return statistics.median(v) if v else None

    rounds = max((len(v) for d in per_round.values() for v in d.values()), default=0)
    print(f"\nmedian of {rounds} round(s); ops/s (connect: connections/s; stress: requests/s)")
    print("| phase | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for p in phases:
        print(f"| {p} | " + " | ".join(f"{m:.0f}" if (m := med(lb, p)) else "-" for lb in labels) + " |")
    print("| server CPU s per round | " + " | ".join(
        f"{statistics.median(cpu[lb]):.2f}" if cpu.get(lb) else "-" for lb in labels) + " |")

    print("\nratio sstate-proxy / bitbake-hashserv: of the medians, and [median of the per-round ratios]")
    print("| phase | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for p in phases:
        cells = []
        for k in kinds:
            a, b = med(f"proxy-{k}", p), med(f"ref-{k}", p)
            pairs = [x / y for x, y in zip(per_round.get(f"proxy-{k}", {}).get(p, []),
                                           per_round.get(f"ref-{k}", {}).get(p, []), strict=False) if y]
            cells.append(f"{a / b:.2f}x [{statistics.median(pairs):.2f}x]" if a and b and pairs else "-")
        print(f"| {p} | " + " | ".join(cells) + " |")
    print("wrong answers:", ", ".join(f"{lb} {p}" for lb, p in sorted(wrong)) or "none")
    for e in errors:
        print("error:", e)
    return 1 if wrong or errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--bitbake-dir", type=Path, default=os.environ.get("BITBAKE_DIR"),
                    help="extracted bitbake tree (default $BITBAKE_DIR)")
    ap.add_argument("--python", default=os.environ.get("PYTHON", sys.executable),
                    help="runs sstate-proxy and the clients (default $PYTHON, else this interpreter)")
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON"),
                    help="runs bitbake-hashserv (default $REF_PYTHON, else --python)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--transports", default=",".join(KINDS), help="comma-separated subset of tcp,ws,unix")
    ap.add_argument("--n", type=int, default=2000, help="operations per phase (default 2000)")
    ap.add_argument("--conns", type=int, default=8, help="connections of the async get phase")
    ap.add_argument("--stress-clients", type=int, default=10, help="0 skips the stress phase")
    ap.add_argument("--stress-requests", type=int, default=200)
    ap.add_argument("--prefill", type=int, default=0, metavar="ROWS",
                    help="start every server on a copy of a database holding ROWS reports")
    ap.add_argument("--json", type=Path, help="also keep the per-round results (JSON lines) here")
    ap.add_argument("--client", nargs=3, metavar=("LABEL", "ADDR", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.client:
        run_client(a.client[0], a.client[1], Path(a.client[2]), a.n, a.conns, a.stress_clients, a.stress_requests)
        return 0
    if not a.bitbake_dir or not (a.bitbake_dir / "lib" / "hashserv" / "client.py").exists():
        ap.error("set BITBAKE_DIR (or --bitbake-dir) to an extracted bitbake tree")
    bitbake = a.bitbake_dir.resolve()
    ref_python = a.ref_python or a.python
    kinds = [k for k in a.transports.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error("--transports: a comma-separated subset of tcp,ws,unix")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # -> SystemExit, so the servers are stopped
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    work = Path(tempfile.mkdtemp(prefix="hashserv-bench-"))
    servers: dict[str, Server] = {}
    env = {**os.environ, "BITBAKE_DIR": str(bitbake)}
    try:
        print(f"machine: {machine(a.python, ref_python)}")
        template = None
        if a.prefill:
            template = work / "prefill.db"
            t = time.monotonic()
            prefill(template, a.prefill, a.python, bitbake)
            print(f"prefilled {a.prefill} rows in {time.monotonic() - t:.0f}s "
                  f"({template.stat().st_size / 1e6:.0f} MB)", flush=True)
        for side in ("ref", "proxy"):
            for k in kinds:
                label = f"{side}-{k}"
                db = work / f"{label}.db"
                if template is not None:
                    shutil.copyfile(template, db)
                servers[label] = start_server(label, work, ref_python if side == "ref" else a.python, bitbake, db)
        if template is not None:
            template.unlink()  # every server has its copy
        for s in servers.values():
            wait_ready(s, a.python, bitbake, timeout=600 if a.prefill else 30)
            print(f"  {s.label}: {s.addr} (pid {s.proc.pid})", flush=True)
        results = work / "results.jsonl"
        cpu: dict[str, list[float]] = {}
        client_args = ["--n", str(a.n), "--conns", str(a.conns), "--stress-clients", str(a.stress_clients),
                       "--stress-requests", str(a.stress_requests)]
        for rnd in range(1, a.rounds + 1):
            print(f"=== round {rnd}/{a.rounds} (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
            for i, k in enumerate(kinds):
                pair = [f"ref-{k}", f"proxy-{k}"]
                if (rnd + i) % 2 == 0:
                    pair.reverse()
                for label in pair:
                    s = servers[label]
                    c0 = s.cpu_seconds()
                    subprocess.run([a.python, __file__, *client_args, "--client", label, s.addr, str(results)],
                                   env=env, check=False, timeout=3600)
                    cpu.setdefault(label, []).append(s.cpu_seconds() - c0)
        if a.json:
            with open(a.json, "a") as f:
                f.write(results.read_text())
        return summarize(results, cpu, kinds)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
