"""storage.identity_pool: archive identities in child processes. A child that dies costs one
archive its dedup, never an upload; a worker killed with SIGKILL, or stopped, leaves no child
behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage.dedup import DedupStore
from storage.equivalence.sqlite import SqliteEquivalenceDB
from storage.local import LocalStore
from tests.service import Service
from tests.test_storage import feed
from tests.test_upload import ADMIN, call, make_archive, obj_key

FILES = {"usr/lib/libbar.so.2": os.urandom(30000), "usr/share/bar/data": b"bar" * 1000}


def pool_children() -> list[multiprocessing.Process]:
    return multiprocessing.active_children()


async def test_a_dead_pool_child_costs_one_archive_its_dedup_then_the_pool_starts_again(tmp_path: Path):
    db = SqliteEquivalenceDB(str(tmp_path / "db"))
    inner = LocalStore(str(tmp_path / "root"))
    store = DedupStore(inner, db)
    k1, k2, k3 = obj_key(), obj_key(), obj_key()
    bodies = [make_archive(FILES, mtime=m) for m in (100, 200, 300)]
    try:
        assert (await store.put(k1, feed(bodies[0]), size=len(bodies[0]))).shared_with is None
        children = pool_children()
        assert children, "the first archive started no identity process"
        for p in children:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        r2 = await store.put(k2, feed(bodies[1]), size=len(bodies[1]))
        assert r2.created and r2.shared_with is None  # stored as written, not lost
        assert (tmp_path / "root" / k2).read_bytes() == bodies[1]
        r3 = await store.put(k3, feed(bodies[2]), size=len(bodies[2]))
        assert r3.created and r3.shared_with == k1  # a fresh pool
        assert await inner.stat(k3) is None
    finally:
        await store.close()
        await db.close()
    # Asked of the OS: the executor's own thread reaps its children meanwhile, and a join racing
    # it gets no exit code, so a Process object can look alive after its process is gone.
    # (20 s: a child still starting, in its spawn imports, reads its stop order once started)
    pids = {p.pid for p in pool_children()}
    assert not gone_within(pids, 20.0), "close() left identity processes running"


def parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process, from /proc."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            out[int(entry)] = int(fields[1])
    return out


def children(pid: int) -> set[int]:
    return {p for p, pp in parents().items() if pp == pid}


def descendants(pid: int) -> set[int]:
    tree = parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in tree.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def gone_within(pids: set[int], timeout: float) -> set[int]:
    """The pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def test_no_identity_process_outlives_its_worker(tmp_path: Path):
    svc = Service(tmp_path / "svc", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                  args=["--workers", "2"])
    with svc:
        assert svc.proc is not None
        k1 = obj_key()
        assert call(svc, "PUT", k1, make_archive(FILES, 1), auth=ADMIN)[0] == 201
        workers = children(svc.proc.pid)
        owners = {w: descendants(w) for w in workers if descendants(w)}
        assert owners, "no worker started an identity process"
        for w, below in owners.items():
            os.kill(w, signal.SIGKILL)
            assert not gone_within(below, 15.0), f"worker {w} SIGKILLed: its children {below} live on"
        # the supervisor restarts the worker; uploads and dedup go on with a new pool
        deadline = time.monotonic() + 10
        while len(children(svc.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        k2 = obj_key()
        status, headers, _ = call(svc, "PUT", k2, make_archive(FILES, 2), auth=ADMIN)
        assert status == 201 and headers.get("x-sstate-deduplicated-to") == k1
        everything = descendants(svc.proc.pid)
        assert len(everything) > 2  # the workers and at least one identity process
    assert not gone_within(everything, 15.0), "a stopped service left processes behind"


def test_a_pool_child_imports_no_boto3_or_aiohttp():
    """A ``spawn`` child imports the parent's main module (``proxy.cli``) again before its first
    identity: that module and the config it reads leave aiohttp and boto3 to the commands that
    use them, so each worker's child starts in a fraction of a second, not half of one."""
    code = ("import sys, proxy.cli, storage.archive_identity, storage.identity_pool\n"
            "print(sorted(m for m in ('aiohttp', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "[]"
