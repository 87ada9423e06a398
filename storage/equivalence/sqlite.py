"""The embedded equivalence database: one SQLite file in bitbake-hashserv's own schema.

The tables, indexes and pragmas (WAL, ``synchronous = NORMAL``) are those of bitbake-hashserv
2.19's sqlite engine, so an existing ``hashserv.db`` opens as it is and a file written here can be
handed back to ``bitbake-hashserv --database``. The schema is declared once, as data
(``storage.equivalence.schema``); the CREATE statements are built from it, and applied as versioned
migrations (``storage.equivalence.migrations``) under ``BEGIN IMMEDIATE`` at a writable open.

Transactions
------------
* Every write goes through one entry point, ``_write(fn)``: ``fn(conn)`` is queued for the one
  writer thread, which owns the write connection. The writer takes everything queued, runs it in
  one ``BEGIN IMMEDIATE`` transaction (each ``fn`` inside a SAVEPOINT of its own, so a failing
  statement fails only its caller), commits, and only then resolves the callers' futures: a
  report is answered after its commit, as bitbake's engine does. Reports from many connections
  that arrive while a commit runs share the next commit (group commit, the only batching).
* Waiting for the write lock (another worker process, or a real bitbake-hashserv on the same
  file) happens in the writer thread through SQLite's ``busy_timeout``, never on the event loop.
  Past that bound the callers get ``DatabaseUnavailable`` (the HTTP layer answers 503).
* Indexed point lookups (get, exists, the rewrite's ``class_of``, ``generation``) run
  synchronously on the event loop on a read connection of their own: in WAL mode a reader never
  waits for a writer, and a lookup costs less than the hop to a thread and back would.
  Whole-table reads (``get_usage``, ``gc_status``) run in a thread on a connection of their own;
  whole-table writes (``remove``, ``clean_unused``, ``gc_mark``, ``gc_sweep``) are writer jobs.
* WAL checkpoints (which copy pages back into the database file and fsync it) run in a thread
  of their own, PASSIVE, every CHECKPOINT_EVERY commits, instead of inside a commit.
* ``created`` is written as UTC ISO text (``2026-05-01T12:00:00.123456+00:00``), exactly what
  bitbake's registered adapter writes, and is handed back to callers as the stored string.
* ``generation()`` follows ``PRAGMA data_version`` of the read connection, which moves whenever
  any other connection commits: this instance's writer, another worker, or bitbake-hashserv.

Deviations from the reference (all deliberate):
* ``insert_outhash``/``insert_unihash`` report honestly whether a row was inserted (the
  reference's sqlite engine always says "new" because of a ``lastrowid`` quirk).
* ``remove`` with a unihash-table-only column (``unihash``/``gc_mark``) restricts the outhash
  deletion to the (method, taskhash) pairs whose unihash rows match (the reference deletes
  every outhash row that matches the remaining keys, e.g. all rows of the method).
* ``clean_unused`` receives the cut-off datetime and applies it as such (the reference server
  computes ``now + max_age``).
* ``ORDER BY created`` ties are broken by ``id`` so answers are deterministic.
* Opening a very old database that still has ``tasks_v2`` leaves that table alone (bitbake drops
  it without migrating its data); everything else of bitbake's open-time migration is done.
* A write transaction that changed no row (only ignored ``INSERT OR IGNORE``) is rolled back
  rather than committed, so other processes' caches (``data_version``) are not flushed for nothing.
* The table ``sstate_proxy_archives`` (storage dedup, see storage.dedup) is sstate-proxy's own;
  bitbake-hashserv ignores it. So are the object catalog ``sstate_proxy_objects`` and the removal
  log ``sstate_proxy_removals`` (migration 3, retention); the log's sequence is commit order
  because this engine has one writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from storage.equivalence import (
    COPY_COLUMNS,
    MAPPINGS_BATCH,
    OUTHASH_COLUMNS,
    OUTHASH_TEXT_COLUMNS,
    REMOVALS_BATCH,
    REMOVALS_KEEP_S,
    UNIHASH_COLUMNS,
    DatabaseFull,
    DatabaseUnavailable,
    ObjectRow,
    ReadOnlyError,
    Row,
    TrafficRow,
    User,
    check_origin,
    mapping_feed,
    migrations,
    schema,
)

log = logging.getLogger("sstate_proxy.equivalence.sqlite")

T = TypeVar("T")

# How long the writer waits for another process's write lock before giving up (the callers get
# DatabaseUnavailable); also the readers' wait for a WAL recovery at open.
BUSY_TIMEOUT_S = 5.0
# The checkpointer thread copies the WAL back into the database every CHECKPOINT_EVERY commits.
CHECKPOINT_EVERY = 64
WAL_BACKSTOP_PAGES = 20000
GC_MARK_NAME = "gc-mark"

# Columns of unihashes_v3 that outhashes_v2 lacks: naming one of them in `remove` ties the
# outhash deletion to the matching unihash rows (see SqliteEquivalenceDB.remove).
_UNIHASH_ONLY = tuple(c for c in UNIHASH_COLUMNS if c not in OUTHASH_COLUMNS)

_OUTHASH_SELECT = ", ".join(f"o.{c}" for c in ("id", *OUTHASH_COLUMNS))
_OUTHASH_KEYS = ("id", *OUTHASH_COLUMNS)
_FULL_SELECT = _OUTHASH_SELECT + ", u.unihash, u.gc_mark"
_FULL_KEYS = (*_OUTHASH_KEYS, "unihash", "gc_mark")
_JOIN = "outhashes_v2 AS o JOIN unihashes_v3 AS u ON u.method = o.method AND u.taskhash = o.taskhash"

# The distinct methods of unihashes_v3, one index seek per method (no table scan), so that
# "any method" lookups by taskhash can still use the (method, taskhash) index.
_ALL_METHODS_CTE = """
    WITH RECURSIVE m(x) AS (
        SELECT MIN(method) FROM unihashes_v3
        UNION ALL
        SELECT (SELECT MIN(method) FROM unihashes_v3 WHERE method > m.x) FROM m WHERE m.x IS NOT NULL
    )"""

_EQUIVALENT_SQL = (
    f"SELECT o.taskhash, u.unihash FROM {_JOIN} "
    "WHERE o.method = ? AND o.outhash = ? AND o.taskhash != ? "
    "ORDER BY o.created ASC, o.id ASC LIMIT 1"
)
_UNIHASH_SQL = "SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?"
_INSERT_UNIHASH = (
    "INSERT OR IGNORE INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES "
    "(?, ?, ?, COALESCE((SELECT value FROM config WHERE name = 'gc-mark'), ''))"
)
# The catalog: a touch changes a row only when it moves last_access forward (so a flush of
# nothing new commits nothing); a record sets size and origin.
_TOUCH_OBJECT = (
    "INSERT INTO sstate_proxy_objects (key, size, origin, last_access) VALUES (?, 0, 'local', ?) "
    "ON CONFLICT(key) DO UPDATE SET last_access = excluded.last_access "
    "WHERE excluded.last_access > sstate_proxy_objects.last_access"
)
_RECORD_OBJECT = (
    "INSERT INTO sstate_proxy_objects (key, size, origin, last_access) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET size = excluded.size, origin = excluded.origin, "
    "last_access = MAX(sstate_proxy_objects.last_access, excluded.last_access)"
)
_OBJECT_SELECT = "SELECT key, size, origin, last_access FROM sstate_proxy_objects"


_ADD_TRAFFIC = (
    "INSERT INTO sstate_proxy_traffic (bucket, source, recipe, requests, bytes) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (bucket, source, recipe) DO UPDATE SET requests = requests + excluded.requests, "
    "bytes = bytes + excluded.bytes"
)


def utc_iso(value: datetime | str | None = None) -> str:
    """``created`` as bitbake's sqlite adapter stores it: UTC ISO 8601 text.

    A naive datetime is taken as local time (what ``datetime.astimezone`` does, as bitbake).
    A string is stored as given (already in the database's format).
    """
    if value is None:
        return datetime.now(UTC).isoformat()
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).isoformat()


def _check_value(col: str, value: Any) -> None:
    if not isinstance(value, str | int | float):
        raise TypeError(f"bad value for column {col!r}: {type(value).__name__}")


def _conditions(columns: Iterable[str], where: dict[str, Any], table: str = "") -> tuple[str, dict[str, Any]]:
    """`col = :col AND ...` for the whitelisted columns named in `where` (None values ignored).

    Only names from `columns` (module constants) ever reach the SQL text.
    """
    params: dict[str, Any] = {}
    for col in columns:
        value = where.get(col)
        if value is not None:
            _check_value(col, value)
            params[col] = value
    prefix = f"{table}." if table else ""
    return " AND ".join(f"{prefix}{c} = :{c}" for c in params), params


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and \
        (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"the equivalence database is locked by another writer: {exc}")


def _write_failure(exc: BaseException) -> BaseException:
    """What a write's caller gets for ``exc``: lock waits past the bound and a full disk are
    faults of their own (503, 507), anything else is passed on as it is."""
    if _is_busy(exc):
        return _unavailable(exc)
    if isinstance(exc, sqlite3.OperationalError) and \
            (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL:
        return DatabaseFull(f"the equivalence database's disk is full: {exc}")
    return exc


def _outhash_params(row: Row) -> dict[str, Any]:
    data = {c: row[c] for c in OUTHASH_COLUMNS if row.get(c) is not None}
    for c in ("method", "taskhash", "outhash"):
        if c not in data:
            raise KeyError(c)
    data["created"] = utc_iso(data.get("created"))
    return data


def _insert_outhash_sql(data: dict[str, Any]) -> str:
    cols = [c for c in OUTHASH_COLUMNS if c in data]  # whitelisted names only
    return (
        f"INSERT OR IGNORE INTO outhashes_v2 ({', '.join(cols)}) "
        f"VALUES ({', '.join(':' + c for c in cols)})"
    )


def _apply_report(c: sqlite3.Connection, data: dict[str, Any], client_unihash: str) -> Row:
    """The write half of `report` on connection ``c`` (inside the caller's transaction)."""
    method, taskhash, outhash = data["method"], data["taskhash"], data["outhash"]
    c.execute(_insert_outhash_sql(data), data)
    eq = c.execute(_EQUIVALENT_SQL, (method, outhash, taskhash)).fetchone()
    unihash = eq[1] if eq else client_unihash
    if c.execute(_INSERT_UNIHASH, (method, taskhash, unihash)).rowcount == 1:
        return {"taskhash": taskhash, "method": method, "unihash": unihash}  # ours is stored
    stored = c.execute(_UNIHASH_SQL, (method, taskhash)).fetchone()
    return {"taskhash": taskhash, "method": method, "unihash": stored[0] if stored else unihash}


def _set_config(c: sqlite3.Connection, name: str, value: str | None) -> None:
    c.execute(
        "INSERT INTO config (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def _connect(path: str, *, read_only: bool, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with bitbake's pragmas."""
    if read_only:
        uri = "file:" + path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    if not read_only:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


_Job = tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future]
_Queued = tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future, float]  # + when queued


class _Checkpointer:
    """PASSIVE WAL checkpoints in a thread of their own, on a connection of their own, so that
    copying the WAL back into the database file (and its fsync) never stalls the writer's
    commits; a PASSIVE checkpoint never blocks readers or writers."""

    def __init__(self, path: str, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.due = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="equivalence-checkpoint", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = _connect(self.path, read_only=False, busy_timeout_s=self.busy_timeout_s)
        try:
            while True:
                self.due.wait()
                self.due.clear()
                if self.stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # a failed checkpoint only delays the next one
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping = True
        self.due.set()
        self.thread.join()


class _Writer:
    """The one thread that writes: group commit of every queued job, a SAVEPOINT per job."""

    def __init__(self, conn: sqlite3.Connection, checkpointer: _Checkpointer, busy_timeout_s: float) -> None:
        self.conn = conn
        self.checkpointer = checkpointer
        self.busy_timeout_s = busy_timeout_s
        self.busy_ms = int(busy_timeout_s * 1000)  # the connection's busy_timeout now
        # SQLite's own checkpoint-on-commit stays as a backstop, far above the checkpointer's
        # threshold, so that it practically never runs inside a commit.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
        self.commits = 0
        self.jobs: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="equivalence-writer", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fn, fut, time.monotonic()))
        return fut

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.conn.close()
        self.checkpointer.stop()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while True:  # take everything that queued up meanwhile: one commit for all of it
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            # cancelled callers are dropped; the rest are marked running (no late cancel)
            jobs = [(fn, fut) for fn, fut, _ in batch if fut.set_running_or_notify_cancel()]
            if jobs:
                self._bound_wait(batch[0][2])
                self._group(jobs)
            if stop:
                return

    def _bound_wait(self, oldest: float) -> None:
        """A caller waits for another process's lock at most ``busy_timeout_s`` in all: jobs that
        queued while the previous group waited for the lock get only what is left of it (they
        would otherwise wait twice as long)."""
        left = max(0, int((self.busy_timeout_s - (time.monotonic() - oldest)) * 1000))
        if abs(left - self.busy_ms) > 50:
            self.conn.execute(f"PRAGMA busy_timeout = {left}")
            self.busy_ms = left

    def _group(self, batch: list[_Job]) -> None:
        try:
            self._transaction(batch)
        except BaseException as exc:  # BEGIN/COMMIT failed, or SQLite ended the transaction itself
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error as rb:
                    log.error("rollback of a failed write transaction failed: %s", rb)
            err = _write_failure(exc)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)

    def _transaction(self, batch: list[_Job]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout for another process
        before = conn.total_changes
        outcomes: list[tuple[bool, Any]] = []
        for fn, _ in batch:
            conn.execute("SAVEPOINT job")
            try:
                result = fn(conn)
            except BaseException as exc:  # this job's statements only; the group goes on
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append((False, _write_failure(exc)))
            else:
                conn.execute("RELEASE job")
                outcomes.append((True, result))
        # Nothing changed (ignored INSERT OR IGNOREs): roll back, so that other connections'
        # data_version (and the caches keyed on it) do not move for nothing.
        if conn.total_changes == before:
            conn.execute("ROLLBACK")
        else:
            conn.execute("COMMIT")
            self.commits += 1
            if self.commits % CHECKPOINT_EVERY == 0:
                self.checkpointer.due.set()
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class SqliteEquivalenceDB:
    """bitbake-hashserv's sqlite database behind the EquivalenceDB interface."""

    def __init__(self, path: str, read_only: bool = False, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        if path in ("", ":memory:") or path.startswith("file::memory:"):
            raise ValueError("the equivalence database needs a file (readers and the writer share it)")
        self.path = path
        self.read_only = read_only
        self.busy_timeout_s = busy_timeout_s
        self._writer: _Writer | None = None
        if not read_only:
            conn = _connect(path, read_only=False, busy_timeout_s=busy_timeout_s)
            try:
                migrations.migrate_sqlite(conn)
            except sqlite3.OperationalError as exc:
                conn.close()
                if _is_busy(exc):
                    raise _unavailable(exc) from exc
                raise
            self._writer = _Writer(conn, _Checkpointer(path, busy_timeout_s), busy_timeout_s)
        self._conn = _connect(path, read_only=read_only, busy_timeout_s=busy_timeout_s)
        self._heavy_lock = threading.Lock()
        self._gen = 0
        self._data_version = self._read_data_version()

    # --- the two ways in ------------------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer thread inside a write transaction; return its result
        once that transaction has committed. Raises what ``fn`` raised (its statements rolled
        back, the rest of the group unaffected) or DatabaseUnavailable."""
        if self._writer is None:
            if self.read_only:
                raise ReadOnlyError("the equivalence database is open read-only")
            raise DatabaseUnavailable("the equivalence database is closed")
        return await asyncio.wrap_future(self._writer.submit(fn))

    async def _heavy_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Whole-table reads: in a thread, on a connection of their own."""

        def run() -> T:
            with self._heavy_lock:
                conn = _connect(self.path, read_only=True, busy_timeout_s=self.busy_timeout_s)
                try:
                    return fn(conn)
                finally:
                    conn.close()

        return await asyncio.to_thread(run)

    def _rows(self, sql: str, params: Any = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Any = ()) -> tuple | None:
        rows = self._conn.execute(sql, params).fetchall()
        return rows[0] if rows else None

    # --- lookups -------------------------------------------------------------------------------
    async def get_unihash(self, method: str, taskhash: str) -> Row | None:
        r = self._one(_UNIHASH_SQL, (method, taskhash))
        return None if r is None else {"taskhash": taskhash, "method": method, "unihash": r[0]}

    async def get_unihash_full(self, method: str, taskhash: str) -> Row | None:
        """Oldest outhash row of the taskhash joined with its unihash (`get` with all=true).

        Keys (as bitbake's sqlite engine): id (of the outhash row), method, taskhash, outhash,
        created, owner, PN, PV, PR, task, outhash_siginfo, unihash, gc_mark.
        """
        r = self._one(
            f"SELECT {_FULL_SELECT} FROM {_JOIN} WHERE o.method = ? AND o.taskhash = ? "
            "ORDER BY o.created ASC, o.id ASC LIMIT 1",
            (method, taskhash),
        )
        return None if r is None else dict(zip(_FULL_KEYS, r, strict=True))

    async def get_outhash(self, method: str, outhash: str, with_unihash: bool = True) -> Row | None:
        if with_unihash:
            r = self._one(
                f"SELECT {_FULL_SELECT} FROM {_JOIN} WHERE o.method = ? AND o.outhash = ? "
                "ORDER BY o.created ASC, o.id ASC LIMIT 1",
                (method, outhash),
            )
            return None if r is None else dict(zip(_FULL_KEYS, r, strict=True))
        r = self._one(
            f"SELECT {_OUTHASH_SELECT} FROM outhashes_v2 AS o WHERE o.method = ? AND o.outhash = ? "
            "ORDER BY o.created ASC, o.id ASC LIMIT 1",
            (method, outhash),
        )
        return None if r is None else dict(zip(_OUTHASH_KEYS, r, strict=True))

    async def get_equivalent_for_outhash(self, method: str, outhash: str, taskhash: str) -> Row | None:
        r = self._one(_EQUIVALENT_SQL, (method, outhash, taskhash))
        return None if r is None else {"taskhash": r[0], "unihash": r[1]}

    async def unihash_exists(self, unihash: str) -> bool:
        return self._one("SELECT 1 FROM unihashes_v3 WHERE unihash = ? LIMIT 1", (unihash,)) is not None

    async def class_of(self, hash_: str, methods: tuple[str, ...], limit: int) -> list[str]:
        """Hashes whose objects may be served for ``hash_``, best first (see the interface).

        Order: (1) the unihash(es) of ``hash_`` as a taskhash, (2) the taskhashes mapped to
        ``hash_`` when it is itself a unihash, (3) the other taskhashes sharing (1)'s unihash;
        within each group newest mapping first (``unihashes_v3.id`` descending). ``methods``
        (() = any) restricts every group. Deduplicated, ``hash_`` excluded, at most ``limit``.
        Every query is an index seek: (method, taskhash) for (1) (with the distinct methods
        found by index seeks when ``methods`` is empty), unihash_lookup_v1 for (2) and (3).
        """
        if limit <= 0:
            return []
        out: list[str] = []
        seen = {hash_}

        def add(values: Iterable[str]) -> bool:
            for v in values:
                if v not in seen:
                    seen.add(v)
                    out.append(v)
                    if len(out) >= limit:
                        return True
            return False

        if methods:
            marks = ", ".join("?" * len(methods))
            mfilter, mparams = f" AND method IN ({marks})", tuple(methods)
            own = self._rows(
                f"SELECT unihash FROM unihashes_v3 WHERE method IN ({marks}) AND taskhash = ? ORDER BY id DESC",
                (*methods, hash_),
            )
        else:
            mfilter, mparams = "", ()
            own = self._rows(
                _ALL_METHODS_CTE
                + " SELECT unihash FROM unihashes_v3 WHERE method IN (SELECT x FROM m WHERE x IS NOT NULL)"
                " AND taskhash = ? ORDER BY id DESC",
                (hash_,),
            )
        unihashes = list(dict.fromkeys(r[0] for r in own))
        if add(unihashes):
            return out
        members_sql = (
            f"SELECT taskhash FROM unihashes_v3 WHERE unihash = ?{mfilter} ORDER BY id DESC LIMIT ?"
        )
        # (2) hash_ as a unihash: the taskhashes mapped to it.
        if add(r[0] for r in self._rows(members_sql, (hash_, *mparams, limit + 1))):
            return out
        # (3) the rest of hash_'s class.
        for u in unihashes:
            if u == hash_:
                continue
            if add(r[0] for r in self._rows(members_sql, (u, *mparams, limit + len(seen)))):
                break
        return out

    async def mappings_since(self, after: int | None) -> tuple[int, list[str] | None]:
        """An index range read on the loop. The writer thread is the only writer of this
        instance and SQLite serialises writers, so ``id`` order is commit order."""
        if after is None:
            r = self._one("SELECT COALESCE(MAX(id), 0) FROM unihashes_v3")
            return int(r[0]) if r else 0, []
        rows = self._rows("SELECT id, taskhash, unihash FROM unihashes_v3 WHERE id > ? ORDER BY id LIMIT ?",
                          (after, MAPPINGS_BATCH + 1))
        return mapping_feed(after, rows)

    def _read_data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    async def generation(self) -> int:
        """Changes whenever anyone commits a change; strictly increasing for this instance.

        ``PRAGMA data_version`` of the read connection moves when any other connection commits:
        this instance's writer thread, another process, a real bitbake-hashserv.
        """
        version = self._read_data_version()
        if version != self._data_version:
            self._data_version = version
            self._gen += 1
        return self._gen

    # --- writes (each answered after its commit) ------------------------------------------------
    async def insert_outhash(self, row: Row) -> bool:
        """INSERT OR IGNORE into outhashes_v2; True if the row is new.

        Keys of ``row`` that are not outhashes_v2 columns are ignored; ``created`` defaults to
        now and is stored as UTC ISO text (a datetime is converted; a string kept as given).
        """
        data = _outhash_params(row)
        sql = _insert_outhash_sql(data)
        return await self._write(lambda c: c.execute(sql, data).rowcount > 0)

    async def insert_unihash(self, method: str, taskhash: str, unihash: str) -> bool:
        return await self._write(lambda c: c.execute(_INSERT_UNIHASH, (method, taskhash, unihash)).rowcount > 0)

    async def insert_report(self, row: Row, client_unihash: str) -> Row:
        """The write half of `report` in ONE transaction; returns the stored mapping.

        Inserts the outhash row (INSERT OR IGNORE), looks up the oldest equivalent taskhash with
        the same method+outhash, stores its unihash (or ``client_unihash`` when there is none)
        with INSERT OR IGNORE, and returns ``{taskhash, method, unihash}`` as stored (the first
        writer's unihash if the taskhash was already mapped). The equivalence lookup always runs
        (the reference's sqlite behaviour). Upstream fallbacks are the caller's business.
        """
        data = _outhash_params(row)
        return await self._write(lambda c: _apply_report(c, data, client_unihash))

    async def remove(self, where: dict[str, Any]) -> int:
        """Delete matching rows from both hash tables; the total number of rows deleted.

        Each table is filtered by the keys of ``where`` that are its columns (None values
        ignored, unknown keys ignored, never interpolated); a table with no applicable key is
        untouched. Deviation from bitbake: when ``where`` names a unihash-only column
        (``unihash``, ``gc_mark``), outhash rows are deleted only for the (method, taskhash)
        pairs whose unihash rows match ``where``; bitbake would delete every outhash row that
        matches the remaining keys (``{"unihash": U, "method": M}`` wiped all of method M).
        """
        if not isinstance(where, dict):
            raise TypeError("where must be a dict")
        o_clause, o_params = _conditions(OUTHASH_COLUMNS, where, "outhashes_v2")
        u_clause, u_params = _conditions(UNIHASH_COLUMNS, where)
        if any(where.get(c) is not None for c in _UNIHASH_ONLY) and o_clause:
            # Same parameter names, same values: the unihash conditions can share o_params.
            tied, tied_params = _conditions(UNIHASH_COLUMNS, where, "u")
            o_clause += (
                " AND EXISTS (SELECT 1 FROM unihashes_v3 AS u WHERE u.method = outhashes_v2.method"
                f" AND u.taskhash = outhashes_v2.taskhash AND {tied})"
            )
            o_params = {**o_params, **tied_params}

        def tx(c: sqlite3.Connection) -> int:
            count = 0
            if o_clause:
                count += c.execute(f"DELETE FROM outhashes_v2 WHERE {o_clause}", o_params).rowcount
            if u_clause:
                count += c.execute(f"DELETE FROM unihashes_v3 WHERE {u_clause}", u_params).rowcount
            return count

        return await self._write(tx)

    async def clean_unused(self, oldest: datetime) -> int:
        """Delete outhash rows created before ``oldest`` whose (method, taskhash) has no unihash.

        ``created`` is compared as text, as bitbake does: right for the UTC ISO strings bitbake
        and this class write; legacy naive rows (``YYYY-MM-DD HH:MM:SS``) sort before any ISO
        string of the same day.
        """
        cutoff = utc_iso(oldest)
        return await self._write(lambda c: c.execute(
            "DELETE FROM outhashes_v2 WHERE created < ? AND NOT EXISTS (SELECT 1 FROM unihashes_v3 AS u"
            " WHERE u.method = outhashes_v2.method AND u.taskhash = outhashes_v2.taskhash)",
            (cutoff,),
        ).rowcount)

    async def gc_mark(self, mark: str, where: dict[str, Any]) -> int:
        """Make ``mark`` the current mark, then set it on the unihash rows matching ``where``.

        Only unihash columns of ``where`` apply; none applicable -> 0 rows (the mark is still set).
        """
        if not isinstance(mark, str):
            raise TypeError("mark must be a string")
        if not isinstance(where, dict):
            raise TypeError("where must be a dict")
        clause, params = _conditions(UNIHASH_COLUMNS, where)

        def tx(c: sqlite3.Connection) -> int:
            _set_config(c, GC_MARK_NAME, mark)
            if not clause:
                return 0
            return c.execute(f"UPDATE unihashes_v3 SET gc_mark = :_mark WHERE {clause}",
                             {**params, "_mark": mark}).rowcount

        return await self._write(tx)

    async def gc_sweep(self) -> int:
        """Delete every unihash row not carrying the current mark, then clear the mark.

        With no current mark nothing is deleted (as bitbake: ``gc_mark != NULL`` is never true).
        Checking that the caller names the current mark is the caller's job.
        """

        def tx(c: sqlite3.Connection) -> int:
            n = c.execute(
                "DELETE FROM unihashes_v3 WHERE gc_mark != (SELECT value FROM config WHERE name = 'gc-mark')"
            ).rowcount
            _set_config(c, GC_MARK_NAME, None)
            return n

        return await self._write(tx)

    async def gc_status(self) -> tuple[int, int, str | None]:
        def count(c: sqlite3.Connection) -> tuple[int, int, str | None]:
            r = c.execute("SELECT value FROM config WHERE name = ?", (GC_MARK_NAME,)).fetchone()
            mark = None if r is None else r[0]
            keep = c.execute("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark = ?", (mark or "",)).fetchone()[0]
            remove = c.execute("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark != ?", (mark or "",)).fetchone()[0]
            return keep, remove, mark

        return await self._heavy_read(count)

    async def get_current_gc_mark(self) -> str | None:
        r = self._one("SELECT value FROM config WHERE name = ?", (GC_MARK_NAME,))
        return None if r is None else r[0]

    async def get_usage(self) -> dict[str, dict[str, int]]:
        def count(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
            names = [r[0] for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "ORDER BY name")
                if r[0] not in schema.OWN_TABLES]  # sstate-proxy's own tables: not hash equivalence
            usage = {}
            for name in names:
                quoted = '"' + name.replace('"', '""') + '"'
                usage[name] = {"rows": c.execute(f"SELECT COUNT(*) FROM {quoted}").fetchone()[0]}
            return usage

        return await self._heavy_read(count)

    async def get_query_columns(self) -> list[str]:
        """The TEXT columns of unihashes_v3 and outhashes_v2 (what remove/gc-mark may name)."""
        return list(dict.fromkeys((*UNIHASH_COLUMNS, *OUTHASH_TEXT_COLUMNS)))

    # --- users ---------------------------------------------------------------------------------
    @staticmethod
    def _user(r: tuple | None) -> User | None:
        if r is None:
            return None
        return User(username=r[0], token_hash=r[1], permissions=tuple(r[2].split()))

    async def lookup_user(self, username: str) -> User | None:
        return self._user(self._one("SELECT username, token, permissions FROM users WHERE username = ?",
                                    (username,)))

    async def get_all_users(self) -> list[User]:
        return [self._user(r) for r in self._rows(  # type: ignore[misc]
            "SELECT username, token, permissions FROM users ORDER BY username")]

    async def new_user(self, username: str, permissions: tuple[str, ...], token_hash: str) -> bool:
        perms = " ".join(permissions)
        return await self._write(lambda c: c.execute(
            "INSERT OR IGNORE INTO users (username, token, permissions) VALUES (?, ?, ?)",
            (username, token_hash, perms),
        ).rowcount > 0)

    async def set_user_token(self, username: str, token_hash: str) -> bool:
        return await self._write(lambda c: c.execute(
            "UPDATE users SET token = ? WHERE username = ?", (token_hash, username)).rowcount > 0)

    async def set_user_perms(self, username: str, permissions: tuple[str, ...]) -> bool:
        perms = " ".join(permissions)
        return await self._write(lambda c: c.execute(
            "UPDATE users SET permissions = ? WHERE username = ?", (perms, username)).rowcount > 0)

    async def delete_user(self, username: str) -> bool:
        return await self._write(
            lambda c: c.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount > 0)

    # --- archive identity (storage dedup) -------------------------------------------------------
    def _has_archives(self) -> bool:
        """False only for a read-only open of a file this service never wrote (no table)."""
        return self._writer is not None or self._one(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sstate_proxy_archives'") is not None

    async def record_archive(self, key: str, identity: str, size: int) -> str:
        def tx(c: sqlite3.Connection) -> str:
            r = c.execute("SELECT canonical FROM sstate_proxy_archives WHERE key = ?", (key,)).fetchone()
            if r is not None:
                return r[0]
            r = c.execute(
                "SELECT key FROM sstate_proxy_archives WHERE identity = ? AND canonical = key "
                "ORDER BY rowid LIMIT 1", (identity,)).fetchone()
            canonical = r[0] if r is not None else key
            c.execute(
                "INSERT INTO sstate_proxy_archives (key, identity, size, canonical, created) VALUES (?, ?, ?, ?, ?)",
                (key, identity, int(size), canonical, utc_iso()))
            return canonical

        return await self._write(tx)

    async def archive_alias(self, key: str) -> str | None:
        if not self._has_archives():
            return None
        r = self._one("SELECT canonical FROM sstate_proxy_archives WHERE key = ? AND canonical != key", (key,))
        return None if r is None else r[0]

    async def archive_aliases(self, canonical: str) -> list[str]:
        if not self._has_archives():
            return []
        return [r[0] for r in self._rows(
            "SELECT key FROM sstate_proxy_archives WHERE canonical = ? AND key != canonical ORDER BY rowid",
            (canonical,))]

    async def forget_archive(self, key: str, successor: str | None = None) -> int:
        def tx(c: sqlite3.Connection) -> int:
            n = c.execute("DELETE FROM sstate_proxy_archives WHERE key = ?", (key,)).rowcount
            if successor is not None:
                c.execute("UPDATE sstate_proxy_archives SET canonical = ? WHERE canonical = ?", (successor, key))
            else:
                n += c.execute("DELETE FROM sstate_proxy_archives WHERE canonical = ?", (key,)).rowcount
            return n

        return await self._write(tx)

    async def dedup_stats(self) -> dict[str, int]:
        if not self._has_archives():
            return {"objects": 0, "unique": 0, "bytes_saved": 0}
        r = self._one(
            "SELECT COUNT(*), COALESCE(SUM(canonical = key), 0), "
            "COALESCE(SUM(CASE WHEN canonical != key THEN size ELSE 0 END), 0) FROM sstate_proxy_archives")
        assert r is not None
        return {"objects": r[0], "unique": r[1], "bytes_saved": r[2]}

    # --- the object catalog (retention) ----------------------------------------------------------
    def _has_table(self, name: str) -> bool:
        """False only for a read-only open of a file this service never migrated (no table
        ``name`` of its own): its reads then answer "nothing" rather than fail."""
        return self._writer is not None or self._one(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None

    def _has_catalog(self) -> bool:
        return self._has_table("sstate_proxy_objects")

    async def touch_objects(self, accessed: Mapping[str, float]) -> None:
        if not accessed:
            return
        rows = [(k, float(t)) for k, t in accessed.items()]
        await self._write(lambda c: c.executemany(_TOUCH_OBJECT, rows))

    async def record_object(self, key: str, size: int, origin: str, when: float) -> None:
        check_origin(origin)
        await self._write(lambda c: c.execute(_RECORD_OBJECT, (key, int(size), origin, float(when))))

    async def object_usage(self, origin: str | None = None) -> tuple[int, int]:
        if not self._has_catalog():
            return 0, 0
        where, params = ("", ()) if origin is None else (" WHERE origin = ?", (check_origin(origin),))

        def count(c: sqlite3.Connection) -> tuple[int, int]:
            r = c.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM sstate_proxy_objects{where}",
                          params).fetchone()
            return int(r[0]), int(r[1])

        return await self._heavy_read(count)

    async def lru_objects(self, origin: str | None, limit: int) -> list[ObjectRow]:
        if limit <= 0 or not self._has_catalog():
            return []
        where, params = ("", ()) if origin is None else (" WHERE origin = ?", (check_origin(origin),))
        sql = f"{_OBJECT_SELECT}{where} ORDER BY last_access LIMIT ?"

        def run(c: sqlite3.Connection) -> list[ObjectRow]:
            return [ObjectRow(*r) for r in c.execute(sql, (*params, limit))]

        return await self._heavy_read(run)

    async def iter_objects(self, batch: int = 5000) -> AsyncIterator[list[ObjectRow]]:
        """Every row in key order, ``batch`` at a time, from one snapshot (a read transaction on
        a connection of its own, in a thread)."""
        if batch <= 0:
            raise ValueError("batch must be positive")
        if not self._has_catalog():
            return
        conn = await asyncio.to_thread(_connect, self.path, read_only=True, busy_timeout_s=self.busy_timeout_s)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN")
            rows = await asyncio.to_thread(self._fetch, conn, f"{_OBJECT_SELECT} ORDER BY key LIMIT ?", (batch,))
            while rows:
                yield [ObjectRow(*r) for r in rows]
                if len(rows) < batch:
                    break
                rows = await asyncio.to_thread(
                    self._fetch, conn, f"{_OBJECT_SELECT} WHERE key > ? ORDER BY key LIMIT ?", (rows[-1][0], batch))
        finally:
            await asyncio.to_thread(conn.close)

    async def forget_objects(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        now = time.time()
        gone = [(k,) for k in keys]
        logged = [(k, now) for k in keys]

        def tx(c: sqlite3.Connection) -> int:
            n = c.executemany("DELETE FROM sstate_proxy_objects WHERE key = ?", gone).rowcount
            c.executemany("INSERT INTO sstate_proxy_removals (key, removed) VALUES (?, ?)", logged)
            c.execute("DELETE FROM sstate_proxy_removals WHERE removed < ?", (now - REMOVALS_KEEP_S,))
            return n

        return await self._write(tx)

    async def removals_since(self, after: int | None) -> tuple[int, list[str]]:
        """An indexed read on the loop (the writer is the only writer: seq order is commit order)."""
        if not self._has_catalog():
            return (after or 0), []
        if after is None:
            r = self._one("SELECT COALESCE(MAX(seq), 0) FROM sstate_proxy_removals")
            return int(r[0]) if r else 0, []
        rows = self._rows("SELECT seq, key FROM sstate_proxy_removals WHERE seq > ? ORDER BY seq LIMIT ?",
                          (after, REMOVALS_BATCH))
        return (rows[-1][0] if rows else after), [r[1] for r in rows]

    # --- traffic history ------------------------------------------------------------------------
    async def add_traffic(self, rows: Sequence[TrafficRow]) -> None:
        values = [(r.bucket, r.source, r.recipe, r.requests, r.bytes) for r in rows]
        if values:
            await self._write(lambda c: c.executemany(_ADD_TRAFFIC, values))

    async def traffic_series(self, since: int) -> list[TrafficRow]:
        def read(c: sqlite3.Connection) -> list[TrafficRow]:
            return [TrafficRow(b, s, "", n, nb) for b, s, n, nb in c.execute(
                "SELECT bucket, source, SUM(requests), SUM(bytes) FROM sstate_proxy_traffic "
                "WHERE bucket >= ? GROUP BY bucket, source ORDER BY bucket, source", (since,))]

        return await self._traffic_read(read)

    async def top_missed_recipes(self, since: int, limit: int) -> list[tuple[str, int]]:
        def read(c: sqlite3.Connection) -> list[tuple[str, int]]:
            return [(r, n) for r, n in c.execute(
                "SELECT recipe, SUM(requests) AS n FROM sstate_proxy_traffic "
                "WHERE source = 'miss' AND recipe != '' AND bucket >= ? "
                "GROUP BY recipe ORDER BY n DESC, recipe LIMIT ?", (since, limit))]

        return await self._traffic_read(read)

    async def _traffic_read(self, fn: Callable[[sqlite3.Connection], list[T]]) -> list[T]:
        """A read of the traffic table, in a thread (it scans a range)."""
        if not self._has_table("sstate_proxy_traffic"):
            return []
        return await self._heavy_read(fn)

    async def prune_traffic(self, before: int) -> int:
        return await self._write(lambda c: c.execute(
            "DELETE FROM sstate_proxy_traffic WHERE bucket < ?", (before,)).rowcount)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """An flock on ``<database>-<name>.lock`` (one host shares a SQLite file); the kernel
        drops it when the holder dies."""
        if not name.isidentifier():
            raise ValueError(f"bad lock name {name!r}")
        fd = os.open(f"{self.path}-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    # --- bulk copy (`sstate-proxy db copy`) ----------------------------------------------------
    async def iter_rows(self, table: str, batch: int = 2000) -> AsyncIterator[list[Row]]:
        """Every row of ``table`` in rowid order, ``batch`` rows at a time, read from one
        snapshot (a read transaction on a connection of its own, in a thread)."""
        columns = COPY_COLUMNS.get(table)
        if columns is None:
            raise ValueError(f"no such table to copy: {table!r}")
        if batch <= 0:
            raise ValueError("batch must be positive")
        select = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
        conn = await asyncio.to_thread(_connect, self.path, read_only=True, busy_timeout_s=self.busy_timeout_s)
        try:
            exists = await asyncio.to_thread(
                self._fetch, conn, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
            if not exists:
                return
            await asyncio.to_thread(conn.execute, "BEGIN")  # one snapshot for the whole table
            last = -(2 ** 63)
            while True:
                rows = await asyncio.to_thread(self._fetch, conn, select, (last, batch))
                if not rows:
                    break
                last = rows[-1][0]
                yield [dict(zip(columns, r[1:], strict=True)) for r in rows]
                if len(rows) < batch:
                    break
        finally:
            await asyncio.to_thread(conn.close)

    @staticmethod
    def _fetch(conn: sqlite3.Connection, sql: str, params: Any) -> list[tuple]:
        return conn.execute(sql, params).fetchall()

    async def copy_in(self, table: str, rows: list[Row]) -> int:
        """INSERT OR IGNORE every row (one writer job: one transaction); rows inserted."""
        columns = COPY_COLUMNS.get(table)
        if columns is None:
            raise ValueError(f"no such table to copy: {table!r}")
        if not rows:
            return 0
        values = []
        for row in rows:
            out = []
            for col in columns:
                v = row.get(col)
                if isinstance(v, datetime):
                    v = utc_iso(v)
                elif v is not None:
                    _check_value(col, v)
                out.append(v)
            values.append(out)
        sql = (f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        return await self._write(lambda c: c.executemany(sql, values).rowcount)

    async def close(self) -> None:
        """Finish the queued writes, stop the writer, close the connections."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.stop)
        self._conn.close()
