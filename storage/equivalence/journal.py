"""The write-behind journal: acknowledged writes that SQLite has not committed yet.

Why it exists: a SQLite commit writes every dirty page of both hash tables and their four
indexes as WAL frames (about 20 ``pwrite`` calls for a report committed alone), which is most of
what a report costs the server. With write-behind (``[database] commit_interval_ms``), a report
is applied at once inside an open transaction (so this process answers from it), appended here
as one line, answered, and committed with the others of the same few milliseconds. The line is
written with one ``write(2)`` before the answer goes out, so a killed process loses nothing it
acknowledged: the same guarantee as SQLite's own WAL at ``synchronous = NORMAL``
(bitbake-hashserv's setting), which also leaves fsync to the kernel.

Layout: ``<database>.journal/`` holds one file per live writer process, ``<pid>-<random>.jsonl``,
on which its owner holds an exclusive ``flock`` for as long as it lives, and an empty file
``writers-waiting`` whose mtime a writer touches when it finds the database locked (the holder of
an open write-behind transaction then pauses briefly after its commit, so that writers in other
processes are not starved). A journal file that nobody holds belongs to a dead process; whoever
opens the database next (a restarted worker, the next ``serve``) replays it and deletes it.

Records are JSON arrays, replayed with INSERT OR IGNORE (so replaying twice changes nothing):
``["r", outhash_row, unihash]`` a report, ``["o", outhash_row]`` an outhash, ``["u", method,
taskhash, unihash]`` a unihash mapping. A torn last line (the process died inside the write, so
it was never acknowledged) ends the replay of that file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from typing import Any

log = logging.getLogger("sstate_proxy.equivalence.journal")

SUFFIX = ".journal"
WAITING = "writers-waiting"
_EXT = ".jsonl"
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(separators=...) builds one per call


def directory_for(db_path: str) -> str:
    return os.path.abspath(db_path) + SUFFIX


class Journal:
    """This process's journal file (created lazily by the database, after any fork)."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.pid = os.getpid()
        name = f"{self.pid}-{secrets.token_hex(6)}"
        tmp = os.path.join(directory, f".{name}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # Locked before it gets a name that replay looks at: never mistaken for an orphan.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path = os.path.join(directory, name + _EXT)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fd = fd
        self.size = 0

    def append(self, record: list[Any]) -> None:
        """One record, one write(2); raises if it did not all reach the file."""
        data = (_encode(record) + "\n").encode()
        n = os.write(self.fd, data)
        if n != len(data):  # only on a full disk; the torn line is ignored by replay
            raise OSError(f"short write to the journal ({n} of {len(data)} bytes)")
        self.size += n

    def records(self) -> list[list[Any]]:
        return _parse(os.pread(self.fd, os.fstat(self.fd).st_size, 0), self.path)

    def clear(self) -> None:
        """Everything journaled so far is committed."""
        if self.size:
            os.ftruncate(self.fd, 0)
            self.size = 0

    def close(self, remove: bool) -> None:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # still locked while unlinked: nobody replays it meanwhile
        os.close(self.fd)


def note_waiting(directory: str) -> None:
    """Tell the holder of an open write-behind transaction that a writer is waiting."""
    path = os.path.join(directory, WAITING)
    try:
        os.utime(path)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with open(path, "ab"):
                pass
    except OSError:
        pass


def waiting_stamp(directory: str) -> int:
    """Changes whenever a writer notes that it waits (note_waiting); 0 before the first."""
    try:
        return os.stat(os.path.join(directory, WAITING)).st_mtime_ns
    except OSError:
        return 0


class Orphan:
    """A dead writer's journal file, locked by us while we replay it."""

    def __init__(self, path: str, fd: int, records: list[list[Any]]) -> None:
        self.path = path
        self.fd = fd
        self.records = records

    def discard(self) -> None:
        """Replayed and committed: delete it (still locked while unlinked)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)

    def release(self) -> None:
        """Not replayed: keep it for the next open."""
        os.close(self.fd)


def orphans(directory: str) -> list[Orphan]:
    """The journal files whose owner is gone (nobody holds their lock), each locked by us."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[Orphan] = []
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            _drop_unlocked(os.path.join(directory, name))  # a writer died while creating it
            continue
        if not name.endswith(_EXT):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replayed by someone else just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if st.st_nlink == 0:
                raise BlockingIOError  # replayed and deleted between our listdir and open
            found.append(Orphan(path, fd, _parse(os.pread(fd, st.st_size, 0), path) if st.st_size else []))
        except BlockingIOError:
            os.close(fd)  # a live writer's (or another process is replaying it)
        except BaseException:
            os.close(fd)
            raise
    return found


def _drop_unlocked(path: str) -> None:
    try:
        if time.time() - os.stat(path).st_mtime < 60:
            return  # may be a live writer's, between its open and its flock
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass  # being created by a live writer right now
    finally:
        os.close(fd)


def _parse(data: bytes, path: str) -> list[list[Any]]:
    out: list[list[Any]] = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("journal %s: ignoring a torn record at the end", path)
            break
        if not isinstance(rec, list) or not rec or rec[0] not in ("r", "o", "u"):
            log.warning("journal %s: ignoring an unknown record", path)
            continue
        out.append(rec)
    return out
