"""The seed's HTTP equivalence API (the 2018 RFC "sstate: Implement hash equivalence sstate").

    GET  /v1/equivalent?method=M&taskhash=T   -> {"taskhash","method","unihash","depid"} | null
    POST /v1/equivalent  {taskhash, method, outhash, depid|unihash, owner?, PN?, PV?, PR?, task?,
                          outhash_siginfo?}   -> the same shape

``depid`` is the old name of ``unihash``; both are accepted and both are returned. Lookups and
reports are the Reporter's (proxy.reports), the one algorithm OEHASHEQUIV uses too, upstream
hashserv included.
"""

from __future__ import annotations

import json

from aiohttp import web

from proxy.auth import Auth
from proxy.http_auth import require
from proxy.limits import BodyStalled, read_chunk, request_timeout
from proxy.metrics import Metrics
from proxy.reports import Reporter

OPTIONAL_TEXT = ("owner", "PN", "PV", "PR", "task", "outhash_siginfo")


def _answer(row: dict | None) -> web.Response:
    if row is None:
        return web.json_response(None)
    return web.json_response(
        {"taskhash": row["taskhash"], "method": row["method"], "unihash": row["unihash"],
         "depid": row["unihash"]}
    )


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=reason + "\n")


def _text_field(data: dict, key: str, *, required: bool = True, max_len: int = 256) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise _bad(f"missing field {key!r}")
        return None
    if not isinstance(value, str) or (required and not value):
        raise _bad(f"field {key!r} must be a non-empty string")
    if len(value) > max_len:
        raise _bad(f"field {key!r} is longer than {max_len} characters")
    return value


class EquivalenceAPI:
    def __init__(self, reporter: Reporter, auth: Auth, metrics: Metrics, max_body: int,
                 body_timeout_s: float = 60.0) -> None:
        self.reporter = reporter
        self.body_timeout_s = body_timeout_s
        self.auth = auth
        self.metrics = metrics
        self.max_body = max_body

    async def get(self, request: web.Request) -> web.Response:
        await require(request, self.auth, "@read")
        self.metrics.equivalence("http", "get")
        q = request.query
        method = _text_field(q, "method")
        taskhash = _text_field(q, "taskhash")
        return _answer(await self.reporter.get(method, taskhash))

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, which may arrive in several pieces, bounded in size and in stalls."""
        body = bytearray()
        while True:
            try:
                chunk = await read_chunk(request.content, self.max_body + 1 - len(body), self.body_timeout_s)
            except BodyStalled as e:
                raise request_timeout(f"report body stalled ({e})") from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self.max_body:
                raise web.HTTPRequestEntityTooLarge(self.max_body, len(body), text="report body too large\n")

    async def post(self, request: web.Request) -> web.Response:
        ident = await require(request, self.auth, "@read")
        self.metrics.equivalence("http", "report")
        if request.content_length is not None and request.content_length > self.max_body:
            raise web.HTTPRequestEntityTooLarge(self.max_body, request.content_length,
                                                text="report body too large\n")
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("body is not valid JSON") from None
        except RecursionError:  # nesting deeper than the parser's stack: a 400, not a 500
            raise _bad("body is nested too deeply") from None
        if not isinstance(data, dict):
            raise _bad("body must be a JSON object")
        row = {
            "taskhash": _text_field(data, "taskhash"),
            "method": _text_field(data, "method"),
            "outhash": _text_field(data, "outhash"),
        }
        unihash = data.get("unihash", data.get("depid"))
        if unihash is None:
            raise _bad("missing field 'depid' (or 'unihash')")
        if "unihash" in data and "depid" in data and data["unihash"] != data["depid"]:
            raise _bad("'depid' and 'unihash' differ")
        for key in OPTIONAL_TEXT:
            limit = self.max_body if key == "outhash_siginfo" else 256
            value = _text_field(data, key, required=False, max_len=limit)
            if value is not None:
                row[key] = value
        # a ReportError (bad unihash) is a 400 by the error middleware
        return _answer(await self.reporter.report(row, unihash, ident))
