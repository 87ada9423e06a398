"""Local-disk object store: atomic writes (temp file + link), sendfile-able reads.

Layout: the key is the path below ``root`` ("universal/3f/a1/sstate:...tar.zst"), so an
existing sstate-cache directory can be served as is, and the store can be handed back to
bitbake (``SSTATE_DIR``) or to nginx.

Writes go to ``.tmp-<tag>.<pid>.<random>`` in the target's own directory, are verified and
fsynced, then ``link()``ed to the final name: the link is atomic and never overwrites, so the
first complete write wins and a reader never sees a partial object. Names beginning with
``.tmp-`` are never keys (``check_key`` refuses them, ``keys()`` skips them), so the mirror can
never expose a temp file.

Key checks are a second line of defence (the HTTP layer validates names first): ``check_key``
refuses anything that is not a plain relative path, and every path is checked, after resolving
symlinks, to stay below the real root. Symlinks inside the root are followed (an operator may
dedupe with them); one that leads outside makes the key absent (stat/open/delete) or invalid
(put).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import logging
import os
import secrets
import socket
import stat as stat_mod
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from storage import (
    Body,
    DigestMismatch,
    InvalidKey,
    LocalFile,
    Meta,
    NoSpace,
    PutResult,
    StoreError,
    StoreUnavailable,
    TooLarge,
    file_chunks,
    pid_alive,
)

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
TEMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
WRITE_BLOCK = 1024 * 1024  # bytes handed to the I/O thread per write

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def check_key(key: str) -> list[str]:
    """The segments of ``key``, or InvalidKey when it is not a plain relative POSIX path.

    Shared by every backend (S3 applies the same rules, so a key valid on one store is valid on
    all of them).
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("empty key")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey("key is not valid UTF-8") from None
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(f"key longer than {MAX_KEY_BYTES} bytes")
    if "\x00" in key:
        raise InvalidKey("NUL in key")
    if "\\" in key:
        raise InvalidKey("backslash in key")
    if key[0] == "/":
        raise InvalidKey("absolute key")
    parts = key.split("/")
    for p in parts:
        if p == "" or p == "." or p == "..":
            raise InvalidKey(f"bad path segment {p!r} in key")
        if p.startswith(TEMP_PREFIX):
            raise InvalidKey("key segment uses the reserved temp prefix")
        if len(p) > MAX_SEGMENT_BYTES // 4 and len(p.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKey(f"key segment longer than {MAX_SEGMENT_BYTES} bytes")
    return parts


def _meta(st: os.stat_result) -> Meta:
    # nginx derives its ETag from mtime and size; the inode makes a replaced file with the same
    # size and mtime (restore from backup) still count as different. Unquoted: the HTTP layer quotes.
    return Meta(st.st_size, st.st_mtime, f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}")


def _instance_tag() -> str:
    """Identifies this host + boot + pid namespace, so cleanup can tell whose temp files it sees."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return hashlib.blake2b("|".join(parts).encode(), digest_size=4).hexdigest()


# A full filesystem or an exhausted quota: the write fails, the store itself is fine.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def _write_error(what: str, key: str, e: OSError) -> StoreError:
    if e.errno in _NO_SPACE:
        return NoSpace(f"{what} {key!r}: {e.strerror}")
    return StoreError(f"{what} {key!r}: {e.strerror}")


class _StreamError(Exception):
    """Carries an OSError raised by the caller's chunk iterator past our own OSError handling."""

    def __init__(self, error: OSError) -> None:
        self.error = error


