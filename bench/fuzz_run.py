"""Standalone fuzz run: many malformed requests on every face of a real sstate-proxy.

    python bench/fuzz_run.py [--requests 12000] [--seed 1] [--concurrency 24] [--keep] [--json FILE]

Starts two ``sstate-proxy serve`` processes on one storage directory and database (the first
with HTTP, websocket and the raw tcp hashserv listener, the second with the unix one; a service
has one raw listener), then sends ``--requests`` malformed requests, spread over the faces:

* **http-objects**: GET/HEAD/PUT/DELETE (and odd methods) with traversal attempts in every
  encoding, control bytes, over-long paths and headers, bad ``Range``/``If-*``/``Content-Length``/
  ``Transfer-Encoding``/``Authorization``/``Digest`` headers, bodies shorter or longer than
  declared or over ``[limits] max_upload_bytes``; a third of them authenticated as an ``@all``
  user, so writes get past the permission check to the path and body checks;
* **equivalent**: ``/v1/equivalent`` GETs with broken queries and POSTs with broken JSON (random
  bytes, wrong types, deep nesting, oversized bodies), anonymous and authenticated;
* **ws**: OEHASHEQUIV over websocket: broken handshakes, text/binary/oversized frames, valid
  commands with hostile arguments; plus broken upgrade requests;
* **tcp** and **unix**: the same frames on the raw listeners, plus random bytes.

Every request is sent on a raw socket (no client-side normalisation). Checks: no answer is a 5xx;
both services stay up (``/healthz`` every 500 requests, a hashserv ping on a connection opened
before the run); after the run a valid GET, report and lookup work; the services' logs hold no
traceback; and no file outside the storage root changed: a sentinel tree beside the root (and the
files a traversal would reach) has the same names, sizes, mtimes and contents as before. Exit
status 0 if every check held, 1 otherwise. Prints a Markdown summary (counts per face).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.service import Service, free_port  # noqa: E402

ADMIN = ("admin", "fuzz-admin-token")
OBJECT_KEY = "fuzz/known-object.bin"  # fuzzed (an @all user may even DELETE it)
UNTOUCHED_KEY = "kept/untouched.bin"  # never named by the run: the valid GET after it
OBJECT = os.urandom(64 * 1024)
MAX_UPLOAD = 256 * 1024
MAX_BODY = 64 * 1024
MAX_MESSAGE = 64 * 1024
H64 = "ab" * 32
IDLE_S = 2.0  # a quiet server after this long has said what it will say


# --- the sentinel tree ----------------------------------------------------------------------


def snapshot(top: Path, skip: set[Path]) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file under ``top`` except ``skip``."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip]
        for n in filenames:
            p = d / n
            if p in skip:
                continue
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "-"
            out[str(p.relative_to(top))] = (st.st_size, st.st_mtime_ns, digest)
        out[str(d.relative_to(top)) + "/"] = (0, d.lstat().st_mtime_ns, "dir")
    return out


def make_sentinels(top: Path) -> None:
    """Files a traversal out of ``top/store`` would reach, and a tree beside the root."""
    (top / "sentinel" / "deeper").mkdir(parents=True)
    for rel in ("secret.txt", "sentinel/secret.txt", "sentinel/deeper/x.bin", "sentinel/sstate:zlib::1:r0::14:"
                + H64 + "_populate_sysroot.tar.zst", "store-evil", "etc-passwd"):
        (top / rel).write_bytes(f"sentinel {rel}\n".encode())
    old = time.time() - 86400
    for p in top.rglob("*"):
        os.utime(p, (old, old))


# --- generators of malformed requests ----------------------------------------------------------

TRAVERSALS = [
    "../secret.txt", "../../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt",
    "%252e%252e/secret.txt", "..%5csecret.txt", "..\\secret.txt", "%c0%ae%c0%ae/secret.txt", "....//secret.txt",
    "./../sentinel/secret.txt", "fuzz/../../sentinel/secret.txt", "fuzz/%2e%2e/%2e%2e/sentinel/secret.txt",
    "/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", "sentinel/../../secret.txt", "..", ".", "%2e", "~/x",
    "store/../secret.txt", "../store-evil", "..;/secret.txt", "%u002e%u002e/secret.txt", "..%00/secret.txt",
    "fuzz/known-object.bin/../../../secret.txt", "ab/ab/sstate:x::1:r0::14:" + H64 + "_t.tar.zst/../../..",
]
SSTATE_NAMES = [
    "ab/ab/sstate:zlib:core2-64-poky-linux:1.3:r0:core2-64:14:" + H64 + "_populate_sysroot.tar.zst",
    "universal/ab/ab/sstate:zlib::1.3:r0::14:" + H64 + "_fetch.tar.zst.siginfo",
    "ab/sstate-zlib-x-1-r0-x-3-" + H64 + "_package.tgz", "IN/VA/sstate:x::1:r0::14:INVALID_t.tar.zst",
]


def rand_text(rng: random.Random, n: int) -> str:
    alphabet = "abcXYZ019.-_:/%+~;=?&#@!$'()*,[]{}|^`\"<> \t\\" + "é€\u202e\ufeff\x00\x01\x1f\x7f"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def rand_path(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return "/" + rng.choice(TRAVERSALS)
    if kind < 0.5:
        name = rng.choice(SSTATE_NAMES)
        i = rng.randrange(len(name))
        return "/" + name[:i] + rng.choice(["%2e%2e/", "/../", "%00", "%", "%zz", "//", "\\", "%ff", ""]) + name[i:]
    if kind < 0.6:
        return "/" + "a" * rng.choice([255, 256, 1024, 1025, 4096, 9000])
    if kind < 0.7:
        return "/" + "/".join("%" + bytes([rng.randrange(256)]).hex() for _ in range(rng.randint(1, 30)))
    if kind < 0.75:
        return rng.choice(["*", "", "http://evil/../../secret.txt", "/?", "/#", "/%", "/" + OBJECT_KEY + "?x=../.."])
    if kind < 0.88:  # real names: the headers and bodies are what is malformed
        return "/" + rng.choice([OBJECT_KEY, OBJECT_KEY, *SSTATE_NAMES])
    return "/" + rand_text(rng, 80).replace(" ", "%20")


def rand_header_block(rng: random.Random, auth: bool) -> list[str]:
    h: list[str] = []
    picks = [
        lambda: "Range: " + rng.choice(["bytes=", "bytes=-", "bytes=--1", "bytes=5-1", "bytes=0-0,1-1",
                                         "bytes=99999999999999999999-", "bytes=-0", "items=0-1", "bytes=\u00b2-",
                                         "bytes=" + "x" * 100, "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 30]),
        lambda: "If-Range: " + rng.choice(["W/", '"', "garbage", "Mon, 32 Foo 2024 25:61:61 GMT", ""]),
        lambda: "If-Match: " + rng.choice(["*", '"', 'W/"x"', ",,,", "x" * 3000]),
        lambda: "If-None-Match: " + rng.choice(["*", '"', ",", "W/", ""]),
        lambda: "If-Modified-Since: " + rng.choice(["Fri, 31 Dec 9999 23:59:59 GMT", "Tue, 01 Jan 0001 00:00:00 +9999",
                                                    "-1", ""]),
        lambda: "If-Unmodified-Since: " + rng.choice(["Thu, 01 Jan 1970 00:00:00 GMT", "nonsense", "9" * 50]),
        lambda: f"Content-Length: {rng.choice(['-1', 'abc', '1e3', '99999999999999999999999', '', ' 5', '0x10'])}",
        lambda: "Transfer-Encoding: " + rng.choice(["chunked", "gzip", "chunked, chunked", "identity", "x"]),
        lambda: "Authorization: " + rng.choice(["Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                                                 "Basic " + base64.b64encode(b":").decode(), "Bearer x", "Basic",
                                                 "Basic " + "A" * 6000, "Basic " + base64.b64encode(b"admin:wrong").decode(),
                                                 "Basic " + base64.b64encode("ü:\x00".encode()).decode()]),
        lambda: "Digest: " + rng.choice(["sha-256=!!!", "sha-256=" + base64.b64encode(b"x" * 32).decode(), "md5=x", ""]),
        lambda: "Content-MD5: " + rng.choice(["x", "AAAA", ""]),
        lambda: "Expect: " + rng.choice(["100-continue", "200-ok", ""]),
        lambda: "X-Request-Id: " + rand_text(rng, 100).replace("\r", "").replace("\n", ""),
        lambda: "X-Forwarded-For: " + rng.choice(["1.2.3.4, evil", "::::", "x" * 500]),
        lambda: rand_text(rng, 40).replace("\r", "").replace("\n", ""),  # may lack a colon
        lambda: "X-Big: " + "b" * rng.choice([100, 8000, 9000, 20000]),
        lambda: " folded continuation line",
    ]
    for _ in range(rng.randint(0, 4)):
        h.append(rng.choice(picks)())
    if auth:
        h.append("Authorization: Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode())
    return h


@dataclass
class Req:
    face: str
    data: bytes
    half_close: bool = True  # shut down our side after sending (the server sees the end)


def http_request(rng: random.Random) -> Req:
    method = rng.choices(["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH", "get", "G\x00T", "OPTIONS", "X" * 300],
                         [25, 20, 25, 15, 3, 2, 2, 2, 3, 1])[0]
    auth = rng.random() < 0.35
    path = rand_path(rng)
    headers = ["Host: fuzz"] + (["Connection: close"] if rng.random() < 0.8 else []) + rand_header_block(rng, auth)
    body = b""
    if method in ("PUT", "POST") or rng.random() < 0.1:
        size = rng.choice([0, 1, 100, 5000, MAX_UPLOAD + 1, MAX_UPLOAD * 4])
        body = rng.randbytes(min(size, 70_000))
        declared = rng.choice([len(body), size, size + 10, max(0, size - 10), None])
        if declared is not None and not any(x.startswith("Content-Length") for x in headers):
            headers.append(f"Content-Length: {declared}")
    version = rng.choices(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", ""], [90, 4, 2, 2, 2])[0]
    head = f"{method} {path} {version}\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return Req("http-objects", head.encode("utf-8", "surrogatepass") + body)


def equivalent_request(rng: random.Random) -> Req:
    auth = rng.random() < 0.4
    headers = ["Host: fuzz", "Connection: close"] + (rand_header_block(rng, auth) if rng.random() < 0.3 else
                                                      (["Authorization: Basic " + base64.b64encode(
                                                          f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()] if auth else []))
    if rng.random() < 0.3:
        q = "&".join(f"{rng.choice(['method', 'taskhash', 'x', '', 'method[]'])}={rand_text(rng, 300)}"
                     for _ in range(rng.randint(0, 4)))
        target = "/v1/equivalent?" + q.replace(" ", "+").replace("#", "%23")
        head = f"GET {target} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
        return Req("equivalent", head.encode("utf-8", "surrogatepass"))
    kind = rng.random()
    if kind < 0.2:
        body = rng.randbytes(rng.randint(0, 3000))
    elif kind < 0.3:
        n = rng.randint(500, 50_000)
        body = rng.choice([b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n, b"[" * n])
    elif kind < 0.4:
        body = b"{" + b'"x":1,' * (MAX_BODY // 6 + 10) + b'"y":1}'  # over the body limit
    else:
        fields = ["taskhash", "method", "outhash", "unihash", "depid", "owner", "PN", "PV", "PR", "task",
                  "outhash_siginfo", "junk"]
        values = [H64, "", None, 0, -1, 1.5, True, [], {}, [H64], {"a": H64}, "x" * 300, "A" * 64, "é" * 64,
                  "TestMethod", "\x00", 10**40]
        doc = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, len(fields)))}
        body = json.dumps(doc).encode()
    declared = rng.choice([len(body), len(body), len(body) + 5, max(0, len(body) - 5), None])
    if declared is not None:
        headers.append(f"Content-Length: {declared}")
    if rng.random() < 0.2:
        headers.append("Content-Type: " + rng.choice(["text/plain", "application/json; charset=latin-1", "x"]))
    head = "POST /v1/equivalent HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return Req("equivalent", head.encode("utf-8", "surrogatepass") + body)


HASHSERV_COMMANDS = ["ping", "get", "get-outhash", "get-stream", "exists-stream", "report", "report-equiv",
                     "get-stats", "reset-stats", "get-user", "get-all-users", "new-user", "set-user-perms",
                     "delete-user", "refresh-token", "become-user", "remove", "gc-mark", "gc-mark-stream",
                     "gc-sweep", "gc-status", "clean-unused", "backfill-wait", "get-db-usage",
                     "get-db-query-columns", "chunk-stream", "unknown"]
HOSTILE_VALUES = [None, True, 0, -1, 2**70, 1e308, float("inf"), "", "x", H64, "A" * 64, [], [H64], {},
                  {"method": "TestMethod"}, {"PN": "x"}, "x" * 5000, {"a": {"b": {"c": []}}}]
ARG_KEYS = ["method", "taskhash", "outhash", "unihash", "all", "with_unihash", "where", "mark", "username",
            "permissions", "max_age_seconds", "PN", "owner", "outhash_siginfo"]


def hashserv_lines(rng: random.Random) -> list[str]:
    """Lines (frames) of one hostile OEHASHEQUIV conversation."""
    lines: list[str] = []
    r = rng.random()
    if r < 0.8:
        lines += ["OEHASHEQUIV 1.1", *(["needs-headers: true"] if rng.random() < 0.2 else []), ""]
    elif r < 0.9:
        lines += [rng.choice(["OEHASHEQUIV 9.9", "OEHASHEQUIV", "OEHASHEQUIV 1.1 extra", "HTTP/1.1", "",
                              "OEHASHEQUIV 1.x", "OEHASHEQUIV 0.9", "OEHASHEQUIV 1." + "1" * 5000])]
    else:
        lines += ["OEHASHEQUIV 1.1"] + [rand_text(rng, 60) for _ in range(rng.randint(1, 300))]
    for _ in range(rng.randint(1, 5)):
        k = rng.random()
        if k < 0.55:
            arg = {key: rng.choice(HOSTILE_VALUES) for key in rng.sample(ARG_KEYS, rng.randint(0, 5))}
            if rng.random() < 0.2:
                arg = rng.choice(HOSTILE_VALUES)
            msg = {rng.choice(HASHSERV_COMMANDS): arg}
            if rng.random() < 0.1:
                msg[rng.choice(HASHSERV_COMMANDS)] = None
            lines.append(json.dumps(msg))
        elif k < 0.65:
            n = rng.randint(500, 20_000)
            lines.append("[" * n + "]" * n)
        elif k < 0.72:
            lines.append('{"chunk-stream": null}')
            lines += [rand_text(rng, 100) for _ in range(rng.randint(0, 5))]
        elif k < 0.78:
            lines.append("x" * (MAX_MESSAGE + rng.randint(1, 1000)))
        elif k < 0.85:
            lines.append(json.dumps({"get-stream": None}))
            lines += [rng.choice(["TestMethod " + H64, "a b c", "", "END", rand_text(rng, 50)])
                      for _ in range(rng.randint(0, 6))]
        else:
            lines.append(rand_text(rng, 200))
    return lines


def stream_request(rng: random.Random, face: str) -> Req:
    if rng.random() < 0.1:
        return Req(face, b"OEHASHEQUIV 1.1\n\n" + rng.randbytes(rng.randint(1, 4000)))
    text = "".join(line + rng.choice(["\n", "\n", "\r\n"]) for line in hashserv_lines(rng))
    return Req(face, text.encode("utf-8", "surrogatepass"))


@dataclass
class WsReq:
    frames: list[str | bytes]


def ws_request(rng: random.Random) -> WsReq | Req:
    if rng.random() < 0.1:  # a broken upgrade request
        hdrs = ["Host: fuzz", "Upgrade: websocket", "Connection: Upgrade"]
        hdrs += rng.sample(["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 99",
                            "Sec-WebSocket-Key: !!!", "Sec-WebSocket-Key: " + base64.b64encode(b"x" * 16).decode()],
                           rng.randint(0, 3))
        return Req("ws", (f"GET {rng.choice(['/ws', '/', '/ws?x'])} HTTP/1.1\r\n" + "\r\n".join(hdrs)
                          + "\r\n\r\n").encode())
    frames: list[str | bytes] = list(hashserv_lines(rng))
    for _ in range(rng.randint(0, 2)):
        frames.insert(rng.randint(0, len(frames)), rng.randbytes(rng.randint(0, 500)))
    return WsReq(frames)


# --- sending ------------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: collections.Counter = field(default_factory=collections.Counter)
    answers: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    findings: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # HTTP requests closed without an answer

    def finding(self, text: str) -> None:
        if len(self.findings) < 50:
            self.findings.append(text)
        else:
            self.findings[-1] = f"... and more (last: {text})"


async def read_until_idle(reader: asyncio.StreamReader, idle: float) -> bytes:
    """What the server sends until it closes or stays quiet for ``idle`` seconds (at most 4 MiB)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < 4 << 20:
            chunk = await asyncio.wait_for(reader.read(65536), idle)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    return b"".join(chunks)


