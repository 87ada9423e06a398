"""The bound of pulled objects (storage/cache.py) on a real local store and a real database:
least recently used first, published objects never, an access moving an object to the back."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.cache import PulledCache
from storage.equivalence import open_equivalence_db
from storage.local import LocalStore

K = "ab/cd/sstate:zlib:core2-64-poky-linux:1.3:r0:core2-64:14:{}_populate_sysroot.tar.zst"


def k(n: int) -> str:
    return K.format(str(n).rjust(64, "0"))


async def chunks(data: bytes):
    yield data


@pytest.fixture
async def parts(tmp_path: Path):
    db = open_equivalence_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = LocalStore(str(tmp_path / "store"))
    yield db, store
    await store.close()
    await db.close()


async def stored(store: LocalStore) -> set[str]:
    return {key async for key in store.keys()}


async def test_least_recently_used_pulled_objects_go_first_published_never(parts):
    db, store = parts
    evicted: list[tuple[int, int]] = []
    cache = PulledCache(db, store, max_bytes=250, on_evicted=lambda n, b: evicted.append((n, b)))
    await store.put(k(0), chunks(b"p" * 1000))
    await db.record_object(k(0), 1000, "local", 1.0)  # published, oldest of all, larger than the bound
    for n in range(1, 4):
        await store.put(k(n), chunks(bytes(100)))
        await db.record_object(k(n), 100, "upstream", 10.0 + n)
    await db.touch_objects({k(1): 100.0})  # read again: now the most recent
    assert await cache.enforce() == 1
    assert await stored(store) == {k(0), k(1), k(3)}  # k(2), the least recently used, went
    assert await db.object_usage("upstream") == (2, 200)
    assert evicted == [(1, 100)]  # told (the metrics count it)
    assert await cache.enforce() == 0  # within the bound: nothing more
    assert evicted == [(1, 100)]


async def test_added_records_and_keeps_the_bound_in_the_background(parts):
    db, store = parts
    cache = PulledCache(db, store, max_bytes=150)
    for n in range(1, 4):
        await store.put(k(n), chunks(bytes(100)))
        await cache.added(k(n), 100)
    await cache.close()  # waits for (or stops) the background run
    await cache.enforce()
    assert await stored(store) == {k(3)}
    # an object larger than the bound is served once but not kept
    await store.put(k(4), chunks(bytes(500)))
    await cache.added(k(4), 500)
    await cache.enforce()
    assert await stored(store) == set()


async def test_zero_is_no_bound(parts):
    db, store = parts
    cache = PulledCache(db, store, max_bytes=0)
    for n in range(1, 4):
        await store.put(k(n), chunks(bytes(100)))
        await cache.added(k(n), 100)
    assert await cache.enforce() == 0
    assert len(await stored(store)) == 3
    assert await db.object_usage("upstream") == (3, 300)
