"""Last access of objects, recorded cheaply: one dict write per object served, written to the
catalog (``EquivalenceDB.touch_objects``) in batches by a background task.

One ``AccessRecorder`` per worker. ``touch(key)`` is called for every object served (hit,
equivalent or upstream; the key actually served) and only stores ``key -> now`` in a dict, so a
HEAD storm costs no database round trip. The flush task wakes when the first touch of a batch
arrives, waits ``flush_s`` (more touches of the same keys fold into one entry meanwhile), then
writes the whole batch in one transaction; ``stop()`` writes what is left. A failed flush (the
database is unavailable) keeps its entries for the next one. Several workers and replicas
touching one key agree through the database: ``last_access = max(old, new)``.

Last access is kept to within RESOLUTION_S: a key this worker wrote less than that long ago is
not written again, so a HEAD storm over the same objects commits nothing after its first flush.
That matters on SQLite, where every commit moves ``PRAGMA data_version`` and so drops the
rewrite's caches in every worker (proxy/resolver.py); ``flush_s`` and RESOLUTION_S bound those
drops (BENCHMARKS.md measures them). Retention thinks in hours and days, not seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from storage.equivalence import EquivalenceDB

log = logging.getLogger("sstate_proxy.access")

# A key written less than this long ago is not written again (see the module docstring).
RESOLUTION_S = 60.0
# Past this many remembered writes, the ones older than RESOLUTION_S are forgotten at a flush.
WRITTEN_MAX = 100_000
# Bound on the final flush at shutdown (a database that does not answer must not hold the exit).
STOP_FLUSH_TIMEOUT_S = 5.0


class AccessRecorder:
    """Batches last-access times of served objects into the catalog (see the module docstring)."""

    def __init__(self, db: EquivalenceDB, *, flush_s: float = 5.0, enabled: bool = True) -> None:
        self.db = db
        self.flush_s = flush_s
        self.enabled = enabled
        self._pending: dict[str, float] = {}
        self._written: dict[str, float] = {}  # key -> the access time last written for it
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0  # batches written (tests and benchmarks read it)
        self._failing = False

    def touch(self, key: str) -> None:
        """``key`` was served now: a dict write (the flush task writes it to the database)."""
        if self.enabled:
            now = time.time()
            if self._written.get(key, 0.0) > now - RESOLUTION_S:
                return  # written recently enough
            if not self._pending:
                self._due.set()
            self._pending[key] = now

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="access-recorder")

    async def _run(self) -> None:
        while True:
            await self._due.wait()
            await asyncio.sleep(self.flush_s)  # let the batch fill: one commit per interval
            self._due.clear()
            await self.flush()
            if self._pending:  # a failed flush kept its entries, or touches came meanwhile
                self._due.set()

    async def flush(self) -> None:
        """Write every pending access now (one transaction)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self.db.touch_objects(batch)
        except asyncio.CancelledError:
            self._keep(batch)  # stop() writes it
            raise
        except Exception as exc:  # the database is unavailable: keep the batch for the next flush
            self._keep(batch)
            if not self._failing:
                log.warning("recording object access failed (%s); keeping %d entries for later",
                            exc, len(self._pending))
            self._failing = True
            return
        if self._failing:
            log.info("recording object access works again")
        self._failing = False
        self.flushes += 1
        self._written.update(batch)
        if len(self._written) > WRITTEN_MAX:
            cutoff = time.time() - RESOLUTION_S
            self._written = {k: t for k, t in self._written.items() if t > cutoff}

    async def published(self, key: str, size: int) -> None:
        """``key`` (``size`` bytes) was stored by a PUT: catalogued as 'local' now. A database
        fault is logged, not raised (the object is stored; gc falls back to its mtime)."""
        if not self.enabled:
            return
        try:
            await self.db.record_object(key, size, "local", time.time())
        except Exception as exc:
            log.warning("cataloguing %s failed: %s", key, exc)

    async def removed(self, key: str) -> None:
        """``key`` was deleted (DELETE): its catalog row goes and other processes' store caches
        learn of it through the removal log (always, even with recording off)."""
        try:
            await self.db.forget_objects([key])
        except Exception as exc:
            log.warning("logging the removal of %s failed: %s", key, exc)

    def _keep(self, batch: dict[str, float]) -> None:
        for key, when in batch.items():
            if self._pending.get(key, 0.0) < when:
                self._pending[key] = when

    async def stop(self) -> None:
        """Stop the flush task and write what is pending."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await asyncio.wait_for(self.flush(), STOP_FLUSH_TIMEOUT_S)
        except TimeoutError:
            log.warning("dropping %d unrecorded object accesses at shutdown (database too slow)",
                        len(self._pending))
