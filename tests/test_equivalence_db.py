"""The EquivalenceDB contract, run against every engine through the Protocol only.

An engine joins the suite by adding one entry to the ``engine`` fixture: something that opens
a fresh database (and a second instance and a read-only instance on the same data).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage.equivalence import MAPPINGS_BATCH, DatabaseUnavailable, EquivalenceDB, User, open_equivalence_db

M = "TestMethod"
M2 = "OtherMethod"


def h(n: int | str) -> str:
    """A valid-looking 64-hex hash, distinct per n."""
    return f"{n}".encode().hex().ljust(64, "0")[:64]


FULL_KEYS = {
    "id", "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task",
    "outhash_siginfo", "unihash", "gc_mark",
}


def ts(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


@dataclass
class Engine:
    name: str
    open: Callable[..., EquivalenceDB]  # open(read_only=False): one more instance on the same data
    fresh: Callable[[], EquivalenceDB]  # an instance on another, empty database
    # How `created` reads back, as bitbake's engine for that database writes it: UTC ISO text with
    # "+00:00" (sqlite), or a naive local timestamp in ISO form (PostgreSQL).
    naive_created: bool = False
    # Concurrent writes of one instance commit in the order they were made (one writer thread)
    # rather than in parallel (a connection pool).
    ordered_writes: bool = True


def _sqlite(tmp_path: Path, request) -> Engine:
    url = f"sqlite:///{tmp_path / 'hashserv.db'}"
    n = iter(range(1_000_000))
    return Engine("sqlite", lambda read_only=False: open_equivalence_db(url, read_only=read_only),
                  lambda: open_equivalence_db(f"sqlite:///{tmp_path / f'other{next(n)}.db'}"))


def _postgres(tmp_path: Path, request) -> Engine:
    cluster = request.getfixturevalue("pg_cluster")  # tests/pg.py: skipped locally, failed in CI if missing
    url = cluster.create_database()
    return Engine("postgres", lambda read_only=False: open_equivalence_db(url, read_only=read_only),
                  lambda: open_equivalence_db(cluster.create_database()), naive_created=True,
                  ordered_writes=False)


ENGINES = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path: Path) -> Engine:
    return ENGINES[request.param](tmp_path, request)


async def moved(db: EquivalenceDB, before: int, within_s: float = 1.0) -> bool:
    """True once ``db.generation()`` differs from ``before`` (another instance's commit reaches
    a PostgreSQL engine as a notification, within milliseconds; SQLite sees it at once)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        if await db.generation() != before:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)


@pytest.fixture
async def db(engine: Engine):
    d = engine.open()
    yield d
    await d.close()


# --- lookups and writes --------------------------------------------------------------------------
async def test_insert_unihash_first_writer_wins(db: EquivalenceDB):
    assert await db.get_unihash(M, h("t")) is None
    assert await db.insert_unihash(M, h("t"), h("u1")) is True
    assert await db.insert_unihash(M, h("t"), h("u2")) is False
    assert (await db.get_unihash(M, h("t")))["unihash"] == h("u1")
    # Per method.
    assert await db.insert_unihash(M2, h("t"), h("u2")) is True
    assert (await db.get_unihash(M2, h("t")))["unihash"] == h("u2")
    assert await db.unihash_exists(h("u1")) and await db.unihash_exists(h("u2"))
    assert not await db.unihash_exists(h("nope"))


