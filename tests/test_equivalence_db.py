"""SqliteEquivalenceDB: bitbake-hashserv's schema and semantics on one SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage.equivalence import User
from storage.equivalence.sqlite import ReadOnlyError, SqliteEquivalenceDB

M = "TestMethod"
M2 = "OtherMethod"


def h(n: int | str) -> str:
    """A valid-looking 64-hex hash, distinct per n."""
    return f"{n}".encode().hex().ljust(64, "0")[:64]


def ts(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "hashserv.db")


@pytest.fixture
async def db(path: str):
    d = SqliteEquivalenceDB(path)
    yield d
    await d.close()


# The schema exactly as bitbake-hashserv 2.19 creates it (hashserv-protocol.md section 8).
BITBAKE_SCHEMA = """
CREATE TABLE unihashes_v3 (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, taskhash TEXT NOT NULL,
  unihash TEXT NOT NULL, gc_mark TEXT NOT NULL, UNIQUE(method, taskhash));
CREATE TABLE outhashes_v2 (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, taskhash TEXT NOT NULL,
  outhash TEXT NOT NULL, created DATETIME, owner TEXT, PN TEXT, PV TEXT, PR TEXT, task TEXT, outhash_siginfo TEXT,
  UNIQUE(method, taskhash, outhash));
CREATE TABLE users  (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL, token TEXT NOT NULL,
  permissions TEXT NOT NULL, UNIQUE(username));
