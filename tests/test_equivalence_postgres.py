"""The PostgreSQL engine beyond the shared suite: replicas, notifications, migrations, bitbake
interop, and a PostgreSQL that goes away and comes back (on the throwaway cluster of tests/pg.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.auth import Auth, hash_token
from storage.equivalence import DatabaseUnavailable, migrations, open_equivalence_db
from storage.equivalence.postgres import PostgresEquivalenceDB
from tests.pg import PgCluster, start_cluster
from tests.test_equivalence_db import FULL_KEYS, M, h, moved

# The tables as bitbake-hashserv 2.19's SQLAlchemy engine creates them on PostgreSQL
# (`create_all`, as observed with `\d` on bitbake 2.19).
BITBAKE_DDL = """
CREATE TABLE unihashes_v3 (id SERIAL NOT NULL, method TEXT NOT NULL, taskhash TEXT NOT NULL,
    unihash TEXT NOT NULL, gc_mark TEXT NOT NULL, PRIMARY KEY (id), UNIQUE (method, taskhash));
CREATE INDEX taskhash_lookup_v4 ON unihashes_v3 (method, taskhash);
CREATE INDEX unihash_lookup_v1 ON unihashes_v3 (unihash);
CREATE TABLE outhashes_v2 (id SERIAL NOT NULL, method TEXT NOT NULL, taskhash TEXT NOT NULL,
    outhash TEXT NOT NULL, created TIMESTAMP WITHOUT TIME ZONE, owner TEXT, "PN" TEXT, "PV" TEXT,
    "PR" TEXT, task TEXT, outhash_siginfo TEXT, PRIMARY KEY (id), UNIQUE (method, taskhash, outhash));
CREATE INDEX outhash_lookup_v3 ON outhashes_v2 (method, outhash);
CREATE TABLE users (id SERIAL NOT NULL, username TEXT NOT NULL, token TEXT NOT NULL, permissions TEXT,
    PRIMARY KEY (id), UNIQUE (username));
CREATE TABLE config (id SERIAL NOT NULL, name TEXT NOT NULL, value TEXT, PRIMARY KEY (id), UNIQUE (name));
CREATE INDEX config_lookup ON config (name);
"""


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def describe(cluster: PgCluster, url: str) -> str:
    """Columns, types, nullability and indexes of bitbake's four tables, as text to compare."""
    return cluster.psql(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_name IN ('unihashes_v3', 'outhashes_v2', 'users', 'config') ORDER BY table_name, ordinal_position;"
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename IN "
        "('unihashes_v3', 'outhashes_v2', 'users', 'config') ORDER BY tablename, indexname", dbname(url))


# --- replicas ---------------------------------------------------------------------------------------
async def test_concurrent_first_reports_two_replicas_one_unihash(pg_url: str):
    a, b = open_equivalence_db(pg_url), open_equivalence_db(pg_url)
    try:
        for i in range(30):
            # One taskhash reported first by both replicas at once, other outhashes.
            ra, rb = await asyncio.gather(
                a.insert_report({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"oa{i}")}, h(f"ua{i}")),
                b.insert_report({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"ob{i}")}, h(f"ub{i}")))
            assert ra["unihash"] == rb["unihash"] == (await a.get_unihash(M, h(f"t{i}")))["unihash"]
            # Two taskhashes with one outhash, first reported at once: one unihash for both.
            rc, rd = await asyncio.gather(
                a.insert_report({"method": M, "taskhash": h(f"c{i}"), "outhash": h(f"oc{i}")}, h(f"uc{i}")),
                b.insert_report({"method": M, "taskhash": h(f"d{i}"), "outhash": h(f"oc{i}")}, h(f"ud{i}")))
            assert rc["unihash"] == rd["unihash"]
    finally:
        await a.close()
        await b.close()


