"""Pull-through upstream mirrors over real sockets: the real service in front of a plain HTTP
mirror in a subprocess (tests/upstream_origin.py), which counts the requests it gets."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.config import ConfigError, load
from tests.corpus import make_corpus
from tests.service import free_port
from tests.test_rewrite import report
from tests.upstream_origin import Origin

SOURCE = "X-Sstate-Source"


def call(svc, method: str, key: str, headers: dict | None = None, timeout: float = 20):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=timeout)
    try:
        conn.request(method, "/" + quote(key), headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def upstream_fetches(svc, want: dict | None = None) -> dict[str, float]:
    """``sstate_proxy_upstream_fetches_total`` by result, as the service's /metrics says (with
    ``want``: once it says that, or after 5 s; a pull is counted when its store write ends,
    which may be just after the client has the last byte)."""
    deadline = time.monotonic() + 5
    while True:
        got = _upstream_fetches(svc)
        if want is None or got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def _upstream_fetches(svc) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sstate_proxy_upstream_fetches_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('result="')[1].split('"')[0]] = float(value)
    return out


def stored_files(root: Path) -> list[str]:
    """Every file under a store root, temp files included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def origin(tmp_path):
    o = Origin(tmp_path / "origin", free_port())
    o.corpus = make_corpus(o.root, n=12, seed=5, equiv_fraction=0.0)
    o.start()
    yield o
    o.stop()


def proxy_for(service_factory, origin_url: str, name: str = "proxy", **upstream):
    cfg = {"mirrors": [origin_url + "/"], "timeout_s": 2.0, **upstream}
    return service_factory(name, config={"upstream": cfg})


def test_head_answers_from_upstream_get_pulls_once_then_served_locally(service_factory, origin):
    c = origin.corpus
    svc = proxy_for(service_factory, origin.url).start()
    key = c.objects[0]
    data = c.read(key)
    resp, _ = call(svc, "HEAD", key)
    assert resp.status == 200 and resp.getheader(SOURCE) == "upstream"
    assert int(resp.getheader("Content-Length")) == len(data)
    assert origin.counts() == {f"HEAD {key}": 1}  # a HEAD never fetches the body
    resp, body = call(svc, "GET", key)
    assert resp.status == 200 and resp.getheader(SOURCE) == "upstream" and body == data
    deadline = time.monotonic() + 5
    while (svc.storage / key).exists() is False and time.monotonic() < deadline:
        time.sleep(0.01)
    resp, body = call(svc, "GET", key)
    assert resp.status == 200 and resp.getheader(SOURCE) == "hit" and body == data
    resp, _ = call(svc, "HEAD", key)
    assert resp.status == 200 and resp.getheader(SOURCE) == "hit"
    counts = origin.counts()
    assert counts[f"GET {key}"] == 1 and counts[f"HEAD {key}"] == 1  # local answers cost nothing upstream
    # a Range request of an object not yet pulled: pulled whole, then answered from the store
    other = c.objects[1]
    resp, body = call(svc, "GET", other, {"Range": "bytes=10-19"})
    assert resp.status == 206 and body == c.read(other)[10:20] and resp.getheader(SOURCE) == "upstream"
    # the store keeps only whole objects, no temp files
    assert stored_files(svc.storage) == sorted([key, other])
    # after a restart without the upstream, the pulled objects are still served
    svc.stop()
    origin.stop()
    svc.start()
    resp, body = call(svc, "GET", key)
    assert resp.status == 200 and body == data and resp.getheader(SOURCE) == "hit"


def test_upstream_404_is_remembered_then_asked_again(service_factory, origin):
    c = origin.corpus
    svc = proxy_for(service_factory, origin.url, negative_ttl_s=0.5).start()
    missing = c.absent[0]
    for method in ("HEAD", "HEAD", "GET", "GET"):
        resp, _ = call(svc, method, missing)
        assert resp.status == 404
    assert origin.counts() == {f"HEAD {missing}": 1}  # remembered: one upstream request
    time.sleep(0.6)
    # published upstream meanwhile: found once the miss has expired
    src = c.objects[2]
    (origin.root / missing).parent.mkdir(parents=True, exist_ok=True)
    (origin.root / missing).write_bytes(c.read(src))
    resp, body = call(svc, "GET", missing)
    assert resp.status == 200 and body == c.read(src)
    assert upstream_fetches(svc, want={"fetched": 1}) == {"fetched": 1}  # the HEAD-remembered misses fetched nothing


