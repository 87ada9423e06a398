"""DedupStore: equal archives stored once behind the plain ObjectStore interface, over any backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import ObjectStore
from storage.dedup import DedupStore
from storage.equivalence import open_equivalence_db
from storage.equivalence.sqlite import SqliteEquivalenceDB
from storage.local import LocalStore
from storage.s3 import S3Store
from tests.test_storage import feed, get, moto, new_bucket, s3_config  # noqa: F401 (moto: fixture)
from tests.test_upload import make_archive

FILES = {"sysroot-destdir/usr/lib/libfoo.so.1": os.urandom(20000)}


def key(n: int, ext: str = "tar.zst") -> str:
    h = f"{n:064x}"
    return f"{h[:2]}/{h[2:4]}/sstate:foo:core2-64-poky-linux:1.0:r0:core2-64:11:{h}_populate_sysroot.{ext}"


@pytest.fixture(params=["local", "s3"])
async def inner(request, tmp_path, moto):  # noqa: F811
    s: ObjectStore
    if request.param == "local":
        s = LocalStore(str(tmp_path / "root"))
    else:
        s = S3Store(s3_config(moto, new_bucket(moto)))
    await s.start()
    yield s


@pytest.fixture(params=["sqlite", "postgres"])
async def pair(inner, tmp_path, request):
    if request.param == "postgres":
        db = open_equivalence_db(request.getfixturevalue("pg_cluster").create_database())  # tests/pg.py
    else:
        db = SqliteEquivalenceDB(str(tmp_path / "db"))
    store = DedupStore(inner, db)
    yield store, inner, db
    await store.close()
    await db.close()


async def test_equal_archives_stored_once_and_served_under_both_keys(pair):
    store, inner, db = pair
    a, b = make_archive(FILES, mtime=100), make_archive(FILES, mtime=200)
    assert a != b  # different bytes, same content
    r1 = await store.put(key(1), feed(a), size=len(a))
    r2 = await store.put(key(2), feed(b), size=len(b))
    assert r1.created and r1.shared_with is None
    assert r2.created and r2.shared_with == key(1)
    assert await inner.stat(key(2)) is None  # no second copy
    assert (await store.stat(key(2))).size == len(a)
    assert await get(store, key(2)) == a
    # an alias is an existing key: first write wins
    again = await store.put(key(2), feed(b), size=len(b))
    assert not again.created
    assert (await db.dedup_stats())["bytes_saved"] == len(b)
    # different content is stored as it is; so are non-archives
    c = make_archive({**FILES, "other": b"x"})
    assert (await store.put(key(3), feed(c), size=len(c))).shared_with is None
    assert (await store.put(key(1, "tar.zst.siginfo"), feed(b"sig"), size=3)).shared_with is None
    assert sorted([k async for k in store.keys()]) == sorted([key(1), key(3), key(1, "tar.zst.siginfo")])


async def test_deleting_the_canonical_promotes_an_alias(pair):
    store, inner, db = pair
    a, b, c = (make_archive(FILES, mtime=m) for m in (100, 200, 300))
    for n, body in ((1, a), (2, b), (3, c)):
        await store.put(key(n), feed(body), size=len(body))
    assert await store.delete(key(1)) is True
    assert await store.stat(key(1)) is None
    assert await inner.stat(key(2)) is not None  # the oldest alias now holds the bytes
    assert await get(store, key(2)) == a and await get(store, key(3)) == a
    assert await db.archive_alias(key(3)) == key(2)
    # deleting an alias drops only the alias
    assert await store.delete(key(3)) is True
    assert await store.stat(key(3)) is None and await get(store, key(2)) == a
    assert await store.delete(key(3)) is False


async def test_put_file_dedups_before_writing(pair, tmp_path: Path):
    store, inner, db = pair
    files = []
    for n, m in ((1, 100), (2, 200)):
        p = tmp_path / f"in{n}.tar.zst"
        p.write_bytes(make_archive(FILES, mtime=m))
        files.append(p)
    r1 = await store.put_file(key(1), str(files[0]), link=True)
    r2 = await store.put_file(key(2), str(files[1]), link=True)
    assert r1.created and r1.linked == isinstance(inner, LocalStore)
    assert r2.created and r2.shared_with == key(1) and await inner.stat(key(2)) is None
    assert await get(store, key(2)) == files[0].read_bytes()
    assert not (await store.put_file(key(2), str(files[1]))).created


async def test_dedup_off_stores_new_archives_as_they_are_and_still_serves_old_aliases(tmp_path: Path):
    from types import SimpleNamespace

    from storage import open_store

    db = SqliteEquivalenceDB(str(tmp_path / "db"))
    a, b, c = (make_archive(FILES, mtime=m) for m in (100, 200, 300))

    def cfg(dedup: bool):
        return SimpleNamespace(storage=SimpleNamespace(backend="local", path=str(tmp_path / "root"), dedup=dedup))

    try:
        on = open_store(cfg(True), db)
        await on.start()
        await on.put(key(1), feed(a), size=len(a))
        assert (await on.put(key(2), feed(b), size=len(b))).shared_with == key(1)
        await on.close()
        off = open_store(cfg(False), db)
        await off.start()
        assert await get(off, key(2)) == a  # recorded earlier: still served
        r3 = await off.put(key(3), feed(c), size=len(c))
        assert r3.created and r3.shared_with is None
        assert await get(off, key(3)) == c  # its own bytes
        await off.close()
        plain = open_store(cfg(True), None)  # no database: the bare backend
        assert not isinstance(plain, DedupStore) and isinstance(plain, ObjectStore)
    finally:
        await db.close()
