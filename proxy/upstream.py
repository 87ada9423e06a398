"""Pull-through upstream sstate mirrors (``[upstream] mirrors``): the HTTP client and its caches.

The resolver decides *which* names to ask for (proxy.resolver.Resolver.upstream_candidates);
this module asks the mirrors, in their configured order, and pulls what they have into the
store:

* ``find(key)``: does a mirror have it (an upstream HEAD)? A HEAD 200 is trusted for
  ``FOUND_TTL_S`` (bitbake sends HEAD, then GET), a 404 for ``negative_ttl_s``.
* ``pull(key, sink)``: GET it and store it (``store.put``: atomic, verified against the upstream's
  Content-Length, so a cut transfer is never kept). With a ``sink`` (a client's GET) the body
  goes to the client while it is stored, the client's head carrying the upstream's length.
  Concurrent pulls of one key make one upstream GET: within a worker the others wait on the
  leader's future, across the workers of a host on a per-key file lock (``KeyLocks``); the
  waiters then find the object in the store.

Every call is bounded by ``timeout_s`` (connect, and between two reads), so a slow or silent
upstream gives an error within that time, never a hang. A mirror that fails at the connection
level is skipped for ``negative_ttl_s`` (as a miss is remembered). Callers treat "error" like "notfound" (a 404 to the
client); a failure after the client's head went out raises ``UpstreamCut`` (a ConnectionError:
the errors middleware cuts the connection, so a short body is never taken for the whole).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy.config import Config, UpstreamConfig
from proxy.credentials import CredentialsError, netrc_entry
from proxy.metrics import Metrics
from storage import DigestMismatch, ObjectStore, PutResult
from storage.cache import PulledCache

log = logging.getLogger("sstate_proxy.upstream")

FOUND_TTL_S = 60.0  # an upstream HEAD 200 answers the HEADs and the GET that follow it this long
CACHE_ENTRIES = 65536  # per cache (found, missing), per worker
MAX_CONNECTIONS = 32  # upstream connections per worker, all mirrors together
CHUNK = 1024 * 1024  # most bytes read from an upstream at once (a read returns what has come)
CLIENT_QUEUE = 16  # chunks a streamed pull may be ahead of its client
LOCK_THREADS = 8  # threads that may wait for another process's pull of a key
# S3 (and some CDNs) answer 403 for a missing key when listing is not allowed: a miss, as bitbake
# takes it.
NOT_FOUND = frozenset((401, 403, 404, 410))
# Answers a mirror gives for a fault of its own: the pull is an error, the name is not remembered
# as missing.
_FAILURES = (aiohttp.ClientError, TimeoutError, OSError, DigestMismatch)


class UpstreamCut(ConnectionError):
    """The upstream failed after the client's response started: the connection must be cut."""


@dataclass(frozen=True, slots=True)
class UpstreamMirror:
    base: str  # the base URL without credentials and without its trailing slash
    auth: aiohttp.BasicAuth | None

    def url(self, key: str) -> URL:
        # percent-encoded as bitbake sends paths (":" as %3A, "+" as %2B)
        return URL(self.base + "/" + quote(key, safe="/"), encoded=True)


def _netrc_auth(host: str) -> aiohttp.BasicAuth | None:
    """Credentials for ``host`` from ``~/.netrc`` (or ``$NETRC``), read as wget and curl read it
    (no permission check); an unreadable file is logged and means no credentials. Passed as
    ``auth``, not as a header: with ``trust_env`` aiohttp would otherwise look in netrc itself
    and refuse a request that has both."""
    try:
        entry = netrc_entry(host, check_permissions=False)
    except CredentialsError as e:
        log.warning("%s", e)
        return None
    return None if entry is None else aiohttp.BasicAuth(entry[0], entry[1])


def parse_mirror(text: str) -> UpstreamMirror:
    """A configured base URL -> the mirror; credentials from the URL, else from ~/.netrc."""
    url = URL(text)
    if url.user is not None:
        auth: aiohttp.BasicAuth | None = aiohttp.BasicAuth(url.user, url.password or "")
        url = url.with_user(None)
    else:
        auth = _netrc_auth(url.host or "")
    return UpstreamMirror(str(url).rstrip("/"), auth)


