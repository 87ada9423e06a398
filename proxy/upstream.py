"""Pull-through upstream sstate mirrors (``[upstream] mirrors``): the HTTP client and its caches.

The resolver decides *which* names to ask for (proxy.resolver.Resolver.upstream_candidates);
this module asks the mirrors, in their configured order, and pulls what they have into the
store:

* ``find(key)``: does a mirror have it (an upstream HEAD)? A HEAD 200 is trusted for
  ``FOUND_TTL_S`` (bitbake sends HEAD, then GET), a 404 for ``negative_ttl_s``.
* ``pull(key, sink)``: GET it into a staging file on the store's filesystem
  (``store.staging_path``), verified against the upstream's Content-Length and fsynced, then
  stored with ``store.put_file(link=True)`` (atomic; a cut transfer is never kept). With a
  ``sink`` (a client's GET) the client is sent that file as it grows (``Spool``: sendfile where
  it can), the head carrying the upstream's length. Concurrent pulls of one key make one
  upstream GET: within a worker the others wait on the leader's future, across the workers of a
  host on a per-key file lock (``KeyLocks``); the waiters then find the object in the store.

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
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
SPOOL_AHEAD = 8 * 1024 * 1024  # bytes a pull may have read from upstream and not yet written
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
    proxy: URL | None = None  # from HTTP_PROXY/HTTPS_PROXY and NO_PROXY, read once at start
    proxy_auth: str | None = field(default=None, repr=False)  # its Proxy-Authorization value, if any

    def url(self, key: str) -> URL:
        # percent-encoded as bitbake sends paths (":" as %3A, "+" as %2B)
        return URL(self.base + "/" + quote(key, safe="/"), encoded=True)

    def request(self, key: str) -> dict:
        """The keyword arguments of an aiohttp request for ``key`` on this mirror."""
        kw: dict = {"url": self.url(key), "auth": self.auth, "proxy": self.proxy, "allow_redirects": True}
        if self.proxy_auth is not None:
            # aiohttp sends proxy_headers only on an https target's CONNECT; a plain http
            # request goes to the proxy itself, which reads the credentials from its headers
            header = {"Proxy-Authorization": self.proxy_auth}
            kw["proxy_headers" if self.base.startswith("https:") else "headers"] = header
        return kw


def _netrc_auth(host: str) -> aiohttp.BasicAuth | None:
    """Credentials for ``host`` from ``~/.netrc`` (or ``$NETRC``), read as wget and curl read it
    (no permission check); an unreadable file is logged and means no credentials."""
    try:
        entry = netrc_entry(host, check_permissions=False)
    except CredentialsError as e:
        log.warning("%s", e)
        return None
    return None if entry is None else aiohttp.BasicAuth(entry[0], entry[1])


def _env_proxy(url: URL) -> tuple[URL | None, str | None]:
    """The proxy the environment names for ``url`` (``http_proxy``/``https_proxy``, unless
    ``no_proxy`` matches its host), as aiohttp's ``trust_env`` would find it, with its
    credentials from its URL or ``~/.netrc``. Read once per mirror: aiohttp's ``trust_env``
    reads the environment and netrc again in a thread on every request, which costs a pull
    more than its upstream's answer on a fast network."""
    if not url.host or urllib.request.proxy_bypass(url.host):
        return None, None
    named = urllib.request.getproxies().get(url.scheme or "")
    if not named:
        return None, None
    proxy = URL(named)
    if proxy.scheme != "http":  # as aiohttp: only plain HTTP proxies (CONNECT for https targets)
        log.warning("upstream mirror %s: %s proxy %s is not supported; connecting directly", url.host,
                    proxy.scheme, proxy.with_user(None))
        return None, None
    if proxy.user is not None:
        auth: aiohttp.BasicAuth | None = aiohttp.BasicAuth(proxy.user, proxy.password or "")
        proxy = proxy.with_user(None)
    else:
        auth = _netrc_auth(proxy.host or "")
    return proxy, None if auth is None else auth.encode()