CREATE TABLE config (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, value TEXT, UNIQUE(name));
CREATE INDEX taskhash_lookup_v4 ON unihashes_v3 (method, taskhash);
CREATE INDEX unihash_lookup_v1  ON unihashes_v3 (unihash);
CREATE INDEX outhash_lookup_v3  ON outhashes_v2 (method, outhash);
CREATE INDEX config_lookup      ON config (name);
"""

FULL_KEYS = {
    "id", "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task",
    "outhash_siginfo", "unihash", "gc_mark",
}


# --- schema & opening ----------------------------------------------------------------------------
async def test_fresh_schema(db: SqliteEquivalenceDB, path: str):
    con = sqlite3.connect(path)
    objs = {(t, n) for t, n in con.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
    assert {("table", t) for t in ("unihashes_v3", "outhashes_v2", "users", "config")} <= objs
    assert {("index", i) for i in ("unihash_lookup_v1", "outhash_lookup_v3", "config_lookup")} <= objs
    # bitbake's taskhash_lookup_v4 duplicates UNIQUE(method, taskhash): not kept (module notes)
    assert ("index", "taskhash_lookup_v4") not in objs
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in con.execute("PRAGMA table_info(outhashes_v2)")]
    assert cols == ["id", "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task",
                    "outhash_siginfo"]
    assert [r[1] for r in con.execute("PRAGMA table_info(unihashes_v3)")] == [
        "id", "method", "taskhash", "unihash", "gc_mark"]
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    con.close()


async def test_opens_handmade_bitbake_db(path: str):
    con = sqlite3.connect(path)
    con.executescript(BITBAKE_SCHEMA)
    con.execute("PRAGMA journal_mode = WAL")
    # An old row written with a naive local datetime, and a current UTC ISO row, same outhash.
    con.execute("INSERT INTO outhashes_v2 (method, taskhash, outhash, created, owner, PN) VALUES (?,?,?,?,?,?)",
                (M, h("t-old"), h("o"), "2021-03-04 05:06:07.123456", "alice", "zlib"))
    con.execute("INSERT INTO outhashes_v2 (method, taskhash, outhash, created) VALUES (?,?,?,?)",
                (M, h("t-new"), h("o"), "2026-01-02T03:04:05.678901+00:00"))
    con.execute("INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?,?,?,'')",
                (M, h("t-old"), h("u-old")))
    con.execute("INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?,?,?,'')",
                (M, h("t-new"), h("u-old")))
    con.execute("INSERT INTO users (username, token, permissions) VALUES ('bob', 'sha256:00:ff', '@read @report')")
    con.execute("INSERT INTO config (name, value) VALUES ('gc-mark', 'M1')")
    con.commit()
    schema_before = sorted(con.execute("SELECT type, name, sql FROM sqlite_master"))
    con.close()

    db = SqliteEquivalenceDB(path)
    try:
        assert await db.get_unihash(M, h("t-new")) == {"taskhash": h("t-new"), "method": M, "unihash": h("u-old")}
        full = await db.get_unihash_full(M, h("t-old"))
        assert full is not None and set(full) == FULL_KEYS
        assert full["created"] == "2021-03-04 05:06:07.123456"  # returned as stored
        assert full["owner"] == "alice" and full["PN"] == "zlib" and full["unihash"] == h("u-old")
        # The naive (older) row is the oldest for this outhash.
        out = await db.get_outhash(M, h("o"))
        assert out is not None and out["taskhash"] == h("t-old")
        eq = await db.get_equivalent_for_outhash(M, h("o"), h("t-x"))
        assert eq == {"taskhash": h("t-old"), "unihash": h("u-old")}
        assert await db.lookup_user("bob") == User("bob", "sha256:00:ff", ("@read", "@report"))
        assert await db.get_current_gc_mark() == "M1"
        # New rows get the current mark.
        await db.insert_unihash(M, h("t3"), h("u3"))
        assert (await db.gc_status()) == (1, 2, "M1")
    finally:
        await db.close()
    con = sqlite3.connect(path)
    # Nothing migrated; only the redundant taskhash_lookup_v4 is gone (bitbake re-creates it).
    assert sorted(con.execute("SELECT type, name, sql FROM sqlite_master")) == [
        r for r in schema_before if r[1] != "taskhash_lookup_v4"]
    con.close()


async def test_lookups_by_taskhash_are_index_seeks_without_taskhash_lookup_v4(db: SqliteEquivalenceDB):
    """Every (method, taskhash) query the service makes still seeks an index (the UNIQUE one)."""
    await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
    c = db._conn
    queries = [
        ("SELECT taskhash, method, unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
        ("SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
        ("DELETE FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
    ]
    for sql, params in queries:
        plan = " ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "sqlite_autoindex_unihashes_v3_1 (method=? AND taskhash=?)" in plan, (sql, plan)
        assert "SCAN unihashes_v3" not in plan, (sql, plan)
    assert await db.class_of(h("t"), (), 8) == [h("u")]


async def test_migrates_unihashes_v2_and_creates_missing(path: str):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE unihashes_v2 (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, "
                "taskhash TEXT NOT NULL, unihash TEXT NOT NULL, UNIQUE(method, taskhash))")
    con.execute("CREATE INDEX taskhash_lookup_v3 ON unihashes_v2 (method, taskhash)")
    con.execute("INSERT INTO unihashes_v2 (method, taskhash, unihash) VALUES (?,?,?)", (M, h("t"), h("u")))
    con.commit()
    con.close()
    db = SqliteEquivalenceDB(path)
    try:
        assert await db.get_unihash(M, h("t")) == {"taskhash": h("t"), "method": M, "unihash": h("u")}
        usage = await db.get_usage()
        assert "unihashes_v2" not in usage
        assert usage["unihashes_v3"] == {"rows": 1}
        full = db._conn.execute("SELECT gc_mark FROM unihashes_v3").fetchall()
        assert full == [("",)]
    finally:
        await db.close()


# --- lookups and writes --------------------------------------------------------------------------
async def test_insert_unihash_first_writer_wins(db: SqliteEquivalenceDB):
    assert await db.get_unihash(M, h("t")) is None
    assert await db.insert_unihash(M, h("t"), h("u1")) is True
    assert await db.insert_unihash(M, h("t"), h("u2")) is False
    assert (await db.get_unihash(M, h("t")))["unihash"] == h("u1")
    # Per method.
    assert await db.insert_unihash(M2, h("t"), h("u2")) is True
    assert (await db.get_unihash(M2, h("t")))["unihash"] == h("u2")
    assert await db.unihash_exists(h("u1")) and await db.unihash_exists(h("u2"))
    assert not await db.unihash_exists(h("nope"))


async def test_insert_outhash_and_created(db: SqliteEquivalenceDB):
    row = {"method": M, "taskhash": h("t"), "outhash": h("o"), "owner": "me", "PN": "zlib", "junk": 1}
    assert await db.insert_outhash(row) is True
    assert await db.insert_outhash(dict(row, owner="other")) is False
    bare = await db.get_outhash(M, h("o"), with_unihash=False)
    assert bare is not None
    assert set(bare) == FULL_KEYS - {"unihash", "gc_mark"}
    assert bare["owner"] == "me" and bare["PV"] is None
    created = bare["created"]
    assert isinstance(created, str) and created.endswith("+00:00") and "T" in created
    assert abs(datetime.fromisoformat(created) - datetime.now(UTC)) < timedelta(seconds=10)
    # Not joined without a unihash row.
    assert await db.get_outhash(M, h("o")) is None
    assert await db.get_unihash_full(M, h("t")) is None
    # A datetime is stored as UTC ISO text.
    when = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    await db.insert_outhash({"method": M, "taskhash": h("t2"), "outhash": h("o2"), "created": when})
    assert (await db.get_outhash(M, h("o2"), False))["created"] == "2025-01-01T12:00:00+00:00"
    with pytest.raises(KeyError):
        await db.insert_outhash({"method": M, "taskhash": h("t3")})


async def test_full_rows_and_oldest(db: SqliteEquivalenceDB):
    await db.insert_outhash({"method": M, "taskhash": h("t"), "outhash": h("o-new"), "created": ts(1)})
    await db.insert_outhash({"method": M, "taskhash": h("t"), "outhash": h("o-old"), "created": ts(5),
                             "PN": "a", "PV": "1", "PR": "r0", "task": "do_x", "outhash_siginfo": "sig"})
    await db.insert_unihash(M, h("t"), h("u"))
    full = await db.get_unihash_full(M, h("t"))
    assert set(full) == FULL_KEYS
    assert full["outhash"] == h("o-old") and full["unihash"] == h("u") and full["gc_mark"] == ""
    assert full["outhash_siginfo"] == "sig" and full["task"] == "do_x"
    out = await db.get_outhash(M, h("o-new"))
    assert out["taskhash"] == h("t") and out["outhash"] == h("o-new") and set(out) == FULL_KEYS
    assert await db.get_unihash_full(M2, h("t")) is None


async def test_equivalent_oldest_other_with_unihash(db: SqliteEquivalenceDB):
    o = h("o")
    await db.insert_outhash({"method": M, "taskhash": h("t-oldest-nouni"), "outhash": o, "created": ts(10)})
    await db.insert_outhash({"method": M, "taskhash": h("t-old"), "outhash": o, "created": ts(5)})
    await db.insert_outhash({"method": M, "taskhash": h("t-mid"), "outhash": o, "created": ts(3)})
    await db.insert_outhash({"method": M, "taskhash": h("t-self"), "outhash": o, "created": ts(20)})
    await db.insert_outhash({"method": M2, "taskhash": h("t-m2"), "outhash": o, "created": ts(30)})
    await db.insert_unihash(M, h("t-old"), h("u-old"))
    await db.insert_unihash(M, h("t-mid"), h("u-mid"))
    await db.insert_unihash(M, h("t-self"), h("u-self"))
    await db.insert_unihash(M2, h("t-m2"), h("u-m2"))
    eq = await db.get_equivalent_for_outhash(M, o, h("t-self"))
    assert eq == {"taskhash": h("t-old"), "unihash": h("u-old")}
    assert (await db.get_equivalent_for_outhash(M, o, h("t-old")))["taskhash"] == h("t-self")
    assert await db.get_equivalent_for_outhash(M, h("other"), h("t")) is None


async def test_insert_report(db: SqliteEquivalenceDB):
    o = h("o")
    r1 = await db.insert_report({"method": M, "taskhash": h("t1"), "outhash": o, "owner": "x"}, h("u1"))
    assert r1 == {"taskhash": h("t1"), "method": M, "unihash": h("u1")}
    # Same outhash, other taskhash -> the first one's unihash.
    r2 = await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": o}, h("u2"))
    assert r2 == {"taskhash": h("t2"), "method": M, "unihash": h("u1")}
    # A second outhash for a known taskhash: first writer wins.
    r3 = await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": h("o-other")}, h("u3"))
    assert r3["unihash"] == h("u1")
    assert (await db.get_outhash(M, h("o-other"), False))["taskhash"] == h("t2")
    # Probe of hashserv-protocol.md section 7: gc drops T2's unihash; a new report re-creates U1.
    await db.gc_mark("K", {"taskhash": h("t1")})
    assert await db.gc_sweep() == 1
    assert await db.get_unihash(M, h("t2")) is None
    r4 = await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": o}, h("u9"))
    assert r4["unihash"] == h("u1")
    assert (await db.get_unihash(M, h("t2")))["unihash"] == h("u1")


# --- remove / clean / gc ---------------------------------------------------------------------------
async def _populate(db: SqliteEquivalenceDB) -> None:
    for i in range(3):
        await db.insert_report({"method": M, "taskhash": h(f"a{i}"), "outhash": h(f"oa{i}")}, h("UA"))
        await db.insert_report({"method": M, "taskhash": h(f"b{i}"), "outhash": h(f"ob{i}")}, h("UB"))
        await db.insert_report({"method": M2, "taskhash": h(f"c{i}"), "outhash": h(f"oc{i}")}, h("UA"))


async def test_remove_by_taskhash_both_tables(db: SqliteEquivalenceDB):
    await _populate(db)
    assert await db.remove({"taskhash": h("a0")}) == 2
    assert await db.get_unihash(M, h("a0")) is None
    assert await db.get_outhash(M, h("oa0"), False) is None
    assert await db.remove({"taskhash": h("a0")}) == 0


async def test_remove_whitelist_and_none(db: SqliteEquivalenceDB):
    await _populate(db)
    # Unknown keys are ignored (never interpolated); None values are ignored.
    assert await db.remove({"id; DROP TABLE users; --": 1, "bogus": h("a0")}) == 0
    assert await db.remove({"taskhash": None}) == 0
    assert await db.remove({}) == 0
    # outhash-only column: only outhashes_v2 is touched.
    assert await db.remove({"outhash": h("oa1"), "owner": None}) == 1
    assert await db.get_unihash(M, h("a1")) is not None
    with pytest.raises(TypeError):
        await db.remove({"taskhash": ["x"]})
    with pytest.raises(TypeError):
        await db.remove(["taskhash"])  # type: ignore[arg-type]
    assert (await db.get_usage())["outhashes_v2"]["rows"] == 8


async def test_remove_by_unihash_and_method_deviation(db: SqliteEquivalenceDB):
    """{"unihash": U, "method": M} must not delete the outhash rows of *other* unihashes of M."""
    await _populate(db)
    n = await db.remove({"unihash": h("UA"), "method": M})
    assert n == 6  # 3 unihash rows + the 3 outhash rows of a0..a2
    for i in range(3):
        assert await db.get_unihash(M, h(f"a{i}")) is None
        assert await db.get_outhash(M, h(f"oa{i}"), False) is None
        # b* (method M, other unihash) untouched
        assert (await db.get_unihash(M, h(f"b{i}")))["unihash"] == h("UB")
        assert await db.get_outhash(M, h(f"ob{i}"), False) is not None
        # c* (other method, same unihash) untouched
        assert (await db.get_unihash(M2, h(f"c{i}")))["unihash"] == h("UA")
    # unihash alone: only unihashes_v3 (as bitbake: outhashes_v2 has no such column).
    assert await db.remove({"unihash": h("UA")}) == 3
    assert (await db.get_usage())["outhashes_v2"]["rows"] == 6


async def test_clean_unused(db: SqliteEquivalenceDB):
    await db.insert_outhash({"method": M, "taskhash": h("old-unused"), "outhash": h("o1"), "created": ts(10)})
    await db.insert_outhash({"method": M, "taskhash": h("new-unused"), "outhash": h("o2"), "created": ts(0)})
    await db.insert_outhash({"method": M, "taskhash": h("old-used"), "outhash": h("o3"), "created": ts(10)})
    await db.insert_unihash(M, h("old-used"), h("u"))
    con = db._conn
    con.execute("INSERT INTO outhashes_v2 (method, taskhash, outhash, created) VALUES (?,?,?,?)",
                (M, h("naive"), h("o4"), "2020-01-01 00:00:00.000000"))
    n = await db.clean_unused(datetime.now(UTC) - timedelta(days=1))
    assert n == 2
    assert await db.get_outhash(M, h("o1"), False) is None
    assert await db.get_outhash(M, h("o4"), False) is None
    assert await db.get_outhash(M, h("o2"), False) is not None
    assert await db.get_outhash(M, h("o3"), False) is not None


async def test_gc(db: SqliteEquivalenceDB):
    await _populate(db)
    assert await db.get_current_gc_mark() is None
    assert await db.gc_status() == (9, 0, None)
    assert await db.gc_mark("ABC", {"unihash": h("UB")}) == 3
    assert await db.gc_mark("ABC", {"taskhash": h("a0"), "method": M}) == 1
    assert await db.gc_mark("ABC", {"outhash": h("oa1")}) == 0  # no unihash column -> nothing
    assert await db.get_current_gc_mark() == "ABC"
    # A new unihash row gets the current mark.
    await db.insert_unihash(M, h("fresh"), h("UF"))
    assert await db.gc_status() == (5, 5, "ABC")
    with pytest.raises(TypeError):
        await db.gc_mark(1, {})  # type: ignore[arg-type]
    assert await db.gc_sweep() == 5
    assert await db.get_current_gc_mark() is None
    assert await db.gc_status() == (0, 5, None)  # marks stay, the current mark is cleared
    assert await db.get_unihash(M, h("a0")) is not None
    assert await db.get_unihash(M, h("a1")) is None
    # No current mark: sweep deletes nothing.
    assert await db.gc_sweep() == 0
    assert (await db.get_usage())["config"] == {"rows": 1}


async def test_usage_and_columns(db: SqliteEquivalenceDB):
    await _populate(db)
    await db.new_user("u", ("@read",), "sha256:1:2")
    usage = await db.get_usage()
    assert usage == {"config": {"rows": 0}, "outhashes_v2": {"rows": 9}, "unihashes_v3": {"rows": 9},
                     "users": {"rows": 1}}
    cols = await db.get_query_columns()
    assert sorted(cols) == sorted(["method", "taskhash", "unihash", "gc_mark", "outhash", "owner", "PN", "PV",
                                   "PR", "task", "outhash_siginfo"])


# --- users -------------------------------------------------------------------------------------------
async def test_users(db: SqliteEquivalenceDB, path: str):
    assert await db.lookup_user("alice") is None
    assert await db.new_user("alice", ("@read", "@report"), "sha256:aa:bb") is True
    assert await db.new_user("alice", ("@all",), "sha256:cc:dd") is False
    assert await db.lookup_user("alice") == User("alice", "sha256:aa:bb", ("@read", "@report"))
    assert await db.set_user_token("alice", "sha256:ee:ff") is True
    assert await db.set_user_perms("alice", ("@all",)) is True
    assert await db.set_user_token("nobody", "x") is False
    assert await db.set_user_perms("nobody", ()) is False
    await db.new_user("bob", (), "sha256:1:2")
    assert await db.get_all_users() == [User("alice", "sha256:ee:ff", ("@all",)), User("bob", "sha256:1:2", ())]
    con = sqlite3.connect(path)
    assert con.execute("SELECT permissions FROM users WHERE username='alice'").fetchone()[0] == "@all"
    con.close()
    assert await db.delete_user("alice") is True
    assert await db.delete_user("alice") is False
    assert [u.username for u in await db.get_all_users()] == ["bob"]


# --- class_of ------------------------------------------------------------------------------------------
async def test_class_of_order_and_limit(db: SqliteEquivalenceDB):
    U = h("U")
    for t in ("t1", "t2", "t3", "t4"):  # ids ascending: t4 is the newest
        await db.insert_unihash(M, h(t), U)
    await db.insert_unihash(M2, h("t9"), U)
    # (1) first, then (3) newest first; hash_ itself excluded.
    assert await db.class_of(h("t2"), (M,), 10) == [U, h("t4"), h("t3"), h("t1")]
    assert await db.class_of(h("t2"), (M,), 2) == [U, h("t4")]
    assert await db.class_of(h("t2"), (M,), 1) == [U]
    assert await db.class_of(h("t2"), (M,), 0) == []
    # methods=() means any method.
    assert await db.class_of(h("t2"), (), 10) == [U, h("t9"), h("t4"), h("t3"), h("t1")]
    # Restricted to M2: t2 is not a M2 taskhash.
    assert await db.class_of(h("t2"), (M2,), 10) == []
    # (2) hash_ is a unihash: its taskhashes, newest first.
    assert await db.class_of(U, (M,), 10) == [h("t4"), h("t3"), h("t2"), h("t1")]
    assert await db.class_of(U, (), 3) == [h("t9"), h("t4"), h("t3")]
    assert await db.class_of(h("unknown"), (), 10) == []


async def test_class_of_identity_and_dedupe(db: SqliteEquivalenceDB):
    # A taskhash that is its own unihash (the usual case for the first of a class).
    T = h("T")
    await db.insert_unihash(M, T, T)
    await db.insert_unihash(M, h("x"), T)
    await db.insert_unihash(M2, T, h("V"))  # same taskhash, other method -> a second unihash
    await db.insert_unihash(M2, h("y"), h("V"))
    assert await db.class_of(T, (M,), 10) == [h("x")]
    assert await db.class_of(T, (), 10) == [h("V"), h("x"), h("y")]
    assert await db.class_of(h("x"), (), 10) == [T]


# --- generation, processes, read-only ---------------------------------------------------------------
async def test_generation_two_instances(path: str):
    a = SqliteEquivalenceDB(path)
    b = SqliteEquivalenceDB(path)
    try:
        ga, gb = await a.generation(), await b.generation()
        assert await a.generation() == ga and await b.generation() == gb
        await a.insert_unihash(M, h("t"), h("u"))
        ga2, gb2 = await a.generation(), await b.generation()
        assert ga2 != ga and gb2 != gb
        # A no-op write (ignored insert) changes nothing.
        await a.insert_unihash(M, h("t"), h("u2"))
        assert await a.generation() == ga2 and await b.generation() == gb2
        await b.remove({"taskhash": h("t")})  # runs on its own connection in a thread
        assert await a.generation() != ga2 and await b.generation() != gb2
        # A raw foreign writer (e.g. bitbake-hashserv on the same file).
        con = sqlite3.connect(path)
        g = await a.generation()
        con.execute("INSERT INTO config (name, value) VALUES ('x', 'y')")
        con.commit()
        con.close()
        assert await a.generation() != g
    finally:
        await a.close()
        await b.close()


async def test_generation_across_processes(path: str):
    db = SqliteEquivalenceDB(path)
    try:
        g = await db.generation()
        code = textwrap.dedent(f"""
            import asyncio
            from storage.equivalence.sqlite import SqliteEquivalenceDB
            async def main():
                d = SqliteEquivalenceDB({path!r})
                r = await d.insert_report({{"method": "m", "taskhash": "{h('p')}", "outhash": "{h('o')}"}}, "{h('u')}")
                print(r["unihash"])
                await d.close()
            asyncio.run(main())
        """)
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == h("u")
        assert await db.generation() != g
        assert (await db.get_unihash("m", h("p")))["unihash"] == h("u")
    finally:
        await db.close()


async def test_read_only(path: str):
    rw = SqliteEquivalenceDB(path)
    await rw.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
    await rw.new_user("alice", ("@read",), "sha256:1:2")
    ro = SqliteEquivalenceDB(path, read_only=True)
    try:
        assert (await ro.get_unihash(M, h("t")))["unihash"] == h("u")
        assert (await ro.get_outhash(M, h("o")))["taskhash"] == h("t")
        assert (await ro.lookup_user("alice")).permissions == ("@read",)
        assert (await ro.get_usage())["unihashes_v3"] == {"rows": 1}
        assert await ro.class_of(h("t"), (), 5) == [h("u")]
        g = await ro.generation()
        await rw.insert_unihash(M, h("t2"), h("u"))
        assert await ro.generation() != g
        for call in (
            ro.insert_unihash(M, h("x"), h("y")),
            ro.insert_outhash({"method": M, "taskhash": h("x"), "outhash": h("y")}),
            ro.insert_report({"method": M, "taskhash": h("x"), "outhash": h("y")}, h("z")),
            ro.remove({"taskhash": h("t")}),
            ro.clean_unused(datetime.now(UTC)),
            ro.gc_mark("A", {}),
            ro.gc_sweep(),
            ro.new_user("bob", (), "x"),
            ro.set_user_token("alice", "x"),
            ro.set_user_perms("alice", ()),
            ro.delete_user("alice"),
        ):
            with pytest.raises(ReadOnlyError):
                await call
        assert (await rw.get_unihash(M, h("t")))["unihash"] == h("u")
    finally:
        await ro.close()
        await rw.close()
    with pytest.raises(sqlite3.OperationalError):
        SqliteEquivalenceDB(path + ".missing", read_only=True)


async def test_memory_db():
    db = SqliteEquivalenceDB(":memory:")
    await _populate(db)
    assert await db.remove({"taskhash": h("a0")}) == 2
    assert (await db.get_usage())["unihashes_v3"] == {"rows": 8}
    await db.close()


# --- interoperability with the reference server's own sqlite engine (optional) ---------------------
BITBAKE_DIR = os.environ.get("BITBAKE_DIR")


@pytest.mark.skipif(not BITBAKE_DIR, reason="set BITBAKE_DIR to a bitbake checkout to test interop")
async def test_reference_engine_interop(path: str, tmp_path: Path):
    """The reference engine reads our file, and we read a file the reference engine wrote."""
    db = SqliteEquivalenceDB(path)
    await db.insert_report({"method": M, "taskhash": h("t1"), "outhash": h("o"), "PN": "zlib"}, h("u1"))
    await db.new_user("alice", ("@read", "@report"), "sha256:aa:bb")
    await db.close()
    theirs = str(tmp_path / "theirs.db")
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        from datetime import datetime
        sys.path.insert(0, {os.path.join(BITBAKE_DIR, "lib")!r})
        from hashserv.sqlite import DatabaseEngine
        import logging
        async def main():
            out = {{}}
            eng = DatabaseEngine({path!r}, True)
            await eng.create()
            d = eng.connect(logging.getLogger())
            row = await d.get_unihash_by_taskhash_full({M!r}, {h("t1")!r})
            out["ours_full"] = {{k: row[k] for k in row.keys()}}
            out["ours_user"] = list((await d.lookup_user("alice")).permissions)
            await d.close()
            eng = DatabaseEngine({theirs!r}, True)
            await eng.create()
            d = eng.connect(logging.getLogger())
            await d.insert_outhash({{"method": {M!r}, "taskhash": {h("t2")!r}, "outhash": {h("o2")!r},
                                     "created": datetime.now(), "owner": "ref"}})
            await d.insert_unihash({M!r}, {h("t2")!r}, {h("u2")!r})
            row = await d.get_unihash_by_taskhash_full({M!r}, {h("t2")!r})
            out["theirs_full"] = {{k: row[k] for k in row.keys()}}
            await d.close()
            print(json.dumps(out))
        asyncio.run(main())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert out["ours_full"]["unihash"] == h("u1") and out["ours_full"]["PN"] == "zlib"
    assert sorted(out["ours_user"]) == ["@read", "@report"]
    ours = SqliteEquivalenceDB(theirs)
    try:
        full = await ours.get_unihash_full(M, h("t2"))
        assert full == out["theirs_full"]  # same keys, same values, same `created` string
        assert set(full) == FULL_KEYS
        ours_row = SqliteEquivalenceDB(path)
        try:
            assert await ours_row.get_unihash_full(M, h("t1")) == out["ours_full"]
        finally:
            await ours_row.close()
    finally:
        await ours.close()


async def test_insert_report_group_commit_matches_sequential(db: SqliteEquivalenceDB, tmp_path: Path):
    """Concurrent reports (one transaction) give the same answers as the same reports in order."""
    import asyncio

    reports = []
    for i in range(40):
        reports.append(({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"o{i % 7}")}, h(f"u{i}")))
        reports.append(({"method": M, "taskhash": h(f"t{i // 2}"), "outhash": h(f"x{i}")}, h(f"v{i}")))
    g = await db.generation()
    got = await asyncio.gather(*(db.insert_report(r, u) for r, u in reports))
    assert await db.generation() != g
    seq = SqliteEquivalenceDB(str(tmp_path / "seq.db"))
    try:
        want = [await seq.insert_report(r, u) for r, u in reports]
    finally:
        await seq.close()
    assert got == want
    assert got[14]["unihash"] == h("u0")  # t7 has outhash o0 -> t0's unihash
    assert got[1]["unihash"] == h("u0")  # t0 again, other outhash: first writer wins


async def test_insert_report_bad_row_fails_alone(db: SqliteEquivalenceDB):
    import asyncio

    good = db.insert_report({"method": M, "taskhash": h("g"), "outhash": h("o")}, h("u"))
    bad = db.insert_report({"method": M, "taskhash": h("b"), "outhash": h("o"), "PN": ["not", "text"]}, h("u"))
    res = await asyncio.gather(good, bad, return_exceptions=True)
    assert res[0] == {"taskhash": h("g"), "method": M, "unihash": h("u")}
    assert isinstance(res[1], sqlite3.Error)
    assert await db.get_unihash(M, h("b")) is None
