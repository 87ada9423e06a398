"""`sstate-proxy gc` against the running service (two workers), on local disk and on S3 (a moto
server over HTTP): a scripted mix of requests, then gc --max-size: what was used recently stays,
the rest goes, pins survive, requests during the gc all succeed, a rewrite that pointed at a
removed object becomes a miss within the documented bound, --dry-run changes nothing. Also the
scheduled gc and the command's bad input."""

from __future__ import annotations

import http.client
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.s3server import TEST_ENV, MotoServer
from tests.service import Service
from tests.test_rewrite import report

# How long after the gc command ends every worker must have stopped answering with a removed
# object (ARCHITECTURE.md: the S3 index reads the removal log every 0.5 s), with slack for a
# loaded test machine.
REMOVAL_BOUND_S = 5.0


def hsh(tag: str, n: int) -> str:
    return (f"{tag}{n:x}".encode().hex() * 64)[:64]


def key(h: str, companion: str = "") -> str:
    return f"universal/{h[:2]}/{h[2:4]}/sstate:foo:core2-64-poky-linux:1.0:r0:core2-64:11:{h}_populate_sysroot.tar.zst{companion}"


def status(svc: Service, method: str, k: str) -> tuple[int, dict]:
    """One request on a connection of its own (so the two workers both answer over a run)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request(method, "/" + quote(k))
        resp = conn.getresponse()
        resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        conn.close()


def catalog(svc: Service) -> dict[str, float]:
    con = sqlite3.connect(svc.database, timeout=5)
    try:
        return dict(con.execute("SELECT key, last_access FROM sstate_proxy_objects"))
    finally:
        con.close()


def wait_catalogued(svc: Service, keys: list[str], after: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = catalog(svc)
        if all(rows.get(k, 0.0) >= after for k in keys):
            return
        assert time.monotonic() < deadline, f"not recorded: {[k for k in keys if rows.get(k, 0.0) < after]}"
        time.sleep(0.1)


def gc(svc: Service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "gc", "--config", str(svc.config_path),
                           "--no-progress", *args], cwd=svc.workdir, env=svc.env, capture_output=True,
                          text=True, timeout=60)


A = [hsh("a", i) for i in range(10)]
FILLERS = [hsh("f", i) for i in range(20)]
T = hsh("t", 1)  # never stored: the rewrite answers it with A[1]


class Backend:
    """Writes and lists objects behind the service's back (the store's own view)."""

    def __init__(self, kind: str, svc: Service, moto: MotoServer | None) -> None:
        self.kind, self.svc, self.moto = kind, svc, moto

    def put(self, k: str, data: bytes) -> None:
        if self.moto is not None:
            self.moto.client().put_object(Bucket="sstate", Key="p/" + k, Body=data)
        else:
            path = self.svc.storage / k
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def listing(self) -> set[str]:
        if self.moto is not None:
            pages = self.moto.client().get_paginator("list_objects_v2").paginate(Bucket="sstate", Prefix="p/")
            return {o["Key"][2:] for page in pages for o in page.get("Contents", ())}
        return {str(p.relative_to(self.svc.storage)) for p in self.svc.storage.rglob("*") if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path: Path):
    moto = None
    config = {"server": {"workers": 2},
              "retention": {"access_flush_s": 0.2, "pin": ["*" + A[2] + "*"]}}
    env = None
    if request.param == "s3":
        moto = MotoServer()
        moto.start()
        moto.create_bucket("sstate")
        env = TEST_ENV
        config["storage"] = {"backend": "s3"}
        config["storage.s3"] = {"bucket": "sstate", "prefix": "p", "endpoint_url": moto.endpoint_url,
                                "region": "us-east-1", "timeout_s": 2.0}
    svc = Service(tmp_path / "svc", config=config, env=env, args=["--anon-perms", "@read,@report"])
    yield Backend(request.param, svc, moto)
    svc.stop()
    if moto is not None:
        moto.close()


def test_gc_keeps_what_was_used_and_the_service_keeps_answering(backend: Backend):
    svc = backend.svc
    for h in A:
        backend.put(key(h), b"x" * 1000)
        backend.put(key(h, ".siginfo"), b"s" * 100)
    for h in FILLERS:
        backend.put(key(h), b"f" * 10)
    stored = backend.listing()
    assert len(stored) == 40
    svc.start()
    # the rewrite: T is equivalent to A[1] (same output)
    report(svc, A[1], hsh("o", 1), A[1])
    report(svc, T, hsh("o", 1), T)
    time.sleep(1.1)  # every access below is newer than every mtime (S3 has whole seconds)
    t1 = time.time()
    for _ in range(8):  # fresh connections: both workers cache the rewrite
        code, headers = status(svc, "HEAD", key(T))
        assert code == 200 and headers["X-Sstate-Source"] == "equivalent"
        assert headers["X-Sstate-Served-Hash"] == A[1]
    time.sleep(0.05)
    recent = [key(h, c) for h in A[5:] for c in ("", ".siginfo")]
    for k in recent:
        assert status(svc, "GET", k)[0] == 200
    wait_catalogued(svc, [key(A[1])] + recent, t1)

    # --dry-run: lists what would go, changes nothing
    before_catalog = catalog(svc)
    dry = gc(svc, "--max-size", "6600", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    would = {line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would remove ")}
    gone = {key(h, c) for h in (A[0], A[1], A[3], A[4]) for c in ("", ".siginfo")} | {key(h) for h in FILLERS}
    assert would == gone
    assert "would remove 24 objects (28 files" in dry.stdout
    assert backend.listing() == stored and catalog(svc) == before_catalog

    # requests while the gc runs: every one answered, none fails
    results: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            for k in recent[:4]:
                results.append(status(svc, "HEAD", k)[0])
            results.append(status(svc, "GET", recent[0])[0])

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.2)
        run = gc(svc, "--max-size", "6600")
    finally:
        stop.set()
        thread.join()
    assert run.returncode == 0, run.stderr
    assert "removed 24 objects (28 files, 4.5 KiB)" in run.stdout and "6.4 KiB kept" in run.stdout
    assert results and set(results) == {200}, f"{len(results)} requests during gc: {set(results)}"

    # the catalog forgot the removed objects (before any request below could be answered from
    # a cache that has not yet read the removal log: that answer would record an access again)
    assert not set(catalog(svc)) & gone
    # recently used stay, the pinned one stays, the rest is gone (with companions)
    assert backend.listing() == stored - gone
    for k in recent + [key(A[2]), key(A[2], ".siginfo")]:
        assert status(svc, "HEAD", k)[0] == 200, k
    # every worker stops answering with a removed object within the bound (local disk: at once;
    # S3: the other worker's index reads the removal log), and so does the rewrite that pointed
    # at one (T -> A[1])
    probe = sorted(gone)[:10] + [key(T)]
    deadline = time.monotonic() + REMOVAL_BOUND_S
    while any(status(svc, "HEAD", k)[0] != 404 for k in probe):
        assert time.monotonic() < deadline, "a worker still answers with a removed object"
        time.sleep(0.1)
    for k in probe:
        assert [status(svc, "HEAD", k)[0] for _ in range(4)] == [404] * 4, k
    assert [status(svc, "HEAD", key(T))[0] for _ in range(8)] == [404] * 8
    assert [status(svc, "GET", key(T))[0] for _ in range(4)] == [404] * 4


def test_scheduled_gc(tmp_path: Path):
    svc = Service(tmp_path / "svc", config={"retention": {
        "max_size": "2K", "interval": "1s", "pin": ["*" + A[0] + "*"], "access_flush_s": 0.2}})
    for h in A[:5]:
        path = svc.storage / key(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    with svc:
        assert status(svc, "HEAD", key(A[4]))[0] == 200  # used: kept
        deadline = time.monotonic() + 15
        while len(list(svc.storage.rglob("*.tar.zst"))) > 2:
            assert time.monotonic() < deadline, "the scheduled gc did not run"
            time.sleep(0.2)
        assert status(svc, "HEAD", key(A[0]))[0] == 200  # pinned
        assert status(svc, "HEAD", key(A[4]))[0] == 200
        assert status(svc, "HEAD", key(A[1]))[0] == 404
        # /metrics counts what the service's gc removed (three objects of 1,000 bytes)
        deadline = time.monotonic() + 5
        removed = {"sstate_proxy_gc_removed_objects_total": 3.0, "sstate_proxy_gc_removed_bytes_total": 3000.0}
        while (got := {n: v for n, v in svc.metrics().items() if n in removed}) != removed:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)


def run_cli(monkeypatch, tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    from proxy.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SSTATE_PROXY_CONFIG", raising=False)
    code = main(["gc", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-size", "12Q"], "bad size '12Q'"),
    (["--unused-for", "3x"], "bad duration '3x'"),
    (["--unused-for", "0d"], "bad duration '0d'"),
    ([], "nothing to do"),
])
def test_bad_input_exits_2_with_one_line(monkeypatch, tmp_path: Path, capsys, args: list[str], message: str):
    code, err = run_cli(monkeypatch, tmp_path, capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "sstate-proxy.db").exists()  # nothing opened, nothing changed


def test_bad_retention_config_exits_2(monkeypatch, tmp_path: Path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[retention]\ninterval = "1h"\n')
    code, err = run_cli(monkeypatch, tmp_path, capsys, "--config", str(cfg), "--max-size", "1G")
    assert code == 2 and "retention.interval: a scheduled gc needs max_size or unused_for" in err
    cfg.write_text('[retention]\nmax_size = "lots"\n')
    code, err = run_cli(monkeypatch, tmp_path, capsys, "--config", str(cfg))
    assert code == 2 and "retention.max_size: bad size 'lots'" in err
