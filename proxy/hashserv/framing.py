"""OEHASHEQUIV 1.1 message codec: newline framing, chunked messages, websocket messages.

Two message carriers implement one small interface (``MessageIO``) used by the connection state
machine in ``server.py``:

* ``StreamIO``: an asyncio buffered protocol for TCP and unix sockets. Lines end with ``\\n`` (a
  trailing ``\\r`` is dropped too, no other whitespace); complete lines are decoded once per read
  and queued, so a pipelined batch is handled without a wake-up per line. Replies are buffered
  and written with one ``transport.write`` when the connection is about to wait for input.
  Messages of >= 32767 characters travel as ``{"chunk-stream": null}``, 32767-character lines and
  an empty line, in both directions.
* ``WebSocketIO``: one text message per line / JSON document (aiohttp), never chunked; a reply
  is never larger than the limit (``outhash_siginfo`` is truncated when needed).

Every limit breach (line, chunked reassembly, websocket message) raises ``ProtocolError``: the
connection is closed without a reply, as the reference does for malformed input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger("sstate_proxy.hashserv")

MAX_CHUNK = 32 * 1024  # bitbake's DEFAULT_MAX_CHUNK: lines carry at most MAX_CHUNK - 1 characters
CHUNK_HEADER = '{"chunk-stream": null}'
# Pause reading a pipelining client when this many unprocessed bytes are queued.
READ_HIGH_WATER = 1 << 20
READ_LOW_WATER = 1 << 18
# Where asyncio reads socket data for every StreamIO of this process (see StreamIO.get_buffer).
_READ_BUFFER = memoryview(bytearray(256 * 1024))


class ConnectionClosed(Exception):
    """The peer went away."""


class ProtocolError(Exception):
    """Malformed input: the connection is closed without a reply."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"Type {type(obj)} not serializeable")


_encoder = json.JSONEncoder(default=_json_default)
dumps: Callable[[Any], str] = _encoder.encode  # default separators, ensure_ascii: what bitbake sends
loads = json.loads


def chunkify(text: str, max_chunk: int = MAX_CHUNK) -> str:
    """The wire form of one JSON document on a stream transport (newline-terminated)."""
    if len(text) < max_chunk - 1:
        return text + "\n"
    step = max_chunk - 1
    parts = [CHUNK_HEADER]
    parts.extend(text[i:i + step] for i in range(0, len(text), step))
    parts.append("")
    parts.append("")
    return "\n".join(parts)


def fit_for_websocket(obj: Any, text: str, limit: int) -> str | None:
    """``text`` (the JSON of ``obj``) cut down to at most ``limit`` bytes by truncating the
    ``outhash_siginfo`` of a row; None if it cannot be made to fit."""
    if len(text) <= limit:
        return text
    if not isinstance(obj, dict) or not isinstance(obj.get("outhash_siginfo"), str):
        return None
    sig = obj["outhash_siginfo"]
    smaller = dict(obj)
    excess = len(text) - limit
    for _ in range(8):
        keep = max(0, len(sig) - excess - 64)
        sig = sig[:keep]
        smaller["outhash_siginfo"] = sig
        text = dumps(smaller)
        if len(text) <= limit:
            return text
        excess = len(text) - limit
        if keep == 0:
            break
    return None


class MessageIO:
    """What the connection state machine needs from a transport."""

    #: True when replies may be buffered until the next blocking read (stream transports)
    corks = False

    async def recv(self) -> str:
        """The next line / text message (without its terminator)."""
        raise NotImplementedError

    def has_pending(self) -> bool:
        """True if ``recv`` would return without waiting."""
        return False

    def pop_nowait(self) -> str:
        raise NotImplementedError

    async def recv_message(self) -> Any:
        """The next JSON document (chunked messages reassembled on stream transports)."""
        raise NotImplementedError

    def write_line(self, text: str) -> None:
        """Queue a raw line (stream-mode reply); sent at the next ``flush``."""
        raise NotImplementedError

    def write_message(self, obj: Any) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def peer(self) -> str:
        return "?"


# --- TCP / unix ---------------------------------------------------------------------------


class _InputWait:
    """Awaited by an eagerly driven connection coroutine to wait for input (see StreamIO)."""

    __slots__ = ()

    def __await__(self):
        yield self


_INPUT = _InputWait()


