"""HEAD fast path: plain ``HEAD`` requests answered without aiohttp's per-request machinery.

bitbake checks sstate existence with storms of HEADs on kept-alive connections, one request at
a time per connection. aiohttp spends most of such a request on its own objects (Request,
router, middleware, StreamResponse.prepare, header serialisation); this module is the listening
socket's protocol and answers the simple HEADs itself, with the mirror's own code for the
semantics (``Mirror.key_of_raw`` + ``Mirror.answer`` -> ``mirror.plan``; ``http_auth``'s
``identify_headers`` + ``check``), the same access-log line (``AccessLogger.emit``), metrics,
``X-Request-Id``, ``Date``/``Server``/``Connection`` headers as aiohttp.

Every connection starts in fast mode. Requests are taken strictly in order (pipelined ones wait
in the buffer while one is in flight). A request head qualifies when it is, exactly,
``HEAD <origin-form target> HTTP/1.1|1.0`` with well-formed ASCII header lines (no duplicates,
no obs-fold, no Transfer-Encoding, Expect, Upgrade or non-zero Content-Length), a head under
8 KiB, a target under the mirror prefix that is not one of the application's own routes and has
no dot segment. On the first request that does not qualify (GET, PUT, websocket, anything
malformed or unusual) the connection is handed to aiohttp for good: a RequestHandler from the
aiohttp server factory gets ``connection_made(transport)``, becomes the transport's protocol and
is fed every byte not yet consumed. So everything but plain HEADs, including every 400 for a
malformed request, stays aiohttp's.

With local storage and SQLite (whose lookups never suspend) a request's coroutine is run to
completion inline in ``data_received``; if it does suspend, or with other backends, it runs as a
task.

Debugging switch: ``SSTATE_PROXY_NO_FASTHEAD=1`` in the environment serves every request with
plain aiohttp (``proxy.cli.run_worker``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from urllib.parse import unquote

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_nodelay
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from proxy.app import PARTS, RID_RE, AccessLogger, access_log, new_request_id
from proxy.http_auth import check, identify_headers
from proxy.mirror import not_found, unavailable
from storage import StoreUnavailable

log = logging.getLogger("sstate_proxy.fasthead")

ENV_SWITCH = "SSTATE_PROXY_NO_FASTHEAD"
MAX_HEAD = 8192  # a longer request head goes to aiohttp (which has its own limits)
MAX_HEADERS = 64
MAX_BUFFER = 256 * 1024  # pause reading while this much is waiting behind a request in flight
READ = ("@read",)
# Reserved for the application's own routes in any case (besides what the router holds).
RESERVED_PREFIXES = ("/v1/",)

_REQUEST_LINE = re.compile(rb"HEAD (/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?)[ \t]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HANDOFF_HEADERS = frozenset(("transfer-encoding", "expect", "upgrade"))


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "") not in ("1", "true", "yes")


class _Resume:
    """Continue, inside a task, a coroutine that suspended on ``fut`` while stepped eagerly."""

    __slots__ = ("coro", "fut")

    def __init__(self, coro, fut) -> None:
        self.coro = coro
        self.fut = fut

    def __await__(self):
        coro, fut = self.coro, self.fut
        while True:
            try:
                yield fut
            except BaseException as e:  # cancellation: forward it to the coroutine
                try:
                    fut = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                fut = coro.send(None)
            except StopIteration as stop:
                return stop.value


async def _resume(coro, fut):
    return await _Resume(coro, fut)


class FastHead:
    """Protocol factory for the listening socket (one per worker)."""

    def __init__(self, app: web.Application, server, access_logger: type[AccessLogger],
                 keepalive_timeout: float = 75.0) -> None:
        parts = app[PARTS]
        self.mirror = parts["mirror"]
        self.auth = parts["auth"]
        self.server = server  # aiohttp web.Server: calling it makes a RequestHandler
        self.access_logger = access_logger
        self.keepalive_timeout = keepalive_timeout
        self.prefix = self.mirror.prefix
        exact: set[str] = set()
        prefixes: list[str] = list(RESERVED_PREFIXES)
        for resource in app.router.resources():
            info = resource.get_info()
            if "path" in info:
                exact.add(info["path"])
            elif "formatter" in info:
                static = info["formatter"].split("{", 1)[0]
                if static != self.prefix:  # the mirror's catch-all route
                    prefixes.append(static)
            elif "prefix" in info:
                prefixes.append(info["prefix"])
        self.reserved = frozenset(exact)
        self.reserved_prefixes = tuple(prefixes)
        from storage.equivalence.sqlite import SqliteEquivalenceDB
        from storage.local import LocalStore

        # Lookups that never suspend (and never need a current task): step coroutines inline.
        self.eager = isinstance(self.mirror.store, LocalStore) and isinstance(parts["db"], SqliteEquivalenceDB)
        self.connections: set[FastHeadProtocol] = set()
        self._miss = self._rendered_error(not_found())

    def __call__(self) -> FastHeadProtocol:
        return FastHeadProtocol(self)

    def close_all(self) -> None:
        """Close the connections still in fast mode (aiohttp's own are closed by the runner)."""
        for conn in list(self.connections):
            conn.close()

    @staticmethod
    def _rendered_error(exc: web.HTTPException) -> tuple[int, str, list[tuple[str, str]]]:
        items = list(exc.headers.items())
        if "Content-Length" not in exc.headers:
            items.append(("Content-Length", str(len(exc.body or b""))))
        return exc.status, exc.reason, items

    def qualifies(self, target: str) -> bool:
        path = target.split("?", 1)[0]
        if not path.startswith(self.prefix):
            return False
        if "%" in path:
            path = unquote(path)
            if _CONTROL.search(path):  # aiohttp's router would not match it: its 404
                return False
        if "/." in path or path in self.reserved or path.startswith(self.reserved_prefixes):
            return False
        return True

    async def answer(self, target: str, h: CIMultiDict) -> tuple[int, str, list, str]:
        """(status, reason, headers, source) for ``HEAD target``: the mirror's own code."""
        mirror = self.mirror
        try:
            check(await identify_headers(h, self.auth), self.auth, READ)
            key, name = mirror.key_of_raw(target)
            try:
                res, headers, status, _start, _length = await mirror.answer("HEAD", h, key, name)
            except StoreUnavailable as e:
                raise unavailable(key, e) from None
        except web.HTTPException as exc:
            status, reason, items = self._rendered_error(exc)
            return status, reason, items, "-"
        if res is None:
            status, reason, items = self._miss
            return status, reason, items, "miss"
        return status, REASON_PHRASES[status], list(headers.items()), res.source


class FastHeadProtocol(asyncio.Protocol):
    __slots__ = ("fh", "loop", "transport", "buf", "busy", "closed", "eof", "paused_reading",
                 "paused_writing", "last_active", "idle_handle")

    def __init__(self, fh: FastHead) -> None:
        self.fh = fh
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a request in flight (or the connection handed over)
        self.closed = False
        self.eof = False
        self.paused_reading = False
        self.paused_writing = False
        self.last_active = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        tcp_nodelay(transport, True)
        self.fh.connections.add(self)
        self.last_active = self.loop.time()
        if self.fh.keepalive_timeout > 0:
            self.idle_handle = self.loop.call_at(self.last_active + self.fh.keepalive_timeout, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self.last_active = self.loop.time()
        if not self.busy and not self.paused_writing:
            self._process()
        elif len(self.buf) > MAX_BUFFER and not self.paused_reading and not self.closed:
            self.paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True  # half-close: answer what is complete first, then close (_process)
        if not self.busy:
            self._process()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.fh.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if not self.busy and not self.closed:
            self._process()

    # -- the fast mode -----------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fh.connections.discard(self)
            if self.idle_handle is not None:
                self.idle_handle.cancel()
                self.idle_handle = None
            self.transport.close()

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed:
            return
        due = self.last_active + self.fh.keepalive_timeout
        if self.busy or self.loop.time() < due:
            self.idle_handle = self.loop.call_at(max(due, self.loop.time() + 1.0), self._idle_check)
        else:
            self.close()

    def _process(self) -> None:
        """Answer complete pipelined requests in order until one is in flight or incomplete."""
        try:
            while not self.closed and not self.paused_writing:
                buf = self.buf
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._hand_over()
                    elif self.eof:
                        self.close()
                    elif self.paused_reading:
                        self.paused_reading = False
                        self.transport.resume_reading()
                    return
                parsed = self._parse(buf, end) if end < MAX_HEAD else None
                if parsed is None:
                    self._hand_over()
                    return
                self.buf = buf[end + 4:]
                if not self._start(*parsed):
                    return  # in flight; _finished() goes on
        except Exception:  # never out of a protocol callback
            log.exception("fast HEAD path failed; closing the connection")
            self.close()

    def _parse(self, buf: bytes, end: int):
        """(target, minor, headers, keep_alive) of a qualifying request head, else None."""
        head = buf[:end]
        if not head.isascii():
            return None
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None or len(lines) > MAX_HEADERS:
            return None
        target = m.group(1).decode("ascii")
        if not self.fh.qualifies(target):
            return None
        minor = m.group(2) == b"1"
        h = CIMultiDict()
        seen = set()
        for line in lines[1:]:
            hm = _HEADER_LINE.fullmatch(line)
            if hm is None:
                return None
            name = hm.group(1).decode("ascii")
            lname = name.lower()
            if lname in seen or lname in _HANDOFF_HEADERS:
                return None
            seen.add(lname)
            h.add(name, hm.group(2).decode("ascii"))
        if "content-length" in seen and h["Content-Length"] != "0":
            return None
        if minor and not h.get("Host"):
            return None  # aiohttp's 400
        conn = h.get("Connection")
        if conn is None:
            keep_alive = minor
        else:
            tokens = {t.strip().lower() for t in conn.split(",")}
            if "upgrade" in tokens:
                return None
            keep_alive = "close" not in tokens if minor else "keep-alive" in tokens
        return target, minor, h, keep_alive

    def _start(self, target: str, minor: bool, h: CIMultiDict, keep_alive: bool) -> bool:
        """Answer one request; True if it finished inline, False if it is in flight."""
        started = time.perf_counter()
        rid = h.get("X-Request-Id", "")
        if not rid or not RID_RE.fullmatch(rid):
            rid = new_request_id()
        coro = self.fh.answer(target, h)
        if self.fh.eager:
            try:
                fut = coro.send(None)
            except StopIteration as stop:
                self._respond(stop.value, target, minor, keep_alive, rid, started)
                return not self.closed
            except Exception:
                self._failed(target, minor, rid, started)
                return False
            task = self.loop.create_task(_resume(coro, fut))
        else:
            task = self.loop.create_task(coro)
        self.busy = True
        task.add_done_callback(lambda t: self._finished(t, target, minor, keep_alive, rid, started))
        return False

    def _finished(self, task: asyncio.Task, target, minor, keep_alive, rid, started) -> None:
        self.busy = False
        try:
            result = task.result()
        except asyncio.CancelledError:  # shutting down
            self.close()
            return
        except BaseException:
            self._failed(target, minor, rid, started)
            return
        try:
            self._respond(result, target, minor, keep_alive, rid, started)
        except Exception:
            log.exception("fast HEAD path failed rid=%s", rid)
            self.close()
            return
        self._process()

    def _failed(self, target: str, minor: bool, rid: str, started: float) -> None:
        log.exception("internal error rid=%s HEAD %s", rid, target)
        body = f"internal error, request id {rid}\n".encode()
        result = (500, REASON_PHRASES[500], [("Content-Type", "text/plain; charset=utf-8"),
                                              ("Content-Length", str(len(body)))], "-")
        try:
            self._respond(result, target, minor, False, rid, started)
        finally:
            self.close()

    def _respond(self, result, target: str, minor: bool, keep_alive: bool, rid: str, started: float) -> None:
        status, reason, items, source = result
        nbytes = 0
        if not self.closed:
            out = [f"HTTP/1.{int(minor)} {status} {reason}\r\n"]
            out += [f"{k}: {v}\r\n" for k, v in items]
            out.append(f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n")
            if not keep_alive:
                if minor:
                    out.append("Connection: close\r\n")
            elif not minor:
                out.append("Connection: keep-alive\r\n")
            out.append(f"X-Request-Id: {rid}\r\n\r\n")
            data = "".join(out).encode("utf-8")
            nbytes = len(data)  # aiohttp's body_length of a HEAD response: its head
            self.transport.write(data)
        if access_log.isEnabledFor(logging.INFO):
            self.fh.access_logger.emit("HEAD", target, status, nbytes, source, time.perf_counter() - started, rid)
        if not keep_alive:
            self.close()

    # -- hand over to aiohttp ----------------------------------------------------------------

    def _hand_over(self) -> None:
        """Make an aiohttp RequestHandler this connection's protocol and feed it the rest."""
        transport = self.transport
        self.busy = True  # nothing more for this object to do
        self.fh.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        data, self.buf = self.buf, b""
        handler = self.fh.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused_writing:
            handler.pause_writing()
        if self.paused_reading:
            self.paused_reading = False
            transport.resume_reading()
        if data:
            handler.data_received(data)
        if self.eof and not handler.eof_received():
            transport.close()  # what the transport does when aiohttp gets the EOF itself


class FastHeadSite(web.TCPSite):
    """``web.TCPSite`` whose listening socket's protocol factory is a FastHead."""

    def __init__(self, runner: web.AppRunner, fast: FastHead, *args, **kwargs) -> None:
        super().__init__(runner, *args, **kwargs)
        self._fast = fast

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._fast, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )


def site(runner: web.AppRunner, access_logger, *args, **kwargs) -> tuple[web.TCPSite, FastHead | None]:
    """The TCP site for ``runner``: with the fast path unless SSTATE_PROXY_NO_FASTHEAD=1."""
    if not enabled():
        return web.TCPSite(runner, *args, **kwargs), None
    server = runner.server
    keepalive = getattr(server, "_kwargs", {}).get("keepalive_timeout", 3630.0)
    fast = FastHead(runner.app, server, access_logger, keepalive_timeout=keepalive)
    return FastHeadSite(runner, fast, *args, **kwargs), fast
