"""OEHASHEQUIV 1.1 face: a real HashservService on real sockets (tcp, unix, websocket), driven by
bitbake's own RPC client layer (bb.asyncrpc from bitbake-setup, see tests/hashserv_client.py)
and by raw sockets for the framing and error cases."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import aiohttp
import bb.asyncrpc
import pytest
from aiohttp import web

from proxy.auth import Auth, Identity, hash_token, parse_permissions, verify_token
from proxy.config import Config, HashservConfig
from proxy.hashserv import HashservService
from proxy.reports import Reporter
from proxy.upstream_hashserv import UpstreamHashserv
from storage.equivalence import EquivalenceDB, open_equivalence_db
from tests.hashserv_client import HashClient, connect

M = "TestMethod"
ADMIN, ADMIN_TOKEN = "admin", "password"
TRANSPORTS = ("tcp", "unix", "ws")


def h(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


@dataclass
class Server:
    svc: HashservService
    db: EquivalenceDB
    auth: Auth
    addr: dict[str, str]
    changes: list[int] = field(default_factory=list)
    runner: web.AppRunner | None = None
    reporter: Reporter | None = None

    async def stop(self) -> None:
        await self.svc.stop()
        await self.reporter.close()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.db.close()


@pytest.fixture(params=["sqlite", "postgres"])
def new_database(request, tmp_path):
    """Opens a fresh equivalence database of one engine (name -> db); every test runs on both."""
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")  # tests/pg.py
        return lambda name: open_equivalence_db(cluster.create_database())
    return lambda name: open_equivalence_db(f"sqlite:///{tmp_path / name / 'equiv.db'}")


@pytest.fixture
async def make_server(tmp_path, new_database):
    servers: list[Server] = []

    async def make(name: str = "hs", anon_perms=("@read",), read_only: bool = False,
                   upstream: str = "") -> Server:
        d = tmp_path / name
        d.mkdir()
        db = new_database(name)
        auth = Auth(db, anon_perms)
        await auth.ensure_admin(ADMIN, ADMIN_TOKEN)
        cfg = replace(Config(), hashserv=HashservConfig(anon_perms=tuple(anon_perms), read_only=read_only,
                                                        upstream=upstream))
        srv = Server(None, db, auth, {})  # type: ignore[arg-type]
        reporter = Reporter(db, auth, read_only=read_only, upstream=UpstreamHashserv(upstream) if upstream else None,
                            on_change=lambda: srv.changes.append(1))
        svc = HashservService(db, auth, cfg, reporter)
        srv.svc = svc
        srv.reporter = reporter
        await svc.start()
        srv.addr["tcp"] = await svc.listen("127.0.0.1:0")
        srv.addr["unix"] = await svc.listen(f"unix://{d}/hs.sock")
        app = web.Application()
        app.router.add_get("/ws", svc.handle_websocket)
        srv.runner = web.AppRunner(app)
        await srv.runner.setup()
        site = web.TCPSite(srv.runner, "127.0.0.1", 0)
        await site.start()
        port = srv.runner.addresses[0][1]
        srv.addr["ws"] = f"ws://127.0.0.1:{port}/ws"
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        await s.stop()


@pytest.fixture
async def clients():
    opened: list[HashClient] = []

    async def make(address: str, username: str | None = None, password: str | None = None) -> HashClient:
        c = await connect(address, username, password)
        opened.append(c)
        return c

    yield make
    for c in opened:
        await c.close()


# --- core semantics, all transports ---------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_report_get_and_streams(make_server, clients, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    c = await clients(srv.addr[transport])
    assert await c.ping() == {"alive": True}
    t1, o1, u1 = h(1, "t"), h(1, "o"), h(1, "u")
    assert await c.get_unihash(M, t1) is None
    r = await c.report_unihash(t1, M, o1, u1, {"PN": "zlib", "owner": "someone"})
    assert r == {"taskhash": t1, "method": M, "unihash": u1}
    assert srv.changes
    # second taskhash, same outhash -> equivalent: gets the first unihash
    t2, u2 = h(2, "t"), h(2, "u")
    assert (await c.report_unihash(t2, M, o1, u2))["unihash"] == u1
    # first writer wins per taskhash
    assert (await c.report_unihash(t1, M, h(3, "o"), h(3, "u")))["unihash"] == u1
    assert await c.get_taskhash(M, t1) == {"taskhash": t1, "method": M, "unihash": u1}
    full = await c.get_taskhash(M, t1, True)
    assert full["outhash"] == o1 and full["unihash"] == u1
    assert full["PN"] is None and full["owner"] is None  # task data: not for anonymous clients
    admin = await clients(srv.addr[transport], ADMIN, ADMIN_TOKEN)
    full_admin = await admin.get_taskhash(M, t1, True)
    assert full_admin["PN"] == "zlib"
    assert full_admin["owner"] == "someone"  # anonymous reports keep the client's owner
    # as bitbake-hashserv answers it for that database: UTC ISO text (sqlite), naive ISO (PostgreSQL)
    from storage.equivalence.postgres import PostgresEquivalenceDB
    naive = isinstance(srv.db, PostgresEquivalenceDB)
    assert (datetime.fromisoformat(full["created"]).tzinfo is None) == naive
    assert naive or full["created"].endswith("+00:00")
    assert set(full) >= {"id", "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task",
                         "outhash_siginfo", "unihash", "gc_mark"}
    assert await c.get_taskhash(M, h("nope")) is None
    assert await c.get_taskhash(M, h("nope"), True) is None
    o = await c.get_outhash(M, o1, t1)
    assert o["taskhash"] == t1 and o["unihash"] == u1
    bare = await c.get_outhash(M, o1, t1, False)
    assert "unihash" not in bare and bare["outhash"] == o1
    # stream modes, pipelined, with misses; switching between modes
    got = await c.get_unihash_batch([(M, t1), (M, h("miss")), (M, t2), ("Other", t1)])
    assert got == [u1, None, u1, None]
    assert await c.unihash_exists_batch([u1, u2, "not-a-hash"]) == [True, False, False]
    assert await c.get_unihash(M, t2) == u1
    # report-equiv: stored if new, the existing mapping otherwise
    t4 = h(4, "t")
    srv.changes.clear()
    assert (await c.report_unihash_equiv(t4, M, u1))["unihash"] == u1
    assert srv.changes  # on_change after every committed write
    assert (await c.report_unihash_equiv(t4, M, h(9)))["unihash"] == u1
    stats = (await c.get_stats())["requests"]
    assert stats["num"] > 5 and set(stats) == {"num", "total_time", "max_time", "average", "stdev"}
    assert await c.backfill_wait() == 0  # no upstream: no crash


def spaced_siginfo(n: int = 80_000, prefix: int = len('{"report": {"outhash_siginfo": "')) -> str:
    """n characters with spaces around every 32767-character cut of the request's JSON text
    (bitbake's own reader would drop them: it rstrip()s every chunk line)."""
    s = ["x"] * n
    for cut in range(32767, n + prefix, 32767):
        for i in range(cut - prefix - 3, cut - prefix + 3):
            if 0 <= i < n:
                s[i] = " "
    return "".join(s)


async def raw_request(address: str, msg: dict, login: tuple[str, str] | None = None) -> object:
    """One request over a raw stream socket (after an ``auth`` as ``login``, if given); the reply
    de-chunked stripping only the newline."""
    r, w = await raw_open(address)
    await handshake(w)
    if login is not None:
        w.write((json.dumps({"auth": {"username": login[0], "token": login[1]}}) + "\n").encode())
        assert json.loads(await r.readline())["result"] is True
    w.write((json.dumps(msg) + "\n").encode())
    line = (await r.readline()).rstrip(b"\n")
    if line == b'{"chunk-stream": null}':
        parts = []
        while (part := (await r.readline()).rstrip(b"\n")):
            parts.append(part)
        line = b"".join(parts)
    w.close()
    return json.loads(line)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_big_message_survives_chunking(make_server, clients, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    c = await clients(srv.addr[transport])
    t, o, u = h("big", "t"), h("big", "o"), h("big", "u")
    siginfo = spaced_siginfo()
    await c.report_unihash(t, M, o, u, {"outhash_siginfo": siginfo})
    # the request was reassembled intact (only the newline is stripped from chunk lines)
    assert (await srv.db.get_unihash_full(M, t))["outhash_siginfo"] == siginfo
    if transport == "ws":
        a = await clients(srv.addr[transport], ADMIN, ADMIN_TOKEN)  # task data needs @task-data
        assert (await a.get_taskhash(M, t, True))["outhash_siginfo"] == siginfo
    else:  # the chunked reply, read without bitbake's rstrip()
        reply = await raw_request(srv.addr[transport], {"get": {"method": M, "taskhash": t, "all": True}},
                                  login=(ADMIN, ADMIN_TOKEN))
        assert reply["outhash_siginfo"] == siginfo
    siginfo2 = "a " * 40000
    t2, o2 = h("big2", "t"), h("big2", "o")
    await c.report_unihash(t2, M, o2, u, {"outhash_siginfo": siginfo2})
    assert (await srv.db.get_outhash(M, o2))["outhash_siginfo"] == siginfo2
    assert await c.ping() == {"alive": True}


async def test_ws_reply_never_exceeds_1mib(make_server, clients):
    srv = await make_server()
    t, o, u = h("huge", "t"), h("huge", "o"), h("huge", "u")
    await srv.db.insert_outhash({"method": M, "taskhash": t, "outhash": o, "outhash_siginfo": "x" * 1_200_000})
    await srv.db.insert_unihash(M, t, u)
    c = await clients(srv.addr["ws"], ADMIN, ADMIN_TOKEN)  # task data needs @task-data
    row = await c.get_taskhash(M, t, True)
    assert row["unihash"] == u and 0 < len(row["outhash_siginfo"]) < 1_048_576
    assert len(json.dumps(row)) <= 1_048_576
    assert await c.ping() == {"alive": True}
    # over tcp the whole row comes back (chunked)
    c2 = await clients(srv.addr["tcp"], ADMIN, ADMIN_TOKEN)
    assert len((await c2.get_taskhash(M, t, True))["outhash_siginfo"]) == 1_200_000


# --- raw framing ------------------------------------------------------------------------------


async def raw_open(address: str):
    if address.startswith("unix://"):
        return await asyncio.open_unix_connection(address[len("unix://"):], limit=1 << 24)
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), limit=1 << 24)


