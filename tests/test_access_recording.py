"""Last-access recording (proxy/access.py): batched, folded, kept across a failing database,
written at shutdown; and recorded by a running service with two workers (hit, equivalent:
the key actually served; PUT catalogues the object; DELETE logs the removal)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import sqlite3
import time
from pathlib import Path

from proxy import access
from proxy.access import AccessRecorder
from storage.equivalence import ObjectRow
from storage.equivalence.sqlite import SqliteEquivalenceDB
from tests.service import Service
from tests.test_gc_service import catalog, hsh, key, status, wait_catalogued
from tests.test_rewrite import report


async def rows(db) -> dict[str, ObjectRow]:
    return {r.key: r async for b in db.iter_objects() for r in b}


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_touches_fold_into_one_batch(tmp_path: Path, monkeypatch):
    db = SqliteEquivalenceDB(str(tmp_path / "db"))
    rec = AccessRecorder(db, flush_s=0.05)
    rec.start()
    try:
        t0 = time.time()
        for _ in range(1000):
            rec.touch("a")
            rec.touch("b")
        await until(lambda: rec.flushes == 1)
        got = await rows(db)
        assert set(got) == {"a", "b"} and got["a"].last_access >= t0
        assert got["a"].size == 0 and got["a"].origin == "local"
        assert rec.flushes == 1  # 2000 touches, one transaction
        await asyncio.sleep(0.2)
        assert rec.flushes == 1  # idle: no flush, no commit
        rec.touch("a")  # written less than RESOLUTION_S ago: not again
        await asyncio.sleep(0.2)
        assert rec.flushes == 1 and (await rows(db))["a"].last_access == got["a"].last_access
        monkeypatch.setattr(access, "RESOLUTION_S", 0.0)
        rec.touch("a")
        await until(lambda: rec.flushes == 2)
        assert (await rows(db))["a"].last_access > got["a"].last_access
    finally:
        await rec.stop()
        await db.close()


async def test_a_failed_flush_keeps_its_entries_and_stop_writes_them(tmp_path: Path):
    db = SqliteEquivalenceDB(str(tmp_path / "db"))
    await db.close()  # every write now fails (DatabaseUnavailable)
    rec = AccessRecorder(db, flush_s=60)
    rec.touch("x")
    await rec.flush()
    assert rec.flushes == 0
    rec.db = db2 = SqliteEquivalenceDB(str(tmp_path / "db"))
    try:
        rec.touch("y")
        await rec.stop()  # the final flush writes both
        assert set(await rows(db2)) == {"x", "y"}
    finally:
        await db2.close()


async def test_disabled_records_nothing(tmp_path: Path):
    db = SqliteEquivalenceDB(str(tmp_path / "db"))
    try:
        rec = AccessRecorder(db, flush_s=0.01, enabled=False)
        rec.start()
        rec.touch("a")
        await rec.published("b", 10)
        await rec.stop()
        assert await rows(db) == {}
    finally:
        await db.close()


def test_two_workers_record_what_they_serve(tmp_path: Path):
    svc = Service(tmp_path / "svc", config={"server": {"workers": 2}, "retention": {"access_flush_s": 0.2}},
                  env={"SSTATE_PROXY_ADMIN_USER": "admin", "SSTATE_PROXY_ADMIN_TOKEN": "tok"},
                  args=["--anon-perms", "@read,@report"])
    hashes = [hsh("w", i) for i in range(12)]
    for h in hashes:
        path = svc.storage / key(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    with svc:
        report(svc, hashes[0], hsh("o", 1), hashes[0])
        report(svc, hsh("t", 9), hsh("o", 1), hsh("t", 9))
        t0 = time.time()
        for h in hashes:  # a connection each: the kernel spreads them over both workers
            assert status(svc, "HEAD", key(h))[0] == 200
        code, headers = status(svc, "GET", key(hsh("t", 9)))
        assert code == 200 and headers["X-Sstate-Source"] == "equivalent"
        wait_catalogued(svc, [key(h) for h in hashes], t0)
        assert key(hsh("t", 9)) not in catalog(svc)  # the served key is recorded, not the name asked

        # PUT catalogues the object ('local', its size); DELETE forgets it and logs the removal
        auth = {"Authorization": "Basic " + base64.b64encode(b"admin:tok").decode()}
        new = key(hsh("n", 1))
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        try:
            conn.request("PUT", "/" + new, body=b"y" * 77, headers=auth)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201
            con = sqlite3.connect(svc.database)
            try:
                size, origin, when = con.execute("SELECT size, origin, last_access FROM sstate_proxy_objects "
                                                 "WHERE key = ?", (new,)).fetchone()
            finally:
                con.close()
            assert (size, origin) == (77, "local") and when >= t0
            conn.request("DELETE", "/" + new, headers=auth)
            assert conn.getresponse().status == 204
        finally:
            conn.close()
        assert new not in catalog(svc)
        t1 = time.time()
    # a touch made just before a stop is written at shutdown (no flush would come for 300 s)
    svc.config_path.write_text(svc.config_path.read_text().replace("access_flush_s = 0.2", "access_flush_s = 300"))
    with svc:
        assert status(svc, "HEAD", key(hashes[2]))[0] == 200
    assert catalog(svc)[key(hashes[2])] >= t1
