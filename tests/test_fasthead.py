"""The fast path (proxy/fasthead.py: plain HEADs and GETs) answers exactly like plain aiohttp.

Differential: the same corpus served twice, once with the fast path and once with
SSTATE_PROXY_NO_FASTHEAD=1; raw HTTP exchanges are compared byte for byte except for Date and
X-Request-Id (and the access-log lines except time, duration and request id).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.corpus import make_corpus
from tests.service import Service, free_port
from tests.test_mirror import BAD_TARGETS

ADMIN = ("fastadmin", "fast-admin-token-0123456789")
ADMIN_AUTH = b"Authorization: Basic " + base64.b64encode(":".join(ADMIN).encode()) + b"\r\n"
IGNORED = {"date", "x-request-id"}
METHODS = (b"HEAD", b"GET")
H = "abcd" + "0" * 60
EMPTY = f"ab/cd/sstate:empty:core2-64-poky-linux:1.0:r0:core2-64:14:{H[:-1]}e_package.tar.zst"
LARGE = f"ab/cd/sstate:large:core2-64-poky-linux:1.0:r0:core2-64:14:{H[:-1]}f_package.tar.zst"
LARGE_SIZE = 12 << 20  # more than a socket takes at once: the transfer goes on in a task


def q(key: str) -> str:
    return "/" + quote(key)


def exchange(port: int, data: bytes, n_responses: int, timeout: float = 10.0) -> list[tuple]:
    """Send ``data`` in one go; read ``n_responses`` responses (HEAD ones have no body unless a
    Content-Length response to a non-HEAD request). -> [(status line, [(name, value)], body)]."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_responses(s, data, n_responses)


