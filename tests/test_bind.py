"""A port already in use is an error: a second instance exits 2 and the first keeps serving."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hashserv_client import HashClient
from tests.service import REPO, Service, free_port
from tests.workers import serving_pid, worker_pids


def head_status(port: int, path: str) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("HEAD", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Sstate-Source")
    finally:
        conn.close()


def serve_and_wait(config: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)


def with_object(svc: Service, name: str, data: bytes) -> str:
    path = svc.storage / "ab" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"/ab/{name}"


def test_second_instance_on_the_http_port_exits_2(tmp_path):
    first = Service(tmp_path / "first")
    target = with_object(first, "mine.bin", b"first instance's object")
    with first:
        second = Service(tmp_path / "second", port=first.port)
        with_object(second, "theirs.bin", b"second")
        p = serve_and_wait(second.config_path)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines() == [
            f"sstate-proxy: cannot listen on 127.0.0.1:{first.port} (HTTP): address already in use"]
        # the first one is untouched: every request lands on it, with its own store
        for _ in range(20):
            assert head_status(first.port, target) == (200, "hit")
            assert head_status(first.port, "/ab/theirs.bin")[0] == 404
        assert first.proc.poll() is None


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_held_by_another_program_exits_2(tmp_path, reuse_port):
    """Taken by anything, even a listener that allows SO_REUSEPORT sharing."""
    with socket.socket() as other:
        if reuse_port:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        svc = Service(tmp_path / "svc", port=port)
        p = serve_and_wait(svc.config_path)
        assert p.returncode == 2
        assert p.stderr.strip().splitlines() == [
            f"sstate-proxy: cannot listen on 127.0.0.1:{port} (HTTP): address already in use"]


async def hashserv_stats(port: int) -> dict:
    client = HashClient()
    await client.connect_tcp("127.0.0.1", port)
    try:
        return await client.get_stats()
    finally:
        await client.close()


async def test_second_instance_on_the_hashserv_port_exits_2(tmp_path):
    hs_port = free_port()
    first = Service(tmp_path / "first", config={"hashserv": {"bind": f"127.0.0.1:{hs_port}"}})
    target = with_object(first, "mine.bin", b"x")
    with first:
        assert "requests" in await hashserv_stats(hs_port)
        # the second instance's HTTP port is free: only the hashserv bind fails, before anything
        # else is started (its HTTP port is not left listening)
        second = Service(tmp_path / "second", config={"hashserv": {"bind": f"127.0.0.1:{hs_port}"}})
        p = serve_and_wait(second.config_path)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines() == [
            f"sstate-proxy: cannot listen on 127.0.0.1:{hs_port} (hashserv): address already in use"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", second.port))  # free again
        assert head_status(first.port, target) == (200, "hit")
        assert "requests" in await hashserv_stats(hs_port)
        assert first.proc.poll() is None


def test_two_workers_serve_one_port(tmp_path):
    svc = Service(tmp_path / "w", args=["--workers", "2"])
    target = with_object(svc, "x.bin", b"x")
    with svc:
        children = worker_pids(svc.proc.pid)
        pids: set[int | None] = set()
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            # a new connection each time: whichever worker accepts it first answers
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
            conn.request("GET", "/metrics")
            conn.getresponse().read()
            pids.add(serving_pid(conn.sock, children))  # (samples carry no process label)
            conn.close()
            assert head_status(svc.port, target) == (200, "hit")
        assert len(pids) == 2, pids
        assert sorted(children) == sorted(pids)