@dataclass(frozen=True, slots=True)
class Found:
    key: str
    size: int | None  # None: the mirror's HEAD gave no Content-Length
    mirror: int  # index in the configured list


@dataclass(frozen=True, slots=True)
class Pulled:
    status: str  # "stored" (the object is in the store now) | "notfound" | "error"
    streamed: bool = False  # the whole body went to the sink


class Sink(Protocol):
    """Where a pull sends the body while it stores it (a client's GET response)."""

    async def start(self, size: int) -> None:
        """Send the head, with Content-Length ``size``."""

    async def write(self, chunk: bytes) -> None: ...


def lock_dir_for(cfg: Config) -> str:
    """A private directory for the per-key locks, shared by every process on this host serving
    the same store (so workers, and a second service on the same store, pull a key once)."""
    st = cfg.storage
    if st.backend == "local":
        identity = "local:" + os.path.realpath(st.path)
    else:
        identity = f"s3:{st.s3.endpoint_url}|{st.s3.bucket}|{st.s3.prefix}"
    base = os.path.join(tempfile.gettempdir(), f"sstate-proxy-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{base} is not a private directory of this user; remove it")
    path = os.path.join(base, "upstream-" + hashlib.sha256(identity.encode()).hexdigest()[:16])
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class KeyLocks:
    """An exclusive lock per key across processes: ``flock`` on a file per key.

    The holder removes the file as it lets go; a waiter that then gets the lock of a removed
    file takes the new one instead, so files do not pile up and two holders never overlap.
    A lock free at once is taken on the event loop; waiting happens in a small thread pool.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self._pool = concurrent.futures.ThreadPoolExecutor(LOCK_THREADS, thread_name_prefix="upstream-lock")

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(key.encode()).hexdigest()[:40] + ".lock")

    @staticmethod
    def _acquire(path: str, blocking: bool) -> int | None:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                return fd
            os.close(fd)  # its holder removed it as it let go: lock the file there now

    @staticmethod
    def _release(fd: int, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        path = self._path(key)
        fd = self._acquire(path, blocking=False)
        if fd is None:
            cf = self._pool.submit(self._acquire, path, True)
            try:
                fd = await asyncio.wrap_future(cf)
            except asyncio.CancelledError:
                # the thread still gets the lock: let go of it as soon as it does
                cf.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                     or self._release(f.result(), path))
                raise
        assert fd is not None
        try:
            yield
        finally:
            self._release(fd, path)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _expired(cache: OrderedDict, key: str) -> bool:
    """True if ``key`` has no live entry in a cache of (value, expiry) or expiry values."""
    entry = cache.get(key)
    if entry is None:
        return True
    expiry = entry[1] if isinstance(entry, tuple) else entry
    if expiry > time.monotonic():
        return False
    del cache[key]
    return True


def _remember(cache: OrderedDict, key: str, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > CACHE_ENTRIES:
        cache.popitem(last=False)


class UpstreamMirrors:
    """The configured mirrors of one worker: finds, single-flight pulls, their caches."""

    def __init__(self, cfg: UpstreamConfig, store: ObjectStore, cache: PulledCache, locks: KeyLocks,
                 metrics: Metrics | None = None) -> None:
        self.mirrors = [parse_mirror(m) for m in cfg.mirrors]
        self.metrics = metrics
        self.store = store
        self.cache = cache
        self.locks = locks
        self.timeout_s = cfg.timeout_s
        self.negative_ttl = cfg.negative_ttl_s
        self._session: aiohttp.ClientSession | None = None
        self._down_until = [0.0] * len(self.mirrors)
        self._found: OrderedDict[str, tuple[Found, float]] = OrderedDict()
        self._missing: OrderedDict[str, float] = OrderedDict()
        self._finds: dict[str, asyncio.Future[Found | None]] = {}
        self._pulls: dict[str, asyncio.Future[str]] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            t = self.timeout_s
            self._session = aiohttp.ClientSession(
                # connect: a free pooled connection and the TCP/TLS connect; sock_read: the head,
                # then every read of the body. No total: a big object may take long, if it flows.
                timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                trust_env=True,  # HTTP(S)_PROXY / NO_PROXY
                auto_decompress=False,  # the bytes stored are the bytes sent
                read_bufsize=CHUNK,
                headers={"Accept-Encoding": "identity", "User-Agent": "sstate-proxy"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.locks.close()

    # --- caches ------------------------------------------------------------------------------
    def known_missing(self, key: str) -> bool:
        """Every mirror said 404 for ``key`` within ``negative_ttl_s``."""
        return not _expired(self._missing, key)

    def _usable(self, i: int) -> bool:
        return self._down_until[i] <= time.monotonic()

    def _failed(self, i: int, what: str, e: BaseException) -> None:
        if self._usable(i):
            log.warning("upstream mirror %s: %s failed (%s: %s); skipped for %g s", self.mirrors[i].base,
                        what, type(e).__name__, e, self.negative_ttl)
        self._down_until[i] = time.monotonic() + self.negative_ttl

    def _order(self, key: str) -> list[int]:
        """Mirror indexes to try for ``key``: the one a recent HEAD found it on first."""
        order = list(range(len(self.mirrors)))
        if not _expired(self._found, key):
            first = self._found[key][0].mirror
            order.remove(first)
            order.insert(0, first)
        return order

    # --- HEAD --------------------------------------------------------------------------------
    async def find(self, key: str) -> Found | None:
        """Which mirror has ``key`` (the first in order that does), or None."""
        if not _expired(self._found, key):
            return self._found[key][0]
        if self.known_missing(key):
            return None
        running = self._finds.get(key)
        if running is None:
            running = self._finds[key] = asyncio.ensure_future(self._find(key))
            running.add_done_callback(lambda _f: self._finds.pop(key, None))
        return await asyncio.shield(running)  # one requester leaving does not stop the others'

    async def _find(self, key: str) -> Found | None:
        everywhere = True  # every mirror answered "not found"
        for i, m in enumerate(self.mirrors):
            if not self._usable(i):
                everywhere = False
                continue
            try:
                async with self._client().head(m.url(key), auth=m.auth, allow_redirects=True) as r:
                    status, size = r.status, r.content_length
            except _FAILURES as e:
                self._failed(i, "HEAD", e)
                everywhere = False
                continue
            if status == 200:
                found = Found(key, size, i)
                _remember(self._found, key, (found, time.monotonic() + FOUND_TTL_S))
                return found
            if status not in NOT_FOUND:
                log.warning("upstream mirror %s: HEAD %s: status %d", m.base, key, status)
                everywhere = False
        if everywhere:
            _remember(self._missing, key, time.monotonic() + self.negative_ttl)
        return None

    # --- GET ---------------------------------------------------------------------------------
    async def pull(self, key: str, sink: Sink | None = None) -> Pulled:
        """Bring ``key`` into the store from the first mirror that has it. With ``sink``, the
        body goes to it while it is stored (``streamed``); a pull already running for ``key``
        (this worker) or holding its lock (another process) is waited for instead."""
        if self.known_missing(key):
            return Pulled("notfound")
        running = self._pulls.get(key)
        if running is not None:
            return Pulled(await asyncio.shield(running))
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pulls[key] = done
        status = "error"
        try:
            result = await self._lead(key, sink)
            status = result.status
            return result
        finally:
            del self._pulls[key]
            done.set_result(status)

    async def _lead(self, key: str, sink: Sink | None) -> Pulled:
        async with self.locks.hold(key):
            if await self.store.stat(key) is not None:  # another process pulled it meanwhile
                return Pulled("stored")
            outcome = "notfound"
            for i in self._order(key):
                if not self._usable(i):
                    outcome = "error"
                    continue
                m = self.mirrors[i]
                try:
                    r = await self._client().get(m.url(key), auth=m.auth, allow_redirects=True)
                except _FAILURES as e:
                    self._failed(i, "GET", e)
                    outcome = "error"
                    continue
                async with r:
                    if r.status in NOT_FOUND:
                        continue
                    problem = self._unusable(r)
                    if problem:
                        log.warning("upstream mirror %s: GET %s: %s", m.base, key, problem)
                        outcome = "error"
                        continue
                    try:
                        pulled = await self._receive(key, i, r, sink)
                    except UpstreamCut:
                        self._count("error")
                        raise
                    except ConnectionResetError:  # our client left; the object was stored
                        self._count("fetched")
                        raise
                    self._count("fetched" if pulled.status == "stored" else "error")
                    return pulled
            self._count("missing" if outcome == "notfound" else "error")
            if outcome == "notfound":
                self._found.pop(key, None)
                _remember(self._missing, key, time.monotonic() + self.negative_ttl)
            return Pulled(outcome)

    def _count(self, result: str) -> None:
        """One object asked of the mirrors (a pull another process had already done is not)."""
        if self.metrics is not None:
            self.metrics.upstream_fetch(result)

    @staticmethod
    def _unusable(r: aiohttp.ClientResponse) -> str | None:
        """Why an upstream answer cannot be stored as the object, or None."""
        if r.status != 200:
            return f"status {r.status}"
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return f"Content-Encoding {encoding} (asked for identity)"
        if r.content_length is None and "chunked" not in r.headers.get("Transfer-Encoding", "").lower():
            return "no Content-Length and not chunked: a cut transfer could not be told from the end"
        return None

    async def _receive(self, key: str, i: int, r: aiohttp.ClientResponse, sink: Sink | None) -> Pulled:
        base = self.mirrors[i].base
        size = r.content_length
        if sink is None or size is None:
            # Stored first, then served from the store (a chunked answer has no length to
            # promise the client up front).
            try:
                result = await self.store.put(key, r.content.iter_chunked(CHUNK), size=size)
            except _FAILURES as e:
                log.warning("upstream mirror %s: GET %s cut short (%s: %s); nothing kept", base, key,
                            type(e).__name__, e)
                return Pulled("error")
            await self._stored(key, result)
            return Pulled("stored")

        # The client is written to by a task of its own, fed through a bounded queue: the
        # upstream read, the store's writes and the client's socket overlap instead of taking
        # turns; a client CLIENT_QUEUE chunks behind slows the pull down (memory stays bounded).
        client_ok = True
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)

        async def to_client() -> None:
            nonlocal client_ok
            while (chunk := await queue.get()) is not None:
                if not client_ok:
                    continue
                try:
                    # A client that stops reading must not hold the pull (and its waiters)
                    # hostage: it is dropped, the object is still stored.
                    async with asyncio.timeout(self.timeout_s):
                        await sink.write(chunk)
                except (ConnectionError, TimeoutError) as e:
                    client_ok = False
                    log.info("upstream pull of %s: client dropped (%s); storing it anyway", key, type(e).__name__)

        async def tee() -> AsyncIterator[bytes]:
            async for chunk in r.content.iter_chunked(CHUNK):
                await queue.put(chunk)
                yield chunk

        await sink.start(size)
        writer = asyncio.get_running_loop().create_task(to_client())
        chunks = tee()
        try:
            result = await self.store.put(key, chunks, size=size)
            # put returns without reading when the key was stored meanwhile (another replica):
            # the client still gets the whole upstream body
            async for _ in chunks:
                pass
            await queue.put(None)
            await writer
        except _FAILURES as e:
            log.warning("upstream mirror %s: GET %s cut short (%s: %s); nothing kept, client cut", base, key,
                        type(e).__name__, e)
            raise UpstreamCut(f"upstream transfer of {key} failed") from e
        finally:
            writer.cancel()
            await chunks.aclose()
        await self._stored(key, result)
        if not client_ok:
            raise ConnectionResetError("client went away during the pull (object stored)")
        return Pulled("stored", streamed=True)

    async def _stored(self, key: str, result: PutResult) -> None:
        self._found.pop(key, None)
        self._missing.pop(key, None)
        if result.created:  # not when it was there already (published, or another's pull)
            try:
                await self.cache.added(key, result.meta.size)
            except Exception:  # stored and served all the same; only the cache bound misses it
                log.exception("upstream cache: cannot record pulled object %s", key)
