"""One suite for every ObjectStore backend (local disk, S3 on a real moto server over HTTP, S3
with a key prefix), plus the backend-specific parts: local path safety and crash litter, the S3
index, outages and presigned redirects."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage import (
    ByteStream,
    DigestMismatch,
    InvalidKey,
    LocalFile,
    Meta,
    ObjectStore,
    RedirectURL,
    StoreUnavailable,
    TooLarge,
)
from storage.local import LocalStore
from storage.s3 import S3Config, S3Store, pack_meta, unpack_meta
from tests.s3server import MotoServer, restore_env, use_test_credentials

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
H = "3fa1" + "0123456789abcdef" * 3 + "0123456789ab"
KEY = f"universal/3f/a1/sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:{H}_populate_sysroot.tar.zst"
BAD_KEYS = [
    "",
    "/etc/passwd",
    "../escape",
    "a/../../escape",
    "a/./b",
    "a//b",
    "a/b/",
    "a\\b",
    "a\x00b",
    "x" * 256,
    "a/" * 600 + "b",
    ".tmp-abc",
    "a/.tmp-abc/b",
]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    old = use_test_credentials()
    srv = MotoServer()
    srv.start()
    yield srv
    srv.close()
    restore_env(old)


_buckets = itertools.count()


def new_bucket(srv: MotoServer) -> str:
    name = f"bkt-{os.getpid()}-{next(_buckets)}"
    srv.create_bucket(name)
    return name


def s3_config(srv: MotoServer, bucket: str, **kw) -> S3Config:
    kw.setdefault("timeout_s", 2.0)
    return S3Config(bucket=bucket, endpoint_url=srv.endpoint_url, region="us-east-1", **kw)


@pytest.fixture(params=["local", "s3", "s3-prefix"])
async def store(request, tmp_path, moto):
    if request.param == "local":
        s: ObjectStore = LocalStore(str(tmp_path / "root"))
    else:
        prefix = "fleet/a" if request.param == "s3-prefix" else ""
        s = S3Store(s3_config(moto, new_bucket(moto), prefix=prefix))
    await s.start()
    if isinstance(s, S3Store):
        assert await s.wait_indexed(5)
    yield s
    await s.close()


def blob(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def feed(data: bytes, step: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]
        await asyncio.sleep(0)


async def read_body(body, start: int = 0, length: int | None = None) -> bytes:
    if isinstance(body, LocalFile):
        with open(body.path, "rb") as f:
            f.seek(start)
            return f.read(-1 if length is None else length)
    if isinstance(body, ByteStream):
        data = b"".join([c async for c in body.chunks])
        assert len(data) == body.length
        return data
    assert isinstance(body, RedirectURL)
    req = urllib.request.Request(body.url)
    if start or length is not None:
        req.add_header("Range", f"bytes={start}-{'' if length is None else start + length - 1}")
    return await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5).read())


async def get(store, key: str) -> bytes | None:
    body = await store.open(key)
    return None if body is None else await read_body(body)


async def all_keys(store, prefix: str = "") -> list[str]:
    return sorted([k async for k in store.keys(prefix)])


async def assert_no_litter(store) -> None:
    if isinstance(store, LocalStore):
        litter = [p for p in Path(store.root).rglob(".tmp-*")]
        assert litter == []
        return
    client = store._s3
    for _ in range(40):  # aborts run in the background
        uploads = client.list_multipart_uploads(Bucket=store._bucket).get("Uploads", [])
        if not uploads:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"multipart uploads left: {uploads}")


# --- the shared suite ----------------------------------------------------------------------


async def test_roundtrip(store):
    data = blob(300_000)
    r = await store.put(KEY, feed(data), size=len(data))
    assert r.created and r.meta.size == len(data)
    meta = await store.stat(KEY)
    assert meta == r.meta
    assert isinstance(meta.mtime, float) and abs(meta.mtime - time.time()) < 120
    assert meta.etag and '"' not in meta.etag
    assert await get(store, KEY) == data
    assert await all_keys(store) == [KEY]
    assert await store.delete(KEY) is True
    assert await store.stat(KEY) is None
    assert await store.open(KEY) is None
    assert await store.delete(KEY) is False
    assert await all_keys(store) == []


async def test_absent(store):
    assert await store.stat("universal/00/00/nothing.tar.zst") is None
    assert await store.open("universal/00/00/nothing.tar.zst") is None
    assert await store.delete("universal/00/00/nothing.tar.zst") is False
    await store.put("d/e/f", feed(b"x"))
    assert await store.stat("d/e") is None  # a "directory" is not an object
    assert await store.open("d") is None


async def test_empty_object(store):
    r = await store.put("empty/obj", feed(b""), size=0, md5=hashlib.md5(b"").digest())
    assert r.created and r.meta.size == 0
    assert (await store.stat("empty/obj")).size == 0
    assert await get(store, "empty/obj") == b""


async def test_ranges(store):
    data = blob(3 * MiB + 12345, seed=1)
    await store.put(KEY, feed(data))
    n = len(data)
    cases = [(0, None), (0, 1), (5, 10), (MiB - 1, MiB + 2), (n - 1, 1), (n - 10, None), (100, n)]
    for start, length in cases:
        body = await store.open(KEY, start, length)
        assert body is not None and body.meta.size == n
        want = data[start:] if length is None else data[start : start + length]
        if isinstance(body, ByteStream):
            assert (body.start, body.length) == (start, len(want))
        assert await read_body(body, start, length) == want, (start, length)
    body = await store.open(KEY, n + 5, 10)  # past the end: an empty stream (or the file)
    if isinstance(body, ByteStream):
        assert body.length == 0 and await read_body(body) == b""


async def test_digests_verified(store):
    data = blob(70_000, seed=2)
    r = await store.put(KEY, feed(data), size=len(data), md5=hashlib.md5(data).digest(),
                        sha256=hashlib.sha256(data).digest())
    assert r.created
    assert await get(store, KEY) == data


@pytest.mark.parametrize(
    "kind,n",
    [("short", 10_000), ("long", 10_000), ("md5", 10_000), ("sha256", 10_000), ("sha256", 9 * MiB)],
)
async def test_mismatch_stores_nothing(store, kind, n):
    data = blob(n, seed=3)
    kw: dict = {}
    if kind == "short":
        kw["size"] = n + 1
    elif kind == "long":
        kw["size"] = n - 1
    elif kind == "md5":
        kw["md5"] = hashlib.md5(b"other").digest()
    else:
        kw["sha256"] = hashlib.sha256(b"other").digest()
    with pytest.raises(DigestMismatch):
        await store.put(KEY, feed(data, 256 * 1024), **kw)
    assert await store.stat(KEY) is None
    assert await all_keys(store) == []
    await assert_no_litter(store)


async def test_max_size(store):
    with pytest.raises(TooLarge):  # announced
        await store.put(KEY, feed(b"x" * 100), size=100, max_size=99)
    with pytest.raises(TooLarge):  # streamed without announcing
        await store.put(KEY, feed(b"x" * 100_000), max_size=50_000)
    assert await store.stat(KEY) is None
    await assert_no_litter(store)
    assert (await store.put(KEY, feed(b"x" * 100), max_size=100)).created


async def test_failing_stream_stores_nothing(store):
    async def broken():
        yield b"a" * 100_000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put(KEY, broken())
    assert await store.stat(KEY) is None
    await assert_no_litter(store)


@pytest.mark.parametrize("n", [100_000, 9 * MiB])
async def test_cancel_mid_stream(store, n):
    sent = asyncio.Event()
    never = asyncio.Event()

    async def stalled():
        for i in range(0, n, 256 * 1024):
            yield blob(min(256 * 1024, n - i))
        sent.set()
        await never.wait()  # the client stops sending
        yield b"never"

    task = asyncio.create_task(store.put(KEY, stalled()))
    await asyncio.wait_for(sent.wait(), 5)
    await asyncio.sleep(0.2)  # let the store write/upload what it has
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.stat(KEY) is None
    assert await all_keys(store) == []
    await assert_no_litter(store)
    # and the key is still writable afterwards
    assert (await store.put(KEY, feed(b"ok"))).created


async def test_first_write_wins(store):
    r1 = await store.put(KEY, feed(b"first"))
    r2 = await store.put(KEY, feed(b"second body"))
    assert r1.created and not r2.created
    assert r2.meta == r1.meta
    assert await get(store, KEY) == b"first"


async def test_concurrent_puts_one_winner(store):
    bodies = [blob(50_000 + i, seed=i) for i in range(50)]
    results = await asyncio.wait_for(
        asyncio.gather(*(store.put(KEY, feed(b, 8192)) for b in bodies)), 30
    )
    assert sum(r.created for r in results) == 1
    winner = bodies[[r.created for r in results].index(True)]
    assert await get(store, KEY) == winner
    assert all(r.meta.size == len(winner) for r in results)
    await assert_no_litter(store)


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_bad_keys(store, key):
    with pytest.raises(InvalidKey):
        await store.stat(key)
    with pytest.raises(InvalidKey):
        await store.open(key)
    with pytest.raises(InvalidKey):
        await store.put(key, feed(b"x"))
    with pytest.raises(InvalidKey):
        await store.delete(key)


async def test_keys_prefix(store):
    names = [
        KEY,
        KEY.replace("zlib-native", "zlib"),
        "universal/3f/b2/sstate:a:b.tar.zst",
        "universal/40/00/sstate:c:d.tar.zst",
        "universal/3f/a1/sstate:zlib-native:x.siginfo",
    ]
    for n in names:
        await store.put(n, feed(n.encode()))
    assert await all_keys(store) == sorted(names)
    assert await all_keys(store, "universal/3f/") == sorted(n for n in names if n.startswith("universal/3f/"))
    assert await all_keys(store, "universal/3f/a1/sstate:zlib-") == sorted(
        n for n in names if n.startswith("universal/3f/a1/sstate:zlib-")
    )
    assert await all_keys(store, "universal/3") == sorted(names[:3] + names[4:])
    assert await all_keys(store, "nothing/") == []


# --- local disk ----------------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path):
    s = LocalStore(str(tmp_path / "root"))
    yield s
    await s.close()


async def test_local_layout_and_modes(local):
    r = await local.put(KEY, feed(b"abc"))
    p = Path(local.root, KEY)
    assert p.read_bytes() == b"abc"
    assert p.stat().st_mode & 0o644 == 0o644  # readable by nginx/bitbake; umask decides g+w
    body = await local.open(KEY, 1, 1)
    assert isinstance(body, LocalFile) and body.path == str(p) and body.meta == r.meta
    assert r.meta.etag == f"{p.stat().st_mtime_ns:x}-{3:x}-{p.stat().st_ino:x}"


async def test_local_etag_changes_when_replaced(local):
    await local.put("a/b", feed(b"one"))
    e1 = (await local.stat("a/b")).etag
    p = Path(local.root, "a/b")
    p.unlink()
    p.write_bytes(b"two")
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 1000))
    assert (await local.stat("a/b")).etag != e1


async def test_local_symlinks(local, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = Path(local.root)
    (root / "u").mkdir()
    os.symlink(outside / "secret", root / "u" / "leak")  # file link leaving the root
    os.symlink(outside, root / "out")  # dir link leaving the root
    assert await local.stat("u/leak") is None
    assert await local.open("u/leak") is None
    assert await local.stat("out/secret") is None
    assert await local.open("out/secret") is None
    assert await local.delete("out/secret") is False
    with pytest.raises(InvalidKey):
        await local.put("out/new", feed(b"x"))
    with pytest.raises(InvalidKey):
        await local.put("out/deeper/new", feed(b"x"))
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    with pytest.raises(InvalidKey):  # a file in the way of a directory
        await local.put("u/leak/x", feed(b"x"))
    # links that stay inside the root are followed
    await local.put("real/obj", feed(b"inside"))
    os.symlink(root / "real", root / "alias")
    os.symlink(root / "real" / "obj", root / "u" / "obj-link")
    assert (await local.stat("alias/obj")).size == 6
    assert await get(local, "u/obj-link") == b"inside"
    assert (await local.put("alias/new", feed(b"n"))).created
    assert (root / "real" / "new").read_bytes() == b"n"
    assert "u/leak" not in await all_keys(local)


async def test_local_keys_skip_temp_and_lock(local):
    await local.put("a/obj", feed(b"x"))
    Path(local.root, "a", ".tmp-deadbeef.1.00").write_bytes(b"partial")
    Path(local.root, "a", "obj.lock").write_bytes(b"")
    assert await all_keys(local) == ["a/obj"]


async def test_local_cleanup_after_sigkill(tmp_path):
    """A writer SIGKILLed mid-upload leaves a temp file; cleanup_temp (start()) removes it."""
    root = tmp_path / "root"
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from storage.local import LocalStore
        async def body():
            yield b"x" * (2 * 1024 * 1024)
            print("sent", flush=True)
            await asyncio.sleep(60)
            yield b""
        asyncio.run(LocalStore({str(root)!r}).put("a/b/obj", body()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"sent"
    deadline = time.monotonic() + 5
    while not list(root.rglob(".tmp-*")) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    litter = list(root.rglob(".tmp-*"))
    assert len(litter) == 1
    store = LocalStore(str(root))
    try:
        # our own in-flight upload must survive the cleanup
        gate = asyncio.Event()

        async def slow():
            yield b"y" * 100
            await gate.wait()
            yield b"z"

        live = asyncio.create_task(store.put("c/live", slow()))
        while not list(root.glob("c/.tmp-*")):
            await asyncio.sleep(0.01)
        await store.start()  # cleanup runs in the background
        for _ in range(200):
            if not litter[0].exists():
                break
            await asyncio.sleep(0.01)
        assert not litter[0].exists()
        assert len(list((root / "c").glob(".tmp-*"))) == 1
        gate.set()
        assert (await live).created
        assert await store.stat("a/b/obj") is None
        assert await all_keys(store) == ["c/live"]
    finally:
        await store.close()


async def test_local_cleanup_by_age(local):
    d = Path(local.root, "x")
    d.mkdir()
    old = d / ".tmp-otherhost.123.abc"
    young = d / ".tmp-otherhost.124.abc"
    old.write_bytes(b"1")
    young.write_bytes(b"2")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert await local.cleanup_temp() == 1  # the young one may be another host's live upload
    assert not old.exists() and young.exists()
    assert await local.cleanup_temp(stale_s=0) == 1


# --- S3 ------------------------------------------------------------------------------------


def test_index_pack_roundtrip():
    for meta in [
        Meta(0, 0.0, "d41d8cd98f00b204e9800998ecf8427e"),
        Meta(5 * 1024**4, 1_700_000_000.0, "7a66d218d0f9cf5f80f550f84089d94a-123"),
        Meta(12, 1_700_000_001.0, "opaque/etag-from-somewhere"),
    ]:
        v = pack_meta(meta.size, meta.mtime, meta.etag)
        assert unpack_meta(v) == meta
    assert len(pack_meta(1, 1, "d41d8cd98f00b204e9800998ecf8427e")) == 29


async def test_s3_prefix_placement(moto):
    bucket = new_bucket(moto)
    store = S3Store(s3_config(moto, bucket, prefix="/fleet/a/"))
    try:
        await store.put("x/y", feed(b"data"))
        raw = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert raw == ["fleet/a/x/y"]
        moto.client().put_object(Bucket=bucket, Key="fleet/other", Body=b"not ours")
        assert await all_keys(store) == ["x/y"]
    finally:
        await store.close()


async def test_s3_index_answers_without_round_trip(moto):
    bucket = new_bucket(moto)
    client = moto.client()

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"pre/{i:05d}", Body=b"x" * i if i % 100 == 0 else b"")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(300)))
    store = S3Store(s3_config(moto, bucket, timeout_s=1.0))
    store.list_page_size = 64  # several listing pages
    await store.start()
    try:
        assert await store.wait_indexed(10)
        assert store.index_stats()["entries"] == 300
        await store.put("ours/1", feed(b"mine"))
        moto.pause()  # every request would now hang
        try:
            t0 = time.monotonic()
            for _ in range(1000):
                assert (await store.stat("pre/00200")).size == 200
                assert (await store.stat("ours/1")).size == 4
            assert time.monotonic() - t0 < 0.5
        finally:
            moto.resume()
    finally:
        await store.close()


async def test_s3_miss_confirmed_and_negative_cache(moto):
    bucket = new_bucket(moto)
    store = S3Store(s3_config(moto, bucket), negative_ttl_s=0.3)
    await store.start()
    try:
        assert await store.wait_indexed(5)
        assert await store.stat("late/obj") is None
        moto.client().put_object(Bucket=bucket, Key="late/obj", Body=b"elsewhere")  # another writer
        assert await store.stat("late/obj") is None  # negative cache
        await asyncio.sleep(0.35)
        assert (await store.stat("late/obj")).size == 9  # the HEAD finds it
        assert store.index_stats()["entries"] == 1  # and remembers it
        # deleted by another process: open notices and forgets
        moto.client().delete_object(Bucket=bucket, Key="late/obj")
        assert await store.open("late/obj") is None
        assert await store.stat("late/obj") is None
    finally:
        await store.close()


async def test_s3_index_refresh_replays_own_writes(moto):
    bucket = new_bucket(moto)
    store = S3Store(s3_config(moto, bucket, index_refresh_s=1), confirm_misses=False)
    await store.start()
    try:
        assert await store.wait_indexed(5)
        moto.client().put_object(Bucket=bucket, Key="ext/1", Body=b"e")
        assert await store.stat("ext/1") is None  # trusted index, not yet refreshed
        await store.put("own/1", feed(b"o"))
        for _ in range(60):
            if await store.stat("ext/1") is not None:
                break
            await asyncio.sleep(0.05)
        assert (await store.stat("ext/1")).size == 1
        assert (await store.stat("own/1")).size == 1
    finally:
        await store.close()


async def test_s3_without_index(moto):
    bucket = new_bucket(moto)
    store = S3Store(s3_config(moto, bucket, index=False))
    await store.start()
    try:
        assert not await store.wait_indexed(0.1)
        await store.put(KEY, feed(b"abc"))
        assert (await store.stat(KEY)).size == 3
        assert store.index_stats()["entries"] == 0
    finally:
        await store.close()


async def test_s3_presigned_redirect(moto):
    bucket = new_bucket(moto)
    store = S3Store(s3_config(moto, bucket, prefix="p", redirect_get=True, presign_ttl_s=60))
    try:
        data = blob(200_000, seed=9)
        await store.put(KEY, feed(data))
        body = await store.open(KEY, allow_redirect=True)
        assert isinstance(body, RedirectURL) and body.meta.size == len(data)
        assert "X-Amz-Signature=" in body.url or "Signature=" in body.url
        assert await read_body(body) == data
        assert await read_body(body, 1000, 10) == data[1000:1010]
        # without allow_redirect (e.g. HEAD or a client that cannot follow) it streams
        assert isinstance(await store.open(KEY), ByteStream)
        assert await store.open("missing/x", allow_redirect=True) is None
    finally:
        await store.close()


async def test_s3_outage_and_recovery():
    """Server killed: StoreUnavailable within the timeout, indexed keys still answer; server
    back on the same port: the same store works again. Hung server: same, by timeout."""
    old = use_test_credentials()
    srv = MotoServer()
    srv.start()
    store = S3Store(s3_config(srv, new_bucket(srv), timeout_s=1.0))
    try:
        await store.start()
        assert await store.wait_indexed(5)
        await store.put("kept/1", feed(b"k"))
        for hang in (False, True):
            srv.pause() if hang else srv.stop()
            try:
                assert (await store.stat("kept/1")).size == 1  # the index answers
                t0 = time.monotonic()
                results = await asyncio.gather(
                    store.stat(f"gone/{hang}"),
                    store.open("kept/1"),
                    store.put(f"new/{hang}", feed(b"n")),
                    store.delete("kept/1"),
                    return_exceptions=True,
                )
                assert time.monotonic() - t0 < 1.0 + 0.5
                assert all(isinstance(r, StoreUnavailable) for r in results), results
            finally:
                srv.resume() if hang else srv.start()
            # back: a fresh moto has an empty bucket (re-created by the helper)
            r = await store.put(f"after/{hang}", feed(b"back"))
            assert r.created
            assert (await store.stat(f"after/{hang}")).size == 4
            assert await get(store, f"after/{hang}") == b"back"
    finally:
        await store.close()
        srv.close()
        restore_env(old)
