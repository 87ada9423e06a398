"""The one place where exceptions become HTTP responses.

Handlers and the parts below them raise: aiohttp's ``web.HTTPException`` for answers they chose
(404, 401, ...), the storage and report exceptions for what went wrong. ``answer_for``, called by
the app's one middleware (``proxy.app``), turns the latter into responses with a fixed status
per exception class and logs real faults with the request's id (``request_id``: the client's
``X-Request-Id`` when it is sane, else a new one).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.reports import ReportError
from proxy.request_keys import RID_KEY, STARTED_KEY
from storage import DigestMismatch, InvalidKey, NoSpace, StoreError, StoreUnavailable, TooLarge
from storage.equivalence import DatabaseFull, DatabaseUnavailable

log = logging.getLogger("sstate_proxy")

RETRY_AFTER_S = "5"
RID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# (exception class, status, text prefix, retry later?) - the first match wins, so subclasses
# come before their bases (StoreUnavailable before StoreError).
MAPPING: tuple[tuple[type[Exception], int, str, bool], ...] = (
    (StoreUnavailable, 503, "storage unavailable, retry later", True),
    # 507: the request was fine, the cache's disk is full; nothing was stored, reads still work.
    (NoSpace, 507, "insufficient storage: the cache's disk is full, nothing was stored", False),
    (DatabaseFull, 507, "insufficient storage: the database's disk is full, nothing was stored", False),
    (DatabaseUnavailable, 503, "database unavailable, retry later", True),
    (InvalidKey, 400, "bad key", False),
    (DigestMismatch, 400, "upload refused", False),
    (TooLarge, 413, "too large", False),
    (ReportError, 400, "bad report", False),
    (StoreError, 500, "storage error", False),
)



class MalformedRequestFilter(logging.Filter):
    """For aiohttp's server logger: a request aiohttp cannot parse (bad request line or header,
    line too long, ...) is logged there as an ERROR with a traceback, though aiohttp has already
    answered 400 and nothing is wrong with the service. A hostile client could fill the log with
    them; keep one INFO line (without the offending bytes) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.INFO, "INFO"
        first_line = str(exc.message).split("\n", 1)[0][:120]
        record.msg, record.args = "malformed request from %s: %s %s", (peer, exc.code, first_line)
        record.exc_info, record.exc_text = None, None
        return True


_rid_prefix = ""
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per request across processes and restarts, and far cheaper than uuid4."""
    global _rid_prefix
    if not _rid_prefix:
        _rid_prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
    return f"{_rid_prefix}-{next(_rid_counter):x}"


def response_for(e: Exception, rid: str) -> web.Response | None:
    """The answer for a mapped exception, or None if ``e`` is not one of ours."""
    for cls, status, prefix, retry in MAPPING:
        if isinstance(e, cls):
            headers = {"Retry-After": RETRY_AFTER_S} if retry else None
            if status >= 500:
                return web.Response(status=status, headers=headers,
                                    text=f"{prefix} (request id {rid})\n")
            return web.Response(status=status, headers=headers, text=f"{prefix}: {e}\n")
    return None


def request_id(request: web.BaseRequest) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is sane, else a new one."""
    rid = request.headers.get("X-Request-Id", "")
    if not rid or not RID_RE.fullmatch(rid):
        rid = new_request_id()
    return rid


def answer_for(request: web.BaseRequest, rid: str, e: Exception) -> web.StreamResponse:
    """The response for an exception a handler raised (the app's middleware calls this): an
    ``HTTPException`` (an answer a handler chose) is raised again for aiohttp to send; ours get
    their mapped status; anything else is a 500 with the request id, logged."""
    if STARTED_KEY in request:
        # The head (and maybe part of the body) is out: another response now would be
        # written into the body, and with the declared Content-Length a client could take
        # the mix for the object. Cut the connection: the client sees a short body (wget
        # resumes with Range). The response returned is only for the access log; aiohttp
        # cannot write it to the closed connection.
        quiet = isinstance(e, (ConnectionError, web.HTTPException, StoreError))
        log.warning("response failed after it started rid=%s %s %s: %s", rid, request.method,
                    request.path, e, exc_info=not quiet)
        if request.transport is not None:
            request.transport.abort()
        status = e.status if isinstance(e, web.HTTPException) else 500
        return web.Response(status=status)
    if isinstance(e, web.HTTPException):
        raise e
    mapped = response_for(e, rid)
    if mapped is None:
        log.error("internal error rid=%s %s %s", rid, request.method, request.path, exc_info=e)
        return web.Response(status=500, text=f"internal error, request id {rid}\n")
    if mapped.status >= 500:
        log.warning("rid=%s %s %s: %s", rid, request.method, request.path, e)
    return mapped


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's signal, sent just before a response head goes out: from here on an exception
    cannot become an answer of its own (see answer_for)."""
    request[STARTED_KEY] = True
    rid = request.get(RID_KEY)
    if rid:
        response.headers["X-Request-Id"] = rid
