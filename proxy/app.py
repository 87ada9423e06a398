"""Builds the aiohttp Application from a Config and wires the parts together.

One process = one store, one equivalence database connection, one resolver cache, one hashserv
service; ``proxy.cli`` runs N such processes on one port.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import sys
import time as _time
from time import time as time_now

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.auth import Auth
from proxy.config import Config
from proxy.equiv_api import EquivalenceAPI
from proxy.hashserv.service import HashservService
from proxy.http_auth import require
from proxy.metrics import Metrics
from proxy.mirror import Mirror
from proxy.reports import Reporter
from proxy.resolver import Resolver
from proxy.uploads import Uploads
from proxy.upstream_hashserv import UpstreamHashserv
from storage import open_store
from storage.equivalence import open_equivalence_db

log = logging.getLogger("sstate_proxy")
access_log = logging.getLogger("sstate_proxy.access")

ACCESS_FLUSH_S = 0.05
ACCESS_FLUSH_LINES = 512
CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
PARTS = web.AppKey("parts", dict)
RID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class AccessLogger(AbstractAccessLogger):
    """One line per request: time, method, path, status, bytes, source, milliseconds, request id.

    Written straight to the log stream in batches (every ACCESS_FLUSH_S or ACCESS_FLUSH_LINES)
    instead of through `logging`: a LogRecord per request halved the HEAD rate bitbake's
    existence checks depend on. Lines go to the same stream (stderr) as the other logs.
    """

    json_format = False
    _lines: list[str] = []  # shared by every connection's logger in this process
    _flush_handle: asyncio.TimerHandle | None = None
    _stamp_second = -1
    _stamp = ""
    stream = sys.stderr

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.emit(request.method, request.path_qs, response.status, response.body_length,
                  request.get("source", "-"), time, request.get("rid", "-"))

    @classmethod
    def emit(cls, method: str, path_qs: str, status: int, nbytes: int, source: str, seconds: float,
             rid: str) -> None:
        """Queue one access line (also called by the fast path, proxy/fasthead.py)."""
        shared = AccessLogger
        now = time_now()
        second = int(now)
        if second != shared._stamp_second:
            shared._stamp_second = second
            shared._stamp = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(second))
        stamp = f"{shared._stamp}.{int((now - second) * 1000):03d}Z"
        if cls.json_format:
            line = json.dumps({
                "time": stamp, "method": method, "path": path_qs,
                "status": status, "bytes": nbytes,
                "source": source, "ms": round(seconds * 1000.0, 2),
                "rid": rid,
            })
        else:
            line = (f"{stamp} access {method} {path_qs} {status} "
                    f"{nbytes} {source} {seconds * 1000.0:.2f}ms "
                    f"rid={rid}")
        shared._lines.append(line)
        if len(shared._lines) >= ACCESS_FLUSH_LINES:
            shared.flush()
        elif shared._flush_handle is None:
            shared._flush_handle = asyncio.get_running_loop().call_later(ACCESS_FLUSH_S, shared.flush)

    @classmethod
    def flush(cls) -> None:
        if cls._flush_handle is not None:
            cls._flush_handle.cancel()
            cls._flush_handle = None
        if cls._lines:
            text = "\n".join(cls._lines) + "\n"
            cls._lines.clear()
            try:
                cls.stream.write(text)
                cls.stream.flush()
            except (OSError, ValueError):
                pass  # a closed log stream must not take requests down

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class JsonAccessLogger(AccessLogger):
    json_format = True


_rid_prefix = ""
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per request across processes and restarts, and far cheaper than uuid4."""
    global _rid_prefix
    if not _rid_prefix:
        _rid_prefix = f"{os.getpid():x}{int(_time.time()) & 0xFFFFFF:06x}"
    return f"{_rid_prefix}-{next(_rid_counter):x}"


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    rid = request.headers.get("X-Request-Id", "")
    if not rid or not RID_RE.fullmatch(rid):
        rid = new_request_id()
    request["rid"] = rid
    try:
        return await handler(request)
    except Exception as e:
        http_error = isinstance(e, web.HTTPException)
        if getattr(request.writer, "output_size", 0):
            # The head, and maybe part of the body, is out: an error response now would be
            # written into the body, and with the declared Content-Length a client could take
            # the mix for the object. Cut the connection instead: the client sees a short body
            # (wget resumes with Range). The response returned is only for the access log:
            # aiohttp cannot write it to the closed connection.
            if http_error:
                log.warning("response failed after it started rid=%s %s %s: %s", rid,
                            request.method, request.path, e.text.strip() if e.text else e.status)
            else:
                log.exception("response failed after it started rid=%s %s %s", rid,
                              request.method, request.path)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=e.status if http_error else 500)
        if http_error:
            raise
        log.exception("internal error rid=%s %s %s", rid, request.method, request.path)
        return web.Response(status=500, text=f"internal error, request id {rid}\n")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get("rid")
    if rid:
        response.headers["X-Request-Id"] = rid