async def test_insert_outhash_and_created(db: EquivalenceDB, engine: Engine):
    row = {"method": M, "taskhash": h("t"), "outhash": h("o"), "owner": "me", "PN": "zlib", "junk": 1}
    assert await db.insert_outhash(row) is True
    assert await db.insert_outhash(dict(row, owner="other")) is False
    bare = await db.get_outhash(M, h("o"), with_unihash=False)
    assert bare is not None
    assert set(bare) == FULL_KEYS - {"unihash", "gc_mark"}
    assert bare["owner"] == "me" and bare["PV"] is None
    created = bare["created"]
    assert isinstance(created, str) and "T" in created
    if engine.naive_created:  # bitbake's PostgreSQL engine: naive local time
        assert datetime.fromisoformat(created).tzinfo is None
        assert abs(datetime.fromisoformat(created) - datetime.now()) < timedelta(seconds=10)
    else:
        assert created.endswith("+00:00")
        assert abs(datetime.fromisoformat(created) - datetime.now(UTC)) < timedelta(seconds=10)
    # Not joined without a unihash row.
    assert await db.get_outhash(M, h("o")) is None
    assert await db.get_unihash_full(M, h("t")) is None
    # A datetime is stored as UTC ISO text (sqlite) or local time (PostgreSQL).
    when = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    await db.insert_outhash({"method": M, "taskhash": h("t2"), "outhash": h("o2"), "created": when})
    want = when.astimezone().replace(tzinfo=None).isoformat() if engine.naive_created else "2025-01-01T12:00:00+00:00"
    assert (await db.get_outhash(M, h("o2"), False))["created"] == want
    with pytest.raises(KeyError):
        await db.insert_outhash({"method": M, "taskhash": h("t3")})


async def test_full_rows_and_oldest(db: EquivalenceDB):
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


async def test_equivalent_oldest_other_with_unihash(db: EquivalenceDB):
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


async def test_insert_report(db: EquivalenceDB):
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
async def _populate(db: EquivalenceDB) -> None:
    for i in range(3):
        await db.insert_report({"method": M, "taskhash": h(f"a{i}"), "outhash": h(f"oa{i}")}, h("UA"))
        await db.insert_report({"method": M, "taskhash": h(f"b{i}"), "outhash": h(f"ob{i}")}, h("UB"))
        await db.insert_report({"method": M2, "taskhash": h(f"c{i}"), "outhash": h(f"oc{i}")}, h("UA"))


async def test_remove_by_taskhash_both_tables(db: EquivalenceDB):
    await _populate(db)
    assert await db.remove({"taskhash": h("a0")}) == 2
    assert await db.get_unihash(M, h("a0")) is None
    assert await db.get_outhash(M, h("oa0"), False) is None
    assert await db.remove({"taskhash": h("a0")}) == 0


async def test_remove_whitelist_and_none(db: EquivalenceDB):
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


async def test_remove_by_unihash_and_method_deviation(db: EquivalenceDB):
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


async def test_clean_unused(db: EquivalenceDB):
    await db.insert_outhash({"method": M, "taskhash": h("old-unused"), "outhash": h("o1"), "created": ts(10)})
    await db.insert_outhash({"method": M, "taskhash": h("new-unused"), "outhash": h("o2"), "created": ts(0)})
    await db.insert_outhash({"method": M, "taskhash": h("old-used"), "outhash": h("o3"), "created": ts(10)})
    await db.insert_unihash(M, h("old-used"), h("u"))
    # a legacy naive `created` (older bitbake), stored as given
    await db.insert_outhash({"method": M, "taskhash": h("naive"), "outhash": h("o4"),
                             "created": "2020-01-01 00:00:00.000000"})
    n = await db.clean_unused(datetime.now(UTC) - timedelta(days=1))
    assert n == 2
    assert await db.get_outhash(M, h("o1"), False) is None
    assert await db.get_outhash(M, h("o4"), False) is None
    assert await db.get_outhash(M, h("o2"), False) is not None
    assert await db.get_outhash(M, h("o3"), False) is not None


async def test_gc(db: EquivalenceDB):
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


async def test_usage_and_columns(db: EquivalenceDB):
    await _populate(db)
    await db.new_user("u", ("@read",), "sha256:1:2")
    usage = await db.get_usage()
    assert usage == {"config": {"rows": 0}, "outhashes_v2": {"rows": 9}, "unihashes_v3": {"rows": 9},
                     "users": {"rows": 1}}
    cols = await db.get_query_columns()
    assert sorted(cols) == sorted(["method", "taskhash", "unihash", "gc_mark", "outhash", "owner", "PN", "PV",
                                   "PR", "task", "outhash_siginfo"])


