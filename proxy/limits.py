"""Connection limits of the HTTP listener, its graceful drain, and the stall bound of bodies.

aiohttp closes idle keep-alive connections itself (``keepalive_timeout``, set from
``[limits] idle_timeout_s``), but it has no deadline for a request head and no cap on open
connections: a client could hold any number of connections by sending half a head, or nothing.
``ConnectionLimits`` adds both around aiohttp's own protocol, through public interfaces only:

* its ``protocol_factory`` wraps the runner's protocol factory (``BaseRunner.server``) for
  ``loop.create_server``: each connection gets a ``_Guard`` protocol that counts it, refuses it
  when the worker holds ``max_connections`` already (closed at once, never read: the cap bounds
  what a flood of connections can hold), and otherwise hands every event to aiohttp's protocol;
* a request head must then arrive within ``header_timeout_s``: from the connection's start for
  the first request (the TLS handshake is bounded separately, by ``ssl_handshake_timeout``), and
  from the first byte of each later one. The guard notes when its head began;
  ``request_started`` (called by the app's middleware) clears that when aiohttp hands over a
  parsed request (it finds the guard by ``request.transport``). One sweep per worker, every
  quarter of the deadline (at most 1 s) while connections are open, closes those whose head is
  overdue: a timer per request would be armed and cancelled on every request of a HEAD storm.
  While a request is being handled (a body being uploaded, a websocket) no deadline runs:
  bodies have their own bound (``read_chunk``), websockets none.
* ``drain`` (SIGTERM, after the listener stopped accepting) waits until no request is in the
  handlers, at most the grace period. Requests in flight go on receiving their bodies and
  sending their answers; a request that starts during the drain is answered 503 with
  ``Retry-After`` and ``Connection: close``. (Not aiohttp's own shutdown alone: it stops
  reading every connection at once, so an upload in flight could never complete.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("sstate_proxy.limits")

REFUSAL_LOG_INTERVAL_S = 10.0  # one warning per interval while connections are being refused


class _Guard(asyncio.Protocol):
    """One connection: the limits' bookkeeping in front of aiohttp's protocol ``inner``."""

    __slots__ = ("limits", "make", "inner", "transport", "head_since", "busy")

    def __init__(self, limits: ConnectionLimits, make: Callable[[], asyncio.BaseProtocol]) -> None:
        self.limits = limits
        self.make = make
        self.inner: asyncio.Protocol | None = None  # None: refused (or not connected yet)
        self.transport: asyncio.BaseTransport | None = None
        self.head_since: float | None = None  # monotonic start of the head awaited, if any
        self.busy = False  # a request is in the handlers (between head and response)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.limits
        if len(limits.open) >= limits.max_connections:
            limits.refuse(transport)
            return
        self.transport = transport
        limits.admit(transport, self)
        self.inner = self.make()  # type: ignore[assignment]
        self.head_since = time.monotonic()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self.head_since = None
        self.limits.open.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.head_since is None and not self.busy:
            self.head_since = time.monotonic()  # the first byte of a new request head
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def close_if_overdue(self, started_before: float) -> None:
        """Close the connection if the head it awaits began before ``started_before``."""
        since = self.head_since
        if since is None or since > started_before or self.busy or self.transport is None \
                or self.transport.is_closing():
            return
        self.head_since = None
        log.debug("closing %s: no complete request head within %gs",
                  self.transport.get_extra_info("peername"), self.limits.header_timeout_s)
        self.transport.close()

    def request_started(self) -> None:
        self.head_since = None
        self.busy = True
        self.limits.busy += 1

    def request_finished(self) -> None:
        # The next head's deadline starts with its first byte (data_received); until then the
        # connection is idle, which aiohttp's keepalive_timeout bounds.
        self.busy = False
        limits = self.limits
        limits.busy -= 1
        if limits.busy == 0 and limits.draining:
            limits.idle.set()


class ConnectionLimits:
    """The connection cap, the request-head deadline and the drain of one worker's HTTP
    listener."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open: dict[asyncio.BaseTransport, _Guard] = {}
        self.busy = 0  # connections with a request in the handlers
        self.draining = False
        self.idle = asyncio.Event()  # set when draining and no request is in the handlers
        self.refused = 0  # connections closed at once because of the cap
        self._last_warning = 0.0
        self._sweep_s = min(1.0, max(0.05, header_timeout_s / 4))  # never a busy loop
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol_factory(self, make: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` guarding the protocols ``make`` builds
        (aiohttp's ``runner.server``)."""
        return lambda: _Guard(self, make)

    def admit(self, transport: asyncio.BaseTransport, guard: _Guard) -> None:
        self.open[transport] = guard
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)

    def _sweep(self) -> None:
        """Close the connections whose request head is overdue; again in ``_sweep_s`` while
        any connection is open."""
        self._sweeper = None
        started_before = time.monotonic() - self.header_timeout_s
        for guard in list(self.open.values()):
            guard.close_if_overdue(started_before)
        if self.open:
            self._sweeper = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warning >= REFUSAL_LOG_INTERVAL_S:
            self._last_warning = now
            log.warning("%d connections open ([limits] max_connections): refusing new ones "
                        "(%d refused so far)", len(self.open), self.refused)
        transport.close()

    async def drain(self, grace_s: float) -> bool:
        """Wait (at most ``grace_s``) until no request is in the handlers; True if none is.
        From now on new requests are refused (503). (The runner's cleanup then cancels what is
        still running.)"""
        self.draining = True
        if self.busy == 0:
            return True
        try:
            async with asyncio.timeout(grace_s):
                await self.idle.wait()
        except TimeoutError:
            log.warning("%d requests still in flight after the %gs grace period", self.busy, grace_s)
            return False
        return True

    def request_started(self, request: web.BaseRequest) -> _Guard | None:
        """A parsed request arrived (the app's middleware calls this before its handler): its
        head is in time, and its connection is busy until ``request_finished``. Raises
        503 while draining. None when the connection is not guarded (a test server's) or the
        client left."""
        if self.draining:
            exc = web.HTTPServiceUnavailable(text="shutting down, retry later\n",
                                             headers={"Retry-After": "1"})
            exc.force_close()
            raise exc
        transport = request.transport
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.request_started()
        return guard

    def request_finished(self, guard: _Guard | None, response: web.StreamResponse | None) -> None:
        """The handler returned ``response`` (or raised: pass None)."""
        if guard is not None:
            guard.request_finished()
        if self.draining and response is not None and not response.prepared:
            response.force_close()  # its client learns at once that the connection ends here


LIMITS = web.AppKey("limits", ConnectionLimits)


def request_timeout(text: str) -> web.HTTPRequestTimeout:
    """408 for a stalled body; the connection is closed, since the rest of the body may yet come."""
    exc = web.HTTPRequestTimeout(text=text + "\n")
    exc.force_close()
    return exc


async def read_chunk(content, size: int, stall_s: float) -> bytes:
    """Up to ``size`` bytes of a request body (b"" at its end); ``BodyStalled`` when no byte
    comes for ``stall_s`` seconds."""
    try:
        async with asyncio.timeout(stall_s):
            return await content.read(size)
    except TimeoutError:
        raise BodyStalled(f"no body byte for {stall_s:g}s") from None


class BodyStalled(ConnectionError):
    """The client stopped sending its request body: answered 408 (see ``request_timeout``)."""
