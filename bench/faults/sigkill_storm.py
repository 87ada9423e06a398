"""SIGKILL during an upload storm and a report storm, then restart.

Uploaders PUT objects (bodies sent slowly, so some are in flight at the kill) and reporters
send OEHASHEQUIV reports over tcp and WebSocket, each remembering what the service
acknowledged (201/200, a report's reply). Once enough is acknowledged the service is
SIGKILLed mid-storm, then started again on the same directory and database; ``--rounds``
times. Verdict, after every restart:

* the database is consistent (``PRAGMA integrity_check``), before and after the restart;
* every acknowledged report is stored with the unihash its reply gave, and answered by a get;
* every acknowledged object is stored with the bytes sent, and served by a GET;
* no partial object: every stored object's bytes are the bytes sent for its name, and the
  killed writer's temp files are gone after the restart.

    python -m bench.faults.sigkill_storm [--uploaders 16] [--reporters 32] [--workers 2] [--rounds 3]
                                         [--kill-after-uploads 60] [--kill-after-reports 600]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.faults.common import (
    ADMIN,
    ADMIN_ENV,
    METHOD,
    Service,
    Verdict,
    basic,
    call,
    free_port,
    integrity,
    obj_key,
    path_of,
    script,
    stored_objects,
    temp_litter,
    wait_for,
)
from tests.hashserv_client import connect


@dataclass
class Storm:
    bodies: dict[str, bytes] = field(default_factory=dict)  # every body sent, by key
    acked_objects: dict[str, bytes] = field(default_factory=dict)
    acked_reports: dict[str, str] = field(default_factory=dict)  # taskhash -> unihash replied
    upload_errors: int = 0
    report_errors: int = 0


async def _uploader(port: int, storm: Storm, rng: random.Random, stop: asyncio.Event,
                    size: tuple[int, int]) -> None:
    auth = basic(*ADMIN)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            key = obj_key(rng)
            body = rng.randbytes(rng.randint(*size))
            storm.bodies[key] = body

            async def slowly(data: bytes = body):
                for i in range(0, len(data), 32768):  # in flight for a while: temp files at the kill
                    yield data[i:i + 32768]
                    await asyncio.sleep(0.01)

            try:
                async with session.put(f"http://127.0.0.1:{port}{path_of(key)}", data=slowly(),
                                       headers={"Authorization": auth,
                                                "Content-Length": str(len(body))}) as r:
                    await r.read()
                    if r.status in (200, 201):
                        storm.acked_objects[key] = body
                    else:
                        storm.upload_errors += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                storm.upload_errors += 1
                await asyncio.sleep(0.05)


async def _reporter(address: str, storm: Storm, rng: random.Random, stop: asyncio.Event,
                    outhashes: list[str]) -> None:
    client = await connect(address, *ADMIN, timeout=5)
    try:
        while not stop.is_set():
            taskhash = rng.getrandbits(256).to_bytes(32, "big").hex()
            outhash = rng.choice(outhashes)  # shared outputs: some reports become equivalences
            reply = await client.report_unihash(taskhash, METHOD, outhash, taskhash, {"owner": "fault-run"})
            storm.acked_reports[taskhash] = reply["unihash"]
    except Exception:  # noqa: BLE001 - the kill ends every connection, any way it likes
        storm.report_errors += 1
    finally:
        try:
            await asyncio.wait_for(client.close(), 2)
        except Exception:  # noqa: BLE001
            pass


async def _storm(svc: Service, tcp: str, args: argparse.Namespace, storm: Storm, v: Verdict,
                 round_no: int) -> None:
    rng = random.Random(args.seed * 1000 + round_no)
    # the kill comes once this round acknowledged enough of each storm that runs
    want_uploads = len(storm.acked_objects) + (args.kill_after_uploads if args.uploaders else 0)
    want_reports = len(storm.acked_reports) + (args.kill_after_reports if args.reporters else 0)
    stop = asyncio.Event()
    outhashes = [rng.getrandbits(256).to_bytes(32, "big").hex() for _ in range(max(4, args.reporters * 4))]
    addresses = [tcp if i % 2 == 0 else f"ws://127.0.0.1:{svc.port}/ws" for i in range(args.reporters)]
    tasks = [asyncio.create_task(_uploader(svc.port, storm, random.Random(rng.random()), stop,
                                           (args.min_size, args.max_size)))
             for _ in range(args.uploaders)]
    tasks += [asyncio.create_task(_reporter(a, storm, random.Random(rng.random()), stop, outhashes))
              for a in addresses]
    t0 = time.monotonic()
    while len(storm.acked_objects) < want_uploads or len(storm.acked_reports) < want_reports:
        if time.monotonic() - t0 > args.timeout:
            v.check(False, f"the storm did not reach its kill point in {args.timeout:g}s "
                           f"({len(storm.acked_objects)} uploads, {len(storm.acked_reports)} reports)")
            break
        await asyncio.sleep(0.02)
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGKILL)  # mid-storm: uploads and reports in flight
    stop.set()
    v.note(f"round {round_no + 1}: killed after {time.monotonic() - t0:.1f}s of storm; acknowledged so far: "
           f"{len(storm.acked_objects)} uploads, {len(storm.acked_reports)} reports")
    await asyncio.to_thread(svc.proc.wait)
    # The workers must go with their supervisor: an orphan serving on would hold the port.
    v.check(await asyncio.to_thread(wait_for, lambda: not _listening(svc.port), 10),
            "workers still serve 10 s after their supervisor was SIGKILLed")
    done, pending = await asyncio.wait(tasks, timeout=10)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _check_reports(db: Path, storm: Storm, v: Verdict) -> None:
    con = sqlite3.connect(str(db))
    try:
        missing = wrong = 0
        for taskhash, unihash in storm.acked_reports.items():
            row = con.execute("SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?",
                              (METHOD, taskhash)).fetchone()
            outhash = con.execute("SELECT 1 FROM outhashes_v2 WHERE method = ? AND taskhash = ?",
                                  (METHOD, taskhash)).fetchone()
            if row is None or outhash is None:
                missing += 1
            elif row[0] != unihash:
                wrong += 1
    finally:
        con.close()
    v.check(missing == 0, f"{missing} acknowledged report(s) missing after the restart")
    v.check(wrong == 0, f"{wrong} acknowledged report(s) stored with another unihash than replied")


async def _check_faces(svc: Service, tcp: str, storm: Storm, v: Verdict, sample: int) -> None:
    client = await connect(tcp, timeout=10)
    try:
        wrong = 0
        for taskhash, unihash in list(storm.acked_reports.items())[:sample]:
            if await client.get_unihash(METHOD, taskhash) != unihash:
                wrong += 1
        v.check(wrong == 0, f"{wrong} acknowledged report(s) not answered by get after the restart")
    finally:
        await client.close()
    bad = 0
    for key, body in list(storm.acked_objects.items())[:sample]:
        a = await asyncio.to_thread(call, svc.port, "GET", path_of(key))
        if a.status != 200 or a.body != body:
            bad += 1
    v.check(bad == 0, f"{bad} acknowledged object(s) not served with their bytes after the restart")


def run(workdir: Path, args: argparse.Namespace) -> Verdict:
    v = Verdict(f"SIGKILL during an upload storm ({args.uploaders} uploaders) and a report storm "
                f"({args.reporters} OEHASHEQUIV clients, tcp and ws), {args.workers} worker(s)")
    tcp_port = free_port()
    tcp = f"127.0.0.1:{tcp_port}"
    svc = Service(workdir, env=ADMIN_ENV, args=["--workers", str(args.workers), "--hashserv-bind", tcp])
    storm = Storm()
    # bitbake's client logs every failed reconnect after the kill: expected, not news
    logging.getLogger("tests.hashserv_client").setLevel(logging.CRITICAL)
    svc.start()
    try:
        for round_no in range(args.rounds):
            asyncio.run(_storm(svc, tcp, args, storm, v, round_no))
            svc.stop()
            v.note(f"round {round_no + 1}: temp files left by the kill: {len(temp_litter(svc.storage))}; "
                   f"uploads cut so far {storm.upload_errors}, reporters cut {storm.report_errors}")
            v.check(integrity(svc.database) == "ok",
                    f"round {round_no + 1}: integrity_check after the kill: {integrity(svc.database)}")
            _check_reports(svc.database, storm, v)
            svc.start()
            exited = wait_for(lambda: svc.proc is None or svc.proc.poll() is not None, 1)
            v.check(not exited, f"the restarted service exited:\n{svc.read_log()[-2000:]}")
            # worker 0 removes the dead writers' temp files, in the background:
            v.check(wait_for(lambda: not temp_litter(svc.storage), timeout=15),
                    f"temp files still there after the restart: {temp_litter(svc.storage)[:3]}")
            for key, body in storm.acked_objects.items():
                p = svc.storage / key
                v.check(p.is_file() and p.read_bytes() == body, f"acknowledged object {key} lost or changed")
            stored = stored_objects(svc.storage)
            partial = [p for p in stored
                       if p.read_bytes() != storm.bodies.get(p.relative_to(svc.storage).as_posix())]
            v.check(not partial, f"partial or foreign object(s) stored: {[str(p) for p in partial[:3]]}")
            asyncio.run(_check_faces(svc, tcp, storm, v, args.sample))
            v.check(integrity(svc.database) == "ok", "integrity_check after the restart is not ok")
        v.note(f"after {args.rounds} kill(s): {len(stored)} objects stored, {len(storm.acked_objects)} "
               f"acknowledged (a stored one not acknowledged was complete at a kill, not yet answered); "
               f"{len(storm.acked_reports)} reports acknowledged, all stored")
    finally:
        svc.stop()
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uploaders", type=int, default=16, help="0: a report storm alone")
    p.add_argument("--reporters", type=int, default=32, help="half over tcp, half over ws; 0: uploads alone")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="storm, kill, restart and check; this many times")
    p.add_argument("--kill-after-uploads", type=int, default=60, help="per round")
    p.add_argument("--kill-after-reports", type=int, default=600, help="per round")
    p.add_argument("--min-size", type=int, default=20_000)
    p.add_argument("--max-size", type=int, default=300_000)
    p.add_argument("--sample", type=int, default=200, help="acknowledged items re-read through the faces")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--seed", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    return script(run, parser(), "fault-sigkill-", argv)


if __name__ == "__main__":
    sys.exit(main())
