"""/ui/: the dashboard for the people who run the cache, and the JSON that feeds it.

``GET /ui/`` is a static page (``proxy/ui/``: one HTML file and one hand-written script, no
external assets: the machines it runs on may have no internet) that draws the numbers of
``GET /ui/api/summary?minutes=N``. Everything it shows comes from the database, so every
worker and every replica shows the same thing: the traffic history (proxy.traffic), the object
catalog's usage (storage used), the retention budget from the configuration, and the dedup
statistics. Readable with ``@read``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from proxy.auth import Auth, sees_task_data
from proxy.config import Config
from proxy.http_auth import require, require_user
from proxy.traffic import BUCKET_S
from storage.equivalence import EquivalenceDB

CHART_SOURCES = ("hit", "equivalent", "upstream", "miss")
DEFAULT_MINUTES = 60
MAX_MINUTES = 24 * 60
DAY_S = 86400
TOP_RECIPES = 10
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page loads nothing from anywhere else (and cannot be framed).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str


def load_static() -> dict[str, StaticFile]:
    """The files of proxy/ui/, read once (they are small)."""
    out = {}
    for entry in resources.files("proxy").joinpath("ui").iterdir():
        name = entry.name
        suffix = name[name.rfind("."):] if "." in name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            out[name] = StaticFile(entry.read_bytes(), CONTENT_TYPES[suffix])
    return out


def retention_budget(cfg: Config) -> int | None:
    """``[retention] max_size`` in bytes, or None when no budget is set (also when this build
    has no ``[retention]`` section)."""
    retention = getattr(cfg, "retention", None)
    size = getattr(retention, "max_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


class Dashboard:
    def __init__(self, cfg: Config, db: EquivalenceDB, auth: Auth) -> None:
        self.cfg = cfg
        self.db = db
        self.auth = auth
        self.files = load_static()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        identity = await require(request, self.auth, "@read")
        name = request.match_info.get("file")
        if name is None:  # /ui
            raise web.HTTPFound("/ui/")
        if name == "login":  # a browser signs in here, then sends its credentials to /ui/*
            await require_user(request, self.auth)
            raise web.HTTPFound("/ui/")
        if name == "api/summary":
            minutes = _minutes(request.query.get("minutes"))
            summary = await self.summary(minutes, recipes=sees_task_data(identity))
            return web.json_response(summary, headers={"Cache-Control": "no-cache"})
        static = self.files.get(name or "index.html")
        if static is None:
            raise web.HTTPNotFound(text="no such dashboard file\n")
        return web.Response(body=static.body, content_type=static.content_type.split(";")[0],
                            charset="utf-8" if "charset" in static.content_type else None,
                            headers=PAGE_HEADERS)

    async def summary(self, minutes: int, now: float | None = None, *, recipes: bool = True) -> dict[str, Any]:
        """What the page draws: the last ``minutes`` of traffic per minute by source, bytes
        served, reports per hour (24 h), the recipes with the most misses (24 h), storage used
        against the retention budget, and dedup savings.

        Recipe names are task data (PN): with ``recipes`` false (a viewer without
        ``@task-data``) the list is None and only the counts are shown."""
        now = time.time() if now is None else now
        last = int(now) // BUCKET_S * BUCKET_S
        first = last - (minutes - 1) * BUCKET_S
        day_start = last - DAY_S + BUCKET_S
        rows = await self.db.traffic_series(min(first, day_start))
        series = {t: dict.fromkeys((*CHART_SOURCES, "bytes"), 0) for t in range(first, last + 1, BUCKET_S)}
        totals = dict.fromkeys(CHART_SOURCES, 0)
        bytes_by_source = dict.fromkeys(CHART_SOURCES, 0)
        hour_now = int(now) // 3600 * 3600
        reports = {hour_now - 3600 * i: 0 for i in range(23, -1, -1)}
        for r in rows:
            if r.source == "report":
                hour = r.bucket // 3600 * 3600
                if hour in reports:
                    reports[hour] += r.requests
                continue
            point = series.get(r.bucket)
            if point is None or r.source not in totals:
                continue
            point[r.source] += r.requests
            point["bytes"] += r.bytes
            totals[r.source] += r.requests
            bytes_by_source[r.source] += r.bytes
        requests = sum(totals.values())
        objects, used = await self.db.object_usage()
        return {
            "generated": int(now),
            "bucket_s": BUCKET_S,
            "minutes": minutes,
            "sources": list(CHART_SOURCES),
            "series": [{"t": t, **point} for t, point in series.items()],
            "totals": {**totals, "requests": requests, "bytes": sum(bytes_by_source.values())},
            "bytes_by_source": bytes_by_source,
            # answered from the cache (hit, equivalent or pulled through) of all object requests
            "served_ratio": (requests - totals["miss"]) / requests if requests else None,
            "reports_per_hour": [{"t": t, "reports": n} for t, n in reports.items()],
            "reports_24h": sum(reports.values()),
            "top_missed_recipes": [{"recipe": recipe, "misses": n} for recipe, n in
                                   await self.db.top_missed_recipes(day_start, TOP_RECIPES)]
                                  if recipes else None,
            "storage": {"objects": objects, "bytes": used, "max_size": retention_budget(self.cfg)},
            "dedup": await self.db.dedup_stats(),
        }


def _minutes(value: str | None) -> int:
    if value is None:
        return DEFAULT_MINUTES
    if not value.isdigit() or not 1 <= int(value) <= MAX_MINUTES:
        raise web.HTTPBadRequest(text=f"minutes: a whole number from 1 to {MAX_MINUTES}\n")
    return int(value)
