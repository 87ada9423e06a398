"""/metrics with `--workers 2`: scripted traffic on every face (HTTP objects, uploads,
/v1/equivalent, OEHASHEQUIV over ws and tcp), then several scrapes, answered by different
workers, must each show every counter moved exactly as the traffic says, and histograms with
observations; no sample carries a process label."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections import Counter
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from tests.hashserv_client import connect
from tests.service import free_port
from tests.traffic import METHOD, Script, basic, call, h, object_key, seed
from tests.workers import serving_pid, worker_pids

ADMIN, TOKEN = "admin", "metrics-token"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, pids: list[int]) -> tuple[int | None, Samples]:
    """(the worker that answered, every sample)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200
        pid = serving_pid(conn.sock, pids)
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return pid, samples


def moved(before: Samples, after: Samples, prefix: str) -> dict:
    """Samples of names starting with ``prefix`` that changed: (name, labels) -> delta."""
    out = {}
    for key, value in after.items():
        if key[0].startswith(prefix):
            delta = value - before.get(key, 0.0)
            if delta:
                out[key] = delta
    return out


def L(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


async def hashserv_traffic(address: str) -> None:
    """One get-stream of 3 lines, then (leaving the stream with END) 2 gets and 1 report."""
    client = await connect(address)
    try:
        assert await client.get_unihash_batch([(METHOD, h(f"stream-{i}")) for i in range(3)]) == [None] * 3
        for i in range(2):
            assert await client.get_taskhash(METHOD, h(f"get-{i}")) is None
        await client.report_unihash(h("hs-task"), METHOD, h("hs-out"), h("hs-uni"))
    finally:
        await client.close()


def test_every_face_counted_across_workers(service_factory):
    hashserv_port = free_port()
    svc = service_factory(config={"server": {"workers": 2},
                                  "hashserv": {"bind": f"127.0.0.1:{hashserv_port}"}},
                          env={"SSTATE_PROXY_ADMIN_USER": ADMIN, "SSTATE_PROXY_ADMIN_TOKEN": TOKEN})
    seed(svc.storage)
    svc.start()
    pids = worker_pids(svc.proc.pid)
    assert len(pids) == 2
    admin = basic(ADMIN, TOKEN)
    _, before = scrape(svc.port, pids)

    # --- the traffic ------------------------------------------------------------------------
    script = Script()
    script.run(svc.port, admin)  # hits, equivalents, misses; one report over /v1/equivalent
    for i in range(2):
        status, _, body = call(svc.port, "GET", f"/v1/equivalent?method={quote(METHOD)}&taskhash={h(f'q{i}')}")
        assert status == 200 and json.loads(body) is None
    uploads = Counter()
    for i in range(2):
        status, _, _ = call(svc.port, "PUT", "/" + object_key("new", h(f"new-{i}")), b"x" * (100 + i), admin)
        assert status == 201
        uploads[("PUT", "201", "upload")] += 1
    assert call(svc.port, "PUT", "/" + object_key("new", h("new-0")), b"y" * 100, admin)[0] == 200
    assert call(svc.port, "PUT", "/" + object_key("new", h("anon")), b"z", {})[0] == 401
    assert call(svc.port, "PUT", "/not/an/sstate/name.txt", b"z", admin)[0] == 400
    asyncio.run(hashserv_traffic(f"127.0.0.1:{hashserv_port}"))
    asyncio.run(hashserv_traffic(f"ws://127.0.0.1:{svc.port}/ws"))

    # --- what every scrape must show ----------------------------------------------------------
    objects = {("sstate_proxy_object_requests_total", L(method=m, status="200" if s != "miss" else "404", source=s)): n
               for (m, s), n in script.requests.items()}
    objects.update({
        ("sstate_proxy_object_requests_total", L(method="PUT", status="201", source="upload")): 2,
        ("sstate_proxy_object_requests_total", L(method="PUT", status="200", source="upload")): 1,
        ("sstate_proxy_object_requests_total", L(method="PUT", status="401", source="none")): 1,
        ("sstate_proxy_object_requests_total", L(method="PUT", status="400", source="upload")): 1,
    })
    hashserv = {}
    for transport in ("tcp", "ws"):
        for message, n in (("get-stream", 1), ("get", 2), ("report", 1)):
            hashserv[("sstate_proxy_hashserv_messages_total", L(message=message, transport=transport))] = n
        # 3 lines and the END that leaves the stream
        hashserv[("sstate_proxy_hashserv_stream_lines_total", L(message="get-stream", transport=transport))] = 4
    n_objects = sum(script.requests.values())
    latency = {"object": n_objects, "upload": 5, "equivalent": 3, "hashserv": 2 * 3}

    answered = []
    for k in range(200):  # the kernel hands a shared socket's connections to a worker unevenly when idle
        pid, after = scrape(svc.port, pids)
        answered.append(pid)
        assert not any(name for name, labels in after if any(k_ == "pid" for k_, _ in labels))
        assert moved(before, after, "sstate_proxy_object_requests") == objects
        assert moved(before, after, "sstate_proxy_object_bytes_sent") == {
            ("sstate_proxy_object_bytes_sent_total", ()): sum(script.bytes.values())}
        assert moved(before, after, "sstate_proxy_uploads") == {
            ("sstate_proxy_uploads_total", L(outcome="created")): 2,
            ("sstate_proxy_uploads_total", L(outcome="exists")): 1,
            ("sstate_proxy_uploads_total", L(outcome="refused")): 1}
        assert moved(before, after, "sstate_proxy_equivalence_requests") == {
            ("sstate_proxy_equivalence_requests_total", L(face="http", message="get")): 2,
            ("sstate_proxy_equivalence_requests_total", L(face="http", message="report")): script.reports}
        assert moved(before, after, "sstate_proxy_hashserv_m") == {
            k: v for k, v in hashserv.items() if k[0] == "sstate_proxy_hashserv_messages_total"}
        assert moved(before, after, "sstate_proxy_hashserv_stream_lines") == {
            k: v for k, v in hashserv.items() if k[0] == "sstate_proxy_hashserv_stream_lines_total"}
        stream_time = moved(before, after, "sstate_proxy_hashserv_stream_seconds")
        assert {labels for _, labels in stream_time} == {
            L(message="get-stream", transport=t) for t in ("tcp", "ws")}
        assert all(0 < v < 10 for v in stream_time.values())
        # defined, and nothing removed or fetched upstream by this traffic
        for name in ("sstate_proxy_gc_removed_objects_total", "sstate_proxy_gc_removed_bytes_total"):
            assert after[(name, ())] == 0
        assert moved(before, after, "sstate_proxy_upstream_fetches") == {}
        # latency: one observation per request or message, in every face's histogram
        for face, n in latency.items():
            count = ("sstate_proxy_request_seconds_count", L(face=face))
            inf = ("sstate_proxy_request_seconds_bucket", L(face=face, le="+Inf"))
            assert after[count] - before.get(count, 0) == n, face
            assert after[inf] == after[count]
            assert after[("sstate_proxy_request_seconds_sum", L(face=face))] > before.get(
                ("sstate_proxy_request_seconds_sum", L(face=face)), 0)
        # the scrapes themselves: each one counted once it is answered, whichever worker did
        ops = ("sstate_proxy_request_seconds_count", L(face="operations"))
        assert after[ops] - before[ops] == 1 + k
        if k >= 3 and len(set(answered)) == 2:
            break
    assert set(answered) == set(pids), answered  # both workers answered scrapes


async def test_hashserv_transport_labels(tmp_path):
    """unix and tcp listeners of one service label their messages apart (in-process)."""
    from proxy.auth import Auth
    from proxy.config import Config
    from proxy.hashserv import HashservService
    from proxy.metrics import Metrics
    from proxy.reports import Reporter
    from storage.equivalence import open_equivalence_db

    db = open_equivalence_db(f"sqlite:///{tmp_path / 'equiv.db'}")
    auth = Auth(db, ("@read",))
    reporter = Reporter(db, auth, read_only=False, upstream=None, on_change=lambda: None)
    metrics = Metrics()
    svc = HashservService(db, auth, Config(), reporter, metrics)
    try:
        addresses = {"unix": await svc.listen(f"unix://{tmp_path}/hs.sock"),
                     "tcp": await svc.listen("127.0.0.1:0")}
        for n, address in enumerate(addresses.values(), start=1):
            client = await connect(address)
            try:
                for _ in range(n):
                    assert await client.get_taskhash(METHOD, h("t")) is None
            finally:
                await client.close()
        value = metrics.registry.get_sample_value
        assert value("sstate_proxy_hashserv_messages_total", {"message": "get", "transport": "unix"}) == 1
        assert value("sstate_proxy_hashserv_messages_total", {"message": "get", "transport": "tcp"}) == 2
        assert value("sstate_proxy_request_seconds_count", {"face": "hashserv"}) == 3
    finally:
        await svc.stop()
        await reporter.close()
        await db.close()
