"""The access log: one line per request with the body bytes written to the client, the client's
address and the user, in the text and the JSON format; the bytes counter says the same."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import struct
import time

import pytest

from tests.corpus import make_corpus
from tests.s3server import TEST_ENV, MotoServer
from tests.service import Service
from tests.test_mirror import quote, upload_tree

ADMIN = ("logadmin", "log-admin-token-0123456789")
AUTH = {"Authorization": "Basic " + base64.b64encode(":".join(ADMIN).encode()).decode()}
BIG = "ab/cd/big.bin"
BIG_SIZE = 16 << 20  # far more than the socket buffers hold
FORWARDED = "203.0.113.9, 10.1.2.3"
TEXT_RE = re.compile(r"^(\S+) access (\S+) (\S+) (\S+) (\S+) (\d+) (\d+) (\S+) (\S+)ms rid=(\S+)$")


def parse_line(line: str, fmt: str) -> dict | None:
    if fmt == "json":
        if not line.startswith("{"):
            return None
        rec = json.loads(line)
        return rec if "rid" in rec and "bytes" in rec else None
    m = TEXT_RE.match(line)
    if m is None:
        return None
    keys = ("time", "client", "user", "method", "path", "status", "bytes", "source", "ms", "rid")
    rec = dict(zip(keys, m.groups(), strict=True))
    rec["status"], rec["bytes"], rec["ms"] = int(rec["status"]), int(rec["bytes"]), float(rec["ms"])
    return rec


def logged(svc: Service, fmt: str, rid: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        found = [rec for line in svc.read_log().splitlines()
                 if (rec := parse_line(line, fmt)) is not None and rec["rid"] == rid]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, (rid, svc.read_log()[-3000:])
    return found[0]


_counter = iter(range(10**9))


def call(svc: Service, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request on its own connection -> (status, body, request id)."""
    rid = f"t{time.monotonic_ns()}-{next(_counter)}"
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={**(headers or {}), "X-Request-Id": rid})
        resp = conn.getresponse()
        return resp.status, resp.read(), rid
    finally:
        conn.close()


