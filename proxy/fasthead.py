"""Fast path: plain ``HEAD`` and ``GET`` requests answered without aiohttp's per-request machinery.

bitbake checks sstate existence with storms of HEADs on kept-alive connections, one request at
a time per connection, then downloads what exists with GETs (wget; ``Range: bytes=N-`` when it
resumes). aiohttp spends most of such a request on its own objects (Request, router, middleware,
StreamResponse.prepare, header serialisation); this module is the listening socket's protocol
and answers the simple requests itself, with the mirror's own code for the semantics
(``Mirror.key_of_raw`` + ``Mirror.answer`` -> ``mirror.plan``; ``Mirror.open_body`` +
``Mirror.open_file`` for a GET's bytes; ``http_auth``'s ``identify_headers`` + ``check``), the
same access-log line (``AccessLogger.emit``), metrics, ``X-Request-Id``, ``Date``/``Server``/
``Connection`` headers as aiohttp.

Every connection starts in fast mode. Requests are taken strictly in order (pipelined ones wait
in the buffer while one is in flight). A request head qualifies when it is, exactly,
``HEAD|GET <origin-form target> HTTP/1.1|1.0`` with well-formed ASCII header lines (no duplicates,
no obs-fold, no Transfer-Encoding, Expect, Upgrade or non-zero Content-Length), a head under
8 KiB, a target under the mirror prefix that the mirror accepts as a key (``key_of_raw``), that
is not one of the application's own routes and has no dot segment; a ``GET`` only when the
store is local and the site has no TLS (the body is then a file, sent with sendfile(2) as
``Mirror._sendfile`` does; other stores' bodies are redirects or streams, and TLS needs plain
reads). On the first request that does not qualify (PUT, websocket, a GET on S3, a bad path,
anything malformed or unusual) the connection is handed to aiohttp for good: a RequestHandler
from the aiohttp server factory gets ``connection_made(transport)``, becomes the transport's
protocol and is fed every byte not yet consumed. So everything else, including every 400, stays
aiohttp's.

With local storage and SQLite (whose lookups never suspend) a request's coroutine is run to
completion inline in ``data_received``; if it does suspend, or with other backends, it runs as a
task. A GET's head is written at once, then the file goes out with sendfile(2): inline as far as
the socket takes it (a whole object of a few MiB, usually), the rest each time the socket is
writable again (a writer on a duplicate of the socket's fd, registered once per transfer:
``loop.sendfile`` pauses reading and registers and unregisters the socket for every chunk, which
costs as much as the copy; it is still used when the head is not out yet, or when sendfile(2)
cannot send the file), the connection busy until it is done. A transfer that fails (client gone, file shrunk)
closes the connection, as with aiohttp: wget notices the short body (Content-Length) and resumes
with Range. The access line of a GET counts what aiohttp's counts: the bytes written through the
response, i.e. the head (and the text of an error), not what sendfile sent.

On shutdown (``FastHeadSite.stop``) idle connections close at once and busy ones when their
request is done, within the runner's shutdown timeout, as aiohttp's own connections do.

Debugging switch: ``SSTATE_PROXY_NO_FASTHEAD=1`` in the environment serves every request with
plain aiohttp (``proxy.cli.run_worker``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from functools import partial
from typing import BinaryIO

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_nodelay
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from proxy.app import PARTS, RID_RE, AccessLogger, access_log, new_request_id
from proxy.http_auth import check, identify_headers
from proxy.mirror import NO_BODY, not_found, unavailable
from proxy.names import SstateName
from storage import LocalFile, StoreUnavailable

log = logging.getLogger("sstate_proxy.fasthead")

ENV_SWITCH = "SSTATE_PROXY_NO_FASTHEAD"
MAX_HEAD = 8192  # a longer request head goes to aiohttp (which has its own limits)
MAX_HEADERS = 64  # header lines, with the request line
TARGET_MEMO = 1024  # request targets whose (key, name) are remembered
MAX_BUFFER = 256 * 1024  # pause reading while this much is waiting behind a request in flight
READ = ("@read",)
# Reserved for the application's own routes in any case (besides what the router holds).
RESERVED_PREFIXES = ("/v1/",)

_REQUEST_LINE = re.compile(r"(HEAD|GET) (/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*) HTTP/1\.([01])")
# One header line, with the CRLF before it: a token, ':', the value (visible ASCII, SP, HTAB);
# leading blanks are not part of the value, trailing ones are stripped after the match.
_HEADER_LINE = re.compile(r"\r\n([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e]*)(?=\r\n)")
_HANDOFF_HEADERS = frozenset(("transfer-encoding", "expect", "upgrade"))
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\n"
_CONNECTION = {  # (HTTP/1.1?, keep-alive?) -> what aiohttp adds
    (True, True): "", (True, False): "Connection: close\r\n",
    (False, True): "Connection: keep-alive\r\n", (False, False): "",
}

# A request in flight: (method, target, minor, keep_alive, rid, started)
Req = tuple[str, str, bool, bool, str, float]
# An answer: (status, reason, header items, source, body); body is None (nothing after the head),
# bytes (an error's text, GET only) or (open file, start, length) for sendfile (GET only).
Answer = tuple[int, str, list, str, "bytes | tuple[BinaryIO, int, int] | None"]


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


class _Transfer:
    """A GET's file going out with sendfile(2) after its head (``req``'s answer)."""

    __slots__ = ("fobj", "offset", "left", "length", "req", "status", "nbytes", "source", "wait_fd")

    def __init__(self, fobj: BinaryIO, start: int, length: int, req: Req, status: int, nbytes: int,
                 source: str) -> None:
        self.fobj = fobj
        self.offset = start
        self.left = self.length = length
        self.req = req
        self.status = status
        self.nbytes = nbytes  # of the head: what the access line counts
        self.source = source
        self.wait_fd = -1  # a duplicate of the socket's fd while waiting for it to take more


class FastHead:
    """Protocol factory for the listening socket (one per worker)."""

    def __init__(self, app: web.Application, server, access_logger: type[AccessLogger],
                 keepalive_timeout: float = 75.0, *, tls: bool = False) -> None:
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
        from storage.local import LocalStore

        # Lookups that never suspend (and never need a current task): step coroutines inline.
        local = isinstance(self.mirror.store, LocalStore)
        self.eager = local and getattr(parts["db"], "answers_in_loop", False)
        # GET bodies are files for sendfile(2): local storage, and no TLS (which needs reads)
        self.methods = frozenset(("HEAD", "GET") if local and not tls else ("HEAD",))
        self.connections: set[FastHeadProtocol] = set()
        self._targets: dict[str, tuple[str, SstateName | None] | None] = {}
        self.closing = False
        self._drained: asyncio.Future | None = None
        self._miss = {}
        for method in ("HEAD", "GET"):
            status, reason, items, body = self._rendered_error(not_found(), method)
            self._miss[method] = (status, reason, items, "miss", body)

    def __call__(self) -> FastHeadProtocol:
        return FastHeadProtocol(self)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now and the busy ones when their request is done (within
        ``timeout``; then they are closed anyway)."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if self.connections:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                pass
        for conn in list(self.connections):
            conn.close()

    def forget(self, conn: FastHeadProtocol) -> None:
        self.connections.discard(conn)
        if self._drained is not None and not self.connections and not self._drained.done():
            self._drained.set_result(None)

    @staticmethod
    def _rendered_error(exc: web.HTTPException, method: str
                        ) -> tuple[int, str, list[tuple[str, str]], bytes | None]:
        items = list(exc.headers.items())
        body = exc.body or b""
        if "Content-Length" not in exc.headers:
            items.append(("Content-Length", str(len(body))))
        return exc.status, exc.reason, items, body if method == "GET" and body else None

    def qualifies(self, target: str) -> tuple[str, SstateName | None] | None:
        """The mirror's (key, name) for ``target`` if aiohttp's router would give it to the
        mirror; None for anything else (not under the prefix, the application's own routes, a
        path the mirror refuses with 400, a dot segment aiohttp would normalise away).

        Remembered for up to TARGET_MEMO targets (it is a pure function of the target):
        bitbake asks for some paths more than once (two HEADs per miss; the GET of what a HEAD
        found), and parsing the name is a good part of a HEAD's cost."""
        found = self._targets.get(target, False)
        if found is False:
            if len(self._targets) >= TARGET_MEMO:
                self._targets.clear()
            found = self._targets[target] = self._qualifies(target)
        return found

    def _qualifies(self, target: str) -> tuple[str, SstateName | None] | None:
        try:
            key, name = self.mirror.key_of_raw(target)
        except web.HTTPException:
            return None
        path = self.prefix + key  # the decoded path (key_of_raw refuses control characters)
        if "/." in path or path in self.reserved or path.startswith(self.reserved_prefixes):
            return None
        return key, name

    async def answer(self, method: str, key: str, name: SstateName | None, h: CIMultiDict) -> Answer:
        """The answer to ``method`` of ``key`` (``name``) with request headers ``h``: the mirror's
        own code."""
        mirror = self.mirror
        source = "-"
        try:
            check(await identify_headers(h, self.auth), self.auth, READ)
            try:
                res, headers, status, start, length = await mirror.answer(method, h, key, name)
                if res is None:
                    return self._miss[method]
                source = res.source
                body = None
                if status in NO_BODY:
                    if method == "GET" and status != 304:
                        headers["Content-Length"] = "0"  # aiohttp's, for an empty GET answer
                elif method == "GET":
                    found = await mirror.open_body(res, start, length, h)
                    assert isinstance(found, LocalFile), found  # self.methods: local store only
                    body = (mirror.open_file(found.path), start, length)
            except StoreUnavailable as e:
                raise unavailable(key, e) from None
        except web.HTTPException as exc:
            status, reason, items, body = self._rendered_error(exc, method)
            return status, reason, items, source, body
        return status, REASON_PHRASES[status], list(headers.items()), source, body