def read_responses(s: socket.socket, sent: bytes, n: int) -> list[tuple]:
    methods = re.findall(rb"(?:^|\n)(HEAD|GET|PUT|POST|DELETE|head) ", sent)
    buf = b""
    out = []
    for i in range(n):
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses: {buf!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        body = b""
        method = methods[i] if i < len(methods) else b"HEAD"
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        if method != b"HEAD" and length and lines[0].split(" ")[1] not in ("304",):
            while len(buf) < int(length):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("body cut short")
                buf += chunk
            body, buf = buf[: int(length)], buf[int(length):]
        out.append((lines[0], headers, body))
    return out


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


def comparable(responses: list[tuple]) -> list[tuple]:
    return [(status, [(k, v) for k, v in headers if k.lower() not in IGNORED], body)
            for status, headers, body in responses]


def req(method: bytes, target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return method + b" " + target + b" HTTP/" + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


def head(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return req(b"HEAD", target, extra, version)


def get(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return req(b"GET", target, extra, version)


def write_special_objects(root) -> None:
    """An empty object and one larger than a socket buffer, next to the corpus."""
    (root / EMPTY).parent.mkdir(parents=True, exist_ok=True)
    (root / EMPTY).write_bytes(b"")
    (root / LARGE).write_bytes(os.urandom(LARGE_SIZE))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("fasthead")
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    root = work / "sstate-cache"  # one tree for both (the ETag has the inode in it)
    config = {"server": {"log_level": "INFO"}, "storage": {"path": str(root)}}
    args = ["--anon-perms", "@read,@report"]
    fast = Service(work / "fast", env=env, args=args, config=config)
    slow = Service(work / "slow", env={**env, "SSTATE_PROXY_NO_FASTHEAD": "1"}, args=args, config=config)
    corpus = make_corpus(root, n=120, seed=7)
    write_special_objects(root)
    fast.start()
    slow.start()
    try:
        for svc in (fast, slow):
            for d in corpus.details[:6]:
                for th in (d.unihash, d.taskhash):
                    body = json.dumps({"taskhash": th, "method": d.method, "outhash": d.outhash,
                                       "depid": th, "owner": "ci"}).encode()
                    req = (b"POST /v1/equivalent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                    (status, _, _), = exchange(svc.port, req, 1)
                    assert " 200 " in status, status
        yield fast, slow, corpus
    finally:
        fast.stop()
        slow.stop()


def same(pair, data: bytes, n: int = 1) -> list[tuple]:
    fast, slow, _ = pair
    a = comparable(exchange(fast.port, data, n))
    b = comparable(exchange(slow.port, data, n))
    assert a == b, (data, a, b)
    return a


@pytest.mark.parametrize("method", METHODS)
def test_plain_requests_hits_misses_rewritten(pair, method):
    _, _, corpus = pair
    targets = [q(k).encode() for k in corpus.objects[:5] + corpus.companions[:3] + corpus.absent[:3]
               + corpus.legacy[:2] + [d.taskhash_key for d in corpus.details[:4]]]
    targets += [b"/no/such/thing.tar.zst", b"/ab/cd/x.txt?query=1", b"/%61b/cd/x", b"/healthz",
                b"/healthz?x=1", b"/v1/equivalent", b"/ws", b"/readyz", b"/", b"/metricsx", b"/v1"]
    sources = set()
    for t in targets:
        (status, headers, body), = same(pair, req(method, t, b"Connection: close\r\n"))
        if t.startswith(b"/") and b"healthz" not in t:
            sources.add(dict(headers).get("X-Sstate-Source"))
        if method == b"GET" and " 200 " in status and t in targets[:5]:
            assert body == (corpus.root / corpus.objects[targets.index(t)]).read_bytes()
    assert {"hit", "equivalent"} <= sources
    # a rewritten GET: the unihash object's bytes under the taskhash name
    d = corpus.details[0]
    (status, headers, body), = same(pair, req(method, q(d.taskhash_key).encode(), b"Connection: close\r\n"))
    headers = dict(headers)
    assert " 200 " in status and headers["X-Sstate-Source"] == "equivalent"
    assert headers["X-Sstate-Served-Hash"] == d.unihash
    if method == b"GET":
        assert body == (corpus.root / d.unihash_key).read_bytes()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", BAD_TARGETS, ids=[t.decode("latin-1")[:40] for t in BAD_TARGETS])
def test_bad_targets(pair, target, method):
    for _ in range(2):  # the second time, the fast path remembers the target
        (status, _, _), = same(pair, req(method, target, b"Connection: close\r\n"))
        assert status.split(" ")[1] in ("400", "404")


def conditional_variants(corpus, port: int) -> tuple[bytes, list[bytes]]:
    key = corpus.objects[0]
    size = corpus.sizes[key]
    etag_probe = exchange(port, head(q(key).encode(), b"Connection: close\r\n"), 1)[0][1]
    etag = dict(etag_probe)["ETag"]
    lm = dict(etag_probe)["Last-Modified"]
    extras = [
        b"Range: bytes=0-9", b"Range: bytes=10-", b"Range: bytes=-5", f"Range: bytes={size}-".encode(),
        b"Range: bytes=0-1,4-5", b"Range: items=0-1", b"Range: bytes=9-3",
        f"If-None-Match: {etag}".encode(), b'If-None-Match: "nope"', b"If-None-Match: *",
        f"If-None-Match: W/{etag}".encode(), f"If-Modified-Since: {lm}".encode(),
        b"If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT", b"If-Modified-Since: garbage",
        f"If-Match: {etag}".encode(), b'If-Match: "nope"', b"If-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT",
        f"Range: bytes=0-9\r\nIf-Range: {etag}".encode(), b'Range: bytes=0-9\r\nIf-Range: "other"',
        f"Range: bytes=0-9\r\nIf-Range: {lm}".encode(), b"Content-Length: 0",
        b"X-Request-Id: my-own.id_1", b"Authorization: Basic " + base64.b64encode(":".join(ADMIN).encode()),
        b"Authorization: Basic " + base64.b64encode(b"fastadmin:wrong"), b"Authorization: Bearer x",
        b"Authorization: Basic !!!", b"Connection: keep-alive, close",
    ]
    return q(key).encode(), extras


@pytest.mark.parametrize("method", METHODS)
def test_conditional_and_range_variants(pair, method):
    fast, _, corpus = pair
    target, extras = conditional_variants(corpus, fast.port)
    statuses = set()
    for extra in extras:
        (status, headers, _), = same(pair, req(method, target, extra + b"\r\nConnection: close\r\n"))
        statuses.add(status.split(" ")[1])
    assert {"200", "206", "304", "412", "416", "401"} <= statuses, statuses
    d = corpus.details[0]
    for extra in extras[:4]:
        same(pair, req(method, q(d.taskhash_key).encode(), extra + b"\r\nConnection: close\r\n"))
    # the same variants one after another on one kept-alive connection
    data = b"".join(req(method, target, extra + b"\r\n") for extra in extras
                    if b"Authorization" not in extra and b"close" not in extra)
    same(pair, data + head(target, b"Connection: close\r\n"), data.count(b" HTTP/1.1\r\n") + 1)


def test_range_bodies(pair):
    _, _, corpus = pair
    key = corpus.objects[0]
    data = (corpus.root / key).read_bytes()
    t = q(key).encode()
    for rng, want in ((b"0-9", data[:10]), (b"10-", data[10:]), (b"-5", data[-5:]),
                      (f"3-{len(data) + 100}".encode(), data[3:])):
        (status, headers, body), = same(pair, get(t, b"Range: bytes=" + rng + b"\r\nConnection: close\r\n"))
        assert " 206 " in status and body == want, (rng, status)


@pytest.mark.parametrize("method", METHODS)
def test_http10_and_connection_handling(pair, method):
    fast, slow, corpus = pair
    t = q(corpus.objects[1]).encode()
    same(pair, req(method, t, b"", b"1.0"))
    same(pair, req(method, t, b"Connection: keep-alive\r\n", b"1.0"))
    same(pair, req(method, b"/nope", b"Connection: keep-alive\r\n", b"1.0"))
    for svc in (fast, slow):
        assert closed_after(svc.port, req(method, t, b"", b"1.0"), 1)
        assert not closed_after(svc.port, req(method, t, b"Connection: keep-alive\r\n", b"1.0"), 1)
        assert closed_after(svc.port, req(method, t, b"Connection: close\r\n"), 1)
        assert not closed_after(svc.port, req(method, t), 1)
        # pipelined, the last one closes: everything before it answered, in order
        assert closed_after(svc.port, req(method, t) * 3 + req(method, b"/nope", b"Connection: close\r\n"), 4)


def test_pipelined_heads_get_and_put_on_one_connection(pair):
    fast, _, corpus = pair
    a, b = corpus.objects[2], corpus.objects[3]
    ta, tb = q(a).encode(), q(b).encode()
    miss = q(corpus.absent[0]).encode()
    # many HEADs in one send
    out = same(pair, head(ta) * 5 + head(miss) + head(tb) + head(ta, b"Connection: close\r\n"), 8)
    assert [r[0].split(" ")[1] for r in out] == ["200"] * 5 + ["404", "200", "200"]
    # HEAD, GET (sendfile), HEAD on one keep-alive connection
    get = b"GET " + ta + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    out = same(pair, head(tb) + get + head(tb, b"Connection: close\r\n"), 3)
    assert out[1][2] == (corpus.root / a).read_bytes()
    # a ranged GET after HEADs, pipelined
    out = same(pair, head(ta) + b"GET " + ta + b" HTTP/1.1\r\nHost: x\r\nRange: bytes=3-10\r\n\r\n"
               + head(ta, b"Connection: close\r\n"), 3)
    assert out[1][2] == (corpus.root / a).read_bytes()[3:11]
    # PUT with a body after HEADs: anonymous lacks @upload -> 401 from aiohttp
    body = b"x" * 1000
    put = b"PUT /ab/cd/new.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + body
    out = same(pair, head(ta) + head(tb) + put + head(ta, b"Connection: close\r\n"), 4)
    assert [r[0].split(" ")[1] for r in out] == ["200", "200", "401", "200"]
    # the same split in awkward places (byte by byte through the first request heads)
    data = head(ta) + get + head(tb, b"Connection: close\r\n")
    with socket.create_connection(("127.0.0.1", fast.port), timeout=10) as s:
        for i in range(len(data)):
            s.sendall(data[i:i + 1])
        got = comparable(read_responses(s, data, 3))
    assert got == comparable(exchange(fast.port, data, 3))


def test_websocket_after_head(pair):
    fast, slow, corpus = pair
    t = q(corpus.objects[0]).encode()
    up = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    for svc in (fast, slow):
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
            s.sendall(head(t) + up)
            (st1, _, _), (st2, h2, _) = read_responses(s, head(t) + b"HEAD /", 2)
            assert " 200 " in st1 and " 101 " in st2, (st1, st2)
            # a masked text frame: {"get-stream": null}? just ping the hashserv with a close frame
            s.sendall(b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8")
            assert s.recv(2)[:1] == b"\x88"


def test_malformed_requests_go_to_aiohttp(pair):
    _, _, corpus = pair
    t = q(corpus.objects[0]).encode()
    cases = [
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\n folded\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: x\r\nX: \x01\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nHost: " + b"x" * 9000 + b"\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/2.0\r\nConnection: close\r\n\r\n",
        b"HEAD http://x" + t + b" HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b"#frag HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"head " + t + b" HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.1\r\nConnection: close\r\n\r\n",  # no Host
        b"HEAD " + t + b" HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"HEAD " + t + b" HTTP/1.0\r\n\r\n",  # no Host is fine in 1.0
        b"HEAD /a%0ab HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        head(t, b"X-Trailing: v \t\r\nConnection: close \r\n"),
    ]
    cases += [c.replace(b"HEAD ", b"GET ", 1) for c in cases if c.startswith(b"HEAD ")]
    close = b"Connection: close\r\n"
    cases += [get(t, b"Content-Length: 3\r\n" + close) + b"abc", get(t, b"Expect: 100-continue\r\n" + close),
              get(t, b"Upgrade: h2c\r\nConnection: Upgrade, close\r\n"), get(t, b"Content-Length: 0\r\n" + close),
              req(b"POST", t, b"Content-Length: 0\r\n" + close), req(b"OPTIONS", t, close)]
    for data in cases:
        same(pair, data)
    # A malformed request after good HEADs on one connection: the fast path answers the HEADs,
    # then aiohttp the 400 (plain aiohttp answers only the 400: its parser fails the batch).
    fast = pair[0]
    with socket.create_connection(("127.0.0.1", fast.port), timeout=10) as s:
        s.sendall(head(t) + head(t) + cases[2])
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert re.findall(rb"HTTP/1\.[01] (\d+)", got) == [b"200", b"200", b"400"], got


def access_lines(svc: Service, tag: str, n: int, *, keep_bytes: bool = False) -> list[str]:
    """The access lines with ``tag`` in them, without time stamp, duration and request id (and
    byte count, which varies with the length of the request id, unless ``keep_bytes``)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [ln for ln in svc.read_log().splitlines() if tag in ln and " access " in ln]
        if len(found) >= n:
            break
        time.sleep(0.05)
    found = [re.sub(r"^\S+ | \S+ms rid=\S+$", "", ln) for ln in found]
    return found if keep_bytes else [re.sub(r" \d+ (\S+)$", r" N \1", ln) for ln in found]


def test_access_log_lines_match(pair):
    fast, slow, corpus = pair
    tag = f"m{time.monotonic_ns()}"
    miss = f"/ab/cd/marker-{tag}.tar.zst".encode()
    hit = q(corpus.objects[0]).encode() + b"?" + tag.encode()
    bad = b"/a/../" + tag.encode()
    rid = b"X-Request-Id: rid-" + tag.encode() + b"\r\n"  # the same length in both services
    data = (head(miss) + head(hit) + head(bad) + get(miss) + get(hit) + get(bad) + get(hit, b"Range: bytes=2-5\r\n")
            + get(hit, b"Range: bytes=99999999-\r\n") + get(q(EMPTY).encode() + b"?" + tag.encode(), rid)
            + get(hit, rid) + get(miss, rid) + head(miss + b"?a=b", b"Connection: close\r\n"))
    for svc in (fast, slow):
        exchange(svc.port, data, 12)
    got = access_lines(fast, tag, 12)
    assert got == access_lines(slow, tag, 12)
    assert [ln.split(" ")[3] for ln in got] == ["404", "200", "400", "404", "200", "400", "206", "416", "200",
                                                "200", "404", "404"], got


def test_access_log_byte_counts_match(pair):
    """With the same request id the byte counts are equal too (for a GET the head and an error's
    text: aiohttp counts what went through its response writer, not the sendfile part)."""
    fast, slow, corpus = pair
    tag = f"b{time.monotonic_ns()}"
    rid = b"X-Request-Id: rid-" + tag.encode() + b"\r\n"
    hit = q(corpus.objects[0]).encode() + b"?" + tag.encode()
    miss = f"/ab/cd/marker-{tag}.tar.zst".encode()
    data = (get(hit, rid) + get(miss, rid) + get(q(EMPTY).encode() + b"?" + tag.encode(), rid)
            + get(hit, rid + b"Range: bytes=99999999-\r\n") + get(hit, rid + b"Range: bytes=1-2\r\n")
            + head(hit, rid) + head(miss, rid + b"Connection: close\r\n"))
    for svc in (fast, slow):
        exchange(svc.port, data, 7)
    got = access_lines(fast, tag, 7, keep_bytes=True)
    assert got == access_lines(slow, tag, 7, keep_bytes=True)
    assert len(got) == 7


def test_pipelined_gets_large_and_empty_objects(pair):
    _, _, corpus = pair
    a, b = corpus.objects[4], corpus.objects[5]
    ta, tb = q(a).encode(), q(b).encode()
    large, empty = q(LARGE).encode(), q(EMPTY).encode()
    data = (get(ta) + get(empty) + head(empty) + get(large) + get(tb, b"Range: bytes=1-3\r\n") + get(b"/nope")
            + get(empty, b"Range: bytes=0-\r\n") + head(large) + get(ta, b"Connection: close\r\n"))
    out = same(pair, data, 9)
    assert [r[0].split(" ")[1] for r in out] == ["200", "200", "200", "200", "206", "404", "416", "200", "200"]
    assert out[0][2] == out[8][2] == (corpus.root / a).read_bytes()
    assert out[1][2] == b"" and dict(out[1][1])["Content-Length"] == "0"
    assert out[3][2] == (corpus.root / LARGE).read_bytes()
    assert out[4][2] == (corpus.root / b).read_bytes()[1:4]


def metric_values(svc: Service) -> dict[str, float]:
    (status, _, body), = exchange(svc.port, get(b"/metrics", b"Connection: close\r\n"), 1)
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(("sstate_proxy_object_requests_total", "sstate_proxy_object_bytes_sent_total")):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r',?pid="\d+"', "", name)] = float(value)
    return out


def test_metrics_count_gets_alike(pair):
    fast, slow, corpus = pair
    t = q(corpus.objects[6]).encode()
    d = corpus.details[1]
    data = (get(t) + get(t, b"Range: bytes=0-99\r\n") + get(q(corpus.absent[5]).encode())
            + get(q(d.taskhash_key).encode()) + get(q(LARGE).encode()) + head(t, b"Connection: close\r\n"))
    deltas = []
    for svc in (fast, slow):
        before = metric_values(svc)
        exchange(svc.port, data, 6)
        after = metric_values(svc)
        deltas.append({k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)})
    assert deltas[0] == deltas[1]
    sent = corpus.sizes[corpus.objects[6]] + 100 + corpus.sizes[d.unihash_key] + LARGE_SIZE
    assert deltas[0]["sstate_proxy_object_bytes_sent_total{}"] == sent, deltas[0]


def test_client_gone_mid_body(pair):
    """The client goes away during a transfer: the connection closes, both paths log the request
    as aiohttp does (an error and a 500 access line) and go on serving."""
    fast, slow, _ = pair
    for svc in (fast, slow):
        rid = f"gone-{time.monotonic_ns()}"
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", svc.port))
        s.sendall(get(q(LARGE).encode(), f"X-Request-Id: {rid}\r\n".encode()))
        got = 0
        while got < 200_000:
            got += len(s.recv(65536))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            log = svc.read_log()
            lines = [ln for ln in log.splitlines() if f"rid={rid}" in ln and " access " in ln]
            if lines:
                break
            time.sleep(0.05)
        assert len(lines) == 1 and " GET " in lines[0] and " 500 " in lines[0] and " hit " in lines[0], lines
        assert f"response failed after it started rid={rid} GET" in log
        (status, _, _), = exchange(svc.port, head(q(LARGE).encode(), b"Connection: close\r\n"), 1)
        assert " 200 " in status


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])
def test_shutdown_lets_a_transfer_in_flight_finish(tmp_path, fast_path):
    env = {} if fast_path else {"SSTATE_PROXY_NO_FASTHEAD": "1"}
    svc = Service(tmp_path / "svc", env=env)
    write_special_objects(svc.storage)
    t = q(LARGE).encode()
    svc.start()
    try:
        idle = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        exchange_on = head(t)
        idle.sendall(exchange_on)
        read_responses(idle, exchange_on, 1)  # a kept-alive connection with nothing in flight
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(15)
        s.connect(("127.0.0.1", svc.port))
        s.sendall(get(t))
        buf = s.recv(65536)
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        while chunk := s.recv(1 << 20):
            buf += chunk
        s.close()
        head_bytes, body = buf.split(b"\r\n\r\n", 1)
        assert b" 200 " in head_bytes.split(b"\r\n")[0]
        assert body == (svc.storage / LARGE).read_bytes()  # all of it, then the close
        idle.settimeout(5)
        assert idle.recv(1) == b""  # the idle connection was closed at once
        idle.close()
        assert svc.proc.wait(15) == 0
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def auth_pair(tmp_path_factory):
    """Anonymous users may not read: every object request needs credentials."""
    work = tmp_path_factory.mktemp("fasthead-auth")
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    root = work / "sstate-cache"
    config = {"server": {"log_level": "INFO"}, "storage": {"path": str(root)}}
    args = ["--anon-perms", "@none"]
    fast = Service(work / "fast", env=env, args=args, config=config)
    slow = Service(work / "slow", env={**env, "SSTATE_PROXY_NO_FASTHEAD": "1"}, args=args, config=config)
    corpus = make_corpus(root, n=20, seed=3)
    fast.start()
    slow.start()
    try:
        yield fast, slow, corpus
    finally:
        fast.stop()
        slow.stop()


@pytest.mark.parametrize("method", METHODS)
def test_auth_required(auth_pair, method):
    _, _, corpus = auth_pair
    t = q(corpus.objects[0]).encode()
    wrong = b"Authorization: Basic " + base64.b64encode(b"fastadmin:nope") + b"\r\n"
    cases = [(b"", "401"), (ADMIN_AUTH, "200"), (wrong, "401"), (b"Authorization: Basic\r\n", "401"),
             (ADMIN_AUTH + b"Range: bytes=0-0\r\n", "206")]
    for extra, status in cases:
        (got, headers, body), = same(auth_pair, req(method, t, extra + b"Connection: close\r\n"))
        assert got.split(" ")[1] == status, (extra, got)
    data = b"".join(req(method, t, extra) for extra, _ in cases) + head(t, b"Connection: close\r\n")
    out = same(auth_pair, data, len(cases) + 1)
    if method == b"GET":
        assert out[1][2] == (corpus.root / corpus.objects[0]).read_bytes()
        assert out[0][2].startswith(b"authentication required")


def test_tls_gets_go_to_aiohttp(tmp_path):
    """Over TLS a GET's body needs plain reads: the fast path answers HEADs only and hands the
    connection to aiohttp at the first GET."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    svc = Service(tmp_path / "svc", config={"server": {"tls_cert": str(cert), "tls_key": str(key)}})
    write_special_objects(svc.storage)
    corpus = make_corpus(svc.storage, n=10, seed=5)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    svc.start()
    try:
        t = q(corpus.objects[0]).encode()
        data = head(t) + head(t) + get(t) + get(q(LARGE).encode()) + head(t, b"Connection: close\r\n")
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(data)
                out = read_responses(s, data, 5)
        assert [r[0].split(" ")[1] for r in out] == ["200"] * 5
        assert out[2][2] == (corpus.root / corpus.objects[0]).read_bytes()
        assert out[3][2] == (svc.storage / LARGE).read_bytes()
    finally:
        svc.stop()


@pytest.fixture
async def in_process(tmp_path, monkeypatch):
    """The application in this process on two ports: (app, FastHead, (fast port, aiohttp port))."""
    from aiohttp import web

    from proxy import config as config_mod
    from proxy import fasthead
    from proxy.app import access_logger_class, build_app

    monkeypatch.delenv("SSTATE_PROXY_NO_FASTHEAD", raising=False)
    cfg = config_mod.load(None, {"storage.path": str(tmp_path / "sstate"),
                                 "database.url": f"sqlite:///{tmp_path}/db.sqlite"}, environ={})
    app = build_app(cfg, skip_listeners=True, housekeeping=False)
    runner = web.AppRunner(app, access_log_class=access_logger_class(cfg))
    await runner.setup()
    ports = free_port(), free_port()
    sites = [fasthead.site(runner, access_logger_class(cfg), "127.0.0.1", ports[0]),
             web.TCPSite(runner, "127.0.0.1", ports[1])]
    for site in sites:
        await site.start()
    assert isinstance(sites[0], fasthead.FastHeadSite)
    try:
        yield app, sites[0]._fast, ports
    finally:
        await runner.cleanup()


async def test_target_memo(in_process):
    from proxy.fasthead import TARGET_MEMO

    _, fast, _ = in_process
    targets = [f"/ab/cd/sstate:x:y:1:r0:z:14:{i:064x}_populate_sysroot.tar.zst" for i in range(1500)]
    targets += ["/healthz", "/a/../b", "/%2e%2e/x", "/x%00"] * 2
    for t in targets:  # more than the memo holds: it starts over, with the same answers
        assert fast.qualifies(t) == fast._qualifies(t)
        assert len(fast._targets) <= TARGET_MEMO
    assert fast.qualifies("/healthz") is None and fast.qualifies(targets[0])[0] == targets[0][1:]


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")  # app code, in-process
async def test_object_vanishing_between_stat_and_open(in_process, monkeypatch):
    """Removed after the resolver's stat: 404 (not a 500 or a broken transfer), and the resolver
    forgets its cached answers; the same with plain aiohttp."""
    from proxy.app import PARTS

    app, _, ports = in_process
    parts = app[PARTS]
    store, resolver = parts["store"], parts["resolver"]
    root = Path(store.root)
    real_open = store.open
    race = {"when": ""}

    async def racing_open(key, *args, **kwargs):
        if race["when"] == "before open":
            os.unlink(root / key)
        body = await real_open(key, *args, **kwargs)
        if race["when"] == "after open":
            os.unlink(body.path)
        return body

    invalidated = []
    real_invalidate = resolver.invalidate
    monkeypatch.setattr(store, "open", racing_open)
    monkeypatch.setattr(resolver, "invalidate", lambda: (invalidated.append(1), real_invalidate()))
    answers = []
    for port in ports:
        for race["when"] in ("before open", "after open"):
            (root / LARGE).parent.mkdir(parents=True, exist_ok=True)
            (root / LARGE).write_bytes(b"x" * 1000)
            n = len(invalidated)
            data = get(q(LARGE).encode()) + head(q(EMPTY).encode() + b"?x", b"Connection: close\r\n")
            out = await asyncio.to_thread(exchange, port, data, 2)
            assert len(invalidated) == n + 1
            answers.append(comparable(out))
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert answers[0][0][0].split(" ")[1] == answers[1][0][0].split(" ")[1] == "404"
    assert answers[0][0][2] == b"no such object\n"


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")  # app code, in-process
async def test_get_behind_a_backlog_of_answers(in_process, monkeypatch):
    """A GET's head that waits in the transport's buffer (the client reads slowly): its body
    follows through loop.sendfile, in order; the same bytes as plain aiohttp."""
    import threading

    from proxy import fasthead
    from proxy.app import PARTS

    app, _, ports = in_process
    root = Path(app[PARTS]["store"].root)
    write_special_objects(root)
    small = q("ab/cd/small.bin").encode()
    (root / "ab/cd/small.bin").write_bytes(b"s" * 100)
    calls = []
    real = fasthead.FastHeadProtocol._loop_sendfile
    monkeypatch.setattr(fasthead.FastHeadProtocol, "_loop_sendfile",
                        lambda self, t: (calls.append(t.length), real(self, t))[1])
    made = fasthead.FastHeadProtocol.connection_made

    def small_send_buffer(self, transport):  # so that answers back up in the transport's buffer
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        made(self, transport)

    monkeypatch.setattr(fasthead.FastHeadProtocol, "connection_made", small_send_buffer)
    data = head(small) * 3000 + get(q(LARGE).encode()) + head(small, b"Connection: close\r\n")

    def slow_client(port: int) -> list[tuple]:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(20)
        s.connect(("127.0.0.1", port))
        threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
        time.sleep(0.3)  # the answers back up
        try:
            return read_responses(s, data, 3002)
        finally:
            s.close()

    out = [comparable(await asyncio.to_thread(slow_client, port)) for port in ports]
    assert out[0] == out[1]
    assert out[0][3000][2] == (root / LARGE).read_bytes()
    assert calls == [LARGE_SIZE]  # the fast port's GET went that way
