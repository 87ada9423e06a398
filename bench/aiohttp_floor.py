"""The framework's own ceiling for serve_bench's HEAD: a bare aiohttp application.

One handler answers every HEAD 200 with the headers sstate-proxy sends for the object
(length, validators, source, a request id), computed once at start: no stat, no middleware, no
access log, no metrics. What it reaches on a machine is what any aiohttp service can reach there,
so serve_bench prints it beside nginx (``--aiohttp-floor``).

    python bench/aiohttp_floor.py --port PORT --workers N FILE
"""

from __future__ import annotations

import argparse
import os
import socket
from email.utils import formatdate

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("file", help="the object whose headers every answer carries")
    a = ap.parse_args()
    st = os.stat(a.file)
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(st.st_size),
               "ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"',
               "Last-Modified": formatdate(st.st_mtime, usegmt=True), "Accept-Ranges": "bytes",
               "X-Sstate-Source": "hit", "X-Request-Id": "floor"}

    async def answer(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(text="ok\n")  # the bench's readiness check

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    sock = socket.create_server(("127.0.0.1", a.port), backlog=1024)
    for _ in range(a.workers - 1):  # the workers share the listening socket, as sstate-proxy's
        if os.fork() == 0:
            break
    web.run_app(app, sock=sock, access_log=None, print=None)


if __name__ == "__main__":
    main()