async def send_raw(req: Req, open_conn, tally: Tally) -> None:
    """Send ``req`` on a fresh connection; classify the answer. HTTP: aiohttp closes a half-closed
    connection at once, so the end of our side is signalled only if the server waited in vain
    (a body shorter than declared); hashserv: half-close at once (EOF ends the conversation)."""
    http = req.face in ("http-objects", "equivalent", "ws")
    reader, writer = await open_conn()
    try:
        try:
            writer.write(req.data)
            await writer.drain()
            if not http:
                writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the server closed on us mid-request: an answer may still be there
        reply = await read_until_idle(reader, IDLE_S)
        if http and not reply and not writer.is_closing():
            try:
                writer.write_eof()
            except (ConnectionError, OSError):
                pass
            reply = await read_until_idle(reader, IDLE_S)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    if http and reply:
        # the final status line: 100 Continue may come first (aiohttp answers in the request's
        # HTTP version, so "HTTP/2.0 400" is an answer too)
        lines = [ln.split() for ln in reply.split(b"\r\n") if ln.startswith(b"HTTP/")]
        finals = [ln for ln in lines if len(ln) > 1 and ln[1].isdigit() and not ln[1].startswith(b"1")]
        first = finals[0] if finals else (lines[0] if lines else [])
        if len(first) < 2 or not first[1].isdigit():
            tally.answers[req.face]["not an HTTP answer"] += 1
            tally.finding(f"{req.face}: not an HTTP answer to {req.data[:200]!r}: {reply[:200]!r}")
            return
        status = int(first[1])
        tally.answers[req.face]["101 upgraded" if status == 101 else f"{status // 100}xx"] += 1
        if status >= 500:
            tally.finding(f"{req.face}: {status} for {req.data[:300]!r} -> {reply[:300]!r}")
    elif http:
        tally.answers[req.face]["closed without an answer"] += 1
        if len(tally.unanswered) < 20:
            tally.unanswered.append(repr(req.data[:400]))
    else:
        tally.answers[req.face]["closed" if b"invoke-error" not in reply else "invoke-error, closed"] += 1


