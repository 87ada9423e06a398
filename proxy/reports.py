"""bitbake-hashserv's lookup and report algorithm, the one copy every equivalence face calls.

/v1/equivalent and OEHASHEQUIV (tcp, unix, websocket) hold a ``Reporter`` and nothing else of
this logic, so they cannot drift. The rules are bitbake-hashserv 2.19's:

* first writer wins per (method, taskhash);
* a report takes the unihash of the oldest equivalent outhash (another taskhash with the same
  method and outhash), else the unihash of the upstream's row for that outhash (with an
  upstream), else its own;
* without ``@report`` (or on a read-only server) a report is only a lookup by outhash;
* with an upstream, local misses of ``get``, ``get-outhash`` and the stream lookups are asked
  upstream; rows fetched by ``get``/``get-outhash`` are stored, a get-stream hit is stored later
  by the back-fill worker (``backfill_wait`` waits for it). A failing upstream is a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from proxy.auth import REPORT_PERM, Auth, Identity
from proxy.upstream_hashserv import UpstreamError, UpstreamHashserv
from storage.equivalence import EquivalenceDB, Row

log = logging.getLogger("sstate_proxy.reports")

_HEX = frozenset("0123456789abcdef")
_REPORT_ONLY = frozenset((REPORT_PERM,))
# the outhashes_v2 columns a row from the upstream may fill
_OUTHASH_KEYS = ("method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task", "outhash_siginfo")
BACKFILL_MAX = 100_000


class ReportError(ValueError):
    """The report is malformed (bad unihash...): the face answers 400 / invoke-error."""


def is_valid_unihash(value: object) -> bool:
    """``^[0-9a-f]{64}$`` on a str, as bitbake's ``is_valid_unihash`` (every face uses this one)."""
    return type(value) is str and len(value) == 64 and _HEX.issuperset(value)


def _mapping(method: str, taskhash: str, unihash: str) -> Row:
    return {"taskhash": taskhash, "method": method, "unihash": unihash}


