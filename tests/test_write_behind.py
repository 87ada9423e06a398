"""SQLite write-behind for reports (storage/equivalence/journal.py): answered from the open
transaction, journaled before the answer, committed within the interval; a killed process or
worker loses nothing it acknowledged; several processes share the write lock fairly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.equivalence import journal
from storage.equivalence.sqlite import SqliteEquivalenceDB
from tests.hashserv_client import connect
from tests.service import free_port

REPO = Path(__file__).resolve().parents[1]
M = "oe.sstatesig.OEOuthashBasic"


def h(n: int | str) -> str:
    return f"{n}".encode().hex().ljust(64, "0")[:64]


def committed(path: Path, taskhash: str) -> str | None:
    """The unihash of ``taskhash`` as another connection (another process) sees it."""
    con = sqlite3.connect(path)
    try:
        r = con.execute("SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, taskhash)).fetchone()
        return r[0] if r else None
    finally:
        con.close()


def journal_files(path: Path) -> list[Path]:
    return sorted(Path(journal.directory_for(str(path))).glob("*.jsonl"))


async def test_answered_at_once_committed_within_the_interval(tmp_path: Path):
    path = tmp_path / "hs.db"
    db = SqliteEquivalenceDB(str(path), commit_interval_ms=100)
    try:
        r = await db.insert_report({"method": M, "taskhash": h("t1"), "outhash": h("o1")}, h("u1"))
        assert r["unihash"] == h("u1")
        # equivalent report answered from the same open transaction
        r = await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": h("o1")}, h("u2"))
        assert r["unihash"] == h("u1")
        assert (await db.get_unihash(M, h("t2")))["unihash"] == h("u1")
        assert await db.class_of(h("t2"), (), 5) == [h("u1"), h("t1")]
        # journaled (two records), not yet committed for other connections
        [jf] = journal_files(path)
        assert [json.loads(line)[0] for line in jf.read_text().splitlines()] == ["r", "r"]
        assert committed(path, h("t2")) is None
        # an ignored duplicate writes no record
        await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": h("o1")}, h("u9"))
        assert len(jf.read_text().splitlines()) == 2
        await asyncio.sleep(0.25)
        assert committed(path, h("t2")) == h("u1")
        assert jf.read_text() == ""  # cleared after the commit
    finally:
        await db.close()
    assert journal_files(path) == []  # a clean close leaves no journal


async def test_a_window_due_soon_commits_at_the_next_quiet_moment(tmp_path: Path):
    """quiet_moment (a face answered and waits for its client) commits a window that is at least
    QUIET_COMMIT_FRACTION of the interval old, before its timer; a younger window stays open."""
    path = tmp_path / "hs.db"
    db = SqliteEquivalenceDB(str(path), commit_interval_ms=1000)
    try:
        await db.insert_report({"method": M, "taskhash": h("t1"), "outhash": h("o1")}, h("u1"))
        db.quiet_moment()
        assert committed(path, h("t1")) is None  # young: not yet
        await asyncio.sleep(0.6)
        assert committed(path, h("t1")) is None  # the 1 s timer has not fired
        db.quiet_moment()
        assert committed(path, h("t1")) == h("u1")
        assert [f.read_text() for f in journal_files(path)] == [""]
        db.quiet_moment()  # no window: nothing to do
    finally:
        await db.close()


async def test_the_hashserv_face_commits_after_answering(service_factory):
    """Over the protocol: a report answered when the window is old enough (a fifth of its
    interval) commits the window right after the answer (the quiet moment), long before the
    timer."""
    port = free_port()
    svc = service_factory("svc", config={"database": {"commit_interval_ms": 1000}},
                          args=["--hashserv-bind", f"127.0.0.1:{port}", "--anon-perms", "@read,@report"])
    svc.start()
    client = await connect(f"127.0.0.1:{port}")
    try:
        t0 = time.monotonic()
        await client.report_unihash(h("t1"), M, h("o1"), h("u1"))
        assert committed(svc.database, h("t1")) is None  # young window: answered, not committed
        await asyncio.sleep(0.6)
        r = await client.report_unihash(h("t2"), M, h("o1"), h("u2"))
        assert r["unihash"] == h("u1")
        # the commit follows the answer (the server answers first): wait for it, but not for
        # the timer, which fires 1 s after the first report
        while True:
            seen = committed(svc.database, h("t1")), committed(svc.database, h("t2"))
            elapsed = time.monotonic() - t0
            if None not in seen or elapsed > 0.9:  # (two reads: the commit may fall between them)
                break
            await asyncio.sleep(0.005)
    finally:
        await client.close()
    assert elapsed < 0.9, "too slow to tell the quiet moment from the timer"
    assert seen == (h("u1"), h("u1"))


async def test_other_writes_commit_the_window_first(tmp_path: Path):
    path = tmp_path / "hs.db"
    db = SqliteEquivalenceDB(str(path), commit_interval_ms=60_000)
    try:
        await db.insert_unihash(M, h("t"), h("u"))
        assert committed(path, h("t")) is None
        assert await db.new_user("alice", ("@read",), "sha256:1:2")
        assert committed(path, h("t")) == h("u")  # the window was committed before the user
        await db.insert_outhash({"method": M, "taskhash": h("t"), "outhash": h("o")})
        assert await db.get_usage()  # whole-table work (in a thread) sees the window's rows
        con = sqlite3.connect(path)
        assert con.execute("SELECT COUNT(*) FROM outhashes_v2").fetchone()[0] == 1
        con.close()
    finally:
        await db.close()


async def test_without_a_journal_directory_reports_commit_before_answering(tmp_path: Path, caplog):
    path = tmp_path / "hs.db"
    Path(journal.directory_for(str(path))).write_text("in the way")
    db = SqliteEquivalenceDB(str(path), commit_interval_ms=60_000)
    try:
        assert db.commit_interval == 0 and "no write-behind journal" in caplog.text
        await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
        assert committed(path, h("t")) == h("u")
    finally:
        await db.close()


async def test_a_failed_write_drops_only_itself(tmp_path: Path):
    path = tmp_path / "hs.db"
    db = SqliteEquivalenceDB(str(path), commit_interval_ms=60_000)
    try:
        await db.insert_report({"method": M, "taskhash": h("t1"), "outhash": h("o1")}, h("u1"))
        with pytest.raises(sqlite3.Error):  # a value SQLite cannot bind, after a row went in
            await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": h("o2"), "PN": {"x": 1}}, h("u2"))
        assert (await db.get_unihash(M, h("t1")))["unihash"] == h("u1")  # still answered
        assert await db.get_unihash(M, h("t2")) is None
        await db.insert_report({"method": M, "taskhash": h("t3"), "outhash": h("o3")}, h("u3"))
    finally:
        await db.close()
    con = sqlite3.connect(path)
    assert sorted(r[0] for r in con.execute("SELECT taskhash FROM unihashes_v3")) == sorted([h("t1"), h("t3")])
    assert con.execute("SELECT COUNT(*) FROM outhashes_v2").fetchone()[0] == 2
    con.close()


KILLED_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from storage.equivalence.sqlite import SqliteEquivalenceDB
    M = "oe.sstatesig.OEOuthashBasic"
    def h(n): return f"{n}".encode().hex().ljust(64, "0")[:64]
    async def main():
        db = SqliteEquivalenceDB(sys.argv[1], commit_interval_ms=60_000)
        for i in range(int(sys.argv[2])):
            o = h(f"o{i - 1}") if i % 4 == 3 else h(f"o{i}")  # every 4th is equivalent
            r = await db.insert_report({"method": M, "taskhash": h(f"t{i}"), "outhash": o, "PN": "zlib"}, h(f"u{i}"))
            print(i, r["unihash"], flush=True)  # acknowledged
        await db.insert_unihash(M, h("equiv-t"), h("equiv-u"))
        print("equiv", h("equiv-u"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # before the window commits
    asyncio.run(main())
""")


