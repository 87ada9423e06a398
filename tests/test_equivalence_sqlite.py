"""SqliteEquivalenceDB as a file: bitbake-hashserv 2.19's schema, migrations and interop.

The engine-independent behaviour is in test_equivalence_db.py; here is what only a SQLite file has.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.equivalence import User
from storage.equivalence.sqlite import SqliteEquivalenceDB
from tests.test_equivalence_db import FULL_KEYS, M, h


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "hashserv.db")


@pytest.fixture
async def db(path: str):
    d = SqliteEquivalenceDB(path)
    yield d
    await d.close()


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

# --- schema & opening ----------------------------------------------------------------------------
async def test_fresh_schema(db: SqliteEquivalenceDB, path: str):
    con = sqlite3.connect(path)
    objs = {(t, n) for t, n in con.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
    assert {("table", t) for t in ("unihashes_v3", "outhashes_v2", "users", "config")} <= objs
    assert {("index", i) for i in ("taskhash_lookup_v4", "unihash_lookup_v1", "outhash_lookup_v3",
                                    "config_lookup")} <= objs
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in con.execute("PRAGMA table_info(outhashes_v2)")]
    assert cols == ["id", "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task",
                    "outhash_siginfo"]
    assert [r[1] for r in con.execute("PRAGMA table_info(unihashes_v3)")] == [
        "id", "method", "taskhash", "unihash", "gc_mark"]
    # bitbake's pragmas: every connection runs with synchronous = NORMAL (1)
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
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
    # Nothing of bitbake's changed; only sstate-proxy's own dedup table was added.
    assert [r for r in sorted(con.execute("SELECT type, name, sql FROM sqlite_master"))
            if "sstate_proxy" not in r[1]] == schema_before
    con.close()


async def test_lookups_by_taskhash_are_index_seeks(db: SqliteEquivalenceDB):
    """Every (method, taskhash) query the service makes seeks an index."""
    await db.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
    c = db._conn
    queries = [
        ("SELECT taskhash, method, unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
        ("SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
        ("DELETE FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (M, h("t"))),
    ]
    for sql, params in queries:
        plan = " ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "(method=? AND taskhash=?)" in plan, (sql, plan)
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


async def test_memory_db_refused():
    """Readers and the writer thread use separate connections: an in-memory database cannot work."""
    with pytest.raises(ValueError, match="needs a file"):
        SqliteEquivalenceDB(":memory:")


async def test_missing_file_read_only(path: str):
    with pytest.raises(sqlite3.OperationalError):
        SqliteEquivalenceDB(path + ".missing", read_only=True)


async def test_read_only_open_of_a_never_migrated_file_reads_nothing_of_its_own(path: str):
    """A read-only open (e.g. of bitbake-hashserv's own file) has none of sstate-proxy's tables:
    catalog and traffic reads answer "nothing" instead of failing."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE unrelated (a)")
    conn.commit()
    conn.close()
    db = SqliteEquivalenceDB(path, read_only=True)
    try:
        assert await db.traffic_series(0) == []
        assert await db.top_missed_recipes(0, 5) == []
        assert await db.object_usage() == (0, 0)
        assert await db.lru_objects(None, 5) == []
    finally:
        await db.close()


async def test_generation_sees_a_foreign_writer(db: SqliteEquivalenceDB, path: str):
    """A raw writer on the file (e.g. bitbake-hashserv) moves the generation."""
    g = await db.generation()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO config (name, value) VALUES ('x', 'y')")
    con.commit()
    con.close()
    assert await db.generation() != g


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


