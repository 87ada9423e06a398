"""HashservService: the OEHASHEQUIV face of sstate-proxy (tcp, unix and websocket).

One object per process: it owns the listeners, the request statistics and the set of live
connections (one asyncio task each); every connection shares the process's EquivalenceDB, Auth
and Reporter (the lookup and report algorithm, with the upstream hashserv if there is one).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web

from proxy.auth import Auth
from proxy.config import Config
from proxy.hashserv.framing import MessageIO, StreamIO, WebSocketIO
from proxy.hashserv.listeners import Listener, start_listener, start_on_socket, websocket_response
from proxy.hashserv.server import Connection, Stats, build_table
from proxy.reports import Reporter
from storage.equivalence import EquivalenceDB

log = logging.getLogger("sstate_proxy.hashserv")

STOP_GRACE_S = 2.0


async def _close_quietly(io: MessageIO) -> None:
    try:
        await io.close()
    except Exception:  # noqa: BLE001 - a connection that is already broken
        log.debug("hashserv %s: error while closing", io.peer, exc_info=True)


class HashservService:
    """bitbake-hashserv's protocol over every transport, on one equivalence database.

    ``reporter`` answers lookups and reports (the same object serves /v1/equivalent); its
    ``on_change`` also hears of the database administration done here (remove, gc, clean-unused).
    The service does not close the reporter: its creator does.
    """

    def __init__(self, db: EquivalenceDB, auth: Auth, cfg: Config, reporter: Reporter) -> None:
        self.db = db
        self.auth = auth
        self.cfg = cfg
        self.reporter = reporter
        self.read_only = cfg.hashserv.read_only
        self.max_message = cfg.limits.max_message_bytes
        self.max_connections = cfg.limits.max_hashserv_connections
        self.handshake_timeout_s = cfg.limits.header_timeout_s
        self.table = build_table(self.read_only)
        self.stats = Stats()
        self.listeners: list[Listener] = []
        self._connections: dict[asyncio.Task, MessageIO] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """The client addresses of the open listeners (``host:port``, ``unix:///path``)."""
        return [lst.address for lst in self.listeners]

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` if given (a listening socket made by ``listeners.bind_socket`` in a
        supervisor before forking workers: several processes cannot each bind one unix path, and
        must not each bind one port), else on ``[hashserv] bind`` if set."""
        if sock is not None:
            await self.listen_socket(sock)
        elif self.cfg.hashserv.bind:
            await self.listen(self.cfg.hashserv.bind)

    async def listen(self, bind: str) -> str:
        """Open one more TCP/unix listener (``host:port``, ``[v6]:port``, ``unix:///path``);
        returns its client address (useful with port 0)."""
        listener = await start_listener(bind, self._serve_stream, self.max_message)
        self.listeners.append(listener)
        return listener.address

    async def listen_socket(self, sock: socket.socket) -> str:
        """Serve on an inherited, already listening socket (see ``listeners.bind_socket``)."""
        listener = await start_on_socket(sock, self._serve_stream, self.max_message)
        self.listeners.append(listener)
        return listener.address

    async def stop(self) -> None:
        """Stop listening, close every connection (a connection still busy after STOP_GRACE_S
        is cancelled)."""
        for lst in self.listeners:
            await lst.close()
        self.listeners.clear()
        live = dict(self._connections)
        if live:
            closing = [asyncio.ensure_future(_close_quietly(io)) for io in live.values()]
            await asyncio.wait(closing, timeout=STOP_GRACE_S)
            _, pending = await asyncio.wait(live, timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()

    async def _run(self, io: MessageIO) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = io
        try:
            await Connection(self, io).run()
        finally:
            self._connections.pop(task, None)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One tcp/unix connection (asyncio runs this in a task of its own)."""
        io = StreamIO(reader, writer, self.max_message)
        if len(self._connections) >= self.max_connections:
            log.warning("hashserv: too many connections (%d); refusing %s", len(self._connections), io.peer)
            await io.close()
            return
        await self._run(io)

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler: OEHASHEQUIV over a websocket (mount it at /ws, or on any path)."""
        ws = websocket_response(self.max_message)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="expected a websocket upgrade\n")
        await ws.prepare(request)
        await self._run(WebSocketIO(ws, self.max_message, request.remote or "?"))
        return ws
