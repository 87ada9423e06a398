"""Property tests (hypothesis) of OEHASHEQUIV framing against the running service, over raw tcp
and over websocket: malformed, oversized and binary frames never crash the server, every
hostile connection ends (closed, or an answer), and a connection opened before keeps working."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.sync.client import connect as ws_connect

from tests.service import Service, free_port

OVER_NET = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
MAX_MESSAGE = 64 * 1024  # [limits] max_message_bytes of the service under test
HANDSHAKE = b"OEHASHEQUIV 1.1\n\n"
H64 = "a" * 64
PING = json.dumps({"ping": None})

# Valid messages with hostile arguments, then raw frames.
_ARG = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                              st.text(max_size=20), st.just(H64)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.sampled_from(["method", "taskhash", "outhash",
                                                                             "unihash", "all", "where", "mark",
                                                                             "username", "token", "permissions",
                                                                             "max_age_seconds", "PN"]),
                                                            inner, max_size=5)),
                    max_leaves=8)
_COMMANDS = st.sampled_from(["ping", "get", "get-outhash", "get-stream", "exists-stream", "report", "report-equiv",
                             "get-stats", "reset-stats", "auth", "get-user", "new-user", "set-user-perms",
                             "remove", "gc-mark", "gc-mark-stream", "gc-sweep", "clean-unused", "backfill-wait",
                             "chunk-stream", "become-user", "nope"])
MESSAGES = st.builds(lambda cmd, arg: json.dumps({cmd: arg}), _COMMANDS, _ARG)
_DEEP = st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)
_LINES = st.one_of(MESSAGES, st.text(max_size=200), _DEEP, st.sampled_from(
    ["", "END", "\r", '{"chunk-stream": null}', "OEHASHEQUIV 1.1", "OEHASHEQUIV 9.9", "needs-headers: true",
     "x" * (MAX_MESSAGE + 10), '{"get-stream": null}', "TestMethod " + H64]))


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tcp = free_port()
    s = Service(tmp_path_factory.mktemp("fuzz-hashserv"), args=["--hashserv-bind", f"127.0.0.1:{tcp}"],
                config={"limits": {"max_message_bytes": MAX_MESSAGE}, "hashserv": {"anon_perms": ["@read", "@report"]}})
    s.start()
    s.tcp = ("127.0.0.1", tcp)
    s.ws = f"ws://127.0.0.1:{s.port}/ws"
    s.bystander = open_tcp(s.tcp)  # opened before the fuzzing, asked after every example
    yield s
    s.bystander.close()
    log = s.read_log()
    s.stop()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def open_tcp(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=10)
    sock.sendall(HANDSHAKE)
    return sock


def tcp_ping(sock: socket.socket) -> None:
    sock.sendall(PING.encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "the server closed a healthy connection"
        reply += chunk
    assert json.loads(reply) == {"alive": True}


def drain(sock: socket.socket) -> None:
    """Read until the server closes or stops talking (2 s): it must not hang up on anyone else."""
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except OSError:  # timeout, reset
        pass


def still_serving(svc) -> None:
    tcp_ping(svc.bystander)
    with open_tcp(svc.tcp) as fresh:
        tcp_ping(fresh)


@OVER_NET
@given(st.booleans(), st.lists(_LINES, max_size=6), st.binary(max_size=300))
def test_malformed_tcp_frames(svc, handshake, lines, tail):
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        data = (HANDSHAKE if handshake else b"") + "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
        try:
            sock.sendall(data + tail)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us mid-send (reset, or not connected any more): fine
        drain(sock)
    still_serving(svc)


@OVER_NET
@given(st.binary(min_size=1, max_size=2000))
def test_random_bytes_over_tcp(svc, data):
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        try:
            sock.sendall(HANDSHAKE + data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us mid-send: fine
        drain(sock)
    still_serving(svc)


WS_FRAMES = st.lists(st.one_of(_LINES, st.binary(max_size=300),
                               st.sampled_from([b"\x00" * (MAX_MESSAGE + 1), "y" * (MAX_MESSAGE + 1)])), max_size=5)


@OVER_NET
@given(st.booleans(), WS_FRAMES)
def test_malformed_websocket_frames(svc, handshake, frames):
    try:
        with ws_connect(svc.ws, open_timeout=10, close_timeout=2, max_size=None) as ws:
            if handshake:
                ws.send("OEHASHEQUIV 1.1")
                ws.send("")
            for frame in frames:
                ws.send(frame)
            # leaving the block closes the connection (the server must follow within close_timeout)
    except (ConnectionClosed, InvalidMessage, OSError):
        pass  # the server closed: that is the answer to malformed input
    still_serving(svc)
    with ws_connect(svc.ws, open_timeout=10) as ws:  # and websocket still works
        ws.send("OEHASHEQUIV 1.1")
        ws.send("")
        ws.send(PING)
        assert json.loads(ws.recv(timeout=5)) == {"alive": True}
