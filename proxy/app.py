"""Builds the aiohttp Application from a Config and wires the parts together.

One process = one store, one equivalence database connection, one resolver cache, one hashserv
service, held in one ``Services`` (``app[SERVICES]``); ``proxy.cli`` runs N such processes on
one listening socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
import time as _time
from time import perf_counter
from time import time as time_now

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.access import AccessRecorder
from proxy.auth import Auth
from proxy.config import Config
from proxy.dashboard import Dashboard
from proxy.equiv_api import EquivalenceAPI
from proxy.errors import (
    MalformedRequestFilter,
    answer_for,
    new_request_id,
    on_response_prepare,
    request_id,
    response_for,
)
from proxy.hashserv.service import HashservService
from proxy.http_auth import require
from proxy.limits import LIMITS, ConnectionLimits
from proxy.metrics import Metrics
from proxy.mirror import Mirror
from proxy.reports import Reporter
from proxy.request_keys import NAME_KEY, RID_KEY, SENT_KEY, SOURCE_KEY, USER_KEY
from proxy.resolver import Resolver
from proxy.retention import Policy, Scheduler, parse_duration
from proxy.services import SERVICES, Services
from proxy.stats import PATH as STATS_PATH
from proxy.stats import StatsEndpoint
from proxy.traffic import TrafficRecorder, recipe_of
from proxy.uploads import Uploads
from proxy.upstream import KeyLocks, UpstreamMirrors, lock_dir_for
from proxy.upstream_hashserv import UpstreamHashserv
from storage import open_store
from storage.cache import PulledCache
from storage.equivalence import open_equivalence_db

log = logging.getLogger("sstate_proxy")
access_log = logging.getLogger("sstate_proxy.access")

ACCESS_FLUSH_S = 0.05
ACCESS_FLUSH_LINES = 512
CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes written to the client: what the mirror counted for an object body (sendfile
    and streams, cut short when the client left), else the length of a plain response's body."""
    sent = request.get(SENT_KEY)
    if sent is not None:
        return sent
    status = response.status
    if request.method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    return response.content_length or 0


