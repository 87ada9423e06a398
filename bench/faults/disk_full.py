"""A full disk: the store's filesystem and the database's filesystem fill up, then space returns.

Each lives on a small tmpfs of its own (``mount -t tmpfs``: needs root, or CAP_SYS_ADMIN),
with a filler file taking most of the space. Verdict:

* store full: PUTs are answered 507 (a clear body) once space runs out; no temp file is left
  and no partial object is visible; every object acknowledged before is served, unchanged;
* database full: a report over /v1/equivalent is answered 507, over OEHASHEQUIV (tcp) with an
  invoke-error naming the full disk, and the service does not crash; lookups keep working;
* space returns (the filler removed): uploads and reports succeed again without a restart, and
  the database is consistent (``PRAGMA integrity_check``).

    sudo python -m bench.faults.disk_full [--store-mib 8] [--object-kib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import bb.asyncrpc

from bench.faults.common import (
    ADMIN,
    ADMIN_ENV,
    METHOD,
    Service,
    Verdict,
    call,
    free_port,
    integrity,
    obj_key,
    path_of,
    script,
    stored_objects,
    temp_litter,
)
from tests.hashserv_client import connect

INSUFFICIENT = b"insufficient storage"


class MountRefused(RuntimeError):
    """This process may not mount a tmpfs (not root, or no CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MountRefused(f"full disk: mount -t tmpfs {path}: {r.stderr.strip() or r.returncode} "
                           "(needs root with CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """A filler file taking all of ``fs`` but ``leave`` bytes."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))  # tmpfs allocates written pages only
    return filler


def report_body(taskhash: str, outhash: str) -> bytes:
    return json.dumps({"taskhash": taskhash, "method": METHOD, "outhash": outhash,
                       "unihash": taskhash, "owner": "fault-run", "PN": "zlib", "PV": "1.3.1",
                       "PR": "r0", "task": "do_populate_sysroot"}).encode()


def store_full(svc: Service, store: Path, fs: Path, rng: random.Random, object_size: int,
               v: Verdict) -> None:
    acked: dict[str, bytes] = {}
    refused: list[str] = []
    filler = fill(fs, leave=6 * object_size)
    for _ in range(64):
        key, body = obj_key(rng), rng.randbytes(object_size)
        a = call(svc.port, "PUT", path_of(key), body, auth=True)
        if a.status in (200, 201):
            acked[key] = body
        elif a.status == 507:
            refused.append(key)
            v.check(INSUFFICIENT in a.body, f"507 without a clear body: {a.body[:200]!r}")
            if len(refused) >= 3:
                break
        else:
            v.check(False, f"PUT on a filling disk answered {a.status}: {a.body[:200]!r}")
            break
    v.note(f"store full: {len(acked)} PUTs acknowledged, then {len(refused)} answered 507")
    v.check(bool(refused), "the disk never filled: no 507")
    v.check(not temp_litter(store), f"temp files left by refused PUTs: {temp_litter(store)[:3]}")
    for key in refused:
        v.check(call(svc.port, "HEAD", path_of(key)).status == 404, f"refused object {key} is visible")
    for key, body in acked.items():
        a = call(svc.port, "GET", path_of(key))
        v.check(a.status == 200 and a.body == body, f"acknowledged {key} not served while the disk is full")
    sent = {**acked}
    for p in stored_objects(store):
        k = p.relative_to(store).as_posix()
        v.check(sent.get(k) == p.read_bytes(), f"partial or unknown object stored: {k}")
    filler.unlink()  # space returns
    key, body = obj_key(rng), rng.randbytes(object_size)
    a = call(svc.port, "PUT", path_of(key), body, auth=True)
    v.check(a.status == 201, f"PUT after space returned answered {a.status}, not 201")
    v.check(call(svc.port, "GET", path_of(key)).body == body, "object stored after recovery not served")


async def _hashserv_report(address: str, taskhash: str, outhash: str) -> str:
    client = await connect(address, *ADMIN, timeout=10)
    try:
        reply = await client.report_unihash(taskhash, METHOD, outhash, taskhash, {"owner": "fault-run"})
        return f"reply {reply}"
    except bb.asyncrpc.InvokeError as e:
        return f"invoke-error {e}"
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def database_full(svc: Service, db: Path, fs: Path, tcp: str, rng: random.Random, v: Verdict) -> None:
    acked: dict[str, str] = {}
    full = None
    filler = fill(fs, leave=192 * 1024)
    for _ in range(5000):
        taskhash, outhash = rng.randbytes(32).hex(), rng.randbytes(32).hex()
        a = call(svc.port, "POST", "/v1/equivalent", report_body(taskhash, outhash), auth=True,
                 headers={"Content-Type": "application/json"})
        if a.status == 200:
            acked[taskhash] = json.loads(a.body)["unihash"]
            continue
        full = a
        break
    said = full.body.split(b" (request")[0].decode(errors="replace") if full else "nothing"
    v.note(f"database full: {len(acked)} reports acknowledged, then {full.status if full else ''} {said}")
    if not v.check(full is not None and full.status == 507 and INSUFFICIENT in full.body,
                   f"a report on a full database answered {full.status if full else None}, not 507"):
        return
    said = asyncio.run(_hashserv_report(tcp, rng.randbytes(32).hex(), rng.randbytes(32).hex()))
    v.note(f"OEHASHEQUIV report on the full database: {said[:120]}")
    v.check(said.startswith("invoke-error") and "full" in said, f"OEHASHEQUIV report on a full disk: {said}")
    v.check(call(svc.port, "GET", "/healthz").status == 200, "the service is down after a full database")
    for taskhash, unihash in list(acked.items())[:50]:
        q = urlencode({"method": METHOD, "taskhash": taskhash})
        a = call(svc.port, "GET", f"/v1/equivalent?{q}")
        v.check(a.status == 200 and json.loads(a.body).get("unihash") == unihash,
                f"lookup of an acknowledged report failed on a full database: {a.status}")
    filler.unlink()  # space returns
    taskhash = rng.randbytes(32).hex()
    a = call(svc.port, "POST", "/v1/equivalent", report_body(taskhash, rng.randbytes(32).hex()), auth=True,
             headers={"Content-Type": "application/json"})
    v.check(a.status == 200, f"a report after space returned answered {a.status}, not 200")
    said = asyncio.run(_hashserv_report(tcp, rng.randbytes(32).hex(), rng.randbytes(32).hex()))
    v.check(said.startswith("reply"), f"OEHASHEQUIV report after space returned: {said}")
    v.check(integrity(db) == "ok", f"integrity_check after the full disk: {integrity(db)}")


def run(workdir: Path, args: argparse.Namespace) -> Verdict:
    """Raises MountRefused when tmpfs cannot be mounted here."""
    v = Verdict(f"full disk: store on a {args.store_mib} MiB tmpfs, database on a {args.db_mib} MiB tmpfs")
    rng = random.Random(args.seed)
    with tmpfs(workdir / "store-fs", args.store_mib) as sfs, tmpfs(workdir / "db-fs", args.db_mib) as dfs:
        store, db = sfs / "sstate-cache", dfs / "sstate-proxy.db"
        tcp = f"127.0.0.1:{free_port()}"
        svc = Service(workdir / "svc", env=ADMIN_ENV, args=["--hashserv-bind", tcp],
                      config={"storage": {"path": str(store)}, "database": {"url": f"sqlite:///{db}"}})
        svc.start()
        try:
            store_full(svc, store, sfs, rng, args.object_kib * 1024, v)
            database_full(svc, db, dfs, tcp, rng, v)
            v.check(svc.proc is not None and svc.proc.poll() is None, "the service exited")
        finally:
            svc.stop()
        v.check(integrity(db) == "ok", f"integrity_check after the stop: {integrity(db)}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store-mib", type=int, default=8)
    p.add_argument("--db-mib", type=int, default=4)
    p.add_argument("--object-kib", type=int, default=256)
    p.add_argument("--seed", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    return script(run, parser(), "fault-disk-", argv, cannot=(MountRefused,))


if __name__ == "__main__":
    sys.exit(main())
