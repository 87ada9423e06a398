"""The seed's /v1/equivalent API and the equivalence rewrite of the mirror, over real sockets."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import quote

import pytest

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import make_corpus

METHOD = "oe.sstatesig.OEOuthashBasic"


def h(n: int, tag: str = "a") -> str:
    """A distinct, valid 64-hex hash."""
    return (f"{tag}{n:x}".encode().hex() * 64)[:64]


def call(svc, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def get_equiv(svc, taskhash: str, method: str = METHOD):
    resp, body = call(svc, "GET", f"/v1/equivalent?method={quote(method)}&taskhash={taskhash}")
    assert resp.status == 200, body
    return json.loads(body)


def report(svc, taskhash: str, outhash: str, depid: str, method: str = METHOD, key: str = "depid", **extra):
    data = {"taskhash": taskhash, "method": method, "outhash": outhash, key: depid, "owner": "ci", **extra}
    resp, body = call(svc, "POST", "/v1/equivalent", json.dumps(data).encode(),
                      {"Content-Type": "application/json"})
    assert resp.status == 200, body
    return json.loads(body)


@pytest.fixture
def reporting_service(service_factory):
    return service_factory(args=["--anon-perms", "@read,@report"]).start()


def test_seed_client_flow(reporting_service):
    svc = reporting_service
    t1, t2, t3, o1, o2 = h(1, "t"), h(2, "t"), h(3, "t"), h(1, "o"), h(2, "o")
    assert get_equiv(svc, t1) is None
    first = report(svc, t1, o1, t1, PN="zlib", PV="1.3.1", PR="r0", task="do_populate_sysroot",
                   outhash_siginfo="OEOuthashBasic\n...")
    assert first == {"taskhash": t1, "method": METHOD, "unihash": t1, "depid": t1}
    assert get_equiv(svc, t1)["depid"] == t1
    # a second taskhash with the same output gets the first one's depid
    assert report(svc, t2, o1, t2)["depid"] == t1
    assert get_equiv(svc, t2) == {"taskhash": t2, "method": METHOD, "unihash": t1, "depid": t1}
    # first writer wins: a later report for t1 with another output changes nothing
    assert report(svc, t1, o2, t3)["depid"] == t1
    # ... but its output is now known: t3 with that output becomes equivalent to t1
    assert report(svc, t3, o2, t3)["depid"] == t1
    # the new-style key name is accepted too
    t4, o4 = h(4, "t"), h(4, "o")
    assert report(svc, t4, o4, t4, key="unihash")["unihash"] == t4


def test_taskdata_fields_are_stored(reporting_service, tmp_path):
    import sqlite3

    svc = reporting_service
    t, o = h(9, "t"), h(9, "o")
    report(svc, t, o, t, PN="zlib", PV="1.3.1", PR="r0", task="do_package", outhash_siginfo="sig text")
    db = sqlite3.connect(svc.database)
    deadline = time.monotonic() + 1.0  # another connection sees it once the window commits (5 ms)
    while True:
        row = db.execute("SELECT owner, PN, PV, PR, task, outhash_siginfo FROM outhashes_v2 WHERE taskhash=?",
                         (t,)).fetchone()
        if row is not None or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert row == ("ci", "zlib", "1.3.1", "r0", "do_package", "sig text")


BAD_REPORTS = [
    (b"{not json", "JSON"),
    (b"[1, 2]", "object"),
    (b"null", "object"),
    (json.dumps({"method": METHOD, "outhash": "o", "depid": h(1)}).encode(), "taskhash"),
    (json.dumps({"taskhash": "t", "outhash": "o", "depid": h(1)}).encode(), "method"),
    (json.dumps({"taskhash": "t", "method": METHOD, "depid": h(1)}).encode(), "outhash"),
    (json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o"}).encode(), "depid"),
    (json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o", "depid": "XYZ"}).encode(), "unihash"),
    (json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o", "depid": "AB" * 32}).encode(), "unihash"),
    (json.dumps({"taskhash": 5, "method": METHOD, "outhash": "o", "depid": h(1)}).encode(), "taskhash"),
    (json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o", "depid": h(1), "PN": ["x"]}).encode(), "PN"),
    (json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o", "depid": h(1), "unihash": h(2)}).encode(), "differ"),
]


@pytest.mark.parametrize("body,reason", BAD_REPORTS, ids=[r for _, r in BAD_REPORTS])
def test_invalid_reports_get_400_and_write_nothing(reporting_service, body, reason):
    svc = reporting_service
    resp, text = call(svc, "POST", "/v1/equivalent", body, {"Content-Type": "application/json"})
    assert resp.status == 400 and reason.lower() in text.decode().lower(), text
    assert get_equiv(svc, "t") is None


def test_huge_report_body_is_refused(reporting_service):
    svc = reporting_service
    big = json.dumps({"taskhash": "t", "method": METHOD, "outhash": "o", "depid": h(1),
                      "outhash_siginfo": "x" * (2 * 1024 * 1024)}).encode()
    resp, _ = call(svc, "POST", "/v1/equivalent", big, {"Content-Type": "application/json"})
    assert resp.status == 413
    assert get_equiv(svc, "t") is None
    resp, body = call(svc, "GET", "/v1/equivalent?method=x")
    assert resp.status == 400 and b"taskhash" in body


def test_report_without_report_permission_is_a_lookup(service_factory):
    svc = service_factory().start()  # anonymous: @read only
    t, o = h(5, "t"), h(5, "o")
    assert report(svc, t, o, t)["depid"] == t  # the read-only answer ...
    assert get_equiv(svc, t) is None  # ... and nothing was written


def _mirror_with_equivalences(service_factory, extra_args=(), **kwargs):
    svc = service_factory(args=["--anon-perms", "@read,@report", *extra_args], **kwargs)
    corpus = make_corpus(svc.storage, n=120, seed=3, equiv_fraction=0.5)
    svc.start()
    return svc, corpus


def _report_equivalences(svc, corpus):
    for d in corpus.details:
        # the hash-equivalence builder that made the object reported it first ...
        report(svc, d.unihash, d.outhash, d.unihash, method=d.method)
        # ... then another configuration computed taskhash d.taskhash with the same output
        assert report(svc, d.taskhash, d.outhash, d.taskhash, method=d.method)["depid"] == d.unihash


def test_mixed_fleet_legacy_builders_get_equivalent_objects(service_factory, tmp_path):
    svc, corpus = _mirror_with_equivalences(service_factory)
    assert len(corpus.details) >= 10
    client = BitbakeMirrorClient(svc.url, tmp_path / "bb")
    wanted = [d.taskhash_key for d in corpus.details]
    assert not any(client.check(wanted).values())  # before the reports: plain misses
    _report_equivalences(svc, corpus)
    found = client.check(wanted + corpus.absent)
    assert all(found[k] for k in wanted)
    assert not any(found[k] for k in corpus.absent)  # a plain miss is still a miss
    for d in corpus.details[:12]:
        assert client.download(d.taskhash_key) == corpus.read(d.unihash_key)
        siginfo = d.unihash_key + ".siginfo"
        if siginfo in corpus.companions:
            assert client.download(d.taskhash_key + ".siginfo") == corpus.read(siginfo)
    d = corpus.details[0]
    resp, _ = call(svc, "HEAD", "/" + quote(d.taskhash_key))
    assert resp.getheader("X-Sstate-Source") == "equivalent"
    assert resp.getheader("X-Sstate-Served-Hash") == d.unihash
    resp, _ = call(svc, "HEAD", "/" + quote(d.unihash_key))
    assert resp.getheader("X-Sstate-Source") == "hit"
    resp, body = call(svc, "GET", "/metrics")
    text = body.decode()
    assert 'source="equivalent"' in text and 'source="hit"' in text and 'source="miss"' in text


def test_head_and_get_agree_while_reports_arrive(service_factory):
    svc, corpus = _mirror_with_equivalences(service_factory)
    half = len(corpus.details) // 2
    _report_equivalences(svc, corpus.__class__(**{**corpus.__dict__, "details": corpus.details[:half]}))
    stop = threading.Event()
    errors: list[str] = []

    def reporter():
        i = 0
        while not stop.is_set():
            i += 1
            report(svc, h(i, "x"), h(i, "y"), h(i, "x"))

    t = threading.Thread(target=reporter)
    t.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for d in corpus.details[: half + 3]:
                head, _ = call(svc, "HEAD", "/" + quote(d.taskhash_key))
                get, body = call(svc, "GET", "/" + quote(d.taskhash_key))
                if head.status != get.status or head.getheader("X-Sstate-Served-Hash") != get.getheader(
                        "X-Sstate-Served-Hash"):
                    errors.append(d.taskhash_key)
                if get.status == 200 and body != corpus.read(d.unihash_key):
                    errors.append("bytes " + d.taskhash_key)
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_a_report_through_one_worker_reaches_every_worker_within_a_second(service_factory):
    # negative answers are cached for 5 s here: only the cross-process change signal can make
    # the new equivalence visible within one second
    svc, corpus = _mirror_with_equivalences(service_factory, extra_args=["--workers", "3"],
                                            config={"equivalence": {"negative_ttl_s": 5.0}})
    d = corpus.details[0]
    path = "/" + quote(d.taskhash_key)
    for _ in range(30):  # fill the negative caches of every worker (new connection each time)
        assert call(svc, "HEAD", path)[0].status == 404
    report(svc, d.unihash, d.outhash, d.unihash)
    report(svc, d.taskhash, d.outhash, d.taskhash)
    time.sleep(1.0)
    statuses = [call(svc, "HEAD", path)[0].status for _ in range(30)]
    assert statuses == [200] * 30


def _key(hash_: str) -> str:
    return f"{hash_[:2]}/{hash_[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{hash_}_populate_sysroot.tar.zst"


def _head_status(svc, key: str) -> int:
    return call(svc, "HEAD", "/" + quote(key))[0].status


def _wait_status(svc, key: str, status: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if _head_status(svc, key) == status:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_cached_misses_of_unknown_hashes_outlive_reports_that_do_not_name_them(service_factory):
    # bitbake HEADs every miss twice, while reports keep changing the database: a miss of a hash
    # the database does not know is kept across changes that do not name it (only a new mapping
    # of that hash can change its answer), and dropped at once by one that does.
    svc = service_factory(args=["--anon-perms", "@read,@report"],
                          config={"equivalence": {"negative_ttl_s": 5.0}}).start()
    unknown, stored_u = h(1, "n"), h(2, "n")
    assert _head_status(svc, _key(unknown)) == 404
    # The bytes appear behind the resolver's back (another process's store write): the cached
    # miss still answers, even though the database changes meanwhile.
    for path in (_key(unknown), _key(stored_u)):
        target = svc.storage / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"object " + path.encode())
    for i in range(3):
        report(svc, h(10 + i, "t"), h(10 + i, "o"), h(10 + i, "t"))
    time.sleep(0.5)  # past the generation poll
    assert _head_status(svc, _key(unknown)) == 404
    # A report naming the hash drops its miss within the poll interval.
    report(svc, stored_u, h(20, "o"), stored_u)
    report(svc, unknown, h(20, "o"), unknown)
    assert _wait_status(svc, _key(unknown), 200, within_s=1.0)


def test_cached_misses_of_hashes_with_a_class_go_with_any_change(service_factory):
    svc = service_factory(args=["--anon-perms", "@read,@report"],
                          config={"equivalence": {"negative_ttl_s": 5.0}}).start()
    t, u, other_t = h(1, "k"), h(2, "k"), h(3, "k")
    report(svc, u, h(1, "p"), u)
    report(svc, t, h(1, "p"), t)  # t -> u; neither object stored: a miss with a class
    assert _head_status(svc, _key(t)) == 404
    # u's object appears behind the resolver's back, then an unrelated report changes the
    # database: the miss of t (whose class is {u}) is looked up again and rewritten.
    target = svc.storage / _key(u)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"u's object")
    report(svc, other_t, h(3, "p"), other_t)
    assert _wait_status(svc, _key(t), 200, within_s=1.0)
    resp, _ = call(svc, "HEAD", "/" + quote(_key(t)))
    assert resp.headers["X-Sstate-Source"] == "equivalent"


def test_a_miss_is_kept_for_the_negative_ttl_only(service_factory):
    svc = service_factory(config={"equivalence": {"negative_ttl_s": 0.5}}).start()
    key = _key(h(7, "m"))
    assert _head_status(svc, key) == 404
    target = svc.storage / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"late object")
    assert _head_status(svc, key) == 404  # the cached miss
    assert _wait_status(svc, key, 200, within_s=1.5)