class _TempWrite:
    """One ``put``'s temp file, driven from the I/O pool one step at a time (never two at once).

    Every blocking call of a write runs here, off the event loop: creating the directory and the
    temp file, hashing (hashlib drops the GIL on big buffers), writing, fsync, link, stat. A body
    up to ``WRITE_BLOCK`` takes two trips to the pool (its first chunk, then ``commit``), so the
    loop hands work to a thread and takes it back twice per upload, not once per syscall.
    """

    def __init__(self, store: LocalStore, parts: list[str], md5: bytes | None, sha256: bytes | None) -> None:
        self.store = store
        self.dirparts, self.name = parts[:-1], parts[-1]
        self.md5, self.sha256 = md5, sha256
        self.h_md5 = hashlib.md5() if md5 is not None else None
        self.h_sha = hashlib.sha256() if sha256 is not None else None
        self.dfd = -1
        self.fd = -1
        self.tmp: str | None = None

    def write(self, blocks: list[bytes]) -> None:
        """Append ``blocks`` (the temp file is created by the first call)."""
        if self.fd < 0:
            self.dfd = self.store._open_dir(self.dirparts)
            self.tmp = f"{TEMP_PREFIX}{self.store._tag}.{os.getpid()}.{secrets.token_hex(8)}"
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                              0o664, dir_fd=self.dfd)
        hashers = [h for h in (self.h_md5, self.h_sha) if h is not None]
        for data in blocks:
            for h in hashers:
                h.update(data)
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def commit(self, blocks: list[bytes]) -> tuple[bool, os.stat_result]:
        """Write the last ``blocks``, verify the digests, fsync and link the temp file to its
        name: (created, stat of the name). link() is atomic and never replaces an existing
        name, so the first complete writer wins."""
        self.write(blocks)
        if self.h_md5 is not None and self.h_md5.digest() != self.md5:
            raise DigestMismatch("MD5 of the received bytes does not match")
        if self.h_sha is not None and self.h_sha.digest() != self.sha256:
            raise DigestMismatch("SHA-256 of the received bytes does not match")
        if self.store._fsync:
            os.fsync(self.fd)
        fd, self.fd = self.fd, -1
        os.close(fd)
        try:
            os.link(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd, follow_symlinks=False)
            created = True
        except FileExistsError:
            created = False
        tmp, self.tmp = self.tmp, None
        os.unlink(tmp, dir_fd=self.dfd)
        st = os.stat(self.name, dir_fd=self.dfd, follow_symlinks=False)
        if created and self.store._fsync:
            os.fsync(self.dfd)  # the new name is durable before the caller acknowledges it
        return created, st

    def discard(self) -> None:
        """Remove the temp file if it is still there and close what is open (idempotent)."""
        if self.tmp is not None and self.dfd >= 0:
            try:
                os.unlink(self.tmp, dir_fd=self.dfd)
            except OSError:
                pass
        self.tmp = None
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.dfd = -1