async def handshake(w, extra: str = "") -> None:
    w.write(f"OEHASHEQUIV 1.1\nneeds-headers: false\n{extra}\n".encode())
    await w.drain()


async def assert_closed_without_reply(r) -> None:
    data = await asyncio.wait_for(r.read(), 5)
    assert data == b""


@pytest.mark.parametrize("transport", ("tcp", "unix"))
async def test_raw_stream_modes(make_server, transport):
    srv = await make_server(anon_perms=("@read", "@report"))
    t, o, u = h("r", "t"), h("r", "o"), h("r", "u")
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    w.write((json.dumps({"report": {"taskhash": t, "method": M, "outhash": o, "unihash": u}}) + "\n").encode())
    assert json.loads(await r.readline()) == {"taskhash": t, "method": M, "unihash": u}
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'  # entering: the JSON string
    w.write(f"{M} {t}\r\n{M} {h('miss')}\n{M} {t}\nEND\n".encode())
    assert await r.readline() == (u + "\n").encode()
    assert await r.readline() == b"\n"  # a miss is an empty line
    assert await r.readline() == (u + "\n").encode()
    assert await r.readline() == b"ok\n"  # leaving: bare ok
    w.write(b'{"exists-stream": null}\n')
    assert await r.readline() == b'"ok"\n'
    w.write(f"{u}\n{h('x')}\n\n".encode())  # an empty line also leaves stream mode
    assert [await r.readline() for _ in range(3)] == [b"true\n", b"false\n", b"ok\n"]
    w.write(b'{"ping": {}}\n')
    assert await r.readline() == b'{"alive": true}\n'
    w.write(b"null\n")  # null ends the session
    await assert_closed_without_reply(r)
    w.close()


