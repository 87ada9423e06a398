"""How a first GET's bytes flow (proxy/upstream.py ``Spool``, proxy/mirror.py ``_ClientSink``):
the upstream body goes to a staging file on the store's filesystem and the client is sent that
file as it grows, with sendfile on plain connections and with reads under TLS; the pull does
not wait for its client; the environment's HTTP proxy is used (read once at start)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from urllib.parse import quote

import trustme

from tests.service import free_port
from tests.test_upstream import SOURCE, call, stored_files
from tests.upstream_origin import Origin

KEY = "ab/cd/sstate:stream:core2-64-poky-linux:1.0:r0:core2-64:14:abcd" + "3" * 60 + "_package.tar.zst"


def _origin_with(tmp_path, data: bytes, **kwargs) -> Origin:
    o = Origin(tmp_path / "origin", free_port(), **kwargs)
    (o.root / KEY).parent.mkdir(parents=True)
    (o.root / KEY).write_bytes(data)
    return o


def test_a_client_that_stops_reading_holds_no_other_request(service_factory, tmp_path):
    """The first client takes the head and then reads nothing: the pull still ends (stored,
    its lock and waiters let go) as soon as the upstream is done, not when that client is."""
    data = os.urandom(24 * 1024 * 1024)  # far more than the socket buffers of a stalled client
    with _origin_with(tmp_path, data, rate=24 * 1024 * 1024) as o:  # about a second upstream
        svc = service_factory("proxy", config={"upstream": {"mirrors": [o.url], "timeout_s": 30.0}}).start()
        stalled = socket.create_connection(("127.0.0.1", svc.port))
        try:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            stalled.sendall(f"GET /{quote(KEY)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert stalled.recv(12) == b"HTTP/1.1 200"
            started = time.monotonic()
            resp, body = call(svc, "GET", KEY, timeout=20)  # waits for the pull, then the store
            assert resp.status == 200 and body == data
            # the upstream takes about 1 s; a pull waiting on its stalled client would never end
            assert time.monotonic() - started < 10
            assert stored_files(svc.storage) == [KEY]
            assert o.counts() == {f"GET {KEY}": 1}
        finally:
            stalled.close()


def test_a_pull_over_tls_is_sent_by_reads(service_factory, tmp_path):
    """No sendfile under TLS: the growing staging file is read and written through the TLS
    transport, and the client gets the whole object as it is pulled."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(chain), append=i > 0)
    data = os.urandom(3 * 1024 * 1024 + 5)
    with _origin_with(tmp_path, data, rate=8 * 1024 * 1024) as o:
        svc = service_factory("tls", config={"server": {"tls_cert": str(chain), "tls_key": str(key)},
                                             "upstream": {"mirrors": [o.url], "timeout_s": 5.0}}).start()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        # pulled (streamed from the staging file), then stored (or, while the pull still
        # commits, a waiter of that pull: "upstream" again)
        for sources in (("upstream",), ("upstream", "hit")):
            conn = http.client.HTTPSConnection("127.0.0.1", svc.port, timeout=20, context=context)
            conn.request("GET", "/" + quote(KEY))
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 200 and resp.getheader(SOURCE) in sources and body == data
        assert o.counts() == {f"GET {KEY}": 1}
        assert stored_files(svc.storage) == [KEY]