class LocalStore:
    """Objects as files below ``root``. See the module docstring.

    ``open`` returns a :class:`LocalFile` for the whole file whatever range is asked: the HTTP
    layer serves ranges from the file itself (sendfile).
    """

    def __init__(
        self,
        root: str,
        *,
        io_workers: int = 8,
        fsync: bool = True,
        temp_stale_s: float = 3600.0,
    ) -> None:
        os.makedirs(root, exist_ok=True)
        self._root = os.path.realpath(root)
        self._root_slash = self._root if self._root.endswith("/") else self._root + "/"
        self._fsync = fsync
        self._temp_stale_s = temp_stale_s
        self._tag = _instance_tag()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=io_workers, thread_name_prefix="localstore"
        )
        # parent dir (relative) -> (inside the root?, checked at): a stat costs one lstat plus a
        # dict lookup; directories are re-resolved every _DIR_TTL seconds.
        self._dirs: dict[str, tuple[bool, float]] = {}
        self._cleanup_task: asyncio.Task[int] | None = None
        self._closed = False

    _DIR_TTL = 30.0
    _DIR_CACHE_MAX = 200_000

    @property
    def root(self) -> str:
        return self._root

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, *, housekeeping: bool = True) -> None:
        """Remove temp litter of crashed writers, in the background (the walk may be long)."""
        if housekeeping and self._cleanup_task is None:
            self._cleanup_task = asyncio.create_task(self._cleanup_logged(), name="localstore-cleanup")

    async def _cleanup_logged(self) -> int:
        try:
            return await self.cleanup_temp()
        except Exception:
            log.exception("local store: temp cleanup failed")
            return 0

    async def check(self) -> None:
        """The root is a directory we can list and write (stat + access, in a thread)."""

        def probe() -> None:
            if not os.path.isdir(self._root) or not os.access(self._root, os.R_OK | os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, "not an accessible directory", self._root)

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, probe)
        except (OSError, RuntimeError) as e:
            raise StoreUnavailable(f"local store {self._root}: {e}") from e

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cleanup_task is not None and not self._cleanup_task.done():
            self._cleanup_task.cancel()
            try:
                await self._cleanup_task
            except (asyncio.CancelledError, Exception):
                pass
        self._pool.shutdown(wait=False, cancel_futures=False)

    # --- paths ---------------------------------------------------------------------------

    def _inside(self, real: str) -> bool:
        return real == self._root or real.startswith(self._root_slash)

    def _dir_inside(self, reldir: str) -> bool:
        now = time.monotonic()
        hit = self._dirs.get(reldir)
        if hit is not None and now - hit[1] < self._DIR_TTL:
            return hit[0]
        ok = self._inside(os.path.realpath(self._root_slash + reldir))
        if len(self._dirs) >= self._DIR_CACHE_MAX:
            self._dirs.clear()
        self._dirs[reldir] = (ok, now)
        return ok

    def _lookup(self, key: str) -> tuple[str, os.stat_result] | None:
        """(path to open, stat) of a regular file inside the root, or None. Synchronous and cheap."""
        check_key(key)
        path = self._root_slash + key
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES):
                return None
            raise StoreError(f"stat {key!r}: {e.strerror}") from e
        if stat_mod.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not self._inside(real):
                return None
            try:
                st = os.stat(real)
            except OSError:
                return None
            path = real
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        slash = key.rfind("/")
        if slash > 0 and not self._dir_inside(key[:slash]):
            return None
        return path, st

    # --- reads ---------------------------------------------------------------------------

    async def stat(self, key: str) -> Meta | None:
        found = self._lookup(key)
        return None if found is None else _meta(found[1])

    async def open(
        self, key: str, start: int = 0, length: int | None = None, *, allow_redirect: bool = False
    ) -> Body | None:
        found = self._lookup(key)
        if found is None:
            return None
        return LocalFile(found[0], _meta(found[1]))

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Keys below ``prefix`` (a plain string prefix), walking with scandir in the I/O pool.

        Skips temp files, ``*.lock`` files, directories reached through symlinks (loops) and
        symlinks that leave the root.
        """
        async for batch in self._key_batches(prefix, stat=False):
            for k in batch:
                yield k

    async def entries(self, prefix: str = "") -> AsyncIterator[tuple[str, Meta]]:
        """(key, meta) of every key ``keys`` lists; the stats run in the I/O pool too."""
        async for batch in self._key_batches(prefix, stat=True):
            for entry in batch:
                yield entry

    async def _key_batches(self, prefix: str, *, stat: bool) -> AsyncIterator[list]:
        if prefix:
            if "\x00" in prefix or "\\" in prefix or prefix.startswith("/"):
                raise InvalidKey(f"bad prefix {prefix!r}")
            for p in prefix.split("/")[:-1]:
                if p in ("", ".", ".."):
                    raise InvalidKey(f"bad prefix {prefix!r}")
        reldir, _, name_prefix = prefix.rpartition("/")
        top = self._root_slash + reldir if reldir else self._root
        if reldir and not self._inside(os.path.realpath(top)):
            return
        gen = self._walk(top, reldir + "/" if reldir else "", name_prefix, stat)
        loop = asyncio.get_running_loop()

        def take() -> list:
            out: list = []
            for item in gen:
                out.append(item if not stat else (item[0], _meta(item[1])))
                if len(out) >= 1000:
                    break
            return out

        while True:
            batch = await loop.run_in_executor(self._pool, take)
            if not batch:
                return
            yield batch

    def _walk(self, top: str, reltop: str, name_prefix: str, with_stat: bool = False) -> Iterator[Any]:
        """Keys below ``top``; with ``with_stat``, (key, stat of the file) pairs (the walk's own
        lstat, or the target's stat for a symlink)."""
        stack = [(top, reltop, name_prefix)]
        while stack:
            d, rel, only = stack.pop()
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            with it:
                for e in it:
                    name = e.name
                    if name.startswith(TEMP_PREFIX) or name.endswith(LOCK_SUFFIX):
                        continue
                    if only and not name.startswith(only):
                        continue
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((e.path, rel + name + "/", ""))
                        elif e.is_file(follow_symlinks=False):
                            yield (rel + name, e.stat(follow_symlinks=False)) if with_stat else rel + name
                        elif e.is_symlink():
                            real = os.path.realpath(e.path)
                            if self._inside(real) and os.path.isfile(real):
                                yield (rel + name, os.stat(real)) if with_stat else rel + name
                    except OSError:  # gone since the directory was read, say
                        continue

    # --- writes --------------------------------------------------------------------------

    def _open_dir(self, parts: list[str]) -> int:
        """Open (creating as needed) the directory ``parts`` below the root; checks every
        component, resolving symlinks, stays inside the root. Runs in the I/O pool."""
        flags = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC
        cur = self._root
        dfd = os.open(cur, flags)
        try:
            for p in parts:
                try:
                    nfd = os.open(p, flags | _O_NOFOLLOW, dir_fd=dfd)
                except FileNotFoundError:
                    try:
                        os.mkdir(p, 0o775, dir_fd=dfd)
                        if self._fsync:
                            os.fsync(dfd)  # the new directory's entry is durable
                    except FileExistsError:
                        pass
                    nfd = os.open(p, flags | _O_NOFOLLOW, dir_fd=dfd)
                    nxt = cur + "/" + p
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    try:
                        st = os.lstat(p, dir_fd=dfd)
                    except OSError:
                        raise InvalidKey(f"cannot use path component {p!r}") from e
                    if not stat_mod.S_ISLNK(st.st_mode):
                        raise InvalidKey(f"path component {p!r} is a file") from None
                    nxt = os.path.realpath(cur + "/" + p)
                    if not self._inside(nxt):
                        raise InvalidKey("key leads outside the store root through a symlink") from None
                    try:
                        nfd = os.open(nxt, flags | _O_NOFOLLOW)
                    except OSError:
                        raise InvalidKey(f"path component {p!r} is not a directory") from None
                else:
                    nxt = cur + "/" + p
                os.close(dfd)
                dfd, cur = nfd, nxt
            return dfd
        except BaseException:
            os.close(dfd)
            raise

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
        """Atomic, verified write. When ``key`` exists already the call returns at once
        (created=False) without reading ``chunks``: the caller discards the body."""
        parts = check_key(key)
        if size is not None and max_size is not None and size > max_size:
            raise TooLarge(f"announced size {size} exceeds the limit of {max_size} bytes")
        found = self._lookup(key)
        if found is not None:
            return PutResult(_meta(found[1]), False)
        writer = _TempWrite(self, parts, md5, sha256)
        # The trip to the pool in flight: if we are cancelled while a thread still works on the
        # writer's fds, discarding them waits until that thread is done (closing an fd in use
        # could hit a reused fd number).
        inflight: concurrent.futures.Future[Any] | None = None

        async def run(fn: Callable[..., Any], *args: Any) -> Any:
            nonlocal inflight
            inflight = self._pool.submit(fn, *args)
            result = await asyncio.wrap_future(inflight)
            inflight = None
            return result

        try:
            total = 0
            # the body's chunks as they come (no copy), handed to the pool at the first chunk
            # (the temp file exists while the body arrives) and then WRITE_BLOCK at a time
            pending: list[bytes] = []
            npending = 0
            started = False
            it = aiter(chunks)
            while True:
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    break
                except OSError as e:  # the client's stream failed: not a store fault
                    raise _StreamError(e) from e
                if not chunk:
                    continue
                total += len(chunk)
                if max_size is not None and total > max_size:
                    raise TooLarge(f"upload exceeds the limit of {max_size} bytes")
                if size is not None and total > size:
                    raise DigestMismatch(f"received more than the announced {size} bytes")
                pending.append(chunk)
                npending += len(chunk)
                if npending >= WRITE_BLOCK or not started:
                    await run(writer.write, pending)
                    pending, npending, started = [], 0, True
            if size is not None and total != size:
                raise DigestMismatch(f"received {total} bytes, announced {size}")
            created, st = await run(writer.commit, pending)
            if not created:
                log.info("local store: %s exists already; new body discarded", key)
            return PutResult(_meta(st), created)
        except _StreamError as e:
            raise e.error from None
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise InvalidKey(f"cannot write {key!r}: {e.strerror}") from e
            raise _write_error("write", key, e) from e
        finally:
            if inflight is None:
                writer.discard()
            else:
                inflight.add_done_callback(lambda _: writer.discard())

    async def put_file(self, key: str, path: str, *, link: bool = False) -> PutResult:
        """Store a local file's bytes as ``key``. ``link``: hard-link it (atomic, never replaces
        an existing name; ``linked`` in the result); copies instead when the file is on another
        filesystem or cannot be linked."""
        if link:
            try:
                return await self._link(key, path)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise _write_error("link", key, e) from e
                log.info("local store: cannot hard-link %s (%s); copying", key, e.strerror)
        return await self.put(key, file_chunks(path), size=os.stat(path).st_size)

    async def _link(self, key: str, path: str) -> PutResult:
        parts = check_key(key)
        found = self._lookup(key)
        if found is not None:
            return PutResult(_meta(found[1]), False)

        def do() -> PutResult:
            dfd = self._open_dir(parts[:-1])  # every component checked to stay inside the root
            try:
                try:
                    os.link(path, parts[-1], dst_dir_fd=dfd, follow_symlinks=True)
                    created = True
                except FileExistsError:
                    created = False  # stored meanwhile: first write wins
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                if created and self._fsync:
                    os.fsync(dfd)
                return PutResult(_meta(st), created, linked=created)
            finally:
                os.close(dfd)

        return await asyncio.get_running_loop().run_in_executor(self._pool, do)

    async def delete(self, key: str) -> bool:
        found = self._lookup(key)
        if found is None:
            return False
        path = self._root_slash + key  # the link itself if it is one, never its target
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, os.unlink, path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"delete {key!r}: {e.strerror}") from e
        return True

    # --- crash litter --------------------------------------------------------------------

    async def cleanup_temp(self, stale_s: float | None = None) -> int:
        """Remove ``.tmp-*`` files that no live writer owns; returns how many were removed.

        A temp file is litter when its writer (host/boot/pid-namespace tag + pid in the name)
        is this instance's and that pid is dead (SIGKILL mid-upload, then restart), or when it
        was not modified for ``stale_s`` seconds (default: the constructor's ``temp_stale_s``;
        covers writers on other hosts sharing the directory). Safe to run while serving.
        """
        stale = self._temp_stale_s if stale_s is None else stale_s
        loop = asyncio.get_running_loop()
        n = await loop.run_in_executor(self._pool, self._cleanup_sync, stale)
        if n:
            log.info("local store: removed %d stale temp file(s) below %s", n, self._root)
        return n

    def _cleanup_sync(self, stale_s: float) -> int:
        me = os.getpid()
        now = time.time()
        removed = 0
        stack = [self._root]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    try:
                        if e.name.startswith(TEMP_PREFIX):
                            if not e.is_file(follow_symlinks=False) and not e.is_symlink():
                                continue
                            if self._is_litter(e, me, now, stale_s):
                                os.unlink(e.path)
                                removed += 1
                        elif e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        log.warning("local store: cannot clean %s: %s", e.path, err)
        return removed

    def _is_litter(self, e: os.DirEntry[str], me: int, now: float, stale_s: float) -> bool:
        tag, _, rest = e.name[len(TEMP_PREFIX):].partition(".")
        pid_s, _, _ = rest.partition(".")
        if tag == self._tag and pid_s.isdigit():
            pid = int(pid_s)
            if pid != me and not pid_alive(pid):
                return True
        return now - e.stat(follow_symlinks=False).st_mtime > stale_s

    def staging_path(self) -> str:
        """A fresh temp file name in the root: same filesystem (``put_file(link=True)`` links
        it), named as ``put``'s temp files (never a key; ``cleanup_temp`` removes it when its
        writer died)."""
        return os.path.join(self._root, f"{TEMP_PREFIX}{self._tag}.{os.getpid()}.{secrets.token_hex(8)}")
