"""`sstate-proxy db copy SRC_URL DST_URL`: every row, every column, idempotent, logins kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.auth import Auth
from proxy.dbcopy import TABLES
from storage.equivalence import TrafficRow, open_equivalence_db
from tests.service import REPO

M = "oe.sstatesig.OEOuthashBasic"


def h(n: int | str) -> str:
    return f"{n}".encode().hex().ljust(64, "0")[:64]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SSTATE_PROXY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


async def fill(url: str) -> str:
    """A source database with every kind of row; returns the user's token."""
    db = open_equivalence_db(url)
    try:
        for i in range(2500):  # more than one batch
            await db.insert_report({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"o{i % 700}"),
                                    "owner": f"builder{i % 3}", "PN": "zlib", "PV": "1.3", "PR": "r0",
                                    "task": "do_populate_sysroot", "outhash_siginfo": f"sig{i}"}, h(f"u{i}"))
        await db.insert_outhash({"method": M, "taskhash": h("lonely"), "outhash": h("lonely-out"),
                                 "created": "2020-01-02T03:04:05.000006+00:00"})
        await db.gc_mark("mark-1", {"method": M, "taskhash": h("t1")})
        token = await Auth(db).new_user("alice", ("@read", "@report"))
        assert token
        await Auth(db).new_user("admin", ("@all",))
        await db.record_archive("a/x.tar.zst", "identity-1", 100)
        await db.record_archive("a/y.tar.zst", "identity-1", 100)
        await db.record_archive("a/z.tar.zst", "identity-2", 7)
        await db.record_object("a/x.tar.zst", 100, "local", 1_700_000_000.25)
        await db.record_object("b/pulled.tar.zst", 5_000_000_000, "upstream", 1_700_000_100.5)
        await db.add_traffic([TrafficRow(1_700_000_000, "hit", "", 12, 3_000_000_000),
                              TrafficRow(1_700_000_000, "miss", "zlib", 4, 0),
                              TrafficRow(1_700_000_060, "report", "", 9, 0)])
        return token
    finally:
        await db.close()


async def dump(url: str) -> dict[str, list[dict]]:
    db = open_equivalence_db(url, read_only=True)
    try:
        return {t: [r async for batch in db.iter_rows(t, 333) for r in batch] for t in TABLES}
    finally:
        await db.close()


async def logs_in(url: str, user: str, token: str) -> bool:
    db = open_equivalence_db(url, read_only=True)
    try:
        return await Auth(db).authenticate(user, token) is not None
    finally:
        await db.close()


def copied_total(stdout: str) -> int:
    line = [ln for ln in stdout.splitlines() if ln.startswith("total")][0]
    return int(line.split()[3])


def test_sqlite_to_sqlite_copies_every_row_and_is_idempotent(tmp_path: Path):
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    token = asyncio.run(fill(src))
    first = cli("db", "copy", src, dst)
    assert first.returncode == 0, first.stderr
    rows = asyncio.run(dump(src))
    assert len(rows["outhashes_v2"]) == 2501 and len(rows["unihashes_v3"]) == 2500
    assert copied_total(first.stdout) == sum(len(v) for v in rows.values())
    assert asyncio.run(dump(dst)) == rows
    assert any(r["gc_mark"] == "mark-1" for r in rows["unihashes_v3"])
    assert {"name": "gc-mark", "value": "mark-1"} in rows["config"]
    assert len(rows["sstate_proxy_objects"]) == 2 and len(rows["sstate_proxy_traffic"]) == 3
    again = cli("db", "copy", src, dst)
    assert again.returncode == 0, again.stderr
    assert copied_total(again.stdout) == 0
    assert asyncio.run(dump(dst)) == rows
    assert asyncio.run(logs_in(dst, "alice", token))
    assert not asyncio.run(logs_in(dst, "alice", token + "x"))


def test_the_destination_answers_like_the_source(tmp_path: Path):
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    asyncio.run(fill(src))
    assert cli("db", "copy", src, dst).returncode == 0

    async def answers(url: str):
        db = open_equivalence_db(url, read_only=True)
        try:
            return ([await db.get_unihash_full(M, h(f"t{i}")) for i in (0, 1, 700, 2499)],
                    await db.class_of(h("u0"), (), 16), await db.gc_status(),
                    await db.archive_alias("a/y.tar.zst"), await db.dedup_stats(),
                    await db.object_usage("upstream"), await db.lru_objects(None, 10),
                    await db.traffic_series(0))
        finally:
            await db.close()

    a, b = asyncio.run(answers(src)), asyncio.run(answers(dst))
    for x, y in zip(a[0], b[0], strict=True):
        assert {k: v for k, v in x.items() if k != "id"} == {k: v for k, v in y.items() if k != "id"}
    assert a[1:] == b[1:]