@pytest.mark.parametrize("transport", ("tcp", "unix"))
async def test_stream_mode_and_the_messages_after_it_in_one_packet(make_server, transport):
    """END, the next message and a second stream session in the same packet as stream lines
    are answered in order."""
    srv = await make_server(anon_perms=("@read", "@report"))
    t, u = h("p", "t"), h("p", "u")
    r, w = await raw_open(srv.addr[transport])
    await handshake(w)
    w.write((json.dumps({"report": {"taskhash": t, "method": M, "outhash": h("p", "o"), "unihash": u}}) + "\n"
             ).encode())
    assert json.loads(await r.readline())["unihash"] == u
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'
    w.write(f"{M} {t}\n".encode())
    assert await r.readline() == (u + "\n").encode()
    w.write(f"{M} {t}\nEND\n{{\"ping\": {{}}}}\n{{\"exists-stream\": null}}\n{u}\n{h('no')}\nEND\n".encode())
    assert [await r.readline() for _ in range(7)] == [
        (u + "\n").encode(), b"ok\n", b'{"alive": true}\n', b'"ok"\n', b"true\n", b"false\n", b"ok\n"]
    stats = srv.svc.stats.todict()
    assert stats["num"] >= 7  # every stream line (and END) is counted, as bitbake counts them
    w.close()