class StreamIO(asyncio.BufferedProtocol, MessageIO):
    """Line-framed OEHASHEQUIV over a stream socket; runs ``handler(self)`` once connected.

    ``eager``: the connection coroutine is driven by this protocol instead of an asyncio Task:
    when it waits for input and a line arrives, it is resumed right inside ``data_received``,
    so a request is answered in the same event-loop iteration that read it (a Task would be
    woken one iteration later, costing an extra ``epoll_wait`` per request). Awaiting asyncio
    futures works as in a Task; APIs that need ``asyncio.current_task()`` (``asyncio.timeout``)
    must run in a Task of their own. The service only turns this on for databases that answer
    from the event loop (SQLite).
    """

    corks = True

    def __init__(self, handler: Callable[[StreamIO], Any], max_message: int,
                 on_open: Callable[[StreamIO], None] | None = None,
                 on_close: Callable[[StreamIO], None] | None = None, eager: bool = False) -> None:
        self._handler = handler
        self._eager = eager
        self._coro: Any = None
        self._input_blocked = False
        self._stepping = False
        self._max = max_message
        self._on_open = on_open
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._lines: deque[str] = deque()
        self._queued = 0  # approximate bytes in _lines (for read flow control)
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._out: list[str] = []
        self._line_fn: Callable[[str], str | None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._peer = "?"
        self.task: asyncio.Task[Any] | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()

    # asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is set by asyncio; keep-alive settings are inherited from the listener.
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer) if peer else "unix"
        if self._on_open is not None:
            self._on_open(self)
        if self._eager:
            self._coro = self._handler(self)
            self._step()
        else:
            self.task = self._loop.create_task(self._handler(self))
            self.task.add_done_callback(self._finished)

    # the eager driver ------------------------------------------------------------------------
    def _finished(self, _: Any = None) -> None:
        self._coro = None
        if not self.done.done():
            self.done.set_result(None)

    def _step(self, _: Any = None) -> None:
        coro = self._coro
        if coro is None:
            return
        if self._stepping:  # never re-enter the coroutine
            self._loop.call_soon(self._step)
            return
        self._stepping = True
        try:
            awaited = coro.send(None)
        except StopIteration:
            self._finished()
            return
        except BaseException:
            log.exception("hashserv %s: connection handler failed", self._peer)
            self._finished()
            self._abort()
            return
        finally:
            self._stepping = False
        if awaited is _INPUT:
            return  # resumed by _wake when input or EOF arrives
        if getattr(awaited, "_asyncio_future_blocking", None):
            awaited._asyncio_future_blocking = False
            awaited.add_done_callback(self._step)
        elif awaited is None:  # bare yield (asyncio.sleep(0))
            self._loop.call_soon(self._step)
        else:
            log.error("hashserv %s: handler awaited %r; closing", self._peer, awaited)
            with contextlib.suppress(RuntimeError):
                coro.close()
            self._finished()
            self._abort()

    def cancel(self) -> None:
        """Stop the connection's coroutine (service shutdown)."""
        if self.task is not None:
            self.task.cancel()
        elif self._coro is not None and not self._stepping:
            with contextlib.suppress(RuntimeError):  # "coroutine ignored GeneratorExit"
                self._coro.close()
            self._finished()

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _wake(self) -> None:
        if self._eager:
            if self._input_blocked:
                self._input_blocked = False
                self._step()
            return
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        """A buffered protocol, so that a read allocates nothing: with a plain Protocol asyncio
        receives into a new 256 KiB bytes object per read, which glibc serves with mmap, then
        mremap and munmap: three system calls and a page fault per request. asyncio fills the
        buffer and calls buffer_updated before it reads for any other transport, so one buffer
        serves every connection of the process."""
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._buf + data if self._buf else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._buf = buf
            if len(buf) > self._max:
                self._fail("line longer than the message limit")
            return
        self._buf = buf[cut + 1:]
        if len(self._buf) > self._max:
            self._fail("line longer than the message limit")
            return
        try:
            text = buf[:cut].decode("utf-8")
        except UnicodeDecodeError:
            self._fail("invalid UTF-8")
            return
        lines = text.split("\n")
        if "\r" in text:
            lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        if cut > self._max and any(len(ln) > self._max for ln in lines):
            self._fail("line longer than the message limit")
            return
        if self._line_fn is not None and not self._lines:
            lines = self._answer_lines(lines)
            if not lines:
                return
        self._lines.extend(lines)
        self._queued += cut
        if self._queued > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def set_line_handler(self, fn: Callable[[str], str | None]) -> None:
        """Answer the next lines with ``fn`` right in ``data_received``, without resuming the
        connection's coroutine (a stream mode's hot path). ``fn`` returns the reply line, or None
        for a line it leaves to the coroutine (END...): that line and the rest are queued for
        ``recv`` and the handler is dropped. Only for an eagerly driven connection waiting in
        ``recv`` with nothing queued."""
        self._line_fn = fn

    def _answer_lines(self, lines: list[str]) -> list[str]:
        """Answer what ``_line_fn`` answers; return the lines left for the coroutine."""
        fn = self._line_fn
        out = []
        i = 0
        try:
            for i, line in enumerate(lines):  # noqa: B007 - i is used after the loop
                reply = fn(line) if not self._write_paused else None  # type: ignore[misc]
                if reply is None:
                    break
                out.append(reply)
            else:
                i = len(lines)
        except ProtocolError as e:
            self._fail(str(e))
            return []
        except Exception:  # what the coroutine would do with it: log, close
            log.exception("hashserv %s: internal error; closing", self._peer)
            self._fail("internal error")
            return []
        if i < len(lines):
            self._line_fn = None  # the coroutine takes over at lines[i]
        if out:
            out.append("")
            self._transport.write("\n".join(out).encode("utf-8"))  # type: ignore[union-attr]
        return lines[i:]

    def eof_received(self) -> bool:
        self._mark_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._mark_closed()
        d = self._drain_waiter
        if d is not None and not d.done():
            d.set_result(None)
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain_waiter
        if d is not None:
            self._drain_waiter = None
            if not d.done():
                d.set_result(None)

    # internals -------------------------------------------------------------------------------
    def _mark_closed(self) -> None:
        self._closed = True
        self._wake()

    def _fail(self, why: str) -> None:
        log.info("hashserv %s: %s; closing", self._peer, why)
        self._lines.clear()
        self._mark_closed()
        if self._transport is not None:
            self._transport.abort()

    # MessageIO -------------------------------------------------------------------------------
    @property
    def peer(self) -> str:
        return self._peer

    @property
    def eager(self) -> bool:
        """Driven without a Task (see the class notes): ``set_line_handler`` may be used."""
        return self._eager

    def has_pending(self) -> bool:
        return bool(self._lines)

    def pop_nowait(self) -> str:
        line = self._lines.popleft()
        self._queued -= len(line) + 1
        if self._read_paused:
            if self._queued < READ_LOW_WATER:
                self._read_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
        return line

    async def recv(self) -> str:
        while not self._lines:
            if self._closed:
                raise ConnectionClosed()
            if self._out:
                await self.flush()
                continue
            self._queued = 0
            if self._read_paused:  # nothing queued: never wait with reading paused
                self._read_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            if self._eager:
                self._input_blocked = True
                await _INPUT
            else:
                self._waiter = self._loop.create_future()
                await self._waiter
        return self.pop_nowait()

    async def recv_message(self) -> Any:
        line = await self.recv()
        try:
            msg = loads(line)
        except ValueError:
            raise ProtocolError("bad JSON") from None
        if msg and type(msg) is dict and "chunk-stream" in msg:
            parts = []
            total = 0
            while True:
                part = await self.recv()
                if not part:
                    break
                total += len(part)
                if total > self._max:
                    raise ProtocolError("chunked message larger than the limit")
                parts.append(part)
            try:
                msg = loads("".join(parts))
            except ValueError:
                raise ProtocolError("bad JSON in chunked message") from None
        return msg

    def write_line(self, text: str) -> None:
        self._out.append(text)
        self._out.append("\n")

    def write_message(self, obj: Any) -> None:
        self._out.append(chunkify(dumps(obj)))

    async def flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            t = self._transport
            if t is None:
                raise ConnectionClosed()
            t.write("".join(out).encode("utf-8"))
        if self._write_paused and self._transport is not None:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
            if self._transport is None:
                raise ConnectionClosed()

    def close(self) -> None:
        self._closed = True
        t = self._transport
        if t is not None:
            if self._out:
                try:
                    t.write("".join(self._out).encode("utf-8"))
                except Exception:  # noqa: BLE001 - already broken
                    pass
                self._out = []
            t.close()


