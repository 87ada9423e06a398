"""Storage micro-benchmarks: stat (HEAD-like) rate, GET throughput, S3 index memory.

    python bench/storage_bench.py [--quick]

Runs against a local directory and a moto S3 server over HTTP (tests/s3server.py). moto is
much slower than real S3 per request but shows the shape: an indexed stat is a dict lookup, an
unindexed one is a HEAD round trip through the thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage import ByteStream, LocalFile  # noqa: E402
from storage.local import LocalStore  # noqa: E402
from storage.s3 import (
    S3Config,  # noqa: E402
    S3Store,  # noqa: E402
)
from tests.s3server import MotoServer, use_test_credentials  # noqa: E402

MiB = 1024 * 1024


def sstate_key(i: int) -> str:
    h = hashlib.sha256(str(i).encode()).hexdigest()
    return (f"universal/{h[:2]}/{h[2:4]}/sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:"
            f"{h}_populate_sysroot.tar.zst")


async def feed(data: bytes, step: int = 256 * 1024):
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def stat_rate(store, keys: list[str], seconds: float, concurrency: int = 1) -> float:
    """stats per second, ``concurrency`` callers in parallel, cycling through ``keys``."""
    n = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal n
        i = offset
        while time.perf_counter() < deadline:
            for _ in range(100):
                await store.stat(keys[i % len(keys)])
                i += 1
            n += 100

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c * 7919) for c in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def get_rate(store, key: str, size: int, rounds: int) -> float:
    """MB/s of reading the whole object ``rounds`` times through open()."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        body = await store.open(key)
        got = 0
        if isinstance(body, LocalFile):
            # what sendfile would read: the page cache, in 1 MiB blocks
            with open(body.path, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    got += len(chunk)
        else:
            assert isinstance(body, ByteStream)
            async for chunk in body.chunks:
                got += len(chunk)
        assert got == size
    return size * rounds / (time.perf_counter() - t0) / 1e6


def index_memory(n: int) -> tuple[float, float]:
    """Bytes per object of the S3 index (its real listing code path) and, for comparison, of a
    naive dict key-string -> (size, mtime, etag-string)."""

    class NoClient:
        def close(self) -> None:
            pass

    store = S3Store(S3Config(bucket="x"), client=NoClient())
    lm = datetime(2024, 5, 1, tzinfo=UTC)

    def pages():
        for start in range(0, n, 1000):
            yield {"Contents": [
                {"Key": sstate_key(i), "Size": 1000 + i, "LastModified": lm,
                 "ETag": '"' + hashlib.md5(str(i).encode()).hexdigest() + '"'}
                for i in range(start, min(n, start + 1000))
            ]}

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    building: dict[bytes, bytes] = {}
    it = pages()
    while store._list_page(it, building) is not None:
        pass
    del it
    gc.collect()
    compact = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    del building

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    naive = {sstate_key(i): (1000 + i, lm.timestamp(), hashlib.md5(str(i).encode()).hexdigest())
             for i in range(n)}
    naive_b = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    del naive
    store._pool.shutdown()
    return compact, naive_b


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    args = ap.parse_args()
    secs = 1.0 if args.quick else 3.0
    get_size = (16 if args.quick else 64) * MiB
    results: list[tuple[str, str]] = []

    compact, naive = index_memory(100_000)
    results.append(("S3 index memory per object (100k entries, tracemalloc)",
                    f"{compact:.0f} B (naive str->tuple dict: {naive:.0f} B)"))

    use_test_credentials()
    with tempfile.TemporaryDirectory() as tmp, MotoServer() as srv:
        srv.create_bucket("bench")
        keys = [sstate_key(i) for i in range(200)]
        missing = [sstate_key(10_000 + i) for i in range(200)]
        big = os.urandom(get_size)

        local = LocalStore(os.path.join(tmp, "root"))
        for k in keys:
            await local.put(k, feed(b"x" * 1000))
        await local.put("big/object", feed(big))
        results.append(("local stat hit", f"{await stat_rate(local, keys, secs):,.0f}/s"))
        results.append(("local stat miss", f"{await stat_rate(local, missing, secs):,.0f}/s"))
        results.append(("local GET (page cache read)",
                        f"{await get_rate(local, 'big/object', get_size, 5):,.0f} MB/s"))
        await local.close()

        cfg = S3Config(bucket="bench", endpoint_url=srv.endpoint_url, region="us-east-1")
        s3 = S3Store(cfg)
        await s3.start()
        assert await s3.wait_indexed(30)
        for k in keys:
            await s3.put(k, feed(b"x" * 1000))
        await s3.put("big/object", feed(big))
        results.append(("S3 stat hit, index", f"{await stat_rate(s3, keys, secs):,.0f}/s"))
        results.append(("S3 stat miss, index + 2 s negative cache (same 200 keys)",
                        f"{await stat_rate(s3, missing, secs):,.0f}/s"))
        results.append(("S3 GET ByteStream via moto",
                        f"{await get_rate(s3, 'big/object', get_size, 3):,.0f} MB/s"))
        await s3.close()

        raw = S3Store(S3Config(bucket="bench", endpoint_url=srv.endpoint_url, region="us-east-1",
                               index=False), negative_ttl_s=0)
        await raw.start()
        for conc in (1, 32):
            results.append((f"S3 stat hit, no index (HEAD to moto), concurrency {conc}",
                            f"{await stat_rate(raw, keys, secs, conc):,.0f}/s"))
        await raw.close()

    width = max(len(k) for k, _ in results)
    for k, v in results:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    asyncio.run(main())