# flow control of the transport, not the engine: 60,000 lookups are a minute on PostgreSQL
@pytest.mark.parametrize("new_database", ["sqlite"], indirect=True)
async def test_a_stream_client_that_does_not_read_is_answered_in_order(make_server):
    """A client pipelining far more lines than the socket buffers hold, reading nothing until it
    has sent them all: the server stops answering in place when its writes back up, waits for
    the client, and every answer arrives, in order."""
    srv = await make_server(anon_perms=("@read", "@report"))
    known = {}
    r, w = await raw_open(srv.addr["unix"])  # small socket buffers (loopback tcp grows to MBs)
    await handshake(w)
    for i in range(20):
        t, u = h("nr", "t", i), h("nr", "u", i)
        w.write((json.dumps({"report": {"taskhash": t, "method": M, "outhash": h("nr", "o", i), "unihash": u}})
                 + "\n").encode())
        known[t] = u
    for _ in range(20):
        await r.readline()
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'
    n = 60_000
    taskhashes = [h("nr", "t", i % 40) for i in range(n)]  # half of them known
    w.transport.pause_reading()  # read nothing until the server's writes have backed up
    w.write("".join(f"{M} {t}\n" for t in taskhashes).encode() + b"END\n")
    await asyncio.sleep(0.5)
    w.transport.resume_reading()
    replies = [await asyncio.wait_for(r.readline(), 30) for _ in range(n + 1)]
    assert replies[-1] == b"ok\n"
    assert replies[:-1] == [(known.get(t, "") + "\n").encode() for t in taskhashes]
    w.close()


async def test_needs_headers_and_chunked_request(make_server):
    srv = await make_server()
    r, w = await raw_open(srv.addr["tcp"])
    w.write(b"OEHASHEQUIV 1.1\nneeds-headers: true\n\n")
    assert await r.readline() == b"\n"
    body = json.dumps({"ping": {"pad": " " * 70000}})
    w.write(b'{"chunk-stream": null}\n' + b"".join(body[i:i + 32767].encode() + b"\n"
                                                   for i in range(0, len(body), 32767)) + b"\n")
    assert await r.readline() == b'{"alive": true}\n'
    w.close()


