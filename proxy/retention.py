"""Object retention: `sstate-proxy gc`, and the same gc run by the service on a schedule.

A gc run, on any store backend, while the service serves:

1. **List** the store (``ObjectStore.entries``: sizes and mtimes from the store itself) and
   group each object with its ``.siginfo``/``.sig`` (one *unit*, removed together). Storage
   dedup: an alias (a name served by another key's bytes, storage/dedup.py) joins the unit of
   its canonical key, so bytes that still serve a name are never counted as free, and the
   aliases of a removed unit are removed first (the canonical then goes without promoting an
   alias into a copy).
2. **Last access** of a unit: the newest ``last_access`` of its names in the catalog
   (``sstate_proxy_objects``, written by proxy/access.py); a unit never served falls back to its
   newest mtime. Catalog rows of objects no longer stored (and older than the run) are dropped.
3. **Choose**: every unit not used for ``unused_for``; then, least recently used first, until
   the store is within ``max_size``. A unit with any name matching a pin glob is never chosen.
4. **Remove** each chosen unit through the store (``delete``), then tell the database
   (``forget_objects``) per batch: the catalog rows go and the keys enter the removal log,
   which every other process's S3 index reads within about a second (storage/s3.py). The
   rewrite re-checks a cached answer's object with the store on every use
   (proxy/resolver.py), so no process answers with a removed object once its store knows.

One run at a time per database: ``db.exclusive("gc")`` (an flock beside a SQLite file, a
PostgreSQL advisory lock), held by the CLI and by the one worker that runs the schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from proxy.names import EXTENSIONS
from storage import ObjectStore, StoreError
from storage.equivalence import DatabaseUnavailable, EquivalenceDB

if TYPE_CHECKING:  # not at run time: the CLI imports this module before `serve` points
    # prometheus_client at its multiprocess directory, and prometheus_client must not be
    # imported before that (it picks its value store once, at import)
    from proxy.metrics import Metrics

log = logging.getLogger("sstate_proxy.retention")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_COMPANIONS = (".siginfo", ".sig")

# Units removed concurrently (each a few store deletes), and units per batch: a batch's keys are
# logged (forget_objects) when it is done, so a removal reaches the other processes' caches
# after its batch's commit.
REMOVE_CONCURRENCY = 8
REMOVE_BATCH = 128
# The scheduled gc's first run comes at most this long after start-up, then every interval.
FIRST_RUN_MAX_S = 600.0
# Time buckets of oldest_first (each sorted on its own).
SORT_BUCKETS = 4096


def parse_size(text: str) -> int:
    """``"500G"`` -> bytes. Bytes, or a number with K, M, G or T (powers of 1024; ``KiB``/``KB``
    spellings too). ValueError with a one-line reason otherwise."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad size {text!r}: use bytes or a number with K, M, G or T (e.g. 500G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_duration(text: str) -> float:
    """``"30d"`` -> seconds. A number with s, m, h, d or w. ValueError otherwise."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"bad duration {text!r}: use a positive number with s, m, h, d or w (e.g. 30d, 12h)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def object_key_of(key: str) -> str:
    """The object a key belongs to: a companion's object (``X.tar.zst.siginfo`` ->
    ``X.tar.zst``), else the key itself."""
    for suffix in _COMPANIONS:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if base.endswith(EXTENSIONS):
                return base
    return key


@dataclass(frozen=True)
class Policy:
    max_size: int | None = None  # bytes
    unused_for: float | None = None  # seconds
    pins: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.max_size is None and self.unused_for is None

    @classmethod
    def from_config(cls, r) -> Policy:
        """From a validated ``RetentionConfig``."""
        return cls(parse_size(r.max_size) if r.max_size else None,
                   parse_duration(r.unused_for) if r.unused_for else None, tuple(r.pin))


class Pins:
    """Globs (fnmatch: ``*`` also crosses ``/``) matched against each key and its file name,
    compiled into one regex: ``sstate:gcc-cross-*`` and ``universal/*`` both work."""

    def __init__(self, globs: Sequence[str]) -> None:
        self._re = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    def match(self, keys: Sequence[str]) -> bool:
        if self._re is None:
            return False
        return any(self._re.match(k) or self._re.match(k.rsplit("/", 1)[-1]) for k in keys)


class Unit:
    """An object and its companions (and dedup aliases): removed together. Compact, since a
    large store holds one per object in memory: one key is kept as a plain string."""

    __slots__ = ("_keys", "size", "last", "seen")

    def __init__(self, key: str, size: int, mtime: float) -> None:
        self._keys: str | list[str] = key  # aliases first (they go before their canonical's bytes)
        self.size = size  # bytes stored for the unit
        self.last = mtime  # last access (the newest mtime until the catalog says)
        self.seen = False  # a catalog row was found

    @property
    def keys(self) -> list[str]:
        return [self._keys] if isinstance(self._keys, str) else self._keys

    def add(self, key: str, *, first: bool = False) -> None:
        keys = self.keys
        if first:
            keys.insert(0, key)
        else:
            keys.append(key)
        self._keys = keys


@dataclass
class Listing:
    units: list[Unit] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    stale: list[str] = field(default_factory=list)  # catalog rows of objects no longer stored


@dataclass(frozen=True)
class Report:
    objects: int  # units listed
    files: int
    bytes: int
    removed_objects: int
    removed_files: int
    removed_bytes: int
    pinned_objects: int
    failed: int  # keys the store failed to delete (kept; logged)
    seconds: float
    dry_run: bool
    max_size: int | None

    @property
    def kept_bytes(self) -> int:
        return self.bytes - self.removed_bytes

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        out = (f"gc{' (dry run)' if self.dry_run else ''}: {self.objects} objects ({self.files} files, "
               f"{human_bytes(self.bytes)}) listed; {verb} {self.removed_objects} objects "
               f"({self.removed_files} files, {human_bytes(self.removed_bytes)}) in {self.seconds:.1f}s; "
               f"{human_bytes(self.kept_bytes)} kept")
        if self.max_size is not None:
            out += f" (max {human_bytes(self.max_size)})"
            if self.kept_bytes > self.max_size:
                out += "; still over the bound: the rest is pinned"
        if self.pinned_objects:
            out += f"; {self.pinned_objects} pinned"
        if self.failed:
            out += f"; {self.failed} deletes FAILED"
        return out


class Progress:
    """Receives a run's progress. This base shows nothing (the scheduled gc logs its summary
    line only); the command's subclass draws a bar."""

    def listed(self, files: int) -> None:
        """``files`` keys listed so far."""

    def removing(self, total: int) -> None:
        """The removal of ``total`` objects begins."""

    def removed(self, n: int) -> None:
        """``n`` more objects were removed."""


async def collect(store: ObjectStore, db: EquivalenceDB, started: float, progress: Progress) -> Listing:
    """Steps 1 and 2 of the module docstring."""
    out = Listing()
    units: dict[str, Unit] = {}  # object key (or alias object key) -> its unit
    async for key, meta in store.entries():
        out.files += 1
        out.bytes += meta.size
        okey = object_key_of(key)
        unit = units.get(okey)
        if unit is None:
            units[okey] = unit = Unit(key, meta.size, meta.mtime)
            out.units.append(unit)
        else:
            unit.add(key)
            unit.size += meta.size
            unit.last = max(unit.last, meta.mtime)
        if out.files % 1000 == 0:
            progress.listed(out.files)
    progress.listed(out.files)
    # Dedup aliases join their canonical's unit (with their own companions).
    absorbed: set[int] = set()
    async for rows in db.iter_rows("sstate_proxy_archives"):
        for row in rows:
            alias, canonical = row["key"], row["canonical"]
            if alias == canonical:
                continue
            target = units.get(canonical)
            if target is None:  # the canonical's bytes are gone: nothing of it to keep or free
                continue
            own = units.get(alias)
            if own is not None and own is not target:
                for k in reversed(own.keys):
                    target.add(k, first=True)
                target.size += own.size
                target.last = max(target.last, own.last)
                absorbed.add(id(own))
            target.add(alias, first=True)
            units[alias] = target
    if absorbed:
        out.units = [u for u in out.units if id(u) not in absorbed]
    async for batch in db.iter_objects():
        for row in batch:
            unit = units.get(object_key_of(row.key))
            if unit is None:
                if row.last_access < started:
                    out.stale.append(row.key)
                continue
            if unit.seen:
                unit.last = max(unit.last, row.last_access)
            else:
                unit.last, unit.seen = row.last_access, True
    return out


def oldest_first(units: list[Unit]) -> list[Unit]:
    """``units`` by last access, oldest first: bucketed by time, then each bucket sorted on its
    own, so that no single long sort holds the GIL (choose runs in a thread beside a worker's
    event loop)."""
    if not units:
        return []
    lo = min(u.last for u in units)
    width = (max(u.last for u in units) - lo) / SORT_BUCKETS or 1.0
    buckets: dict[int, list[Unit]] = {}
    for u in units:
        buckets.setdefault(int((u.last - lo) / width), []).append(u)
    out: list[Unit] = []
    for b in sorted(buckets):
        out.extend(sorted(buckets[b], key=_last))
    return out


def _last(u: Unit) -> float:
    return u.last


def choose(listing: Listing, policy: Policy, now: float) -> tuple[list[Unit], int]:
    """Step 3: the units to remove, oldest first, and how many units are pinned. Pure; runs in
    a thread (a million units take a while)."""
    pins = Pins(policy.pins)
    free = [u for u in listing.units if not pins.match(u.keys)] if policy.pins else listing.units
    pinned = len(listing.units) - len(free)
    cutoff = None if policy.unused_for is None else now - policy.unused_for
    total = listing.bytes
    chosen: list[Unit] = []
    for u in oldest_first(free):  # what goes is always a prefix of this order
        old = cutoff is not None and u.last < cutoff
        over = policy.max_size is not None and total > policy.max_size
        if not (old or over):
            break
        chosen.append(u)
        total -= u.size
    return chosen, pinned


async def remove(store: ObjectStore, db: EquivalenceDB, units: list[Unit], progress: Progress
                 ) -> tuple[int, int, int, int]:
    """Step 4: (objects, files, bytes removed, deletes failed)."""
    objects = files = nbytes = failed = 0
    sem = asyncio.Semaphore(REMOVE_CONCURRENCY)
    gone: list[str] = []

    async def one(u: Unit) -> None:
        nonlocal objects, files, nbytes, failed
        async with sem:
            ok = True
            for key in u.keys:
                try:
                    await store.delete(key)
                except (StoreError, OSError) as e:
                    log.warning("gc: deleting %s failed: %s", key, e)
                    failed += 1
                    ok = False
                    continue
                gone.append(key)
                files += 1
            if ok:
                objects += 1
                nbytes += u.size
            progress.removed(1)

    progress.removing(len(units))
    for start in range(0, len(units), REMOVE_BATCH):
        await asyncio.gather(*(one(u) for u in units[start:start + REMOVE_BATCH]))
        if gone:
            batch, gone = gone, []
            await db.forget_objects(batch)
    return objects, files, nbytes, failed


async def run_gc(store: ObjectStore, db: EquivalenceDB, policy: Policy, *, dry_run: bool = False,
                 progress: Progress | None = None, now: float | None = None,
                 on_victim: Callable[[Unit], None] | None = None) -> Report:
    """One gc run (see the module docstring). ``on_victim`` sees each chosen unit before it goes
    (the CLI's dry run prints them). The caller holds ``db.exclusive("gc")``."""
    progress = progress or Progress()
    t0 = time.monotonic()
    started = time.time() if now is None else now
    listing = await collect(store, db, started, progress)
    chosen, pinned = await asyncio.to_thread(choose, listing, policy, started)
    if on_victim is not None:
        for u in chosen:
            on_victim(u)
    if dry_run:
        removed = (len(chosen), sum(len(u.keys) for u in chosen), sum(u.size for u in chosen), 0)
    else:
        removed = await remove(store, db, chosen, progress)
        for start in range(0, len(listing.stale), 5000):
            await db.forget_objects(listing.stale[start:start + 5000])
    return Report(len(listing.units), listing.files, listing.bytes, *removed[:3], pinned, removed[3],
                  time.monotonic() - t0, dry_run, policy.max_size)


# --- in the service: the schedule ---------------------------------------------------------------

class Scheduler:
    """Runs the gc every ``interval_s`` in one worker (the one doing the store's housekeeping).
    Replicas and the CLI skip a run while another holds ``db.exclusive("gc")``."""

    def __init__(self, store: ObjectStore, db: EquivalenceDB, policy: Policy, interval_s: float,
                 on_removed: Callable[[], None] | None = None, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.db = db
        self.policy = policy
        self.interval_s = interval_s
        self.on_removed = on_removed
        self.runs = 0
        self.last: Report | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="retention")

    async def _run(self) -> None:
        await asyncio.sleep(min(self.interval_s, FIRST_RUN_MAX_S))
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduled gc failed")
            await asyncio.sleep(self.interval_s)

    async def run_once(self) -> Report | None:
        async with self.db.exclusive("gc") as held:
            if not held:
                log.info("scheduled gc skipped: another gc is running")
                return None
            report = await run_gc(self.store, self.db, self.policy)
        self.runs += 1
        self.last = report
        if self.metrics is not None:  # /metrics counts what the service removed
            self.metrics.gc_removed(report.removed_objects, report.removed_bytes)
        if report.removed_files and self.on_removed is not None:
            self.on_removed()
        log.info("%s", report.line())
        return report

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


# --- the command ----------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction, add_config_args) -> None:
    p = sub.add_parser("gc", help="remove least recently used objects (and their .siginfo/.sig)")
    add_config_args(p)
    p.add_argument("--max-size", metavar="SIZE",
                   help="remove least recently used objects until the store is within SIZE "
                        "(bytes or with K/M/G/T; default [retention] max_size)")
    p.add_argument("--unused-for", metavar="DURATION",
                   help="remove objects not used for DURATION (30d, 12h; default [retention] unused_for)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _RichProgress(Progress):
    def __init__(self, progress) -> None:
        self.p = progress
        self.listing = progress.add_task("listing", total=None)
        self.removing_task = None
        self.files = 0

    def listed(self, files: int) -> None:
        self.files = files
        self.p.update(self.listing, completed=files)

    def removing(self, total: int) -> None:
        self.p.update(self.listing, total=self.files, completed=self.files)
        self.removing_task = self.p.add_task("removing", total=total)

    def removed(self, n: int) -> None:
        if self.removing_task is not None:
            self.p.advance(self.removing_task, n)


def _policy_from_args(cfg, args: argparse.Namespace) -> Policy:
    base = Policy.from_config(cfg.retention)
    max_size = parse_size(args.max_size) if args.max_size is not None else base.max_size
    unused_for = parse_duration(args.unused_for) if args.unused_for is not None else base.unused_for
    return Policy(max_size, unused_for, base.pins)


async def gc_command(cfg, policy: Policy, *, dry_run: bool, show_progress: bool) -> int:
    from storage import open_store
    from storage.equivalence import open_equivalence_db

    db = open_equivalence_db(cfg.database.url)
    store = open_store(cfg, db)
    try:
        # No store.start(): gc lists the store itself, and an S3 index would be a second listing.

        def show(u: Unit) -> None:
            when = datetime.fromtimestamp(u.last, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for key in u.keys:
                print(f"would remove {key} (last used {when})")

        async with db.exclusive("gc") as held:
            if not held:
                print("sstate-proxy gc: another gc is running on this database", file=sys.stderr)
                return 1
            if show_progress:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

                with RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
                    report = await run_gc(store, db, policy, dry_run=dry_run, progress=_RichProgress(bar),
                                          on_victim=show if dry_run else None)
            else:
                report = await run_gc(store, db, policy, dry_run=dry_run, on_victim=show if dry_run else None)
    finally:
        await store.close()
        await db.close()
    print(report.line())
    return 1 if report.failed else 0


def command(cfg, args: argparse.Namespace) -> int:
    try:
        policy = _policy_from_args(cfg, args)
    except ValueError as e:
        print(f"sstate-proxy gc: {e}", file=sys.stderr)
        return 2
    if policy.empty:
        print("sstate-proxy gc: nothing to do: give --max-size and/or --unused-for "
              "(or [retention] max_size / unused_for)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    try:
        return asyncio.run(gc_command(cfg, policy, dry_run=args.dry_run, show_progress=not args.no_progress))
    # What was deleted before the fault stays deleted; keys whose batch could not be logged reach
    # other processes' S3 indexes at their next re-listing instead.
    except (DatabaseUnavailable, StoreError) as e:
        print(f"sstate-proxy gc: {e}", file=sys.stderr)
        return 1
