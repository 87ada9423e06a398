"""S3-only behaviour of the mirror, against a moto server over HTTP: presigned redirects and
outages. (The shared mirror suite in test_mirror.py runs on S3 too.)"""

from __future__ import annotations

import base64
import http.client
import socket
import subprocess
import time
from urllib.parse import quote

import pytest

from tests.s3server import MotoServer
from tests.test_mirror import s3_service

KEY = "3f/a1/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:3fa1" + "5" * 60 + "_package.tar.zst"
DATA = bytes(range(256)) * 4096  # 1 MiB


def call(svc, method: str, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


@pytest.fixture
def moto():
    server = MotoServer()
    server.start()
    server.create_bucket("sstate")
    server.client().put_object(Bucket="sstate", Key="p/" + KEY, Body=DATA)
    yield server
    server.close()


def test_presigned_redirect_for_anonymous_get_only(moto, tmp_path):
    svc = s3_service(tmp_path / "svc", moto, "sstate", "p", redirect_get=True, presign_ttl_s=60)
    svc.env.update(SSTATE_PROXY_ADMIN_USER="admin", SSTATE_PROXY_ADMIN_TOKEN="secret-token")
    with svc:
        path = "/" + quote(KEY)
        resp, _ = call(svc, "GET", path)
        assert resp.status == 307 and resp.getheader("Location").startswith(moto.endpoint_url)
        head, _ = call(svc, "HEAD", path)  # never a redirect for HEAD
        assert head.status == 200 and int(head.getheader("Content-Length")) == len(DATA)
        creds = base64.b64encode(b"admin:secret-token").decode()
        resp, body = call(svc, "GET", path, {"Authorization": f"Basic {creds}"})
        assert resp.status == 200 and body == DATA  # credentials are never sent on to S3
        out = tmp_path / "download"
        subprocess.run(["wget", "-q", "-O", str(out), svc.url + path], check=True, timeout=60)
        assert out.read_bytes() == DATA


def test_outage_gives_503_then_recovers_without_restart(moto, tmp_path):
    svc = s3_service(tmp_path / "svc", moto, "sstate", "p", timeout_s=1.0)
    with svc:
        path = "/" + quote(KEY)
        assert call(svc, "GET", path)[0].status == 200
        missing = "/" + quote(KEY.replace("3fa1", "3fa2"))
        assert call(svc, "HEAD", missing)[0].status == 404  # a plain miss is a 404

        moto.pause()  # S3 hangs: every call times out
        try:
            started = time.monotonic()
            resp, _ = call(svc, "GET", path)
            assert resp.status == 503 and resp.getheader("Retry-After")
            assert time.monotonic() - started < 5
            resp, _ = call(svc, "HEAD", "/" + quote(KEY.replace("3fa1", "3fa3")))
            assert resp.status == 503  # a miss cannot be confirmed: not a 404 that lies
        finally:
            moto.resume()
        resp, body = call(svc, "GET", path)
        assert resp.status == 200 and body == DATA

        moto.stop()  # S3 unreachable: connections refused
        resp, _ = call(svc, "GET", path)
        assert resp.status == 503 and resp.getheader("Retry-After")
        moto.start()  # moto forgets its objects on restart: put ours back
        moto.client().put_object(Bucket="sstate", Key="p/" + KEY, Body=DATA)
        resp, body = call(svc, "GET", path)
        assert resp.status == 200 and body == DATA
        assert call(svc, "GET", "/readyz")[0].status == 200


def test_a_stream_that_fails_mid_body_cuts_the_connection(moto, tmp_path):
    """S3 dies while an object is on its way: the client must see a short body on a closed
    connection, never an error response written into the body (which, with the Content-Length
    already sent, a client could store as the object)."""
    big_key = KEY.replace("3fa1", "3fb1")
    big = bytes(range(251)) * (32 * 1024 * 1024 // 251)  # ~32 MiB, more than any socket buffers
    moto.client().put_object(Bucket="sstate", Key="p/" + big_key, Body=big)
    svc = s3_service(tmp_path / "svc", moto, "sstate", "p", timeout_s=2.0)
    with svc:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as s:
            s.sendall(f"GET /{quote(big_key)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data or len(data) < 256 * 1024:  # the head and some body
                data += s.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(big)}".encode() in head
            moto.stop()  # the source dies while the proxy waits for the client to read on
            while chunk := s.recv(1 << 20):
                body += chunk
        assert len(body) < len(big)  # short: the client knows the download failed
        assert big.startswith(body)  # and what it got is the object's own bytes, nothing else
        assert b"HTTP/1.1" not in body
        deadline = time.monotonic() + 5
        while "response failed after it started" not in svc.read_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "response failed after it started" in svc.read_log()
        assert call(svc, "GET", "/healthz")[0].status == 200  # the service is fine