# --- users -------------------------------------------------------------------------------------------
async def test_users(db: EquivalenceDB, engine: Engine):
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
    other = engine.open()
    try:
        assert (await other.lookup_user("alice")).permissions == ("@all",)
    finally:
        await other.close()
    assert await db.delete_user("alice") is True
    assert await db.delete_user("alice") is False
    assert [u.username for u in await db.get_all_users()] == ["bob"]


# --- class_of ------------------------------------------------------------------------------------------
async def test_class_of_order_and_limit(db: EquivalenceDB):
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


async def test_class_of_identity_and_dedupe(db: EquivalenceDB):
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
async def test_generation_two_instances(engine: Engine):
    a = engine.open()
    b = engine.open()
    try:
        await a.get_unihash(M, h("t"))  # connected, listening
        await b.get_unihash(M, h("t"))
        await asyncio.sleep(0.2)
        ga, gb = await a.generation(), await b.generation()
        assert await a.generation() == ga and await b.generation() == gb
        await a.insert_unihash(M, h("t"), h("u"))
        assert await a.generation() != ga  # the writer's own: at once
        assert await moved(b, gb)
        await asyncio.sleep(0.2)
        ga2, gb2 = await a.generation(), await b.generation()
        # A no-op write (ignored insert) changes nothing.
        await a.insert_unihash(M, h("t"), h("u2"))
        await asyncio.sleep(0.2)
        assert await a.generation() == ga2 and await b.generation() == gb2
        await b.remove({"taskhash": h("t")})
        assert await moved(a, ga2) and await moved(b, gb2)
    finally:
        await a.close()
        await b.close()


async def test_mappings_since_names_new_mappings_in_order(engine: Engine):
    a = engine.open()
    b = engine.open()
    try:
        start, nothing = await b.mappings_since(None)
        assert nothing == []
        assert await b.mappings_since(start) == (start, [])
        await a.insert_unihash(M, h("t1"), h("u1"))
        await a.insert_unihash(M, h("t2"), h("u1"))
        await a.insert_unihash(M, h("t1"), h("other"))  # ignored: nothing new to name
        pos, named = await b.mappings_since(start)
        assert named == [h("t1"), h("u1"), h("t2"), h("u1")]
        assert pos > start and await b.mappings_since(pos) == (pos, [])
        await a.insert_report({"method": M, "taskhash": h("t3"), "outhash": h("o3"), "unihash": h("u3")}, h("u3"))
        pos2, named = await b.mappings_since(pos)
        assert named == [h("t3"), h("u3")] and pos2 > pos
    finally:
        await a.close()
        await b.close()


async def test_mappings_since_overflow_says_so(db: EquivalenceDB):
    start, _ = await db.mappings_since(None)
    rows = [{"method": M, "taskhash": h(f"t{i}"), "unihash": h("u"), "gc_mark": ""} for i in range(MAPPINGS_BATCH + 1)]
    assert await db.copy_in("unihashes_v3", rows) == MAPPINGS_BATCH + 1
    pos, named = await db.mappings_since(start)
    assert named is None  # too many to list: the caller forgets everything instead
    assert await db.mappings_since(pos) == (pos, [])


async def test_read_only(engine: Engine):
    rw = engine.open()
    await rw.insert_report({"method": M, "taskhash": h("t"), "outhash": h("o")}, h("u"))
    await rw.new_user("alice", ("@read",), "sha256:1:2")
    ro = engine.open(read_only=True)
    try:
        assert (await ro.get_unihash(M, h("t")))["unihash"] == h("u")
        assert (await ro.get_outhash(M, h("o")))["taskhash"] == h("t")
        assert (await ro.lookup_user("alice")).permissions == ("@read",)
        assert (await ro.get_usage())["unihashes_v3"] == {"rows": 1}
        assert await ro.class_of(h("t"), (), 5) == [h("u")]
        await asyncio.sleep(0.2)
        g = await ro.generation()
        await rw.insert_unihash(M, h("t2"), h("u"))
        assert await moved(ro, g)
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
            with pytest.raises(PermissionError):
                await call
        assert (await rw.get_unihash(M, h("t")))["unihash"] == h("u")
    finally:
        await ro.close()
        await rw.close()


