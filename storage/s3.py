"""S3 object store through boto3, with an in-memory existence index for HEAD storms.

Every boto3 call is blocking, so each runs in a bounded thread pool (one thread per pooled
connection, ``max_connections``) under ``asyncio.wait_for(timeout_s)``: the event loop never
waits on S3, and an unreachable S3 turns into :class:`storage.StoreUnavailable` within about
``timeout_s`` (the HTTP layer answers 503 + Retry-After). A 404 is "absent", never an error.

Keys map to ``<prefix>/<key>`` when ``prefix`` is set, else to ``<key>``.

Existence index (``index = true``)
    ``start()`` lists the bucket (under the prefix) in a background task into a dict, logs its
    progress, and re-lists every ``index_refresh_s`` seconds (the new dict replaces the old one
    when complete; our own puts/deletes made during the listing are replayed onto it). Our own
    put/delete keep it current. A hit answers ``stat`` without a round trip. A miss (or any
    ``stat`` while the first listing runs) is confirmed with a HEAD, unless the key was found
    absent less than ``negative_ttl_s`` (2 s) ago; concurrent HEADs of one key share one request.
    With ``confirm_misses=False`` a complete index is trusted for misses too (only safe when this
    process is the bucket's only writer).

    Compact form: dict key = 16-byte BLAKE2b digest of the key (not the ~130-byte key string),
    value = one ``bytes`` of 29 bytes for a plain MD5 ETag: ``<QI`` size + mtime (seconds), a
    tag byte, the raw 16-byte MD5 (multipart / other ETags are stored as text after the tag).
    Measured with tracemalloc (bench/storage_bench.py, 100k synthetic sstate keys, CPython 3.11):
    163 bytes per object all in (dict slot + both objects; a naive str -> (size, mtime, etag)
    dict takes 444), i.e. ~165 MB per million objects;
    during a refresh the old and the new dict both live (twice that for a moment). The index
    cannot enumerate keys (``keys()`` always lists S3).

Other writers: objects another process puts are found by the HEAD on a miss. Objects another
sstate-proxy process removes (`sstate-proxy gc`, a DELETE, an eviction) are dropped from the
index through the database's removal log (``removals``, the service's EquivalenceDB): a task
polls ``generation()`` every REMOVALS_POLL_S and, when it moved, reads the keys removed since
its last position (``removals_since``), so the index forgets them within about REMOVALS_POLL_S
of the removal's commit. Objects deleted behind the service's back (another S3 client) stay
"present" until the next refresh (``open`` then finds them gone, drops them and returns None).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from storage import (
    Body,
    ByteStream,
    DigestMismatch,
    Meta,
    PutResult,
    RedirectURL,
    StoreError,
    StoreUnavailable,
    TooLarge,
    file_chunks,
    pid_alive,
)
from storage.local import check_key
from storage.s3_config import S3Config

if TYPE_CHECKING:
    from storage.equivalence import EquivalenceDB


log = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK = 1 * MiB  # GET streaming read size
PART = 8 * MiB  # multipart threshold and part size
MAX_PARTS = 10_000
INFLIGHT_PARTS = 4  # parts uploaded concurrently per upload (memory: this x part size)
INDEX_LOG_EVERY = 100_000
NEG_CACHE_MAX = 100_000
MIN_TRANSFER_RATE = 256 * 1024  # bytes/s assumed when sizing a data call's timeout
# How often the index checks the database's removal log (when generation() moved).
REMOVALS_POLL_S = 0.5
STAGING_PREFIX = "sstate-proxy-staging."  # staging_path's names (pid first: see remove_dead_staging)

_HDR = struct.Struct("<QI")
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_MULTI_RE = re.compile(r"([0-9a-f]{32})-(\d+)")
_UNAVAILABLE_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
}


_boto_session: boto3.session.Session | None = None


def _session() -> boto3.session.Session:
    """One boto3 session per process: loading the service model costs ~0.2 s per session."""
    global _boto_session
    if _boto_session is None:
        _boto_session = boto3.session.Session()
    return _boto_session


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def pack_meta(size: int, mtime: float, etag: str) -> bytes:
    """Index value: size, whole-second mtime and the ETag in as few bytes as possible."""
    head = _HDR.pack(size, max(0, min(int(mtime), 0xFFFFFFFF)))
    if len(etag) == 32 and _MD5_RE.fullmatch(etag):
        return head + b"\x00" + bytes.fromhex(etag)
    m = _MULTI_RE.fullmatch(etag)
    if m:
        return head + b"\x01" + bytes.fromhex(m[1]) + m[2].encode()
    return head + b"\x02" + etag.encode("utf-8")


def unpack_meta(v: bytes) -> Meta:
    size, mtime = _HDR.unpack_from(v)
    tag = v[12]
    if tag == 0:
        etag = v[13:29].hex()
    elif tag == 1:
        etag = v[13:29].hex() + "-" + v[29:].decode()
    else:
        etag = v[13:].decode("utf-8")
    return Meta(size, float(mtime), etag)


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def _ts(dt: datetime | None) -> float:
    # S3 HEAD reports whole seconds, listings milliseconds: keep seconds so both agree.
    return float(int(dt.timestamp())) if dt is not None else float(int(time.time()))


def _code(e: ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


def _is_absent(e: ClientError) -> bool:
    code, status = _code(e)
    return status == 404 or code in ("404", "NoSuchKey", "NotFound")


class S3Store:
    """See the module docstring."""

    list_page_size = 1000  # keys per listing request (the S3 maximum)

    def __init__(
        self,
        cfg: S3Config,
        *,
        negative_ttl_s: float = 2.0,
        confirm_misses: bool = True,
        part_size: int = PART,
        client: Any = None,
        removals: EquivalenceDB | None = None,
    ) -> None:
        """``removals``: the database whose removal log the index follows (see the module
        docstring); None: only this process's own deletes are seen at once."""
        if not cfg.bucket:
            raise ValueError("S3 store needs a bucket")
        self._cfg = cfg
        self._bucket = cfg.bucket
        prefix = cfg.prefix.strip("/")
        self._kp = prefix + "/" if prefix else ""
        self._timeout = float(cfg.timeout_s)
        self._neg_ttl = negative_ttl_s
        self._confirm_misses = confirm_misses
        self._part = max(5 * MiB, part_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.max_connections, thread_name_prefix="s3store"
        )
        if client is None:
            bcfg = BotoConfig(
                max_pool_connections=cfg.max_connections,
                connect_timeout=cfg.timeout_s,
                read_timeout=cfg.timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"} if cfg.endpoint_url else None,
                # S3-compatible servers (MinIO, Ceph, older moto) may not know the new default
                # CRC checksums; we verify with Content-MD5 and our own digests instead.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                tcp_keepalive=True,
            )
            client = _session().client(
                "s3",
                region_name=cfg.region or None,
                endpoint_url=cfg.endpoint_url or None,
                config=bcfg,
            )
        self._s3 = client
        self._conditional = True  # the server honours If-None-Match: * (cleared if it says no)

        self._use_index = bool(cfg.index)
        self._refresh_s = max(1.0, float(cfg.index_refresh_s))
        self._index: dict[bytes, bytes] = {}
        self._index_complete = False
        self._index_built_at = 0.0
        self._journal: dict[bytes, bytes | None] | None = None  # mutations during a listing
        self._indexed = asyncio.Event()
        self._index_task: asyncio.Task[None] | None = None
        self._neg: dict[bytes, float] = {}  # digest -> monotonic expiry
        self._heads: dict[bytes, asyncio.Future[Meta | None]] = {}
        self._locks: dict[str, list[Any]] = {}  # key -> [Lock, users]
        self._aborts: set[concurrent.futures.Future[None]] = set()
        self._closed = False
        self._removals = removals
        self._removals_task: asyncio.Task[None] | None = None

    # --- plumbing ------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._kp + key

    async def _call(self, fn: Callable[..., Any], /, *args: Any, _timeout: float | None = None,
                    **kwargs: Any) -> Any:
        """Run a blocking boto3 call in the pool, bounded in time. Connection trouble, timeouts
        and 5xx/throttling become StoreUnavailable; other ClientErrors propagate as such."""
        if self._closed:
            raise StoreUnavailable("S3 store is closed")
        loop = asyncio.get_running_loop()
        timeout = self._timeout if _timeout is None else _timeout
        name = getattr(fn, "__name__", "call")
        try:
            fut = loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise StoreUnavailable(f"S3 {name}: no answer within {timeout:g}s") from None
        except RuntimeError as e:  # pool shut down
            raise StoreUnavailable(f"S3 {name}: {e}") from e
        except ClientError as e:
            code, status = _code(e)
            if status >= 500 or code in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"S3 {name}: {code or status}") from e
            raise
        except (BotoConnectionError, HTTPClientError, ReadTimeoutError) as e:
            raise StoreUnavailable(f"S3 {name}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 {name}: {e}") from e

    def _data_timeout(self, nbytes: int) -> float:
        return self._timeout + nbytes / MIN_TRANSFER_RATE

    # --- index ---------------------------------------------------------------------------

    def _remember(self, key: str, meta: Meta) -> None:
        d = _digest(key)
        self._neg.pop(d, None)
        if not self._use_index:
            return
        v = pack_meta(meta.size, meta.mtime, meta.etag)
        self._index[d] = v
        if self._journal is not None:
            self._journal[d] = v

    def _forget(self, key: str) -> None:
        d = _digest(key)
        self._index.pop(d, None)
        if self._journal is not None:
            self._journal[d] = None
        if self._neg_ttl > 0:
            if len(self._neg) >= NEG_CACHE_MAX:
                now = time.monotonic()
                self._neg = {k: t for k, t in self._neg.items() if t > now}
                if len(self._neg) >= NEG_CACHE_MAX:
                    self._neg.clear()
            self._neg[d] = time.monotonic() + self._neg_ttl

    def index_stats(self) -> dict[str, Any]:
        """For /metrics and /readyz: entries, whether the first listing finished, its age."""
        return {
            "enabled": self._use_index,
            "entries": len(self._index),
            "complete": self._index_complete,
            "age_s": time.monotonic() - self._index_built_at if self._index_complete else None,
            "negative_entries": len(self._neg),
        }

    async def wait_indexed(self, timeout: float | None = None) -> bool:
        """Wait until the first listing is complete; False on timeout or if the index is off."""
        if not self._use_index:
            return False
        try:
            await asyncio.wait_for(self._indexed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def start(self, *, housekeeping: bool = True) -> None:
        if housekeeping:
            await asyncio.to_thread(remove_dead_staging)
        if self._use_index and self._index_task is None:
            if self._removals is not None:
                # The log position is taken before the first listing starts: whatever is removed
                # after it is either absent from the listing or read from the log.
                seq = None
                try:
                    seq, _ = await self._removals.removals_since(None)
                except Exception as e:  # the follower retries; the database may come back later
                    log.warning("S3 index: cannot read the removal log yet (%s)", e)
                self._removals_task = asyncio.create_task(self._follow_removals(seq), name="s3store-removals")
            self._index_task = asyncio.create_task(self._index_loop(), name="s3store-index")

    async def _follow_removals(self, seq: int | None) -> None:
        """Drop from the index the keys other processes removed (the removal log)."""
        from storage.equivalence import REMOVALS_BATCH

        db = self._removals
        assert db is not None
        seen_gen: int | None = None
        failing = False
        while True:
            try:
                if seq is None:
                    seq, _ = await db.removals_since(None)
                gen = await db.generation()
                if gen != seen_gen:
                    seen_gen = gen
                    while True:
                        seq, keys = await db.removals_since(seq)
                        for key in keys:
                            self._forget(key)
                        if len(keys) < REMOVALS_BATCH:
                            break
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                seen_gen = None  # ask again next time
                if not failing:
                    log.warning("S3 index: reading the removal log failed (%s); retrying", e)
                failing = True
            await asyncio.sleep(REMOVALS_POLL_S)

    async def _index_loop(self) -> None:
        failures = 0
        while True:
            try:
                await self._rebuild()
                failures = 0
                delay = self._refresh_s
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                delay = min(self._refresh_s, 2.0 * 2 ** min(failures, 5))
                log.warning("S3 index: listing s3://%s/%s failed (%s); retrying in %.0fs",
                            self._bucket, self._kp, e, delay)
            await asyncio.sleep(delay)

    def _list_page(self, pages: Any, building: dict[bytes, bytes]) -> int | None:
        """In the pool: fetch one page of the listing and add it to ``building``."""
        page = next(pages, None)
        if page is None:
            return None
        n = len(self._kp)
        contents = page.get("Contents", ())
        for obj in contents:
            building[_digest(obj["Key"][n:])] = pack_meta(
                obj["Size"], _ts(obj.get("LastModified")), _etag(obj.get("ETag"))
            )
        return len(contents)

    async def _rebuild(self) -> None:
        t0 = time.monotonic()
        building: dict[bytes, bytes] = {}
        self._journal = {}
        try:
            paginator = self._s3.get_paginator("list_objects_v2")
            pages = iter(paginator.paginate(Bucket=self._bucket, Prefix=self._kp,
                                            PaginationConfig={"PageSize": self.list_page_size}))
            total = 0
            next_log = INDEX_LOG_EVERY
            while True:
                n = await self._call(self._list_page, pages, building, _timeout=self._timeout * 3)
                if n is None:
                    break
                total += n
                if total >= next_log:
                    log.info("S3 index: %d keys listed so far (%.1fs)", total, time.monotonic() - t0)
                    next_log += INDEX_LOG_EVERY
            for d, v in self._journal.items():
                if v is None:
                    building.pop(d, None)
                else:
                    building[d] = v
        finally:
            self._journal = None
        first = not self._index_complete
        self._index = building
        self._index_complete = True
        self._index_built_at = time.monotonic()
        self._indexed.set()
        log.log(logging.INFO if first else logging.DEBUG,
                "S3 index: %d keys of s3://%s/%s indexed in %.1fs",
                len(building), self._bucket, self._kp, time.monotonic() - t0)

    # --- reads ---------------------------------------------------------------------------

    async def _head(self, key: str) -> Meta | None:
        """HEAD the object (no cache)."""
        try:
            r = await self._call(self._s3.head_object, Bucket=self._bucket, Key=self._full(key))
        except ClientError as e:
            if _is_absent(e):
                return None
            raise StoreError(f"S3 head {key!r}: {_code(e)[0]}") from e
        return Meta(int(r["ContentLength"]), _ts(r.get("LastModified")), _etag(r.get("ETag")))

    async def _confirm(self, key: str, d: bytes) -> Meta | None:
        """HEAD ``key`` and record the answer; concurrent callers share one request."""
        fut = self._heads.get(d)
        if fut is None:
            fut = asyncio.ensure_future(self._head_and_record(key))
            self._heads[d] = fut

            def done(f: asyncio.Future[Meta | None]) -> None:
                if self._heads.get(d) is f:
                    del self._heads[d]
                if not f.cancelled():
                    f.exception()  # retrieved: no "never retrieved" warning if all waiters left

            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def _head_and_record(self, key: str) -> Meta | None:
        meta = await self._head(key)
        if meta is None:
            self._forget(key)
        else:
            self._remember(key, meta)
        return meta

    async def stat(self, key: str) -> Meta | None:
        check_key(key)
        d = _digest(key)
        v = self._index.get(d)
        if v is not None:
            return unpack_meta(v)
        if self._index_complete and not self._confirm_misses:
            return None
        exp = self._neg.get(d)
        if exp is not None:
            if exp > time.monotonic():
                return None
            self._neg.pop(d, None)
        return await self._confirm(key, d)

    async def open(
        self, key: str, start: int = 0, length: int | None = None, *, allow_redirect: bool = False
    ) -> Body | None:
        """A presigned URL (``allow_redirect`` and ``redirect_get``) or a stream of the range
        [start, start+length), clamped to the object (a start at or past the end: empty)."""
        check_key(key)
        if start < 0 or (length is not None and length < 0):
            raise ValueError("negative range")
        if allow_redirect and self._cfg.redirect_get:
            meta = await self.stat(key)
            if meta is None:
                return None
            url = await self._call(
                self._s3.generate_presigned_url,
                "get_object",
                Params={"Bucket": self._bucket, "Key": self._full(key)},
                ExpiresIn=int(self._cfg.presign_ttl_s),
            )
            return RedirectURL(url, meta)

        v = self._index.get(_digest(key))
        known = unpack_meta(v) if v is not None else None
        if known is not None:
            end = known.size if length is None else min(known.size, start + length)
            if end <= start:
                # Nothing to read; make sure it still exists before saying so.
                meta = await self._confirm(key, _digest(key))
                if meta is None:
                    return None
                return ByteStream(_empty(), meta, min(start, meta.size), 0)
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._full(key)}
        if start > 0 or length is not None:
            if length == 0:
                meta = known or await self.stat(key)
                return None if meta is None else ByteStream(_empty(), meta, min(start, meta.size), 0)
            kwargs["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        try:
            r = await self._call(self._s3.get_object, **kwargs)
        except ClientError as e:
            if _is_absent(e):
                self._forget(key)
                return None
            code, status = _code(e)
            if status == 416 or code == "InvalidRange":
                meta = await self._confirm(key, _digest(key))
                return None if meta is None else ByteStream(_empty(), meta, min(start, meta.size), 0)
            raise StoreError(f"S3 get {key!r}: {code or status}") from e
        n = int(r["ContentLength"])
        total = n
        cr = r.get("ContentRange")
        if cr and "/" in cr:
            tail = cr.rsplit("/", 1)[1]
            if tail.isdigit():
                total = int(tail)
        meta = Meta(total, _ts(r.get("LastModified")), _etag(r.get("ETag")))
        if known is None or known.etag != meta.etag or known.size != meta.size:
            self._remember(key, meta)
        return ByteStream(self._stream(r["Body"], n), meta, start, n)

    async def _stream(self, body: Any, length: int) -> AsyncIterator[bytes]:
        try:
            remaining = length
            while remaining > 0:
                chunk = await self._call(body.read, min(CHUNK, remaining),
                                         _timeout=self._data_timeout(CHUNK))
                if not chunk:
                    raise StoreUnavailable(f"S3 stream ended {remaining} bytes early")
                remaining -= len(chunk)
                yield chunk
        finally:
            with contextlib.suppress(RuntimeError):
                self._pool.submit(body.close)

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        async for key, _meta in self.entries(prefix):
            yield key

    async def entries(self, prefix: str = "") -> AsyncIterator[tuple[str, Meta]]:
        """(key, meta) from the listing itself: no request per object."""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self._bucket, Prefix=self._kp + prefix,
                                        PaginationConfig={"PageSize": self.list_page_size}))
        n = len(self._kp)
        while True:
            page = await self._call(next, pages, None, _timeout=self._timeout * 3)
            if page is None:
                return
            for obj in page.get("Contents", ()):
                yield obj["Key"][n:], Meta(int(obj["Size"]), _ts(obj.get("LastModified")), _etag(obj.get("ETag")))

    # --- writes --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        """Serialise this process's puts of one key (the second sees the first's object)."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(key, None)

    async def put_file(self, key: str, path: str, *, link: bool = False) -> PutResult:
        """Upload a local file (S3 has no hard links: ``link`` is ignored)."""
        return await self.put(key, file_chunks(path), size=os.stat(path).st_size)

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        size: int | None = None,
        md5: bytes | None = None,
        sha256: bytes | None = None,
        max_size: int | None = None,
    ) -> PutResult:
        """Verified upload: put_object below the part size, else multipart (aborted on any
        failure or cancellation). When ``key`` exists the call returns created=False without
        reading ``chunks``. First write wins, across processes too when the server honours
        ``If-None-Match: *`` (AWS since 2024, moto, MinIO)."""
        check_key(key)
        if size is not None and max_size is not None and size > max_size:
            raise TooLarge(f"announced size {size} exceeds the limit of {max_size} bytes")
        async with self._key_lock(key):
            d = _digest(key)
            v = self._index.get(d)
            meta = unpack_meta(v) if v is not None else await self._confirm(key, d)
            if meta is not None:
                return PutResult(meta, False)
            return await self._upload(key, chunks, size, md5, sha256, max_size)

    async def _upload(self, key: str, chunks: AsyncIterator[bytes], size: int | None,
                      md5: bytes | None, sha256: bytes | None, max_size: int | None) -> PutResult:
        loop = asyncio.get_running_loop()
        full = self._full(key)
        part_size = self._part
        if size is not None and size > part_size * (MAX_PARTS - 100):
            part_size = -(-size // (MAX_PARTS - 100))
        h_md5 = hashlib.md5()
        h_sha = hashlib.sha256() if sha256 is not None else None

        def hash_block(data: bytes) -> None:  # in the pool: hashlib drops the GIL
            h_md5.update(data)
            if h_sha is not None:
                h_sha.update(data)

        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        tasks: set[asyncio.Task[None]] = set()
        total = 0
        numbers = 0
        buf = bytearray()

        async def send_part(number: int, data: bytes) -> None:
            r = await self._call(self._s3.upload_part, Bucket=self._bucket, Key=full,
                                 UploadId=upload_id, PartNumber=number, Body=data,
                                 _timeout=self._data_timeout(len(data)))
            parts.append({"PartNumber": number, "ETag": r["ETag"]})

        async def flush_part(data: bytes) -> None:
            nonlocal upload_id, numbers
            await loop.run_in_executor(self._pool, hash_block, data)
            if upload_id is None:
                r = await self._call(self._s3.create_multipart_upload, Bucket=self._bucket, Key=full)
                upload_id = r["UploadId"]
            while len(tasks) >= INFLIGHT_PARTS:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    tasks.discard(t)
                    t.result()
            numbers += 1
            t = asyncio.create_task(send_part(numbers, data))
            tasks.add(t)

        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                total += len(chunk)
                if max_size is not None and total > max_size:
                    raise TooLarge(f"upload exceeds the limit of {max_size} bytes")
                if size is not None and total > size:
                    raise DigestMismatch(f"received more than the announced {size} bytes")
                buf += chunk
                if len(buf) >= part_size:
                    data, buf = bytes(buf), bytearray()
                    await flush_part(data)
            last = bytes(buf)
            buf = bytearray()
            if upload_id is None:
                await loop.run_in_executor(self._pool, hash_block, last)
            elif last:
                await flush_part(last)
            if size is not None and total != size:
                raise DigestMismatch(f"received {total} bytes, announced {size}")
            if md5 is not None and h_md5.digest() != md5:
                raise DigestMismatch("MD5 of the received bytes does not match")
            if h_sha is not None and h_sha.digest() != sha256:
                raise DigestMismatch("SHA-256 of the received bytes does not match")

            if upload_id is None:
                kw: dict[str, Any] = {
                    "Bucket": self._bucket, "Key": full, "Body": last,
                    "ContentMD5": base64.b64encode(h_md5.digest()).decode(),
                }
                op: Callable[..., Any] = self._s3.put_object
                timeout = self._data_timeout(len(last))
            else:
                while tasks:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        tasks.discard(t)
                        t.result()
                kw = {
                    "Bucket": self._bucket, "Key": full, "UploadId": upload_id,
                    "MultipartUpload": {"Parts": sorted(parts, key=lambda p: p["PartNumber"])},
                }
                op = self._s3.complete_multipart_upload
                timeout = self._timeout * 3  # S3 may take a while to assemble big objects
            created, etag = await self._conditional_write(op, kw, timeout)
            if upload_id is not None and created:
                upload_id = None  # completed: nothing to abort
        except BaseException:
            for t in tasks:
                t.cancel()
            if upload_id is not None:
                self._abort(full, upload_id)
            raise
        if upload_id is not None:  # lost the race: the completed upload was refused
            self._abort(full, upload_id)
        if not created:
            log.info("S3 store: %s exists already; new body discarded", key)
            meta = await self._confirm(key, _digest(key))
            if meta is None:  # deleted in between; report what we know
                meta = Meta(total, float(int(time.time())), "")
            return PutResult(meta, False)
        try:
            meta = await self._head(key) or Meta(total, float(int(time.time())), etag)
        except StoreError:
            meta = Meta(total, float(int(time.time())), etag)
        self._remember(key, meta)
        return PutResult(meta, True)

    async def _conditional_write(self, op: Callable[..., Any], kw: dict[str, Any],
                                 timeout: float) -> tuple[bool, str]:
        """(created, etag) of a put/complete with If-None-Match: * (when the server takes it)."""
        for _ in range(3):
            args = dict(kw, IfNoneMatch="*") if self._conditional else kw
            try:
                r = await self._call(op, _timeout=timeout, **args)
                return True, _etag(r.get("ETag"))
            except StoreUnavailable as e:
                cause = e.__cause__
                if (self._conditional and isinstance(cause, ClientError)
                        and _code(cause)[0] == "NotImplemented"):
                    log.warning("S3 store: server does not support If-None-Match; "
                                "first-write-wins is only enforced within this process")
                    self._conditional = False
                    continue
                raise
            except ClientError as e:
                code, status = _code(e)
                if status == 412 or code == "PreconditionFailed":
                    return False, ""
                if status == 409 or code == "ConditionalRequestConflict":
                    # a concurrent conditional write is in progress: did it land?
                    await asyncio.sleep(0.2)
                    if await self._head(self._key_of(kw["Key"])) is not None:
                        return False, ""
                    continue
                raise StoreError(f"S3 {getattr(op, '__name__', 'write')}: {code or status}") from e
        raise StoreUnavailable("S3: conflicting concurrent writes, retry later")

    def _key_of(self, full: str) -> str:
        return full[len(self._kp):]

    def _abort(self, full: str, upload_id: str) -> None:
        """Abort a multipart upload in the background (works during cancellation)."""

        def abort() -> None:
            try:
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload_id)
            except Exception as e:  # a bucket lifecycle rule should clean what we could not
                log.warning("S3 store: abort of upload %s for %s failed: %s", upload_id, full, e)

        with contextlib.suppress(RuntimeError):
            cf = self._pool.submit(abort)
            self._aborts.add(cf)
            cf.add_done_callback(self._aborts.discard)

    async def delete(self, key: str) -> bool:
        check_key(key)
        meta = await self._head(key)
        if meta is None:
            self._forget(key)
            return False
        try:
            await self._call(self._s3.delete_object, Bucket=self._bucket, Key=self._full(key))
        except ClientError as e:
            if _is_absent(e):
                self._forget(key)
                return False
            raise StoreError(f"S3 delete {key!r}: {_code(e)[0]}") from e
        self._forget(key)
        return True

    async def check(self) -> None:
        """HeadBucket: one request to S3, not cached."""
        try:
            await self._call(self._s3.head_bucket, Bucket=self._bucket)
        except ClientError as e:
            raise StoreUnavailable(f"S3 bucket {self._bucket!r}: {_code(e)[0] or _code(e)[1]}") from e

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._removals_task is not None:
            self._removals_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._removals_task
        if self._index_task is not None:
            self._index_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._index_task
        if self._aborts:  # let pending multipart aborts finish (bounded)
            await asyncio.wait([asyncio.wrap_future(f) for f in list(self._aborts)],
                               timeout=self._timeout)
        # Threads stuck on a dead connection end at their read timeout, without us waiting.
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._s3.close()

    def staging_path(self) -> str:
        """A fresh name in the system's temp directory (S3 has no filesystem to link into:
        ``put_file`` uploads the file); ``start`` removes those of dead processes."""
        return os.path.join(tempfile.gettempdir(), f"{STAGING_PREFIX}{os.getpid()}.{secrets.token_hex(8)}")


def remove_dead_staging(directory: str | None = None) -> int:
    """Remove the staging files (``S3Store.staging_path``) whose process is gone (killed in
    the middle of a pull); the number removed."""
    directory = directory or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        pid = name[len(STAGING_PREFIX):].split(".", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    if removed:
        log.info("S3 store: removed %d staging file(s) of dead processes from %s", removed, directory)
    return removed


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover  (makes this an async generator)