def parse_mirror(text: str) -> UpstreamMirror:
    """A configured base URL -> the mirror; credentials from the URL, else from ~/.netrc."""
    url = URL(text)
    if url.user is not None:
        auth: aiohttp.BasicAuth | None = aiohttp.BasicAuth(url.user, url.password or "")
        url = url.with_user(None)
    else:
        auth = _netrc_auth(url.host or "")
    proxy, proxy_auth = _env_proxy(url)
    return UpstreamMirror(str(url).rstrip("/"), auth, proxy, proxy_auth)


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

    async def follow(self, spool: Spool) -> None:
        """Send the spool's bytes as they are written, to the last (``spool.wait``); a
        ConnectionError if the client goes away, UpstreamCut if the pull fails."""


class Spool:
    """An upstream body being written to a staging file: how much of it is there, and how the
    pull ended. A client follows it with ``wait`` while the pull writes it."""

    def __init__(self, path: str, size: int | None) -> None:
        self.path = path
        self.size = size  # the upstream's Content-Length (None: chunked)
        self.written = 0  # bytes in the file so far
        self.complete = False  # all ``size`` bytes are there, verified and fsynced
        self.error: BaseException | None = None
        self._changed = asyncio.Event()  # set, and replaced, whenever any of the above changes

    def advance(self, n: int) -> None:
        self.written += n
        self._notify()

    def finish(self) -> None:
        self.complete = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, offset: int) -> int:
        """The bytes in the file once there are more than ``offset`` (or the body is complete);
        raises UpstreamCut when the pull failed (a client must never take a part for the whole)."""
        while not (self.written > offset or self.complete or self.error is not None):
            await self._changed.wait()
        if self.error is not None:
            raise UpstreamCut("the upstream transfer failed") from self.error
        return self.written