async def _startup(app: web.Application) -> None:
    cfg = app[CONFIG]
    parts = app[PARTS]
    db = open_equivalence_db(cfg.database.url)
    store = open_store(cfg, db)
    await store.start(housekeeping=parts.get("housekeeping", True))
    auth = Auth(db, cfg.hashserv.anon_perms)
    resolver = Resolver(db, store, cfg.equivalence)
    upstream = None
    if cfg.hashserv.upstream and not cfg.hashserv.read_only:
        upstream = UpstreamHashserv(cfg.hashserv.upstream)
    reporter = Reporter(db, auth, read_only=cfg.hashserv.read_only, upstream=upstream,
                        on_change=resolver.invalidate)
    hashserv = HashservService(db, auth, cfg, reporter)
    if not parts.get("skip_listeners"):
        await hashserv.start(sock=parts.get("hashserv_sock"))
    parts.update(store=store, db=db, auth=auth, resolver=resolver, reporter=reporter, hashserv=hashserv)
    parts["mirror"] = mirror = Mirror(store, resolver, auth, app[METRICS], cfg.server.mirror_prefix)
    parts["uploads"] = Uploads(mirror, max_upload_bytes=cfg.limits.max_upload_bytes,
                               read_only=cfg.hashserv.read_only)
    parts["equiv"] = EquivalenceAPI(reporter, auth, app[METRICS], cfg.limits.max_request_body_bytes)


async def _cleanup(app: web.Application) -> None:
    AccessLogger.flush()
    parts = app[PARTS]
    for name in ("hashserv", "reporter", "store", "db"):
        part = parts.get(name)
        if part is not None:
            try:
                await (part.stop() if name == "hashserv" else part.close())
            except Exception:
                log.exception("error while closing %s", name)


def build_app(cfg: Config, *, skip_listeners: bool = False, hashserv_sock=None,
              housekeeping: bool = True) -> web.Application:
    """The whole service as one Application. ``skip_listeners``: no raw hashserv listener;
    ``hashserv_sock``: serve the raw hashserv protocol on this listening socket, bound by the
    supervisor before it forked (workers share it) instead of binding ``[hashserv] bind``;
    ``housekeeping``: this process does the store's once-per-deployment chores (one worker)."""
    app = web.Application(
        middlewares=[request_id_middleware],
        client_max_size=cfg.limits.max_request_body_bytes,
    )
    app[CONFIG] = cfg
    app[METRICS] = Metrics()
    app[PARTS] = {"skip_listeners": skip_listeners, "hashserv_sock": hashserv_sock,
                  "housekeeping": housekeeping}
    app.on_startup.append(_startup)
    app.on_response_prepare.append(_add_request_id)
    app.on_cleanup.append(_cleanup)

    def part(name):
        return app[PARTS][name]

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        problems = []
        try:
            await part("db").generation()
        except Exception as e:  # the point is to report any fault as not-ready
            problems.append(f"database: {e}")
        try:
            await part("store").stat(".readyz-probe")
        except Exception as e:
            problems.append(f"storage: {e}")
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="ready\n")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=app[METRICS].render(), headers={"Content-Type": Metrics.content_type})

    async def websocket(request: web.Request) -> web.StreamResponse:
        if not cfg.hashserv.websocket:
            raise web.HTTPNotFound(text="websocket hashserv disabled\n")
        return await part("hashserv").handle_websocket(request)

    async def objects(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await websocket(request)
        if request.method in ("GET", "HEAD"):
            return await part("mirror").get_or_head(request)
        if request.method == "PUT":
            return await part("uploads").put(request)
        if request.method == "DELETE":
            return await part("uploads").delete(request)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD", "PUT", "DELETE"])

    async def expect_continue(request: web.Request) -> None:
        """Answer `Expect: 100-continue` only after the upload's permission and size checks, so
        curl/wget learn of a 401/403/413 before they send a large body."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="unknown Expect value\n")
        if request.method == "PUT":
            await require(request, part("auth"), "@upload")
            length = request.content_length
            if length is not None and length > cfg.limits.max_upload_bytes:
                raise web.HTTPRequestEntityTooLarge(cfg.limits.max_upload_bytes, length,
                                                    text="object larger than the upload limit\n")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def equiv_get(request: web.Request) -> web.Response:
        return await part("equiv").get(request)

    async def equiv_post(request: web.Request) -> web.Response:
        return await part("equiv").post(request)

    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/equivalent", equiv_get)
    r.add_post("/v1/equivalent", equiv_post)
    r.add_get("/ws", websocket)
    r.add_route("*", cfg.server.mirror_prefix + "{tail:.*}", objects, expect_handler=expect_continue)
    return app


def access_logger_class(cfg: Config) -> type[AbstractAccessLogger]:
    return JsonAccessLogger if cfg.server.log_format == "json" else AccessLogger


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "pid": record.process, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(cfg: Config) -> None:
    handler = logging.StreamHandler()
    if cfg.server.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    logging.basicConfig(level=getattr(logging, cfg.server.log_level.upper()), handlers=[handler], force=True)
    # The access log has its own switch: quiet logs (log_level WARNING) still log requests.
    access_log.setLevel(logging.INFO if cfg.server.access_log else logging.WARNING)