def test_the_environment_proxy_is_used_unless_no_proxy_names_the_mirror(service_factory, tmp_path):
    """http_proxy as aiohttp's trust_env reads it (once, at start): requests to the mirror go
    through the proxy, with its credentials; no_proxy naming the mirror's host bypasses it."""
    data = os.urandom(100_000)
    mirror = f"http://127.0.0.1:{free_port()}"  # nothing listens there: only the proxy can answer
    with _origin_with(tmp_path, data, auth="user:pw") as proxy:
        proxy_url = f"http://user:pw@127.0.0.1:{proxy.port}"
        env = {"http_proxy": proxy_url, "HTTP_PROXY": proxy_url, "no_proxy": "", "NO_PROXY": ""}
        svc = service_factory("via", env=env, config={"upstream": {"mirrors": [mirror], "timeout_s": 2.0}}).start()
        resp, body = call(svc, "GET", KEY)
        assert resp.status == 200 and resp.getheader(SOURCE) == "upstream" and body == data
        assert proxy.counts() == {f"proxied GET {KEY}": 1}
        bypass = {**env, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
        direct = service_factory("direct", env=bypass,
                                 config={"upstream": {"mirrors": [mirror], "timeout_s": 2.0}}).start()
        resp, _ = call(direct, "GET", KEY)
        assert resp.status == 404  # the mirror itself is down
        assert proxy.counts() == {f"proxied GET {KEY}": 1}


def test_a_local_staging_file_is_linked_in_and_never_a_key(tmp_path):
    """LocalStore.staging_path: in the root (same filesystem: put_file links it, no copy),
    named as the store's temp files, so no listing shows it and a dead writer's is removed."""
    from storage.local import LocalStore

    async def run() -> None:
        store = LocalStore(str(tmp_path / "store"))
        path = store.staging_path()
        assert os.path.dirname(path) == store.root and path != store.staging_path()
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        assert [k async for k in store.keys()] == []
        result = await store.put_file("a/b/obj", path, link=True)
        assert result.created and result.linked and os.stat(path).st_ino == os.stat(f"{store.root}/a/b/obj").st_ino
        os.unlink(path)
        litter = store.staging_path().replace(f".{os.getpid()}.", ".999999999.")  # a dead writer's
        open(litter, "wb").close()
        assert await store.cleanup_temp() == 1 and not os.path.exists(litter)
        await store.close()

    import asyncio

    asyncio.run(run())


def test_a_chunked_upstream_answer_is_stored_first_then_served(service_factory, tmp_path):
    """No length to promise the client up front: the staging file is completed and stored,
    then the object is served from the store (with its length)."""
    data = os.urandom(1024 * 1024 + 3)
    with _origin_with(tmp_path, data, chunked=True) as o:
        svc = service_factory("proxy", config={"upstream": {"mirrors": [o.url], "timeout_s": 5.0}}).start()
        resp, body = call(svc, "GET", KEY)
        assert resp.status == 200 and resp.getheader(SOURCE) == "upstream" and body == data
        assert resp.getheader("Content-Length") == str(len(data)) and resp.getheader("ETag")
        assert stored_files(svc.storage) == [KEY]


def test_a_pull_into_s3_stages_in_the_temp_dir_and_leaves_nothing_there(service_factory, tmp_path):
    from tests.s3server import TEST_ENV, MotoServer

    data = os.urandom(3 * 1024 * 1024 + 1)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    moto = MotoServer()
    moto.start()
    try:
        moto.create_bucket("near")
        with _origin_with(tmp_path, data, rate=8 * 1024 * 1024) as o:
            svc = service_factory("s3", env={**TEST_ENV, "TMPDIR": str(tmp)}, config={
                "storage": {"backend": "s3"},
                "storage.s3": {"bucket": "near", "prefix": "p", "endpoint_url": moto.endpoint_url,
                               "region": "us-east-1", "timeout_s": 5.0},
                "upstream": {"mirrors": [o.url], "timeout_s": 5.0}}).start()
            resp, body = call(svc, "GET", KEY)
            assert resp.status == 200 and resp.getheader(SOURCE) == "upstream" and body == data
            deadline = time.monotonic() + 10
            while not moto.client().list_objects_v2(Bucket="near", Prefix="p/").get("Contents"):
                assert time.monotonic() < deadline, "not uploaded"
                time.sleep(0.05)
            resp, body = call(svc, "GET", KEY)
            assert resp.status == 200 and body == data and o.counts() == {f"GET {KEY}": 1}
            names = [p.name for p in tmp.iterdir()]
            assert f"sstate-proxy-{os.getuid()}" in names  # the service's temp dir is this one
            assert [n for n in names if n.startswith("sstate-proxy-staging")] == []
    finally:
        moto.close()


def test_staging_files_of_dead_processes_are_removed_at_start(tmp_path):
    """An S3 pull stages in the temp dir; a process killed mid-pull leaves its file there, and
    the next start removes it (a live process's file stays)."""
    from storage.s3 import STAGING_PREFIX, remove_dead_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    litter = tmp_path / f"{STAGING_PREFIX}{dead.pid}.0123456789abcdef"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}.fedcba9876543210"
    other = tmp_path / "sstate-proxy-staging-not-ours"
    for p in (litter, live, other):
        p.write_bytes(b"partial")
    assert remove_dead_staging(str(tmp_path)) == 1
    assert not litter.exists() and live.exists() and other.exists()
