"""The bounded cache of pulled-through objects, kept in the object catalog.

Objects fetched from an upstream mirror are stored like any other and recorded in the catalog
(``sstate_proxy_objects``) with origin ``'upstream'``. Their bytes together are kept within
``max_bytes``: past it, the least recently used pulled objects (the catalog's ``last_access``,
moved on every hit) are deleted from the store and forgotten. Published objects (PUT, import:
origin ``'local'``) never count and are never evicted here. The catalog is in the database, so
the bound and the access order survive a restart, and every worker and replica sees one cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from storage import ObjectStore, StoreError
from storage.equivalence import EquivalenceDB

log = logging.getLogger("sstate_proxy.cache")

ORIGIN = "upstream"
EVICT_BATCH = 256  # catalog rows read per round of eviction


class PulledCache:
    """Records pulled objects and keeps their total within ``max_bytes`` (0: no bound)."""

    def __init__(self, db: EquivalenceDB, store: ObjectStore, max_bytes: int, *,
                 on_evicted: Callable[[int, int], None] | None = None) -> None:
        self.db = db
        self.store = store
        self.max_bytes = max_bytes
        self.on_evicted = on_evicted  # (objects, bytes) of each round of eviction (the metrics)
        self._task: asyncio.Task[int] | None = None
        self._again = False

    async def start(self, *, housekeeping: bool = True) -> None:
        """One process checks the bound at start (it may have been lowered since the last run)."""
        if housekeeping and self.max_bytes:
            self._kick()

    async def added(self, key: str, size: int, asked: float) -> None:
        """``key`` (``size`` bytes) was just pulled into the store: record it, keep the bound.
        ``asked`` (unix seconds) is its last access: when a client asked for it, not when the
        store finished (a large upload to S3 must not make it newer than objects asked after)."""
        await self.db.record_object(key, size, ORIGIN, asked)
        if self.max_bytes:
            self._kick()

    def _kick(self) -> None:
        """Run ``enforce`` in the background (the client that caused the pull does not wait for
        it); a request while it runs makes it run once more."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._enforce_loop(), name="upstream-cache-bound")

    async def _enforce_loop(self) -> int:
        removed = 0
        while True:
            self._again = False
            try:
                removed += await self.enforce()
            except Exception:  # the next pull tries again
                log.exception("upstream cache: eviction failed")
            if not self._again:
                return removed

    async def enforce(self) -> int:
        """Evict least recently used pulled objects until they total at most ``max_bytes``;
        the number of objects removed."""
        if not self.max_bytes:
            return 0
        removed = 0
        while True:
            _count, used = await self.db.object_usage(ORIGIN)
            excess = used - self.max_bytes
            if excess <= 0:
                return removed
            victims: dict[str, int] = {}
            for row in await self.db.lru_objects(ORIGIN, EVICT_BATCH):
                if excess <= 0:
                    break
                victims[row.key] = row.size
                excess -= row.size
            if not victims:
                return removed
            gone: list[str] = []
            for key in victims:
                try:
                    await self.store.delete(key)
                except StoreError as e:  # kept in the catalog: tried again next time
                    log.warning("upstream cache: cannot evict %s: %s", key, e)
                    continue
                gone.append(key)
            if not gone:
                return removed
            await self.db.forget_objects(gone)
            removed += len(gone)
            if self.on_evicted is not None:
                self.on_evicted(len(gone), sum(victims[key] for key in gone))
            log.info("upstream cache: evicted %d pulled object(s) (bound %d bytes)", len(gone), self.max_bytes)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
