"""`sstate-proxy db copy SRC_URL DST_URL`: move an equivalence database between engines.

SQLite -> PostgreSQL (outgrowing one machine), PostgreSQL -> SQLite (a backup, or back), SQLite
-> SQLite. Every table the service uses is copied, every column as stored: users with their
token hashes (logins keep working), the gc mark, outhash rows with ``created``, ``owner`` and
``PN``/``PV``/``PR``, unihash rows with their ``gc_mark``, and the storage-dedup rows
(``sstate_proxy_archives``), the object catalog (access times and the pulled-through cache's
records, ``sstate_proxy_objects``) and the dashboard's traffic history. Not the removal log: its
positions belong to one database. Rows go in the source's order, so "oldest first" answers and
"newest first" classes are the same on the destination.

Idempotent: the destination's inserts are first-writer-wins (``EquivalenceDB.copy_in``), so a
rerun copies nothing new and an interrupted copy is finished by running it again. A row already
in the destination under the same unique key is kept as it is (a user of the same name keeps
its token there). The source is opened read-only; copy from a live source is fine (each table is
read from one snapshot; rerun to pick up what was written meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

from storage.equivalence import COPY_COLUMNS, EquivalenceDB, UnsupportedDatabase, open_equivalence_db

# Copied in this order (none refers to another; users first so a half-finished copy of a big
# database can already be logged into).
TABLES = ("users", "config", "outhashes_v2", "unihashes_v3", "sstate_proxy_archives",
          "sstate_proxy_objects", "sstate_proxy_traffic")
BATCH = 2000


@dataclass
class TableResult:
    table: str
    read: int = 0
    copied: int = 0

    @property
    def skipped(self) -> int:
        return self.read - self.copied


class CopyError(Exception):
    """A database could not be opened or used; str() is the one line the CLI prints."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _redact(url: str) -> str:
    """The URL without a password (``postgresql://user:secret@host/db`` -> ``user:***@``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, at, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _open(url: str, *, read_only: bool, role: str) -> EquivalenceDB:
    safe = _redact(url)
    try:
        return open_equivalence_db(url, read_only=read_only)
    except (UnsupportedDatabase, ValueError) as e:
        raise CopyError(f"{role} {safe}: {_one_line(e).replace(url, safe)}", status=2) from None
    except Exception as e:  # cannot connect, no such file, ...
        raise CopyError(f"cannot open {role} {safe}: {_one_line(e).replace(url, safe)}", status=2) from None


async def _probe(db: EquivalenceDB, url: str, role: str) -> None:
    """One real query, so that an engine that connects lazily fails here (wrong host, password,
    database name) with the same one line, not in the middle of the copy."""
    safe = _redact(url)
    try:
        await db.get_current_gc_mark()
    except Exception as e:
        raise CopyError(f"cannot open {role} {safe}: {_one_line(e).replace(url, safe)}", status=2) from None


async def _totals(db: EquivalenceDB) -> dict[str, int | None]:
    """Row counts for the progress bars, when the engine gives them cheaply; None = unknown."""
    totals: dict[str, int | None] = dict.fromkeys(TABLES)
    try:
        usage = await db.get_usage()
        for table in TABLES:
            rows = usage.get(table, {}).get("rows")
            if isinstance(rows, int):
                totals[table] = rows
        totals["sstate_proxy_archives"] = (await db.dedup_stats())["objects"]
        totals["sstate_proxy_objects"] = (await db.object_usage())[0]
    except Exception:  # only cosmetic
        pass
    return totals


async def copy_database(src: EquivalenceDB, dst: EquivalenceDB, *, batch: int = BATCH,
                        advance: Callable[[str, int], None] | None = None) -> list[TableResult]:
    """Copy every table of ``src`` into ``dst``; per table, rows read and rows inserted.
    ``advance(table, n)`` is called after each batch of ``n`` rows."""
    results = []
    for table in TABLES:
        result = TableResult(table)
        async for rows in src.iter_rows(table, batch):
            result.read += len(rows)
            result.copied += await dst.copy_in(table, rows)
            if advance is not None:
                advance(table, len(rows))
        results.append(result)
    return results


async def run_copy(src_url: str, dst_url: str, *, progress: bool, batch: int = BATCH) -> list[TableResult]:
    if src_url == dst_url:
        raise CopyError("source and destination are the same database", status=2)
    src = _open(src_url, read_only=True, role="source")
    try:
        dst = _open(dst_url, read_only=False, role="destination")
    except BaseException:
        await src.close()
        raise
    try:
        await _probe(src, src_url, "source")
        await _probe(dst, dst_url, "destination")
        if not progress:
            return await copy_database(src, dst, batch=batch)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        totals = await _totals(src)
        columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            tasks = {t: bar.add_task(t, total=totals[t]) for t in TABLES}

            def advance(table: str, n: int) -> None:
                bar.advance(tasks[table], n)

            results = await copy_database(src, dst, batch=batch, advance=advance)
            for r in results:  # a table smaller than counted (rows deleted meanwhile): full bar
                bar.update(tasks[r.table], total=r.read, completed=r.read)
            return results
    finally:
        await dst.close()
        await src.close()


def summary(results: list[TableResult]) -> str:
    width = max(len(t) for t in COPY_COLUMNS)
    lines = [f"{r.table:<{width}}  {r.read:>9} read  {r.copied:>9} copied  {r.skipped:>9} already there"
             for r in results]
    copied = sum(r.copied for r in results)
    read = sum(r.read for r in results)
    lines.append(f"{'total':<{width}}  {read:>9} read  {copied:>9} copied  {read - copied:>9} already there")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction, add_config_args: Callable) -> None:
    d = sub.add_parser("db", help="database operations")
    dsub = d.add_subparsers(dest="db_command", required=True)
    c = dsub.add_parser(
        "copy", help="copy an equivalence database to another (SQLite <-> PostgreSQL), idempotent",
        description="Copy every row (users and tokens, gc mark, outhashes, unihashes, dedup rows) "
                    "from SRC_URL into DST_URL. Rows already in DST_URL are kept; a rerun copies "
                    "nothing new.")
    c.add_argument("src_url", metavar="SRC_URL", help="sqlite:///path or postgresql://...")
    c.add_argument("dst_url", metavar="DST_URL", help="sqlite:///path or postgresql://...")
    c.add_argument("--batch", type=int, default=BATCH, help=f"rows per transaction (default {BATCH})")
    c.add_argument("--no-progress", action="store_true", help="no progress bar (default: on a terminal)")
    c.set_defaults(config=None)


def command(cfg, args: argparse.Namespace) -> int:
    if args.db_command != "copy":
        raise ValueError(f"unknown db command {args.db_command!r}")
    if args.batch <= 0:
        print("sstate-proxy: --batch must be positive", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        results = asyncio.run(run_copy(args.src_url, args.dst_url, progress=progress, batch=args.batch))
    except CopyError as e:
        print(f"sstate-proxy: db copy: {e}", file=sys.stderr)
        return e.status
    except Exception as e:  # the database went away mid-copy, say: rerun finishes the copy
        print(f"sstate-proxy: db copy failed ({_one_line(e)}); rerun to finish it", file=sys.stderr)
        return 1
    print(summary(results))
    return 0
