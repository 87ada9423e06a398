"""The bound of pulled objects (storage/cache.py) on a real local store and a real database:
least recently used first, published objects never, an access moving an object to the back;
a pull (proxy/upstream.py, from a real origin) dated when it was asked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from proxy.config import UpstreamConfig
from proxy.upstream import KeyLocks, UpstreamMirrors
from storage.cache import PulledCache
from storage.equivalence import open_equivalence_db
from storage.local import LocalStore
from tests.service import free_port
from tests.upstream_origin import Origin

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
        await cache.added(k(n), 100, time.time())
    await cache.close()  # waits for (or stops) the background run
    await cache.enforce()
    assert await stored(store) == {k(3)}
    # an object larger than the bound is served once but not kept
    await store.put(k(4), chunks(bytes(500)))
    await cache.added(k(4), 500, time.time())
    await cache.enforce()
    assert await stored(store) == set()


async def test_zero_is_no_bound(parts):
    db, store = parts
    cache = PulledCache(db, store, max_bytes=0)
    for n in range(1, 4):
        await store.put(k(n), chunks(bytes(100)))
        await cache.added(k(n), 100, time.time())
    assert await cache.enforce() == 0
    assert len(await stored(store)) == 3
    assert await db.object_usage("upstream") == (3, 300)


async def test_asked_is_the_last_access_so_a_slow_store_does_not_reorder(parts):
    db, store = parts
    cache = PulledCache(db, store, max_bytes=150)
    await store.put(k(1), chunks(bytes(100)))
    await store.put(k(2), chunks(bytes(100)))
    # k(1) was asked first but its store finished last (a large upload to S3, say)
    await cache.added(k(2), 100, 20.0)
    await cache.added(k(1), 100, 10.0)
    await cache.close()
    await cache.enforce()
    assert await stored(store) == {k(2)}


async def test_a_pull_records_when_it_was_asked_not_when_the_store_finished(parts, tmp_path):
    """The client has its last byte before the store's put ends (it is sent the staging file);
    its next request must not find the object it asked before counted as the newer one."""
    db, store = parts
    origin = Origin(tmp_path / "origin", free_port())
    (origin.root / k(1)).parent.mkdir(parents=True)
    (origin.root / k(1)).write_bytes(bytes(100))
    real_put_file = store.put_file

    async def slow_put_file(*args, **kwargs):
        await asyncio.sleep(0.5)
        return await real_put_file(*args, **kwargs)

    store.put_file = slow_put_file
    (tmp_path / "locks").mkdir()
    mirrors = UpstreamMirrors(UpstreamConfig(mirrors=(origin.url,)), store, PulledCache(db, store, 0),
                              KeyLocks(str(tmp_path / "locks")))
    with origin:
        before = time.time()
        assert (await mirrors.pull(k(1))).status == "stored"
        after_put = time.time()
    await mirrors.close()
    [row] = await db.lru_objects("upstream", 10)
    assert row.key == k(1) and before <= row.last_access < after_put - 0.4
