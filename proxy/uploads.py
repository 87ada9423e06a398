"""Authenticated PUT/DELETE of sstate objects, and storage dedup by archive identity.

PUT (``@upload``): the body must carry ``Content-Length`` (411 without it; chunked bodies are
refused the same way), at most ``[limits] max_upload_bytes`` (413 before reading a byte), and is
verified against the optional ``Digest: sha-256=<b64>`` / ``md5=<b64>`` (RFC 3230) and
``Content-MD5`` headers (400, nothing stored). A body that sends nothing for ``[limits]
body_timeout_s`` is cut: 408, the connection closed, nothing stored. The store writes
atomically (temp file + link on disk, conditional write on S3), so a client that vanishes
mid-body, a bad digest or a server killed mid-upload never leaves a partial object. ``201`` when the name is new, ``200`` when it
exists already (first write wins, as in hashserv: the new body is discarded and logged).

DELETE (``@db-admin``): ``204``, or ``404`` when the name is not stored.

Storage errors (StoreUnavailable, InvalidKey, DigestMismatch, TooLarge) are counted and raised:
the HTTP layer's one error middleware turns them into responses. The store may keep equal
archives once (storage.dedup); an upload stored that way says so in ``X-Sstate-Deduplicated-To``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.http_auth import require
from proxy.limits import BodyStalled, read_chunk, request_timeout
from proxy.request_keys import SOURCE_KEY
from storage import DigestMismatch, InvalidKey, ObjectStore, StoreUnavailable, TooLarge

log = logging.getLogger("sstate_proxy.uploads")

READ_BLOCK = 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # bodies of refused/duplicate PUTs read and dropped at most
DEDUP_HEADER = "X-Sstate-Deduplicated-To"


class ClientGone(ConnectionError):
    """The client's body stream failed (disconnect, short body): not a store fault."""


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


async def _body(request: web.Request, stall_s: float) -> AsyncIterator[bytes]:
    content = request.content
    while True:
        try:
            chunk = await read_chunk(content, READ_BLOCK, stall_s)
        except (asyncio.CancelledError, BodyStalled):
            raise
        except Exception as e:  # ClientPayloadError, connection reset, short body
            raise ClientGone(f"upload body interrupted: {e}") from e
        if not chunk:
            return
        yield chunk


async def _discard(request: web.Request, resp: web.StreamResponse, stall_s: float) -> None:
    """Read and drop what is left of the body (keeps the connection usable), or close it."""
    if request.content.at_eof():
        return
    n = 0
    try:
        while True:
            chunk = await read_chunk(request.content, READ_BLOCK, stall_s)
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

    def __init__(self, mirror, *, max_upload_bytes: int, read_only: bool,
                 body_timeout_s: float = 60.0) -> None:
        self.mirror = mirror
        self.store: ObjectStore = mirror.store
        self.resolver = mirror.resolver
        self.metrics = mirror.metrics
        self.auth = mirror.auth
        self.max_upload = max_upload_bytes
        self.read_only = read_only
        self.body_timeout_s = body_timeout_s

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise web.HTTPForbidden(text="this server is read-only\n")

    async def put(self, request: web.Request) -> web.StreamResponse:
        ident = await require(request, self.auth, "@upload")
        self._refuse_read_only()
        key, name = self.mirror.key_of(request)
        request[SOURCE_KEY] = "upload"
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
        if await self.store.stat(key) is not None:
            return await self._exists(request, key, ident.username)
        try:
            result = await self.store.put(key, _body(request, self.body_timeout_s), size=length,
                                          md5=md5, sha256=sha, max_size=self.max_upload)
        except DigestMismatch as e:
            self.metrics.upload("mismatch")
            log.warning("upload of %s by %s refused: %s", key, ident.username, e)
            raise
        except TooLarge:
            self.metrics.upload("too_large")
            raise
        except InvalidKey:
            self.metrics.upload("refused")
            raise
        except StoreUnavailable as e:
            self.metrics.upload("error")
            log.warning("store unavailable for upload of %s: %s", key, e)
            raise
        except BodyStalled as e:
            self.metrics.upload("aborted")
            log.info("upload of %s cut: %s", key, e)
            raise request_timeout(f"upload body stalled ({e}); nothing stored") from None
        except ClientGone as e:
            self.metrics.upload("aborted")
            log.info("upload of %s aborted: %s", key, e)
            resp = _text(400, "upload body incomplete")
            resp.force_close()
            return resp
        if not result.created:
            return await self._exists(request, key, ident.username)
        headers = {"ETag": f'"{result.meta.etag}"'}
        canonical = result.shared_with
        if canonical is not None:
            headers[DEDUP_HEADER] = canonical
        self.resolver.stored(name.hash)
        await self.mirror.access.published(key, result.meta.size)
        self.metrics.upload("deduplicated" if canonical else "created")
        log.info("upload %s by %s: %d bytes%s", key, ident.username, result.meta.size,
                 f" (same archive as {canonical})" if canonical else "")
        return _text(201, "created", headers)

    async def _exists(self, request: web.Request, key: str, who: str | None) -> web.Response:
        self.metrics.upload("exists")
        log.info("upload of %s by %s: name exists already, new body discarded", key, who)
        resp = _text(200, "exists already; first write wins, body discarded")
        await _discard(request, resp, self.body_timeout_s)
        return resp

    async def delete(self, request: web.Request) -> web.StreamResponse:
        ident = await require(request, self.auth, "@db-admin")
        self._refuse_read_only()
        key, _name = self.mirror.key_of(request)
        request[SOURCE_KEY] = "delete"
        existed = await self.store.delete(key)
        self.resolver.invalidate()
        if not existed:
            raise web.HTTPNotFound(text="no such object\n")
        await self.mirror.access.removed(key)
        log.info("delete %s by %s", key, ident.username)
        return web.Response(status=204)
