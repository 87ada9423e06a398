"""The sstate mirror face: GET/HEAD (and PUT/DELETE) of objects under the mirror prefix.

bitbake checks existence with HEAD (two per miss) and downloads with wget GET (with
``Range: bytes=N-`` on resume), so: every miss is a 404 (403/405 would double the requests),
HEAD and GET go through the same resolution, and HEAD answers from metadata alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from email.utils import formatdate, parsedate_to_datetime
from typing import BinaryIO, NoReturn

from aiohttp import web

from proxy import names
from proxy.access import AccessRecorder
from proxy.http_auth import require
from proxy.metrics import Metrics
from proxy.request_keys import NAME_KEY, SENT_KEY, SOURCE_KEY
from proxy.resolver import Candidate, Resolution, Resolver
from proxy.upstream import Pulled, Spool, UpstreamMirrors
from storage import Body, ByteStream, LocalFile, Meta, ObjectStore, RedirectURL

log = logging.getLogger("sstate_proxy.mirror")

SOURCE_HEADER = "X-Sstate-Source"
SERVED_HASH_HEADER = "X-Sstate-Served-Hash"
NO_BODY = frozenset((304, 412, 416))  # finished answers of plan(): headers only
# Request headers that need the stored object's validators or a range of it: with one of them, an
# object pulled from upstream is stored first, then answered by plan() like any stored object.
NOT_PLAIN = ("Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
_UPSTREAM_META = Meta(0, 0.0, "")  # of a pending GET: the size comes with the upstream's head
TARGET_CACHE = 65536  # request targets whose parsed key a worker keeps


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`Range: bytes=a-b | a- | -n` -> (start, length); None means the whole object.

    Multiple ranges are answered with the whole object (allowed by RFC 9110 and what wget and
    bitbake never ask for anyway); unparseable headers are ignored, as the RFC says.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0 or size == 0:
                raise RangeNotSatisfiable
            start = max(0, size - n)
            end = size - 1
        else:
            start = int(first)
            end = int(last) if last else None
            if start < 0 or (end is not None and end < start):
                return None
            if start >= size:
                raise RangeNotSatisfiable
            end = size - 1 if end is None else min(end, size - 1)
    except ValueError:
        return None
    return start, end - start + 1


_DATES: dict[int, str] = {}


def _http_date(ts: float) -> str:
    """Last-Modified text; cached, since a HEAD storm asks for the same few mtimes again and again."""
    second = int(ts)
    text = _DATES.get(second)
    if text is None:
        if len(_DATES) > 65536:
            _DATES.clear()
        text = _DATES[second] = formatdate(second, usegmt=True)
    return text


def _parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etag_matches(header: str, etag: str, weak: bool) -> bool:
    if header.strip() == "*":
        return True
    for item in header.split(","):
        item = item.strip()
        if item.startswith("W/"):
            if not weak:
                continue
            item = item[2:]
        if item == etag:
            return True
    return False


NOT_FOUND_TEXT = "no such object\n"


def not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(text=NOT_FOUND_TEXT)


def preconditions(h: Mapping[str, str], meta: Meta, etag: str) -> int | None:
    """304/412 per RFC 9110 section 13, or None to go on."""
    if (im := h.get("If-Match")) is not None and not _etag_matches(im, etag, weak=False):
        return 412
    if im is None and (ius := _parse_http_date(h.get("If-Unmodified-Since"))) is not None:
        if int(meta.mtime) > ius:
            return 412
    inm = h.get("If-None-Match")
    if inm is not None:
        if _etag_matches(inm, etag, weak=True):
            return 304
    elif (ims := _parse_http_date(h.get("If-Modified-Since"))) is not None:
        if int(meta.mtime) <= ims:
            return 304
    return None


def plan(h: Mapping[str, str], meta: Meta, headers: dict) -> tuple[int, int, int]:
    """(status, start, length) of the answer to GET/HEAD with request headers ``h``; adds the
    validators (and Content-Range) to ``headers``. A status in NO_BODY (304/412/416) is final."""
    etag = headers["ETag"] = f'"{meta.etag}"'
    headers["Last-Modified"] = _http_date(meta.mtime)
    headers["Accept-Ranges"] = "bytes"
    early = preconditions(h, meta, etag)
    if early is not None:
        return early, 0, 0
    rng_header = h.get("Range")
    if rng_header and (if_range := h.get("If-Range")):
        if if_range.startswith(('"', "W/")):
            if if_range != etag:
                rng_header = None
        else:
            ts = _parse_http_date(if_range)
            if ts is None or int(meta.mtime) > ts:
                rng_header = None
    try:
        rng = parse_range(rng_header, meta.size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{meta.size}"
        return 416, 0, 0
    if rng is None:
        return 200, 0, meta.size
    start, length = rng
    headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{meta.size}"
    return 206, start, length


class _FileSender:
    """Sends spans of an open file to a GET's client: asyncio's ``loop.sendfile`` on the
    request's transport (as aiohttp's own FileResponse does) or, under TLS or on a loop without
    it, reads written through the response. ``sent`` counts what went out, also when a span
    fails half-way (the access log and the bytes counter say the same)."""

    def __init__(self, request: web.Request, resp: web.StreamResponse) -> None:
        self.request = request
        self.resp = resp
        self.sent = 0
        transport = request.transport
        self.native = transport is not None and transport.get_extra_info("sslcontext") is None

    async def send(self, fobj: BinaryIO, offset: int, count: int) -> None:
        """[offset, offset+count) of ``fobj``; ConnectionResetError when the client went away or
        the file holds fewer bytes."""
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        loop = asyncio.get_running_loop()
        done = 0
        if self.native and count:
            try:
                await loop.sendfile(transport, fobj, offset, count)
            except NotImplementedError:  # uvloop, say
                self.native = False
            finally:
                # asyncio moves the file position past what it sent, even on error
                done = max(0, fobj.tell() - offset)
                self.sent += done
        if done < count:  # no sendfile here, or the file ended early
            fobj.seek(offset + done)
            while done < count:
                chunk = await loop.run_in_executor(None, fobj.read, min(count - done, 1 << 20))
                if not chunk:
                    raise ConnectionResetError("file shrank during transfer")
                await self.resp.write(chunk)
                done += len(chunk)
                self.sent += len(chunk)


class _ClientSink:
    """A GET's response as the sink of an upstream pull: the head goes out with the upstream's
    length when the upstream answered, then the staging file's bytes as they are written."""

    def __init__(self, request: web.Request, headers: dict) -> None:
        self.request = request
        self.headers = headers
        self.resp: web.StreamResponse | None = None
        self._sender: _FileSender | None = None

    @property
    def sent(self) -> int:
        return 0 if self._sender is None else self._sender.sent

    async def start(self, size: int) -> None:
        self.headers["Content-Length"] = str(size)
        self.resp = web.StreamResponse(status=200, headers=self.headers)
        await self.resp.prepare(self.request)
        self._sender = _FileSender(self.request, self.resp)

    async def follow(self, spool: Spool) -> None:
        assert self._sender is not None and spool.size is not None
        sender = self._sender
        with open(spool.path, "rb", buffering=0) as fobj:  # still readable once unlinked
            while sender.sent < spool.size:
                end = await spool.wait(sender.sent)
                if end <= sender.sent:  # complete, yet short: never send a part as the whole
                    raise ConnectionResetError("staging file ended early")
                await sender.send(fobj, sender.sent, end - sender.sent)


