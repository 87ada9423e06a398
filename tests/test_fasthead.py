"""The HEAD fast path (proxy/fasthead.py) answers exactly like plain aiohttp.

Differential: the same corpus served twice, once with the fast path and once with
SSTATE_PROXY_NO_FASTHEAD=1; raw HTTP exchanges are compared byte for byte except for Date and
X-Request-Id (and the access-log lines except time, duration and request id).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from urllib.parse import quote

import pytest

from tests.corpus import make_corpus
from tests.service import Service
from tests.test_mirror import BAD_TARGETS

ADMIN = ("fastadmin", "fast-admin-token-0123456789")
IGNORED = {"date", "x-request-id"}


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


def head(target: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"HEAD " + target + b" HTTP/" + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


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


def test_plain_heads_hits_misses_rewritten(pair):
    _, _, corpus = pair
    targets = [q(k).encode() for k in corpus.objects[:5] + corpus.companions[:3] + corpus.absent[:3]
               + corpus.legacy[:2] + [d.taskhash_key for d in corpus.details[:4]]]
    targets += [b"/no/such/thing.tar.zst", b"/ab/cd/x.txt?query=1", b"/%61b/cd/x", b"/healthz",
                b"/healthz?x=1", b"/v1/equivalent", b"/ws", b"/readyz"]
    sources = set()
    for t in targets:
        (status, headers, _), = same(pair, head(t, b"Connection: close\r\n"))
        if t.startswith(b"/") and b"healthz" not in t:
            sources.add(dict(headers).get("X-Sstate-Source"))
    assert {"hit", "equivalent"} <= sources


@pytest.mark.parametrize("target", BAD_TARGETS, ids=[t.decode("latin-1")[:40] for t in BAD_TARGETS])
def test_bad_targets(pair, target):
    (status, _, _), = same(pair, head(target, b"Connection: close\r\n"))
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


def test_conditional_and_range_variants(pair):
    fast, _, corpus = pair
    target, extras = conditional_variants(corpus, fast.port)
    for extra in extras:
        (status, headers, _), = same(pair, head(target, extra + b"\r\nConnection: close\r\n"))
    d = corpus.details[0]
    for extra in extras[:4]:
        same(pair, head(q(d.taskhash_key).encode(), extra + b"\r\nConnection: close\r\n"))


def test_http10_and_connection_handling(pair):
    fast, slow, corpus = pair
    t = q(corpus.objects[1]).encode()
    same(pair, head(t, b"", b"1.0"))
    same(pair, head(t, b"Connection: keep-alive\r\n", b"1.0"))
    for svc in (fast, slow):
        assert closed_after(svc.port, head(t, b"", b"1.0"), 1)
        assert not closed_after(svc.port, head(t, b"Connection: keep-alive\r\n", b"1.0"), 1)
        assert closed_after(svc.port, head(t, b"Connection: close\r\n"), 1)
        assert not closed_after(svc.port, head(t), 1)
        # pipelined, the last one closes: everything before it answered, in order
        assert closed_after(svc.port, head(t) * 3 + head(b"/nope", b"Connection: close\r\n"), 4)


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
    ]
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


def test_access_log_lines_match(pair):
    fast, slow, corpus = pair
    tag = f"m{time.monotonic_ns()}"
    miss = f"/ab/cd/marker-{tag}.tar.zst".encode()
    hit = q(corpus.objects[0]).encode() + b"?" + tag.encode()
    bad = b"/a/../" + tag.encode()
    for svc in (fast, slow):
        exchange(svc.port, head(miss) + head(hit) + head(bad) + head(miss + b"?a=b", b"Connection: close\r\n"), 4)

    def lines(svc):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [ln for ln in svc.read_log().splitlines() if tag in ln and " access " in ln]
            if len(found) >= 4:
                break
            time.sleep(0.05)
        # drop time stamp, duration and request id (the byte count varies with the request id)
        return [re.sub(r" \d+ (\S+)$", r" N \1", re.sub(r"^\S+ | \S+ms rid=\S+$", "", ln)) for ln in found]

    got = lines(fast)
    assert got == lines(slow)
    assert [ln.split(" ")[3] for ln in got] == ["404", "200", "400", "404"], got
