"""The object catalog and the removal log (migration 3), through the EquivalenceDB protocol, on
every engine of the shared suite (tests/test_equivalence_db.py: SQLite, and PostgreSQL on the
throwaway cluster of tests/pg.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage.equivalence import REMOVALS_BATCH, EquivalenceDB, ObjectRow, open_equivalence_db
from tests.test_equivalence_db import ENGINES, Engine, moved


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path: Path) -> Engine:
    return ENGINES[request.param](tmp_path, request)


@pytest.fixture
async def db(engine: Engine):
    d = engine.open()
    yield d
    await d.close()


K = "universal/ab/cd/sstate:zlib::1.3:r0::14:{}_populate_sysroot.tar.zst"


def k(n: int | str) -> str:
    return K.format(str(n).rjust(64, "0"))


async def rows(db: EquivalenceDB) -> dict[str, ObjectRow]:
    out: dict[str, ObjectRow] = {}
    async for batch in db.iter_objects():
        out.update((r.key, r) for r in batch)
    return out


async def test_record_and_touch(db: EquivalenceDB):
    assert await db.object_usage() == (0, 0)
    await db.record_object(k(1), 100, "local", 1000.0)
    await db.record_object(k(2), 5_000_000_000, "upstream", 2000.0)  # sizes beyond 32 bits
    # touch: last_access only moves forward; an unknown key is inserted (size 0, 'local')
    await db.touch_objects({k(1): 1500.0, k(2): 1500.0, k(3): 1700.0})
    got = await rows(db)
    assert got == {
        k(1): ObjectRow(k(1), 100, "local", 1500.0),
        k(2): ObjectRow(k(2), 5_000_000_000, "upstream", 2000.0),
        k(3): ObjectRow(k(3), 0, "local", 1700.0),
    }
    # record: sets size and origin, last_access = max(old, when)
    await db.record_object(k(3), 30, "upstream", 1600.0)
    await db.record_object(k(1), 10, "local", 3000.0)
    got = await rows(db)
    assert got[k(3)] == ObjectRow(k(3), 30, "upstream", 1700.0)
    assert got[k(1)] == ObjectRow(k(1), 10, "local", 3000.0)
    await db.touch_objects({})  # nothing to do
    with pytest.raises(ValueError, match="origin"):
        await db.record_object(k(4), 1, "elsewhere", 1.0)
    assert k(4) not in await rows(db)


async def test_usage_and_lru(db: EquivalenceDB):
    for i in range(10):
        await db.record_object(k(i), i, "local" if i % 2 == 0 else "upstream", 100.0 * (10 - i))
    assert await db.object_usage() == (10, 45)
    assert await db.object_usage("local") == (5, 0 + 2 + 4 + 6 + 8)
    assert await db.object_usage("upstream") == (5, 1 + 3 + 5 + 7 + 9)
    oldest = await db.lru_objects(None, 3)
    assert [r.key for r in oldest] == [k(9), k(8), k(7)]
    assert oldest[0] == ObjectRow(k(9), 9, "upstream", 100.0)
    assert [r.key for r in await db.lru_objects("local", 2)] == [k(8), k(6)]
    assert [r.key for r in await db.lru_objects("upstream", 100)] == [k(9), k(7), k(5), k(3), k(1)]
    assert await db.lru_objects(None, 0) == []
    # a touch moves an object to the young end
    await db.touch_objects({k(9): 5000.0})
    assert [r.key for r in await db.lru_objects(None, 2)] == [k(8), k(7)]
    with pytest.raises(ValueError):
        await db.object_usage("nope")
    # catalog tables are not hash equivalence
    usage = await db.get_usage()
    assert "sstate_proxy_objects" not in usage and "sstate_proxy_removals" not in usage


async def test_iter_objects_batches(db: EquivalenceDB):
    await db.touch_objects({k(i): float(i) for i in range(23)})
    batches = [b async for b in db.iter_objects(batch=5)]
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    keys = [r.key for b in batches for r in b]
    assert keys == sorted(k(i) for i in range(23))
    with pytest.raises(ValueError):
        [b async for b in db.iter_objects(batch=0)]


async def test_forget_and_removal_log(db: EquivalenceDB, engine: Engine):
    start, nothing = await db.removals_since(None)
    assert nothing == []
    await db.touch_objects({k(i): float(i) for i in range(5)})
    other = engine.open()
    try:
        seen, _ = await other.removals_since(None)
        before = await other.generation()
        assert await db.forget_objects([k(1), k(3), k("never")]) == 2
        assert set(await rows(db)) == {k(0), k(2), k(4)}
        # another instance reads the log, in order, once; its generation() moved
        assert await moved(other, before)
        seq, keys = await other.removals_since(seen)
        assert keys == [k(1), k(3), k("never")]
        assert seq > seen
        assert await other.removals_since(seq) == (seq, [])
        assert await db.forget_objects([]) == 0
        await db.forget_objects([k(0)])
        assert (await other.removals_since(seq))[1] == [k(0)]
        assert (await db.removals_since(start))[1] == [k(1), k(3), k("never"), k(0)]
        # the current position: where a new reader starts
        assert (await other.removals_since(None))[0] == (await other.removals_since(seq))[0]
    finally:
        await other.close()


async def test_removal_log_batches(db: EquivalenceDB):
    start, _ = await db.removals_since(None)
    n = REMOVALS_BATCH + 7
    await db.forget_objects([k(i) for i in range(n)])
    seq, first = await db.removals_since(start)
    assert len(first) == REMOVALS_BATCH
    seq, rest = await db.removals_since(seq)
    assert first + rest == [k(i) for i in range(n)]


async def test_touch_does_not_move_generation_on_postgres(pg_url: str):
    """Access flushes must not drop the resolvers' caches where that can be avoided (PostgreSQL:
    no trigger on the catalog; SQLite's data_version moves on every commit by design)."""
    a, other = open_equivalence_db(pg_url), open_equivalence_db(pg_url)
    try:
        await other.get_unihash("m", "t")  # connected, listening
        await asyncio.sleep(0.2)
        before = await other.generation()
        await a.touch_objects({k(1): 1.0})
        await a.record_object(k(2), 1, "local", 1.0)
        assert not await moved(other, before, within_s=0.3)
        await a.forget_objects([k(2)])  # a removal does
        assert await moved(other, before)
    finally:
        await a.close()
        await other.close()