async def test_insert_report_group_commit_matches_sequential(db: EquivalenceDB, engine: Engine):
    """Concurrent reports (grouped into few transactions) give the answers of the same reports in order."""

    reports = []
    for i in range(40):
        reports.append(({"method": M, "taskhash": h(f"t{i}"), "outhash": h(f"o{i % 7}")}, h(f"u{i}")))
        reports.append(({"method": M, "taskhash": h(f"t{i // 2}"), "outhash": h(f"x{i}")}, h(f"v{i}")))
    g = await db.generation()
    got = await asyncio.gather(*(db.insert_report(r, u) for r, u in reports))
    assert await moved(db, g)
    if not engine.ordered_writes:
        # Reports run in parallel: which of two concurrent first reports of one taskhash wins is
        # open, but every answer is the one unihash stored for its taskhash.
        for (r, _), answer in zip(reports, got, strict=True):
            assert answer == await db.get_unihash(M, r["taskhash"])
        return
    seq = engine.fresh()
    try:
        want = [await seq.insert_report(r, u) for r, u in reports]
    finally:
        await seq.close()
    assert got == want
    assert got[14]["unihash"] == h("u0")  # t7 has outhash o0 -> t0's unihash
    assert got[1]["unihash"] == h("u0")  # t0 again, other outhash: first writer wins


async def test_insert_report_bad_row_fails_alone(db: EquivalenceDB):
    """A report whose statement fails is refused alone; the reports grouped with it are stored."""

    good = db.insert_report({"method": M, "taskhash": h("g"), "outhash": h("o")}, h("u"))
    bad = db.insert_report({"method": M, "taskhash": h("b"), "outhash": h("o"), "PN": ["not", "text"]}, h("u"))
    res = await asyncio.gather(good, bad, return_exceptions=True)
    assert res[0] == {"taskhash": h("g"), "method": M, "unihash": h("u")}
    assert isinstance(res[1], Exception) and not isinstance(res[1], DatabaseUnavailable)
    assert await db.get_unihash(M, h("b")) is None


def test_open_urls():
    from storage.equivalence import UnsupportedDatabase
    from storage.equivalence.postgres import PostgresEquivalenceDB

    # Opening does not connect: these need no server.
    for url in ("postgresql://u@localhost/db", "postgres://u:pw@h:5433/db",
                "postgresql+asyncpg://u@h/db", "postgresql:///db?host=/run/postgresql"):
        db = open_equivalence_db(url)
        assert isinstance(db, PostgresEquivalenceDB) and db.dsn.startswith("postgresql://")
    assert "pw" not in open_equivalence_db("postgres://u:pw@h:5433/db").url  # redacted for logs
    with pytest.raises(ValueError, match="port"):
        open_equivalence_db("postgresql://u@localhost:notaport/db")
    with pytest.raises(UnsupportedDatabase):
        open_equivalence_db("mysql://u@localhost/db")
    assert issubclass(UnsupportedDatabase, ValueError)


# --- archive identity (storage dedup) ------------------------------------------------------------------
async def test_archive_identity(db: EquivalenceDB, engine: Engine):
    assert await db.dedup_stats() == {"objects": 0, "unique": 0, "bytes_saved": 0}
    assert await db.record_archive("k1", "I", 100) == "k1"
    assert await db.record_archive("k1", "I", 100) == "k1"  # idempotent
    assert await db.record_archive("k2", "I", 100) == "k1"
    assert await db.record_archive("k3", "I", 100) == "k1"
    assert await db.record_archive("j1", "J", 5_000_000_000) == "j1"  # sizes beyond 32 bits
    assert await db.archive_alias("k1") is None and await db.archive_alias("k2") == "k1"
    assert await db.archive_alias("nope") is None
    assert await db.archive_aliases("k1") == ["k2", "k3"]
    assert await db.dedup_stats() == {"objects": 4, "unique": 2, "bytes_saved": 200}
    # another instance sees them
    other = engine.open()
    try:
        assert await other.archive_alias("k3") == "k1"
    finally:
        await other.close()
    # the canonical goes: its aliases move to the successor
    assert await db.forget_archive("k1", successor="k2") == 1
    assert await db.archive_alias("k3") == "k2"
    assert await db.archive_alias("k2") is None  # canonical now
    assert await db.forget_archive("k2") == 2  # itself and its alias k3
    assert await db.archive_alias("k3") is None
    assert await db.dedup_stats() == {"objects": 1, "unique": 1, "bytes_saved": 0}
    # archive rows are not hash equivalence
    assert "sstate_proxy_archives" not in await db.get_usage()