def test_killed_process_loses_nothing_it_acknowledged(tmp_path: Path):
    path = tmp_path / "hs.db"
    SqliteEquivalenceDB(str(path))._conn.close()  # the schema, committed
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), "200"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = dict(line.split() for line in proc.stdout.splitlines())
    assert len(acked) == 201
    assert committed(path, h("t0")) is None  # nothing was committed: only the journal has them
    assert len(journal_files(path)) == 1

    async def reopen() -> None:
        db = SqliteEquivalenceDB(str(path))  # replays the dead writer's journal
        try:
            for i in range(200):
                assert (await db.get_unihash(M, h(f"t{i}")))["unihash"] == acked[str(i)]
            assert (await db.get_unihash(M, h("equiv-t")))["unihash"] == acked["equiv"]
            assert (await db.get_unihash_full(M, h("t5")))["PN"] == "zlib"
            assert acked["7"] == h("u6")  # the equivalent report got its class's unihash
        finally:
            await db.close()

    asyncio.run(reopen())
    assert journal_files(path) == []


async def test_replay_skips_live_journals_and_torn_tails(tmp_path: Path):
    path = tmp_path / "hs.db"
    live = SqliteEquivalenceDB(str(path), commit_interval_ms=60_000)
    try:
        await live.insert_unihash(M, h("live"), h("u-live"))
        [live_file] = journal_files(path)
        # a dead writer's journal: two good records and a torn last line (never acknowledged)
        dead = Path(journal.directory_for(str(path))) / "1-deadbeef.jsonl"
        litter = dead.with_name(".1-feedface.tmp")  # a writer killed while creating its journal
        litter.write_text("")
        os.utime(litter, (time.time() - 120, time.time() - 120))  # not one being created now
        dead.write_text(json.dumps(["u", M, h("d1"), h("u-d1")]) + "\n"
                        + json.dumps(["r", {"method": M, "taskhash": h("d2"), "outhash": h("od2")}, h("u-d2")])
                        + "\n" + '["u", "' + M + '", "torn')
        await live.new_user("x", (), "t")  # commits the live window, so another opener can write
        await asyncio.sleep(0.01)
        other = await asyncio.to_thread(SqliteEquivalenceDB, str(path))  # replays orphans at open
        try:
            assert (await other.get_unihash(M, h("d1")))["unihash"] == h("u-d1")
            assert (await other.get_unihash(M, h("d2")))["unihash"] == h("u-d2")
            assert (await other.get_outhash(M, h("od2")))["taskhash"] == h("d2")
        finally:
            await other.close()
        assert not dead.exists() and not litter.exists()
        assert live_file.exists()  # held by a live writer: not touched
        # replaying a journal twice changes nothing (INSERT OR IGNORE)
        dead.write_text(json.dumps(["u", M, h("d1"), h("other")]) + "\n")
        again = await asyncio.to_thread(SqliteEquivalenceDB, str(path))
        assert (await again.get_unihash(M, h("d1")))["unihash"] == h("u-d1")
        await again.close()
    finally:
        await live.close()