class FastHeadProtocol(asyncio.Protocol):
    __slots__ = ("fh", "loop", "transport", "fd", "buf", "busy", "closed", "eof", "paused_reading",
                 "paused_writing", "last_active", "idle_handle", "transfer")

    def __init__(self, fh: FastHead) -> None:
        self.fh = fh
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket's, for sendfile(2)
        self.buf = b""
        self.busy = False  # a request in flight (or the connection handed over)
        self.closed = False
        self.eof = False
        self.paused_reading = False
        self.paused_writing = False
        self.last_active = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.transfer: _Transfer | None = None  # waiting for the socket

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
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
        self._teardown(exc or ConnectionResetError("connection lost during a transfer"))

    def _teardown(self, exc: BaseException) -> None:
        """Stop everything this connection has going: idle timer, a transfer (ended with ``exc``)."""
        self.closed = True
        self.fh.forget(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if self.transfer is not None:
            self._end(self.transfer, exc)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if not self.busy and not self.closed:
            self._process()

    # -- the fast mode -----------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self._teardown(ConnectionAbortedError("connection closed during a transfer"))
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
                    return  # in flight (or closed); _finished() / _sent() go on
        except Exception:  # never out of a protocol callback
            log.exception("fast path failed; closing the connection")
            self.close()

    def _parse(self, buf: bytes, end: int):
        """(method, target, key, name, minor, headers, keep_alive) of a qualifying request head,
        else None."""
        try:
            head = buf[:end + 2].decode("ascii")  # with the CRLF that ends the last line
        except UnicodeDecodeError:
            return None
        eol = head.find("\r\n")
        m = _REQUEST_LINE.fullmatch(head, 0, eol)
        if m is None:
            return None
        method, target, minor = m.groups()
        if method not in self.fh.methods:
            return None
        found = self.fh.qualifies(target)
        if found is None:
            return None
        pairs = _HEADER_LINE.findall(head, eol)
        # each match is one whole line: every line is well-formed iff all of them matched
        if len(pairs) != head.count("\r\n", eol) - 1 or len(pairs) >= MAX_HEADERS:
            return None
        low = {name.lower(): value for name, value in pairs}
        if len(low) != len(pairs) or not _HANDOFF_HEADERS.isdisjoint(low):
            return None  # a repeated header, or one for aiohttp
        if " \r\n" in head or "\t\r\n" in head:  # trailing blanks are not part of a value
            pairs = [(name, value.rstrip(" \t")) for name, value in pairs]
            low = {name.lower(): value for name, value in pairs}
        if low.get("content-length", "0") != "0":
            return None
        minor = minor == "1"
        if minor and not low.get("host"):
            return None  # aiohttp's 400
        conn = low.get("connection")
        if conn is None:
            keep_alive = minor
        else:
            conn = conn.lower()
            if conn == "keep-alive" or conn == "close":  # what clients send
                keep_alive = conn == "keep-alive"
            else:
                tokens = {t.strip() for t in conn.split(",")}
                if "upgrade" in tokens:
                    return None
                keep_alive = "close" not in tokens if minor else "keep-alive" in tokens
        return method, target, *found, minor, CIMultiDict(pairs), keep_alive

    def _start(self, method: str, target: str, key: str, name: SstateName | None, minor: bool,
               h: CIMultiDict, keep_alive: bool) -> bool:
        """Answer one request; True if it finished inline, False if it is in flight (or the
        connection is closed)."""
        started = time.perf_counter()
        rid = h.get("X-Request-Id")
        if not rid or not RID_RE.fullmatch(rid):
            rid = new_request_id()
        req = (method, target, minor, keep_alive, rid, started)
        coro = self.fh.answer(method, key, name, h)
        if self.fh.eager:
            try:
                fut = coro.send(None)
            except StopIteration as stop:
                return self._respond(stop.value, req)
            except Exception:
                self._failed(req)
                return False
            task = self.loop.create_task(_resume(coro, fut))
        else:
            task = self.loop.create_task(coro)
        self.busy = True
        task.add_done_callback(partial(self._finished, req))
        return False

    def _finished(self, req: Req, task: asyncio.Task) -> None:
        self.busy = False
        try:
            result = task.result()
        except asyncio.CancelledError:  # shutting down
            self.close()
            return
        except BaseException:
            self._failed(req)
            return
        try:
            done = self._respond(result, req)
        except Exception:
            log.exception("fast path failed rid=%s", req[4])
            self.close()
            return
        if done:
            self._process()

    def _failed(self, req: Req) -> None:
        method, target, _, _, rid, _ = req
        log.exception("internal error rid=%s %s %s", rid, method, target)
        body = f"internal error, request id {rid}\n".encode()
        result = (500, REASON_PHRASES[500], [("Content-Type", "text/plain; charset=utf-8"),
                                              ("Content-Length", str(len(body)))], "-",
                  body if method == "GET" else None)
        try:
            self._respond(result, req[:3] + (False,) + req[4:])
        finally:
            self.close()

    def _respond(self, result: Answer, req: Req) -> bool:
        """Write the answer; True if the connection may go on to its next request now."""
        status, reason, items, source, body = result
        method, target, minor, keep_alive, rid, _ = req
        if self.closed:
            if type(body) is tuple:
                body[0].close()
            self._log(req, status, 0, source)
            return False
        lines = "\r\n".join(map(": ".join, items))
        data = (f"HTTP/1.{int(minor)} {status} {reason}\r\n{lines}\r\nDate: {rfc822_formatted_time()}"
                f"{_SERVER}{_CONNECTION[minor, keep_alive]}X-Request-Id: {rid}\r\n\r\n").encode()
        if type(body) is not tuple:
            if body:
                data += body
            self.transport.write(data)
            self._log(req, status, len(data), source)  # aiohttp's body_length: what went through
            return self._next(req)
        # A GET's bytes: the head, then the file with sendfile(2) on the socket, inline as far
        # as the socket takes it (a whole object of a few MiB, usually), the rest whenever the
        # socket is writable again.
        fobj, start, length = body
        self.transport.write(data)
        t = _Transfer(fobj, start, length, req, status, len(data), source)
        if self.transport.get_write_buffer_size():  # the head waits in the transport's buffer
            return self._loop_sendfile(t)
        return self._send_file(t)

    def _send_file(self, t: _Transfer) -> bool:
        """Send as much of ``t`` as the socket takes; True if the connection may go on now."""
        try:
            while t.left:
                n = os.sendfile(self.fd, t.fobj.fileno(), t.offset, t.left)
                if not n:
                    raise ConnectionResetError("file shrank during transfer")
                t.offset += n
                t.left -= n
        except (BlockingIOError, InterruptedError):
            if t.wait_fd < 0:
                # Wait for the socket on a duplicate of its fd: the transport keeps the original
                # registered for reading (pipelined requests wait in the buffer meanwhile).
                t.wait_fd = os.dup(self.fd)
                self.loop.add_writer(t.wait_fd, self._writable)
                self.transfer = t
                self.busy = True
            return False
        except ConnectionError as exc:
            return self._end(t, exc)
        except OSError as exc:
            if t.left != t.length or t.wait_fd >= 0:
                return self._end(t, exc)
            return self._loop_sendfile(t)  # says what it is, or falls back to plain reads
        return self._end(t, None)

    def _writable(self) -> None:
        try:
            if self.transfer is not None and self._send_file(self.transfer):
                self._process()
        except Exception:  # never out of a loop callback
            log.exception("fast path failed during a transfer; closing the connection")
            self.close()

    def _end(self, t: _Transfer, exc: BaseException | None) -> bool:
        """``t`` is done (or failed with ``exc``); True if the connection may go on now."""
        if t.wait_fd >= 0:
            self.loop.remove_writer(t.wait_fd)
            os.close(t.wait_fd)
            t.wait_fd = -1
            self.transfer = None
            self.busy = False
        t.fobj.close()
        return self._done(t, exc)

    def _loop_sendfile(self, t: _Transfer) -> bool:
        """The rest of ``t`` with loop.sendfile in a task (it waits for the transport's buffer to
        drain first, and reads the file when sendfile(2) cannot send it)."""
        self.busy = True
        task = self.loop.create_task(self._send(t))
        task.add_done_callback(partial(self._sent, t))
        return False

    def _next(self, req: Req) -> bool:
        """After a response: True to go on with the connection's next request, else close."""
        if req[3] and not self.fh.closing:
            return True
        self.close()
        return False

    async def _send(self, t: _Transfer) -> None:
        try:
            sent = await self.loop.sendfile(self.transport, t.fobj, t.offset, t.left)
        finally:
            t.fobj.close()
        if sent != t.left:
            raise ConnectionResetError("file shrank during transfer")

    def _sent(self, t: _Transfer, task: asyncio.Task) -> None:
        self.busy = False
        try:
            task.result()
        except asyncio.CancelledError:  # shutting down
            self.close()
        except Exception as exc:
            self._done(t, exc)
        else:
            if self._done(t, None):
                self._process()

    def _done(self, t: _Transfer, exc: BaseException | None) -> bool:
        """``t``'s body is out; True to go on. If it failed the connection closes (the client
        sees a short body), and the lines logged are those of request_id_middleware for a failure
        mid-body."""
        req = t.req
        if exc is not None:
            log.error("response failed after it started rid=%s %s %s", req[4], req[0], req[1],
                      exc_info=exc)
            self._log(req, 500, t.nbytes, t.source)
            self.close()
            return False
        self.fh.mirror.metrics.sent(t.length)
        self._log(req, t.status, t.nbytes, t.source)
        self.last_active = self.loop.time()  # the keep-alive timeout runs from the end of a transfer
        return self._next(req)

    def _log(self, req: Req, status: int, nbytes: int, source: str) -> None:
        if access_log.isEnabledFor(logging.INFO):
            method, target, _, _, rid, started = req
            self.fh.access_logger.emit(method, target, status, nbytes, source, time.perf_counter() - started, rid)

    # -- hand over to aiohttp ----------------------------------------------------------------

    def _hand_over(self) -> None:
        """Make an aiohttp RequestHandler this connection's protocol and feed it the rest."""
        transport = self.transport
        self.busy = True  # nothing more for this object to do
        self.fh.forget(self)
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

    def __init__(self, runner: web.AppRunner, fast: FastHead, *args, shutdown_timeout: float = 60.0,
                 **kwargs) -> None:
        super().__init__(runner, *args, **kwargs)
        self._fast = fast
        self._shutdown_timeout = shutdown_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._fast, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )

    async def stop(self) -> None:
        """Stop listening, then let the fast connections' requests in flight finish."""
        await super().stop()
        await self._fast.shutdown(self._shutdown_timeout)


def site(runner: web.AppRunner, access_logger, *args, **kwargs) -> web.TCPSite:
    """The TCP site for ``runner``: with the fast path unless SSTATE_PROXY_NO_FASTHEAD=1."""
    if not enabled():
        return web.TCPSite(runner, *args, **kwargs)
    server = runner.server
    keepalive = getattr(server, "_kwargs", {}).get("keepalive_timeout", 3630.0)
    fast = FastHead(runner.app, server, access_logger, keepalive_timeout=keepalive,
                    tls=kwargs.get("ssl_context") is not None)
    shutdown_timeout = getattr(runner, "_shutdown_timeout", 60.0)
    return FastHeadSite(runner, fast, *args, shutdown_timeout=shutdown_timeout, **kwargs)