def _write_all(fd: int, pieces: list[bytes]) -> int:
    """Write every piece (a regular file takes a write whole, short writes are looped over
    anyway); the bytes written."""
    for data in pieces:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return sum(map(len, pieces))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
                trust_env=False,  # the environment's proxies are read once (parse_mirror)
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
                async with self._client().head(**m.request(key)) as r:
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
        (this worker) or holding its lock (another process) is waited for instead.

        The lock and the waiters are let go as soon as the object is stored; only then does
        this call wait for its own client to have the last byte, so a slow or stalled client
        holds no one else's pull."""
        if self.known_missing(key):
            return Pulled("notfound")
        running = self._pulls.get(key)
        if running is not None:
            return Pulled(await asyncio.shield(running))
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pulls[key] = done
        status = "error"
        try:
            result, client = await self._lead(key, sink)
            status = result.status
        finally:
            del self._pulls[key]
            done.set_result(status)
        if client is not None:
            await client  # a ConnectionError: our client left (the object is stored all the same)
        return result

    async def _lead(self, key: str, sink: Sink | None) -> tuple[Pulled, asyncio.Task[None] | None]:
        async with self.locks.hold(key):
            if await self.store.stat(key) is not None:  # another process pulled it meanwhile
                return Pulled("stored"), None
            outcome = "notfound"
            for i in self._order(key):
                if not self._usable(i):
                    outcome = "error"
                    continue
                m = self.mirrors[i]
                try:
                    r = await self._client().get(**m.request(key))
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
                        pulled, client = await self._receive(key, i, r, sink)
                    except UpstreamCut:
                        self._count("error")
                        raise
                self._count("fetched" if pulled.status == "stored" else "error")
                return pulled, client
            self._count("missing" if outcome == "notfound" else "error")
            if outcome == "notfound":
                self._found.pop(key, None)
                _remember(self._missing, key, time.monotonic() + self.negative_ttl)
            return Pulled(outcome), None

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

    async def _receive(self, key: str, i: int, r: aiohttp.ClientResponse, sink: Sink | None
                       ) -> tuple[Pulled, asyncio.Task[None] | None]:
        """The upstream body into a staging file (``store.staging_path``: on the store's own
        filesystem for the local store), verified against the upstream's length and fsynced,
        then stored by ``put_file(link=True)`` (a link, no copy). With a sink and a length, the
        client is sent the file as it grows, by a task of its own (returned, not awaited: the
        pull does not wait for its client); a chunked answer has no length to promise the
        client up front, so it is stored first and then served from the store."""
        base = self.mirrors[i].base
        asked = time.time()  # the object's last access in the catalog (before the client's head)
        size = r.content_length
        spool = Spool(self.store.staging_path(), size)
        client: asyncio.Task[None] | None = None
        try:
            fd = os.open(spool.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                if sink is not None and size is not None:
                    client = await self._start_client(key, sink, spool)
                await self._spool_body(r, fd, spool)
            finally:
                os.close(fd)
        except (*_FAILURES, asyncio.CancelledError) as e:
            spool.fail(e)
            _unlink(spool.path)
            if isinstance(e, asyncio.CancelledError):
                if client is not None:
                    client.cancel()
                raise
            if client is None:
                log.warning("upstream mirror %s: GET %s cut short (%s: %s); nothing kept", base, key,
                            type(e).__name__, e)
                return Pulled("error"), None
            log.warning("upstream mirror %s: GET %s cut short (%s: %s); nothing kept, client cut", base, key,
                        type(e).__name__, e)
            with contextlib.suppress(UpstreamCut, OSError):
                await client  # it stops at once: the spool failed (or its file is gone already)
            raise UpstreamCut(f"upstream transfer of {key} failed") from e
        spool.finish()
        try:
            result = await self.store.put_file(key, spool.path, link=True)
        except Exception:
            # The client still gets the whole, verified body from the staging file.
            log.exception("upstream pull of %s: cannot store it", key)
            return Pulled("error", streamed=client is not None), client
        finally:
            _unlink(spool.path)
        await self._stored(key, result, asked)
        return Pulled("stored", streamed=client is not None), client

    async def _start_client(self, key: str, sink: Sink, spool: Spool) -> asyncio.Task[None] | None:
        """The client's head, then a task sending it the spool; None if the client is gone
        already (the pull goes on without it)."""
        assert spool.size is not None
        try:
            await sink.start(spool.size)
        except ConnectionError as e:
            log.info("upstream pull of %s: client gone before the head (%s); storing it anyway", key,
                     type(e).__name__)
            return None
        return asyncio.get_running_loop().create_task(sink.follow(spool), name=f"upstream-client {key}")

    async def _spool_body(self, r: aiohttp.ClientResponse, fd: int, spool: Spool) -> None:
        """Write the body to ``fd`` as it arrives, telling ``spool`` what is on disk; verify the
        length; fsync. Writes run in a thread, one at a time, each taking every piece that came
        while the one before ran (so a thread hop per piece is not the pace of a fast upstream);
        the upstream is read meanwhile, at most SPOOL_AHEAD bytes ahead of the disk."""
        loop = asyncio.get_running_loop()
        received = 0
        pending: list[bytes] = []
        write: asyncio.Future[int] | None = None

        def written(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is None:
                spool.advance(f.result())

        async for data, _ in r.content.iter_chunks():
            if not data:
                continue
            received += len(data)
            if spool.size is not None and received > spool.size:
                raise DigestMismatch(f"received more than the announced {spool.size} bytes")
            pending.append(data)
            if write is not None:
                if not write.done() and received - spool.written < SPOOL_AHEAD:
                    continue
                await write
            write = loop.run_in_executor(None, _write_all, fd, pending)
            write.add_done_callback(written)
            pending = []
        if write is not None:
            await write
        if pending:
            spool.advance(await loop.run_in_executor(None, _write_all, fd, pending))
        if spool.size is not None and received != spool.size:
            raise DigestMismatch(f"received {received} bytes, announced {spool.size}")
        await loop.run_in_executor(None, os.fsync, fd)  # durable before it is linked as the object

    async def _stored(self, key: str, result: PutResult, asked: float) -> None:
        self._found.pop(key, None)
        self._missing.pop(key, None)
        if result.created:  # not when it was there already (published, or another's pull)
            try:
                await self.cache.added(key, result.meta.size, asked)
            except Exception:  # stored and served all the same; only the cache bound misses it
                log.exception("upstream cache: cannot record pulled object %s", key)
