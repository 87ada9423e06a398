"""Where OEHASHEQUIV connections come from: TCP and unix listeners, and the aiohttp websocket.

* TCP (``host:port``, ``[v6]:port``, empty host = all interfaces): ``SO_REUSEPORT`` so several
  worker processes can share one port; accepted sockets get ``TCP_NODELAY`` and keep-alives
  (idle 30 s, interval 15 s, 4 probes), as bitbake-hashserv does.
* unix (``unix:///path`` or ``unix://relative``): a stale socket file is removed first (a live
  one is an error), the file is removed again on stop. Long paths (AF_UNIX allows ~107 bytes)
  are bound through ``/proc/self/fd/<dirfd>/name``, so no ``chdir`` is needed.
* websocket: ``websocket_response`` + ``serve_websocket``; heartbeats off (bitbake's
  synchronous client cannot answer pings while idle), text frames only, 1 MiB per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.config import parse_hashserv_bind
from proxy.hashserv.framing import StreamIO

log = logging.getLogger("sstate_proxy.hashserv")

BACKLOG = 1024
UNIX_PATH_MAX = 100


def parse_bind(bind: str) -> tuple[str, Any]:
    """``unix://PATH`` -> ('unix', path); ``host:port`` / ``[v6]:port`` -> ('tcp', (host, port))."""
    return parse_hashserv_bind("hashserv.bind", bind)


class Listener:
    """A bound TCP or unix server feeding connections to ``handler(io)``."""

    def __init__(self, server: asyncio.AbstractServer, kind: str, address: str,
                 unix_path: str | None = None, unix_ino: tuple[int, int] | None = None) -> None:
        self.server = server
        self.kind = kind
        self.address = address  # what a client would connect to, e.g. 127.0.0.1:41234
        self._unix_path = unix_path
        self._unix_ino = unix_ino

    async def close(self) -> None:
        self.server.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self._unix_path)


def _tune_listener(s: socket.socket) -> None:
    """Options accepted sockets inherit (Linux): keep-alives as bitbake-hashserv sets them."""
    with contextlib.suppress(OSError, AttributeError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def _tcp_address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


async def start_tcp(host: str | None, port: int, protocol_factory: Callable[[], asyncio.Protocol]) -> Listener:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory, host, port, reuse_port=True, backlog=BACKLOG)
    for s in server.sockets:
        _tune_listener(s)
    address = _tcp_address(server.sockets[0])
    log.info("hashserv listening on %s", ", ".join(_tcp_address(s) for s in server.sockets))
    return Listener(server, "tcp", address)


def _unlink_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        _with_short_path(path, probe.connect)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale hashserv socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def _with_short_path(path: str, fn: Callable[[str], Any]) -> Any:
    """Call ``fn`` with ``path`` or, if too long for AF_UNIX, an equivalent /proc/self/fd path."""
    if len(os.fsencode(path)) < UNIX_PATH_MAX:
        return fn(path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)) or "/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return fn(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
    finally:
        os.close(dirfd)


async def start_unix(path: str, protocol_factory: Callable[[], asyncio.Protocol]) -> Listener:
    path = os.path.abspath(path)
    _unlink_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _with_short_path(path, sock.bind)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    st = os.stat(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(protocol_factory, sock=sock)
    log.info("hashserv listening on unix://%s", path)
    return Listener(server, "unix", f"unix://{path}", path, (st.st_dev, st.st_ino))


def bind_socket(bind: str) -> socket.socket:
    """A bound, listening, non-blocking socket for ``bind`` (tcp with SO_REUSEPORT, or unix after
    removing a stale file). For a supervisor that binds once and lets forked workers adopt it
    with ``HashservService.listen_socket`` (a unix path cannot be bound by several processes)."""
    kind, where = parse_bind(bind)
    if kind == "unix":
        path = os.path.abspath(where)
        _unlink_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _with_short_path(path, sock.bind)
        except BaseException:
            sock.close()
            raise
    else:
        host, port = where
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _tune_listener(sock)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def start_on_socket(sock: socket.socket, handler: Callable[[StreamIO], Any], max_message: int,
                          on_open: Callable[[StreamIO], None] | None = None,
                          on_close: Callable[[StreamIO], None] | None = None, eager: bool = False) -> Listener:
    """Serve on an already bound and listening socket (not unlinked on close: its owner does)."""

    def factory() -> StreamIO:
        return StreamIO(handler, max_message, on_open, on_close, eager)

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        server = await loop.create_unix_server(factory, sock=sock)
        name = sock.getsockname()
        return Listener(server, "unix", f"unix://{name if isinstance(name, str) else name.decode()}")
    server = await loop.create_server(factory, sock=sock)
    return Listener(server, "tcp", _tcp_address(sock))


async def start_listener(bind: str, handler: Callable[[StreamIO], Any], max_message: int,
                         on_open: Callable[[StreamIO], None] | None = None,
                         on_close: Callable[[StreamIO], None] | None = None, eager: bool = False) -> Listener:
    kind, where = parse_bind(bind)

    def factory() -> StreamIO:
        return StreamIO(handler, max_message, on_open, on_close, eager)

    if kind == "unix":
        return await start_unix(where, factory)
    host, port = where
    return await start_tcp(host, port, factory)


def websocket_response(max_message: int) -> web.WebSocketResponse:
    """The aiohttp websocket for an OEHASHEQUIV client: no heartbeats, no compression."""
    return web.WebSocketResponse(heartbeat=None, autoping=True, max_msg_size=max_message, compress=False)


def __getattr__(name: str) -> Any:
    # `from proxy.hashserv.listeners import HashservService` works too (lazy: no import cycle).
    if name == "HashservService":
        from proxy.hashserv.service import HashservService

        return HashservService
    raise AttributeError(name)
