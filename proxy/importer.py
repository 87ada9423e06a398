"""`sstate-proxy import SSTATE_DIR`: ingest an existing sstate directory into the configured store.

* Every layout bitbake has written is accepted (flat dash names, ``hh/``, ``hh/hh/``, any
  SSTATE_EXTRAPATH such as ``universal/``), objects and their ``.siginfo``/``.sig``; the key is
  the path relative to SSTATE_DIR, exactly what bitbake asks the mirror for.
* bitbake's own litter is ignored: ``*.tmp`` (wget), ``*.lock``, ``*.done``, ``.tmp-*`` (ours)
  and NamedTemporaryFile leftovers (``<object name><8 random chars>``).
* Refused (counted, listed, exit 0): names that are not sstate names, symlinks leading outside
  SSTATE_DIR, special files, unreadable files.
* Resumable and idempotent: a key already stored is skipped; the store writes atomically, so an
  interrupted run leaves no partial object and the next run carries on.
* ``--link``: the store hard-links the file instead of copying when it can (a local store on
  the same filesystem; it copies otherwise).
* Dedup is the store's business (storage.dedup, on unless ``--no-dedup`` or ``[storage] dedup``
  is off): an archive equal to one already stored is not stored again.
* Bounded concurrency (``--jobs``), a rich progress bar on stderr, a summary on stdout; exit 1
  only when objects failed to store (store/database errors).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import stat as stat_mod
import sys
import time
from dataclasses import dataclass, field

from proxy import names
from storage import InvalidKey, ObjectStore, StoreError, open_store
from storage.equivalence import EquivalenceDB, open_equivalence_db

log = logging.getLogger("sstate_proxy.import")

# bitbake's temp/lock files next to objects: wget's X.tmp, X.lock, the sstate-cache-management
# X.done, our own .tmp- files, and NamedTemporaryFile(prefix=X) leftovers (X + 8 random chars).
_LITTER = re.compile(
    r"(?:.*\.(?:tmp|lock|done)|\.tmp-.*|.*(?:\.tar\.zst|\.tgz)(?:\.siginfo|\.sig)?[A-Za-z0-9_]{8})"
)


def is_litter(basename: str) -> bool:
    return _LITTER.fullmatch(basename) is not None


@dataclass
class Summary:
    added: int = 0
    linked: int = 0
    deduplicated: int = 0
    skipped: int = 0
    ignored: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    bytes_added: int = 0

    def line(self) -> str:
        return (f"added {self.added} ({self.linked} hard-linked, {self.deduplicated} deduplicated, "
                f"{self.bytes_added} bytes), skipped {self.skipped} (already present), "
                f"refused {len(self.refused)}, failed {len(self.failed)}, "
                f"ignored {self.ignored} temp/lock files")


def scan(top: str, summary: Summary) -> list[tuple[str, str]]:
    """(key, path to read) for every candidate file below ``top``; refusals recorded."""
    real_top = os.path.realpath(top)
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top)
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):  # directory symlinks are not followed (loops, escapes)
                rel = d if rel_dir == "." else f"{rel_dir}/{d}"
                summary.refused.append((rel, "symlinked directory (not followed)"))
                dirnames.remove(d)
        for fn in sorted(filenames):
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            rel = rel.replace(os.sep, "/")
            if is_litter(fn):
                summary.ignored += 1
                continue
            path = os.path.join(dirpath, fn)
            try:
                st = os.lstat(path)
            except OSError as e:
                summary.refused.append((rel, f"unreadable: {e.strerror}"))
                continue
            if stat_mod.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if not (target.startswith(real_top + os.sep)):
                    summary.refused.append((rel, "symlink leading outside the directory"))
                    continue
                path = target
                try:
                    st = os.stat(path)
                except OSError as e:
                    summary.refused.append((rel, f"dangling symlink: {e.strerror}"))
                    continue
            if not stat_mod.S_ISREG(st.st_mode):
                summary.refused.append((rel, "not a regular file"))
                continue
            if names.parse(rel) is None:
                summary.refused.append((rel, "not an sstate object name"))
                continue
            out.append((rel, path))
    return out


class Importer:
    def __init__(self, store: ObjectStore, *, link: bool, jobs: int, catalog: EquivalenceDB | None = None) -> None:
        self.store = store
        self.catalog = catalog  # imported objects are catalogued as 'local' (retention)
        self.link = link
        self.jobs = max(1, jobs)
        self._warned_copy = False

    async def one(self, key: str, path: str, s: Summary) -> None:
        try:
            if await self.store.stat(key) is not None:
                s.skipped += 1
                return
            size = os.stat(path).st_size
            result = await self.store.put_file(key, path, link=self.link)
            if not result.created:
                s.skipped += 1
                return
            s.added += 1
            if self.catalog is not None:
                try:
                    await self.catalog.record_object(key, size, "local", time.time())
                except Exception as e:  # stored all the same; gc falls back to the file's mtime
                    log.warning("cataloguing %s failed: %s", key, e)
            if result.shared_with is not None:
                s.deduplicated += 1
                return
            s.bytes_added += size
            if result.linked:
                s.linked += 1
            elif self.link and not self._warned_copy:
                self._warned_copy = True
                print("sstate-proxy import: warning: --link: the store cannot hard-link this file "
                      "(another filesystem, or not a local store); copying instead", file=sys.stderr)
        except PermissionError as e:
            s.refused.append((key, f"unreadable: {e.strerror}"))
        except InvalidKey as e:
            s.refused.append((key, f"invalid key: {e}"))
        except (StoreError, OSError) as e:
            s.failed.append((key, str(e)))
        except Exception as e:  # one bad file must not stop the import
            log.exception("import of %s failed", key)
            s.failed.append((key, f"{type(e).__name__}: {e}"))

    async def run(self, items: list[tuple[str, str]], s: Summary, progress=None, task=None) -> None:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for it in items:
            queue.put_nowait(it)

        async def worker() -> None:
            while True:
                try:
                    key, path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self.one(key, path, s)
                if progress is not None:
                    progress.advance(task)

        await asyncio.gather(*(worker() for _ in range(self.jobs)))


async def import_dir(cfg, top: str, *, link: bool = False, jobs: int = 8, dedup: bool = True,
                     show_progress: bool = True) -> Summary:
    s = Summary()
    loop = asyncio.get_running_loop()
    items = await loop.run_in_executor(None, scan, top, s)
    db = open_equivalence_db(cfg.database.url)
    store = open_store(cfg, db if dedup else None)
    try:
        await store.start()
        imp = Importer(store, link=link, jobs=jobs, catalog=db)
        if show_progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False) as progress:
                task = progress.add_task("import", total=len(items))
                await imp.run(items, s, progress, task)
        else:
            await imp.run(items, s)
    finally:
        await store.close()
        await db.close()
    return s


def add_parser(sub: argparse._SubParsersAction, add_config_args) -> None:
    p = sub.add_parser("import", help="import an existing SSTATE_DIR into the configured store")
    add_config_args(p)
    p.add_argument("sstate_dir", metavar="SSTATE_DIR")
    p.add_argument("--link", action="store_true",
                   help="hard-link into a local store on the same filesystem instead of copying")
    p.add_argument("--jobs", "-j", type=int, default=8, metavar="N", help="objects in flight (default 8)")
    p.add_argument("--no-dedup", action="store_true", help="store every archive, even equal ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(cfg, args: argparse.Namespace) -> int:
    top = args.sstate_dir
    if not os.path.isdir(top):
        print(f"sstate-proxy import: {top!r} is not a directory", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    s = asyncio.run(import_dir(cfg, top, link=args.link, jobs=args.jobs, dedup=cfg.storage.dedup and not args.no_dedup,
                               show_progress=not args.no_progress))
    for rel, why in s.refused[:50]:
        print(f"refused {rel}: {why}", file=sys.stderr)
    if len(s.refused) > 50:
        print(f"... and {len(s.refused) - 50} more refused", file=sys.stderr)
    for rel, why in s.failed[:50]:
        print(f"FAILED {rel}: {why}", file=sys.stderr)
    print(s.line())
    return 1 if s.failed else 0
