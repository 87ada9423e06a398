"""The hashserv face of the real `sstate-proxy serve` process: every transport on one database
with the mirror, several workers sharing the raw listeners, and reports that the mirror's
rewrite uses at once."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from urllib.parse import quote

import pytest

from tests.corpus import make_corpus
from tests.hashserv_client import connect
from tests.service import free_port

ADMIN = ("admin", "admin-token-for-tests")


def head(svc, key: str):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("HEAD", "/" + quote(key))
        resp = conn.getresponse()
        resp.read()
        return resp
    finally:
        conn.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
@pytest.mark.parametrize("workers", [1, 3])
async def test_every_transport_on_one_database_with_the_mirror(service_factory, tmp_path, workers, engine,
                                                               request):
    sock_path = tmp_path / "hs.sock"
    tcp_port = free_port()
    env = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
    pg_url = request.getfixturevalue("pg_url") if engine == "postgres" else None  # tests/pg.py
    unix_svc = service_factory("unix", env=env, args=["--workers", str(workers),
                                                      "--hashserv-bind", f"unix://{sock_path}",
                                                      *(["--database", pg_url] if pg_url else [])])
    corpus = make_corpus(unix_svc.storage, n=40, seed=11, equiv_fraction=0.5)
    unix_svc.start()
    tcp_svc = service_factory("tcp", env=env, args=["--workers", str(workers), "--database",
                                                    pg_url or f"sqlite:///{unix_svc.database}",
                                                    "--hashserv-bind", f"127.0.0.1:{tcp_port}"])
    tcp_svc.start()  # a second service on the same database, as a second replica would be
    addresses = [f"unix://{sock_path}", f"127.0.0.1:{tcp_port}", f"ws://127.0.0.1:{unix_svc.port}/ws",
                 f"ws://127.0.0.1:{unix_svc.port}/"]
    clients = [await connect(a, *ADMIN) for a in addresses]
    try:
        for i, d in enumerate(corpus.details):
            reporter = clients[i % len(clients)]
            # the first builder's report, then a second taskhash with the same output
            await reporter.report_unihash(d.unihash, d.method, d.outhash, d.unihash)
            res = await reporter.report_unihash(d.taskhash, d.method, d.outhash, d.taskhash)
            assert res["unihash"] == d.unihash
            # The mirror's rewrite uses it at once in the process that took the report; another
            # worker process may have cached the miss until its next database poll.
            if i % len(clients) != 1:  # reported through unix_svc itself
                resp = head(unix_svc, d.taskhash_key)
                deadline = time.monotonic() + 0.5
                while workers > 1 and resp.status == 404 and time.monotonic() < deadline:
                    time.sleep(0.002)
                    resp = head(unix_svc, d.taskhash_key)
                assert resp.status == 200 and resp.getheader("X-Sstate-Source") == "equivalent"
        # A worker that cached a miss for a path drops it at its next database poll
        # (GENERATION_POLL_S).
        time.sleep(0.3)
        for c in clients:  # every transport sees every report
            got = await c.get_unihash_batch([(d.method, d.taskhash) for d in corpus.details])
            assert got == [d.unihash for d in corpus.details]
        for d in corpus.details:
            assert head(unix_svc, d.taskhash_key).status == 200
    finally:
        for c in clients:
            await c.close()
    assert tcp_svc.stop() == 0
    assert unix_svc.stop() == 0
    assert not os.path.exists(sock_path)  # the supervisor removes its socket


def post_equivalent(svc, data: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("POST", "/v1/equivalent", body=json.dumps(data).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return json.loads(body)
    finally:
        conn.close()


def get_equivalent(svc, method: str, taskhash: str) -> dict | None:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("GET", f"/v1/equivalent?method={quote(method)}&taskhash={taskhash}")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return json.loads(body)
    finally:
        conn.close()


async def test_both_faces_ask_the_upstream_hashserv(service_factory):
    """/v1/equivalent and OEHASHEQUIV share one report algorithm, upstream hashserv included."""

    def hx(*parts: object) -> str:
        return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()

    m = "TestMethod"
    up_port = free_port()
    up = service_factory("up", args=["--hashserv-bind", f"127.0.0.1:{up_port}", "--anon-perms", "@read,@report"])
    up.start()
    down_port = free_port()
    down = service_factory("down", args=["--hashserv-bind", f"127.0.0.1:{down_port}", "--anon-perms",
                                         "@read,@report", "--upstream-hashserv", f"127.0.0.1:{up_port}"])
    down.start()
    upc = await connect(f"127.0.0.1:{up_port}")
    downc = await connect(f"127.0.0.1:{down_port}")
    try:
        o, u_up = hx("o"), hx("u-up")
        await upc.report_unihash(hx("t-up"), m, o, u_up)
        t_only_up, u_only_up = hx("t-only-up"), hx("u-only-up")
        await upc.report_unihash(t_only_up, m, hx("o-only-up"), u_only_up)
        # HTTP report of an outhash only the upstream knows: the upstream's unihash
        t1 = hx("t1")
        assert post_equivalent(down, {"taskhash": t1, "method": m, "outhash": o, "depid": hx("mine")}
                               )["unihash"] == u_up
        # the hashserv face now finds the local equivalent
        assert (await downc.report_unihash(hx("t2"), m, o, hx("mine2")))["unihash"] == u_up
        # an HTTP lookup of a taskhash only the upstream knows is answered (and stored) locally
        assert get_equivalent(down, m, t_only_up)["unihash"] == u_only_up
        assert up.stop() == 0
        assert await downc.get_unihash(m, t_only_up) == u_only_up
        # the upstream is gone: an unknown outhash keeps the reporter's own unihash
        assert post_equivalent(down, {"taskhash": hx("t3"), "method": m, "outhash": hx("o3"),
                                      "unihash": hx("u3")})["unihash"] == hx("u3")
    finally:
        await upc.close()
        await downc.close()
