"""The limits of the real service ([limits], [server] shutdown_grace_s), over real sockets: a
request head that does not arrive in time, an idle keep-alive connection, a stalled body, more
connections than allowed, the OEHASHEQUIV handshake deadline, and the graceful drain on SIGTERM.
Every timeout is configured small here, so each is seen within a few seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import signal
import socket
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from tests.service import Service, free_port

HEADER_S = 1.0
IDLE_S = 2.5
BODY_S = 1.0
SLACK_S = 1.0  # scheduling slack on a loaded CI machine


def obj_key() -> str:
    h = random.getrandbits(256).to_bytes(32, "big").hex()
    return f"{h[:2]}/{h[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{h}_populate_sysroot.tar.zst"


def request(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def put_head(key: str, length: int) -> bytes:
    return request("PUT", "/" + quote(key), f"Content-Length: {length}\r\n")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def response_head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body bytes received with the head)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def response(s: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length."""
    status, headers, body = response_head(s)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("body cut short")
        body += chunk
    return status, body[:length]


def seconds_until_closed(s: socket.socket, limit: float = 10.0) -> float:
    """How long until the server closes ``s`` (reading and dropping anything it sends)."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - t0


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One service with small timeouts, anonymous uploads, and a raw hashserv listener."""
    work = tmp_path_factory.mktemp("limits")
    hs_port = free_port()
    service = Service(work / "svc", config={
        "limits": {"header_timeout_s": HEADER_S, "idle_timeout_s": IDLE_S, "body_timeout_s": BODY_S},
        "hashserv": {"anon_perms": ["@read", "@upload", "@report"], "bind": f"127.0.0.1:{hs_port}"},
    })
    service.hs_port = hs_port
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_a_request_head_must_arrive_in_time(limited):
    port = limited.port

    def silent() -> float:
        return seconds_until_closed(connect(port))

    def half_head() -> float:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        return seconds_until_closed(s)

    def trickle() -> float:
        """Slowloris: a byte of head every 0.1 s. The deadline is for the whole head."""
        s = connect(port)
        t0 = time.monotonic()
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-Pad: ")
            for _ in range(60):
                time.sleep(0.1)
                s.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            pass
        return time.monotonic() - t0 + seconds_until_closed(s)

    def second_request_half_sent() -> float:
        """On a kept-alive connection the deadline starts with the next head's first byte."""
        s = connect(port)
        s.sendall(request("GET", "/healthz"))
        assert response(s)[0] == 200
        time.sleep(IDLE_S / 2)  # idle, longer than the head deadline: not counted against it
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        return seconds_until_closed(s)

    def in_time() -> int:
        s = connect(port)
        time.sleep(HEADER_S * 0.6)
        s.sendall(request("GET", "/healthz"))
        return response(s)[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        cut = [pool.submit(f) for f in (silent, half_head, trickle, second_request_half_sent)]
        ok = pool.submit(in_time)
        times = [f.result() for f in cut]
        assert ok.result() == 200
    for t in times:
        assert HEADER_S * 0.8 <= t <= HEADER_S + SLACK_S, times


def test_idle_keep_alive_connections_close_and_busy_ones_do_not(limited):
    port = limited.port

    def idle() -> float:
        s = connect(port)
        s.sendall(request("GET", "/healthz"))
        assert response(s)[0] == 200
        return seconds_until_closed(s)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waited = pool.submit(idle)
        busy = connect(port)
        t0 = time.monotonic()
        # requests spaced wider than the head deadline but within the idle bound keep it open
        for _ in range(3):
            busy.sendall(request("GET", "/healthz"))
            assert response(busy)[0] == 200
            time.sleep(HEADER_S * 1.5)
        assert time.monotonic() - t0 > IDLE_S
        busy.sendall(request("GET", "/healthz"))
        assert response(busy)[0] == 200
        assert IDLE_S * 0.8 <= waited.result() <= IDLE_S + SLACK_S


def test_a_stalled_body_is_cut_and_nothing_stored(limited):
    key = obj_key()
    s = connect(limited.port)
    s.sendall(put_head(key, 100_000) + b"x" * 1000)
    t0 = time.monotonic()
    status, head, _ = response_head(s)
    assert status == 408 and head.get("connection") == "close"
    assert BODY_S * 0.8 <= time.monotonic() - t0 <= BODY_S + SLACK_S
    # closed by the server after reading what else might come for another body_timeout_s
    assert seconds_until_closed(s) < BODY_S + SLACK_S
    assert stored_files(limited.storage) == []  # no object, no temp file
    c = connect(limited.port)
    c.sendall(request("GET", "/" + quote(key)))
    assert response(c)[0] == 404


def test_a_slow_but_steady_body_is_not_cut(limited):
    key = obj_key()
    data = os.urandom(40_000)
    s = connect(limited.port)
    s.sendall(put_head(key, len(data)))
    t0 = time.monotonic()
    for i in range(0, len(data), 10_000):  # a piece every 0.6 s: 2.4 s in all, > body_timeout_s
        time.sleep(BODY_S * 0.6)
        s.sendall(data[i:i + 10_000])
    assert time.monotonic() - t0 > BODY_S * 2
    assert response(s)[0] == 201
    assert (limited.storage / key).read_bytes() == data


def test_a_report_body_in_pieces_is_read_whole_and_a_stalled_one_cut(limited):
    body = json.dumps({"method": "m.pieces", "taskhash": "a1" * 32, "outhash": "b2" * 32,
                       "unihash": "c3" * 32, "owner": "t"}).encode()
    head = (f"POST /v1/equivalent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s = connect(limited.port)
    s.sendall(head + body[:20])
    time.sleep(BODY_S * 0.5)  # the rest comes later, within the stall bound
    s.sendall(body[20:])
    status, answer = response(s)
    assert status == 200 and json.loads(answer)["unihash"] == "c3" * 32
    s = connect(limited.port)
    s.sendall(head + body[:20])  # and never the rest
    status, _, _ = response_head(s)
    assert status == 408


async def test_hashserv_handshake_deadline_but_idle_clients_stay(limited):
    """bitbake holds its hashserv connection idle for a whole build: only a connection that
    never completes its handshake is cut, on the raw listener as on the websocket."""

    def raw_silent() -> float:
        return seconds_until_closed(connect(limited.hs_port))

    def raw_idle_after_handshake() -> bytes:
        s = connect(limited.hs_port)
        s.sendall(b"OEHASHEQUIV 1.1\n\n")
        time.sleep(IDLE_S + HEADER_S)  # past both HTTP bounds
        s.sendall(b'{"ping": {}}\n')
        return s.recv(1000)

    raw = asyncio.gather(asyncio.to_thread(raw_silent), asyncio.to_thread(raw_idle_after_handshake))
    async with aiohttp.ClientSession() as session:
        silent = await session.ws_connect(f"{limited.url}/ws", autoping=True)
        idle = await session.ws_connect(f"{limited.url}/ws", autoping=True)
        await idle.send_str("OEHASHEQUIV 1.1")
        await idle.send_str("")
        t0 = time.monotonic()
        msg = await silent.receive(timeout=HEADER_S + SLACK_S)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert time.monotonic() - t0 >= HEADER_S * 0.8
        await asyncio.sleep(IDLE_S + HEADER_S)
        await idle.send_str('{"ping": {}}')
        msg = await idle.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT and msg.data == '{"alive": true}'
        await idle.close()
    raw_silent_s, raw_reply = await raw
    assert HEADER_S * 0.8 <= raw_silent_s <= HEADER_S + SLACK_S
    assert raw_reply == b'{"alive": true}\n'


def test_too_many_connections_are_refused_while_the_others_work(tmp_path):
    cap = 4
    service = Service(tmp_path / "svc", config={"limits": {"max_connections": cap}})
    with service:
        held = [connect(service.port) for _ in range(cap)]
        for s in held:  # each is served, so each is counted
            s.sendall(request("GET", "/healthz"))
            assert response(s)[0] == 200
        extra = connect(service.port)
        try:
            extra.sendall(request("GET", "/healthz"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert seconds_until_closed(extra) < SLACK_S  # closed at once, without an answer
        for s in held:
            s.sendall(request("GET", "/healthz"))
            assert response(s)[0] == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the close shortly; then there is room for one more
            s = connect(service.port)
            try:
                s.sendall(request("GET", "/healthz"))
                assert response(s)[0] == 200
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert "max_connections" in service.read_log()


def test_too_many_raw_hashserv_connections_are_refused(tmp_path):
    hs_port = free_port()
    service = Service(tmp_path / "svc", config={
        "limits": {"max_hashserv_connections": 2},
        "hashserv": {"bind": f"127.0.0.1:{hs_port}"},
    })
    with service:
        held = [connect(hs_port) for _ in range(2)]
        for s in held:
            s.sendall(b'OEHASHEQUIV 1.1\n\n{"ping": {}}\n')
            assert s.recv(1000) == b'{"alive": true}\n'
        assert seconds_until_closed(connect(hs_port)) < SLACK_S
        for s in held:
            s.sendall(b'{"ping": {}}\n')
            assert s.recv(1000) == b'{"alive": true}\n'


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(tmp_path, workers):
    service = Service(tmp_path / "svc", args=["--workers", str(workers)], config={
        "server": {"shutdown_grace_s": 8},
        "hashserv": {"anon_perms": ["@read", "@upload"]},
    })
    large = obj_key()
    (service.storage / large).parent.mkdir(parents=True)
    content = os.urandom(8 << 20)
    (service.storage / large).write_bytes(content)
    upload_key = obj_key()
    upload = os.urandom(300_000)
    service.start()
    try:
        idle = connect(service.port)  # kept alive, nothing in flight: closed at once
        idle.sendall(request("GET", "/healthz"))
        assert response(idle)[0] == 200
        getter = socket.socket()
        getter.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the body stays in flight
        getter.settimeout(10)
        getter.connect(("127.0.0.1", service.port))
        getter.sendall(request("GET", "/" + quote(large)))
        got = getter.recv(65536)
        putter = connect(service.port)
        putter.sendall(put_head(upload_key, len(upload)) + upload[:100_000])
        time.sleep(0.2)
        service.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while True:  # the listening socket goes away: new connections are refused
            try:
                connect(service.port).close()
            except (ConnectionRefusedError, ConnectionResetError):
                # refused; or reset: queued in the backlog just as the listening socket closed
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        idle.sendall(request("GET", "/healthz"))  # a new request during the drain is refused:
        if workers == 1:
            status, headers, _ = response_head(idle)
            assert status == 503 and headers["retry-after"] and headers["connection"] == "close"
        # (with several workers, the idle connection's worker may have had nothing in flight
        # and be gone already, its connections closed)
        assert seconds_until_closed(idle) < SLACK_S
        putter.sendall(upload[100_000:])  # the upload in flight completes...
        assert response(putter)[0] == 201
        while chunk := getter.recv(1 << 20):  # ...and so does the download
            got += chunk
        assert got.split(b"\r\n\r\n", 1)[1] == content
        assert service.proc.wait(10) == 0
    finally:
        service.stop()
    assert (service.storage / upload_key).read_bytes() == upload


def test_the_grace_period_bounds_the_drain(tmp_path):
    grace = 1.0
    service = Service(tmp_path / "svc", config={
        "server": {"shutdown_grace_s": grace},
        "hashserv": {"anon_perms": ["@read", "@upload"]},
    })
    key = obj_key()
    with service:
        stuck = connect(service.port)
        stuck.sendall(put_head(key, 100_000) + b"x" * 1000)  # and never the rest
        time.sleep(0.2)
        t0 = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(10) == 0
        # the grace, then a second for answers already given, then what runs is cancelled
        assert grace * 0.8 <= time.monotonic() - t0 <= grace + 1 + 2 * SLACK_S
        assert seconds_until_closed(stuck) < SLACK_S
    assert stored_files(service.storage) == []
