"""A plain HTTP sstate mirror in a subprocess, for the pull-through tests and the benchmark.

    python -m tests.upstream_origin DIR PORT [--rate BYTES_PER_S] [--auth USER:PASS] [--chunked]

Serves the files under DIR for GET and HEAD (Content-Length, nothing else clever), counts the
requests per (method, path) at ``GET /_counts`` (JSON), and with ``--rate`` sends bodies slowly
(64 KiB per step), so a test can kill it in the middle of a transfer. It also answers requests
sent to it as an HTTP proxy (absolute-form targets, counted as ``proxied GET path``; with
``--auth``, the credentials are then asked in Proxy-Authorization). ``--auth``: every request
needs these Basic credentials (401 otherwise). ``--chunked``: GET bodies are sent chunked, with no
Content-Length. ``Origin`` starts and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
STEP = 64 * 1024


def build(root: Path, rate: float, auth: str, chunked: bool = False) -> web.Application:
    counts: collections.Counter[str] = collections.Counter()
    expected = "Basic " + base64.b64encode(auth.encode()).decode() if auth else ""

    async def counts_handler(request: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    async def serve(request: web.Request) -> web.StreamResponse:
        # an absolute-form target is a request sent to it as an HTTP proxy: counted as such
        proxied = not request.raw_path.startswith("/")
        rel = unquote(request.rel_url.raw_path).lstrip("/")
        counts[f"{'proxied ' if proxied else ''}{request.method} {rel}"] += 1
        if expected and request.headers.get("Proxy-Authorization" if proxied else "Authorization") != expected:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="origin"'})
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if chunked:
            del headers["Content-Length"]
        resp = web.StreamResponse(headers=headers)
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), STEP):
            await resp.write(data[i:i + STEP])
            if rate:
                await asyncio.sleep(STEP / rate)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/_counts", counts_handler)
    app.router.add_get("/{tail:.*}", serve)  # and HEAD
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--auth", default="")
    p.add_argument("--chunked", action="store_true")
    a = p.parse_args(argv)
    web.run_app(build(Path(a.root).resolve(), a.rate, a.auth, a.chunked), host="127.0.0.1", port=a.port,
                print=None, access_log=None)


class Origin:
    """The origin mirror in a subprocess serving ``root``."""

    def __init__(self, root: Path, port: int, *, rate: float = 0.0, auth: str = "", chunked: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.args = [str(self.root), str(port), "--rate", str(rate), "--auth", auth, *(["--chunked"] if chunked else [])]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Origin:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.upstream_origin", *self.args], env=env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.counts()
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None:
                    raise RuntimeError("origin exited") from None
                time.sleep(0.05)
        raise RuntimeError("origin did not start")

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_counts", timeout=5) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