class Reporter:
    """Lookups and reports on ``db``, with ``upstream`` (if given) asked for local misses.

    The Reporter owns ``upstream``: ``close`` closes it. ``on_change`` is called after every
    committed change of equivalence data made through it (caches in the process drop at once).
    """

    def __init__(self, db: EquivalenceDB, auth: Auth, *, read_only: bool = False,
                 upstream: UpstreamHashserv | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        if read_only and upstream is not None:
            raise ValueError("a read-only server cannot pull from an upstream server")  # as bitbake
        self.db = db
        self.auth = auth
        self.read_only = read_only
        self.upstream = upstream
        self._on_change = on_change
        self._backfill: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._backfill_pending: set[tuple[str, str]] = set()
        self._backfill_task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def close(self) -> None:
        task, self._backfill_task = self._backfill_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.upstream is not None:
            await self.upstream.close()

    # --- the upstream --------------------------------------------------------------------------
    async def _ask(self, name: str, *args: Any) -> Any:
        """``upstream.name(*args)``; None without an upstream or when it fails."""
        if self.upstream is None:
            return None
        try:
            return await getattr(self.upstream, name)(*args)
        except UpstreamError as e:
            log.debug("upstream miss: %s", e)
            return None

    async def _store_unified(self, d: Any) -> bool:
        """Store an upstream row (unihash mapping + outhash row) if it is sound; True if stored."""
        if not isinstance(d, dict):
            return False
        method, taskhash, unihash = d.get("method"), d.get("taskhash"), d.get("unihash")
        if type(method) is not str or type(taskhash) is not str or not is_valid_unihash(unihash):
            log.warning("upstream returned an invalid row; not stored")
            return False
        changed = await self.db.insert_unihash(method, taskhash, unihash)
        if type(d.get("outhash")) is str:
            row = {k: d[k] for k in _OUTHASH_KEYS if isinstance(d.get(k), str)}
            changed = await self.db.insert_outhash(row) or changed
        if changed:
            self.changed()
        return True

    # --- lookups ---------------------------------------------------------------------------------
    async def get(self, method: str, taskhash: str, fetch_all: bool = False) -> Row | None:
        """``get``: the mapping of a taskhash (``fetch_all``: joined with its oldest outhash row)."""
        if fetch_all:
            row = await self.db.get_unihash_full(method, taskhash)
            if row is None and self.upstream is not None:
                d = await self._ask("get_taskhash", method, taskhash, True)
                row = d if await self._store_unified(d) else None
            return row
        row = await self.db.get_unihash(method, taskhash)
        if row is None and self.upstream is not None:
            d = await self._ask("get_taskhash", method, taskhash, False)
            if isinstance(d, dict) and is_valid_unihash(d.get("unihash")):
                if await self.db.insert_unihash(method, taskhash, d["unihash"]):
                    self.changed()
                row = _mapping(method, taskhash, d["unihash"])
        return row

    async def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True) -> Row | None:
        """``get-outhash``: the oldest row of an outhash (bitbake asks the upstream with its unihash)."""
        row = await self.db.get_outhash(method, outhash, with_unihash)
        if row is None and self.upstream is not None:
            d = await self._ask("get_outhash", method, outhash, taskhash, True)
            row = d if await self._store_unified(d) else None
        return row

    async def unihash(self, method: str, taskhash: str) -> str:
        """A get-stream line's answer: the unihash, or "" for a miss."""
        row = await self.db.get_unihash(method, taskhash)
        if row is not None:
            return row["unihash"]
        if self.upstream is not None:
            u = await self._ask("get_unihash", method, taskhash)
            if is_valid_unihash(u):
                self._queue_backfill(method, taskhash)
                return u
        return ""

    async def unihash_exists(self, unihash: str) -> bool:
        """An exists-stream line's answer."""
        if await self.db.unihash_exists(unihash):
            return True
        return bool(await self._ask("unihash_exists", unihash))

    # --- reports ---------------------------------------------------------------------------------
    async def report(self, row: Row, unihash: object, ident: Identity) -> Row:
        """``report``: ``row`` holds taskhash, method, outhash and optional owner/PN/PV/PR/task/
        outhash_siginfo. Returns the mapping as stored (or, as a lookup, as it would be)."""
        if not is_valid_unihash(unihash):
            raise ReportError("Invalid unihash")
        assert isinstance(unihash, str)
        method, taskhash, outhash = row["method"], row["taskhash"], row["outhash"]
        if self.read_only or not self.auth.allowed(ident, _REPORT_ONLY):
            found = await self.get_outhash(method, outhash, taskhash, True)
            return _mapping(method, taskhash, found["unihash"] if found else unihash)
        if ident.username is not None:
            row = {**row, "owner": ident.username}
        if self.upstream is not None and await self.db.get_equivalent_for_outhash(method, outhash, taskhash) is None:
            # no local equivalent: the upstream's unihash for this outhash, if it has one, is the
            # report's own (an equivalent reported meanwhile still wins inside insert_report)
            d = await self._ask("get_outhash", method, outhash, taskhash, True)
            if isinstance(d, dict) and is_valid_unihash(d.get("unihash")):
                unihash = d["unihash"]
        stored = await self.db.insert_report(row, unihash)
        self.changed()
        return stored

    async def report_equiv(self, method: str, taskhash: str, unihash: object) -> Row:
        """``report-equiv``: map taskhash to unihash unless it is mapped; the mapping as stored."""
        if not is_valid_unihash(unihash):
            raise ReportError("Invalid unihash")
        assert isinstance(unihash, str)
        if await self.db.insert_unihash(method, taskhash, unihash):
            self.changed()
        row = await self.db.get_unihash(method, taskhash)
        if row is None:  # deleted concurrently
            return _mapping(method, taskhash, unihash)
        return _mapping(row["method"], row["taskhash"], row["unihash"])

    # --- back-fill of get-stream upstream hits -------------------------------------------------------
    def _queue_backfill(self, method: str, taskhash: str) -> None:
        key = (method, taskhash)
        if key in self._backfill_pending or len(self._backfill_pending) >= BACKFILL_MAX:
            return
        self._backfill_pending.add(key)
        self._backfill.put_nowait(key)
        if self._backfill_task is None:
            self._backfill_task = asyncio.get_running_loop().create_task(self._backfill_worker(),
                                                                         name="hashserv-backfill")

    async def backfill_wait(self) -> int:
        """Number of queued back-fills, after waiting for the queue to drain (0 without upstream)."""
        n = self._backfill.qsize()
        await self._backfill.join()
        return n

    async def _backfill_worker(self) -> None:
        q = self._backfill
        while True:
            method, taskhash = await q.get()
            try:
                d = await self._ask("get_taskhash", method, taskhash, False)
                if isinstance(d, dict) and d.get("method") == method and d.get("taskhash") == taskhash:
                    if is_valid_unihash(d.get("unihash")):
                        if await self.db.insert_unihash(method, taskhash, d["unihash"]):
                            self.changed()
                    else:
                        log.warning("upstream returned an invalid unihash for %s %s", method, taskhash)
            except Exception:
                log.exception("hashserv back-fill of %s %s failed", method, taskhash)
            finally:
                self._backfill_pending.discard((method, taskhash))
                q.task_done()
