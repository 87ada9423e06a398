"""Authenticated PUT/DELETE of sstate objects against the real service process: permissions,
verification, atomicity (client disconnects, SIGKILL mid-upload), first-write-wins under
concurrency, and storage dedup by archive identity."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import zstandard

from tests.service import Service, read_status_line

ADMIN = ("admin", "admin-secret-token")
MAX_UPLOAD = 2 * 1024 * 1024


# --- helpers ---------------------------------------------------------------------------------


def obj_key(h: str | None = None, task: str = "populate_sysroot", pn: str = "zlib", ext: str = ".tar.zst") -> str:
    h = h or random.getrandbits(256).to_bytes(32, "big").hex()
    return f"{h[:2]}/{h[2:4]}/sstate:{pn}:core2-64-poky-linux:1.3.1:r0:core2-64:14:{h}_{task}{ext}"


def path_of(key: str) -> str:
    return "/" + quote(key)


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def call(svc: Service, method: str, key: str, body: bytes | None = None, auth=None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    try:
        h = dict(headers or {})
        if auth is not None:
            h["Authorization"] = basic(*auth)
        conn.request(method, path_of(key), body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def add_user(svc: Service, name: str, perms: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "user", "add", name, "--perms", perms, "--config", str(svc.config_path)],
        cwd=svc.workdir, env=svc.env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def make_archive(files: dict[str, bytes], mtime: int = 1_700_000_000, pzstd: bool = True) -> bytes:
    """A real sstate-like .tar.zst: GNU tar of ``files`` (plus their dirs), zstd (pzstd framing)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        dirs = sorted({str(Path(n).parent) for n in files} - {"."})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, mtime, "builder", "builder"
            tf.addfile(ti)
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(data), 0o644, mtime, "builder", "builder"
            tf.addfile(ti, io.BytesIO(data))
    frame = zstandard.ZstdCompressor(level=3).compress(raw.getvalue())
    if not pzstd:
        return frame
    import struct

    return struct.pack("<III", 0x184D2A50, 4, len(frame)) + frame


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def temp_litter(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def raw_put(port: int, key: str, headers: dict, body: bytes, *, send: int | None = None,
            shutdown: bool = False, read: bool = True) -> int | None:
    """PUT over a raw socket: headers as given, ``send`` bytes of ``body`` (all by default); then
    half-close (``shutdown``) or just close; the status code if ``read``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        head = f"PUT {path_of(key)} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n" + body[: len(body) if send is None else send])
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        if not read:
            return None
        data = read_status_line(s)
        return int(data.split(b" ", 2)[1]) if data else None
    finally:
        s.close()


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """One service for the request-level tests, with an admin, an uploader and a reader."""
    s = Service(tmp_path_factory.mktemp("upload") / "svc",
                env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                config={"limits": {"max_upload_bytes": MAX_UPLOAD}})
    s.users = {"uploader": add_user(s, "uploader", "@read,@upload"), "reader": add_user(s, "reader", "@read")}
    s.start()
    yield s
    s.stop()


def uploader(svc):
    return ("uploader", svc.users["uploader"])


# --- permissions ---------------------------------------------------------------------------------


def test_put_permissions_and_first_write_wins(svc):
    key = obj_key()
    body = make_archive({"sysroot-destdir/usr/lib/libz.so.1": os.urandom(5000)})
    st, h, _ = call(svc, "PUT", key, body)
    assert st == 401 and h["www-authenticate"] == 'Basic realm="sstate-proxy"'
    st, _, _ = call(svc, "PUT", key, body, auth=("reader", svc.users["reader"]))
    assert st == 403
    st, h, _ = call(svc, "PUT", key, body, auth=("uploader", "wrong-token"))
    assert st == 401 and "www-authenticate" in h
    st, _, _ = call(svc, "PUT", key, body, auth=("nobody", "x"))
    assert st == 401
    assert call(svc, "HEAD", key)[0] == 404  # nothing stored by the refused attempts

    st, h, _ = call(svc, "PUT", key, body, auth=uploader(svc))
    assert st == 201 and h.get("etag")
    st, h, _ = call(svc, "HEAD", key)  # visible at once (the negative cache was invalidated)
    assert st == 200 and h["x-sstate-source"] == "hit" and int(h["content-length"]) == len(body)
    other = make_archive({"sysroot-destdir/usr/lib/libz.so.1": os.urandom(5000)})
    st, _, _ = call(svc, "PUT", key, other, auth=uploader(svc))
    assert st == 200
    st, _, got = call(svc, "GET", key)
    assert st == 200 and got == body  # first write wins
    st, _, _ = call(svc, "PUT", key, other, auth=ADMIN)  # @all implies @upload
    assert st == 200


def test_delete_permissions(svc):
    key = obj_key()
    assert call(svc, "PUT", key, b"not a tar, stored as is", auth=uploader(svc))[0] == 201
    st, h, _ = call(svc, "DELETE", key)
    assert st == 401 and h["www-authenticate"] == 'Basic realm="sstate-proxy"'
    assert call(svc, "DELETE", key, auth=uploader(svc))[0] == 403
    assert call(svc, "DELETE", key, auth=(ADMIN[0], "wrong"))[0] == 401
    assert call(svc, "DELETE", key, auth=("reader", svc.users["reader"]))[0] == 403
    assert call(svc, "DELETE", key, auth=ADMIN)[0] == 204
    assert call(svc, "HEAD", key)[0] == 404
    assert call(svc, "DELETE", key, auth=ADMIN)[0] == 404
    assert not (svc.storage / key).exists()


# --- refused bodies ----------------------------------------------------------------------------------


def test_bad_names_are_400(svc):
    for key in ("README.txt", "ab/cd/sstate:zlib:x:1:r0:x:14:0000_populate_sysroot.tar.zst",
                obj_key() + ".lock", "sstate:zlib:core2-64:1.0:r0:core2-64:14:" + "a" * 64 + "_package.tar.zst"):
        assert call(svc, "PUT", key, b"x", auth=uploader(svc))[0] == 400, key
    assert not [p for p in stored_files(svc.storage) if "README" in p.name]


def test_digests_verified(svc):
    body = os.urandom(10000)
    sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    bad_sha = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    bad_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    for headers in ({"Digest": f"sha-256={bad_sha}"}, {"Content-MD5": bad_md5},
                    {"Digest": f"SHA-256={sha}", "Content-MD5": bad_md5}, {"Digest": "sha-256=%%%"}):
        key = obj_key()
        assert call(svc, "PUT", key, body, auth=uploader(svc), headers=headers)[0] == 400, headers
        assert call(svc, "HEAD", key)[0] == 404
        assert not (svc.storage / key).exists()
    key = obj_key()
    st, _, _ = call(svc, "PUT", key, body, auth=uploader(svc),
                    headers={"Digest": f"sha-256={sha},unixsum=30637", "Content-MD5": md5})
    assert st == 201
    assert call(svc, "GET", key)[2] == body


def test_length_required_and_too_large(svc):
    auth = {"Authorization": basic(*uploader(svc))}
    key = obj_key()
    # chunked (no Content-Length): 411
    assert raw_put(svc.port, key, {**auth, "Transfer-Encoding": "chunked"}, b"5\r\nhello\r\n0\r\n\r\n") == 411
    # neither Content-Length nor chunked
    assert raw_put(svc.port, key, {**auth, "Connection": "close"}, b"") == 411
    # announced size over the limit: 413 before the body is read
    big = MAX_UPLOAD + 1
    assert raw_put(svc.port, key, {**auth, "Content-Length": str(big)}, b"x" * 1000) == 413
    assert call(svc, "HEAD", key)[0] == 404
    # short body (the client half-closes): refused, nothing stored
    assert raw_put(svc.port, key, {**auth, "Content-Length": "5000"}, os.urandom(5000), send=2500,
                   shutdown=True) in (400, None)
    assert call(svc, "HEAD", key)[0] == 404
    assert wait_for(lambda: not temp_litter(svc.storage))


def test_expect_100_continue_is_refused_before_the_body(svc):
    """curl sends `Expect: 100-continue` for large bodies: the refusal must come before the body."""
    key = obj_key()
    big = str(MAX_UPLOAD + 1)
    cases = [
        ({}, "1000", 401),
        ({"Authorization": basic("reader", svc.users["reader"])}, "1000", 403),
        ({"Authorization": basic("uploader", svc.users["uploader"])}, big, 413),
    ]
    for extra, length, expected in cases:
        headers = {"Expect": "100-continue", "Content-Length": length, **extra}
        assert raw_put(svc.port, key, headers, b"", send=0) == expected
    headers = {"Expect": "100-continue", "Content-Length": "3",
               "Authorization": basic("uploader", svc.users["uploader"])}
    assert raw_put(svc.port, key, headers, b"", send=0) == 100  # go ahead
    assert call(svc, "HEAD", key)[0] == 404


def test_client_disconnect_mid_body_leaves_nothing(svc):
    auth = {"Authorization": basic(*uploader(svc))}
    keys = [obj_key() for _ in range(5)]
    for key in keys:
        raw_put(svc.port, key, {**auth, "Content-Length": str(1 << 20)}, os.urandom(1 << 20), send=300_000,
                read=False)
    assert wait_for(lambda: not temp_litter(svc.storage)), temp_litter(svc.storage)
    for key in keys:
        assert call(svc, "HEAD", key)[0] == 404
        assert not (svc.storage / key).exists()
    assert call(svc, "GET", "healthz")[0] == 200  # the server lives on


def test_concurrent_puts_of_one_name(svc):
    key = obj_key()
    bodies = [os.urandom(20000 + i) for i in range(50)]
    results: list[int] = [0] * 50
    barrier = threading.Barrier(50)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = call(svc, "PUT", key, bodies[i], auth=uploader(svc))[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(201) == 1 and results.count(200) == 49, results
    winner = bodies[results.index(201)]
    assert call(svc, "GET", key)[2] == winner
    parent = (svc.storage / key).parent
    assert [p.name for p in parent.iterdir()] == [Path(key).name]


def test_metrics_count_uploads(svc):
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'sstate_proxy_uploads_total{outcome="created"' in text
    assert 'sstate_proxy_uploads_total{outcome="exists"' in text


# --- dedup ---------------------------------------------------------------------------------------------


def stats(svc: Service) -> dict:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "stats", "--config", str(svc.config_path)],
                         cwd=svc.workdir, env=svc.env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_dedup_equal_archives_stored_once(svc):
    files = {"sysroot-destdir/usr/lib/libfoo.so.1": os.urandom(30000),
             "sysroot-destdir/usr/include/foo.h": b"#define FOO 1\n" * 100}
    first = make_archive(files, mtime=1_700_000_000)
    second = make_archive(files, mtime=1_700_999_999, pzstd=False)  # other mtimes, other framing
    assert first != second
    k1, k2 = obj_key(pn="libfoo"), obj_key(pn="libfoo")
    before = stats(svc)["dedup"]["bytes_saved"]
    st, h, _ = call(svc, "PUT", k1, first, auth=uploader(svc))
    assert st == 201 and "x-sstate-deduplicated-to" not in h
    st, h, _ = call(svc, "PUT", k2, second, auth=uploader(svc))
    assert st == 201 and h["x-sstate-deduplicated-to"] == k1
    assert (svc.storage / k1).exists() and not (svc.storage / k2).exists()  # stored once
    for k in (k1, k2):
        st, h, got = call(svc, "GET", k)
        assert st == 200 and got == first and h["x-sstate-source"] == "hit"
        assert call(svc, "HEAD", k)[0] == 200
    assert stats(svc)["dedup"]["bytes_saved"] - before == len(second)
    # re-PUT of the alias name: it exists (first write wins)
    assert call(svc, "PUT", k2, second, auth=uploader(svc))[0] == 200

    # different content -> two objects
    k3 = obj_key(pn="libfoo")
    third = make_archive({**files, "sysroot-destdir/usr/include/foo.h": b"#define FOO 2\n"})
    st, h, _ = call(svc, "PUT", k3, third, auth=uploader(svc))
    assert st == 201 and "x-sstate-deduplicated-to" not in h and (svc.storage / k3).exists()

    # deleting the canonical promotes the alias: it keeps its (identical) content
    assert call(svc, "DELETE", k1, auth=ADMIN)[0] == 204
    assert call(svc, "HEAD", k1)[0] == 404
    st, _, got = call(svc, "GET", k2)
    assert st == 200 and got == first and (svc.storage / k2).exists()
    # deleting the (promoted) last copy: gone
    assert call(svc, "DELETE", k2, auth=ADMIN)[0] == 204
    assert call(svc, "GET", k2)[0] == 404


def test_delete_alias_keeps_canonical(svc):
    files = {"image/boot.bin": os.urandom(4096)}
    k1, k2 = obj_key(task="deploy"), obj_key(task="deploy")
    assert call(svc, "PUT", k1, make_archive(files, 1), auth=uploader(svc))[0] == 201
    assert call(svc, "PUT", k2, make_archive(files, 2), auth=uploader(svc))[1]["x-sstate-deduplicated-to"] == k1
    assert call(svc, "DELETE", k2, auth=ADMIN)[0] == 204
    assert call(svc, "HEAD", k2)[0] == 404
    assert call(svc, "HEAD", k1)[0] == 200
    assert call(svc, "DELETE", k2, auth=ADMIN)[0] == 404


def test_equivalence_rewrite_reaches_a_dedup_alias(svc):
    """A taskhash whose unihash object is stored as a dedup alias is still served (rewrite)."""
    files = {"pkgdata/runtime/zlib": b"PKGV: 1.3.1\n"}
    canon, uni, th = (random.getrandbits(256).to_bytes(32, "big").hex() for _ in range(3))
    kc, ku, kt = obj_key(canon, "packagedata"), obj_key(uni, "packagedata"), obj_key(th, "packagedata")
    assert call(svc, "PUT", kc, make_archive(files, 1), auth=uploader(svc))[0] == 201
    assert call(svc, "PUT", ku, make_archive(files, 2), auth=uploader(svc))[1]["x-sstate-deduplicated-to"] == kc
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    body = json.dumps({"taskhash": th, "method": "oe.sstatesig.OEOuthashBasic", "outhash": "0" * 64,
                       "unihash": uni, "owner": "test"})
    conn.request("POST", "/v1/equivalent", body=body,
                 headers={"Content-Type": "application/json", "Authorization": basic(*ADMIN)})
    r = conn.getresponse()
    r.read()
    conn.close()
    assert r.status == 200
    st, h, got = call(svc, "GET", kt)
    assert st == 200 and h["x-sstate-source"] == "equivalent" and h["x-sstate-served-hash"] == uni
    assert got == make_archive(files, 1)


# --- SIGKILL mid-upload ------------------------------------------------------------------------------


def test_sigkill_during_upload_storm(tmp_path):
    s = Service(tmp_path / "storm", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0],
                                         "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]})
    s.start()
    bodies = {obj_key(): os.urandom(random.randint(50_000, 400_000)) for _ in range(120)}
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    keys = list(bodies)

    def worker(part: list[str]) -> None:
        for key in part:
            if stop.is_set():
                return
            body = bodies[key]
            try:
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
                head = (f"PUT {path_of(key)} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(*ADMIN)}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                sock.sendall(head.encode())
                for i in range(0, len(body), 65536):  # slowly, so uploads are in flight at the kill
                    sock.sendall(body[i:i + 65536])
                    time.sleep(0.005)
                data = read_status_line(sock)
                sock.close()
                if data.startswith(b"HTTP/1.1 201"):
                    with lock:
                        acked[key] = body
            except OSError:
                continue

    threads = [threading.Thread(target=worker, args=(keys[i::12],)) for i in range(12)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(acked) >= 15, timeout=20)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    s.stop()
    litter_before = temp_litter(s.storage)
    s.start()  # the store removes the killed server's temp files, in the background at start
    try:
        assert wait_for(lambda: not temp_litter(s.storage), timeout=10), temp_litter(s.storage)
        assert acked
        for key, body in acked.items():
            assert (s.storage / key).read_bytes() == body
            st, _, got = call(s, "GET", key)
            assert st == 200 and got == body
        for p in stored_files(s.storage):
            key = p.relative_to(s.storage).as_posix()
            assert p.read_bytes() == bodies[key], f"partial object {key}"
    finally:
        s.stop()
    print(f"acked {len(acked)}, temp files left by the kill: {len(litter_before)}")
