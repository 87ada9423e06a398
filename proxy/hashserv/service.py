"""HashservService: the OEHASHEQUIV face of sstate-proxy (tcp, unix and websocket).

One object per process: it owns the listeners, the request statistics, the upstream
back-fill worker and the set of live connections; every connection shares the process's
EquivalenceDB and Auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from aiohttp import web

from proxy.auth import Auth
from proxy.config import Config
from proxy.hashserv.framing import StreamIO, WebSocketIO
from proxy.hashserv.listeners import Listener, start_listener, start_on_socket, websocket_response
from proxy.hashserv.server import Connection, Stats, build_table, is_valid_unihash
from proxy.reports import Reporter
from storage.equivalence import EquivalenceDB

log = logging.getLogger("sstate_proxy.hashserv")

BACKFILL_MAX = 100_000
UPSTREAM_RETRY_S = 5.0


class HashservService:
    """bitbake-hashserv's protocol over every transport, on one equivalence database.

    ``on_change`` is called (synchronously) after every committed change of equivalence data
    made through this service, so caches in the same process can be dropped at once.
    """

    def __init__(self, db: EquivalenceDB, auth: Auth, cfg: Config,
                 on_change: Callable[[], None] | None = None, reporter: Reporter | None = None) -> None:
        self.db = db
        self.auth = auth
        self.cfg = cfg
        self.on_change = on_change
        self.read_only = cfg.hashserv.read_only
        # the report algorithm every face shares (proxy.reports); upstream reports add their own steps
        self.reporter = reporter or Reporter(db, auth, read_only=self.read_only, on_change=on_change)
        self.upstream_address = "" if self.read_only else cfg.hashserv.upstream
        self.max_message = cfg.limits.max_message_bytes
        self.max_connections = cfg.limits.max_hashserv_connections
        # Drive tcp/unix connections without a Task per wake-up when the database answers from
        # the event loop (see framing.StreamIO): one event-loop iteration per request.
        self.eager = getattr(db, "answers_in_loop", False)
        self.table = build_table(self.read_only)
        self.stats = Stats()
        self.listeners: list[Listener] = []
        self._streams: set[StreamIO] = set()
        self._websockets: set[web.WebSocketResponse] = set()
        self._tasks: set[asyncio.Task] = set()
        self._backfill: asyncio.Queue[tuple[str, str]] | None = None
        self._backfill_pending: set[tuple[str, str]] = set()
        self._backfill_task: asyncio.Task | None = None
        self._upstream_down_until = 0.0
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """The client addresses of the open listeners (``host:port``, ``unix:///path``)."""
        return [lst.address for lst in self.listeners]

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start the upstream back-fill worker (if an upstream is configured) and listen on
        ``[hashserv] bind`` (if set) or, when given, on ``sock``: a listening socket made by
        ``listeners.bind_socket`` in a supervisor before forking workers (several processes
        cannot each bind one unix path)."""
        if self.upstream_address and self._backfill is None:
            self._backfill = asyncio.Queue()
            self._backfill_task = asyncio.create_task(self._backfill_worker(), name="hashserv-backfill")
        if sock is not None:
            await self.listen_socket(sock)
        elif self.cfg.hashserv.bind:
            await self.listen(self.cfg.hashserv.bind)

    async def listen(self, bind: str) -> str:
        """Open one more TCP/unix listener (``host:port``, ``[v6]:port``, ``unix:///path``);
        returns its client address (useful with port 0)."""
        listener = await start_listener(bind, self._run_stream, self.max_message,
                                        self._streams.add, self._streams.discard, self.eager)
        self.listeners.append(listener)
        return listener.address

    async def listen_socket(self, sock: socket.socket) -> str:
        """Serve on an inherited, already listening socket (see ``listeners.bind_socket``)."""
        listener = await start_on_socket(sock, self._run_stream, self.max_message,
                                         self._streams.add, self._streams.discard, self.eager)
        self.listeners.append(listener)
        return listener.address

    async def stop(self) -> None:
        self._stopping = True
        for lst in self.listeners:
            await lst.close()
        self.listeners.clear()
        streams = list(self._streams)
        for io in streams:
            io.close()
        for ws in list(self._websockets):
            with contextlib.suppress(Exception):
                await ws.close()
        waits = [t for t in self._tasks if not t.done()] + [io.done for io in streams if not io.done.done()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=2.0)
            if pending:
                for t in self._tasks:
                    t.cancel()
                for io in streams:
                    io.cancel()
        if self._backfill_task is not None:
            self._backfill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._backfill_task
            self._backfill_task = None

    async def _run_stream(self, io: StreamIO) -> None:
        if len(self._streams) > self.max_connections:
            log.warning("hashserv: too many connections (%d); refusing %s", len(self._streams), io.peer)
            io.close()
            return
        await Connection(self, io).run()

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        """aiohttp handler: OEHASHEQUIV over a websocket (mount it at /ws, or on any path)."""
        ws = websocket_response(self.max_message)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="expected a websocket upgrade\n")
        await ws.prepare(request)
        peer = request.remote or "?"
        self._websockets.add(ws)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await Connection(self, WebSocketIO(ws, self.max_message, peer)).run()
        finally:
            self._websockets.discard(ws)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    # --- upstream -------------------------------------------------------------------------------
    def upstream_ok(self) -> bool:
        return time.monotonic() >= self._upstream_down_until

    def upstream_failed(self, err: BaseException) -> None:
        if self.upstream_ok():
            log.warning("upstream hashserv %s failed (%s); treating as a miss for %.0f s",
                        self.upstream_address, err, UPSTREAM_RETRY_S)
        self._upstream_down_until = time.monotonic() + UPSTREAM_RETRY_S

    def queue_backfill(self, method: str, taskhash: str) -> None:
        q = self._backfill
        if q is None:
            return
        key = (method, taskhash)
        if key in self._backfill_pending or len(self._backfill_pending) >= BACKFILL_MAX:
            return
        self._backfill_pending.add(key)
        q.put_nowait(key)

    async def backfill_wait(self) -> int:
        """Number of queued back-fills, after waiting for the queue to drain (0 without upstream)."""
        q = self._backfill
        if q is None:
            return 0
        n = q.qsize()
        await q.join()
        return n

    async def _backfill_worker(self) -> None:
        from proxy.upstream_hashserv import UpstreamError, UpstreamHashserv

        assert self._backfill is not None
        q = self._backfill
        client = UpstreamHashserv(self.upstream_address)
        try:
            while True:
                method, taskhash = await q.get()
                try:
                    d = await client.get_taskhash(method, taskhash)
                    if d is not None and d.get("method") == method and d.get("taskhash") == taskhash:
                        if is_valid_unihash(d.get("unihash")):
                            if await self.db.insert_unihash(method, taskhash, d["unihash"]) and self.on_change:
                                self.on_change()
                        else:
                            log.warning("upstream returned an invalid unihash for %s %s", method, taskhash)
                except UpstreamError as e:
                    self.upstream_failed(e)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("hashserv back-fill of %s %s failed", method, taskhash)
                finally:
                    self._backfill_pending.discard((method, taskhash))
                    q.task_done()
        finally:
            await client.close()