def test_rows_already_in_the_destination_are_kept(tmp_path: Path):
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    token = asyncio.run(fill(src))

    async def prepare():
        db = open_equivalence_db(dst)
        try:
            other = await Auth(db).new_user("alice", ("@read",))
            await db.insert_unihash(M, h("t0"), h("first-writer"))
            return other
        finally:
            await db.close()

    other = asyncio.run(prepare())
    assert cli("db", "copy", src, dst).returncode == 0
    assert asyncio.run(logs_in(dst, "alice", other))
    assert not asyncio.run(logs_in(dst, "alice", token))
    rows = asyncio.run(dump(dst))["unihashes_v3"]
    assert [r["unihash"] for r in rows if r["taskhash"] == h("t0")] == [h("first-writer")]


@pytest.mark.parametrize("src,dst,words", [
    ("foo://x", "sqlite:///{tmp}/d.db", "unsupported database url"),
    ("sqlite:///{tmp}/missing.db", "sqlite:///{tmp}/d.db", "cannot open source"),
    ("sqlite://", "sqlite:///{tmp}/d.db", "source"),
    ("sqlite:///{tmp}/s.db", "sqlite:///{tmp}/s.db", "same database"),
    ("sqlite:///{tmp}/s.db", "mysql://u:secret@h/db", "unsupported"),
    ("sqlite:///{tmp}/s.db", "postgresql://u:secret@h:port/db", "bad PostgreSQL url"),
])
def test_a_bad_url_exits_2_with_one_line(tmp_path: Path, src: str, dst: str, words: str):
    asyncio.run(fill(f"sqlite:///{tmp_path / 's.db'}")) if "s.db" in src else None
    r = cli("db", "copy", src.format(tmp=tmp_path), dst.format(tmp=tmp_path))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr
    assert "secret" not in r.stderr
    assert r.stdout == ""


def test_sqlite_to_postgresql_and_back(tmp_path: Path, pg_url: str):
    src, back = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'back.db'}"
    token = asyncio.run(fill(src))
    rows = asyncio.run(dump(src))
    to_pg = cli("db", "copy", src, pg_url)
    assert to_pg.returncode == 0, to_pg.stderr
    assert copied_total(to_pg.stdout) == sum(len(v) for v in rows.values())
    assert asyncio.run(dump(pg_url)) == rows
    assert asyncio.run(logs_in(pg_url, "alice", token))
    again = cli("db", "copy", src, pg_url)
    assert again.returncode == 0 and copied_total(again.stdout) == 0, again.stderr
    from_pg = cli("db", "copy", pg_url, back)
    assert from_pg.returncode == 0, from_pg.stderr
    assert asyncio.run(dump(back)) == rows
    assert asyncio.run(logs_in(back, "alice", token))
    assert copied_total(cli("db", "copy", pg_url, back).stdout) == 0


def test_the_postgresql_copy_answers_like_the_source(tmp_path: Path, pg_url: str):
    src = f"sqlite:///{tmp_path / 'src.db'}"
    asyncio.run(fill(src))
    assert cli("db", "copy", src, pg_url).returncode == 0

    async def answers(url: str):
        db = open_equivalence_db(url, read_only=True)
        try:
            return ([(await db.get_unihash_full(M, h(f"t{i}")))["unihash"] for i in (0, 1, 700, 2499)],
                    await db.class_of(h("u0"), (), 16), await db.gc_status(),
                    await db.archive_alias("a/y.tar.zst"), await db.dedup_stats(),
                    [(u.username, u.permissions) for u in await db.get_all_users()],
                    await db.object_usage("upstream"), await db.lru_objects(None, 10),
                    await db.traffic_series(0))
        finally:
            await db.close()

    assert asyncio.run(answers(src)) == asyncio.run(answers(pg_url))


def test_an_unreachable_postgresql_exits_2_with_one_line(tmp_path: Path):
    from tests.service import free_port

    src = f"sqlite:///{tmp_path / 's.db'}"
    asyncio.run(fill(src))
    r = cli("db", "copy", src, f"postgresql://u:secret@127.0.0.1:{free_port()}/db")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot open destination" in r.stderr, r.stderr
    assert "secret" not in r.stderr


def test_postgresql_to_postgresql(tmp_path: Path, pg_cluster, pg_url: str):
    src = f"sqlite:///{tmp_path / 'src.db'}"
    token = asyncio.run(fill(src))
    assert cli("db", "copy", src, pg_url).returncode == 0
    other = pg_cluster.create_database()
    r = cli("db", "copy", pg_url, other)
    assert r.returncode == 0, r.stderr
    assert asyncio.run(dump(other)) == asyncio.run(dump(src))
    assert asyncio.run(logs_in(other, "alice", token))
