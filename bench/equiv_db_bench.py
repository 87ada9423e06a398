"""Benchmark of the embedded equivalence database (storage/equivalence/sqlite.py).

Builds a bitbake-hashserv-schema SQLite file with N unihash rows and N outhash rows (classes of
CLASS taskhashes sharing one unihash and one outhash), then measures, through the public async
API, the latency of `get_unihash`, `get_unihash_full`, `class_of` and `generation` (and, for
comparison, of the same lookup behind a hop to a thread), and the rate of `insert_report`: one
caller at a time (a commit each) and 16 / 64 concurrent callers (group commit).

    python bench/equiv_db_bench.py [-n 1000000] [--lookups 20000] [--db PATH] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.equivalence.sqlite import SqliteEquivalenceDB, utc_iso  # noqa: E402

METHOD = "oe.sstatesig.OEOuthashBasic"
CLASS = 4


def hx(kind: str, i: int) -> str:
    return hashlib.sha256(f"{kind}{i}".encode()).hexdigest()


def build(path: str, n: int, chunk: int = 200_000) -> float:
    """Fill a file whose schema the service has created (raw inserts: fast, no durability)."""
    t0 = time.perf_counter()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -1000000")
    created = utc_iso()
    for start in range(0, n, chunk):
        rng = range(start, min(n, start + chunk))
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, '')",
            ((METHOD, hx("t", i), hx("u", i // CLASS)) for i in rng),
        )
        con.executemany(
            "INSERT INTO outhashes_v2 (method, taskhash, outhash, created, owner, PN, task) "
            "VALUES (?, ?, ?, ?, 'bench', 'pkg', 'do_package')",
            ((METHOD, hx("t", i), hx("o", i // CLASS), created) for i in rng),
        )
        con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return time.perf_counter() - t0


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


async def timed(fn, keys) -> list[float]:
    out = []
    for k in keys:
        t = time.perf_counter_ns()
        await fn(k)
        out.append((time.perf_counter_ns() - t) / 1000.0)
    return out


async def run(args: argparse.Namespace) -> None:
    tmp = None
    path = args.db
    if path is None:
        tmp = tempfile.mkdtemp(prefix="equivbench-")
        path = os.path.join(tmp, "hashserv.db")
    if not os.path.exists(path) or args.rebuild:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        await SqliteEquivalenceDB(path).close()  # schema, indexes, WAL
        secs = build(path, args.n)
        print(f"built {args.n:,} unihash + {args.n:,} outhash rows in {secs:.1f} s "
              f"({os.path.getsize(path) / 1e6:.0f} MB)")
    db = SqliteEquivalenceDB(path)
    rnd = random.Random(42)
    hits = [hx("t", rnd.randrange(args.n)) for _ in range(args.lookups)]
    misses = [hx("miss", i) for i in range(args.lookups)]
    unis = [hx("u", rnd.randrange(args.n // CLASS)) for _ in range(args.lookups)]

    rows: list[tuple[str, list[float]]] = []
    await timed(lambda k: db.get_unihash(METHOD, k), hits[:2000])  # warm the page cache
    rows.append(("get_unihash (hit)", await timed(lambda k: db.get_unihash(METHOD, k), hits)))
    rows.append(("get_unihash (miss)", await timed(lambda k: db.get_unihash(METHOD, k), misses)))
    rows.append(("get_unihash_full (hit)", await timed(lambda k: db.get_unihash_full(METHOD, k), hits)))
    rows.append(("unihash_exists (hit)", await timed(db.unihash_exists, unis)))
    rows.append(("class_of taskhash, methods=(M,)", await timed(lambda k: db.class_of(k, (METHOD,), 8), hits)))
    rows.append(("class_of taskhash, methods=()", await timed(lambda k: db.class_of(k, (), 8), hits)))
    rows.append(("class_of unihash, methods=()", await timed(lambda k: db.class_of(k, (), 8), unis)))
    rows.append(("class_of miss", await timed(lambda k: db.class_of(k, (), 8), misses)))
    rows.append(("generation", await timed(lambda _k: db.generation(), hits)))

    def in_thread(k: str):
        return asyncio.to_thread(lambda: db._conn.execute(  # the same query, one thread hop away
            "SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (METHOD, k)).fetchall())

    rows.append(("get_unihash (hit) via to_thread", await timed(in_thread, hits)))

    # Reports: half new classes, half equivalent to an existing outhash.
    reports = []
    for i in range(args.reports):
        out = hx("o", rnd.randrange(args.n // CLASS)) if i % 2 else hx("newo", i)
        reports.append({"method": METHOD, "taskhash": hx("newt", i), "outhash": out, "owner": "bench",
                        "PN": "pkg", "task": "do_package"})
    t0 = time.perf_counter()
    lat = await timed(lambda r: db.insert_report(r, r["taskhash"]), reports)
    rate = args.reports / (time.perf_counter() - t0)
    rows.append(("insert_report (1 caller)", lat))
    # The same with concurrent callers (what a busy server sees): group commit.
    crates = {}
    for width in (16, 64):
        conc = [dict(r, taskhash=hx(f"conc{width}t", i)) for i, r in enumerate(reports)]
        t0 = time.perf_counter()
        for i in range(0, len(conc), width):
            await asyncio.gather(*(db.insert_report(r, r["taskhash"]) for r in conc[i:i + width]))
        crates[width] = len(conc) / (time.perf_counter() - t0)

    print(f"\nN = {args.n:,} rows, {args.lookups:,} lookups per row below, latency in microseconds")
    print(f"{'operation':34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>9} {'mean':>8}")
    for name, s in rows:
        print(f"{name:34} {pct(s, .5):8.1f} {pct(s, .9):8.1f} {pct(s, .99):8.1f} {max(s):9.1f} "
              f"{statistics.fmean(s):8.1f}")
    print(f"\ninsert_report: {rate:,.0f} reports/s one caller at a time ({args.reports:,} reports, "
          "1 commit each); " + "; ".join(f"{r:,.0f} reports/s with {w} concurrent callers"
                                         for w, r in crates.items()) + " (group commit)")
    await db.close()
    if tmp and not args.keep:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    elif tmp:
        print(f"kept {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1_000_000, help="rows per table (default 1,000,000)")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--reports", type=int, default=20_000)
    ap.add_argument("--db", help="database file (reused if it exists; default: a temp dir)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild --db even if it exists")
    ap.add_argument("--keep", action="store_true", help="keep the temporary database")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
