"""Authenticated PUT/DELETE of sstate objects, and storage dedup by archive identity.

PUT (``@upload``): the body must carry ``Content-Length`` (411 without it; chunked bodies are
refused the same way), at most ``[limits] max_upload_bytes`` (413 before reading a byte), and is
verified against the optional ``Digest: sha-256=<b64>`` / ``md5=<b64>`` (RFC 3230) and
``Content-MD5`` headers (400, nothing stored). The store writes atomically (temp file + link on
disk, conditional write on S3), so a client that vanishes mid-body, a bad digest or a server
killed mid-upload never leaves a partial object. ``201`` when the name is new, ``200`` when it
exists already (first write wins, as in hashserv: the new body is discarded and logged).

DELETE (``@db-admin``): ``204``, or ``404`` when the name is neither stored nor a dedup alias.

Dedup (see storage/archive_identity.py): after a new ``.tar.zst``/``.tgz`` object is stored its
archive identity is computed (in a small thread pool) and recorded in the database's own
``sstate_proxy_archives`` table. When an equal archive is stored already under another name,
the new copy's bytes are deleted again and the name becomes an *alias* of the canonical key:
the resolver answers the alias with the canonical bytes (``X-Sstate-Source: hit``).
Deleting a canonical object that has aliases *promotes* its oldest alias: the bytes are copied
to the alias's own name first (atomic put), then the database is switched, then the old name is
removed, so every alias keeps working (a crash in between leaves an extra copy, never a hole).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import os
import tempfile
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.http_auth import require
from storage import (
    ByteStream,
    DigestMismatch,
    InvalidKey,
    LocalFile,
    ObjectStore,
    StoreUnavailable,
    TooLarge,
)
from storage.archive_identity import Uncomputable, archive_format, identity_of_file, identity_of_fileobj

log = logging.getLogger("sstate_proxy.uploads")

READ_BLOCK = 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # bodies of refused/duplicate PUTs read and dropped at most
DEDUP_HEADER = "X-Sstate-Deduplicated-To"

_pool: concurrent.futures.ThreadPoolExecutor | None = None


def identity_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Bounded executor for archive identities (CPU: decompression + sha256)."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)), thread_name_prefix="archive-identity")
    return _pool


class ClientGone(ConnectionError):
    """The client's body stream failed (disconnect, short body): not a store fault."""


async def file_chunks(path: str, block: int = READ_BLOCK) -> AsyncIterator[bytes]:
    """The bytes of a local file, read in the default executor."""
    loop = asyncio.get_running_loop()
    f = await loop.run_in_executor(None, open, path, "rb")
    try:
        while True:
            data = await loop.run_in_executor(None, f.read, block)
            if not data:
                return
            yield data
    finally:
        f.close()


