"""The embedded equivalence database: one SQLite file in bitbake-hashserv's own schema.

The tables, indexes and pragmas are those of bitbake-hashserv 2.19's sqlite engine (see
/work/shared/research/hashserv-protocol.md section 8), less one redundant index (see the
deviations below), so an existing ``hashserv.db`` opens as it is and a file written here can be
handed back to ``bitbake-hashserv --database``.

Design notes
------------
* One ``sqlite3`` connection per instance, in autocommit mode, used synchronously from the event
  loop: indexed point queries take microseconds, far less than a hop to a thread. Write
  transactions are explicit (``BEGIN IMMEDIATE``) and short; ``busy_timeout`` lets several worker
  processes share the file.
* Whole-table work (``remove``, ``clean_unused``, ``gc_mark``, ``gc_sweep``, ``get_usage``) runs in
  a worker thread on a connection of its own, so it never stalls the event loop (for a
  ``:memory:`` database, which cannot be shared, it runs inline).
* ``insert_report`` does a report's writes in one transaction. With ``commit_interval_ms`` > 0
  (the service's default) that transaction is a write-behind window: reports, report-equivs and
  outhash writes are applied in it, journaled (journal.py) and answered, and the window commits
  after the interval; other writes commit it first. Without it, reports made in the same
  event-loop iteration share one transaction (group commit). WAL checkpoints (which fsync) run
  in a worker thread every CHECKPOINT_EVERY commits rather than inside a commit on the loop.
* Waiting for the write lock never relies on SQLite's busy handler alone (it sleeps 1, 2, 5, 10
  ms... and can keep missing a busy writer's gaps): writers retry every RETRY_S and touch the
  journal directory's ``writers-waiting``, and a window's holder then pauses COOLDOWN_S.
* ``created`` is written as UTC ISO text (``2026-05-01T12:00:00.123456+00:00``), exactly what
  bitbake's registered adapter writes, and is handed back to callers as the stored string.
* ``generation()`` combines ``PRAGMA data_version`` (changes when any *other* connection, in this
  or another process, including a real ``bitbake-hashserv``, commits) with this connection's
  ``total_changes``; no counter row is written, so foreign writers are seen too.

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
* bitbake's index ``taskhash_lookup_v4 ON unihashes_v3 (method, taskhash)`` is not kept (and is
  dropped when a writable open finds it): it holds exactly the columns of the table's
  ``UNIQUE(method, taskhash)``, whose automatic index answers the same lookups, so it only cost
  every report one more index insert and one more dirty page at commit (about a fifth of a
  write-behind commit, measured). bitbake-hashserv re-creates it when it opens the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from storage.equivalence import (
    OUTHASH_COLUMNS,
    OUTHASH_TEXT_COLUMNS,
    UNIHASH_COLUMNS,
    Row,
    User,
    journal,
)

log = logging.getLogger("sstate_proxy.equivalence.sqlite")

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
# WAL checkpoints (which fsync the database file) run in a worker thread every CHECKPOINT_EVERY
# committed writes instead of inside a commit on the event loop; SQLite's own auto-checkpoint
# stays on, at a larger size, as a backstop (and for other writers of the file).
CHECKPOINT_EVERY = 256
WAL_AUTOCHECKPOINT_PAGES = 10000
# Waiting for the write lock: retry this often (and say so in the journal directory, so that a
# process holding a write-behind transaction pauses COOLDOWN_S after its commit and lets us in).
RETRY_S = 0.0003
COOLDOWN_S = 0.002
# A window at least this fraction of commit_interval old is committed at the next quiet moment
# (a face has answered and waits for its client), so that the commit overlaps the client's own
# work instead of delaying its next request; the timer stays the deadline. Small windows fit in
# a sequential client's think time (0.2 against 0.5: a sequential report ~5 % faster in 9 of 12
# alternations); 0 (a commit after every answer) gained nothing and cost 30 % more CPU.
QUIET_COMMIT_FRACTION = 0.2
GC_MARK_NAME = "gc-mark"

# Columns of unihashes_v3 that outhashes_v2 lacks: naming one of them in `remove` ties the
# outhash deletion to the matching unihash rows (see SqliteEquivalenceDB.remove).
_UNIHASH_ONLY = tuple(c for c in UNIHASH_COLUMNS if c not in OUTHASH_COLUMNS)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS unihashes_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        method TEXT NOT NULL,
        taskhash TEXT NOT NULL,
        unihash TEXT NOT NULL,
        gc_mark TEXT NOT NULL,
        UNIQUE(method, taskhash)
    )""",
    """CREATE TABLE IF NOT EXISTS outhashes_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        method TEXT NOT NULL,
        taskhash TEXT NOT NULL,
        outhash TEXT NOT NULL,
        created DATETIME,
        owner TEXT,
        PN TEXT,
        PV TEXT,
        PR TEXT,
        task TEXT,
        outhash_siginfo TEXT,
        UNIQUE(method, taskhash, outhash)
    )""",
    """CREATE TABLE IF NOT EXISTS users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL,
        token TEXT NOT NULL,
        permissions TEXT NOT NULL,
        UNIQUE(username)
    )""",
    """CREATE TABLE IF NOT EXISTS config (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        value TEXT,
        UNIQUE(name)
    )""",
)
_OBSOLETE_INDEXES = (
    "taskhash_lookup", "outhash_lookup", "taskhash_lookup_v2", "outhash_lookup_v2", "taskhash_lookup_v3",
    # bitbake's current (method, taskhash) index on unihashes_v3: the same columns as the table's
    # UNIQUE constraint, whose automatic index serves every such lookup (see the module notes).
    "taskhash_lookup_v4",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS unihash_lookup_v1 ON unihashes_v3 (unihash)",
    "CREATE INDEX IF NOT EXISTS outhash_lookup_v3 ON outhashes_v2 (method, outhash)",
    "CREATE INDEX IF NOT EXISTS config_lookup ON config (name)",
)

