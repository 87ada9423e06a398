"""The sstate mirror on local disk, as bitbake's own fetcher and plain HTTP clients see it."""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import make_corpus
from tests.s3server import TEST_ENV, MotoServer
from tests.service import REPO, Service, read_status_line
from tests.workers import serving_pid, worker_pids


def request(svc: Service, method: str, path: str, headers: dict | None = None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    if own:
        conn.close()
    return resp, body


def raw_request(port: int, raw_target: bytes, method: bytes = b"GET") -> int:
    """Send a request line exactly as given (no client-side normalisation); the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(method + b" " + raw_target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_status_line(s)
    return int(data.split(b" ", 2)[1])


def quote(key: str) -> str:
    from urllib.parse import quote as q

    return "/" + q(key)


def upload_tree(moto, bucket: str, prefix: str, root: Path) -> None:
    client = moto.client()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            key = path.relative_to(root).as_posix()
            client.put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=path.read_bytes())


def s3_service(work: Path, moto, bucket: str, prefix: str, **s3_keys) -> Service:
    return Service(work, env=TEST_ENV, config={
        "storage": {"backend": "s3"},
        "storage.s3": {"bucket": bucket, "prefix": prefix, "endpoint_url": moto.endpoint_url,
                       "region": "us-east-1", "timeout_s": 2.0, **s3_keys},
    })


@pytest.fixture(scope="module", params=["local", "s3"])
def mirror(request, tmp_path_factory):
    """The same corpus served from local disk and from S3 (a moto server over HTTP, with a prefix)."""
    work = tmp_path_factory.mktemp("mirror")
    moto = None
    if request.param == "local":
        svc = Service(work / "svc")
        root = svc.storage
    else:
        moto = MotoServer()
        moto.start()
        moto.create_bucket("sstate")
        svc = s3_service(work / "svc", moto, "sstate", "fleet/mirror")
        root = work / "corpus"
    corpus = make_corpus(root, n=300, seed=7)
    (work / "outside-secret.txt").write_text("secret")
    os.symlink(work / "outside-secret.txt", root / "escape.txt")
    os.symlink("/etc", root / "etc-link")
    (root / "README.txt").write_text("plain file, not an sstate object\n")
    if moto is not None:
        upload_tree(moto, "sstate", "fleet/mirror", root)
    svc.start()
    yield svc, corpus
    svc.stop()
    if moto is not None:
        moto.close()


def test_bitbake_fetcher_checks_and_downloads_the_corpus(mirror, tmp_path):
    svc, corpus = mirror
    client = BitbakeMirrorClient(svc.url, tmp_path / "bb")
    present = corpus.objects
    assert any(k.startswith("universal/") for k in present)
    assert corpus.truncated and corpus.legacy
    found = client.check(present + corpus.absent, threads=8)
    assert [k for k in present if not found[k]] == []
    assert [k for k in corpus.absent if found[k]] == []
    # pstaging_fetch: the object and its .siginfo, HEAD then wget GET, bytes identical.
    # Every special layout, the largest objects, and a spread of the rest (one wget each).
    by_size = sorted(present, key=lambda k: corpus.sizes[k])
    special = corpus.truncated + corpus.legacy + [k for k in present if k.startswith("universal/")][:20]
    objects = list(dict.fromkeys(special + by_size[-10:] + present[::4]))
    siginfos = [c for c in corpus.companions if c.endswith(".siginfo")][::6]
    downloads = objects + siginfos + corpus.siginfo_only[:5]
    assert len(downloads) >= 100
    for key in downloads:
        got = client.download(key)
        assert got == corpus.read(key), key
    assert client.download(corpus.absent[0]) is None


def test_resumed_download_is_identical(mirror, tmp_path):
    svc, corpus = mirror
    key = max(corpus.objects, key=lambda k: corpus.sizes[k])
    data = corpus.read(key)
    client = BitbakeMirrorClient(svc.url, tmp_path / "bb")
    client.partial(key, data[: len(data) // 3])  # what an interrupted wget leaves behind
    assert client.download(key) == data
    resp, body = request(svc, "GET", quote(key), {"Range": f"bytes={len(data) // 3}-"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {len(data) // 3}-{len(data) - 1}/{len(data)}"
    assert body == data[len(data) // 3:]


def test_ranges_and_conditionals(mirror):
    svc, corpus = mirror
    key = corpus.objects[0]
    data = corpus.read(key)
    size = len(data)
    head, body = request(svc, "HEAD", quote(key))
    assert head.status == 200 and body == b""
    assert int(head.getheader("Content-Length")) == size
    assert head.getheader("X-Sstate-Source") == "hit"
    etag, lastmod = head.getheader("ETag"), head.getheader("Last-Modified")
    assert etag and lastmod
    get, body = request(svc, "GET", quote(key))
    assert body == data and get.getheader("ETag") == etag and get.getheader("Last-Modified") == lastmod
    for rng, expect in [("bytes=0-9", data[:10]), ("bytes=-5", data[-5:]), (f"bytes=5-{size + 100}", data[5:])]:
        r, b = request(svc, "GET", quote(key), {"Range": rng})
        assert r.status == 206 and b == expect, rng
        h, _ = request(svc, "HEAD", quote(key), {"Range": rng})
        assert h.status == 206 and int(h.getheader("Content-Length")) == len(expect)
    r, _ = request(svc, "GET", quote(key), {"Range": f"bytes={size}-"})
    assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{size}"
    r, b = request(svc, "GET", quote(key), {"Range": "bytes=0-1,5-6"})  # multi-range: whole object
    assert r.status == 200 and b == data
    for method in ("GET", "HEAD"):
        r, b = request(svc, method, quote(key), {"If-None-Match": etag})
        assert r.status == 304 and b == b""
        r, _ = request(svc, method, quote(key), {"If-Modified-Since": lastmod})
        assert r.status == 304
        r, _ = request(svc, method, quote(key), {"If-Match": '"nope"'})
        assert r.status == 412
    r, b = request(svc, "GET", quote(key), {"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert r.status == 200 and b == data


def test_keep_alive_serves_many_requests_on_one_connection(mirror):
    svc, corpus = mirror
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    sock_ids = set()
    for key in corpus.objects[:20] + corpus.absent[:5]:
        resp, _ = request(svc, "HEAD", quote(key), conn=conn)
        assert resp.status in (200, 404)
        sock_ids.add(id(conn.sock))
    conn.close()
    assert len(sock_ids) == 1


def test_misses_are_404_for_every_method_bitbake_uses(mirror):
    svc, corpus = mirror
    for key in corpus.absent[:5] + ["no/such/plain-file.txt", "ab/cd/sstate:x:y:1:r0:z:14:" + "0" * 64 + "_fetch.tar.zst"]:
        for method in ("HEAD", "GET"):
            resp, _ = request(svc, method, quote(key))
            assert resp.status == 404, (method, key)


def test_plain_files_are_served_without_rewrite(mirror):
    svc, _ = mirror
    resp, body = request(svc, "GET", "/README.txt")
    assert resp.status == 200 and body == b"plain file, not an sstate object\n"


BAD_TARGETS = [
    b"/../outside-secret.txt",
    b"/%2e%2e/outside-secret.txt",
    b"/%2E%2E/outside-secret.txt",
    b"/universal/%2e%2e/%2e%2e/outside-secret.txt",
    b"/..%2foutside-secret.txt",
    b"/..%2Foutside-secret.txt",
    b"/%2e%2e%2foutside-secret.txt",
    b"/ab/./cd",
    b"//etc/passwd",
    b"/%2fetc%2fpasswd",
    b"/etc%00passwd",
    b"/a%00",
    b"/..%5c..%5coutside-secret.txt",
    b"/a\\b",
    b"/" + b"a" * 300,
    b"/" + b"/".join([b"d" * 200] * 6),
    b"/%ff%fe",
    b"/a%0a",
    b"/escape.txt",
    b"/etc-link/passwd",
    b"/etc-link/../../outside-secret.txt",
]


@pytest.mark.parametrize("target", BAD_TARGETS, ids=[t.decode("latin-1")[:40] for t in BAD_TARGETS])
def test_bad_paths_never_leave_the_root(mirror, target):
    svc, _ = mirror
    for method in (b"GET", b"HEAD"):
        status = raw_request(svc.port, target, method)
        assert status in (400, 404), (target, method, status)


def test_health_and_access_log(mirror):
    svc, corpus = mirror
    assert request(svc, "GET", "/healthz")[0].status == 200
    assert request(svc, "GET", "/readyz")[0].status == 200
    marker = f"/ab/cd/no-such-{random.randrange(10**9)}.txt"
    request(svc, "HEAD", marker)
    deadline = time.monotonic() + 5
    while marker not in svc.read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in svc.read_log().splitlines() if marker in line]
    assert len(lines) == 1 and " 404 " in lines[0] and "rid=" in lines[0]


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cases = {
        "[server]\nworkers = 0\n": "server.workers",
        "[storage]\nbackend = 'ftp'\n": "storage.backend",
        "[database]\nurl = 'mysql://x'\n": "database.url",
        "[database]\nurl = 'postgresql://db:port/sstate'\n": "database.url: bad PostgreSQL url",
        "[database]\npool_size = 0\n": "database.pool_size",
        "[server]\nbusy_poll_us = 200\n": "server.busy_poll_us: unknown key",
        "[server]\ntrusted_proxies = ['10.0.0.0/33']\n": "server.trusted_proxies",
        "[hashserv]\nanon_perms = ['@root']\n": "hashserv.anon_perms",
        "[server]\nbindd = '1'\n": "server.bindd",
        "not toml [": "config",
    }
    for text, key in cases.items():
        cfg.write_text(text)
        p = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, text
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], (text, p.stderr)
    for command in (["serve"], ["stats"], ["user", "list"]):
        p = subprocess.run([sys.executable, "-m", "proxy.cli", *command, "--database", "postgresql://u:pw@db:x/sstate"],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and p.stderr.splitlines() == [
            "sstate-proxy: bad configuration: database.url: bad PostgreSQL url "
            "'postgresql://u:***@db:x/sstate': bad port 'x'"]
    env = {**os.environ, "SSTATE_PROXY_CONFIG": str(tmp_path / "missing.toml")}
    p = subprocess.run([sys.executable, "-m", "proxy.cli", "serve"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "missing.toml" in p.stderr


def test_defaults_serve_sstate_cache_on_8080(tmp_path):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8080))
        except OSError:
            pytest.skip("port 8080 is in use on this machine")
    (tmp_path / "sstate-cache" / "ab").mkdir(parents=True)
    (tmp_path / "sstate-cache" / "ab" / "hello.txt").write_text("hi")
    env = {k: v for k, v in os.environ.items() if k != "SSTATE_PROXY_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        svc = Service.__new__(Service)
        svc.port = 8080
        deadline = time.monotonic() + 20
        while True:
            try:
                resp, body = request(svc, "GET", "/ab/hello.txt")
                break
            except OSError:
                assert time.monotonic() < deadline, "service did not start on 8080"
                time.sleep(0.1)
        assert resp.status == 200 and body == b"hi"
        assert (tmp_path / "sstate-proxy.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_workers_share_one_port_and_stop_together(tmp_path):
    svc = Service(tmp_path / "w", args=["--workers", "3"])
    (svc.storage / "ab").mkdir(parents=True)
    (svc.storage / "ab" / "x.txt").write_text("x")
    svc.start()
    try:
        children = [str(p) for p in worker_pids(svc.proc.pid)]
        assert len(children) == 3
        pids = set()
        deadline = time.monotonic() + 20
        while len(pids) < 3 and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
            conn.request("GET", "/ab/x.txt")
            assert conn.getresponse().read() == b"x"
            pids.add(str(serving_pid(conn.sock, map(int, children))))
            conn.close()
        assert len(pids) >= 2, pids  # the kernel spread connections over several workers
    finally:
        assert svc.stop() == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()



def test_empty_object_then_the_next_request(tmp_path):
    """A GET of an empty object is a 200 with no body and the connection goes on (asyncio's
    sendfile refuses a count of 0: a stray 500 used to follow the 200 on the connection)."""
    svc = Service(tmp_path / "svc")
    (svc.storage / "ab").mkdir(parents=True)
    (svc.storage / "ab" / "empty.bin").write_bytes(b"")
    with svc:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
            s.sendall(b"GET /ab/empty.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"HEAD /ab/empty.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
    assert re.findall(rb"HTTP/1\.1 (\d+)", got) == [b"200", b"200"], got
    assert got.count(b"Content-Length: 0\r\n") == 2


def test_file_shrinking_during_a_transfer_closes_the_connection(tmp_path):
    """The body falls short of its Content-Length: the connection must end (the client sees a
    short body and resumes with Range), not stay open waiting for bytes that never come."""
    svc = Service(tmp_path / "svc")
    path = svc.storage / "ab" / "big.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(16 << 20))
    with svc:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", svc.port))
        s.sendall(b"GET /ab/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        got = s.recv(65536)
        with open(path, "r+b") as f:
            f.truncate(1 << 20)
        while chunk := s.recv(1 << 20):  # a timeout here is the failure
            got += chunk
        s.close()
        head, body = got.split(b"\r\n\r\n", 1)
        assert b" 200 " in head.split(b"\r\n")[0] and b"Content-Length: 16777216" in head
        assert len(body) < 16 << 20
        deadline = time.monotonic() + 5
        while "file shrank during transfer" not in svc.read_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "file shrank during transfer" in svc.read_log()
        assert request(svc, "GET", "/ab/big.bin")[1] == path.read_bytes()  # and it goes on serving
