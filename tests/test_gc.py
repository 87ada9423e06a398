"""gc (proxy/retention.py) in-process, on a real local store and database (SQLite, and PostgreSQL on
the throwaway cluster of tests/pg.py): what is chosen, pins, companions, dedup aliases, dry runs,
stale catalog rows; and the size/duration syntax. The service-level acceptance (requests during gc, the rewrite, S3, the CLI) is in
test_gc_service.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from proxy.retention import Policy, object_key_of, parse_duration, parse_size, run_gc
from storage.dedup import DedupStore
from storage.equivalence import open_equivalence_db
from storage.local import LocalStore
from tests.test_storage import feed
from tests.test_upload import make_archive

NOW = 1_800_000_000.0
DAY = 86400.0


def key(n: int, companion: str = "") -> str:
    h = f"{n:064x}"
    return f"universal/{h[:2]}/{h[2:4]}/sstate:foo:core2-64-poky-linux:1.0:r0:core2-64:11:{h}_populate_sysroot.tar.zst{companion}"


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request, tmp_path: Path):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_cluster").create_database()  # tests/pg.py
    else:
        url = f"sqlite:///{tmp_path / 'db'}"
    db = open_equivalence_db(url)
    inner = LocalStore(str(tmp_path / "root"))
    store = DedupStore(inner, db)
    await store.start()
    request.node.db_url = url  # test_exclusive_runs opens a second instance
    yield store, inner, db, tmp_path / "root"
    await store.close()
    await db.close()


async def put(store, root: Path, k: str, size: int, mtime: float) -> None:
    data = os.urandom(size)
    await store.put(k, feed(data), size=size)
    os.utime(root / k, (mtime, mtime))


async def keys(store) -> set[str]:
    return {k async for k in store.keys()}


def test_parse_size_and_duration():
    assert parse_size("1024") == 1024
    assert parse_size("10K") == 10 * 1024
    assert parse_size("1.5G") == int(1.5 * 1024**3)
    assert parse_size("2TiB") == 2 * 1024**4
    assert parse_size(" 3 m ") == 3 * 1024**2
    assert parse_duration("30d") == 30 * DAY
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("90m") == 5400
    assert parse_duration("2w") == 14 * DAY
    for bad in ("", "12Q", "-1G", "G", "1.2.3K"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)
    for bad in ("", "30", "0d", "3x", "-2h", "d"):
        with pytest.raises(ValueError, match="bad duration"):
            parse_duration(bad)


def test_object_key_of():
    assert object_key_of(key(1, ".siginfo")) == key(1)
    assert object_key_of(key(1, ".sig")) == key(1)
    assert object_key_of(key(1)) == key(1)
    assert object_key_of("README.sig") == "README.sig"  # not an archive's companion


async def test_lru_until_within_size_with_companions_and_pins(env):
    store, inner, db, root = env
    # objects 0..5, each 1000 bytes + a 100-byte .siginfo; mtimes days apart (0 oldest)
    for i in range(6):
        await put(store, root, key(i), 1000, NOW - (10 - i) * DAY)
        await put(store, root, key(i, ".siginfo"), 100, NOW - (10 - i) * DAY)
    # the catalog says 1 was served yesterday (newer than its mtime); 4 never (mtime applies)
    await db.touch_objects({key(1): NOW - DAY, key(0, ".siginfo"): NOW - 9.5 * DAY})
    policy = Policy(max_size=3 * 1100, pins=("*:" + f"{2:064x}" + "_*",))
    report = await run_gc(store, db, policy, now=NOW)
    # LRU order: 0 (touched at -9.5d), 2 (pinned), 3, 4, 5, 1; remove until <= 3300 bytes
    assert report.objects == 6 and report.files == 12 and report.bytes == 6600
    assert report.removed_objects == 3 and report.removed_files == 6 and report.removed_bytes == 3300
    assert report.pinned_objects == 1 and not report.failed
    assert await keys(store) == {key(i, c) for i in (1, 2, 5) for c in ("", ".siginfo")}
    # the catalog forgot the removed ones; other processes can read the removal log
    rows = {r.key async for b in db.iter_objects() for r in b}
    assert rows == {key(1)}
    _, removed = await db.removals_since(0)
    assert set(removed) == {key(i, c) for i in (0, 3, 4) for c in ("", ".siginfo")}


async def test_unused_for_and_pins_beat_everything(env):
    store, inner, db, root = env
    for i in range(4):
        await put(store, root, key(i), 10, NOW - (i + 1) * 10 * DAY)  # 10, 20, 30, 40 days old
    await db.touch_objects({key(3): NOW - 1 * DAY})  # 3 was used yesterday
    pin = "sstate:foo:*:" + f"{2:064x}" + "_*"  # a file-name glob
    report = await run_gc(store, db, Policy(unused_for=parse_duration("15d"), pins=(pin,)), now=NOW)
    assert report.removed_objects == 1
    assert await keys(store) == {key(0), key(2), key(3)}
    # a bound the pins alone exceed: everything else goes, the report says so
    report = await run_gc(store, db, Policy(max_size=5, pins=(key(2),)), now=NOW)
    assert await keys(store) == {key(2)}
    assert "still over the bound" in report.line()


async def test_dry_run_changes_nothing(env):
    store, inner, db, root = env
    for i in range(5):
        await put(store, root, key(i), 100, NOW - i * DAY)
    await db.touch_objects({key(0): NOW, "universal/gone/sstate:x.tar.zst": 1.0})
    before_rows = [r async for b in db.iter_objects() for r in b]
    seen = []
    report = await run_gc(store, db, Policy(max_size=250), dry_run=True, now=NOW, on_victim=seen.append)
    assert report.dry_run and report.removed_objects == 3 and report.removed_bytes == 300
    assert [u.keys for u in seen] == [[key(4)], [key(3)], [key(2)]]  # oldest first
    assert await keys(store) == {key(i) for i in range(5)}
    assert [r async for b in db.iter_objects() for r in b] == before_rows
    assert (await db.removals_since(0))[1] == []
    assert "would remove 3 objects" in report.line()


async def test_stale_catalog_rows_are_dropped(env):
    store, inner, db, root = env
    await put(store, root, key(1), 10, NOW - DAY)
    await db.touch_objects({key(9): NOW - 5 * DAY, key(1): NOW - DAY})
    await db.record_object(key(8), 5, "local", NOW + 10)  # recorded after the run began: kept
    report = await run_gc(store, db, Policy(max_size=1000), now=NOW)
    assert report.removed_objects == 0
    assert {r.key async for b in db.iter_objects() for r in b} == {key(1), key(8)}


async def test_dedup_aliases_share_their_canonicals_fate(env):
    store, inner, db, root = env
    files = {"usr/lib/libfoo.so.1": os.urandom(3000)}
    # 1 and 2 are equal archives (2 is an alias of 1); 3 and 4 likewise
    for canonical, alias in ((1, 2), (3, 4)):
        for k in (canonical, alias):
            data = make_archive(files, mtime=k)
            await store.put(key(k), feed(data), size=len(data))
        files = {"usr/lib/libbar.so.1": os.urandom(3000)}
    assert await inner.stat(key(2)) is None and await db.archive_alias(key(2)) == key(1)
    for k in (1, 3):
        os.utime(root / key(k), (NOW - 10 * DAY, NOW - 10 * DAY))
    await put(store, root, key(4, ".siginfo"), 50, NOW - 10 * DAY)  # the alias's own companion
    # the alias 2 was served yesterday: its canonical's bytes stay; nobody used 3 or 4
    await db.touch_objects({key(2): NOW - DAY})
    size3 = (await inner.stat(key(3))).size
    report = await run_gc(store, db, Policy(unused_for=parse_duration("5d")), now=NOW)
    assert report.removed_objects == 1 and report.removed_bytes == size3 + 50
    assert await keys(store) == {key(1)}
    assert (await store.stat(key(2))) is not None  # the alias still served
    assert await store.stat(key(4)) is None and await db.archive_alias(key(4)) is None
    # bounded to nothing: the canonical goes with its alias (no promotion into a copy)
    await run_gc(store, db, Policy(max_size=0), now=NOW)
    assert await keys(store) == set()
    assert await store.stat(key(2)) is None
    assert await db.dedup_stats() == {"objects": 0, "unique": 0, "bytes_saved": 0}


async def test_entries_local(env):
    store, inner, db, root = env
    await put(store, root, key(1), 123, NOW)
    (root / "universal" / ".tmp-x").write_bytes(b"litter")
    got = {k: m async for k, m in store.entries()}
    assert set(got) == {key(1)} and got[key(1)].size == 123 and got[key(1)].mtime == NOW


async def test_exclusive_runs(env, request):
    """The CLI and the schedule take the same lock: a second gc is skipped, not run twice."""
    store, inner, db, root = env
    from proxy.retention import Scheduler

    other = open_equivalence_db(request.node.db_url)
    try:
        sched = Scheduler(store, other, Policy(max_size=0), 3600)
        await put(store, root, key(1), 10, time.time())
        async with db.exclusive("gc") as held:
            assert held
            assert await sched.run_once() is None
        assert await keys(store) == {key(1)}
        report = await sched.run_once()
        assert report is not None and report.removed_objects == 1 and sched.runs == 1
    finally:
        await other.close()


def test_oldest_first_is_a_sort():
    import random

    from proxy.retention import Unit, oldest_first

    rng = random.Random(5)
    for spread in (0.0, 1.0, 1e9):
        units = [Unit(f"k{i}", 1, NOW + rng.random() * spread) for i in range(5000)]
        assert [u.last for u in oldest_first(units)] == sorted(u.last for u in units)
    assert oldest_first([]) == []