async def test_generation_sees_other_replicas_and_plain_sql(pg_cluster: PgCluster, pg_url: str):
    a, b = open_equivalence_db(pg_url), open_equivalence_db(pg_url)
    try:
        await a.get_unihash(M, h("x"))
        await b.get_unihash(M, h("x"))
        await asyncio.sleep(0.3)  # listening
        g = await b.generation()
        assert await b.generation() == g  # stable while nothing changes
        await a.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
        assert await moved(b, g, within_s=1.0)
        # A plain INSERT, as bitbake-hashserv writes (no sstate-proxy code involved).
        await asyncio.sleep(0.2)
        g = await b.generation()
        pg_cluster.psql(f"INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) "
                        f"VALUES ('{M}', '{h('t2')}', '{h('u2')}', '')", dbname(pg_url))
        assert await moved(b, g, within_s=1.0)
        # An ignored insert moves nothing.
        await asyncio.sleep(0.2)
        g = await b.generation()
        pg_cluster.psql(f"INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) "
                        f"VALUES ('{M}', '{h('t2')}', '{h('u3')}', '') ON CONFLICT DO NOTHING", dbname(pg_url))
        await asyncio.sleep(0.3)
        assert await b.generation() == g
    finally:
        await a.close()
        await b.close()


# --- migrations -------------------------------------------------------------------------------------
def applied(cluster: PgCluster, url: str) -> list[int]:
    out = cluster.psql("SELECT version FROM sstate_proxy_migrations ORDER BY version", dbname(url))
    return [int(x) for x in out.split()]


async def test_migrations_fresh_and_concurrent(pg_cluster: PgCluster, pg_url: str):
    dbs = [open_equivalence_db(pg_url) for _ in range(4)]
    try:
        # Four "replicas" start at once: every migration applied exactly once, none fails.
        await asyncio.gather(*(d.get_unihash(M, h("t")) for d in dbs))
    finally:
        for d in dbs:
            await d.close()
    assert applied(pg_cluster, pg_url) == [m.version for m in migrations.MIGRATIONS]
    again = open_equivalence_db(pg_url)
    try:
        await again.get_unihash(M, h("t"))
    finally:
        await again.close()
    assert applied(pg_cluster, pg_url) == [m.version for m in migrations.MIGRATIONS]


async def test_fresh_schema_matches_bitbakes(pg_cluster: PgCluster, pg_url: str):
    ours = pg_url
    theirs = pg_cluster.create_database("bb")
    pg_cluster.psql(BITBAKE_DDL, dbname(theirs))
    db = open_equivalence_db(ours)
    try:
        await db.get_unihash(M, h("t"))
    finally:
        await db.close()
    assert describe(pg_cluster, ours) == describe(pg_cluster, theirs)


async def test_bitbake_made_schema_opens_as_it_is(pg_cluster: PgCluster, pg_url: str):
    name = dbname(pg_url)
    pg_cluster.psql(BITBAKE_DDL, name)
    token = "s3cret-token"
    pg_cluster.psql(
        "INSERT INTO outhashes_v2 (method, taskhash, outhash, created, owner, \"PN\") VALUES "
        f"('{M}', '{h('t1')}', '{h('o1')}', '2026-12-03 03:20:59.296026', 'alice', 'zlib');"
        f"INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES ('{M}', '{h('t1')}', '{h('u1')}', '');"
        f"INSERT INTO users (username, token, permissions) VALUES ('alice', '{hash_token(token)}', '@read @report')",
        name)
    before = describe(pg_cluster, pg_url)
    db = open_equivalence_db(pg_url)
    try:
        full = await db.get_unihash_full(M, h("t1"))
        assert set(full) == FULL_KEYS
        assert full["unihash"] == h("u1") and full["PN"] == "zlib" and full["owner"] == "alice"
        assert full["created"] == "2026-12-03T03:20:59.296026"  # as bitbake's engine returns it
        identity = await Auth(db).authenticate("alice", token)
        assert identity is not None and identity.username == "alice"
        assert await Auth(db).authenticate("alice", "wrong") is None
        # Writes on it: ids continue bitbake's serials.
        r = await db.insert_report({"method": M, "taskhash": h("t2"), "outhash": h("o1")}, h("u2"))
        assert r["unihash"] == h("u1")
    finally:
        await db.close()
    assert describe(pg_cluster, pg_url) == before  # bitbake's tables untouched
    assert applied(pg_cluster, pg_url) == [m.version for m in migrations.MIGRATIONS]


