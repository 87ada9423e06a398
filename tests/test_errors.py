"""proxy.errors: the one mapping from exceptions to HTTP answers (through the app's middleware),
on a real loopback socket."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from proxy.app import request_middleware
from proxy.errors import on_response_prepare
from proxy.limits import ConnectionLimits
from proxy.reports import ReportError
from storage import DigestMismatch, InvalidKey, StoreError, StoreUnavailable, TooLarge
from storage.equivalence import DatabaseUnavailable

CASES = {
    "store-unavailable": (StoreUnavailable("S3 down"), 503, True),
    "db-unavailable": (DatabaseUnavailable("locked"), 503, True),
    "invalid-key": (InvalidKey("../x"), 400, False),
    "digest": (DigestMismatch("sha256 differs"), 400, False),
    "too-large": (TooLarge("5 GiB"), 413, False),
    "report": (ReportError("Invalid unihash"), 400, False),
    "store-error": (StoreError("disk on fire"), 500, False),
    "bug": (KeyError("oops"), 500, False),
}


def make_app() -> web.Application:
    app = web.Application(middlewares=[request_middleware(ConnectionLimits(100, 10.0))])
    app.on_response_prepare.append(on_response_prepare)

    async def fail(request: web.Request) -> web.StreamResponse:
        raise CASES[request.match_info["case"]][0]

    async def fail_mid_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        raise StoreUnavailable("S3 stream ended 900 bytes early")

    async def chosen(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound(text="no such object\n")

    app.router.add_get("/fail/{case}", fail)
    app.router.add_get("/mid-body", fail_mid_body)
    app.router.add_get("/chosen", chosen)
    return app


@pytest.mark.parametrize("case", list(CASES))
async def test_each_exception_has_its_status(aiohttp_client, case, caplog):
    _, status, retry = CASES[case]
    client = await aiohttp_client(make_app())
    resp = await client.get(f"/fail/{case}", headers={"X-Request-Id": f"rid-{case}"})
    assert resp.status == status
    assert (resp.headers.get("Retry-After") == "5") is retry
    assert resp.headers["X-Request-Id"] == f"rid-{case}"
    text = await resp.text()
    if status >= 500:
        assert f"rid-{case}" in text and f"rid=rid-{case}" in caplog.text
        assert "disk on fire" not in text  # faults are logged, not shown
    else:
        assert str(CASES[case][0]) in text


async def test_handler_answers_pass_through_and_ids_are_made(aiohttp_client):
    client = await aiohttp_client(make_app())
    resp = await client.get("/chosen", headers={"X-Request-Id": "bad id with spaces"})
    assert resp.status == 404 and await resp.text() == "no such object\n"
    rid = resp.headers["X-Request-Id"]
    assert rid != "bad id with spaces" and rid
    resp2 = await client.get("/chosen")
    assert resp2.headers["X-Request-Id"] != rid


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes (blocking: run it in a thread)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


async def test_a_failure_after_the_head_cuts_the_connection(aiohttp_server, caplog):
    server = await aiohttp_server(make_app())
    got = await asyncio.to_thread(exchange, server.port,
                                  b"GET /mid-body HTTP/1.1\r\nHost: x\r\nX-Request-Id: cut-1\r\n\r\n"
                                  b"GET /chosen HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1000" in head
    assert body == b"x" * 100  # no error text mixed into the body, no second answer
    assert "response failed after it started rid=cut-1 GET /mid-body" in caplog.text
