"""The rewrite: which stored object answers a request for an sstate name.

A request for hash H that is not stored is answered with the object of an equivalent hash
(the unihash of H, then the other members of H's class, newest first). The answer is cached:
positive answers until the equivalence database changes (any process: ``db.generation()`` is
polled at most every ``GENERATION_POLL_S``; writes in this process call ``invalidate()`` at
once), negative answers for ``negative_ttl_s`` at most. HEAD and GET share this cache, so they
give the same answer for one path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from proxy.config import EquivalenceConfig
from proxy.names import SstateName
from storage import Meta, ObjectStore
from storage.equivalence import EquivalenceDB

GENERATION_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Resolution:
    key: str  # the key actually served
    meta: Meta
    served_hash: str
    source: str  # "hit" | "equivalent"


class Resolver:
    def __init__(self, db: EquivalenceDB, store: ObjectStore, cfg: EquivalenceConfig) -> None:
        self.db = db
        self.store = store
        self.methods = cfg.methods
        self.limit = cfg.class_limit
        self.negative_ttl = cfg.negative_ttl_s
        self.max_entries = cfg.cache_entries
        # requested key -> (served key, served hash, source), valid until the generation changes
        self._positive: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        # requested key -> monotonic expiry
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._generation: int | None = None
        self._next_poll = 0.0

    def invalidate(self) -> None:
        """Forget every cached answer (called after a write in this process)."""
        self._positive.clear()
        self._negative.clear()
        self._next_poll = 0.0

    async def _check_generation(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + GENERATION_POLL_S
        gen = await self.db.generation()
        if gen != self._generation:
            self._generation = gen
            self._positive.clear()
            self._negative.clear()

    async def resolve(self, key: str, name: SstateName | None) -> Resolution | None:
        """The object to serve for ``key``, or None (a miss)."""
        if name is not None and self._positive:
            # A known rewrite first: it saves the failing stat of ``key`` on every HEAD of a
            # rewritten path. If ``key`` itself is stored later, the equivalent object stays a
            # valid answer until the cache is dropped (an upload here drops it at once).
            await self._check_generation()
            cached = self._positive.get(key)
            if cached is not None:
                served_key, served_hash, source = cached
                meta = await self.store.stat(served_key)
                if meta is not None:
                    return Resolution(served_key, meta, served_hash, source)
                del self._positive[key]
        meta = await self.store.stat(key)
        if meta is not None:
            return Resolution(key, meta, name.hash if name else "", "hit")
        if name is None:
            return None
        await self._check_generation()
        expiry = self._negative.get(key)
        if expiry is not None:
            if expiry > time.monotonic():
                return None
            del self._negative[key]
        found = await self._search(name) if self.limit > 0 else None
        if found is None:
            self._remember(self._negative, key, time.monotonic() + self.negative_ttl)
            return None
        self._remember(self._positive, key, (found.key, found.served_hash, found.source))
        return found

    async def _search(self, name: SstateName) -> Resolution | None:
        candidates = await self.db.class_of(name.hash, self.methods, self.limit)
        if not candidates:
            return None
        if name.companion:
            # A companion (.siginfo/.sig) follows its object: prefer the hash whose object is
            # served for the object's own name, so the pair always matches.
            obj = name.with_hash(name.hash)
            obj_res = self._positive.get(obj.object_key)
            if obj_res is not None and obj_res[2] == "equivalent":
                preferred = obj_res[1]
                candidates = [preferred] + [c for c in candidates if c != preferred]
            else:
                for cand in candidates:
                    if await self.store.stat(name.with_hash(cand).object_key) is not None:
                        candidates = [cand] + [c for c in candidates if c != cand]
                        break
        for cand in candidates:
            cand_key = name.with_hash(cand).key
            meta = await self.store.stat(cand_key)
            if meta is not None:
                return Resolution(cand_key, meta, cand, "equivalent")
        return None

    def _remember(self, cache: OrderedDict, key: str, value) -> None:
        cache[key] = value
        if len(cache) > self.max_entries:
            cache.popitem(last=False)