async def test_concurrent_touches_two_instances(engine: Engine):
    a, b = engine.open(), engine.open()
    try:
        keys = [k(i) for i in range(50)]
        await asyncio.gather(*(d.touch_objects({key: float(j * 100 + i) for i, key in enumerate(keys)})
                               for j, d in enumerate([a, b] * 3)))
        got = await rows(a)
        assert len(got) == 50
        assert all(got[key].last_access == 500.0 + i for i, key in enumerate(keys))
    finally:
        await a.close()
        await b.close()


async def test_read_only_open(engine: Engine):
    w = engine.open()
    try:
        await w.record_object(k(1), 5, "local", 1.0)
        ro = engine.open(read_only=True)
        try:
            assert await ro.object_usage() == (1, 5)
            with pytest.raises(PermissionError):
                await ro.touch_objects({k(1): 2.0})
        finally:
            await ro.close()
    finally:
        await w.close()


async def test_exclusive(engine: Engine):
    a, b = engine.open(), engine.open()
    try:
        async with a.exclusive("gc") as held:
            assert held
            async with b.exclusive("gc") as other:
                assert not other  # taken without waiting
            async with b.exclusive("other") as other:
                assert other  # another name
        async with b.exclusive("gc") as held:
            assert held  # released
        with pytest.raises(ValueError):
            async with a.exclusive("../x"):
                pass
    finally:
        await a.close()
        await b.close()
