"""Archive-identity dedup: an ObjectStore that keeps equal sstate archives once.

``DedupStore(inner, db)`` wraps any ObjectStore. After a new ``.tar.zst``/``.tgz`` object is
stored, its archive identity (storage.archive_identity: what the archive restores, not its bytes)
is computed in a small pool of child processes (storage.identity_pool: the tar walk is pure
Python and would hold a serving worker's GIL) and recorded in the database's ``sstate_proxy_archives``
table. When an equal archive is stored already under another key, the new copy's bytes are
deleted again and the key becomes an *alias* of the canonical key: ``stat`` and ``open`` of the
alias answer with the canonical's meta and bytes, so callers see a plain store.

Deleting a canonical object that has aliases *promotes* its oldest alias: the bytes are copied
to the alias's own key first (atomic put), then the database is switched, then the old key is
removed, so every alias keeps working (a crash in between leaves an extra copy, never a hole).

Dedup is an optimisation: when the identity cannot be computed or recorded, the object stays
stored as it was written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import weakref
from collections.abc import AsyncIterator

from storage import Body, ByteStream, LocalFile, Meta, ObjectStore, PutResult
from storage.archive_identity import archive_format
from storage.equivalence import EquivalenceDB
from storage.identity_pool import IdentityPool

log = logging.getLogger("sstate_proxy.dedup")


class DedupStore:
    """An ObjectStore that stores equal archives once (see the module docstring)."""

    def __init__(self, inner: ObjectStore, db: EquivalenceDB, *, record: bool = True) -> None:
        """``record``: dedup new archives (``[storage] dedup``). Off, new objects are stored as
        they are, but aliases recorded earlier are still served and deletes still promote, so
        turning dedup off never makes a stored name disappear."""
        self.inner = inner
        self.db = db
        self.record = record
        # archive identities: decompression, tar walk and sha256, CPU-bound; in child processes
        self._pool = IdentityPool(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)))
        # Serialises "record, then drop the duplicate" and "delete with promotion" in this
        # process, so a duplicate is never dropped while its canonical is being promoted away.
        self._lock = asyncio.Lock()
        # put_file of equal archives at once (import workers): the first stores, the others wait
        # for its bytes and alias them
        self._identity_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # --- reads -------------------------------------------------------------------------------
    async def stat(self, key: str) -> Meta | None:
        meta = await self.inner.stat(key)
        if meta is not None:
            return meta
        canonical = await self.db.archive_alias(key)
        return None if canonical is None else await self.inner.stat(canonical)

    async def open(
        self, key: str, start: int = 0, length: int | None = None, *, allow_redirect: bool = False
    ) -> Body | None:
        body = await self.inner.open(key, start, length, allow_redirect=allow_redirect)
        if body is not None:
            return body
        canonical = await self.db.archive_alias(key)
        if canonical is None:
            return None
        return await self.inner.open(canonical, start, length, allow_redirect=allow_redirect)

    def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """The keys with bytes of their own (aliases are rows of the database, not objects)."""
        return self.inner.keys(prefix)

    def entries(self, prefix: str = "") -> AsyncIterator[tuple[str, Meta]]:
        """The keys with bytes of their own and their meta (aliases are not listed)."""
        return self.inner.entries(prefix)

    # --- writes ------------------------------------------------------------------------------
    async def _existing(self, key: str) -> PutResult | None:
        meta = await self.stat(key)
        return None if meta is None else PutResult(meta, False)

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        size: int | None = None,
        md5: bytes | None = None,
        sha256: bytes | None = None,
        max_size: int | None = None,
    ) -> PutResult:
        existing = await self._existing(key)  # an alias is an existing key: first write wins
        if existing is not None:
            return existing
        result = await self.inner.put(key, chunks, size=size, md5=md5, sha256=sha256, max_size=max_size)
        if not self.record or not result.created or archive_format(key) is None:
            return result
        try:
            canonical = await self._settle(key, await self._identity_of_stored(key), result.meta.size)
        except Exception:  # the object is stored whatever happens here
            log.exception("dedup of %s failed; object kept as written", key)
            return result
        return result if canonical is None else PutResult(result.meta, True, shared_with=canonical)

    async def put_file(self, key: str, path: str, *, link: bool = False) -> PutResult:
        """An equal archive already stored is not stored again (its identity is computed from
        the file before anything is written)."""
        existing = await self._existing(key)
        if existing is not None:
            return existing
        identity = None
        if self.record:
            try:
                identity = await self._identity_of_path(path, key)
            except Exception:  # dedup is an optimisation: store the file as it is
                log.exception("archive identity of %s failed; stored as it is", key)
        if identity is None:
            return await self.inner.put_file(key, path, link=link)
        size = os.stat(path).st_size
        lock = self._identity_locks.get(identity)
        if lock is None:
            lock = self._identity_locks[identity] = asyncio.Lock()
        async with lock:
            async with self._lock:
                canonical = await self.db.record_archive(key, identity, size)
                if canonical != key:
                    meta = await self.inner.stat(canonical)
                    if meta is not None:
                        log.info("dedup: %s has the same archive identity as %s; stored once", key, canonical)
                        return PutResult(meta, True, shared_with=canonical)
                    # the canonical vanished behind our back (removed outside the proxy): take over
                    await self.db.forget_archive(canonical, successor=key)
            return await self.inner.put_file(key, path, link=link)

    async def delete(self, key: str) -> bool:
        """Remove ``key`` (object or alias); promote an alias when ``key`` is canonical."""
        async with self._lock:
            if await self.db.archive_alias(key) is not None:
                await self.db.forget_archive(key)
                await self.inner.delete(key)  # normally absent (the bytes were dropped)
                return True
            aliases = await self.db.archive_aliases(key)
            if aliases and await self.inner.stat(key) is not None:
                successor = aliases[0]
                if await self.inner.stat(successor) is None:
                    await self._copy(key, successor)
                await self.db.forget_archive(key, successor=successor)
                log.info("dedup: %s deleted; its bytes now live under %s (%d alias(es))",
                         key, successor, len(aliases) - 1)
            else:
                await self.db.forget_archive(key)
            return await self.inner.delete(key)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, *, housekeeping: bool = True) -> None:
        await self.inner.start(housekeeping=housekeeping)

    async def check(self) -> None:
        await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()
        self._pool.close()

    # --- the pieces --------------------------------------------------------------------------
    async def _settle(self, key: str, identity: str | None, size: int) -> str | None:
        """``key``'s bytes are stored: record its identity; when an equal archive is stored
        already, drop ``key``'s bytes and return the canonical key that now serves it."""
        if identity is None:
            return None
        async with self._lock:
            canonical = await self.db.record_archive(key, identity, size)
            if canonical == key:
                return None
            if await self.inner.stat(canonical) is None:
                await self.db.forget_archive(canonical, successor=key)  # vanished: take over
                return None
            await self.inner.delete(key)
            log.info("dedup: %s has the same archive identity as %s; stored once", key, canonical)
            return canonical

    async def _identity_of_path(self, path: str, key: str) -> str | None:
        fmt = archive_format(key)
        if fmt is None:
            return None
        return await self._pool.identity(path, fmt)

    async def _identity_of_stored(self, key: str) -> str | None:
        """Identity of the stored object ``key`` (a local file is read in place; other stores'
        bytes are spooled to a temp file first), or None."""
        fmt = archive_format(key)
        if fmt is None:
            return None
        body = await self.inner.open(key, allow_redirect=False)
        if isinstance(body, LocalFile):
            return await self._identity_of_path(body.path, key)
        if not isinstance(body, ByteStream):
            return None
        loop = asyncio.get_running_loop()
        # a named file: the pool's child opens it by its path
        spool = await loop.run_in_executor(None, tempfile.NamedTemporaryFile)
        try:
            async for chunk in body.chunks:
                await loop.run_in_executor(None, spool.write, chunk)
            await loop.run_in_executor(None, spool.flush)
            return await self._pool.identity(spool.name, fmt)
        finally:
            aclose = getattr(body.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            spool.close()

    async def _copy(self, src: str, dst: str) -> None:
        body = await self.inner.open(src, allow_redirect=False)
        if isinstance(body, LocalFile):
            await self.inner.put_file(dst, body.path)
        elif isinstance(body, ByteStream):
            await self.inner.put(dst, body.chunks, size=body.meta.size)
        else:
            raise FileNotFoundError(src)

    def staging_path(self) -> str:
        return self.inner.staging_path()
