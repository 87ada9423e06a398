"""The statistics of `sstate-proxy stats`: gathered from the database (offline), served read-only
at ``GET /v1/stats`` (``@read``), and fetched from a running service (`stats --url URL`).

The same ``collect()`` makes the offline answer and the endpoint's, so both give the same
numbers: ``{"database": {table: {"rows": n}}, "dedup": {"objects", "unique", "bytes_saved"}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp
from aiohttp import web

from proxy.credentials import CredentialsError, check_url, find_credentials
from proxy.http_auth import require
from proxy.services import SERVICES
from storage.equivalence import EquivalenceDB

PATH = "/v1/stats"
TIMEOUT_S = 30.0


async def collect(db: EquivalenceDB) -> dict[str, Any]:
    """The statistics of ``db`` (whole-table reads; the engines run them off the event loop)."""
    return {"database": await db.get_usage(), "dedup": await db.dedup_stats()}


def render(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2, sort_keys=True)


class StatsEndpoint:
    """``GET /v1/stats``. Concurrent requests share one computation (whole-table counts), so a
    burst of them costs one set of reads; nothing is kept once it is answered."""

    def __init__(self) -> None:
        self._running: asyncio.Future | None = None

    async def handle(self, request: web.Request) -> web.Response:
        svc = request.app[SERVICES]
        await require(request, svc.auth, "@read")
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.ensure_future(collect(svc.db))
            running.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
        stats = await asyncio.shield(running)  # one client leaving must not cancel the others' answer
        return web.json_response(stats, dumps=render)


async def fetch(url: str) -> dict[str, Any]:
    """The statistics of the service at ``url`` (its root URL); raises RemoteError."""
    base = check_url(url)
    credentials = find_credentials(base)
    headers = {"Authorization": credentials.authorization()} if credentials else {}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session, \
                session.get(base + PATH, allow_redirects=False) as r:
            if r.status != 200:
                text = ((await r.text(errors="replace")).strip().splitlines() or [""])[0][:200]
                who = f"user {credentials.username!r}" if credentials else "anonymous"
                raise RemoteError(f"GET {base}{PATH} as {who} answered {r.status} {text}".rstrip())
            return await r.json()
    except aiohttp.ClientConnectorError as e:
        raise RemoteError(f"cannot connect to {base}: {e.os_error or e}") from None
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise RemoteError(f"GET {base}{PATH}: {type(e).__name__}: {e}") from None


class RemoteError(Exception):
    """The running service could not give its statistics; str() is the one line printed."""


def remote_command(url: str) -> int:
    """`sstate-proxy stats --url URL`: print the statistics as the offline command does."""
    try:
        stats = asyncio.run(fetch(url))
    except CredentialsError as e:
        print(f"sstate-proxy stats: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        print(f"sstate-proxy stats: {e}", file=sys.stderr)
        return 1
    print(render(stats))
    return 0