async def send_ws(req: WsReq, url: str, tally: Tally) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                for frame in req.frames:
                    if ws.closed:
                        break
                    if isinstance(frame, bytes):
                        await ws.send_bytes(frame)
                    else:
                        await ws.send_str(frame)
                await ws.close()
                tally.answers["ws"][f"closed ({ws.close_code})"] += 1
        except aiohttp.WSServerHandshakeError as e:
            tally.answers["ws"][f"{e.status // 100}xx"] += 1
            if e.status >= 500:
                tally.finding(f"ws upgrade: {e.status}")
        except (aiohttp.ClientError, ConnectionError):
            tally.answers["ws"]["closed"] += 1


# --- checks -----------------------------------------------------------------------------------


def healthz(svc: Service) -> bool:
    try:
        with urllib.request.urlopen(svc.url + "/healthz", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


async def hashserv_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b'{"ping": null}\n')
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    return json.loads(line or b"null") == {"alive": True}


async def valid_requests(svc: Service, tcp: tuple[str, int], unix: str) -> list[str]:
    """A valid GET, a report and its lookups on every transport; the failures, if any."""
    import aiohttp

    bad = []
    auth = {"Authorization": "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{svc.url}/{UNTOUCHED_KEY}", headers={"Range": "bytes=10-"}) as r:
            if r.status != 206 or await r.read() != OBJECT[10:]:
                bad.append(f"GET of an object the run left alone: {r.status}")
        t, o, u = hashlib.sha256(b"t").hexdigest(), hashlib.sha256(b"o").hexdigest(), hashlib.sha256(b"u").hexdigest()
        async with s.post(f"{svc.url}/v1/equivalent", headers=auth,
                          json={"taskhash": t, "method": "Fuzz", "outhash": o, "unihash": u}) as r:
            if r.status != 200:
                bad.append(f"POST /v1/equivalent: {r.status}")
        async with s.get(f"{svc.url}/v1/equivalent", params={"method": "Fuzz", "taskhash": t}) as r:
            if r.status != 200 or (await r.json())["unihash"] != u:
                bad.append("GET /v1/equivalent after the report")
        async with s.ws_connect(f"{svc.url.replace('http', 'ws')}/ws") as ws:
            await ws.send_str("OEHASHEQUIV 1.1")
            await ws.send_str("")
            await ws.send_str(json.dumps({"get": {"method": "Fuzz", "taskhash": t}}))
            if json.loads((await ws.receive(timeout=10)).data).get("unihash") != u:
                bad.append("ws get after the report")
    for name, opener in (("tcp", lambda: asyncio.open_connection(*tcp)), ("unix", lambda: asyncio.open_unix_connection(unix))):
        reader, writer = await opener()
        writer.write(b"OEHASHEQUIV 1.1\n\n" + json.dumps({"get": {"method": "Fuzz", "taskhash": t}}).encode() + b"\n")
        await writer.drain()
        if json.loads(await asyncio.wait_for(reader.readline(), 10)).get("unihash") != u:
            bad.append(f"{name} get after the report")
        writer.close()
    return bad