async def test_read_only_open_of_a_bitbake_database(pg_cluster: PgCluster, pg_url: str):
    pg_cluster.psql(BITBAKE_DDL, dbname(pg_url))
    db = open_equivalence_db(pg_url, read_only=True)
    try:
        assert await db.get_unihash(M, h("t")) is None
        assert await db.archive_alias("a/b") is None  # no sstate_proxy_archives: nothing aliased
        assert await db.dedup_stats() == {"objects": 0, "unique": 0, "bytes_saved": 0}
        with pytest.raises(PermissionError):
            await db.insert_unihash(M, h("t"), h("u"))
    finally:
        await db.close()
    assert "sstate_proxy" not in pg_cluster.psql("\\dt", dbname(pg_url))  # a read-only open migrates nothing


async def test_unihashes_v2_upgrade(pg_cluster: PgCluster, pg_url: str):
    name = dbname(pg_url)
    pg_cluster.psql("CREATE TABLE unihashes_v2 (id SERIAL PRIMARY KEY, method TEXT NOT NULL, "
                    "taskhash TEXT NOT NULL, unihash TEXT NOT NULL, UNIQUE (method, taskhash));"
                    f"INSERT INTO unihashes_v2 (method, taskhash, unihash) VALUES ('{M}', '{h('t1')}', '{h('u1')}'),"
                    f" ('{M}', '{h('t2')}', '{h('u2')}')", name)
    db = open_equivalence_db(pg_url)
    try:
        assert (await db.get_unihash(M, h("t2")))["unihash"] == h("u2")
        assert await db.insert_unihash(M, h("t3"), h("u3"))  # the serial moved past the copied ids
    finally:
        await db.close()
    assert "unihashes_v2" not in pg_cluster.psql("\\dt", name)


