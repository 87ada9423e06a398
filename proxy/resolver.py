"""The rewrite: which stored object answers a request for an sstate name.

A request for hash H that is not stored is answered with the object of an equivalent hash
(the unihash of H, then the other members of H's class, newest first). The answer is cached:
positive answers until the equivalence database changes (any process: ``db.generation()`` is
polled at most every ``GENERATION_POLL_S``; writes in this process call ``changed()``,
``stored()`` or ``invalidate()`` at once), negative answers for ``negative_ttl_s`` at most.
HEAD and GET share this cache, so they give the same answer for one path.

Most misses of a fleet are of hashes the database has never heard of (nobody built that task
yet). Their class can only change by a mapping that names the hash, so such misses are kept
across database changes: on each change the new mappings are read (``db.mappings_since``) and
only the misses of the hashes they name are dropped. Under a steady stream of reports this keeps
bitbake's second HEAD of a miss (it asks twice) from repeating the look-ups. Misses of hashes
with a class are dropped on every change, as the positive answers are.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import EquivalenceConfig
from proxy.names import SstateName
from storage import Meta, ObjectStore
from storage.equivalence import EquivalenceDB

GENERATION_POLL_S = 0.2
# Cached misses per unknown hash (an object's name, its companions, a few tasks of one hash);
# the bound keeps a client inventing names around one hash from growing one entry forever.
KEYS_PER_HASH = 64
# The method asked of an upstream hashserv when [equivalence] methods is empty (bitbake's default).
DEFAULT_METHOD = "oe.sstatesig.OEOuthashBasic"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A name to ask the upstream mirrors for."""

    key: str
    hash: str  # "" for a name without one