class Mirror:
    def __init__(self, store: ObjectStore, resolver: Resolver, auth, metrics: Metrics, prefix: str,
                 upstream: UpstreamMirrors | None = None, access: AccessRecorder | None = None) -> None:
        self.access = access if access is not None else AccessRecorder(resolver.db, enabled=False)
        self.store = store
        self.resolver = resolver
        self.auth = auth
        self.metrics = metrics
        self.prefix = prefix
        self.upstream = upstream
        self._targets: dict[str, tuple[str, names.SstateName | None]] = {}  # see key_of_raw

    def key_of(self, request: web.Request) -> tuple[str, names.SstateName | None]:
        return self.key_of_raw(request.raw_path)

    def key_of_raw(self, raw_path: str) -> tuple[str, names.SstateName | None]:
        """The key for a request target as received (raises 404 outside the prefix, 400 bad path).

        Answers are kept (bounded): a fleet asks for the same names again and again (bitbake
        HEADs a miss twice, builders share targets), and parsing costs more than the lookup."""
        known = self._targets.get(raw_path)
        if known is not None:
            return known
        answer = self._parse_target(raw_path)
        if len(self._targets) >= TARGET_CACHE:
            self._targets.clear()
        self._targets[raw_path] = answer
        return answer

    def _parse_target(self, raw_path: str) -> tuple[str, names.SstateName | None]:
        raw = raw_path.split("?", 1)[0]
        if not raw.startswith(self.prefix):
            raise web.HTTPNotFound(text="not under the mirror prefix\n")
        try:
            key = names.safe_key(raw[len(self.prefix):])
        except names.BadPath as e:
            raise web.HTTPBadRequest(text=f"bad path: {e}\n") from None
        return key, names.parse(key)

    async def get_or_head(self, request: web.Request) -> web.StreamResponse:
        await require(request, self.auth, "@read")
        key, name = self.key_of(request)
        request[NAME_KEY] = name
        method = request.method
        res, headers, status, start, length = await self.answer(method, request.headers, key, name)
        if res is None:
            request[SOURCE_KEY] = "miss"
            # returned, not raised: most of a fleet's HEADs are misses, and an exception through
            # the middlewares costs more than the rest of the miss
            return web.Response(status=404, text=NOT_FOUND_TEXT)
        request[SOURCE_KEY] = res.source
        if res.pending and method == "GET":
            return await self._pull_get(request, res, headers, name)
        if status in NO_BODY or method == "HEAD":
            # A Response goes out in one write; aiohttp keeps our Content-Length for HEAD.
            return web.Response(status=status, headers=headers)
        return await self._get(request, res, web.StreamResponse(status=status, headers=headers),
                               start, length)

    async def answer(self, method: str, h: Mapping[str, str], key: str, name: names.SstateName | None
                     ) -> tuple[Resolution | None, dict, int, int, int]:
        """What GET/HEAD of ``key`` answers, given the request headers ``h`` (any mapping with
        case-insensitive ``get``): (resolution, response headers, status, start, length).
        Resolution None is a miss (404); a status in NO_BODY is a finished 304/412/416."""
        res = await self.resolver.resolve(key, name)
        if res is None and self.upstream is not None:
            res = await self._upstream_resolution(method, h, key, name)
        if res is None:
            return None, {}, 404, 0, 0
        if not res.pending:  # a pull records its object (and its time) itself once stored
            self.access.touch(res.key)
        headers = {SOURCE_HEADER: res.source}
        if res.source == "equivalent" or (res.source == "upstream" and name is not None
                                          and res.served_hash != name.hash):
            headers[SERVED_HASH_HEADER] = res.served_hash
        if res.pending:
            # The bytes are upstream: no validators yet (the stored copy will have its own), the
            # whole object. A GET whose pulls all fail becomes a miss (_pull_get).
            headers["Content-Type"] = "application/octet-stream"
            headers["Accept-Ranges"] = "bytes"
            if method != "GET":
                headers["Content-Length"] = str(res.meta.size)
            return res, headers, 200, 0, res.meta.size
        status, start, length = plan(h, res.meta, headers)
        if status not in NO_BODY:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(length)
        return res, headers, status, start, length

    # -- the upstream mirrors -----------------------------------------------------------------

    async def _upstream_resolution(self, method: str, h: Mapping[str, str], key: str,
                                   name: names.SstateName | None) -> Resolution | None:
        """The upstream step, after the store and the local rewrite missed.

        A plain GET gets a pending resolution at once: its pull (``_pull_get``) is the upstream
        request, no HEAD before it. A HEAD is answered from an upstream HEAD (cached), without
        fetching the body: bitbake HEAD-checks every object it might use and downloads far
        fewer, so pulling on HEAD would fetch what is never asked for; the price is that a HEAD
        200 can be followed by a failing GET when the upstream fails in between, the same as
        with the upstream itself. A GET with a Range or a condition (and a HEAD the upstream
        gave no length for) pulls the object into the store first and is answered from there.
        """
        assert self.upstream is not None
        local, candidates = await self.resolver.upstream_candidates(key, name)
        if local is not None:
            return local
        candidates = [c for c in candidates if not self.upstream.known_missing(c.key)]
        for cand in candidates:  # pulled meanwhile (by another request or worker)?
            meta = await self.store.stat(cand.key)
            if meta is not None:
                # the asked-for name itself is stored now (the resolver's cached miss predates
                # it): answered from the store, as any stored object
                return Resolution(cand.key, meta, cand.hash, "hit" if cand.key == key else "upstream")
        plain = not any(h.get(k) is not None for k in NOT_PLAIN)
        if method == "GET" and plain and candidates:
            return Resolution(candidates[0].key, _UPSTREAM_META, candidates[0].hash, "upstream",
                              pending=tuple(candidates))
        for cand in candidates:
            found = await self.upstream.find(cand.key)
            if found is None:
                continue
            if method == "HEAD" and plain and found.size is not None:
                return Resolution(cand.key, Meta(found.size, 0.0, ""), cand.hash, "upstream", pending=(cand,))
            stored = await self._pulled(cand, await self.upstream.pull(cand.key))
            if stored is not None:
                return stored
        return None

    async def _pulled(self, cand: Candidate, pulled: Pulled) -> Resolution | None:
        """The stored object after a pull that says it is stored, else None."""
        if pulled.status != "stored":
            return None
        self.resolver.stored(cand.hash)
        meta = await self.store.stat(cand.key)
        return None if meta is None else Resolution(cand.key, meta, cand.hash, "upstream")

    async def _pull_get(self, request: web.Request, res: Resolution, headers: dict,
                        name: names.SstateName | None) -> web.StreamResponse:
        """A plain GET of an object the upstream mirrors may have: pull the candidates in order;
        the first found is streamed to the client while it is stored (or, when another request
        pulled it meanwhile, served from the store)."""
        assert self.upstream is not None
        for cand in res.pending:
            if name is not None and cand.hash != name.hash:
                headers[SERVED_HASH_HEADER] = cand.hash
            else:
                headers.pop(SERVED_HASH_HEADER, None)
            sink = _ClientSink(request, headers)
            try:
                pulled = await self.upstream.pull(cand.key, sink)
            finally:
                if sink.resp is not None:
                    self._count(request, sink.sent)
            if pulled.streamed:
                self.resolver.stored(cand.hash)
                assert sink.resp is not None
                await sink.resp.write_eof()
                return sink.resp
            stored = await self._pulled(cand, pulled)
            if stored is not None:
                status, start, length = plan(request.headers, stored.meta, headers)
                headers["Content-Length"] = str(length)
                return await self._get(request, stored, web.StreamResponse(status=status, headers=headers),
                                       start, length)
        headers.pop(SERVED_HASH_HEADER, None)
        request[SOURCE_KEY] = "miss"
        raise not_found()

    # -- a GET's body ------------------------------------------------------------------------

    async def open_body(self, res: Resolution, start: int, length: int, h: Mapping[str, str]) -> Body:
        """The store's body of [start, start+length) of ``res`` for a GET with request headers
        ``h``; 404 if the object vanished since the stat."""
        body = await self.store.open(res.key, start, length, allow_redirect=h.get("Authorization") is None)
        if body is None:
            self._vanished()
        return body

    def open_file(self, path: str) -> BinaryIO:
        """``path`` (of a LocalFile body) opened for sendfile; 404 if it vanished since the stat.
        The caller closes it."""
        try:
            return open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            pass
        self._vanished()

    def _vanished(self) -> NoReturn:
        """The object went away between the stat and the open: drop the cached answers, 404."""
        self.resolver.invalidate()
        raise not_found()

    def _count(self, request: web.Request, sent: int) -> None:
        """Body bytes written to the client: the access log and the bytes counter say the same."""
        request[SENT_KEY] = sent
        self.metrics.sent(sent)

    # -- responses -------------------------------------------------------------------------

    async def _get(self, request: web.Request, res: Resolution, resp: web.StreamResponse,
                   start: int, length: int) -> web.StreamResponse:
        headers = resp.headers
        body = await self.open_body(res, start, length, request.headers)
        if isinstance(body, RedirectURL):
            del headers["Content-Type"], headers["Content-Length"]
            return web.Response(status=307, headers={**headers, "Location": body.url})
        if isinstance(body, LocalFile):
            return await self._send_file(request, body.path, resp, start, length)
        assert isinstance(body, ByteStream)
        sent = 0
        try:
            await resp.prepare(request)
            async for chunk in body.chunks:
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
        finally:
            self._count(request, sent)
            aclose = getattr(body.chunks, "aclose", None)  # an async generator's, if it is one
            if aclose is not None:
                await aclose()
        return resp

    async def _send_file(
        self, request: web.Request, path: str, resp: web.StreamResponse, start: int, length: int
    ) -> web.StreamResponse:
        """Send [start, start+length) of a local file: the head through aiohttp, the body with
        asyncio's ``loop.sendfile`` on the request's transport (as aiohttp's own FileResponse
        does), or plain reads where the loop or the transport (TLS) has no sendfile.

        Not FileResponse itself: it answers with its own ETag (from the file's stat, so a local
        and an S3 store would disagree), serves ``.gz``/``.br`` siblings of the path, and gives
        416 to a multi-range request; here one ``plan()`` decides for every backend."""
        fobj = self.open_file(path)
        sender = _FileSender(request, resp)
        try:
            await resp.prepare(request)
            await sender.send(fobj, start, length)
            await resp.write_eof()
            return resp
        finally:
            self._count(request, sender.sent)
            fobj.close()