def bytes_counter(svc: Service) -> float:
    _, body, _ = call(svc, "GET", "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("sstate_proxy_object_bytes_sent_total"))


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    server.start()
    server.create_bucket("sstate")
    yield server
    server.close()


@pytest.fixture(scope="module", params=["text", "json"])
def services(request, tmp_path_factory, moto):
    """A local-disk service and an S3 one, logging in one format. The JSON ones trust the
    loopback as a reverse proxy, so their client is the first X-Forwarded-For address."""
    fmt = request.param
    work = tmp_path_factory.mktemp(f"log-{fmt}")
    server = {"log_format": fmt, "log_level": "INFO"}
    if fmt == "json":
        server["trusted_proxies"] = ["127.0.0.0/8"]
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    local = Service(work / "local", env=env, config={"server": server}, args=["--anon-perms", "@read,@report"])
    corpus = make_corpus(local.storage, n=30, seed=11)
    prefix = f"log-{fmt}"
    remote = Service(work / "s3", env={**TEST_ENV, **env}, config={
        "server": server, "storage": {"backend": "s3"},
        "storage.s3": {"bucket": "sstate", "prefix": prefix, "endpoint_url": moto.endpoint_url,
                       "region": "us-east-1", "timeout_s": 5.0}})
    upload_tree(moto, "sstate", prefix, local.storage)
    (local.storage / BIG).parent.mkdir(parents=True, exist_ok=True)
    (local.storage / BIG).write_bytes(os.urandom(BIG_SIZE))  # local only
    local.start()
    remote.start()
    d = corpus.details[0]
    body = json.dumps({"taskhash": d.taskhash, "method": d.method, "outhash": d.outhash,
                       "unihash": d.unihash}).encode()
    status, _, _ = call(local, "POST", "/v1/equivalent", {"Content-Type": "application/json"}, body)
    assert status == 200
    try:
        yield fmt, local, remote, corpus
    finally:
        local.stop()
        remote.stop()


def expected_client(fmt: str, forwarded: bool) -> str:
    return "203.0.113.9" if fmt == "json" and forwarded else "127.0.0.1"


def test_gets_heads_and_ranges(services):
    fmt, local, _, corpus = services
    key = corpus.objects[0]
    size = corpus.sizes[key]
    before = bytes_counter(local)
    cases = [  # (method, headers, status, body bytes)
        ("GET", {}, 200, size),
        ("GET", {"Range": "bytes=10-99"}, 206, 90),
        ("GET", {"Range": f"bytes=-{size + 5}"}, 206, size),
        ("HEAD", {}, 200, 0),
        ("HEAD", {"Range": "bytes=0-9"}, 206, 0),
        ("GET", AUTH, 200, size),
        ("GET", {"X-Forwarded-For": FORWARDED}, 200, size),
    ]
    objects_sent = 0
    for method, headers, status, nbytes in cases:
        got_status, body, rid = call(local, method, quote(key), headers)
        assert got_status == status
        assert len(body) == nbytes
        rec = logged(local, fmt, rid)
        assert (rec["method"], rec["status"], rec["bytes"], rec["source"]) == (method, status, nbytes, "hit")
        assert rec["client"] == expected_client(fmt, "X-Forwarded-For" in headers)
        assert rec["user"] == (ADMIN[0] if headers is AUTH else "-")
        assert rec["path"] == quote(key)
        objects_sent += nbytes
    assert bytes_counter(local) - before == objects_sent
    # not modified, a miss and a plain text answer: their bodies, as sent
    etag = http_etag(local, key)
    status, body, rid = call(local, "GET", quote(key), {"If-None-Match": etag})
    assert status == 304 and logged(local, fmt, rid)["bytes"] == 0
    status, body, rid = call(local, "GET", quote(corpus.absent[0]))
    assert status == 404 and logged(local, fmt, rid)["bytes"] == len(body) > 0
    status, body, rid = call(local, "GET", "/healthz")
    assert logged(local, fmt, rid)["bytes"] == len(body) == 3


def http_etag(svc: Service, key: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("HEAD", quote(key))
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.getheader("ETag")


def test_rewritten_get(services):
    fmt, local, _, corpus = services
    d = corpus.details[0]
    status, body, rid = call(local, "GET", quote(d.taskhash_key), {"X-Forwarded-For": FORWARDED})
    assert status == 200 and body == corpus.read(d.unihash_key)
    rec = logged(local, fmt, rid)
    assert (rec["status"], rec["bytes"], rec["source"]) == (200, len(body), "equivalent")
    assert rec["client"] == expected_client(fmt, True) and rec["user"] == "-"


def test_put_with_credentials(services):
    fmt, local, _, _ = services
    key = f"ab/cd/sstate:new-{fmt}:core2-64-poky-linux:1.0:r0:core2-64:14:abcd{'1' * 60}_package.tar.zst"
    status, body, rid = call(local, "PUT", quote(key), {**AUTH, "Content-Type": "application/octet-stream"},
                             b"z" * 5000)
    assert status == 201
    rec = logged(local, fmt, rid)
    assert (rec["method"], rec["status"], rec["bytes"], rec["user"]) == ("PUT", 201, len(body), ADMIN[0])
    assert rec["source"] == "upload" and rec["client"] == "127.0.0.1"
    status, body, rid = call(local, "PUT", quote(key), {"Authorization": "Basic " + base64.b64encode(b"logadmin:wrong").decode()},
                             b"z" * 10)
    assert status == 401
    rec = logged(local, fmt, rid)
    assert rec["user"] == "-" and rec["bytes"] == len(body)


def test_s3_streamed_get(services):
    fmt, _, remote, corpus = services
    key = max(corpus.objects, key=lambda k: corpus.sizes[k])
    before = bytes_counter(remote)
    for headers, status, nbytes in [({}, 200, corpus.sizes[key]), ({"Range": "bytes=1-1000"}, 206, 1000),
                                    (AUTH, 200, corpus.sizes[key])]:
        got, body, rid = call(remote, "GET", quote(key), headers)
        assert got == status and len(body) == nbytes
        rec = logged(remote, fmt, rid)
        assert (rec["status"], rec["bytes"], rec["source"]) == (status, nbytes, "hit")
        assert rec["user"] == (ADMIN[0] if headers is AUTH else "-") and rec["client"] == "127.0.0.1"
    assert bytes_counter(remote) - before == 2 * corpus.sizes[key] + 1000


def test_client_that_leaves_after_64_kib(services):
    fmt, local, _, _ = services
    before = bytes_counter(local)
    rid = f"gone-{time.monotonic_ns()}"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", local.port))
    s.sendall(f"GET /{BIG} HTTP/1.1\r\nHost: x\r\nX-Request-Id: {rid}\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    received = len(got.split(b"\r\n\r\n", 1)[1])
    while received < 64 * 1024:
        received += len(s.recv(65536))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST: what the server had not written yet is never sent
    rec = logged(local, fmt, rid)
    assert rec["method"] == "GET" and rec["source"] == "hit"
    assert 64 * 1024 <= rec["bytes"] < BIG_SIZE, rec
    assert bytes_counter(local) - before == rec["bytes"]
    # and it goes on serving
    status, body, _ = call(local, "HEAD", f"/{BIG}")
    assert status == 200
