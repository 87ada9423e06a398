"""The HTTP path as a raw client sees it: keep-alive, pipelining, HTTP/1.0, ranges and validators
on one connection, malformed requests, websocket upgrade, TLS, a client that leaves mid-body, a
slow reader, a graceful stop with a transfer in flight."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from urllib.parse import quote

import pytest

from tests.corpus import make_corpus
from tests.service import Service

ADMIN = ("pathadmin", "path-admin-token-0123456789")
ADMIN_AUTH = b"Authorization: Basic " + base64.b64encode(":".join(ADMIN).encode()) + b"\r\n"
H = "abcd" + "0" * 60
EMPTY = f"ab/cd/sstate:empty:core2-64-poky-linux:1.0:r0:core2-64:14:{H[:-1]}e_package.tar.zst"
LARGE = f"ab/cd/sstate:large:core2-64-poky-linux:1.0:r0:core2-64:14:{H[:-1]}f_package.tar.zst"
LARGE_SIZE = 12 << 20  # more than the socket buffers take at once


def q(key: str) -> bytes:
    return ("/" + quote(key)).encode()


def req(method: bytes, target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return method + b" " + target + b" HTTP/" + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def head(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return req(b"HEAD", target, extra, version)


def get(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return req(b"GET", target, extra, version)


def read_responses(s: socket.socket, sent: bytes, n: int) -> list[tuple[str, dict, bytes]]:
    """``n`` responses to the requests in ``sent`` -> [(status line, headers, body)]."""
    methods = re.findall(rb"(?:^|\n)(HEAD|GET|PUT|POST|DELETE) \S+ HTTP/", sent)
    buf = b""
    out = []
    for i in range(n):
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses: {buf!r}")
            buf += chunk
        head_bytes, buf = buf.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        body = b""
        method = methods[i] if i < len(methods) else b"HEAD"
        length = int(headers.get("content-length", "0"))
        status = lines[0].split(" ")[1]
        if method != b"HEAD" and status not in ("304", "101"):
            while len(buf) < length:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("body cut short")
                buf += chunk
            body, buf = buf[:length], buf[length:]
        out.append((lines[0], headers, body))
    return out


def exchange(port: int, data: bytes, n: int, timeout: float = 10.0) -> list[tuple[str, dict, bytes]]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_responses(s, data, n)


def statuses(responses) -> list[str]:
    return [r[0].split(" ")[1] for r in responses]


def closed_after(port: int, data: bytes, n: int) -> bool:
    """True if the server closes the connection after answering ``n`` requests."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        read_responses(s, data, n)
        s.settimeout(2)
        try:
            return s.recv(1) == b""
        except TimeoutError:
            return False


def write_special_objects(root) -> None:
    (root / EMPTY).parent.mkdir(parents=True, exist_ok=True)
    (root / EMPTY).write_bytes(b"")
    (root / LARGE).write_bytes(os.urandom(LARGE_SIZE))


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    work = tmp_path_factory.mktemp("http-path")
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    service = Service(work / "svc", env=env, config={"server": {"log_level": "INFO"}},
                      args=["--anon-perms", "@read,@report"])
    corpus = make_corpus(service.storage, n=60, seed=7)
    write_special_objects(service.storage)
    service.start()
    try:
        yield service, corpus
    finally:
        service.stop()


@pytest.mark.parametrize("method", [b"HEAD", b"GET"])
def test_http10_and_keep_alive(svc, method):
    service, corpus = svc
    t = q(corpus.objects[1])
    port = service.port
    assert closed_after(port, req(method, t, b"", b"1.0"), 1)
    assert not closed_after(port, req(method, t, b"Connection: keep-alive\r\n", b"1.0"), 1)
    assert closed_after(port, req(method, t, b"Connection: close\r\n"), 1)
    assert not closed_after(port, req(method, t), 1)
    # pipelined, the last one closes: everything before it answered, in order
    assert closed_after(port, req(method, t) * 3 + req(method, b"/nope", b"Connection: close\r\n"), 4)