class Dedup:
    """Archive-identity dedup over one store and one database (used by PUT, DELETE and import)."""

    def __init__(self, store: ObjectStore, db, *, dedup_new: bool = True) -> None:
        self.store = store
        self.db = db
        self.enabled = hasattr(db, "record_archive")
        # False: new objects are not deduplicated ([storage] dedup); existing aliases still work.
        self.dedup_new = dedup_new
        # Serialises "settle after store" and "delete with promotion" in this process, so a
        # duplicate is never deleted while its canonical is being promoted away.
        self._lock = asyncio.Lock()

    async def alias_of(self, key: str) -> str | None:
        if not self.enabled:
            return None
        return await self.db.archive_alias(key)

    async def present(self, key: str) -> bool:
        """True if ``key`` is stored, or is an alias whose canonical bytes are stored."""
        if await self.store.stat(key) is not None:
            return True
        canonical = await self.alias_of(key)
        return canonical is not None and await self.store.stat(canonical) is not None

    async def identity_of_path(self, path: str, key: str) -> str | None:
        fmt = archive_format(key)
        if fmt is None or not self.enabled or not self.dedup_new:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(identity_pool(), identity_of_file, path, fmt)

    async def identity_of_stored(self, key: str) -> str | None:
        """Identity of the stored object ``key`` (local file read directly; other stores are
        spooled to a temp file first), or None."""
        fmt = archive_format(key)
        if fmt is None or not self.enabled or not self.dedup_new:
            return None
        body = await self.store.open(key, allow_redirect=False)
        if body is None:
            return None
        if isinstance(body, LocalFile):
            return await self.identity_of_path(body.path, key)
        if not isinstance(body, ByteStream):
            return None
        loop = asyncio.get_running_loop()
        spool = await loop.run_in_executor(None, tempfile.TemporaryFile)
        try:
            async for chunk in body.chunks:
                await loop.run_in_executor(None, spool.write, chunk)

            def compute() -> str | None:
                spool.seek(0)
                try:
                    return identity_of_fileobj(spool, fmt)
                except Uncomputable:
                    return None

            return await loop.run_in_executor(identity_pool(), compute)
        finally:
            aclose = getattr(body.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            spool.close()

    async def settle(self, key: str, identity: str | None, size: int) -> str | None:
        """``key``'s bytes are stored: record its identity; when an equal archive is stored
        already, drop ``key``'s bytes and return the canonical key that now serves it."""
        if identity is None or not self.enabled:
            return None
        async with self._lock:
            canonical = await self.db.record_archive(key, identity, size)
            if canonical == key:
                return None
            if await self.store.stat(canonical) is None:
                # the canonical vanished behind our back (removed outside the proxy): take over
                await self.db.forget_archive(canonical, successor=key)
                return None
            await self.store.delete(key)
            log.info("dedup: %s has the same archive identity as %s; stored once", key, canonical)
            return canonical

    async def delete(self, key: str) -> bool:
        """Remove ``key`` (object or alias); promote an alias when ``key`` is canonical.
        True if there was something to delete."""
        async with self._lock:
            if self.enabled and await self.db.archive_alias(key) is not None:
                await self.db.forget_archive(key)
                await self.store.delete(key)  # normally absent (the bytes were dropped)
                return True
            aliases = await self.db.archive_aliases(key) if self.enabled else []
            if aliases and await self.store.stat(key) is not None:
                successor = aliases[0]
                if await self.store.stat(successor) is None:
                    await self.copy(key, successor)
                await self.db.forget_archive(key, successor=successor)
                log.info("dedup: %s deleted; its bytes now live under %s (%d alias(es))",
                         key, successor, len(aliases) - 1)
            elif self.enabled:
                await self.db.forget_archive(key)
            return await self.store.delete(key)

    async def copy(self, src: str, dst: str) -> None:
        body = await self.store.open(src, allow_redirect=False)
        if body is None:
            raise FileNotFoundError(src)
        if isinstance(body, LocalFile):
            chunks: AsyncIterator[bytes] = file_chunks(body.path)
        elif isinstance(body, ByteStream):
            chunks = body.chunks
        else:  # pragma: no cover - allow_redirect=False never gives a URL
            raise TypeError(f"cannot copy from {type(body).__name__}")
        await self.store.put(dst, chunks, size=body.meta.size)


def _b64(value: str, nbytes: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise web.HTTPBadRequest(text=f"{what}: not base64\n") from None
    if len(raw) != nbytes:
        raise web.HTTPBadRequest(text=f"{what}: expected {nbytes} bytes, got {len(raw)}\n")
    return raw


def parse_digests(headers) -> tuple[bytes | None, bytes | None]:
    """(md5, sha256) announced by ``Digest`` (RFC 3230; other algorithms ignored) and
    ``Content-MD5``; 400 when malformed or contradictory."""
    md5: bytes | None = None
    sha: bytes | None = None
    for header in headers.getall("Digest", []):
        for item in header.split(","):
            alg, sep, value = item.strip().partition("=")
            if not sep:
                continue
            alg = alg.strip().lower()
            if alg == "sha-256":
                sha = _b64(value, 32, "Digest sha-256")
            elif alg == "md5":
                md5 = _b64(value, 16, "Digest md5")
    cmd5 = headers.get("Content-MD5")
    if cmd5 is not None:
        v = _b64(cmd5, 16, "Content-MD5")
        if md5 is not None and v != md5:
            raise web.HTTPBadRequest(text="Content-MD5 and Digest md5 disagree\n")
        md5 = v
    return md5, sha


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.content.iter_chunked(READ_BLOCK):
            yield chunk
    except asyncio.CancelledError:
        raise
    except Exception as e:  # ClientPayloadError, connection reset, short body
        raise ClientGone(f"upload body interrupted: {e}") from e


async def _discard(request: web.Request, resp: web.StreamResponse) -> None:
    """Read and drop what is left of the body (keeps the connection usable), or close it."""
    if request.content.at_eof():
        return
    n = 0
    try:
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return
            n += len(chunk)
            if n > DRAIN_LIMIT:
                break
    except Exception:
        pass
    resp.force_close()


def _text(status: int, text: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


class Uploads:
    """The PUT/DELETE handlers; one per Mirror."""

    def __init__(self, mirror, *, max_upload_bytes: int, read_only: bool, dedup: bool = True) -> None:
        self.mirror = mirror
        self.store: ObjectStore = mirror.store
        self.resolver = mirror.resolver
        self.metrics = mirror.metrics
        self.auth = mirror.auth
        self.max_upload = max_upload_bytes
        self.read_only = read_only
        self.dedup = Dedup(self.store, self.resolver.db, dedup_new=dedup)

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise web.HTTPForbidden(text="this server is read-only\n")

    async def put(self, request: web.Request) -> web.StreamResponse:
        ident = await require(request, self.auth, "@upload")
        self._refuse_read_only()
        key, name = self.mirror.key_of(request)
        request["source"] = "upload"
        if name is None:  # names.parse(key) found no sstate object/companion name
            self.metrics.upload("refused")
            raise web.HTTPBadRequest(text="not an sstate object name\n")
        length = request.content_length
        if length is None or "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            self.metrics.upload("refused")
            resp = _text(411, "Content-Length required (chunked uploads are not accepted)")
            resp.force_close()
            return resp
        if length > self.max_upload:
            self.metrics.upload("too_large")
            resp = _text(413, f"{length} bytes exceeds the upload limit of {self.max_upload} bytes")
            resp.force_close()
            return resp
        md5, sha = parse_digests(request.headers)
        if await self.dedup.present(key):
            return await self._exists(request, key, ident.username)
        try:
            result = await self.store.put(key, _body(request), size=length, md5=md5, sha256=sha,
                                          max_size=self.max_upload)
        except DigestMismatch as e:
            self.metrics.upload("mismatch")
            log.warning("upload of %s by %s refused: %s", key, ident.username, e)
            resp = _text(400, f"upload refused: {e}")
            await _discard(request, resp)
            return resp
        except TooLarge as e:
            self.metrics.upload("too_large")
            resp = _text(413, str(e))
            resp.force_close()
            return resp
        except InvalidKey as e:
            self.metrics.upload("refused")
            raise web.HTTPBadRequest(text=f"bad key: {e}\n") from None
        except StoreUnavailable as e:
            self.metrics.upload("error")
            log.warning("store unavailable for upload of %s: %s", key, e)
            raise web.HTTPServiceUnavailable(text="storage unavailable, retry later\n",
                                             headers={"Retry-After": "5"}) from None
        except ClientGone as e:
            self.metrics.upload("aborted")
            log.info("upload of %s aborted: %s", key, e)
            resp = _text(400, "upload body incomplete")
            resp.force_close()
            return resp
        if not result.created:
            return await self._exists(request, key, ident.username)
        headers = {"ETag": f'"{result.meta.etag}"'}
        try:
            identity = await self.dedup.identity_of_stored(key)
            canonical = await self.dedup.settle(key, identity, result.meta.size)
        except Exception:  # dedup is an optimisation: the object is stored whatever happens here
            log.exception("dedup of %s failed; object kept as uploaded", key)
            canonical = None
        if canonical is not None:
            headers[DEDUP_HEADER] = canonical
        self.resolver.invalidate()
        self.metrics.upload("deduplicated" if canonical else "created")
        log.info("upload %s by %s: %d bytes%s", key, ident.username, result.meta.size,
                 f" (same archive as {canonical})" if canonical else "")
        return _text(201, "created", headers)

    async def _exists(self, request: web.Request, key: str, who: str | None) -> web.Response:
        self.metrics.upload("exists")
        log.info("upload of %s by %s: name exists already, new body discarded", key, who)
        resp = _text(200, "exists already; first write wins, body discarded")
        await _discard(request, resp)
        return resp

    async def delete(self, request: web.Request) -> web.StreamResponse:
        ident = await require(request, self.auth, "@db-admin")
        self._refuse_read_only()
        key, _name = self.mirror.key_of(request)
        request["source"] = "delete"
        try:
            existed = await self.dedup.delete(key)
        except InvalidKey as e:
            raise web.HTTPBadRequest(text=f"bad key: {e}\n") from None
        except StoreUnavailable:
            raise web.HTTPServiceUnavailable(text="storage unavailable, retry later\n",
                                             headers={"Retry-After": "5"}) from None
        self.resolver.invalidate()
        if not existed:
            raise web.HTTPNotFound(text="no such object\n")
        log.info("delete %s by %s", key, ident.username)
        return web.Response(status=204)