def test_equivalent_names_are_asked_upstream_after_the_requested_one(service_factory, tmp_path):
    """The local rewrite knows T -> U, only the upstream has U's object (and .siginfo)."""
    o = Origin(tmp_path / "origin", free_port())
    c = make_corpus(o.root, n=10, seed=6, equiv_fraction=0.5)
    d = c.details[0]
    with o:
        svc = service_factory("proxy", config={"upstream": {"mirrors": [o.url]}},
                              args=["--anon-perms", "@read,@report"]).start()
        report(svc, d.unihash, d.outhash, d.unihash, method=d.method, key="unihash")
        assert report(svc, d.taskhash, d.outhash, d.taskhash, method=d.method, key="unihash")["unihash"] == d.unihash
        for method in ("HEAD", "GET"):
            resp, body = call(svc, method, d.taskhash_key)
            assert resp.status == 200 and resp.getheader(SOURCE) == "upstream"
            assert resp.getheader("X-Sstate-Served-Hash") == d.unihash
        assert body == c.read(d.unihash_key)
        resp, body = call(svc, "GET", d.taskhash_key + ".siginfo")  # follows its object
        assert resp.status == 200 and body == c.read(d.unihash_key + ".siginfo")
        counts = o.counts()
        # the requested name first (a miss upstream, remembered), then the equivalent one
        assert counts[f"HEAD {d.taskhash_key}"] == 1 and f"GET {d.taskhash_key}" not in counts
        assert counts[f"GET {d.unihash_key}"] == 1


def test_50_concurrent_gets_make_one_upstream_get(service_factory, tmp_path):
    """Within a worker (a future per key) and across processes (a file lock per key)."""
    o = Origin(tmp_path / "origin", free_port(), rate=8 * 1024 * 1024)
    key = "ab/cd/sstate:big:core2-64-poky-linux:1.0:r0:core2-64:14:abcd" + "1" * 60 + "_package.tar.zst"
    data = os.urandom(2 * 1024 * 1024 + 17)
    (o.root / key).parent.mkdir(parents=True)
    (o.root / key).write_bytes(data)
    with o:
        upstream = {"mirrors": [o.url], "timeout_s": 5.0}
        svc = service_factory("proxy", config={"upstream": upstream}, args=["--workers", "2"]).start()
        # a second service on the same store and database: other processes for certain
        other = service_factory("other", config={"upstream": upstream, "storage": {"path": str(svc.storage)},
                                                 "database": {"url": f"sqlite:///{svc.database}"}}).start()
        barrier = threading.Barrier(50)
        results: list = [None] * 50

        def one(i: int) -> None:
            barrier.wait()
            resp, body = call(svc if i % 2 else other, "GET", key, timeout=30)
            results[i] = (resp.status, body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r == (200, data) for r in results)
        assert o.counts() == {f"GET {key}": 1}
        assert stored_files(svc.storage) == [key]
        # counted once, by whichever process pulled (the counts of svc's two workers are one)
        deadline = time.monotonic() + 5
        while True:
            fetched = [upstream_fetches(s).get("fetched", 0) for s in (svc, other)]
            if sum(fetched) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sorted(fetched) == [0, 1]


def test_upstream_killed_mid_transfer_keeps_nothing_partial(service_factory, tmp_path):
    port = free_port()
    slow = Origin(tmp_path / "origin", port, rate=1024 * 1024)
    key = "ab/cd/sstate:cut:core2-64-poky-linux:1.0:r0:core2-64:14:abcd" + "2" * 60 + "_package.tar.zst"
    data = os.urandom(3 * 1024 * 1024)
    (slow.root / key).parent.mkdir(parents=True)
    (slow.root / key).write_bytes(data)
    slow.start()
    svc = service_factory("proxy", config={"upstream": {"mirrors": [slow.url], "timeout_s": 2.0,
                                                        "negative_ttl_s": 0.3}}).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request("GET", "/" + quote(key))
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
        got = resp.read(256 * 1024)  # the first bytes came before the last was fetched
        slow.kill()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            got += resp.read()
        conn.close()
        assert len(got) < len(data)
        time.sleep(0.2)
        assert stored_files(svc.storage) == []  # nothing partial kept, no temp file left
        resp, _ = call(svc, "GET", key)
        assert resp.status == 404  # the upstream is gone: a clean miss
        time.sleep(0.4)  # a failed mirror is skipped for negative_ttl_s
        with Origin(slow.root, port):  # back, fast this time
            resp, body = call(svc, "GET", key)
            assert resp.status == 200 and body == data
        # the client may have its last byte before the staging file is committed (fsync, link)
        deadline = time.monotonic() + 5
        while stored_files(svc.storage) != [key] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stored_files(svc.storage) == [key]
    finally:
        slow.stop()


