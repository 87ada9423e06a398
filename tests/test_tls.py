"""TLS on the HTTP port ([server] tls_cert/tls_key), with a throwaway CA (trustme): bitbake's own
fetcher over https (its HEAD checks in Python, its downloads with wget), bitbake's hashserv
client over wss:// on the same port, the raw hashserv listener still plain, and plain http on
the TLS port failing at once without harm to the service."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time

import aiohttp
import pytest
import trustme

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import make_corpus
from tests.hashserv_client import connect
from tests.service import Service, free_port

HEADER_S = 1.0


class TrustingMirrorClient(BitbakeMirrorClient):
    """bitbake's fetcher told to trust ``ca``, as a site with its own CA configures it: the
    datastore's SSL_CERT_FILE (exported to the fetcher's Python HEAD checks and to wget) and,
    since Debian's wget uses GnuTLS, which ignores SSL_CERT_FILE, ``--ca-certificate``."""

    def __init__(self, *args, ca: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ca = ca

    def _datastore(self):
        d = super()._datastore()
        if self.ca:
            d.setVar("SSL_CERT_FILE", self.ca)
            d.setVar("FETCHCMD_wget", f"wget --tries=1 --timeout=20 --ca-certificate={self.ca}")
        else:
            d.setVar("FETCHCMD_wget", "wget --tries=1 --timeout=20")
        return d


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, chain_pem, key_pem = work / "ca.pem", work / "chain.pem", work / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(chain_pem), append=i > 0)
    hs_port = free_port()
    service = Service(work / "svc", config={
        "server": {"tls_cert": str(chain_pem), "tls_key": str(key_pem)},
        "hashserv": {"anon_perms": ["@read", "@report"], "bind": f"127.0.0.1:{hs_port}"},
        "limits": {"header_timeout_s": HEADER_S},
    })
    corpus = make_corpus(service.storage, n=12, seed=3)
    service.start()
    service.ca = str(ca_pem)
    service.hs_port = hs_port
    service.corpus = corpus
    try:
        yield service
    finally:
        service.stop()


def test_bitbake_fetcher_over_https(tls, tmp_path):
    corpus = tls.corpus
    before = os.environ.get("SSL_CERT_FILE")
    client = TrustingMirrorClient(tls.url, tmp_path / "bb", ca=tls.ca)
    found = client.check(corpus.objects + corpus.absent[:4], threads=4)
    assert all(found[k] for k in corpus.objects)
    assert not any(found[k] for k in corpus.absent[:4])
    for key in corpus.objects[:2]:
        assert client.download(key) == corpus.read(key)
    # bitbake sets the fetcher's variables in os.environ around each HEAD check; its checking
    # threads can leave one behind (each restores what another had set): put it back
    if before is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = before
    # the certificate is really checked: without the CA bitbake trusts nothing here
    stranger = TrustingMirrorClient(tls.url, tmp_path / "bb-no-ca")
    assert stranger.check(corpus.objects[:1], threads=1) == {corpus.objects[0]: False}
    assert stranger.download(corpus.objects[0]) is None


async def test_bitbake_hashserv_client_over_wss_and_plain_tcp(tls, monkeypatch):
    # bitbake's websocket client (the websockets library) builds its default SSL context at
    # connect time, and OpenSSL reads SSL_CERT_FILE then
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca)
    method, taskhash, outhash, unihash = "oe.sstatesig.OEOuthashBasic", "1" * 64, "2" * 64, "3" * 64
    wss = await connect(f"wss://127.0.0.1:{tls.port}/ws")
    try:
        assert (await wss.report_unihash(taskhash, method, outhash, unihash))["unihash"] == unihash
    finally:
        await wss.close()
    raw = await connect(f"127.0.0.1:{tls.hs_port}")  # the raw listener stays plain TCP
    try:
        assert await raw.get_unihash(method, taskhash) == unihash
    finally:
        await raw.close()
    monkeypatch.delenv("SSL_CERT_FILE")  # the system's CAs do not know ours
    with pytest.raises(ConnectionError):
        await connect(f"wss://127.0.0.1:{tls.port}/ws", timeout=5)


async def test_plain_http_on_the_tls_port_fails_cleanly(tls):
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{tls.port}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
    with socket.create_connection(("127.0.0.1", tls.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
        assert not answer.startswith(b"HTTP/")  # a TLS alert at most, then the close
    assert time.monotonic() - t0 < 5  # refused at once, not left to time out
    # the service goes on serving https
    ctx = ssl.create_default_context(cafile=tls.ca)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{tls.url}/healthz", ssl=ctx) as resp:
            assert resp.status == 200 and await resp.text() == "ok\n"
    assert "Traceback" not in tls.read_log()


def test_tls_handshake_and_head_deadlines(tls):
    """A client that never starts its TLS handshake, and one that sends half a request head
    over TLS, are both closed after header_timeout_s."""
    t0 = time.monotonic()

    def closed_at(s: socket.socket) -> float:
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        return time.monotonic() - t0

    silent = socket.create_connection(("127.0.0.1", tls.port))
    ctx = ssl.create_default_context(cafile=tls.ca)
    half = ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls.port)), server_hostname="127.0.0.1")
    half.sendall(b"GET /healthz HTTP/1.1\r\n")
    for s in (silent, half):
        assert HEADER_S * 0.8 <= closed_at(s) <= HEADER_S + 1.5
        s.close()


def test_large_object_over_tls(tls):
    """The mirror sends files with plain reads under TLS (no sendfile there): all bytes arrive."""
    big = tls.storage / "ab" / "cd" / "large.bin"
    data = bytes(range(256)) * (24 << 12)  # 24 MiB
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(data)
    rel = big.relative_to(tls.storage).as_posix()

    async def fetch() -> bytes:
        ctx = ssl.create_default_context(cafile=tls.ca)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{tls.url}/{rel}", ssl=ctx) as resp:
                assert resp.status == 200
                return await resp.read()

    assert asyncio.run(fetch()) == data
