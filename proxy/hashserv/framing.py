"""OEHASHEQUIV 1.1 message carriers: newline-framed streams (tcp, unix) and websockets.

Both implement ``MessageIO``, the little the connection loop in ``server.py`` needs:

* ``StreamIO`` over an asyncio ``StreamReader``/``StreamWriter``. Lines end with ``\\n`` (a
  trailing ``\\r`` is dropped too, no other whitespace). Whatever the socket has delivered is
  split into lines at once, and replies are written together when the connection next waits for
  input, so a pipelined batch costs one write. Messages of >= 32767 characters travel as
  ``{"chunk-stream": null}``, 32767-character lines and an empty line, in both directions.
* ``WebSocketIO`` over aiohttp's ``WebSocketResponse``: one text message per line / JSON document,
  never chunked; a reply is never larger than the limit (``outhash_siginfo`` is cut when needed).

Every limit breach (line, chunked reassembly, websocket message) raises ``ProtocolError``: the
connection is closed without a reply, as bitbake-hashserv does for malformed input.
"""

from __future__ import annotations

import asyncio
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
READ_SIZE = 256 * 1024
# Replies queued beyond this are written (and drained) without waiting for the input to run dry,
# so a client that pipelines without reading cannot make the server buffer without bound.
FLUSH_AT = 256 * 1024
CLOSE_TIMEOUT_S = 5.0


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
    """What the connection loop needs from a transport."""

    peer = "?"

    async def recv(self) -> str:
        """The next line / text message (without its terminator). Queued replies are sent
        before waiting for input."""
        raise NotImplementedError

    def has_pending(self) -> bool:
        """True if ``recv`` would return without waiting for input."""
        return False

    async def recv_message(self) -> Any:
        """The next JSON document (chunked messages reassembled on stream transports)."""
        raise NotImplementedError

    def write_line(self, text: str) -> None:
        """Queue a raw line (a stream-mode reply)."""
        raise NotImplementedError

    def write_message(self, obj: Any) -> None:
        """Queue a JSON document."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Send what is queued."""
        raise NotImplementedError

    @property
    def flush_due(self) -> bool:
        """True when the queued replies have grown large (a long pipelined batch): the caller
        flushes without waiting for the input to run dry."""
        return False

    async def close(self) -> None:
        raise NotImplementedError


# --- TCP / unix ---------------------------------------------------------------------------


class StreamIO(MessageIO):
    """Line-framed OEHASHEQUIV over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_message: int) -> None:
        self._reader = reader
        self._writer = writer
        self._max = max_message
        self._partial = b""  # the start of a line whose end has not arrived
        self._lines: deque[str] = deque()
        self._out: list[str] = []
        self._out_size = 0
        peer = writer.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"

    async def _read_lines(self) -> None:
        """Wait for data; queue every complete line it holds (at least one)."""
        while not self._lines:
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise ConnectionClosed()
            buf = self._partial + data if self._partial else data
            cut = buf.rfind(b"\n")
            if cut < 0:
                if len(buf) > self._max:
                    raise ProtocolError("line longer than the message limit")
                self._partial = buf
                continue
            self._partial = buf[cut + 1:]
            if len(self._partial) > self._max:
                raise ProtocolError("line longer than the message limit")
            try:
                text = buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("invalid UTF-8") from None
            lines = text.split("\n")
            if cut > self._max and any(len(ln) > self._max for ln in lines):
                raise ProtocolError("line longer than the message limit")
            if "\r" in text:
                lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
            self._lines.extend(lines)

    def has_pending(self) -> bool:
        return bool(self._lines)

    async def recv(self) -> str:
        if not self._lines:
            await self.flush()
            await self._read_lines()
        return self._lines.popleft()

    async def recv_message(self) -> Any:
        line = await self.recv()
        try:
            msg = loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise ProtocolError("bad JSON") from None
        if msg and type(msg) is dict and "chunk-stream" in msg:
            parts = []
            total = 0
            while part := await self.recv():
                total += len(part)
                if total > self._max:
                    raise ProtocolError("chunked message larger than the limit")
                parts.append(part)
            try:
                msg = loads("".join(parts))
            except (ValueError, RecursionError):
                raise ProtocolError("bad JSON in chunked message") from None
        return msg

    def write_line(self, text: str) -> None:
        self._out.append(text)
        self._out.append("\n")
        self._out_size += len(text) + 1

    def write_message(self, obj: Any) -> None:
        text = chunkify(dumps(obj))
        self._out.append(text)
        self._out_size += len(text)

    async def flush(self) -> None:
        if self._out:
            data = "".join(self._out).encode("utf-8")
            self._out = []
            self._out_size = 0
            self._writer.write(data)
            await self._writer.drain()

    @property
    def flush_due(self) -> bool:
        return self._out_size >= FLUSH_AT

    async def close(self) -> None:
        """Close after sending what the transport holds; a peer that does not read it within
        CLOSE_TIMEOUT_S is cut off."""
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass  # the peer is gone already


# --- websocket ------------------------------------------------------------------------------


class WebSocketIO(MessageIO):
    """OEHASHEQUIV over an aiohttp websocket: one text message per line / JSON document."""

    def __init__(self, ws: web.WebSocketResponse, max_message: int, peer: str = "?") -> None:
        self._ws = ws
        self._max = max_message
        self.peer = peer
        self._out: list[str] = []

    async def recv(self) -> str:
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
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise ProtocolError("bad JSON") from None

    def write_line(self, text: str) -> None:
        self._out.append(text)

    def write_message(self, obj: Any) -> None:
        text = dumps(obj)
        if len(text) > self._max:
            fitted = fit_for_websocket(obj, text, self._max)
            if fitted is None:
                raise ProtocolError("reply larger than the websocket message limit")
            log.warning("hashserv %s: reply truncated to fit the %d-byte websocket limit", self.peer, self._max)
            text = fitted
        self._out.append(text)

    async def flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        try:
            for text in out:
                await self._ws.send_str(text)
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionClosed() from e

    async def close(self) -> None:
        await self._ws.close()
