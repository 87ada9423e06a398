"""Where objects live. Knows nothing of HTTP: the mirror speaks HTTP, a store only stores.

The interface is deliberately small (the bazel-remote / attic shape): a backend answers
``stat``, ``open``, ``put``, ``put_file``, ``delete``, ``keys`` and ``entries``. ``open`` returns one of three bodies so
the HTTP layer can pick the cheapest way to send bytes: a local file (sendfile), a URL
(redirect) or an async byte stream.

Keys are relative POSIX paths ("universal/3f/a1/sstate:...tar.zst") that the caller has already
validated (see ``proxy.names.safe_key``); backends still refuse anything that would leave their
root, as a second line of defence.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from storage.equivalence import EquivalenceDB

READ_BLOCK = 1024 * 1024


class StoreError(Exception):
    """A real fault of the backing store (disk error, S3 unreachable): the HTTP layer answers 5xx/503."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; clients should retry later (503 + Retry-After)."""


class NoSpace(StoreError):
    """The store's disk (or quota) is full (ENOSPC, EDQUOT): nothing was stored, reads go on
    (the HTTP layer answers 507 Insufficient Storage)."""


class InvalidKey(ValueError):
    """The key would leave the store's root or is otherwise unusable: a client error (400)."""


class DigestMismatch(ValueError):
    """The uploaded bytes do not match the size or digest the client announced: a client error."""


class TooLarge(ValueError):
    """The upload exceeds the configured maximum size."""


@dataclass(frozen=True, slots=True)
class Meta:
    size: int
    mtime: float  # seconds since the epoch
    etag: str  # opaque, quoted by the HTTP layer


@dataclass(frozen=True, slots=True)
class LocalFile:
    """Body that is a file on local disk: the HTTP layer sends it with sendfile."""

    path: str
    meta: Meta


@dataclass(frozen=True, slots=True)
class RedirectURL:
    """Body that the client should fetch from elsewhere (a presigned URL)."""

    url: str
    meta: Meta


@dataclass(slots=True)
class ByteStream:
    """Body streamed from the backend; ``chunks`` yields exactly the requested range."""

    chunks: AsyncIterator[bytes]
    meta: Meta
    start: int
    length: int


Body = LocalFile | RedirectURL | ByteStream


@dataclass(frozen=True, slots=True)
class PutResult:
    meta: Meta
    created: bool  # False: the key existed already (first write wins, the new body was discarded)
    linked: bool = False  # put_file(link=True) hard-linked the file instead of copying it
    # The key whose stored bytes now serve this one, when the store keeps equal content once
    # (storage.dedup); None when the key has bytes of its own.
    shared_with: str | None = None


async def file_chunks(path: str, block: int = READ_BLOCK) -> AsyncIterator[bytes]:
    """The bytes of a local file, read in the default executor."""
    loop = asyncio.get_running_loop()
    f = await loop.run_in_executor(None, open, path, "rb")
    try:
        while True:
            data = await loop.run_in_executor(None, f.read, block)
            if not data:
                return
            yield data
    finally:
        f.close()


@runtime_checkable
class ObjectStore(Protocol):
    async def start(self, *, housekeeping: bool = True) -> None:
        """Start background work once the event loop runs (the app calls it at start-up, before
        serving): S3 starts building its index (every process needs its own). ``housekeeping``:
        this process also does the once-per-deployment chores (local: remove the temp litter of
        crashed uploads, a walk of the whole tree), so N workers do not walk it N times.
        Returns quickly; the store answers correctly (if more slowly) before that work is done."""

    async def stat(self, key: str) -> Meta | None:
        """Meta of the object, or None if absent. Must be cheap: bitbake's HEAD storms call it."""

    async def open(
        self, key: str, start: int = 0, length: int | None = None, *, allow_redirect: bool = False
    ) -> Body | None:
        """The body of ``key`` (the range [start, start+length) for streams); None if absent."""

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
        """Store atomically: either the whole verified object appears under ``key`` or nothing does.

        Raises DigestMismatch when the received bytes differ from ``size``/``md5``/``sha256``,
        TooLarge past ``max_size``. An existing key is kept (first write wins).
        """

    async def put_file(self, key: str, path: str, *, link: bool = False) -> PutResult:
        """``put`` of a local file's bytes (``sstate-proxy import``). ``link``: hard-link the file
        into the store when the backend keeps files on the same filesystem (``linked`` in the
        result); every backend otherwise copies (S3 uploads it). First write wins."""

    def staging_path(self) -> str:
        """A fresh path (nothing there yet) for a file the caller writes and then stores with
        ``put_file(key, path, link=True)``, removing it afterwards: on the store's own
        filesystem when it keeps files (the link then costs no copy), named as the store's
        temp files (never a key; left by a dead writer, removed by its cleanup); the system's
        temp directory otherwise."""

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""

    def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key under ``prefix`` (no temp files), in no particular order."""

    def entries(self, prefix: str = "") -> AsyncIterator[tuple[str, Meta]]:
        """Every key under ``prefix`` with its meta, as ``keys`` lists them (local: a stat per
        file, off the event loop; S3: from the listing itself, no request per object). What
        `sstate-proxy gc` reads the store with."""

    async def check(self) -> None:
        """Raise StoreUnavailable unless the backend answers now (for /readyz): one real round
        trip, never answered from a cache (local: the root directory; S3: HeadBucket)."""

    async def close(self) -> None:
        """Release connections, executors, background tasks."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still write (backends' temp-file cleanup)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    # A zombie (dead, not yet reaped: a killed supervisor's workers wait for init to reap them)
    # writes nothing any more; its temp files are litter.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def open_store(config, db: EquivalenceDB | None = None) -> ObjectStore:
    """Build the store the config names; nothing outside this function knows the backend.

    With a database, the backend is wrapped in a DedupStore (equal archives stored once, see
    storage.dedup; with ``[storage] dedup = false`` new objects are not deduplicated, but
    names stored as aliases earlier keep being served); without one it is returned as it is.
    """
    backend = config.storage.backend
    store: ObjectStore
    if backend == "local":
        from storage.local import LocalStore

        store = LocalStore(config.storage.path)
    elif backend == "s3":
        from storage.s3 import S3Store

        store = S3Store(config.storage.s3, confirm_misses=not config.storage.s3.only_writer, removals=db)
    else:
        raise ValueError(f"unknown storage backend {backend!r}")
    if db is not None:
        from storage.dedup import DedupStore

        return DedupStore(store, db, record=config.storage.dedup)
    return store
