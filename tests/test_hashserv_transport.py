"""The OEHASHEQUIV stream transport (tcp, unix) as a client sees it: pipelining, chunked
messages both ways, half lines, oversized lines, many connections at once, and one listener per
port."""

from __future__ import annotations

import asyncio
import errno
import json
import socket

import pytest

from proxy.hashserv.framing import CHUNK_HEADER, MAX_CHUNK
from proxy.hashserv.listeners import bind_socket
from storage.equivalence import open_equivalence_db
from tests.hashserv_client import connect
from tests.test_hashserv import (
    ADMIN,
    ADMIN_TOKEN,
    M,
    assert_closed_without_reply,
    clients,
    h,
    handshake,
    make_server,
    raw_open,
)

__all__ = ["clients", "make_server"]  # fixtures shared with test_hashserv

STREAMS = ("tcp", "unix")


@pytest.fixture
def new_database(tmp_path):
    """make_server's database: SQLite only here (these tests are about the transport;
    test_hashserv.py runs the protocol on every engine)."""
    return lambda name: open_equivalence_db(f"sqlite:///{tmp_path / name / 'equiv.db'}")


@pytest.mark.parametrize("transport", STREAMS)
async def test_get_stream_of_10000_lines_sent_in_one_write(make_server, transport):
    srv = await make_server()
    known = {h("k", i): h("u", i) for i in range(100)}
    for t, u in known.items():
        await srv.db.insert_unihash(M, t, u)
    taskhashes = [h("k", i) if i % 2 else h("miss", i) for i in range(10_000)]
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    w.write(b'{"get-stream": null}\n' + "".join(f"{M} {t}\n" for t in taskhashes).encode() + b'END\n{"ping": {}}\n')
    await w.drain()
    assert await r.readline() == b'"ok"\n'
    got = [await asyncio.wait_for(r.readline(), 10) for _ in taskhashes]
    assert got == [(known.get(t, "") + "\n").encode() for t in taskhashes]
    assert await r.readline() == b"ok\n"
    assert await r.readline() == b'{"alive": true}\n'
    w.close()


def chunked(text: str) -> bytes:
    """bitbake's wire form of a long message: header, MAX_CHUNK - 1 character lines, empty line."""
    step = MAX_CHUNK - 1
    return "\n".join([CHUNK_HEADER, *(text[i:i + step] for i in range(0, len(text), step)), "", ""]).encode()


@pytest.mark.parametrize("transport", STREAMS)
async def test_a_100_kib_message_is_chunked_both_ways(make_server, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    t, o, u = h("c", "t"), h("c", "o"), h("c", "u")
    siginfo = "".join(chr(ord("a") + i % 26) for i in range(100 * 1024))
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    # logged in: the get below answers the task data (outhash_siginfo), which needs @task-data
    w.write((json.dumps({"auth": {"username": ADMIN, "token": ADMIN_TOKEN}}) + "\n").encode())
    assert json.loads(await r.readline())["result"] is True
    report = json.dumps({"report": {"taskhash": t, "method": M, "outhash": o, "unihash": u,
                                    "outhash_siginfo": siginfo}})
    w.write(chunked(report))
    assert json.loads(await r.readline()) == {"taskhash": t, "method": M, "unihash": u}
    w.write((json.dumps({"get": {"method": M, "taskhash": t, "all": True}}) + "\n").encode())
    assert await r.readline() == (CHUNK_HEADER + "\n").encode()
    parts = []
    while (line := await r.readline()) != b"\n":
        assert line.endswith(b"\n") and len(line) <= MAX_CHUNK
        parts.append(line[:-1])
    assert all(len(p) == MAX_CHUNK - 1 for p in parts[:-1])
    row = json.loads(b"".join(parts))
    assert row["outhash_siginfo"] == siginfo and row["unihash"] == u
    w.write(b'{"ping": {}}\n')
    assert await r.readline() == b'{"alive": true}\n'
    w.close()


@pytest.mark.parametrize("transport", STREAMS)
async def test_a_client_that_sends_half_a_line_and_leaves(make_server, clients, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    for cut in (b"OEHASH", b'OEHASHEQUIV 1.1\nneeds-headers: false\n\n{"report": {"taskhash": "'):
        r, w = await raw_open(srv.addr[transport])
        w.write(cut)
        await w.drain()
        w.close()
        await w.wait_closed()
    c = await clients(srv.addr[transport])
    assert await c.ping() == {"alive": True}
    assert (await srv.db.get_usage())["outhashes_v2"]["rows"] == 0
    await asyncio.wait_for(srv.svc.stop(), 5)  # nothing left hanging


@pytest.mark.parametrize("transport", STREAMS)
async def test_a_line_longer_than_the_bound_closes_the_connection(make_server, clients, transport):
    srv = await make_server()
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'
    w.write(b"x" * (srv.svc.max_message + 2) + b"\n")  # a stream line is bounded as any other
    await assert_closed_without_reply(r)
    w.close()
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    w.write(b'{"ping": {"pad": "' + b"y" * (srv.svc.max_message - 30) + b'"}}\n')  # within the bound
    assert await r.readline() == b'{"alive": true}\n'
    w.close()


@pytest.mark.parametrize("transport", ("tcp", "unix", "ws"))
async def test_many_connections_at_once(make_server, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    n = 40

    async def client(i: int) -> None:
        c = await connect(srv.addr[transport])
        try:
            t, o, u = h("cc", i), h("co", i // 2), h("cu", i)
            got = (await c.report_unihash(t, M, o, u))["unihash"]
            assert got in (u, h("cu", i ^ 1))  # a pair shares an outhash: whoever came first
            assert await c.get_unihash_batch([(M, t), (M, h("none", i))]) == [got, None]
            assert await c.unihash_exists(got)
        finally:
            await c.close()

    await asyncio.gather(*(client(i) for i in range(n)))
    pairs = [[await srv.db.get_unihash(M, h("cc", i)) for i in (2 * k, 2 * k + 1)] for k in range(n // 2)]
    assert all(a["unihash"] == b["unihash"] for a, b in pairs)


async def test_a_taken_tcp_port_cannot_be_bound_twice():
    first = bind_socket("127.0.0.1:0")
    try:
        port = first.getsockname()[1]
        with pytest.raises(OSError) as e:
            bind_socket(f"127.0.0.1:{port}")
        assert e.value.errno == errno.EADDRINUSE
        assert not first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        first.close()
