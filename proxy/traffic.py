"""Traffic history: what the service answered, per time bucket, kept in the database.

Each worker adds up its requests in memory (source -> requests, bytes; misses also per recipe)
and writes the sums every ``[dashboard] history_flush_s`` seconds through the database's one
write path (``EquivalenceDB.add_traffic``: an upsert that adds), so the dashboard sees the
whole service (every worker, every replica) and the history survives restarts. Buckets older
than ``[dashboard] history_days`` are pruned (at most hourly, by each worker: the delete is
idempotent). A request costs a dict update; nothing is written while the service is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from proxy.names import SstateName
from storage.equivalence import DatabaseUnavailable, EquivalenceDB, TrafficRow

log = logging.getLogger("sstate_proxy.traffic")

BUCKET_S = 60
PRUNE_EVERY_S = 3600.0
# Sums kept while the database cannot take them (DatabaseUnavailable); past this many rows the
# oldest pending sums are dropped rather than growing without bound.
MAX_PENDING_ROWS = 100_000
SOURCES = ("hit", "equivalent", "upstream", "miss", "report")


def recipe_of(name: SstateName | None) -> str:
    """The recipe (PN) of an sstate object name, '' when the name does not say it: the colon
    form ``sstate:PN:...`` names it; the old dash form ``sstate-PN-ARCH-...`` cannot be split
    reliably (PN and the arch both contain dashes)."""
    if name is None or not name.is_colon_form:
        return ""
    return name.stem.split(":", 2)[1]


class TrafficRecorder:
    """One per worker: counts requests per bucket and writes the sums in batches."""

    def __init__(self, db: EquivalenceDB, *, flush_s: float, keep_s: float) -> None:
        self.db = db
        self.flush_s = flush_s
        self.keep_s = keep_s
        self._pending: dict[tuple[int, str, str], list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._next_prune = 0.0
        self._closed = False

    def record(self, source: str, nbytes: int = 0, recipe: str = "") -> None:
        """One request answered from ``source`` with ``nbytes`` body bytes (hot path)."""
        key = (int(time.time()) // BUCKET_S * BUCKET_S, source, recipe)
        acc = self._pending.get(key)
        if acc is None:
            self._pending[key] = [1, nbytes]
        else:
            acc[0] += 1
            acc[1] += nbytes
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write the pending sums (one transaction), and prune when due."""
        async with self._lock:
            pending, self._pending = self._pending, {}
            if pending:
                rows = [TrafficRow(b, s, r, n, nb) for (b, s, r), (n, nb) in pending.items()]
                try:
                    await self.db.add_traffic(rows)
                except DatabaseUnavailable as exc:
                    log.warning("traffic history not written now (%s); will retry", exc)
                    self._keep(pending)
                    return
                except Exception:
                    log.exception("traffic history could not be written; %d rows dropped", len(rows))
                    return
            now = time.time()
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY_S
                try:
                    await self.db.prune_traffic(int(now - self.keep_s))
                except Exception as exc:  # pruning again in an hour is soon enough
                    log.warning("traffic history not pruned: %s", exc)

    def _keep(self, pending: dict[tuple[int, str, str], list[int]]) -> None:
        """Put unwritten sums back (merged with what came meanwhile) and try again later."""
        for key, (n, nb) in pending.items():
            acc = self._pending.setdefault(key, [0, 0])
            acc[0] += n
            acc[1] += nb
        if len(self._pending) > MAX_PENDING_ROWS:
            for key in sorted(self._pending)[: len(self._pending) - MAX_PENDING_ROWS]:
                del self._pending[key]
        self._arm()

    async def close(self) -> None:
        """Write what is pending (a clean stop loses nothing)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.flush()