async def test_archive_identity_concurrent_first(engine: Engine):
    a, b = engine.open(), engine.open()
    try:
        got = await asyncio.gather(*(d.record_archive(f"key{i}", "SAME", 10)
                                     for i, d in enumerate([a, b] * 5)))
        canonical = set(got)
        assert len(canonical) == 1 and canonical.pop() in {f"key{i}" for i in range(10)}
        assert (await a.dedup_stats())["unique"] == 1
    finally:
        await a.close()
        await b.close()


# --- traffic history (the dashboard) --------------------------------------------------------------
async def test_traffic_history_adds_across_instances(engine: Engine):
    from storage.equivalence import TrafficRow as T

    a, b = engine.open(), engine.open()
    try:
        assert await a.traffic_series(0) == [] and await a.top_missed_recipes(0, 5) == []
        await a.add_traffic([T(60, "hit", "", 3, 300), T(60, "miss", "zlib", 2, 0),
                             T(120, "equivalent", "", 1, 5_000_000_000)])
        # another instance (worker, replica) adds to the same buckets; duplicates in one batch add up
        await b.add_traffic([T(60, "hit", "", 1, 10), T(60, "miss", "zlib", 1, 0),
                             T(60, "miss", "busybox", 4, 0), T(60, "miss", "busybox", 1, 0),
                             T(60, "miss", "", 2, 0), T(120, "report", "", 7, 0)])
        await b.add_traffic([])
        assert await a.traffic_series(0) == [
            T(60, "hit", "", 4, 310), T(60, "miss", "", 10, 0),
            T(120, "equivalent", "", 1, 5_000_000_000), T(120, "report", "", 7, 0)]
        assert await b.traffic_series(120) == [T(120, "equivalent", "", 1, 5_000_000_000),
                                               T(120, "report", "", 7, 0)]
        assert await a.top_missed_recipes(0, 5) == [("busybox", 5), ("zlib", 3)]
        assert await a.top_missed_recipes(0, 1) == [("busybox", 5)]
        assert await a.top_missed_recipes(120, 5) == []
        # traffic is not hash equivalence: no generation move on PostgreSQL, not in the usage
        assert "sstate_proxy_traffic" not in await a.get_usage()
        assert await a.prune_traffic(120) == 4  # bucket 60: hit, miss zlib, busybox and ""
        assert [r.bucket for r in await b.traffic_series(0)] == [120, 120]
    finally:
        await a.close()
        await b.close()


async def test_traffic_writes_do_not_notify(request, tmp_path: Path):
    """On PostgreSQL the traffic table has no change trigger, so the resolver's caches keep.
    (SQLite's data_version moves on any commit: ARCHITECTURE.md, caches.)"""
    from storage.equivalence import TrafficRow

    engine = _postgres(tmp_path, request)
    a, b = engine.open(), engine.open()
    try:
        await a.insert_unihash(M, h("warm"), h("u"))  # both connected and listening
        await b.get_unihash(M, h("warm"))
        await asyncio.sleep(0.2)
        before = await b.generation()
        await a.add_traffic([TrafficRow(60, "hit", "", 1, 1)])
        assert not await moved(b, before, within_s=0.5)
    finally:
        await a.close()
        await b.close()