_OUTHASH_SELECT = ", ".join(f"o.{c}" for c in ("id", *OUTHASH_COLUMNS))
_OUTHASH_KEYS = ("id", *OUTHASH_COLUMNS)
_FULL_SELECT = _OUTHASH_SELECT + ", u.unihash, u.gc_mark"
_FULL_KEYS = (*_OUTHASH_KEYS, "unihash", "gc_mark")
_JOIN = "outhashes_v2 AS o JOIN unihashes_v3 AS u ON u.method = o.method AND u.taskhash = o.taskhash"

# The distinct methods of unihashes_v3, one index seek per method (no table scan), so that
# "any method" lookups by taskhash can still use the (method, taskhash) UNIQUE index.
_ALL_METHODS_CTE = """
    WITH RECURSIVE m(x) AS (
        SELECT MIN(method) FROM unihashes_v3
        UNION ALL
        SELECT (SELECT MIN(method) FROM unihashes_v3 WHERE method > m.x) FROM m WHERE m.x IS NOT NULL
    )"""


class ReadOnlyError(PermissionError):
    """A write was attempted on a database opened read-only."""


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


def _is_busy(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _try_begin(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE without waiting: False if another connection holds the write lock."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _begin(conn: sqlite3.Connection, journal_dir: str | None) -> None:
    """BEGIN IMMEDIATE, waiting up to BUSY_TIMEOUT_MS for the write lock in short sleeps and
    telling a write-behind holder in another process that we wait (SQLite's own busy handler
    sleeps 1, 2, 5, 10... ms and could keep missing the gaps between its transactions)."""
    if journal_dir is None:  # :memory:, one connection
        conn.execute("BEGIN IMMEDIATE")
        return
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while not _try_begin(conn):
        if time.monotonic() >= deadline:
            conn.execute("BEGIN IMMEDIATE")  # SQLite's own wait, then its "database is locked"
            return
        journal.note_waiting(journal_dir)
        time.sleep(RETRY_S)


def _begin_and_run(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T],
                   journal_dir: str | None = None) -> T:
    """``fn`` inside a new IMMEDIATE transaction, rolled back if it raises; on success the
    transaction is left open for the caller to commit (or roll back when nothing changed)."""
    _begin(conn, journal_dir)
    try:
        return fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class SqliteEquivalenceDB:
    """bitbake-hashserv's sqlite database behind the EquivalenceDB interface."""

    answers_in_loop = True  # point queries run inline: microseconds, no thread hop

    def __init__(self, path: str, read_only: bool = False, commit_interval_ms: int = 0) -> None:
        """``commit_interval_ms`` > 0 turns on write-behind for reports (see journal.py): they
        are answered once applied and journaled, and committed within that many ms."""
        self.path = path
        self.read_only = read_only
        self._memory = path == ":memory:" or path.startswith("file::memory:") or path == ""
        self._journal_dir = None if self._memory or read_only else journal.directory_for(path)
        self.commit_interval = commit_interval_ms / 1000 if self._journal_dir else 0.0
        if self.commit_interval:
            try:
                os.makedirs(self._journal_dir, mode=0o700, exist_ok=True)
                if not os.access(self._journal_dir, os.W_OK | os.X_OK):
                    raise PermissionError(f"{self._journal_dir} is not writable")
            except OSError as exc:
                log.warning("no write-behind journal (%s): each report is committed before its answer", exc)
                self.commit_interval = 0.0
        self._heavy_lock = threading.Lock()
        self._conn = self._connect()
        if not read_only:
            self._migrate(self._conn)
            self._replay_orphans()
        self._gen = 0
        self._gen_key = self._generation_key()
        self._commits = 0
        self._reports: list[tuple[dict[str, Any], str, asyncio.Future[Row]]] = []
        self._checkpoint: asyncio.Future[None] | None = None
        # write-behind state: the open transaction ("window") and this process's journal
        self._journal: journal.Journal | None = None
        self._window = False
        self._window_timer: asyncio.TimerHandle | None = None
        self._window_opened = 0.0
        self._waiting_seen = 0
        self._cooldown_until = 0.0
        self._needs_replay = False  # the journal holds writes the database has lost (rollback)

    # --- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            if self._memory:
                raise ValueError("a read-only database needs a file")
            uri = "file:" + self.path.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not (self.read_only or self._memory):
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if not self.read_only:
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """bitbake's open-time migration: create what is missing, lift unihashes_v2 to v3."""
        _begin(conn, self._journal_dir)
        try:
            for ddl in _SCHEMA:
                conn.execute(ddl)
            for name in _OBSOLETE_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
            for ddl in _INDEXES:
                conn.execute(ddl)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "unihashes_v2" in tables:
                log.info("upgrading unihashes_v2 -> unihashes_v3")
                conn.execute(
                    "INSERT OR IGNORE INTO unihashes_v3 (id, method, taskhash, unihash, gc_mark) "
                    "SELECT id, method, taskhash, unihash, '' FROM unihashes_v2"
                )
                conn.execute("DROP TABLE unihashes_v2")
            if "tasks_v2" in tables:
                log.warning("%s still holds the pre-2021 table tasks_v2; it is ignored (not dropped)",
                            "the database")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("the equivalence database is open read-only")

    def _rows(self, sql: str, params: Any = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Any = ()) -> tuple | None:
        rows = self._conn.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one IMMEDIATE transaction on the main connection, committed before
        returning (an open write-behind window is committed first)."""
        self._writable()
        if self._window:
            self._commit_window()
        conn = self._conn
        before = conn.total_changes
        result = _begin_and_run(conn, fn, self._journal_dir)
        # A transaction that changed nothing (ignored INSERT OR IGNORE) is rolled back: a commit
        # would still move other connections' data_version and flush their caches for nothing.
        if conn.total_changes == before:
            conn.execute("ROLLBACK")
            return result
        conn.execute("COMMIT")
        self._committed()
        return result

    def _committed(self) -> None:
        """Count a commit of the main connection; every CHECKPOINT_EVERY-th starts a checkpoint."""
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0:
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        """A PASSIVE WAL checkpoint in a worker thread on its own connection (never blocks writers)."""
        if self._memory or (self._checkpoint is not None and not self._checkpoint.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def run() -> None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                try:
                    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    conn.close()
            except sqlite3.Error as exc:  # a failed checkpoint only delays the next one
                log.warning("background WAL checkpoint failed: %s", exc)

        self._checkpoint = loop.run_in_executor(None, run)

    async def _heavy(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Whole-table work: in a thread on its own connection (inline for :memory:), after
        committing this process's write-behind window so that the work sees those writes."""
        if write:
            self._writable()
        if self._window:
            self._commit_window()

        def run_on(conn: sqlite3.Connection) -> T:
            if not write:
                return fn(conn)
            result = _begin_and_run(conn, fn, self._journal_dir)
            conn.execute("COMMIT")
            return result

        if self._memory:
            return run_on(self._conn)

        def in_thread() -> T:
            with self._heavy_lock:
                conn = self._connect()
                try:
                    return run_on(conn)
                finally:
                    conn.close()

        return await asyncio.to_thread(in_thread)

    # --- lookups -------------------------------------------------------------------------------
    async def get_unihash(self, method: str, taskhash: str) -> Row | None:
        u = self.unihash_now(method, taskhash)
        return None if u is None else {"taskhash": taskhash, "method": method, "unihash": u}

    # The stream modes' per-line lookups as plain functions: this database answers in the event
    # loop, so a stream line needs no coroutine.
    def unihash_now(self, method: str, taskhash: str) -> str | None:
        rows = self._conn.execute(
            "SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (method, taskhash)
        ).fetchall()
        return rows[0][0] if rows else None

    def unihash_exists_now(self, unihash: str) -> bool:
        return bool(self._conn.execute("SELECT 1 FROM unihashes_v3 WHERE unihash = ? LIMIT 1", (unihash,)).fetchall())

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

    def _equivalent(self, method: str, outhash: str, taskhash: str) -> Row | None:
        r = self._one(
            f"SELECT o.taskhash, u.unihash FROM {_JOIN} "
            "WHERE o.method = ? AND o.outhash = ? AND o.taskhash != ? "
            "ORDER BY o.created ASC, o.id ASC LIMIT 1",
            (method, outhash, taskhash),
        )
        return None if r is None else {"taskhash": r[0], "unihash": r[1]}

    async def get_equivalent_for_outhash(self, method: str, outhash: str, taskhash: str) -> Row | None:
        return self._equivalent(method, outhash, taskhash)

    async def unihash_exists(self, unihash: str) -> bool:
        return self.unihash_exists_now(unihash)

    async def class_of(self, hash_: str, methods: tuple[str, ...], limit: int) -> list[str]:
        """Hashes whose objects may be served for ``hash_``, best first (see the interface).

        Order: (1) the unihash(es) of ``hash_`` as a taskhash, (2) the taskhashes mapped to
        ``hash_`` when it is itself a unihash, (3) the other taskhashes sharing (1)'s unihash;
        within each group newest mapping first (``unihashes_v3.id`` descending). ``methods``
        (() = any) restricts every group. Deduplicated, ``hash_`` excluded, at most ``limit``.
        Every query is an index seek: the (method, taskhash) UNIQUE index for (1) (with the
        distinct methods found by index seeks when ``methods`` is empty), unihash_lookup_v1 for
        (2) and (3).
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

    def _generation_key(self) -> tuple[int, int]:
        return (self._conn.execute("PRAGMA data_version").fetchone()[0], self._conn.total_changes)

    async def generation(self) -> int:
        """Changes whenever anyone commits a change; strictly increasing for this instance.

        ``PRAGMA data_version`` moves when another connection (any process) commits;
        ``total_changes`` moves when this connection changes rows (no-op writes such as an
        ignored INSERT OR IGNORE do not count).
        """
        key = self._generation_key()
        if key != self._gen_key:
            self._gen_key = key
            self._gen += 1
        return self._gen

    # --- writes ----------------------------------------------------------------------------------
    @staticmethod
    def _outhash_params(row: Row) -> dict[str, Any]:
        data = {c: row[c] for c in OUTHASH_COLUMNS if row.get(c) is not None}
        for c in ("method", "taskhash", "outhash"):
            if c not in data:
                raise KeyError(c)
        data["created"] = utc_iso(data.get("created"))
        return data

    @staticmethod
    def _insert_outhash_sql(data: dict[str, Any]) -> str:
        cols = [c for c in OUTHASH_COLUMNS if c in data]  # whitelisted names only
        return (
            f"INSERT OR IGNORE INTO outhashes_v2 ({', '.join(cols)}) "
            f"VALUES ({', '.join(':' + c for c in cols)})"
        )

    _INSERT_UNIHASH = (
        "INSERT OR IGNORE INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES "
        "(?, ?, ?, COALESCE((SELECT value FROM config WHERE name = 'gc-mark'), ''))"
    )

    async def insert_outhash(self, row: Row) -> bool:
        """INSERT OR IGNORE into outhashes_v2; True if the row is new.

        Keys of ``row`` that are not outhashes_v2 columns are ignored; ``created`` defaults to
        now and is stored as UTC ISO text (a datetime is converted; a string kept as given).
        """
        self._writable()
        data = self._outhash_params(row)
        sql = self._insert_outhash_sql(data)
        if self.commit_interval:
            return await self._journaled(lambda c: c.execute(sql, data).rowcount > 0, lambda _: ["o", data])
        return self._write(lambda c: c.execute(sql, data).rowcount > 0)

    async def insert_unihash(self, method: str, taskhash: str, unihash: str) -> bool:
        def apply(c: sqlite3.Connection) -> bool:
            return c.execute(self._INSERT_UNIHASH, (method, taskhash, unihash)).rowcount > 0

        self._writable()
        if self.commit_interval:
            return await self._journaled(apply, lambda _: ["u", method, taskhash, unihash])
        return self._write(apply)

    async def insert_report(self, row: Row, client_unihash: str) -> Row:
        """The write half of `report` in ONE transaction; returns the stored mapping.

        Inserts the outhash row (INSERT OR IGNORE), looks up the oldest equivalent taskhash with
        the same method+outhash, stores its unihash (or ``client_unihash`` when there is none)
        with INSERT OR IGNORE, and returns ``{taskhash, method, unihash}`` as stored (the first
        writer's unihash if the taskhash was already mapped). The equivalence lookup always runs
        (the reference's sqlite behaviour). Upstream fallbacks are the caller's business: a
        caller with an upstream uses the separate methods instead.

        With write-behind on, the report is applied in the open window, journaled and answered
        (committed within ``commit_interval``). Otherwise, group commit: reports made in the
        same event-loop iteration (concurrent clients) are applied in arrival order inside one
        transaction, which gives exactly the results of applying them one by one but costs one
        commit; if that transaction fails, each report is retried in a transaction of its own
        so that one bad report fails alone.
        """
        self._writable()
        data = self._outhash_params(row)
        if self.commit_interval:
            return await self._journaled(lambda c: self._apply_report(c, data, client_unihash),
                                         lambda r: ["r", data, r["unihash"]])
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Row] = loop.create_future()
        self._reports.append((data, client_unihash, fut))
        if len(self._reports) == 1:
            loop.call_soon(self._flush_reports)
        return await fut

    def _apply_report(self, c: sqlite3.Connection, data: dict[str, Any], client_unihash: str) -> Row:
        method, taskhash, outhash = data["method"], data["taskhash"], data["outhash"]
        c.execute(self._insert_outhash_sql(data), data)
        eq = self._equivalent(method, outhash, taskhash)
        unihash = eq["unihash"] if eq else client_unihash
        if c.execute(self._INSERT_UNIHASH, (method, taskhash, unihash)).rowcount == 1:
            return {"taskhash": taskhash, "method": method, "unihash": unihash}  # ours is stored
        stored = c.execute(
            "SELECT unihash FROM unihashes_v3 WHERE method = ? AND taskhash = ?", (method, taskhash)
        ).fetchall()
        return {"taskhash": taskhash, "method": method, "unihash": stored[0][0] if stored else unihash}

    def _flush_reports(self) -> None:
        batch, self._reports = self._reports, []
        batch = [b for b in batch if not b[2].done()]  # cancelled callers
        if not batch:
            return
        try:
            results = self._write(lambda c: [self._apply_report(c, d, u) for d, u, _ in batch])
        except Exception:
            log.warning("a group commit of %d report(s) failed; retrying them one by one", len(batch))
            results = None
        if results is not None:
            for (_, _, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
            return
        for d, u, fut in batch:
            try:
                res = self._write(lambda c, d=d, u=u: self._apply_report(c, d, u))
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(res)

    # --- write-behind (see journal.py) ---------------------------------------------------------
    async def _journaled(self, apply: Callable[[sqlite3.Connection], T], record: Callable[[T], list]) -> T:
        """Apply one write in the open window and journal it before it is answered."""
        if not self._window:
            await self._open_window()
        conn = self._conn
        before = conn.total_changes
        try:
            result = apply(conn)
            if conn.total_changes != before:  # an ignored INSERT OR IGNORE needs no record
                assert self._journal is not None
                self._journal.append(record(result))
        except BaseException:
            self._reset_window()  # drops this write's rows (others come back from the journal)
            raise
        return result

    async def _open_window(self) -> None:
        """Take the write lock without blocking the event loop and open a window."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while not self._window:
            pause = self._cooldown_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            if _try_begin(self._conn):
                self._enter_window()
                return
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("database is locked (write-behind window)")
            journal.note_waiting(self._journal_dir)
            await asyncio.sleep(RETRY_S)

    def _enter_window(self) -> None:
        """After BEGIN: replay what the database lost, if anything, and arm the commit timer."""
        conn = self._conn
        try:
            if self._journal is None or self._journal.pid != os.getpid():
                self._journal = journal.Journal(self._journal_dir)
            if self._needs_replay:
                for rec in self._journal.records():
                    self._apply_record(conn, rec)
                self._needs_replay = False
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._window = True
        self._window_opened = time.monotonic()
        self._waiting_seen = journal.waiting_stamp(self._journal_dir)
        self._window_timer = asyncio.get_running_loop().call_later(self.commit_interval, self._commit_window)

    def quiet_moment(self) -> None:
        """A face has answered and is waiting for its client: commit a window that is old enough.

        Why: a commit writes every dirty page of the window (~0.4 ms for a dozen reports). From
        the timer it starts at an arbitrary moment and usually delays the next request; started
        right after an answer it runs while that client reads the answer and prepares its next
        call. Measured with bitbake's client before this: a sequential report cost ~40 us more
        with commits every 5 ms than with none during the run (commit_interval_ms 1000).
        """
        if self._window and time.monotonic() - self._window_opened >= self.commit_interval * QUIET_COMMIT_FRACTION:
            self._commit_window()

    def _disarm(self) -> None:
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None

    def _commit_window(self) -> None:
        self._disarm()
        if not self._window:
            return
        self._window = False
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("write-behind commit failed (%s); the journal keeps the writes, retrying", exc)
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            self._needs_replay = True
            self._retry_later()
            return
        assert self._journal is not None
        try:
            self._journal.clear()
        except OSError as exc:  # committed anyway; a replay of the leftovers changes nothing
            log.warning("could not truncate the journal: %s", exc)
        self._committed()
        if journal.waiting_stamp(self._journal_dir) != self._waiting_seen:  # a writer elsewhere waits: let it in
            self._cooldown_until = time.monotonic() + COOLDOWN_S

    def _reset_window(self) -> None:
        """A write failed inside the window: roll the window back and reopen it from the journal
        at once, so that this process keeps answering with every acknowledged write."""
        self._disarm()
        if self._window:
            self._window = False
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        self._needs_replay = True
        try:
            _begin(self._conn, self._journal_dir)
            self._enter_window()
        except Exception as exc:
            log.error("could not reopen the write-behind window (%s); retrying", exc)
            self._retry_later()

    def _retry_later(self) -> None:
        async def retry() -> None:
            if self._needs_replay and not self._window:
                try:
                    await self._open_window()
                except Exception as exc:
                    log.error("write-behind replay failed (%s); retrying", exc)
                    self._retry_later()

        with contextlib.suppress(RuntimeError):  # no loop: the next write or open replays
            asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(retry()))

    def _apply_record(self, c: sqlite3.Connection, rec: list) -> None:
        """Redo one journal record (INSERT OR IGNORE: replaying twice changes nothing)."""
        try:
            if rec[0] == "u":
                c.execute(self._INSERT_UNIHASH, (rec[1], rec[2], rec[3]))
                return
            data = rec[1]
            c.execute(self._insert_outhash_sql(data), data)
            if rec[0] == "r":
                c.execute(self._INSERT_UNIHASH, (data["method"], data["taskhash"], rec[2]))
        except (IndexError, KeyError, TypeError, sqlite3.InterfaceError, sqlite3.IntegrityError) as exc:
            log.warning("skipping a malformed journal record: %s", exc)

    def _replay_orphans(self) -> None:
        """Commit the journals of writers that died before committing (run at open)."""
        if self._journal_dir is None:
            return
        for orphan in journal.orphans(self._journal_dir):
            if not orphan.records:
                orphan.discard()
                continue
            try:
                _begin_and_run(self._conn, lambda c, o=orphan: [self._apply_record(c, r) for r in o.records],
                               self._journal_dir)
                self._conn.execute("COMMIT")
            except BaseException:
                orphan.release()
                raise
            log.info("replayed %d acknowledged write(s) from %s", len(orphan.records), orphan.path)
            orphan.discard()

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

        return await self._heavy(tx)

    async def clean_unused(self, oldest: datetime) -> int:
        """Delete outhash rows created before ``oldest`` whose (method, taskhash) has no unihash.

        ``created`` is compared as text, as bitbake does: right for the UTC ISO strings bitbake
        and this class write; legacy naive rows (``YYYY-MM-DD HH:MM:SS``) sort before any ISO
        string of the same day.
        """
        cutoff = utc_iso(oldest)

        def tx(c: sqlite3.Connection) -> int:
            return c.execute(
                "DELETE FROM outhashes_v2 WHERE created < ? AND NOT EXISTS (SELECT 1 FROM unihashes_v3 AS u"
                " WHERE u.method = outhashes_v2.method AND u.taskhash = outhashes_v2.taskhash)",
                (cutoff,),
            ).rowcount

        return await self._heavy(tx)

    @staticmethod
    def _set_config(c: sqlite3.Connection, name: str, value: str | None) -> None:
        c.execute(
            "INSERT INTO config (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

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
            self._set_config(c, GC_MARK_NAME, mark)
            if not clause:
                return 0
            return c.execute(f"UPDATE unihashes_v3 SET gc_mark = :_mark WHERE {clause}",
                             {**params, "_mark": mark}).rowcount

        return await self._heavy(tx)

    async def gc_sweep(self) -> int:
        """Delete every unihash row not carrying the current mark, then clear the mark.

        With no current mark nothing is deleted (as bitbake: ``gc_mark != NULL`` is never true).
        Checking that the caller names the current mark is the caller's job.
        """

        def tx(c: sqlite3.Connection) -> int:
            n = c.execute(
                "DELETE FROM unihashes_v3 WHERE gc_mark != (SELECT value FROM config WHERE name = 'gc-mark')"
            ).rowcount
            self._set_config(c, GC_MARK_NAME, None)
            return n

        return await self._heavy(tx)

    async def gc_status(self) -> tuple[int, int, str | None]:
        mark = await self.get_current_gc_mark()
        cur = mark or ""
        keep = self._one("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark = ?", (cur,))
        remove = self._one("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark != ?", (cur,))
        return (keep[0] if keep else 0, remove[0] if remove else 0, mark)

    async def get_current_gc_mark(self) -> str | None:
        r = self._one("SELECT value FROM config WHERE name = ?", (GC_MARK_NAME,))
        return None if r is None else r[0]

    async def get_usage(self) -> dict[str, dict[str, int]]:
        def count(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
            names = [r[0] for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )]
            usage = {}
            for name in names:
                quoted = '"' + name.replace('"', '""') + '"'
                usage[name] = {"rows": c.execute(f"SELECT COUNT(*) FROM {quoted}").fetchone()[0]}
            return usage

        return await self._heavy(count, write=False)

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

        def tx(c: sqlite3.Connection) -> bool:
            return c.execute(
                "INSERT OR IGNORE INTO users (username, token, permissions) VALUES (?, ?, ?)",
                (username, token_hash, perms),
            ).rowcount > 0

        return self._write(tx)

    async def set_user_token(self, username: str, token_hash: str) -> bool:
        return self._write(lambda c: c.execute(
            "UPDATE users SET token = ? WHERE username = ?", (token_hash, username)).rowcount > 0)

    async def set_user_perms(self, username: str, permissions: tuple[str, ...]) -> bool:
        perms = " ".join(permissions)
        return self._write(lambda c: c.execute(
            "UPDATE users SET permissions = ? WHERE username = ?", (perms, username)).rowcount > 0)

    async def delete_user(self, username: str) -> bool:
        return self._write(lambda c: c.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount > 0)

    # --- archive identity (storage dedup) -------------------------------------------------------
    # sstate-proxy's own table, created on first use; never touched by bitbake-hashserv code paths
    # (see storage.archive_identity: an archive identity is NOT an outhash).
    _ARCHIVES_DDL = (
        """CREATE TABLE IF NOT EXISTS sstate_proxy_archives (
            key TEXT PRIMARY KEY,
            identity TEXT NOT NULL,
            size INTEGER NOT NULL,
            canonical TEXT NOT NULL,
            created TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS sstate_proxy_archives_identity ON sstate_proxy_archives (identity)",
        "CREATE INDEX IF NOT EXISTS sstate_proxy_archives_canonical ON sstate_proxy_archives (canonical)",
    )

    def _archives_table(self) -> bool:
        """True once the table exists (created here unless read-only)."""
        if getattr(self, "_archives_ready", False):
            return True
        exists = self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sstate_proxy_archives'")
        if exists is None and not self.read_only:
            # not through _write: it rolls back transactions that change no rows (DDL doesn't)
            if self._window:
                self._commit_window()
            conn = self._conn
            _begin(conn, self._journal_dir)
            try:
                for ddl in self._ARCHIVES_DDL:
                    conn.execute(ddl)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            exists = (1,)
        self._archives_ready = exists is not None
        return self._archives_ready

    async def record_archive(self, key: str, identity: str, size: int) -> str:
        self._writable()
        self._archives_table()

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

        return self._write(tx)

    async def archive_alias(self, key: str) -> str | None:
        if not self._archives_table():
            return None
        r = self._one("SELECT canonical FROM sstate_proxy_archives WHERE key = ? AND canonical != key", (key,))
        return None if r is None else r[0]

    async def archive_aliases(self, canonical: str) -> list[str]:
        if not self._archives_table():
            return []
        return [r[0] for r in self._rows(
            "SELECT key FROM sstate_proxy_archives WHERE canonical = ? AND key != canonical ORDER BY rowid",
            (canonical,))]

    async def forget_archive(self, key: str, successor: str | None = None) -> int:
        self._writable()
        if not self._archives_table():
            return 0

        def tx(c: sqlite3.Connection) -> int:
            n = c.execute("DELETE FROM sstate_proxy_archives WHERE key = ?", (key,)).rowcount
            if successor is not None:
                c.execute("UPDATE sstate_proxy_archives SET canonical = ? WHERE canonical = ?", (successor, key))
            else:
                n += c.execute("DELETE FROM sstate_proxy_archives WHERE canonical = ?", (key,)).rowcount
            return n

        return self._write(tx)

    async def dedup_stats(self) -> dict[str, int]:
        if not self._archives_table():
            return {"objects": 0, "unique": 0, "bytes_saved": 0}
        r = self._one(
            "SELECT COUNT(*), COALESCE(SUM(canonical = key), 0), "
            "COALESCE(SUM(CASE WHEN canonical != key THEN size ELSE 0 END), 0) FROM sstate_proxy_archives")
        assert r is not None
        return {"objects": r[0], "unique": r[1], "bytes_saved": r[2]}

    async def close(self) -> None:
        if self._window:
            self._commit_window()
        if self._journal is not None:
            # A journal whose writes the database may lack stays for the next open to replay.
            self._journal.close(remove=not self._needs_replay)
            self._journal = None
        if self._checkpoint is not None:
            await self._checkpoint
            self._checkpoint = None
        self._conn.close()