async def run(args: argparse.Namespace, work: Path) -> int:
    root = work / "root"  # the sentinel tree; the storage root is root/store
    root.mkdir()
    make_sentinels(root)
    run_dir, db_dir, log_dir = work / "run", work / "db", work / "logs"
    for d in (run_dir, db_dir, log_dir):
        d.mkdir()
    store = root / "store"
    (store / "fuzz").mkdir(parents=True)
    (store / OBJECT_KEY).write_bytes(OBJECT)
    (store / "kept").mkdir()
    (store / UNTOUCHED_KEY).write_bytes(OBJECT)
    skip = {store}
    before = snapshot(root, skip)

    tcp = ("127.0.0.1", free_port())
    unix = str(run_dir / "hs.sock")
    common = {"storage": {"path": str(store)}, "database": {"url": f"sqlite:///{db_dir / 'db.sqlite'}"},
              "limits": {"max_upload_bytes": MAX_UPLOAD, "max_request_body_bytes": MAX_BODY,
                         "max_message_bytes": MAX_MESSAGE}}
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    a = Service(log_dir / "a", config={**common, "hashserv": {"bind": f"{tcp[0]}:{tcp[1]}"}}, env=env,
                args=["--workers", str(args.workers)])
    b = Service(log_dir / "b", config={**common, "hashserv": {"bind": f"unix://{unix}"}}, env=env)
    a.start()
    b.start()
    tally = Tally()
    rng = random.Random(args.seed)
    faces = ["http-objects"] * 45 + ["equivalent"] * 20 + ["ws"] * 12 + ["tcp"] * 12 + ["unix"] * 11
    ok = True
    t0 = time.monotonic()
    try:
        by_reader, by_writer = await asyncio.open_connection(*tcp)  # the bystander, opened before
        by_writer.write(b"OEHASHEQUIV 1.1\n\n")
        sem = asyncio.Semaphore(args.concurrency)
        http_open = lambda: asyncio.open_connection("127.0.0.1", a.port)  # noqa: E731
        openers = {"http-objects": http_open, "equivalent": http_open, "ws": http_open,
                   "tcp": lambda: asyncio.open_connection(*tcp), "unix": lambda: asyncio.open_unix_connection(unix)}

        async def one(i: int) -> None:
            face = rng.choice(faces)
            if face == "http-objects":
                req = http_request(rng)
            elif face == "equivalent":
                req = equivalent_request(rng)
            elif face == "ws":
                req = ws_request(rng)
            else:
                req = stream_request(rng, face)
            tally.sent[face] += 1
            async with sem:
                try:
                    if isinstance(req, WsReq):
                        await send_ws(req, f"ws://127.0.0.1:{a.port}/ws", tally)
                    else:
                        await send_raw(req, openers[face], tally)
                except (ConnectionRefusedError, FileNotFoundError) as e:
                    tally.finding(f"{face}: cannot connect ({e}): the service is down?")

        batch = 500
        for start in range(0, args.requests, batch):
            await asyncio.gather(*(one(i) for i in range(start, min(args.requests, start + batch))))
            alive = healthz(a) and healthz(b) and a.proc.poll() is None and b.proc.poll() is None
            if not alive:
                tally.finding(f"a service stopped answering /healthz after {start + batch} requests")
                break
        if not await hashserv_ping(by_reader, by_writer):
            tally.finding("the bystander hashserv connection stopped answering")
        by_writer.close()
        for failure in await valid_requests(a, tcp, unix):
            tally.finding(f"after the run: {failure}")
    finally:
        elapsed = time.monotonic() - t0
        a.stop()
        b.stop()
    after = snapshot(root, skip)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for k in changed:
        tally.finding(f"outside the storage root: {k} {before.get(k)} -> {after.get(k)}")
    for svc in (a, b):
        log = svc.read_log()
        if "Traceback" in log or "internal error" in log:
            i = log.find("Traceback") if "Traceback" in log else log.find("internal error")
            tally.finding(f"service log has a traceback/internal error: {log[max(0, i - 300):i + 1500]}")
    ok = not tally.findings
    report(args, tally, elapsed, len(before))
    if args.json:
        Path(args.json).write_text(json.dumps({"sent": tally.sent, "answers": tally.answers, "findings": tally.findings,
                                               "unanswered": tally.unanswered, "seconds": round(elapsed, 1)}, indent=1))
    return 0 if ok else 1


def report(args: argparse.Namespace, tally: Tally, elapsed: float, sentinels: int) -> None:
    print(f"## Fuzz run: {sum(tally.sent.values())} malformed requests, seed {args.seed}, "
          f"{args.workers} worker(s), concurrency {args.concurrency}, {elapsed:.1f} s")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print("| face | requests | answers |")
    print("|---|---:|---|")
    for face in ("http-objects", "equivalent", "ws", "tcp", "unix"):
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(tally.answers[face].items()))
        print(f"| {face} | {tally.sent[face]} | {answers} |")
    print(f"\nsentinel files and directories checked: {sentinels}")
    print("findings: " + ("none" if not tally.findings else ""))
    for f in tally.findings:
        print(f"- {f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=12_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the HTTP/tcp service")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    ap.add_argument("--json", metavar="FILE", help="also write the counts and findings as JSON")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sstate-proxy-fuzz."))
    try:
        return asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
