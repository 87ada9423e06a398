"""Pull-through end to end: bitbake's own fetcher -> sstate-proxy -> sstate-proxy -> a plain HTTP
mirror, and the bound of the pulled-object cache (LRU, across a restart) on local disk and S3."""

from __future__ import annotations

import base64
import http.client
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import make_corpus
from tests.s3server import TEST_ENV, MotoServer
from tests.service import free_port
from tests.upstream_origin import Origin

ADMIN = ("admin", "admin-token-for-upstream-tests")
ADMIN_ENV = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}


def call(svc, method: str, key: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=20)
    try:
        conn.request(method, "/" + quote(key), body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def put(svc, key: str, data: bytes) -> int:
    auth = "Basic " + base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
    resp, _ = call(svc, "PUT", key, data, {"Authorization": auth})
    return resp.status


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kept_suffix(pulled: list[str], sizes: dict[str, int], bound: int) -> list[str]:
    """The newest pulled keys whose sizes fit in ``bound`` (what an LRU bound keeps when nothing
    is read again)."""
    kept: list[str] = []
    total = 0
    for key in reversed(pulled):
        if total + sizes[key] > bound:
            break
        kept.insert(0, key)
        total += sizes[key]
    return kept


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_bitbake_through_two_proxies_to_a_plain_mirror(service_factory, tmp_path):
    origin = Origin(tmp_path / "origin", free_port())
    corpus = make_corpus(origin.root, n=16, seed=21, equiv_fraction=0.0)
    with_siginfo = [k for k in corpus.objects if k + ".siginfo" in corpus.companions][:4]
    assert len(with_siginfo) == 4
    order = [f for k in with_siginfo for f in (k, k + ".siginfo")]  # what bitbake fetches, in order
    sizes = corpus.sizes
    bound = sum(sizes[f] for f in order[-4:]) + 1  # room for the last two objects and siginfos
    origin.start()
    far = service_factory("far", config={"upstream": {"mirrors": [origin.url + "/"], "timeout_s": 5.0}}).start()
    near = service_factory("near", env=ADMIN_ENV, config={"upstream": {
        "mirrors": [far.url], "timeout_s": 5.0, "cache_max_bytes": bound, "negative_ttl_s": 0.3}})
    near.start()
    published = "00/11/sstate:mine:core2-64-poky-linux:1.0:r0:core2-64:14:0011" + "3" * 60 + "_package.tar.zst"
    assert put(near, published, b"published here" * 50000) == 201  # larger than the bound
    bb = BitbakeMirrorClient(near.url, tmp_path / "bitbake")
    try:
        # existence checks like sstate_checkhashes: answered from the upstream's HEADs
        assert bb.check(with_siginfo + [corpus.absent[0]]) == {**{k: True for k in with_siginfo},
                                                               corpus.absent[0]: False}
        for key in with_siginfo:
            assert bb.download(key) == corpus.read(key)  # HEAD + wget GET, object and .siginfo
            assert bb.download(key + ".siginfo") == corpus.read(key + ".siginfo")
        counts = origin.counts()
        assert all(counts.get(f"GET {f}") == 1 for f in order)  # each fetched once, end to end
        # the far proxy keeps everything (no bound); the last store may end just after the last byte
        wait_for(lambda: files(far.storage) == set(order), "the far proxy's store")
        kept = set(kept_suffix(order, sizes, bound))
        assert len(kept) == 4
        # the near proxy evicted the least recently used pulls; the published object stays
        wait_for(lambda: files(near.storage) == kept | {published}, "eviction to the bound")

        # a restart, with nothing upstream reachable: what is kept is served, as hits
        near.stop()
        far.stop()
        origin.stop()
        near.start()
        # (read in pull order, so the access order is the pull order, with or without hits
        # moving last_access)
        for f in [f for f in order if f in kept]:
            resp, body = call(near, "GET", f)
            assert resp.status == 200 and body == corpus.read(f) and resp.getheader("X-Sstate-Source") == "hit"
        assert bb.download(order[-1]) == corpus.read(order[-1])
        assert bb.download(with_siginfo[0]) is None  # evicted, and the upstream is down

        # the upstream back: an evicted object is pulled again, and the catalog kept across the
        # restart says which kept object is now the least recently used
        origin.start()
        far.start()
        time.sleep(0.4)  # the failed mirror is skipped for negative_ttl_s
        again = with_siginfo[0]
        assert bb.download(again) == corpus.read(again)
        newest = [f for f in order if f in kept] + [again]
        wait_for(lambda: files(near.storage) == set(kept_suffix(newest, sizes, bound)) | {published},
                 "eviction after the restart")
    finally:
        bb.cleanup()
        origin.stop()


@pytest.fixture
def moto():
    server = MotoServer()
    server.start()
    server.create_bucket("near")
    yield server
    server.close()


def test_cache_bound_on_s3(service_factory, tmp_path, moto):
    origin = Origin(tmp_path / "origin", free_port())
    corpus = make_corpus(origin.root, n=8, seed=22, equiv_fraction=0.0)
    keys = corpus.objects[:5]
    bound = sum(corpus.sizes[k] for k in keys[-2:]) + 1
    s3 = moto.client()

    def bucket() -> set[str]:
        listed = s3.list_objects_v2(Bucket="near", Prefix="p/").get("Contents", [])
        return {o["Key"][2:] for o in listed}

    with origin:
        svc = service_factory("near", env={**TEST_ENV, **ADMIN_ENV}, config={
            "storage": {"backend": "s3"},
            "storage.s3": {"bucket": "near", "prefix": "p", "endpoint_url": moto.endpoint_url,
                           "region": "us-east-1", "timeout_s": 5.0},
            "upstream": {"mirrors": [origin.url], "timeout_s": 5.0, "cache_max_bytes": bound},
        }).start()
        published = "00/22/sstate:mine:core2-64-poky-linux:1.0:r0:core2-64:14:0022" + "4" * 60 + "_package.tar.zst"
        assert put(svc, published, b"x" * (bound + 1)) == 201
        for key in keys:
            resp, body = call(svc, "GET", key)
            assert resp.status == 200 and body == corpus.read(key)
            assert resp.getheader("X-Sstate-Source") == "upstream"
        wait_for(lambda: bucket() == set(keys[-2:]) | {published}, "eviction on S3")
        evicted = sum(corpus.sizes[k] for k in keys[:3])
        # counted once the catalog forgot them, just after the deletes the bucket shows
        wait_for(lambda: svc.metrics()["sstate_proxy_upstream_cache_evicted_objects_total"] == 3.0,
                 "the evictions in /metrics")
        assert svc.metrics()["sstate_proxy_upstream_cache_evicted_bytes_total"] == float(evicted)
        svc.stop()
        origin.stop()
        svc.start()
        for key in keys[-2:]:
            resp, body = call(svc, "GET", key)
            assert resp.status == 200 and body == corpus.read(key)
        resp, _ = call(svc, "GET", keys[0])
        assert resp.status == 404