# --- websocket ------------------------------------------------------------------------------


class WebSocketIO(MessageIO):
    """OEHASHEQUIV over an aiohttp websocket: one text message per line / JSON document."""

    corks = False

    def __init__(self, ws: web.WebSocketResponse, max_message: int, peer: str = "?") -> None:
        self._ws = ws
        self._max = max_message
        self._peer = peer
        self._out: list[str] = []

    @property
    def peer(self) -> str:
        return self._peer

    async def recv(self) -> str:
        if self._out:
            await self.flush()
        msg = await self._ws.receive()
        if msg.type == WSMsgType.TEXT:
            return msg.data
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise ConnectionClosed()
        if msg.type == WSMsgType.ERROR:
            raise ProtocolError(f"websocket error: {msg.data!r}")
        raise ProtocolError(f"unexpected websocket message type {msg.type!r}")

    async def recv_message(self) -> Any:
        text = await self.recv()
        try:
            return loads(text)
        except ValueError:
            raise ProtocolError("bad JSON") from None

    def write_line(self, text: str) -> None:
        self._out.append(text)

    def write_message(self, obj: Any) -> None:
        text = dumps(obj)
        if len(text) > self._max:
            fitted = fit_for_websocket(obj, text, self._max)
            if fitted is None:
                raise ProtocolError("reply larger than the websocket message limit")
            log.warning("hashserv %s: reply truncated to fit the %d-byte websocket limit", self._peer, self._max)
            text = fitted
        self._out.append(text)

    async def flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        send = self._ws.send_str
        try:
            for text in out:
                await send(text)
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionClosed() from e

    def close(self) -> None:
        pass  # the websocket handler closes the response when the connection task ends