def test_sqlite_migrations(tmp_path: Path):
    """SQLite: versions recorded once; an existing sstate-proxy/bitbake file without the version
    table gets it; two processes opening at once apply each migration once."""
    import sqlite3

    path = tmp_path / "h.db"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE unihashes_v3 (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, "
                      "taskhash TEXT NOT NULL, unihash TEXT NOT NULL, gc_mark TEXT NOT NULL, UNIQUE(method, taskhash));"
                      f"INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES ('{M}', 'T', 'U', '')")
    con.close()
    script = ("import asyncio, sys; sys.path.insert(0, sys.argv[2]); "
              "from storage.equivalence import open_equivalence_db; "
              "asyncio.run(open_equivalence_db('sqlite:///' + sys.argv[1]).close())")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(Path(__file__).parent.parent)])
             for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    con = sqlite3.connect(path)
    rows = con.execute("SELECT version FROM sstate_proxy_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in migrations.MIGRATIONS]
    assert con.execute("SELECT unihash FROM unihashes_v3 WHERE taskhash = 'T'").fetchone() == ("U",)
    con.close()


# --- PostgreSQL goes away and comes back ---------------------------------------------------------------
@pytest.fixture
def own_cluster():
    """A cluster of this test's own (it is stopped and started)."""
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


async def test_engine_unavailable_then_back(own_cluster: PgCluster):
    url = own_cluster.create_database()
    db = open_equivalence_db(url)
    try:
        await db.insert_unihash(M, h("t"), h("u"))
        await asyncio.gather(*(db.class_of(h("t"), (), 5) for _ in range(8)))  # several pooled connections
        own_cluster.stop("fast")
        with pytest.raises(DatabaseUnavailable):
            await db.get_unihash(M, h("t"))
        with pytest.raises(DatabaseUnavailable):
            await db.insert_unihash(M, h("t2"), h("u"))
        await asyncio.sleep(0.1)  # the listener sees its connection end
        g1 = await db.generation()
        assert await db.generation() != g1  # nothing cached can be trusted while not listening
        own_cluster.start()
        for _ in range(12):  # no stale pooled connection fails a request after the restart
            assert (await db.get_unihash(M, h("t")))["unihash"] == h("u")
        assert await db.insert_unihash(M, h("t2"), h("u"))
        # The listener is back: generation() is stable again and moves on a foreign write.
        deadline = time.monotonic() + 10
        while True:
            g = await db.generation()
            await asyncio.sleep(0.3)
            if await db.generation() == g:
                break
            assert time.monotonic() < deadline, "the listener did not reconnect"
        own_cluster.psql(f"DELETE FROM unihashes_v3 WHERE taskhash = '{h('t2')}'", dbname(url))
        assert await moved(db, g)
    finally:
        await db.close()


def _call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def test_service_survives_a_postgresql_restart(own_cluster: PgCluster, service_factory):
    url = own_cluster.create_database()
    svc = service_factory(config={"database": {"url": url}}, args=["--anon-perms", "@read,@report"]).start()
    key = f"universal/ab/cd/sstate:zlib::1.3:r0::14:{h('obj')}_populate_sysroot.tar.zst"
    (svc.storage / key).parent.mkdir(parents=True, exist_ok=True)
    (svc.storage / key).write_bytes(b"zstd bytes")
    method = quote("oe.sstatesig.OEOuthashBasic")
    report = json.dumps({"taskhash": h("t"), "method": "oe.sstatesig.OEOuthashBasic", "outhash": h("o"),
                         "unihash": h("u")}).encode()
    resp, body = _call(svc.port, "POST", "/v1/equivalent", report, {"Content-Type": "application/json"})
    assert resp.status == 200, body
    resp, _ = _call(svc.port, "HEAD", "/" + key)
    assert resp.status == 200

    own_cluster.stop("fast")
    resp, body = _call(svc.port, "GET", f"/v1/equivalent?method={method}&taskhash={h('t')}")
    assert resp.status == 503 and resp.getheader("Retry-After"), body
    resp, _ = _call(svc.port, "HEAD", "/" + key)  # a hit needs no database
    assert resp.status == 200
    resp, _ = _call(svc.port, "GET", "/" + key)
    assert resp.status == 200

    own_cluster.start()
    resp, body = _call(svc.port, "GET", f"/v1/equivalent?method={method}&taskhash={h('t')}")
    assert resp.status == 200 and json.loads(body)["unihash"] == h("u"), body
    resp, body = _call(svc.port, "POST", "/v1/equivalent", report.replace(h("t").encode(), h("t2").encode()),
                       {"Content-Type": "application/json"})
    assert resp.status == 200 and json.loads(body)["unihash"] == h("u"), body
    assert svc.proc is not None and svc.proc.poll() is None  # never restarted


# --- interop with the real bitbake-hashserv on PostgreSQL (optional) -------------------------------------
BITBAKE_DIR = os.environ.get("BITBAKE_DIR")
# A Python with bitbake-hashserv's PostgreSQL needs: sqlalchemy[asyncio] (greenlet) and asyncpg.
BITBAKE_PYTHON = os.environ.get("BITBAKE_PYTHON", sys.executable)


def _bitbake_python_ok() -> bool:
    if not BITBAKE_DIR:
        return False
    r = subprocess.run([BITBAKE_PYTHON, "-c", "import sqlalchemy, greenlet, asyncpg"], capture_output=True)
    return r.returncode == 0


def _bitbake_client(sock: str, ops: str, user: str | None = None, token: str | None = None) -> dict:
    """Run ``ops`` (Python statements using ``c``, filling ``out``) with bitbake's own client."""
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {os.path.join(BITBAKE_DIR or '', 'lib')!r})
        import hashserv
        deadline = time.monotonic() + 30
        while True:  # it listens before its tables exist: wait for an answered request
            try:
                c = hashserv.create_client({'unix://' + sock!r}, {user!r}, {token!r})
                c.get_unihash('probe', '0' * 64)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        out = {{}}
    """) + textwrap.dedent(ops) + "\nprint(json.dumps(out, default=str))\n"
    res = subprocess.run([BITBAKE_PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


class _BitbakeHashserv:
    def __init__(self, url: str, tmp: Path) -> None:
        self.sock = str(tmp / "bb.sock")
        dburl = url.replace("postgresql://", "postgresql+asyncpg://")
        self.proc = subprocess.Popen(
            [BITBAKE_PYTHON, os.path.join(BITBAKE_DIR or "", "bin", "bitbake-hashserv"), "--bind",
             "unix://" + self.sock, "--database", dburl, "--admin-user", "admin", "--admin-password", "adminpw",
             "--anon-perms", "@read"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "bb.log", "ab"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.skipif(not _bitbake_python_ok(),
                    reason="set BITBAKE_DIR to a bitbake checkout (and BITBAKE_PYTHON to a Python with "
                           "sqlalchemy[asyncio] and asyncpg) to test interop with bitbake-hashserv")
async def test_bitbake_hashserv_postgresql_interop(pg_cluster: PgCluster, pg_url: str, tmp_path: Path):
    # 1. bitbake-hashserv creates and fills the database.
    bb = _BitbakeHashserv(pg_url, tmp_path)
    try:
        out = _bitbake_client(bb.sock, f"""
            out['r1'] = c.report_unihash({h('t1')!r}, {M!r}, {h('o1')!r}, {h('u1')!r},
                                          {{'PN': 'zlib', 'PV': '1.3', 'PR': 'r0', 'task': 'do_install'}})
            out['r2'] = c.report_unihash({h('t2')!r}, {M!r}, {h('o1')!r}, {h('u2')!r})
            out['bob'] = c.new_user('bob', ['@read', '@report'])
            out['full'] = c.get_taskhash({M!r}, {h('t1')!r}, True)
        """, "admin", "adminpw")
    finally:
        bb.stop()
    assert out["r2"]["unihash"] == h("u1")
    bob_token = out["bob"]["token"]
    # 2. We open it as it is: rows, created, users and their logins.
    db = open_equivalence_db(pg_url)
    assert isinstance(db, PostgresEquivalenceDB)
    try:
        full = await db.get_unihash_full(M, h("t1"))
        assert full["unihash"] == h("u1") and full["PN"] == "zlib" and full["task"] == "do_install"
        assert full["created"] == out["full"]["created"]  # the same text bitbake answers
        assert (await db.get_unihash(M, h("t2")))["unihash"] == h("u1")
        auth = Auth(db)
        assert (await auth.authenticate("admin", "adminpw")) is not None
        bob = await auth.authenticate("bob", bob_token)
        assert bob is not None and set(bob.permissions) >= {"@read", "@report"}
        # 3. We write; bitbake-hashserv opens the database again and reads it.
        r3 = await db.insert_report({"method": M, "taskhash": h("t3"), "outhash": h("o3"), "PN": "bash",
                                     "owner": "bob"}, h("u3"))
        assert r3["unihash"] == h("u3")
        carol_token = await auth.new_user("carol", ("@read", "@report"))
        await asyncio.sleep(0.3)
        g = await db.generation()
        bb = _BitbakeHashserv(pg_url, tmp_path)
        try:
            out = _bitbake_client(bb.sock, f"""
                out['full3'] = c.get_taskhash({M!r}, {h('t3')!r}, True)
                out['me'] = c.get_user()
                out['r4'] = c.report_unihash({h('t4')!r}, {M!r}, {h('o3')!r}, {h('u4')!r})
            """, "carol", carol_token)
        finally:
            bb.stop()
        assert out["full3"]["unihash"] == h("u3") and out["full3"]["PN"] == "bash" and out["full3"]["owner"] == "bob"
        assert out["me"]["username"] == "carol"
        assert out["r4"]["unihash"] == h("u3")  # bitbake's report found our row as the equivalent
        # bitbake-hashserv's own write reached our generation() through the trigger.
        assert await moved(db, g)
        assert (await db.get_unihash(M, h("t4")))["unihash"] == h("u3")
    finally:
        await db.close()
    # 4. A database created by us (not by bitbake) is opened by bitbake-hashserv as well.
    fresh = pg_cluster.create_database("ours")
    db = open_equivalence_db(fresh)
    try:
        await db.insert_report({"method": M, "taskhash": h("t5"), "outhash": h("o5")}, h("u5"))
    finally:
        await db.close()
    bb = _BitbakeHashserv(fresh, tmp_path)
    try:
        out = _bitbake_client(bb.sock, f"""
            out['r6'] = c.report_unihash({h('t6')!r}, {M!r}, {h('o5')!r}, {h('u6')!r})
            out['usage'] = c.get_db_usage()
        """, "admin", "adminpw")
    finally:
        bb.stop()
    assert out["r6"]["unihash"] == h("u5")
    assert out["usage"]["unihashes_v3"]["rows"] == 2


async def test_pool_is_bounded(pg_cluster: PgCluster, pg_url: str):
    db = open_equivalence_db(pg_url, pool_size=2)
    try:
        await db.insert_unihash(M, h("t"), h("u"))

        async def slow(c):
            await c.execute("SELECT pg_sleep(0.2)")
        await asyncio.gather(*(db._run(slow) for _ in range(8)))  # type: ignore[attr-defined]
        busy = await asyncio.gather(*(db.get_unihash(M, h("t")) for _ in range(20)),
                                    asyncio.to_thread(pg_cluster.psql, "SELECT count(*) FROM pg_stat_activity "
                                                      f"WHERE datname = '{dbname(pg_url)}'"))
        assert int(busy[-1]) <= 4  # two pooled + one listening connection + psql itself
    finally:
        await db.close()


def test_service_starts_while_postgresql_is_down(own_cluster: PgCluster, service_factory):
    """Started before its database: 503 until PostgreSQL is up, then the schema is migrated and
    requests succeed, with no restart."""
    url = own_cluster.create_database()
    own_cluster.stop("fast")
    svc = service_factory(config={"database": {"url": url}}).start()
    method = quote("oe.sstatesig.OEOuthashBasic")
    resp, body = _call(svc.port, "GET", f"/v1/equivalent?method={method}&taskhash={h('t')}")
    assert resp.status == 503 and resp.getheader("Retry-After"), body
    own_cluster.start()
    resp, body = _call(svc.port, "GET", f"/v1/equivalent?method={method}&taskhash={h('t')}")
    assert resp.status == 200 and json.loads(body) is None, body
    assert applied(own_cluster, url) == [m.version for m in migrations.MIGRATIONS]


def test_passwords_from_url_env_and_pgpass(tmp_path: Path):
    """A password-protected server: the password from the URL, PGPASSWORD, or a password file
    (~/.pgpass; PGPASSFILE names another) — asyncpg reads the last two as libpq does."""
    secret = "pw-for-tests"
    cluster = start_cluster(password=secret)
    try:
        url = cluster.create_database()  # postgresql://postgres@127.0.0.1:PORT/db, no password
        with_pw = url.replace("postgres@", f"postgres:{secret}@")
        pgpass = tmp_path / "pgpass"
        pgpass.write_text(f"127.0.0.1:{cluster.port}:*:postgres:{secret}\n")
        pgpass.chmod(0o600)
        script = ("import asyncio, sys; sys.path.insert(0, sys.argv[2]); "
                  "from storage.equivalence import open_equivalence_db\n"
                  "async def main():\n"
                  "    db = open_equivalence_db(sys.argv[1])\n"
                  "    try:\n"
                  "        print(await db.get_unihash('M', 'T'))\n"
                  "    finally:\n"
                  "        await db.close()\n"
                  "asyncio.run(main())")
        repo = str(Path(__file__).parent.parent)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        base["PGPASSFILE"] = str(tmp_path / "none")  # not the invoking user's own ~/.pgpass
        cases = [(with_pw, {}), (url, {"PGPASSWORD": secret}), (url, {"PGPASSFILE": str(pgpass)})]
        for u, env in cases:
            r = subprocess.run([sys.executable, "-c", script, u, repo], env={**base, **env},
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == "None", (env, r.stderr[-2000:])
        r = subprocess.run([sys.executable, "-c", script, url, repo], env=base, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and "DatabaseUnavailable" not in r.stderr.splitlines()[-1] \
            and "password" in r.stderr.lower()  # no password: refused (not "unavailable")
    finally:
        cluster.destroy()


async def test_a_role_without_create_rights_uses_a_migrated_database(pg_cluster: PgCluster, pg_url: str):
    owner = open_equivalence_db(pg_url)
    try:
        await owner.get_unihash(M, h("t"))  # migrated by the owner
        role = f"app_{dbname(pg_url)}"
        pg_cluster.psql(f"CREATE ROLE {role} LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC;"
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};"
                        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}", dbname(pg_url))
        app = open_equivalence_db(pg_url.replace("postgres@", f"{role}@"))
        try:
            await owner.generation()
            await asyncio.sleep(0.3)
            g = await owner.generation()
            r = await app.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
            assert r["unihash"] == h("u")
            assert await moved(owner, g)  # the owner's trigger fires for the app role's writes
        finally:
            await app.close()
    finally:
        await owner.close()