CONTENDER = textwrap.dedent("""
    import asyncio, sys, time
    from storage.equivalence.sqlite import SqliteEquivalenceDB
    M = "oe.sstatesig.OEOuthashBasic"
    def h(n): return f"{n}".encode().hex().ljust(64, "0")[:64]
    async def main():
        db = SqliteEquivalenceDB(sys.argv[1], commit_interval_ms=5)
        tag = sys.argv[2]
        t0 = time.monotonic()
        for i in range(int(sys.argv[3])):
            await db.insert_report({"method": M, "taskhash": h(f"{tag}t{i}"), "outhash": h(f"{tag}o{i}")}, h(f"{tag}u{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await db.close()
        print(time.monotonic() - t0)
    asyncio.run(main())
""")


def test_processes_share_the_write_lock(tmp_path: Path):
    """Two processes reporting at full speed on one file: neither is starved into "database is
    locked" (each waits without blocking and the holder pauses after its commit)."""
    path = tmp_path / "hs.db"
    SqliteEquivalenceDB(str(path))._conn.close()
    n = 3000
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), tag, str(n)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM unihashes_v3").fetchone()[0] == 2 * n
    con.close()
    assert journal_files(path) == []
    # they did contend: one of them found the lock taken and said so
    assert (Path(journal.directory_for(str(path))) / journal.WAITING).exists()


def worker_pids(svc) -> list[int]:
    return [int(p) for p in Path(f"/proc/{svc.proc.pid}/task/{svc.proc.pid}/children").read_text().split()]


async def test_killed_workers_are_replayed_by_their_successors(service_factory):
    """SIGKILL the serve workers while they hold acknowledged, uncommitted reports: the
    supervisor's replacement workers replay the journals, and every acknowledged report is there."""
    port = free_port()
    svc = service_factory("svc", config={"database": {"commit_interval_ms": 1000}},
                          args=["--workers", "2", "--hashserv-bind", f"127.0.0.1:{port}",
                                "--anon-perms", "@read,@report"])
    svc.start()
    workers = worker_pids(svc)
    assert len(workers) == 2
    clients = [await connect(f"127.0.0.1:{port}") for _ in range(4)]  # spread over both workers
    acked = {}
    try:
        for i in range(60):
            r = await clients[i % 4].report_unihash(h(f"t{i}"), M, h(f"o{i % 40}"), h(f"u{i}"))
            acked[h(f"t{i}")] = r["unihash"]
        pending = sum(f.stat().st_size for f in journal_files(svc.database))
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # within the 1 s window: acknowledged, not committed
        assert pending > 0
    finally:
        for c in clients:
            await c.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        fresh = [p for p in worker_pids(svc) if p not in workers]
        if len(fresh) == 2 and all(committed(svc.database, t) for t in acked):
            break
        await asyncio.sleep(0.1)
    client = await connect(f"127.0.0.1:{port}")
    try:
        assert await client.get_unihash_batch([(M, t) for t in acked]) == list(acked.values())
        assert acked[h("t45")] == h("u5")  # same outhash as t5: equivalent
    finally:
        await client.close()
    assert svc.stop() == 0
    assert journal_files(svc.database) == []