class ClientAddress:
    """The client's address for the log: the peer, or the first X-Forwarded-For address when
    the peer is one of ``[server] trusted_proxies``."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(t, strict=False) for t in trusted]
        self._trusted: dict[str, bool] = {}

    def __call__(self, request: web.BaseRequest) -> str:
        peer = request.remote or "-"
        if self.networks and self._is_trusted(peer):
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded:
                first = forwarded.split(",", 1)[0].strip()
                if first:
                    return first
        return peer

    def _is_trusted(self, peer: str) -> bool:
        known = self._trusted.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
                known = any(address in n for n in self.networks)
            except ValueError:  # a unix socket's peer, say
                known = False
            if len(self._trusted) > 4096:
                self._trusted.clear()
            self._trusted[peer] = known
        return known


class AccessLogger(AbstractAccessLogger):
    """One line per request: time, client address, user, method, path, status, body bytes,
    source, milliseconds, request id.

    Written straight to the log stream in batches (every ACCESS_FLUSH_S or ACCESS_FLUSH_LINES)
    instead of one `logging` record per request, which costs a large share of a HEAD's time.
    Lines go to the same stream (stderr) as the other logs.
    """

    json_format = False
    client_address = ClientAddress(())  # set from [server] trusted_proxies by configure()
    _lines: list[str] = []  # shared by every connection's logger in this process
    _flush_handle: asyncio.TimerHandle | None = None
    _stamp_second = -1
    _stamp = ""
    stream = sys.stderr

    @classmethod
    def configure(cls, cfg: Config) -> type[AccessLogger]:
        chosen = JsonAccessLogger if cfg.server.log_format == "json" else AccessLogger
        AccessLogger.client_address = ClientAddress(cfg.server.trusted_proxies)
        return chosen

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        shared = AccessLogger
        now = time_now()
        second = int(now)
        if second != shared._stamp_second:
            shared._stamp_second = second
            shared._stamp = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(second))
        stamp = f"{shared._stamp}.{int((now - second) * 1000):03d}Z"
        client = shared.client_address(request)
        user = request.get(USER_KEY, "-")
        nbytes = body_bytes(request, response)
        source = request.get(SOURCE_KEY, "-")
        rid = request.get(RID_KEY, "-")
        if self.json_format:
            line = json.dumps({
                "time": stamp, "client": client, "user": user, "method": request.method,
                "path": request.path_qs, "status": response.status, "bytes": nbytes,
                "source": source, "ms": round(time * 1000.0, 2), "rid": rid,
            })
        else:
            line = (f"{stamp} access {client} {user} {request.method} {request.path_qs} "
                    f"{response.status} {nbytes} {source} {time * 1000.0:.2f}ms rid={rid}")
        shared._lines.append(line)
        if len(shared._lines) >= ACCESS_FLUSH_LINES:
            shared.flush()
        elif shared._flush_handle is None:
            shared._flush_handle = asyncio.get_running_loop().call_later(ACCESS_FLUSH_S, shared.flush)

    @classmethod
    def flush(cls) -> None:
        shared = AccessLogger
        if shared._flush_handle is not None:
            shared._flush_handle.cancel()
            shared._flush_handle = None
        if shared._lines:
            text = "\n".join(shared._lines) + "\n"
            shared._lines.clear()
            try:
                shared.stream.write(text)
                shared.stream.flush()
            except (OSError, ValueError):
                pass  # a closed log stream must not take requests down

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class JsonAccessLogger(AccessLogger):
    json_format = True


STARTUP_OPTIONS = web.AppKey("startup_options", dict)
# /readyz waits at most this long for each backend (they are probed at once).
READY_TIMEOUT_S = 1.5


async def _startup(app: web.Application) -> None:
    cfg = app[CONFIG]
    options = app[STARTUP_OPTIONS]
    metrics = app[METRICS]
    db = open_equivalence_db(cfg.database.url, pool_size=cfg.database.pool_size)
    store = open_store(cfg, db)
    await store.start(housekeeping=options["housekeeping"])
    auth = Auth(db, cfg.hashserv.anon_perms)
    resolver = Resolver(db, store, cfg.equivalence)
    upstream = None
    if cfg.hashserv.upstream and not cfg.hashserv.read_only:
        upstream = UpstreamHashserv(cfg.hashserv.upstream)
    reporter = Reporter(db, auth, read_only=cfg.hashserv.read_only, upstream=upstream,
                        on_change=resolver.changed)
    hashserv = HashservService(db, auth, cfg, reporter, metrics)
    if not options["skip_listeners"]:
        await hashserv.start(sock=options["hashserv_sock"])
    access = AccessRecorder(db, flush_s=cfg.retention.access_flush_s, enabled=cfg.retention.record_access)
    access.start()
    mirrors = None
    if cfg.upstream.mirrors:
        pulled = PulledCache(db, store, cfg.upstream.cache_max_bytes,
                             on_evicted=metrics.upstream_cache_evicted)
        await pulled.start(housekeeping=options["housekeeping"])
        mirrors = UpstreamMirrors(cfg.upstream, store, pulled, KeyLocks(lock_dir_for(cfg)), metrics)
        if upstream is not None:
            resolver.use_upstream_hashserv(reporter.get, cfg.upstream.negative_ttl_s)
    mirror = Mirror(store, resolver, auth, metrics, cfg.server.mirror_prefix, upstream=mirrors,
                    access=access)
    uploads = Uploads(mirror, max_upload_bytes=cfg.limits.max_upload_bytes,
                      read_only=cfg.hashserv.read_only, body_timeout_s=cfg.limits.body_timeout_s)
    equiv = EquivalenceAPI(reporter, auth, metrics, cfg.limits.max_request_body_bytes,
                           body_timeout_s=cfg.limits.body_timeout_s)
    traffic = TrafficRecorder(db, flush_s=cfg.dashboard.history_flush_s,
                              keep_s=cfg.dashboard.history_days * 86400.0)
    metrics.traffic = traffic
    dashboard = Dashboard(cfg, db, auth)
    app[SERVICES] = Services(store=store, db=db, auth=auth, resolver=resolver, reporter=reporter,
                             hashserv=hashserv, mirror=mirror, uploads=uploads, equiv=equiv,
                             metrics=metrics, traffic=traffic, dashboard=dashboard, upstream=mirrors,
                             access=access)
    if cfg.retention.interval and options["housekeeping"]:  # one worker runs the schedule
        services = app[SERVICES]
        services.retention = Scheduler(store, db, Policy.from_config(cfg.retention),
                                       parse_duration(cfg.retention.interval), on_removed=resolver.invalidate,
                                       metrics=metrics)
        services.retention.start()


async def _cleanup(app: web.Application) -> None:
    AccessLogger.flush()
    services = app.get(SERVICES)
    if services is None:
        return
    closing = [("retention", services.retention.stop if services.retention is not None else None),
               ("hashserv", services.hashserv.stop), ("reporter", services.reporter.close),
               ("traffic history", services.traffic.close), ("access", services.access.stop)]
    if services.upstream is not None:
        closing += [("upstream", services.upstream.close), ("upstream cache", services.upstream.cache.close)]
    for name, close in (*closing, ("store", services.store.close), ("db", services.db.close)):
        if close is None:
            continue
        try:
            await close()
        except Exception:
            log.exception("error while closing %s", name)


# What the middleware counts a route's requests as: object GET/HEAD (or PUT/DELETE, the
# "upload" face), /v1/equivalent, a websocket (not timed: its messages are, by the hashserv
# face), anything else "operations".
ROUTE_FACES = web.AppKey("route_faces", dict)
TRAFFIC_SOURCES = frozenset(("hit", "equivalent", "upstream", "miss"))


def request_middleware(limits: ConnectionLimits):
    """The app's one middleware, around every handler (one layer, not one per concern: each
    layer costs a coroutine per request, a sizeable share of a HEAD's time):

    * the connection limits: 503 while draining; the request head arrived in time, the
      connection is busy until the handler returns (``ConnectionLimits``);
    * the errors: the request's id, exceptions -> responses (``proxy.errors.answer_for``);
    * the metrics, once answered, with the status the errors chose: the latency by face; an
      object request by method, status and source, and into the traffic history."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        t0 = perf_counter()
        response: web.StreamResponse | None = None
        status = 500
        try:
            rid = request[RID_KEY] = request_id(request)
            guard = limits.request_started(request)
            try:
                response = await handler(request)
            except Exception as e:
                response = answer_for(request, rid, e)  # raises an HTTPException again
            finally:
                limits.request_finished(guard, response)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            _count(request, perf_counter() - t0, status, response)

    return middleware


