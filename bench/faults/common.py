"""What the fault runs share: the real service (tests/service.py), plain HTTP calls, the checks
made after a fault (database integrity, temp litter, stored bytes) and the verdict."""

from __future__ import annotations

import argparse
import base64
import http.client
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from tests.service import Service, free_port  # noqa: E402

ADMIN = ("admin", "fault-run-admin-token")
ADMIN_ENV = {"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}
METHOD = "oe.sstatesig.OEOuthashBasic"
TEMP_PREFIX = ".tmp-"  # storage/local.py's temp files

__all__ = ["ADMIN", "ADMIN_ENV", "METHOD", "Service", "Verdict", "basic", "call", "free_port",
           "integrity", "obj_key", "path_of", "script", "stored_objects", "temp_litter", "wait_for"]


def obj_key(rng: random.Random, ext: str = ".tar.zst") -> str:
    h = rng.getrandbits(256).to_bytes(32, "big").hex()
    return f"{h[:2]}/{h[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{h}_populate_sysroot{ext}"


def path_of(key: str) -> str:
    return "/" + quote(key)


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def call(port: int, method: str, path: str, body: bytes | None = None, *, auth: bool = False,
         headers: dict[str, str] | None = None, timeout: float = 60) -> Answer:
    """One request on its own connection; the answer and how long it took."""
    h = dict(headers or {})
    if auth:
        h["Authorization"] = basic(*ADMIN)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - t0)
    finally:
        conn.close()


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of a SQLite file ("ok" when consistent). Opening it replays a
    crashed writer's WAL first, as the restarted service would."""
    con = sqlite3.connect(str(db))
    try:
        return "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


def temp_litter(root: Path) -> list[Path]:
    return [p for p in root.rglob(TEMP_PREFIX + "*")]


def stored_objects(root: Path) -> list[Path]:
    """Every file a client could be served (temp files are never keys)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@dataclass
class Verdict:
    """A run's findings: ``check`` records a failed expectation, ``note`` a measurement."""

    name: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def passed(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'} {self.name}"]
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)

    def exit(self) -> int:
        print(self.text(), flush=True)
        return 0 if self.passed else 1


def script(run: Callable[[Path, argparse.Namespace], Verdict], parser: argparse.ArgumentParser,
           prefix: str, argv: list[str] | None = None,
           cannot: tuple[type[Exception], ...] = ()) -> int:
    """A fault script's main: parse, run in a temp dir, print the verdict; the exit status is
    0 (PASS), 1 (FAIL) or 2 (this machine cannot inject the fault: one of ``cannot``)."""
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        try:
            return run(Path(d), args).exit()
        except cannot as e:
            print(f"SKIP {e}", flush=True)
            return 2
