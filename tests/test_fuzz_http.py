"""Property tests (hypothesis) of the HTTP faces: ``Range`` and conditional headers (the pure
``parse_range``/``preconditions``/``plan``, then over HTTP against the running service), object
paths over HTTP, and ``/v1/equivalent`` JSON. Never a 5xx; a 4xx says why; a 206 is exactly the
slice its Content-Range names."""

from __future__ import annotations

import http.client
import json
import re
import socket
from base64 import b64encode
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.mirror import NO_BODY, RangeNotSatisfiable, parse_range, plan, preconditions
from storage import Meta
from tests.service import Service

PURE = settings(max_examples=250, deadline=None)
OVER_HTTP = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
ADMIN = ("admin", "admin-token-for-fuzz")
OBJECT_KEY = "fuzz/object.bin"
DATA = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes

# --- header values a client could send -------------------------------------------------------
_NUM = st.one_of(st.integers(0, 12_000).map(str), st.just(""), st.text(alphabet="0123456789", max_size=30),
                 st.sampled_from(["-1", "²", "١٢", "1e3", " 5", "0x10", "99999999999999999999999"]))
RANGES = st.one_of(
    st.builds(lambda u, a, b: f"{u}={a}-{b}", st.sampled_from(["bytes", "Bytes", " bytes ", "items", ""]), _NUM, _NUM),
    st.builds(lambda a, b, c, d: f"bytes={a}-{b},{c}-{d}", _NUM, _NUM, _NUM, _NUM),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40),
)
_DATE = st.one_of(st.sampled_from(["Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
                                   "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                                   "Sun Nov  6 08:49:37 1994", "garbage", "", "Mon, 32 Foo 2024 25:61:61 GMT",
                                   "Tue, 01 Jan 0001 00:00:00 +9999"]),
                  st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
_ETAG = st.one_of(st.sampled_from(["*", '"x"', 'W/"x"', "W/", '"', ",", '"a", W/"b"']),
                  st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
HEADERS = st.fixed_dictionaries({}, optional={"Range": RANGES, "If-Range": st.one_of(_DATE, _ETAG),
                                              "If-Match": _ETAG, "If-None-Match": _ETAG,
                                              "If-Modified-Since": _DATE, "If-Unmodified-Since": _DATE})


@PURE
@given(st.one_of(st.none(), RANGES), st.integers(0, 2**63))
def test_parse_range_is_within_the_object(header, size):
    try:
        rng = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if rng is not None:
        start, length = rng
        assert 0 <= start < size and 1 <= length and start + length <= size


@PURE
@given(HEADERS, st.integers(0, 2**40), st.floats(0, 2**34, allow_nan=False), st.text("0123456789abcdef", min_size=1))
def test_plan_answers_a_valid_status_and_slice(h, size, mtime, etag):
    meta = Meta(size, mtime, etag)
    headers: dict = {}
    status, start, length = plan(h, meta, headers)
    assert status in (200, 206, 304, 412, 416)
    assert headers["ETag"] == f'"{etag}"' and headers["Accept-Ranges"] == "bytes"
    assert preconditions(h, meta, headers["ETag"]) == (status if status in (304, 412) else None)
    if status == 200:
        assert (start, length) == (0, size)
    elif status == 206:
        assert 0 <= start and 1 <= length and start + length <= size
        assert headers["Content-Range"] == f"bytes {start}-{start + length - 1}/{size}"
    elif status == 416:
        assert headers["Content-Range"] == f"bytes */{size}"


# --- against the running service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    s = Service(tmp_path_factory.mktemp("fuzz-http"),
                env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                config={"limits": {"max_request_body_bytes": 4096}})
    (s.storage / "fuzz").mkdir(parents=True)
    (s.storage / OBJECT_KEY).write_bytes(DATA)
    s.start()
    yield s
    log = s.read_log()
    s.stop()
    # malformed requests are the client's fault: no traceback (aiohttp's own included)
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def request(svc, method: str, target: str, headers: dict | None = None, body: bytes | None = None,
            user: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
    h = {k: v.encode("utf-8") for k, v in (headers or {}).items()}  # any text, sent as UTF-8 bytes
    if user is not None:
        h["Authorization"] = b"Basic " + b64encode(f"{user[0]}:{user[1]}".encode())
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_clear(status: int, body: bytes, what: object) -> None:
    assert status < 500, (status, body, what)
    if 400 <= status < 500:
        assert body.strip(), (status, what)  # says why


@OVER_HTTP
@given(HEADERS, st.sampled_from(["GET", "HEAD"]))
def test_range_and_conditionals_over_http(svc, h, method):
    status, headers, body = request(svc, method, "/" + OBJECT_KEY, h)
    assert status in (200, 206, 304, 412, 416), (status, h)
    if method == "HEAD" or status in NO_BODY:
        assert body == b""
    if status == 416:
        assert headers["content-range"] == f"bytes */{len(DATA)}"
    if method == "GET" and status == 200:
        assert body == DATA
    if method == "GET" and status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers["content-range"])
        start, end, size = map(int, m.groups())
        assert size == len(DATA) and body == DATA[start:end + 1]


_SEG = st.one_of(st.sampled_from(["..", ".", "%2e%2e", "%2E%2e", "%252e%252e", "%2f", "%5c", "%00", "%0a", "%ff",
                                  "%c0%ae%c0%ae", "etc", "passwd", "fuzz", "object.bin", "", "~root"]),
                 st.text(alphabet="abc.%/\\:;?#", max_size=8))
PATHS = st.lists(_SEG, max_size=8).map(lambda segs: "/" + "/".join(segs))


@OVER_HTTP
@given(PATHS, st.sampled_from(["GET", "HEAD", "DELETE", "PUT"]))
def test_malformed_object_paths_over_http(svc, path, method):
    """Raw request lines (no client-side normalisation): never a 5xx, never a file outside the
    store (the service answers 400/404, or 401 for writes by anonymous clients)."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        body = b"x" if method == "PUT" else b""
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1", "replace") + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        got = resp.read()
    assert_clear(resp.status, got if method != "HEAD" else b"-", path)
    if resp.status == 200:  # only the one object there is, whatever the spelling of its path
        assert method in ("GET", "HEAD") and resp.getheader("Content-Length") == str(len(DATA)), path
        assert method == "HEAD" or got == DATA


@OVER_HTTP
@given(st.one_of(st.binary(max_size=300), st.sampled_from([b"no colon here", b"X-Big: " + b"b" * 9000,
                                                           b"Bad\x01Name: v", b"X: \x7f\x00", b" folded"])))
def test_malformed_request_heads(svc, junk):
    """Header lines aiohttp cannot parse: a 4xx (or a close), never a 5xx, never a traceback in the
    log (the fixture checks the log at the end)."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(b"GET /" + OBJECT_KEY.encode() + b" HTTP/1.1\r\nHost: x\r\n" + junk.replace(b"\r\n\r\n", b"")
                     + b"\r\nConnection: close\r\n\r\n")
        resp = http.client.HTTPResponse(sock, method="GET")
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionError):
            return
        body = resp.read()
    assert_clear(resp.status, body, junk)


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=20)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8)
_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
FIELDS = ("taskhash", "method", "outhash", "unihash", "depid", "owner", "PN", "PV", "PR", "task", "outhash_siginfo")
REPORTS = st.dictionaries(st.sampled_from(FIELDS), st.one_of(_HEX64, st.text(max_size=300), JSON), max_size=11)