def test_pipelined_heads_gets_and_put_on_one_connection(svc):
    service, corpus = svc
    a, b = corpus.objects[2], corpus.objects[3]
    ta, tb, miss = q(a), q(b), q(corpus.absent[0])
    data_a = (service.storage / a).read_bytes()
    out = exchange(service.port, head(ta) * 5 + head(miss) + head(tb) + head(ta, b"Connection: close\r\n"), 8)
    assert statuses(out) == ["200"] * 5 + ["404", "200", "200"]
    assert out[0][1]["content-length"] == str(len(data_a)) and out[0][1]["x-sstate-source"] == "hit"
    out = exchange(service.port, head(tb) + get(ta) + get(ta, b"Range: bytes=3-10\r\n")
                   + get(ta, b"If-None-Match: " + out[0][1]["etag"].encode() + b"\r\n")
                   + get(q(EMPTY)) + get(q(LARGE)) + head(tb, b"Connection: close\r\n"), 7)
    assert statuses(out) == ["200", "200", "206", "304", "200", "200", "200"]
    assert out[1][2] == data_a and out[2][2] == data_a[3:11] and out[3][2] == b""
    assert out[4][2] == b"" and out[4][1]["content-length"] == "0"
    assert out[5][2] == (service.storage / LARGE).read_bytes()
    # anonymous lacks @upload: 401, and the connection goes on after the body
    put = b"PUT /ab/cd/new.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 998 + b"\r\n"
    out = exchange(service.port, head(ta) + put + head(ta, b"Connection: close\r\n"), 3)
    assert statuses(out) == ["200", "401", "200"]
    # the same requests sent one byte at a time
    data = head(ta) + get(ta) + head(tb, b"Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        for i in range(len(data)):
            s.sendall(data[i:i + 1])
        out = read_responses(s, data, 3)
    assert statuses(out) == ["200", "200", "200"] and out[1][2] == data_a


def test_head_and_get_answer_alike(svc):
    """HEAD == GET minus the body, for hits, rewritten paths, ranges and validators."""
    service, corpus = svc
    key = corpus.objects[4]
    variants = [b"", b"Range: bytes=0-0\r\n", b"Range: bytes=99999999-\r\n", b"If-Match: \"x\"\r\n",
                b"If-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT\r\n"]
    for target in (q(key), q(corpus.absent[1]), b"/a/../b"):
        for extra in variants:
            (hs, hh, hb), = exchange(service.port, head(target, extra + b"Connection: close\r\n"), 1)
            (gs, gh, _), = exchange(service.port, get(target, extra + b"Connection: close\r\n"), 1)
            assert hs == gs and hb == b"", (target, extra)
            names = ["etag", "last-modified", "content-range", "x-sstate-source"]
            if gs.split(" ")[1] in ("200", "206"):
                names.append("content-length")
            for name in names:
                assert hh.get(name) == gh.get(name), (target, extra, name)


def test_malformed_requests_get_400_and_the_service_goes_on(svc):
    service, corpus = svc
    t = q(corpus.objects[0])
    close = b"Connection: close\r\n"
    cases = [
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n" + close + b"\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n" + close + b"\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\nX: \x01\r\n" + close + b"\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: " + b"x" * 9000 + b"\r\n" + close + b"\r\n",
    ]
    for data in cases:
        (status, _, _), = exchange(service.port, data, 1)
        assert " 400 " in status, (data[:60], status)
    assert statuses(exchange(service.port, head(t, close), 1)) == ["200"]
    # 405 for a method the mirror does not know; 417 for an unknown Expect
    assert statuses(exchange(service.port, req(b"POST", t, b"Content-Length: 0\r\n" + close), 1)) == ["405"]
    assert statuses(exchange(service.port, req(b"PUT", t, b"Content-Length: 1\r\nExpect: x\r\n" + close), 1)) == ["417"]


def test_websocket_after_head(svc):
    service, corpus = svc
    t = q(corpus.objects[0])
    up = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall(head(t) + up)
        (st1, _, _), (st2, _, _) = read_responses(s, head(t) + b"HEAD /", 2)
        assert " 200 " in st1 and " 101 " in st2, (st1, st2)
        s.sendall(b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8")  # a masked close frame
        assert s.recv(2)[:1] == b"\x88"


@pytest.mark.parametrize("method", [b"HEAD", b"GET"])
def test_auth_on_one_connection(tmp_path, method):
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    service = Service(tmp_path / "svc", env=env, args=["--anon-perms", "@none"])
    corpus = make_corpus(service.storage, n=5, seed=3)
    with service:
        t = q(corpus.objects[0])
        wrong = b"Authorization: Basic " + base64.b64encode(b"pathadmin:nope") + b"\r\n"
        cases = [(b"", "401"), (ADMIN_AUTH, "200"), (wrong, "401"), (b"Authorization: Basic\r\n", "401"),
                 (ADMIN_AUTH + b"Range: bytes=0-0\r\n", "206")]
        data = b"".join(req(method, t, extra) for extra, _ in cases) + head(t, b"Connection: close\r\n")
        out = exchange(service.port, data, len(cases) + 1)
        assert statuses(out) == [status for _, status in cases] + ["401"]
        assert out[0][1]["www-authenticate"].startswith("Basic")
        if method == b"GET":
            assert out[1][2] == (service.storage / corpus.objects[0]).read_bytes()


def test_client_gone_mid_body(svc):
    """The connection closes, the request is logged once, the service goes on serving."""
    service, _ = svc
    rid = f"gone-{time.monotonic_ns()}"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", service.port))
    s.sendall(get(q(LARGE), f"X-Request-Id: {rid}\r\n".encode()))
    got = 0
    while got < 200_000:
        got += len(s.recv(65536))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [ln for ln in service.read_log().splitlines() if f"rid={rid}" in ln and " access " in ln]
        if lines:
            break
        time.sleep(0.05)
    assert len(lines) == 1 and " GET " in lines[0] and " hit " in lines[0], lines
    assert f"response failed after it started rid={rid} GET" in service.read_log()
    assert statuses(exchange(service.port, head(q(LARGE), b"Connection: close\r\n"), 1)) == ["200"]


def test_a_get_behind_a_backlog_of_answers(svc):
    """A slow reader: thousands of pipelined HEAD answers back up before a GET whose body goes
    out with sendfile; everything arrives, in order."""
    service, _ = svc
    small = q("ab/cd/small.bin")
    (service.storage / "ab/cd/small.bin").write_bytes(b"s" * 100)
    data = head(small) * 3000 + get(q(LARGE)) + head(small, b"Connection: close\r\n")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", service.port))
    threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
    time.sleep(0.3)  # the answers back up
    try:
        out = read_responses(s, data, 3002)
    finally:
        s.close()
    assert statuses(out) == ["200"] * 3002
    assert out[3000][2] == (service.storage / LARGE).read_bytes()


def test_file_vanishing_before_the_body_is_a_404(svc):
    service, _ = svc
    path = service.storage / "ab/cd/vanishing.bin"
    path.write_bytes(b"v" * 1000)
    assert statuses(exchange(service.port, head(b"/ab/cd/vanishing.bin", b"Connection: close\r\n"), 1)) == ["200"]
    path.unlink()
    out = exchange(service.port, get(b"/ab/cd/vanishing.bin") + head(q(EMPTY), b"Connection: close\r\n"), 2)
    assert statuses(out) == ["404", "200"] and out[0][2] == b"no such object\n"


def test_tls(tmp_path):
    """Over TLS there is no sendfile: the body goes through plain reads, on the same connection."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    service = Service(tmp_path / "svc", config={"server": {"tls_cert": str(cert), "tls_key": str(key)}})
    write_special_objects(service.storage)
    corpus = make_corpus(service.storage, n=5, seed=5)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with service:
        t = q(corpus.objects[0])
        data = head(t) + get(t) + get(q(LARGE)) + get(t, b"Range: bytes=2-4\r\n") + head(t, b"Connection: close\r\n")
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(data)
                out = read_responses(s, data, 5)
        assert statuses(out) == ["200", "200", "200", "206", "200"]
        assert out[1][2] == (service.storage / corpus.objects[0]).read_bytes()
        assert out[2][2] == (service.storage / LARGE).read_bytes()
        assert out[3][2] == (service.storage / corpus.objects[0]).read_bytes()[2:5]


def test_graceful_stop_lets_a_transfer_in_flight_finish(tmp_path):
    service = Service(tmp_path / "svc")
    write_special_objects(service.storage)
    t = q(LARGE)
    service.start()
    try:
        idle = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        idle.sendall(head(t))
        read_responses(idle, head(t), 1)  # kept alive, nothing in flight
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(15)
        s.connect(("127.0.0.1", service.port))
        s.sendall(get(t))
        buf = s.recv(65536)
        service.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        while chunk := s.recv(1 << 20):
            buf += chunk
        s.close()
        head_bytes, body = buf.split(b"\r\n\r\n", 1)
        assert b" 200 " in head_bytes.split(b"\r\n")[0]
        assert body == (service.storage / LARGE).read_bytes()  # all of it, then the close
        idle.settimeout(5)
        assert idle.recv(1) == b""  # the idle connection was closed
        idle.close()
        assert service.proc.wait(15) == 0
        with socket.socket() as probe:  # the port is free again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", service.port))
    finally:
        service.stop()