@dataclass(frozen=True, slots=True)
class Resolution:
    key: str  # the key actually served
    meta: Meta
    served_hash: str
    source: str  # "hit" | "equivalent" | "upstream"
    # Not in the store (yet): the bytes are upstream, under the first of these that has them.
    pending: tuple[Candidate, ...] = ()


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
        # requested key -> monotonic expiry: misses of hashes with a class
        self._negative: OrderedDict[str, float] = OrderedDict()
        # hash -> {requested key: monotonic expiry}: misses of hashes the database does not know
        self._unknown: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._feed: int | None = None  # db.mappings_since position (None: not read yet)
        self._generation: int | None = None
        self._next_poll = 0.0
        # The upstream hashserv (Reporter.get, which stores what it learns), when the upstream
        # mirrors and [hashserv] upstream are both configured; see use_upstream_hashserv.
        self._ask_upstream: Callable[[str, str], Awaitable[Any]] | None = None
        self._upstream_methods = self.methods or (DEFAULT_METHOD,)
        self._upstream_ttl = 0.0
        # hash -> monotonic expiry: the upstream hashserv knew no other unihash for it
        self._upstream_unknown: OrderedDict[str, float] = OrderedDict()

    def use_upstream_hashserv(self, ask: Callable[[str, str], Awaitable[Any]], negative_ttl_s: float) -> None:
        """Ask ``ask(method, taskhash)`` (a mapping row or None) for the unihash of a hash that
        nothing local answers, before the upstream mirrors are asked; "none" is remembered for
        ``negative_ttl_s``."""
        self._ask_upstream = ask
        self._upstream_ttl = negative_ttl_s

    def invalidate(self) -> None:
        """Forget every cached answer (called after a removal in this process)."""
        self._positive.clear()
        self._negative.clear()
        self._unknown.clear()
        self._next_poll = 0.0

    def changed(self) -> None:
        """This process committed a change to the equivalence data (a report, a removal): the
        next request looks at the database at once (its generation has moved, and the new
        mappings name the cached misses they touch)."""
        self._next_poll = 0.0

    def stored(self, hash_: str) -> None:
        """An object of hash ``hash_`` ("" for a name without one) was just stored in this
        process (an upload, a pull): forget the answers it can change. The positive ones (a
        rewrite of that very name is now a hit) and the misses of hashes with a class (the hash
        may be in it); of the unknown hashes' misses, only its own hash's."""
        self._positive.clear()
        self._negative.clear()
        if hash_:
            self._unknown.pop(hash_, None)
        self._next_poll = 0.0

    async def _check_generation(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + GENERATION_POLL_S
        gen = await self.db.generation()
        if gen == self._generation:
            return
        self._generation = gen
        self._positive.clear()
        self._negative.clear()
        start = self._feed
        try:
            self._feed, named = await self.db.mappings_since(start)
        except Exception:  # cannot tell what changed: forget it all (the answer is still right)
            self._feed, named = None, None
        if named is None or start is None:  # overflow, failure, or no position to compare with
            self._unknown.clear()
            return
        for h in named:
            self._unknown.pop(h, None)

    def _known_miss(self, key: str, hash_: str) -> bool:
        """``key`` missed within the negative TTL and nothing since can have changed that."""
        expiry = self._negative.get(key)
        if expiry is None:
            keys = self._unknown.get(hash_)
            expiry = None if keys is None else keys.get(key)
            if expiry is None:
                return False
            if expiry > time.monotonic():
                return True
            del keys[key]
            if not keys:
                del self._unknown[hash_]
            return False
        if expiry > time.monotonic():
            return True
        del self._negative[key]
        return False

    def _remember_miss(self, key: str, hash_: str, known: bool) -> None:
        expiry = time.monotonic() + self.negative_ttl
        if known:
            self._remember(self._negative, key, expiry)
            return
        keys = self._unknown.get(hash_)
        if keys is None:
            self._remember(self._unknown, hash_, {key: expiry})
            return
        if len(keys) >= KEYS_PER_HASH:  # names differing only outside the hash: a client's churn
            keys.clear()
        keys[key] = expiry

    async def resolve(self, key: str, name: SstateName | None) -> Resolution | None:
        """The object to serve for ``key``, or None (a miss)."""
        if name is not None:
            await self._check_generation()
            if self._positive:
                # A known rewrite first: it saves the failing stat of ``key`` on every HEAD of
                # a rewritten path. If ``key`` itself is stored later, the equivalent object
                # stays a valid answer until the cache is dropped (an upload here drops it).
                cached = self._positive.get(key)
                if cached is not None:
                    served_key, served_hash, source = cached
                    meta = await self.store.stat(served_key)
                    if meta is not None:
                        return Resolution(served_key, meta, served_hash, source)
                    del self._positive[key]
            # A recent miss before the stat: bitbake asks every miss twice in a row. An object
            # stored under ``key`` by another process is seen when the miss expires.
            if self._known_miss(key, name.hash):
                return None
        meta = await self.store.stat(key)
        if meta is not None:
            return Resolution(key, meta, name.hash if name else "", "hit")
        if name is None:
            return None
        candidates = await self.db.class_of(name.hash, self.methods, self.limit) if self.limit > 0 else []
        found = await self._search(name, candidates)
        if found is None:
            self._remember_miss(key, name.hash, known=bool(candidates))
            return None
        self._remember(self._positive, key, (found.key, found.served_hash, found.source))
        return found

    async def _search(self, name: SstateName, candidates: list[str] | None = None) -> Resolution | None:
        """The first stored object of ``name``'s class (``candidates``: the class, when the
        caller has read it)."""
        if candidates is None:
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

    # --- the upstream step ------------------------------------------------------------------
    async def upstream_candidates(self, key: str, name: SstateName | None
                                  ) -> tuple[Resolution | None, list[Candidate]]:
        """After ``resolve`` missed: what to ask the upstream mirrors for, in order: the
        asked-for name, then its equivalent names (at most ``class_limit``).

        With an upstream hashserv, the unihash it knows for the hash is learnt first (and stored
        in the database); when that object is in the store it answers (the Resolution, source
        "equivalent", and no candidates)."""
        if name is None:
            return None, [Candidate(key, "")]
        if (self._ask_upstream is not None and self.limit > 0 and name.hash != "INVALID"
                and await self._learn_upstream(name.hash)):
            found = await self._search(name)
            if found is not None:
                self._negative.pop(key, None)
                self._unknown.pop(name.hash, None)
                self._remember(self._positive, key, (found.key, found.served_hash, found.source))
                return found, []
        hashes = [name.hash]
        if self.limit > 0:
            for cand in await self.db.class_of(name.hash, self.methods, self.limit):
                if cand not in hashes:
                    hashes.append(cand)
            hashes = hashes[:1 + self.limit]
        if name.companion and len(hashes) > 1:
            # a companion follows its object: its hash first if the object is stored (pulled)
            for cand in hashes:
                if await self.store.stat(name.with_hash(cand).object_key) is not None:
                    hashes = [cand] + [c for c in hashes if c != cand]
                    break
        return None, [Candidate(name.with_hash(h).key, h) for h in hashes]

    async def _learn_upstream(self, taskhash: str) -> bool:
        """True if the upstream hashserv maps ``taskhash`` to another unihash (now stored)."""
        assert self._ask_upstream is not None
        expiry = self._upstream_unknown.get(taskhash)
        if expiry is not None:
            if expiry > time.monotonic():
                return False
            del self._upstream_unknown[taskhash]
        for method in self._upstream_methods:
            row = await self._ask_upstream(method, taskhash)
            if isinstance(row, dict) and row.get("unihash") not in (None, taskhash):
                return True
        self._remember(self._upstream_unknown, taskhash, time.monotonic() + self._upstream_ttl)
        return False

    def _remember(self, cache: OrderedDict, key: str, value) -> None:
        cache[key] = value
        if len(cache) > self.max_entries:
            cache.popitem(last=False)