@OVER_HTTP
@given(st.one_of(REPORTS, JSON), st.booleans())
def test_v1_equivalent_post_json(svc, doc, as_admin):
    status, _, body = request(svc, "POST", "/v1/equivalent", body=json.dumps(doc).encode(),
                              headers={"Content-Type": "application/json"}, user=ADMIN if as_admin else None)
    assert_clear(status, body, doc)
    assert status in (200, 400, 413), (status, body, doc)
    if status == 200:
        answer = json.loads(body)
        assert set(answer) == {"taskhash", "method", "unihash", "depid"}  # never task data


# nesting deeper than the JSON parser's recursion limit, within the body limit
DEEP = st.integers(1, 2000).flatmap(lambda n: st.sampled_from([b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n,
                                                               b"[" * n]))


@OVER_HTTP
@given(st.one_of(st.binary(max_size=5000), st.text(max_size=200).map(str.encode), DEEP))
def test_v1_equivalent_post_bytes(svc, raw):
    status, _, body = request(svc, "POST", "/v1/equivalent", body=raw)
    assert_clear(status, body, raw)
    assert status in (200, 400, 413), (status, body)


@OVER_HTTP
@given(st.dictionaries(st.sampled_from(["method", "taskhash", "x", ""]), st.text(max_size=300), max_size=3))
def test_v1_equivalent_get_query(svc, query):
    target = "/v1/equivalent?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())
    status, _, body = request(svc, "GET", target)
    assert_clear(status, body, query)
    assert status in (200, 400), (status, body)