def _count(request: web.Request, seconds: float, status: int, response: web.StreamResponse | None) -> None:
    """The metrics (and traffic history) of one answered request."""
    app = request.app
    services = app.get(SERVICES)
    if services is None:  # an app without the service's parts (tests of one piece)
        return
    face = app[ROUTE_FACES].get(request.match_info.route.handler, "operations")
    method = request.method
    if face == "object" and method == "GET" and "Upgrade" in request.headers \
            and request.headers["Upgrade"].lower() == "websocket":
        face = "ws"  # OEHASHEQUIV on GET / with Upgrade: websocket
    if face == "ws":
        return  # not timed: its messages are, by the hashserv face
    metrics = services.metrics
    if face == "object":
        source = request.get(SOURCE_KEY, "none")
        if method not in ("GET", "HEAD"):
            face = "upload"
        elif source == "miss":
            name = request.get(NAME_KEY)
            if name is not None:  # a favicon or a scanner's path is no cache miss
                services.traffic.record("miss", 0, recipe_of(name))
        elif source in TRAFFIC_SOURCES:
            nbytes = 0 if response is None else body_bytes(request, response)
            services.traffic.record(source, nbytes)
        metrics.object_request(method, status, source)
    metrics.observe(face, seconds)


def build_app(cfg: Config, *, skip_listeners: bool = False, hashserv_sock=None,
              housekeeping: bool = True) -> web.Application:
    """The whole service as one Application. ``skip_listeners``: no raw hashserv listener;
    ``hashserv_sock``: serve the raw hashserv protocol on this listening socket, bound by the
    supervisor before it forked (workers share it) instead of binding ``[hashserv] bind``;
    ``housekeeping``: this process does the store's once-per-deployment chores (one worker)."""
    # The connection cap, the request-head deadline and the drain; proxy.cli serves the
    # listening socket through its protocol_factory (without it the middleware does nothing).
    limits = ConnectionLimits(cfg.limits.max_connections, cfg.limits.header_timeout_s)
    app = web.Application(
        middlewares=[request_middleware(limits)],
        client_max_size=cfg.limits.max_request_body_bytes,
    )
    app[CONFIG] = cfg
    app[LIMITS] = limits
    app[METRICS] = Metrics()
    app[STARTUP_OPTIONS] = {"skip_listeners": skip_listeners, "hashserv_sock": hashserv_sock,
                            "housekeeping": housekeeping}
    app.on_startup.append(_startup)
    app.on_response_prepare.append(on_response_prepare)
    app.on_cleanup.append(_cleanup)

    def services() -> Services:
        return app[SERVICES]

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    ready_probes: dict[str, asyncio.Future] = {}

    async def readyz(request: web.Request) -> web.Response:
        """200 when the database and the store both answer a real round trip now, else 503 with
        one line saying which does not (and why). Both probes run at once, each bounded by
        READY_TIMEOUT_S, so the answer comes within about that long even when a backend hangs.
        /healthz is about this process only; /readyz is what a load balancer should check."""
        svc = services()

        async def probe(what: str, check) -> str | None:
            # Concurrent /readyz requests share one probe per backend, so a hung backend holds
            # one S3 thread or database connection, not one per load-balancer poll.
            running = ready_probes.get(what)
            if running is None or running.done():
                running = ready_probes[what] = asyncio.ensure_future(check())
                running.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait_for(asyncio.shield(running), READY_TIMEOUT_S)
            except TimeoutError:
                return f"{what}: no answer within {READY_TIMEOUT_S:g}s"
            except Exception as e:  # the point is to report any fault as not-ready
                text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                return f"{what}: {text}"
            return None

        problems = [p for p in await asyncio.gather(
            probe("database", svc.db.get_current_gc_mark), probe("storage", svc.store.check)) if p]
        if problems:
            return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n",
                                headers={"Retry-After": "1"})
        return web.Response(text="ready\n")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=app[METRICS].render(), headers={"Content-Type": Metrics.content_type})

    async def websocket(request: web.Request) -> web.StreamResponse:
        if not cfg.hashserv.websocket:
            raise web.HTTPNotFound(text="websocket hashserv disabled\n")
        return await services().hashserv.handle_websocket(request)

    async def objects(request: web.Request) -> web.StreamResponse:
        method = request.method
        if method == "HEAD" or (method == "GET" and "Upgrade" not in request.headers):
            return await services().mirror.get_or_head(request)
        if method == "GET":
            if request.headers["Upgrade"].lower() == "websocket":
                return await websocket(request)
            return await services().mirror.get_or_head(request)
        if method == "PUT":
            return await services().uploads.put(request)
        if method == "DELETE":
            return await services().uploads.delete(request)
        raise web.HTTPMethodNotAllowed(method, ["GET", "HEAD", "PUT", "DELETE"])

    async def expect_continue(request: web.Request) -> web.Response | None:
        """Answer `Expect: 100-continue` only after the upload's permission and size checks, so
        curl/wget learn of a 401/403/413 before they send a large body."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="unknown Expect value\n")
        if request.method == "PUT":
            # aiohttp runs the expect handler before the middlewares: map errors here the same way
            try:
                await require(request, services().auth, "@upload")
            except web.HTTPException:
                raise
            except Exception as e:
                mapped = response_for(e, new_request_id())
                if mapped is None:
                    raise
                return mapped
            length = request.content_length
            if length is not None and length > cfg.limits.max_upload_bytes:
                raise web.HTTPRequestEntityTooLarge(cfg.limits.max_upload_bytes, length,
                                                    text="object larger than the upload limit\n")
        if request.version >= (1, 1) and request.transport is not None:
            request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def equiv_get(request: web.Request) -> web.Response:
        return await services().equiv.get(request)

    async def equiv_post(request: web.Request) -> web.Response:
        return await services().equiv.post(request)

    async def ui(request: web.Request) -> web.StreamResponse:
        return await services().dashboard.handle(request)

    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/equivalent", equiv_get)
    r.add_post("/v1/equivalent", equiv_post)
    r.add_get(STATS_PATH, StatsEndpoint().handle)
    r.add_get("/ws", websocket)
    r.add_get("/ui", ui)
    r.add_get("/ui/{file:.*}", ui)
    r.add_route("*", cfg.server.mirror_prefix + "{tail:.*}", objects, expect_handler=expect_continue)
    app[ROUTE_FACES] = {objects: "object", equiv_get: "equivalent", equiv_post: "equivalent",
                        websocket: "ws"}
    return app


def access_logger_class(cfg: Config) -> type[AbstractAccessLogger]:
    return AccessLogger.configure(cfg)


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
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
    # The access log has its own switch: quiet logs (log_level WARNING) still log requests.
    access_log.setLevel(logging.INFO if cfg.server.access_log else logging.WARNING)