BAD_INPUTS = {
    "bad-json": b'{"ping": \n',
    "unknown-command": b'{"frobnicate": {}}\n',
    "empty-object": b"{}\n",
    "not-an-object": b"[1, 2]\n",
    "missing-key": b'{"get": {"method": "x"}}\n',
    "wrong-type": b'{"get": {"method": 1, "taskhash": "t"}}\n',
    "report-missing-outhash": json.dumps({"report": {"taskhash": "t", "method": M, "unihash": "a" * 64}}
                                         ).encode() + b"\n",
    "huge-line": b'{"ping": "' + b"x" * (1024 * 1024 + 10) + b'"}\n',
    "huge-unterminated": b"x" * (1024 * 1024 + 10),
    "chunk-garbage": b'{"chunk-stream": null}\nnot json at all\n\n',
    "chunk-too-big": b'{"chunk-stream": null}\n' + (b"y" * 32767 + b"\n") * 33 + b"\n",
    "bad-utf8": b'{"ping": "\xff\xfe"}\n',
    "get-stream-bad-line": b'{"get-stream": null}\nonly-one-token\n',
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_malformed_input_closes_without_reply(make_server, clients, case):
    srv = await make_server(anon_perms=("@read", "@report", "@db-admin"))
    r, w = await raw_open(srv.addr["tcp"])
    await handshake(w)
    w.write(BAD_INPUTS[case])
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    if case == "get-stream-bad-line":
        assert data == b'"ok"\n'
    else:
        assert data == b""
    w.close()
    c = await clients(srv.addr["tcp"])  # the server is still up
    assert await c.ping() == {"alive": True}
    assert (await srv.db.get_usage())["outhashes_v2"]["rows"] == 0  # nothing written


@pytest.mark.parametrize("first", [b"OEHASHEQUIV 1.0\n", b"OEHASHEQUIV 1.2\n", b"OTHERPROTO 1.1\n",
                                   b"OEHASHEQUIV\n", b"OEHASHEQUIV 1.x\n"])
async def test_bad_handshake_closes(make_server, first):
    srv = await make_server()
    r, w = await raw_open(srv.addr["tcp"])
    w.write(first + b"needs-headers: false\n\n" + b'{"ping": {}}\n')
    await assert_closed_without_reply(r)
    w.close()


async def test_ws_raw_protocol(make_server):
    srv = await make_server()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(srv.addr["ws"]) as ws:
            for line in ("OEHASHEQUIV 1.1", "needs-headers: false", ""):
                await ws.send_str(line)
            await ws.send_str('{"get-stream": null}')
            assert (await ws.receive()).data == '"ok"'
            await ws.send_str(f"{M} {h('nope')}")
            assert (await ws.receive()).data == ""  # a miss is an empty text message
            await ws.send_str("END")
            assert (await ws.receive()).data == "ok"
            await ws.send_str('{"ping": {}}')
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT and msg.data == '{"alive": true}'
            await ws.send_str('{"ping": "' + "x" * (1024 * 1024) + '"}')  # > 1 MiB: closed
            assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with s.ws_connect(srv.addr["ws"]) as ws:
            await ws.send_str("OEHASHEQUIV 1.0")  # wrong version: closed
            assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with s.ws_connect(srv.addr["ws"]) as ws:
            await ws.send_bytes(b"OEHASHEQUIV 1.1")  # text frames only
            assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


# --- permissions and users ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_anonymous_read_only_permissions(make_server, clients, transport):
    srv = await make_server(anon_perms=("@read",))
    c = await clients(srv.addr[transport])
    t, o, u = h("p", "t"), h("p", "o"), h("p", "u")
    # report needs only @read: without @report it degrades to a lookup and writes nothing
    assert await c.report_unihash(t, M, o, u) == {"taskhash": t, "method": M, "unihash": u}
    assert await c.get_taskhash(M, t) is None
    with pytest.raises(bb.asyncrpc.InvokeError, match=r"^Anonymous user is not allowed to access "
                                                      r"permissions\(s\) @read, @report$"):
        await c.report_unihash_equiv(t, M, u)
    with pytest.raises(bb.asyncrpc.InvokeError, match="Invalid unihash"):
        await c.report_unihash(t, M, o, "A" * 64)
    with pytest.raises(bb.asyncrpc.InvokeError, match="not allowed to access permissions.s. @db-admin"):
        await c.remove({"taskhash": t})
    with pytest.raises(bb.asyncrpc.InvokeError, match="not allowed to access permissions.s. @user-admin"):
        await c.get_all_users()
    assert await c.ping() == {"alive": True}  # reconnected transparently
    # an admin's report is stored, with owner forced to the user name
    a = await clients(srv.addr[transport], ADMIN, ADMIN_TOKEN)
    assert (await a.report_unihash(t, M, o, u, {"owner": "spoofed"}))["unihash"] == u
    assert (await a.get_taskhash(M, t, True))["owner"] == ADMIN
    assert (await c.get_taskhash(M, t, True))["owner"] is None  # task data: not for anonymous clients
    # now the anonymous (degraded) report finds it through the outhash
    assert (await c.report_unihash(h("p2"), M, o, h("p2u")))["unihash"] == u


async def test_users_tokens_and_become(make_server, clients):
    srv = await make_server(anon_perms=("@read",))
    a = await clients(srv.addr["tcp"], ADMIN, ADMIN_TOKEN)
    assert (await a.auth(ADMIN, ADMIN_TOKEN)) == {"result": True, "username": ADMIN, "permissions": ["@all"]}
    me = await a.get_user()
    assert me == {"username": ADMIN, "permissions": ["@all", "@db-admin", "@read", "@report", "@user-admin"]}
    u = await a.new_user("bob", ["@read", "@report", "@none"])
    assert u["permissions"] == ["@read", "@report"] and len(u["token"]) == 64
    with pytest.raises(bb.asyncrpc.InvokeError, match="^Cannot create new user 'bob'$"):
        await a.new_user("bob", ["@read"])
    with pytest.raises(bb.asyncrpc.InvokeError, match="^Unknown permissions @bogus, @x$"):
        await a.new_user("carol", ["@x", "@bogus"])
    with pytest.raises(bb.asyncrpc.InvokeError, match="^Unexpected type for permissions$"):
        await a.set_user_perms("bob", "@read")
    with pytest.raises(bb.asyncrpc.InvokeError, match="^No user named 'nobody' exists$"):
        await a.set_user_perms("nobody", ["@read"])
    names = [x["username"] for x in await a.get_all_users()]
    assert names == ["admin", "bob"]
    # bob logs in and reports (he has @report); his token works on the shared Auth too
    b = await clients(srv.addr["unix"], "bob", u["token"])
    t, o, uh = h("b", "t"), h("b", "o"), h("b", "u")
    assert (await b.report_unihash(t, M, o, uh))["unihash"] == uh
    assert await srv.auth.authenticate("bob", u["token"]) == Identity("bob", frozenset({"@read", "@report"}))
    # self service: get-user and refresh-token without @user-admin, but not for others
    assert (await b.get_user())["username"] == "bob"
    with pytest.raises(bb.asyncrpc.InvokeError, match="^bob is not allowed to access permissions.s. @user-admin$"):
        await b.get_user(ADMIN)
    new = await b.refresh_token()
    assert new["username"] == "bob" and new["token"] != u["token"]
    assert await srv.auth.authenticate("bob", u["token"]) is None  # old token dead at once (cache)
    assert (await b.get_user())["username"] == "bob"  # the client re-authenticates with the new token
    # become-user: the admin acts with bob's permissions
    assert await a.become_user("bob") == {"username": "bob", "permissions": ["@read", "@report"]}
    with pytest.raises(bb.asyncrpc.InvokeError, match="bob is not allowed"):
        await a.get_all_users()
    await a.auth(ADMIN, ADMIN_TOKEN)
    with pytest.raises(bb.asyncrpc.InvokeError, match="^User ghost doesn't exist$"):
        await a.become_user("ghost")
    # wrong credentials
    bad = HashClient()
    await bad.connect_tcp(*srv.addr["tcp"].rsplit(":", 1))
    try:
        t0 = time.monotonic()
        with pytest.raises(bb.asyncrpc.InvokeError, match="^Unable to authenticate as bob$"):
            await bad.auth("bob", "wrong")
        assert time.monotonic() - t0 >= 0.9
    finally:
        await bad.close()
    # anonymous users may not use the user API at all, even self service
    anon = await clients(srv.addr["tcp"])
    with pytest.raises(bb.asyncrpc.InvokeError, match="^Anonymous user is not allowed"):
        await anon.refresh_token()
    assert (await a.delete_user("bob")) == {"username": "bob"}
    with pytest.raises(bb.asyncrpc.InvokeError, match="^No user named 'bob' exists$"):
        await a.delete_user("bob")


async def test_read_only_server(make_server, clients):
    srv = await make_server(anon_perms=("@read", "@report", "@db-admin"), read_only=True)
    t, o, u = h("ro", "t"), h("ro", "o"), h("ro", "u")
    await srv.db.insert_report({"method": M, "taskhash": t, "outhash": o}, u)
    c = await clients(srv.addr["tcp"], ADMIN, ADMIN_TOKEN)
    assert await c.get_unihash(M, t) == u
    t2 = h("ro2")
    assert (await c.report_unihash(t2, M, o, h("x")))["unihash"] == u  # degraded lookup
    assert await c.get_taskhash(M, t2) is None
    before = await srv.db.get_usage()
    with pytest.raises(ConnectionError):  # not registered: unknown command -> closed, no reply
        await c.report_unihash_equiv(t2, M, u)
    with pytest.raises(ConnectionError):
        await c.remove({"method": M})
    assert await srv.db.get_usage() == before
    assert (await c.get_db_query_columns())


# --- database administration -------------------------------------------------------------------


async def test_clean_unused_respects_age(make_server, clients):
    srv = await make_server(anon_perms=("@read", "@report", "@db-admin"))
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    await srv.db.insert_outhash({"method": M, "taskhash": h("old"), "outhash": h("oo"), "created": old})
    await srv.db.insert_outhash({"method": M, "taskhash": h("new"), "outhash": h("on")})
    c = await clients(srv.addr["tcp"])
    srv.changes.clear()
    assert await c.clean_unused(3600) == {"count": 1}  # only the 2-hour-old unused row
    assert srv.changes
    assert await c.get_outhash(M, h("on"), h("new"), False) is not None
    assert await c.get_outhash(M, h("oo"), h("old"), False) is None
    assert await c.clean_unused(0) == {"count": 1}


async def test_remove_by_unihash_keeps_other_rows(make_server, clients):
    srv = await make_server(anon_perms=("@read", "@report", "@db-admin"))
    c = await clients(srv.addr["unix"])
    t1, o1, u1 = h(1), h("o1"), h("u1")
    t2, o2, u2 = h(2), h("o2"), h("u2")
    await c.report_unihash(t1, M, o1, u1)
    await c.report_unihash(t2, M, o2, u2)
    srv.changes.clear()
    r = await c.remove({"unihash": u1, "method": M})
    assert srv.changes
    assert r["count"] == 2  # T1's unihash row and T1's outhash row
    assert await c.get_taskhash(M, t1) is None
    assert (await c.get_outhash(M, o2, t2))["unihash"] == u2
    assert (await c.remove({"taskhash": t2}))["count"] == 2
    assert (await c.remove({"nonsense": 1}))["count"] == 0


async def test_gc(make_server, clients):
    srv = await make_server(anon_perms=("@read", "@report", "@db-admin"))
    c = await clients(srv.addr["ws"])
    keep, drop = h("keep"), h("drop")
    await c.report_unihash(keep, M, h("ko"), h("ku"))
    await c.report_unihash(drop, M, h("do"), h("du"))
    assert await c.gc_mark("ABC", {"unihash": h("ku"), "method": M}) == {"count": 1}
    assert await c.gc_status() == {"keep": 1, "remove": 1, "mark": "ABC"}
    assert await c.gc_mark_stream("ABC", [{"taskhash": keep, "method": M}]) == {"count": 1}
    with pytest.raises(bb.asyncrpc.InvokeError, match="^'XYZ' is not the current mark. Refusing to sweep$"):
        await c.gc_sweep("XYZ")
    srv.changes.clear()
    assert await c.gc_sweep("ABC") == {"count": 1}
    assert srv.changes
    assert await c.get_unihash(M, drop) is None and await c.get_unihash(M, keep) == h("ku")
    assert (await c.gc_status())["mark"] is None
    usage = await c.get_db_usage()
    assert usage["unihashes_v3"]["rows"] == 1
    assert set(await c.get_db_query_columns()) >= {"method", "taskhash", "unihash", "outhash", "gc_mark"}
    stats = await c.reset_stats()
    assert stats["requests"]["num"] > 0 and (await c.get_stats())["requests"]["num"] <= 2


# --- upstream ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("up_transport", ("tcp", "ws"))
async def test_upstream_fallback_and_backfill(make_server, clients, up_transport):
    up = await make_server("upstream", anon_perms=("@read", "@report"))
    uc = await clients(up.addr["tcp"])
    t, o, u = h("up", "t"), h("up", "o"), h("up", "u")
    t2, o2, u2 = h("up2", "t"), h("up2", "o"), h("up2", "u")
    t3, o3, u3 = h("up3", "t"), h("up3", "o"), h("up3", "u")
    for tt, oo, uu in ((t, o, u), (t2, o2, u2), (t3, o3, u3)):
        await uc.report_unihash(tt, M, oo, uu, {"PN": "p"})
    down = await make_server("down", anon_perms=("@read", "@report"), upstream=up.addr[up_transport])
    c = await clients(down.addr["tcp"])
    # get-stream miss answered by upstream, then back-filled locally
    assert await c.get_unihash_batch([(M, t), (M, h("nowhere"))]) == [u, None]
    await c.backfill_wait()
    assert (await down.db.get_unihash(M, t))["unihash"] == u
    assert await c.unihash_exists(u2)  # exists-stream falls back to upstream
    # get all=True: fetched and stored with its outhash row
    assert (await c.get_taskhash(M, t2, True))["outhash"] == o2
    # the upstream is asked anonymously, so it keeps its task data to itself
    assert (await down.db.get_unihash_full(M, t2))["PN"] is None
    # get (all=false) with an upstream miss: null, no crash
    assert await c.get_taskhash(M, h("nowhere")) is None
    # report whose outhash upstream knows: upstream's unihash wins
    r = await c.report_unihash(h("local"), M, o3, h("mine"))
    assert r["unihash"] == u3
    # upstream down: misses stay misses, the connection survives
    await up.stop()
    assert await c.get_unihash(M, h("gone")) is None
    assert await c.get_taskhash(M, h("gone")) is None
    assert await c.ping() == {"alive": True}


# --- auth unit checks ------------------------------------------------------------------------------


async def test_auth_rules_and_token_format(tmp_path):
    db = open_equivalence_db(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        # bitbake's stored form: sha256:<16 hex salt>:sha256(salt + token)
        stored = hash_token("tok", "0011223344556677")
        assert stored == "sha256:0011223344556677:" + hashlib.sha256(b"0011223344556677tok").hexdigest()
        assert verify_token("tok", stored) and not verify_token("tok2", stored)
        assert not verify_token("tok", "garbage") and not verify_token("tok", "md4x:aa:bb")
        await db.new_user("legacy", ("@read", "@db-admin"), stored)
        auth = Auth(db, ("@read",))
        ident = await auth.authenticate("legacy", "tok")
        assert ident == Identity("legacy", frozenset({"@read", "@db-admin"}))
        assert await auth.authenticate("legacy", "nope") is None
        assert await auth.authenticate("ghost", "tok") is None
        anon = auth.anonymous()
        assert anon is Identity.anonymous and anon.username is None
        assert auth.allowed(anon, ["@read"]) and not auth.allowed(anon, ["@read", "@report"])
        assert auth.allowed(ident, ["@db-admin"]) and not auth.allowed(ident, ["@db-admin", "@report"])
        assert not auth.allowed(anon, ["@read"], allow_anon=False)
        admin = Identity("root", frozenset({"@all"}))
        assert auth.allowed(admin, ["@upload", "@user-admin"])
        # not the union: @read from anon + @upload from the user is not enough for both
        up = Identity("u", frozenset({"@upload"}))
        assert auth.allowed(up, ["@upload"]) and not auth.allowed(up, ["@read", "@upload"])
        assert parse_permissions(["@upload", "@none", "@read"]) == ("@read", "@upload")
        with pytest.raises(ValueError):
            Auth(db, ("@all",))
        # cached, but a token reset through Auth takes effect at once
        await auth.ensure_admin("root", "t1")
        assert await auth.authenticate("root", "t1") is not None
        await auth.ensure_admin("root", "t2")
        assert await auth.authenticate("root", "t1") is None
        assert (await auth.authenticate("root", "t2")).permissions == frozenset({"@all"})
    finally:
        await db.close()


async def test_stop_removes_unix_socket_and_stale_socket_is_replaced(make_server, tmp_path):
    srv = await make_server()
    path = srv.addr["unix"][len("unix://"):]
    assert os.path.exists(path)
    await srv.svc.stop()
    assert not os.path.exists(path)
    # a stale socket file (nobody listening) is replaced
    import socket as _s

    stale = tmp_path / "stale.sock"
    s = _s.socket(_s.AF_UNIX)
    s.bind(str(stale))
    s.close()
    addr = await srv.svc.listen(f"unix://{stale}")
    c = await connect(addr)
    try:
        assert await c.ping() == {"alive": True}
    finally:
        await c.close()


@pytest.mark.parametrize("kind", ("unix", "tcp"))
async def test_workers_share_one_prebound_socket(make_server, tmp_path, kind):
    from proxy.hashserv.listeners import bind_socket

    srv = await make_server()
    bind = f"unix://{tmp_path}/shared.sock" if kind == "unix" else "127.0.0.1:0"
    sock = bind_socket(bind)
    try:
        # two "workers" (services) adopt the same listening socket (each its own fd, as after fork)
        other = HashservService(srv.db, srv.auth, srv.svc.cfg, srv.reporter)
        addr = await srv.svc.listen_socket(sock.dup())
        await other.start(sock.dup())  # what a forked worker does with the supervisor's socket
        assert other.addresses == [addr]
        cs = [await connect(addr) for _ in range(4)]
        try:
            assert [await c.ping() for c in cs] == [{"alive": True}] * 4
        finally:
            for c in cs:
                await c.close()
        await other.stop()
    finally:
        sock.close()


# flow control of the transport, not the engine: 60,000 lookups are a minute on PostgreSQL
@pytest.mark.parametrize("new_database", ["sqlite"], indirect=True)
async def test_big_pipelined_batch_flow_control(make_server):
    srv = await make_server()
    t, u = h("fc", "t"), h("fc", "u")
    await srv.db.insert_unihash(M, t, u)
    n = 60_000  # ~5 MiB of requests: the server pauses reading while replies back up
    r, w = await raw_open(srv.addr["tcp"])
    await handshake(w)
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'

    async def send() -> None:
        line = f"{M} {t}\n".encode()
        for _ in range(n // 1000):
            w.write(line * 1000)
            await w.drain()
        w.write(b"END\n")
        await w.drain()

    sender = asyncio.create_task(send())
    await asyncio.sleep(0.3)  # let both directions back up before reading anything
    expected = (u + "\n").encode()
    for _ in range(n):
        assert await r.readline() == expected
    assert await r.readline() == b"ok\n"
    await sender
    w.close()


async def test_stop_closes_open_connections(make_server):
    srv = await make_server()
    r, w = await raw_open(srv.addr["tcp"])
    await handshake(w)
    w.write(b'{"get-stream": null}\n')
    assert await r.readline() == b'"ok"\n'
    r2, w2 = await raw_open(srv.addr["unix"])  # mid-handshake
    w2.write(b"OEHASHEQUIV 1.1\n")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(srv.svc.stop(), 5)
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert await asyncio.wait_for(r2.read(), 5) == b""
    w.close()
    w2.close()


async def test_unix_socket_with_a_path_longer_than_sun_path(make_server, tmp_path):
    srv = await make_server()
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "hashserve.sock"
    assert len(str(path)) > 108
    addr = await srv.svc.listen(f"unix://{path}")
    assert addr == f"unix://{path}" and path.exists()
    c = await connect(addr)  # bitbake's client chdir()s to the directory
    try:
        assert await c.ping() == {"alive": True}
    finally:
        await c.close()
    await srv.svc.stop()
    assert not path.exists()


async def test_garbage_upstream_is_a_miss(make_server, clients):
    async def bad(reader, writer):
        try:
            while await reader.readline():
                writer.write(b'{"unihash": "NOT-A-HASH", "method": 1}\ngarbage\n')
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    bad_server = await asyncio.start_server(bad, "127.0.0.1", 0)
    port = bad_server.sockets[0].getsockname()[1]
    try:
        down = await make_server("down", anon_perms=("@read", "@report"), upstream=f"127.0.0.1:{port}")
        c = await clients(down.addr["unix"])
        assert await c.get_unihash(M, h("x")) is None
        assert await c.get_taskhash(M, h("x")) is None
        assert await c.get_taskhash(M, h("x"), True) is None
        assert await c.unihash_exists(h("y")) is False
        t, o, u = h("g", "t"), h("g", "o"), h("g", "u")
        assert (await c.report_unihash(t, M, o, u))["unihash"] == u
        assert await c.backfill_wait() == 0
        assert await c.ping() == {"alive": True}
    finally:
        bad_server.close()