class _BadUpstream:
    """A TCP server that accepts and then either says nothing or answers garbage."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.mode == "garbage":
                conn.recv(65536)
                conn.sendall(b"\x00\xffthis is not HTTP\r\n\r\n")
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_faulty_upstreams_give_a_clean_miss_within_the_timeout(service_factory, origin):
    """Down (connection refused), silent (accepts, never answers) and garbage (not HTTP)."""
    c = origin.corpus
    silent, garbage = _BadUpstream("silent"), _BadUpstream("garbage")
    bad = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{silent.port}",
           f"http://127.0.0.1:{garbage.port}"]
    try:
        # the faulty mirrors first, the good one last: each is given up within the timeout
        svc = service_factory("proxy", config={"upstream": {"mirrors": [*bad, origin.url],
                                                            "timeout_s": 0.5}}).start()
        key = c.objects[3]
        t0 = time.monotonic()
        resp, body = call(svc, "GET", key)
        assert time.monotonic() - t0 < 4
        assert resp.status == 200 and body == c.read(key)  # from the last mirror
        alone = service_factory("alone", config={"upstream": {"mirrors": bad, "timeout_s": 0.5}}).start()
        for method in ("HEAD", "GET"):
            t0 = time.monotonic()
            resp, _ = call(alone, method, c.objects[4])
            assert resp.status == 404 and time.monotonic() - t0 < 4
        assert stored_files(alone.storage) == []
    finally:
        silent.close()
        garbage.close()


def test_credentials_from_netrc_and_from_the_url(service_factory, tmp_path):
    o = Origin(tmp_path / "origin", free_port(), auth="puller:s3cret")
    c = make_corpus(o.root, n=4, seed=9, equiv_fraction=0.0)
    with o:
        home = tmp_path / "home"
        home.mkdir()
        (home / ".netrc").write_text("machine 127.0.0.1 login puller password s3cret\n")
        (home / ".netrc").chmod(0o600)
        svc = service_factory("netrc", config={"upstream": {"mirrors": [o.url]}}, env={"HOME": str(home)}).start()
        resp, body = call(svc, "GET", c.objects[0])
        assert resp.status == 200 and body == c.read(c.objects[0])
        # no ~/.netrc: a mirror that is down (its failure is logged, without its credentials),
        # one without credentials (401: a miss), one with them in its URL
        down = f"http://puller:s3cret@127.0.0.1:{free_port()}/"
        in_url = f"http://puller:s3cret@127.0.0.1:{o.port}/"
        svc2 = service_factory("url", config={"upstream": {"mirrors": [down, o.url, in_url]}},
                               env={"HOME": str(tmp_path)}).start()
        resp, body = call(svc2, "GET", c.objects[1])
        assert resp.status == 200 and body == c.read(c.objects[1])
        assert o.counts()[f"GET {c.objects[1]}"] == 2
        svc2.stop()
        log = svc2.read_log()
        assert "GET failed" in log and "s3cret" not in log


@pytest.mark.parametrize("upstream,message", [
    ({"mirrors": ["ftp://example.com/"]}, "http:// or https://"),
    ({"mirrors": ["http:///nohost"]}, "http:// or https://"),
    ({"mirrors": ["http://example.com/?a=b"]}, "no query"),
    ({"cache_max_bytes": -1}, "cache_max_bytes"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"negative_ttl_s": -1}, "negative_ttl_s"),
])
def test_bad_upstream_config_names_the_key(tmp_path, upstream, message):
    path = tmp_path / "c.toml"
    lines = ["[upstream]"]
    for k, v in upstream.items():
        lines.append(f"{k} = {v!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load(str(path), environ={})


def test_good_upstream_config_loads(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nmirrors = ["https://u:p@sstate.example.com/all/"]\ncache_max_bytes = 1000\n'
                    'timeout_s = 3\nnegative_ttl_s = 0\n')
    up = load(str(path), environ={}).upstream
    assert up.mirrors == ("https://u:p@sstate.example.com/all/",) and up.cache_max_bytes == 1000
    assert up.timeout_s == 3.0 and up.negative_ttl_s == 0.0
