"""A database that is locked or slow: another process holds SQLite's write lock
(``BEGIN IMMEDIATE`` in its own sqlite3 connection, as a bitbake-hashserv or an operator's
shell on the same file would).

Verdict:

* held past the service's wait bound (``BUSY_TIMEOUT_S`` of storage/equivalence/sqlite.py):
  a report over /v1/equivalent gets 503 with ``Retry-After`` after a bounded wait (neither at
  once nor hanging), over OEHASHEQUIV an invoke-error saying the database is locked; reads
  (lookups, object HEAD/GET, /healthz) are answered at once meanwhile;
* held for less than the bound (a slow database): the report waits, then succeeds;
* lock released: reports succeed again without a restart; the database is consistent.

    python -m bench.faults.db_locked [--slow-s 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import bb.asyncrpc

from bench.faults.common import (
    ADMIN,
    ADMIN_ENV,
    METHOD,
    Service,
    Verdict,
    call,
    free_port,
    integrity,
    obj_key,
    path_of,
    script,
)
from storage.equivalence.sqlite import BUSY_TIMEOUT_S
from tests.hashserv_client import connect

# Another process: takes the write lock, says so, holds it until its stdin closes.
HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
con.execute("ROLLBACK")
"""


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        yield p
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)


def report(port: int, taskhash: str) -> tuple[int, float, dict[str, str], bytes]:
    body = json.dumps({"taskhash": taskhash, "method": METHOD, "outhash": taskhash[::-1],
                       "unihash": taskhash}).encode()
    a = call(port, "POST", "/v1/equivalent", body, auth=True, headers={"Content-Type": "application/json"})
    return a.status, a.seconds, a.headers, a.body


async def hashserv_report(address: str, taskhash: str) -> tuple[str, float]:
    client = await connect(address, *ADMIN, timeout=BUSY_TIMEOUT_S * 3)
    t0 = time.monotonic()
    try:
        reply = await client.report_unihash(taskhash, METHOD, taskhash[::-1], taskhash)
        return f"reply {reply['unihash'][:12]}", time.monotonic() - t0
    except bb.asyncrpc.InvokeError as e:
        return f"invoke-error {e}", time.monotonic() - t0
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def run(workdir: Path, args: argparse.Namespace) -> Verdict:
    bound = BUSY_TIMEOUT_S
    v = Verdict(f"database locked by another process (SQLite, wait bound {bound:g}s) or slow")
    rng = random.Random(args.seed)
    tcp = f"127.0.0.1:{free_port()}"
    svc = Service(workdir, env=ADMIN_ENV, args=["--hashserv-bind", tcp])
    with svc:
        known = rng.randbytes(32).hex()
        v.check(report(svc.port, known)[0] == 200, "a report before the lock failed")
        key, body = obj_key(rng), rng.randbytes(4096)
        v.check(call(svc.port, "PUT", path_of(key), body, auth=True).status == 201, "PUT failed")

        with write_lock(svc.database), concurrent.futures.ThreadPoolExecutor(1) as pool:
            # both faces at once: they wait on the same lock
            over_tcp = pool.submit(asyncio.run, hashserv_report(tcp, rng.randbytes(32).hex()))
            status, took, headers, text = report(svc.port, rng.randbytes(32).hex())
            v.note(f"locked: /v1/equivalent report {status} after {took:.2f}s")
            v.check(status == 503 and bool(headers.get("retry-after")),
                    f"locked: report answered {status} {text[:100]!r}, not 503 + Retry-After")
            v.check(bound * 0.8 <= took <= bound + 3, f"locked: the report waited {took:.2f}s, bound {bound:g}s")
            said, took = over_tcp.result()
            v.note(f"locked: OEHASHEQUIV report: {said[:90]} after {took:.2f}s")
            v.check(said.startswith("invoke-error") and "locked" in said and took <= bound + 3,
                    f"locked: OEHASHEQUIV report: {said} after {took:.2f}s")
            reads = [call(svc.port, "GET", "/v1/equivalent?" + urlencode({"method": METHOD, "taskhash": known})),
                     call(svc.port, "HEAD", path_of(key)), call(svc.port, "GET", path_of(key)),
                     call(svc.port, "GET", "/healthz")]
            v.check(all(a.status == 200 for a in reads), f"locked: reads answered {[a.status for a in reads]}")
            slowest = max(a.seconds for a in reads)
            v.check(slowest < 0.5, f"locked: a read waited {slowest:.2f}s")
            v.note(f"locked: lookup, HEAD, GET, /healthz all 200, slowest {slowest * 1000:.0f} ms")

        with write_lock(svc.database) as holder:
            # a slow database: the lock goes away before the bound; the report waits, then succeeds
            assert holder.stdin is not None
            threading.Timer(args.slow_s, holder.stdin.close).start()  # the holder rolls back
            status, took, _, _ = report(svc.port, rng.randbytes(32).hex())
        v.note(f"slow (lock held {args.slow_s:g}s): report {status} after {took:.2f}s")
        v.check(status == 200 and took < bound, f"slow: report answered {status} after {took:.2f}s")

        status, took, _, _ = report(svc.port, rng.randbytes(32).hex())
        v.check(status == 200, f"after the lock: report answered {status} (no restart)")
        said, _ = asyncio.run(hashserv_report(tcp, rng.randbytes(32).hex()))
        v.check(said.startswith("reply"), f"after the lock: OEHASHEQUIV report: {said}")
    v.check(integrity(svc.database) == "ok", f"integrity_check: {integrity(svc.database)}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slow-s", type=float, default=1.5, help="how long the 'slow' lock is held")
    p.add_argument("--seed", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    return script(run, parser(), "fault-db-", argv)


if __name__ == "__main__":
    sys.exit(main())
