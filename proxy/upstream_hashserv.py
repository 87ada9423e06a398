"""A small asyncio client for an upstream OEHASHEQUIV 1.1 server (tcp, unix, ws, wss).

The Reporter (proxy.reports) uses it to answer local misses from an upstream server
(``[hashserv] upstream``), anonymously, as bitbake-hashserv's ``--upstream`` does. Only the read
calls are implemented: nothing is ever pushed upstream. A few connections are kept open and
shared by every local client; a failing call is retried once on a fresh connection, then raises
``UpstreamError``, and for UPSTREAM_RETRY_S after that every call fails at once (a down upstream
must not add a connect timeout to every local miss). Callers treat ``UpstreamError`` as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import Any

import aiohttp

log = logging.getLogger("sstate_proxy.upstream_hashserv")

PROTO = "OEHASHEQUIV 1.1"
MAX_CHUNK = 32 * 1024
STREAM_LIMIT = 64 * 1024 * 1024
UPSTREAM_RETRY_S = 5.0
MAX_CONNECTIONS = 8

_MODE_NORMAL = "normal"
_MODE_GET = "get-stream"
_MODE_EXISTS = "exists-stream"
_FAILURES = (OSError, ConnectionError, TimeoutError, aiohttp.ClientError, ValueError)


class UpstreamError(Exception):
    """The upstream server could not answer."""


def parse_address(addr: str) -> tuple[str, tuple[Any, ...]]:
    """bitbake's address forms -> ('unix', (path,)) | ('ws', (url,)) | ('tcp', (host, port))."""
    if addr.startswith("unix://"):
        return "unix", (addr[len("unix://"):],)
    if addr.startswith(("ws://", "wss://")):
        return "ws", (addr,)
    m = re.match(r"\[(?P<host>[^\]]*)\]:(?P<port>\d+)$", addr)
    if m is not None:
        return "tcp", (m.group("host"), int(m.group("port")))
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or ":" in host:
        raise ValueError(f"bad hashserv address {addr!r}")
    return "tcp", (host, int(port))


class _Conn:
    """One connection; ``mode`` is the stream mode the server has it in."""

    mode = _MODE_NORMAL

    async def send(self, line: str) -> None: ...
    async def recv(self) -> str: ...
    async def close(self) -> None: ...

    async def set_mode(self, mode: str) -> None:
        if self.mode == mode:
            return
        if self.mode != _MODE_NORMAL:
            await self.send("END")
            if await self.recv() != "ok":
                raise ConnectionError("upstream did not leave stream mode")
            self.mode = _MODE_NORMAL
        if mode != _MODE_NORMAL:
            await self.send(json.dumps({mode: None}))
            if json.loads(await self.recv()) != "ok":
                raise ConnectionError(f"upstream refused {mode}")
            self.mode = mode


class _StreamConn(_Conn):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, line: str) -> None:
        if len(line) >= MAX_CHUNK - 1:
            step = MAX_CHUNK - 1
            parts = ['{"chunk-stream": null}', *(line[i:i + step] for i in range(0, len(line), step)), ""]
            line = "\n".join(parts)
        self.writer.write((line + "\n").encode("utf-8"))
        await self.writer.drain()

    async def _line(self) -> str:
        raw = await self.reader.readline()
        if not raw or not raw.endswith(b"\n"):
            raise ConnectionError("connection closed")
        return raw.decode("utf-8").rstrip("\r\n")

    async def recv(self) -> str:
        line = await self._line()
        if line.startswith('{"chunk-stream"'):
            parts = []
            while True:
                part = await self._line()
                if not part:
                    break
                parts.append(part)
            return "".join(parts)
        return line

    async def close(self) -> None:
        self.writer.close()


class _WsConn(_Conn):
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws

    async def send(self, line: str) -> None:
        await self.ws.send_str(line)

    async def recv(self) -> str:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"websocket closed ({msg.type!r})")
        return msg.data

    async def close(self) -> None:
        try:
            await self.ws.close()
        finally:
            await self.session.close()


class UpstreamHashserv:
    """Up to ``max_connections`` pooled connections to an upstream hash-equivalence server."""

    def __init__(self, address: str, timeout: float = 10.0, max_connections: int = MAX_CONNECTIONS) -> None:
        self.address = address
        self.kind, self.args = parse_address(address)
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._down_until = 0.0

    async def _connect(self) -> _Conn:
        if self.kind == "tcp":
            r, w = await asyncio.open_connection(*self.args, limit=STREAM_LIMIT)
            conn: _Conn = _StreamConn(r, w)
        elif self.kind == "unix":
            r, w = await asyncio.open_unix_connection(self.args[0], limit=STREAM_LIMIT)
            conn = _StreamConn(r, w)
        else:
            session = aiohttp.ClientSession()
            try:
                ws = await session.ws_connect(self.args[0], autoping=True, heartbeat=None,
                                              max_msg_size=STREAM_LIMIT, compress=0)
            except BaseException:
                await session.close()
                raise
            conn = _WsConn(session, ws)
        try:
            for line in (PROTO, "needs-headers: false", ""):
                await conn.send(line)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _call(self, mode: str, line: str) -> str:
        """Send ``line`` in ``mode`` and return the reply line (an invoke-error included)."""
        if time.monotonic() < self._down_until:
            raise UpstreamError(f"upstream {self.address} is down")
        async with self._slots:
            last: BaseException | None = None
            for _attempt in range(2):
                conn = self._idle.pop() if self._idle else None
                try:
                    async with asyncio.timeout(self.timeout):
                        if conn is None:
                            conn = await self._connect()
                        await conn.set_mode(mode)
                        await conn.send(line)
                        reply = await conn.recv()
                except _FAILURES as e:
                    last = e
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    continue
                if reply.startswith('{"invoke-error"'):
                    await conn.close()  # the server closes the connection after an invoke-error
                else:
                    self._idle.append(conn)
                return reply
        if time.monotonic() >= self._down_until:
            log.warning("upstream hashserv %s failed (%s: %s); treating it as a miss for %.0f s",
                        self.address, type(last).__name__, last, UPSTREAM_RETRY_S)
        self._down_until = time.monotonic() + UPSTREAM_RETRY_S
        raise UpstreamError(f"upstream {self.address}: {type(last).__name__}: {last}")

    async def invoke(self, msg: dict[str, Any]) -> Any:
        reply = await self._call(_MODE_NORMAL, json.dumps(msg))
        try:
            result = json.loads(reply)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
            raise UpstreamError(f"upstream {self.address}: bad reply") from e
        if isinstance(result, dict) and "invoke-error" in result:
            raise UpstreamError(f"upstream {self.address}: {result['invoke-error']}")
        return result

    # the calls ---------------------------------------------------------------------------
    async def ping(self) -> Any:
        return await self.invoke({"ping": {}})

    async def get_taskhash(self, method: str, taskhash: str, all_properties: bool = False) -> dict | None:
        r = await self.invoke({"get": {"taskhash": taskhash, "method": method, "all": all_properties}})
        return r if isinstance(r, dict) else None

    async def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True) -> dict | None:
        r = await self.invoke({"get-outhash": {"outhash": outhash, "taskhash": taskhash, "method": method,
                                               "with_unihash": with_unihash}})
        return r if isinstance(r, dict) else None

    async def get_unihash(self, method: str, taskhash: str) -> str | None:
        r = await self._call(_MODE_GET, f"{method} {taskhash}")
        return r or None

    async def unihash_exists(self, unihash: str) -> bool:
        return (await self._call(_MODE_EXISTS, unihash)) == "true"
