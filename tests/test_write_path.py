"""The equivalence database's one write path: group commit, durability, never blocking the loop."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage.equivalence import DatabaseUnavailable
from storage.equivalence.sqlite import SqliteEquivalenceDB

ROOT = Path(__file__).resolve().parents[1]
M = "TestMethod"


def h(n: int | str) -> str:
    return f"{n}".encode().hex().ljust(64, "0")[:64]


def unihash_rows(path: str) -> dict[str, set[str]]:
    con = sqlite3.connect(path)
    try:
        rows: dict[str, set[str]] = {}
        for taskhash, unihash in con.execute("SELECT taskhash, unihash FROM unihashes_v3"):
            rows.setdefault(taskhash, set()).add(unihash)
        return rows
    finally:
        con.close()


class Holder:
    """Another connection (as another process would) holding the write lock for a while."""

    def __init__(self, path: str, hold_s: float) -> None:
        self.path = path
        self.hold_s = hold_s
        self.locked = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            self.locked.set()
            time.sleep(self.hold_s)
            con.execute("COMMIT")
        finally:
            con.close()

    def __enter__(self) -> Holder:
        self.thread.start()
        assert self.locked.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join()


async def test_concurrent_reports_from_tasks_one_unihash_per_taskhash(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path)
    try:
        # 20 taskhashes, each reported 10 times concurrently with different unihashes
        reports = [({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"o{i}{j}")}, h(f"u{i}-{j}"))
                   for j in range(10) for i in range(20)]
        got = await asyncio.gather(*(db.insert_report(r, u) for r, u in reports))
        answered: dict[str, set[str]] = {}
        for r in got:
            answered.setdefault(r["taskhash"], set()).add(r["unihash"])
        assert all(len(v) == 1 for v in answered.values()) and len(answered) == 20
        stored = unihash_rows(path)
        assert {t: u for t, u in stored.items()} == answered
    finally:
        await db.close()


REPORTER = textwrap.dedent("""
    import asyncio, json, sys
    from storage.equivalence.sqlite import SqliteEquivalenceDB
    def h(n):
        return f"{n}".encode().hex().ljust(64, "0")[:64]
    async def main(path, tag):
        db = SqliteEquivalenceDB(path)
        out = await asyncio.gather(*(
            db.insert_report({"method": "m", "taskhash": h(f"t{i % 50}"), "outhash": h(f"o{tag}{i}")},
                             h(f"u{tag}{i}"))
            for i in range(300)))
        await db.close()
        print(json.dumps({r["taskhash"]: r["unihash"] for r in out}))
    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_two_processes_on_one_file_one_unihash_per_taskhash(tmp_path: Path):
    import json

    path = str(tmp_path / "db")
    SqliteEquivalenceDB(path)  # create the schema before the race
    procs = [subprocess.Popen([sys.executable, "-c", REPORTER, path, tag], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for tag in ("a", "b")]
    answers = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    stored = unihash_rows(path)
    assert len(stored) == 50 and all(len(v) == 1 for v in stored.values())
    for ans in answers:  # every answer is the stored unihash (first writer wins across processes)
        assert {t: {u} for t, u in ans.items()} == stored


DIE_AFTER_ANSWER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from storage.equivalence.sqlite import SqliteEquivalenceDB
    async def main(path):
        db = SqliteEquivalenceDB(path)
        r = await db.insert_report({"method": "m", "taskhash": "t" * 64, "outhash": "o" * 64}, "u" * 64)
        print(r["unihash"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no cleanup
    asyncio.run(main(sys.argv[1]))
""")


def test_a_report_is_durable_once_answered(tmp_path: Path):
    path = str(tmp_path / "db")
    p = subprocess.run([sys.executable, "-c", DIE_AFTER_ANSWER, path], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.strip() == "u" * 64

    async def reopen() -> dict | None:
        db = SqliteEquivalenceDB(path)
        try:
            return await db.get_unihash("m", "t" * 64)
        finally:
            await db.close()

    assert asyncio.run(reopen()) == {"taskhash": "t" * 64, "method": "m", "unihash": "u" * 64}


async def test_the_loop_runs_while_another_process_holds_the_write_lock(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path)
    try:
        gaps: list[float] = []
        stop = False

        async def ticker() -> None:
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with Holder(path, 1.0):
            start = time.monotonic()
            r = await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
            waited = time.monotonic() - start
            # reads are answered meanwhile (WAL: readers never wait for writers)
        stop = True
        await tick
        assert r["unihash"] == h("u")
        assert waited >= 0.8  # the write did wait for the lock...
        assert max(gaps) < 0.2, max(gaps)  # ...but never on the event loop
        assert len(gaps) > 50
    finally:
        await db.close()


async def test_reads_are_answered_while_the_lock_is_held(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path)
    try:
        await db.insert_unihash(M, h("t"), h("u"))
        with Holder(path, 0.5):
            start = time.monotonic()
            assert (await db.get_unihash(M, h("t")))["unihash"] == h("u")
            assert await db.class_of(h("t"), (), 5) == [h("u")]
            assert time.monotonic() - start < 0.2
    finally:
        await db.close()


async def test_a_lock_held_past_the_bound_gives_database_unavailable(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path, busy_timeout_s=0.2)
    try:
        with Holder(path, 1.0):
            with pytest.raises(DatabaseUnavailable):
                await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
            with pytest.raises(DatabaseUnavailable):
                await db.new_user("alice", ("@read",), "sha256:1:2")
        # once the lock is free again, writes go through
        r = await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
        assert r["unihash"] == h("u")
    finally:
        await db.close()


async def test_a_failing_statement_in_a_group_fails_only_its_caller(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path)
    try:
        # hold the lock so that everything below queues up and runs as one group
        with Holder(path, 0.3):
            calls = [
                db.insert_report({"method": M, "taskhash": h("a"), "outhash": h("o")}, h("ua")),
                db.insert_report({"method": M, "taskhash": h("b"), "outhash": h("o"), "PN": ["not", "text"]},
                                 h("ub")),
                db.insert_report({"method": M, "taskhash": h("c"), "outhash": h("o")}, h("uc")),
                db.new_user("alice", ("@read",), "sha256:1:2"),
            ]
            res = await asyncio.gather(*calls, return_exceptions=True)
        assert res[0] == {"taskhash": h("a"), "method": M, "unihash": h("ua")}
        assert isinstance(res[1], sqlite3.Error)
        assert res[2] == {"taskhash": h("c"), "method": M, "unihash": h("ua")}  # equivalent of a
        assert res[3] is True
        # the failed report left nothing behind: neither its outhash row nor a unihash
        assert await db.get_unihash(M, h("b")) is None
        assert await db.get_unihash_full(M, h("b")) is None
        assert set(unihash_rows(path)) == {h("a"), h("c")}
    finally:
        await db.close()


async def test_close_finishes_queued_writes(tmp_path: Path):
    path = str(tmp_path / "db")
    db = SqliteEquivalenceDB(path)
    pending = [asyncio.ensure_future(db.insert_unihash(M, h(i), h("u"))) for i in range(100)]
    await asyncio.sleep(0)
    await db.close()
    assert all(await asyncio.gather(*pending))
    assert len(unihash_rows(path)) == 100
    assert os.path.exists(path)
