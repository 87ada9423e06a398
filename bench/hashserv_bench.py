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

``--postgres``: the same on PostgreSQL. One throwaway cluster (tests/pg.py's ``PgCluster``:
initdb + pg_ctl in a temp dir, on a free loopback port, trust auth; as root the server runs as
``postgres`` through ``runuser``) with PostgreSQL's own durability defaults (fsync,
synchronous_commit and full_page_writes on, unlike the tests) and ``max_connections`` 400
(bitbake-hashserv's asyncpg engine opens one connection per client). Each server gets its own
database on it: bitbake-hashserv ``--database postgresql+asyncpg://postgres@127.0.0.1:PORT/ref_tcp``
(its SQLAlchemy engine), sstate-proxy ``--database postgresql://postgres@127.0.0.1:PORT/proxy_tcp``.
With ``--prefill``, bitbake's own ``hashserv.sqlalchemy`` engine creates its schema in a template
database, ``INSERT ... SELECT generate_series`` fills it with the same rows as the SQLite
prefill, ``VACUUM (FREEZE, ANALYZE)`` settles it (no autovacuum during the rounds), and every
server's database is a ``CREATE DATABASE ... TEMPLATE`` copy of it. The stress phase then runs
with 10 and with 100 clients (``--stress-clients 10,100``), and the tables have a row for the
CPU seconds of the PostgreSQL cluster (postmaster and every backend) during each server's run.

    BITBAKE_DIR=DIR PYTHON=python REF_PYTHON=REFVENV/bin/python \\
        python bench/hashserv_bench.py [--rounds 7] [--transports tcp,ws,unix] [--prefill 1000000] [--postgres]

``PYTHON`` needs sstate-proxy's dependencies and ``websockets``; ``REF_PYTHON`` needs
``websockets`` (bitbake-hashserv's ws face), and for ``--postgres`` SQLAlchemy and asyncpg.
Both run bitbake's code from ``BITBAKE_DIR``. ``--postgres`` needs the PostgreSQL server
binaries (Debian's ``postgresql`` package) and pytest (tests/pg.py is imported).
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


def run_client(label: str, addr: str, out: Path, n: int, conns: int, s_clients: list[int], s_requests: int) -> None:
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

    def stress(clients: int, name: str) -> None:
        cmd = [sys.executable, os.path.join(bitbake, "bin", "bitbake-hashclient"), "--no-netrc", "--address", addr,
               "stress", "--requests", str(s_requests), "--taskhash-seed", f"bench-{run_id}-{clients}"]
        # prime: every lookup misses, then --report inserts the hashes the timed run finds
        subprocess.run(cmd + ["--clients", "1", "--report"], check=True, capture_output=True, timeout=900)
        p = subprocess.run(cmd + ["--clients", str(clients)], check=True, capture_output=True, text=True,
                           timeout=900)
        rate = float(re.search(r"Total request rate:\s+([\d.]+)", p.stdout).group(1))
        total = int(re.search(r"Number of requests:\s+(\d+)", p.stdout).group(1))
        found = int(re.search(r"Hashes found:\s+(\d+)", p.stdout).group(1))
        record(name, total, total / rate, "req/s", wrong=total - found)

    def stress_step(clients: int):
        name = "stress" if len(s_clients) == 1 else f"stress x{clients}"

        def p_stress() -> None:
            stress(clients, name)
        p_stress.__name__ = f"p_{name}"  # for the error lines
        return p_stress

    steps = [p_connect, p_ping, p_report, p_get, p_get_batch, p_exists_batch, p_get_all, p_report_equiv,
             p_async_conns] + [stress_step(c) for c in s_clients if c > 0]
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


def tree_cpu(root: int, reaped: bool = False) -> float:
    """user + system CPU seconds of ``root`` and its live descendants; ``reaped``: also of the
    children they have already waited for (PostgreSQL's exited backends)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15 if reaped else 13]) / tick
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Server:
    label: str  # ref-tcp, proxy-ws, ...
    addr: str  # what bitbake's client connects to
    proc: subprocess.Popen
    log: Path

    def cpu_seconds(self) -> float:
        """user + system CPU of the server and its live descendants (the proxy's workers)."""
        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_server(label: str, work: Path, python: str, bitbake: Path, database: str) -> Server:
    """``database``: a path or bitbake's SQLAlchemy URL for bitbake-hashserv, a URL for sstate-proxy."""
    side, kind = label.split("-")
    port = free_port()
    sock = work / f"{label}.sock"
    log = work / f"{label}.log"
    env = dict(os.environ)
    if side == "ref":
        bind = {"tcp": f"127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "unix": f"unix://{sock}"}[kind]
        cmd = [python, str(bitbake / "bin" / "bitbake-hashserv"), "--bind", bind, "--database", database,
               "--anon-perms", ANON_PERMS, "--log", "WARNING"]
        addr = bind
    else:
        http = free_port()
        cmd = [python, "-m", "proxy.cli", "serve", "--bind", f"127.0.0.1:{http}", "--storage",
               str(work / f"{label}-storage"), "--database", database, "--anon-perms", ANON_PERMS,
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
# PostgreSQL (--postgres)
# --------------------------------------------------------------------------------------------

# on top of tests/pg.py's options (the last of a name wins): PostgreSQL's durability defaults
# back, and room for bitbake-hashserv's connection per client (stress: 100) and the proxy's pool
PG_OPTIONS = "-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c max_connections=400"
PG_TEMPLATE = "bench_template"
PG_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "max_connections", "shared_buffers")


def start_postgres():
    """tests/pg.py's throwaway cluster, with PG_OPTIONS."""
    sys.path.insert(0, str(REPO))
    from tests.pg import PgCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        sys.exit("--postgres: no PostgreSQL server binaries (initdb, pg_ctl, postgres): "
                 "install Debian's postgresql package")
    return PgCluster(bindir, options=PG_OPTIONS)


def ref_url(cluster, dbname: str) -> str:
    """bitbake-hashserv's spelling: its SQLAlchemy engine with asyncpg."""
    return f"postgresql+asyncpg://{cluster.user}@{cluster.host}:{cluster.port}/{dbname}"


def pg_prefill(cluster, rows: int, python: str, bitbake: Path) -> None:
    """Database PG_TEMPLATE: bitbake's schema (created by its ``hashserv.sqlalchemy`` engine) and
    the rows of ``prefill`` (the same hashes, computed by the server), frozen and analysed."""
    cluster.psql(f"CREATE DATABASE {PG_TEMPLATE}")
    create = ("import asyncio, sys; sys.path.insert(0, sys.argv[1]); import hashserv.sqlalchemy as s\n"
              "asyncio.run(s.DatabaseEngine(sys.argv[2]).create())")
    subprocess.run([python, "-c", create, str(bitbake / "lib"), ref_url(cluster, PG_TEMPLATE)], check=True)

    def sha(prefix: str, i: str) -> str:  # h(prefix, i)
        return f"encode(sha256(convert_to('{prefix}/' || ({i}), 'UTF8')), 'hex')"

    prev = "i - (i % 4 = 3)::int"  # every 4th row has the previous row's unihash and outhash
    series = f"FROM generate_series(0, {rows - 1}) AS i"
    cluster.psql(  # one transaction
        f"INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) "
        f"SELECT '{PREFILL_METHOD}', {sha('prefill-task', 'i')}, {sha('prefill-uni', prev)}, '' {series}; "
        f'INSERT INTO outhashes_v2 (method, taskhash, outhash, created, owner, "PN", "PV", "PR", task, '
        f"outhash_siginfo) SELECT '{PREFILL_METHOD}', {sha('prefill-task', 'i')}, {sha('prefill-out', prev)}, "
        f"'2026-01-01 00:00:00', NULL, 'pn', '1.0', 'r0', 'do_x', NULL {series}", PG_TEMPLATE)
    # hint bits, visibility map and statistics now, so no autovacuum runs during the rounds
    cluster.psql("VACUUM (FREEZE, ANALYZE)", PG_TEMPLATE)


def pg_create(cluster, dbname: str, from_template: bool) -> None:
    sql = f"CREATE DATABASE {dbname}"
    if from_template:
        sql += f" TEMPLATE {PG_TEMPLATE}"
        if int(cluster.psql("SHOW server_version_num")) >= 150000:
            sql += " STRATEGY file_copy"  # not the whole database through the WAL
    cluster.psql(sql)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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


def summarize(results: Path, cpu: dict[str, list[float]], kinds: list[str],
              pg_cpu: dict[str, list[float]] | None = None) -> int:
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
    if pg_cpu:
        print("| PostgreSQL CPU s per round | " + " | ".join(
            f"{statistics.median(pg_cpu[lb]):.2f}" if pg_cpu.get(lb) else "-" for lb in labels) + " |")

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
    ap.add_argument("--stress-clients", metavar="N[,N...]",
                    help="clients of the stress phase, one phase per value (default 10; with --postgres "
                         "10,100); 0 skips it")
    ap.add_argument("--stress-requests", type=int, default=200)
    ap.add_argument("--prefill", type=int, default=0, metavar="ROWS",
                    help="start every server on a copy of a database holding ROWS reports")
    ap.add_argument("--postgres", action="store_true",
                    help="every server on its own database of one throwaway PostgreSQL cluster")
    ap.add_argument("--json", type=Path, help="also keep the per-round results (JSON lines) here")
    ap.add_argument("--client", nargs=3, metavar=("LABEL", "ADDR", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        stress_clients = [int(c) for c in (a.stress_clients or ("10,100" if a.postgres else "10")).split(",")]
    except ValueError:
        ap.error("--stress-clients: comma-separated numbers")
    if a.client:
        run_client(a.client[0], a.client[1], Path(a.client[2]), a.n, a.conns, stress_clients, a.stress_requests)
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
    cluster = None
    env = {**os.environ, "BITBAKE_DIR": str(bitbake)}
    try:
        print(f"machine: {machine(a.python, ref_python)}")
        if a.postgres:
            cluster = start_postgres()
            shown = cluster.psql("SELECT string_agg(name || '=' || current_setting(name), ' ') FROM unnest("
                                 f"ARRAY{list(PG_SETTINGS)}) AS name").strip()
            print(f"PostgreSQL {cluster.psql('SHOW server_version').strip()} on {cluster.host}:{cluster.port} "
                  f"({shown})", flush=True)
        template = None
        if a.prefill:
            t = time.monotonic()
            if cluster is not None:
                pg_prefill(cluster, a.prefill, ref_python, bitbake)
                size = int(cluster.psql(f"SELECT pg_database_size('{PG_TEMPLATE}')"))
            else:
                template = work / "prefill.db"
                prefill(template, a.prefill, a.python, bitbake)
                size = template.stat().st_size
            print(f"prefilled {a.prefill} rows in {time.monotonic() - t:.0f}s ({size / 1e6:.0f} MB)", flush=True)
        for side in ("ref", "proxy"):
            for k in kinds:
                label = f"{side}-{k}"
                if cluster is not None:
                    dbname = label.replace("-", "_")
                    pg_create(cluster, dbname, bool(a.prefill))
                    database = ref_url(cluster, dbname) if side == "ref" else cluster.url(dbname)
                else:
                    db = work / f"{label}.db"
                    if template is not None:
                        shutil.copyfile(template, db)
                    database = str(db) if side == "ref" else f"sqlite:///{db}"
                servers[label] = start_server(label, work, ref_python if side == "ref" else a.python, bitbake,
                                              database)
        if template is not None:
            template.unlink()  # every server has its copy
        if cluster is not None and a.prefill:
            print(f"PostgreSQL cluster with every copy: {du(cluster.data) / 1e6:.0f} MB on disk", flush=True)
            cluster.psql(f"DROP DATABASE {PG_TEMPLATE}")
        for s in servers.values():
            wait_ready(s, a.python, bitbake, timeout=600 if a.prefill else 30)
            print(f"  {s.label}: {s.addr} (pid {s.proc.pid})", flush=True)
        results = work / "results.jsonl"
        cpu: dict[str, list[float]] = {}
        pg_cpu: dict[str, list[float]] = {}
        pg_pid = int((cluster.data / "postmaster.pid").read_text().split()[0]) if cluster is not None else 0
        client_args = ["--n", str(a.n), "--conns", str(a.conns), "--stress-clients",
                       ",".join(map(str, stress_clients)), "--stress-requests", str(a.stress_requests)]
        for rnd in range(1, a.rounds + 1):
            print(f"=== round {rnd}/{a.rounds} (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
            for i, k in enumerate(kinds):
                pair = [f"ref-{k}", f"proxy-{k}"]
                if (rnd + i) % 2 == 0:
                    pair.reverse()
                for label in pair:
                    s = servers[label]
                    c0, p0 = s.cpu_seconds(), tree_cpu(pg_pid, reaped=True) if pg_pid else 0.0
                    subprocess.run([a.python, __file__, *client_args, "--client", label, s.addr, str(results)],
                                   env=env, check=False, timeout=3600)
                    cpu.setdefault(label, []).append(s.cpu_seconds() - c0)
                    if pg_pid:
                        pg_cpu.setdefault(label, []).append(tree_cpu(pg_pid, reaped=True) - p0)
        if a.json:
            with open(a.json, "a") as f:
                f.write(results.read_text())
        return summarize(results, cpu, kinds, pg_cpu)
    finally:
        for s in servers.values():
            s.stop()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
