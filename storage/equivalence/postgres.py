"""The shared equivalence database: PostgreSQL, in bitbake-hashserv's own schema.

A database created and filled by ``bitbake-hashserv --database postgresql+asyncpg://...`` (its
SQLAlchemy engine) opens as it is, users keep their logins, and bitbake-hashserv can open it again
(sstate-proxy only adds tables and triggers named ``sstate_proxy_*``, which it ignores). Several
sstate-proxy replicas and bitbake-hashserv may use one database at the same time.

Driver: asyncpg. It is asyncio-native (no thread hop per query, unlike a sync driver in a thread),
has a bounded connection pool of its own, LISTEN/NOTIFY with callbacks on the event loop (what
``generation()`` is built on), reads ``PGPASSWORD``/``PGPASSFILE``/``~/.pgpass`` and the other
libpq environment variables itself, and is the driver bitbake-hashserv's own URL names
(``postgresql+asyncpg://``). psycopg 3 would do too, but needs its separate pool package and a
polling generator for notifications.

Semantics are the SQLite engine's (storage/equivalence/sqlite.py); where they are PostgreSQL's:

* **Connections.** One pool of at most ``pool_size`` connections per instance (per worker
  process), opened lazily on first use in the running event loop; idle connections close after
  a while. bitbake-hashserv on asyncpg holds one connection per client instead: a fleet sharing
  one PostgreSQL should size ``max_connections`` for workers x pool_size plus that.
* **Transactions.** Every write is one transaction on one pooled connection (READ COMMITTED),
  answered after its commit. First writer wins through ``INSERT ... ON CONFLICT DO NOTHING``, as
  bitbake's engine writes. A report takes ``pg_advisory_xact_lock`` on (method, outhash) first,
  so concurrent first reports of one outhash (two taskhashes, any replica) are serialised and the
  second takes the first one's unihash, as SQLite's single writer gives; concurrent first reports
  of one taskhash end with one unihash through the unique index (the second reader sees the
  first commit). No group commit: PostgreSQL's own commit path batches WAL flushes.
* **Unavailable.** Any connection-level failure (refused, reset, server shut down, too many
  connections, a connect or pool wait past ``CONNECT_TIMEOUT_S``) raises ``DatabaseUnavailable``
  (the HTTP layer answers 503 + Retry-After). The pool replaces broken connections on the next
  acquire, so service resumes by itself when PostgreSQL is back.
* **created** is written as bitbake's PostgreSQL engine writes it: ``timestamp without time
  zone`` holding local time (``datetime.now()``); an aware datetime or ISO string is converted to
  local time first. It is read back as bitbake returns it: ISO text without a zone
  (``2026-12-03T03:20:59.296026``).
* **generation()** is a local counter moved by PostgreSQL notifications: migration 2 installs
  statement-level triggers on unihashes_v3, outhashes_v2 and sstate_proxy_archives that
  ``pg_notify('sstate_proxy_equivalence', table)`` whenever a statement changed a row, whoever
  wrote it (another replica, bitbake-hashserv, psql). Each instance keeps one dedicated
  listening connection; a notification bumps the counter (delivered after the commit, usually
  within milliseconds). The counter also moves when the listener (re)connects (notifications
  may have been missed) and on every call while it is not connected (no cache can be trusted
  then); a write of this instance that changed a row bumps it at once. It never touches the
  database, so it never fails.
* **Migrations**: storage.equivalence.migrations, in one transaction under an advisory lock.
* Mixed-case columns ``PN``, ``PV``, ``PR`` are always double-quoted.
* Needs PostgreSQL 11 or newer (statement triggers with transition tables, ``EXECUTE FUNCTION``,
  ``hashtextextended``). Connect to PostgreSQL directly or through a session-mode pooler:
  LISTEN and asyncpg's prepared statements need a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from storage.equivalence import (
    COPY_COLUMNS,
    MAPPINGS_BATCH,
    OUTHASH_COLUMNS,
    OUTHASH_TEXT_COLUMNS,
    REMOVALS_BATCH,
    REMOVALS_KEEP_S,
    UNIHASH_COLUMNS,
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
from storage.equivalence.schema import pg_ident

log = logging.getLogger("sstate_proxy.equivalence.postgres")

T = TypeVar("T")

DEFAULT_POOL_SIZE = 10
# Bound on connecting (and on waiting for a free pooled connection) before DatabaseUnavailable.
CONNECT_TIMEOUT_S = 5.0
# A statement running longer than this is cancelled (DatabaseUnavailable); whole-table jobs
# (remove, gc) get the longer bound.
COMMAND_TIMEOUT_S = 60.0
BULK_TIMEOUT_S = 3600.0
IDLE_CONNECTION_S = 300.0
# The listener's health check and reconnect back-off.
LISTENER_PING_S = 10.0
LISTENER_RETRY_MAX_S = 5.0
GC_MARK_NAME = "gc-mark"
# The transaction advisory lock every removal-log append holds: appends commit one at a time, in
# sequence order, so a reader that has seen position N can never later find a smaller one
# committed ("sslr").
REMOVALS_LOCK = 0x73736C72

_UNIHASH_ONLY = tuple(c for c in UNIHASH_COLUMNS if c not in OUTHASH_COLUMNS)
_OUTHASH_KEYS = ("id", *OUTHASH_COLUMNS)
_OUTHASH_SELECT = ", ".join(f"o.{pg_ident(c)}" for c in _OUTHASH_KEYS)
_FULL_SELECT = _OUTHASH_SELECT + ", u.unihash, u.gc_mark"
_JOIN = "outhashes_v2 AS o JOIN unihashes_v3 AS u ON u.method = o.method AND u.taskhash = o.taskhash"

_EQUIVALENT_SQL = (
    f"SELECT o.taskhash, u.unihash FROM {_JOIN} "
    "WHERE o.method = $1 AND o.outhash = $2 AND o.taskhash != $3 "
    "ORDER BY o.created ASC, o.id ASC LIMIT 1"
)
_UNIHASH_SQL = "SELECT unihash FROM unihashes_v3 WHERE method = $1 AND taskhash = $2"
_INSERT_UNIHASH = (
    "INSERT INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES "
    "($1, $2, $3, COALESCE((SELECT value FROM config WHERE name = 'gc-mark'), '')) "
    "ON CONFLICT (method, taskhash) DO NOTHING"
)
_SET_CONFIG = (
    "INSERT INTO config (name, value) VALUES ($1, $2) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
# The distinct methods of unihashes_v3 by index seeks (loose index scan), as in the SQLite engine.
_ALL_METHODS_CTE = """
    WITH RECURSIVE m(x) AS (
        SELECT MIN(method) FROM unihashes_v3
        UNION ALL
        SELECT (SELECT MIN(method) FROM unihashes_v3 WHERE method > m.x) FROM m WHERE m.x IS NOT NULL
    )"""

# Failures that mean "the database is not reachable now", not "this request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,  # 08xxx, and the driver's "connection was closed"
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # 40xxx: serialization failure, deadlock: retry
    # The driver's state machine after the server ended an idle connection under it
    # ("cannot switch to state ..."): that connection is unusable.
    asyncpg.exceptions.InternalClientError,
)


class MigrationError(RuntimeError):
    """The schema migrations could not be applied (not a transient fault)."""


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    # The driver's own "connection is closed" / "pool is closing" (no SQLSTATE).
    return isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc)


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"the equivalence database (PostgreSQL) is unavailable: "
                               f"{type(exc).__name__}: {exc}")


def parse_url(url: str) -> str:
    """The DSN asyncpg connects with, from a ``postgresql://``, ``postgres://`` or SQLAlchemy-style
    ``postgresql+asyncpg://`` (any ``+driver``) URL. ValueError when it is malformed.

    The password may be in the URL, or come from ``PGPASSWORD`` or the password file
    (``PGPASSFILE``, default ``~/.pgpass``): asyncpg reads those itself, as libpq does.
    """
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if not sep or base not in ("postgresql", "postgres"):
        raise ValueError(f"bad PostgreSQL url: must start with postgresql:// (got {redact(url)!r})")
    dsn = "postgresql://" + rest
    try:
        parts = urllib.parse.urlsplit(dsn)
        for host_port in parts.netloc.rpartition("@")[2].split(","):
            hp = host_port.rsplit("]", 1)[-1]  # [v6]:port
            if ":" in hp and hp.rsplit(":", 1)[1] and not hp.rsplit(":", 1)[1].isdigit():
                raise ValueError(f"bad port {hp.rsplit(':', 1)[1]!r}")
    except ValueError as exc:
        raise ValueError(f"bad PostgreSQL url {redact(url)!r}: {exc}") from None
    if parts.fragment:
        raise ValueError(f"bad PostgreSQL url {redact(url)!r}: unexpected '#'")
    return dsn


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hosts}{slash}{path}"


def to_created(value: datetime | str | None) -> datetime:
    """``created`` as bitbake's PostgreSQL engine stores it: a naive local datetime."""
    if value is None:
        return datetime.now()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"bad value for column 'created': {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone().replace(tzinfo=None)  # to local time, as bitbake's now()
    return value


def _text(col: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"bad value for column {col!r}: {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _row(keys: Iterable[str], record: asyncpg.Record | None) -> Row | None:
    if record is None:
        return None
    out = dict(zip(keys, record, strict=True))
    created = out.get("created")
    if isinstance(created, datetime):
        out["created"] = created.isoformat()
    return out


class _Conditions:
    """`col = $n AND ...` for the whitelisted columns named in `where` (None values ignored).

    Only names from module constants ever reach the SQL text; values are parameters.
    """

    def __init__(self) -> None:
        self.params: list[Any] = []

    def clause(self, columns: Iterable[str], where: dict[str, Any], prefix: str = "") -> str:
        parts = []
        for col in columns:
            value = where.get(col)
            if value is not None:
                self.params.append(_text(col, value))
                parts.append(f"{prefix}{pg_ident(col)} = ${len(self.params)}")
        return " AND ".join(parts)


# db copy: the integer columns that are not text in this engine, and the tables without an id
# (read in key order).
_BIGINT_COLUMNS = frozenset(("size", "bucket", "requests", "bytes"))
_COPY_ORDER = {"sstate_proxy_archives": "created, key", "sstate_proxy_objects": "key",
               "sstate_proxy_traffic": "bucket, source, recipe"}


def _count(status: str) -> int:
    """Rows touched, from a command status such as ``INSERT 0 1`` or ``DELETE 3``."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


def _outhash_params(row: Row) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for c in OUTHASH_COLUMNS:
        value = row.get(c)
        if value is None or c == "created":
            continue
        data[c] = _text(c, value)
    for c in ("method", "taskhash", "outhash"):
        if c not in data:
            raise KeyError(c)
    data["created"] = to_created(row.get("created"))
    return data


def _insert_outhash_sql(data: dict[str, Any]) -> tuple[str, list[Any]]:
    cols = [c for c in OUTHASH_COLUMNS if c in data]
    sql = (
        f"INSERT INTO outhashes_v2 ({', '.join(pg_ident(c) for c in cols)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(cols) + 1))}) "
        "ON CONFLICT (method, taskhash, outhash) DO NOTHING"
    )
    return sql, [data[c] for c in cols]


async def _apply_migrations(conn: asyncpg.Connection) -> list[int]:
    """The missing migrations, each once, in one transaction under an advisory lock.

    A database with every migration applied is only read (no lock, no DDL), so a role that may
    read and write the tables but not create anything can use a database migrated by its owner.
    """
    wanted = {m.version for m in migrations.MIGRATIONS}
    if await conn.fetchval("SELECT to_regclass('sstate_proxy_migrations') IS NOT NULL"):
        if wanted <= {r[0] for r in await conn.fetch("SELECT version FROM sstate_proxy_migrations")}:
            return []
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", migrations.MIGRATION_LOCK)
        await conn.execute(schema.pg_create_table(schema.MIGRATIONS))
        done = {r[0] for r in await conn.fetch("SELECT version FROM sstate_proxy_migrations")}
        for m in migrations.MIGRATIONS:
            if m.version in done:
                continue
            log.info("applying migration %d: %s", m.version, m.name)
            for statement in m.postgres:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO sstate_proxy_migrations (version, name, applied) VALUES ($1, $2, $3)",
                m.version, m.name, migrations.now_text())
            applied.append(m.version)
    return applied


class PostgresEquivalenceDB:
    """bitbake-hashserv's PostgreSQL database behind the EquivalenceDB interface."""

    def __init__(self, url: str, *, read_only: bool = False, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.dsn = parse_url(url)
        self.url = redact(url)
        self.read_only = read_only
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._gen = 0
        self._listening = False
        self._listener_task: asyncio.Task[None] | None = None
        self._listener_conn: asyncpg.Connection | None = None
        self._has_archives = not read_only  # a read-only open of a bitbake-made db may lack it

    # --- connections -----------------------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S, "command_timeout": COMMAND_TIMEOUT_S}
        if self.read_only:
            kw["server_settings"] = {"default_transaction_read_only": "on"}
        return kw

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise DatabaseUnavailable("the equivalence database is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._pool is not None:
                return self._pool
            kw = self._connect_kwargs()
            try:
                if not self.read_only:
                    conn = await asyncpg.connect(self.dsn, **kw)
                    try:
                        applied = await _apply_migrations(conn)
                    except asyncpg.PostgresError as exc:
                        if _is_unavailable(exc):
                            raise
                        # e.g. the role may not create triggers: say so once, clearly
                        raise MigrationError(
                            f"database {self.url}: applying sstate-proxy's schema migrations failed "
                            f"({type(exc).__name__}: {exc}); connect as the role that owns "
                            "bitbake-hashserv's tables") from exc
                    finally:
                        await conn.close()
                    if applied:
                        log.info("database %s: applied migrations %s", self.url, applied)
                pool = await asyncpg.create_pool(
                    self.dsn, min_size=0, max_size=self.pool_size,
                    max_inactive_connection_lifetime=IDLE_CONNECTION_S, **kw)
            except Exception as exc:
                if _is_unavailable(exc):
                    raise _unavailable(exc) from exc
                raise
            self._pool = pool
            self._start_listener()
            return pool

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, write: bool = False) -> T:
        """``fn(conn)`` on a pooled connection (in a transaction when ``write``); connection-level
        failures become DatabaseUnavailable.

        A pooled connection that broke while idle (the server restarted) fails its first use; it
        is thrown away and the call is tried once more on a new connection: a read always, a
        write only when the failure came before its transaction began (nothing was sent, so it
        cannot have been committed).
        """
        if write and self.read_only:
            raise ReadOnlyError("the equivalence database is open read-only")
        pool = await self._get_pool()
        for attempt in (1, 2):
            began = False
            try:
                async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                    try:
                        if not write:
                            return await fn(conn)
                        tr = conn.transaction()
                        await tr.start()
                        began = True
                        try:
                            result = await fn(conn)
                        except BaseException:
                            with contextlib.suppress(Exception):
                                await tr.rollback()
                            raise
                        await tr.commit()
                        return result
                    except Exception as exc:
                        if _is_unavailable(exc):  # never hand it out again; the pool makes a new one
                            with contextlib.suppress(asyncpg.InterfaceError):  # already dropped
                                conn.terminate()
                        raise
            except Exception as exc:
                if not _is_unavailable(exc):
                    raise
                if attempt == 1 and not began and not isinstance(exc, OSError | asyncio.TimeoutError):
                    continue  # a stale connection (a refused or timed-out connect is not retried)
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._run(lambda c: c.fetchrow(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run(lambda c: c.fetch(sql, *args))

    # --- generation: LISTEN/NOTIFY ---------------------------------------------------------------
    def _start_listener(self) -> None:
        if self._listener_task is None and not self._closed:
            self._listener_task = asyncio.get_running_loop().create_task(
                self._listen(), name="equivalence-listener")

    def _notified(self, *_: Any) -> None:
        self._gen += 1

    async def _listen(self) -> None:
        """Keep one connection LISTENing on the change channel; reconnect when it drops."""
        delay = 0.1
        while not self._closed:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
                lost = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(lambda _c, lost=lost: lost.done() or lost.set_result(None))
                await conn.add_listener(migrations.NOTIFY_CHANNEL, self._notified)
                self._listener_conn = conn
                self._listening = True
                self._gen += 1  # notifications may have been missed while not listening
                delay = 0.1
                while not lost.done():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(lost), LISTENER_PING_S)
                    if not lost.done():
                        await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening:
                    log.warning("equivalence change listener lost its connection: %s", exc)
            finally:
                self._listening = False
                self._listener_conn = None
                if conn is not None:
                    conn.terminate()
            if self._closed:
                return
            self._gen += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTENER_RETRY_MAX_S)

    async def generation(self) -> int:
        """Changes whenever anyone commits a change (see the module docstring); never fails."""
        if self._listener_task is None and not self._closed:
            self._start_listener()
        conn = self._listener_conn
        if not self._listening or conn is None or conn.is_closed():
            self._gen += 1  # nothing can be trusted while no notification can arrive
        return self._gen

    async def mappings_since(self, after: int | None) -> tuple[int, list[str] | None]:
        """An index range read. Ids come from a sequence at insert time, so a transaction that
        commits after a later id was read is not listed: the callers' TTLs bound that case."""
        if after is None:
            return int(await self._run(lambda c: c.fetchval("SELECT COALESCE(MAX(id), 0) FROM unihashes_v3"))), []
        rows = await self._fetch("SELECT id, taskhash, unihash FROM unihashes_v3 WHERE id > $1 ORDER BY id LIMIT $2",
                                 after, MAPPINGS_BATCH + 1)
        return mapping_feed(after, rows)

    def _changed(self, n: int | bool) -> None:
        if n:
            self._gen += 1

    # --- lookups -------------------------------------------------------------------------------
    async def get_unihash(self, method: str, taskhash: str) -> Row | None:
        r = await self._fetchrow(_UNIHASH_SQL, method, taskhash)
        return None if r is None else {"taskhash": taskhash, "method": method, "unihash": r[0]}

    async def get_unihash_full(self, method: str, taskhash: str) -> Row | None:
        r = await self._fetchrow(
            f"SELECT {_FULL_SELECT} FROM {_JOIN} WHERE o.method = $1 AND o.taskhash = $2 "
            "ORDER BY o.created ASC, o.id ASC LIMIT 1", method, taskhash)
        return _row((*_OUTHASH_KEYS, "unihash", "gc_mark"), r)

    async def get_outhash(self, method: str, outhash: str, with_unihash: bool = True) -> Row | None:
        if with_unihash:
            r = await self._fetchrow(
                f"SELECT {_FULL_SELECT} FROM {_JOIN} WHERE o.method = $1 AND o.outhash = $2 "
                "ORDER BY o.created ASC, o.id ASC LIMIT 1", method, outhash)
            return _row((*_OUTHASH_KEYS, "unihash", "gc_mark"), r)
        r = await self._fetchrow(
            f"SELECT {_OUTHASH_SELECT} FROM outhashes_v2 AS o WHERE o.method = $1 AND o.outhash = $2 "
            "ORDER BY o.created ASC, o.id ASC LIMIT 1", method, outhash)
        return _row(_OUTHASH_KEYS, r)

    async def get_equivalent_for_outhash(self, method: str, outhash: str, taskhash: str) -> Row | None:
        r = await self._fetchrow(_EQUIVALENT_SQL, method, outhash, taskhash)
        return None if r is None else {"taskhash": r[0], "unihash": r[1]}

    async def unihash_exists(self, unihash: str) -> bool:
        return await self._fetchrow("SELECT 1 FROM unihashes_v3 WHERE unihash = $1 LIMIT 1", unihash) is not None

    async def class_of(self, hash_: str, methods: tuple[str, ...], limit: int) -> list[str]:
        """Hashes whose objects may be served for ``hash_``, best first: the same order and
        queries as the SQLite engine's ``class_of`` (all index seeks), on one pooled connection."""
        if limit <= 0:
            return []
        mlist = list(methods)

        async def run(c: asyncpg.Connection) -> list[str]:
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

            if mlist:
                own = await c.fetch("SELECT unihash FROM unihashes_v3 WHERE method = ANY($1::text[]) "
                                    "AND taskhash = $2 ORDER BY id DESC", mlist, hash_)
                members = ("SELECT taskhash FROM unihashes_v3 WHERE unihash = $1 AND method = ANY($3::text[]) "
                           "ORDER BY id DESC LIMIT $2")
                extra: tuple[Any, ...] = (mlist,)
            else:
                own = await c.fetch(
                    _ALL_METHODS_CTE + " SELECT unihash FROM unihashes_v3 WHERE method IN "
                    "(SELECT x FROM m WHERE x IS NOT NULL) AND taskhash = $1 ORDER BY id DESC", hash_)
                members = "SELECT taskhash FROM unihashes_v3 WHERE unihash = $1 ORDER BY id DESC LIMIT $2"
                extra = ()
            unihashes = list(dict.fromkeys(r[0] for r in own))
            if add(unihashes):
                return out
            if add(r[0] for r in await c.fetch(members, hash_, limit + 1, *extra)):
                return out
            for u in unihashes:
                if u == hash_:
                    continue
                if add(r[0] for r in await c.fetch(members, u, limit + len(seen), *extra)):
                    break
            return out

        return await self._run(run)

    # --- writes (each answered after its commit) ------------------------------------------------
    async def insert_outhash(self, row: Row) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING into outhashes_v2; True if the row is new."""
        data = _outhash_params(row)
        sql, args = _insert_outhash_sql(data)
        n = _count(await self._run(lambda c: c.execute(sql, *args), write=True))
        self._changed(n)
        return n > 0

    async def insert_unihash(self, method: str, taskhash: str, unihash: str) -> bool:
        n = _count(await self._run(lambda c: c.execute(_INSERT_UNIHASH, method, taskhash, unihash), write=True))
        self._changed(n)
        return n > 0

    async def insert_report(self, row: Row, client_unihash: str) -> Row:
        """The write half of `report` in ONE transaction; returns the stored mapping (see the
        SQLite engine). Serialised per (method, outhash) by a transaction advisory lock."""
        data = _outhash_params(row)
        sql, args = _insert_outhash_sql(data)
        method, taskhash, outhash = data["method"], data["taskhash"], data["outhash"]

        async def tx(c: asyncpg.Connection) -> tuple[Row, int]:
            await c.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{method} {outhash}")
            n = _count(await c.execute(sql, *args))
            eq = await c.fetchrow(_EQUIVALENT_SQL, method, outhash, taskhash)
            unihash = eq[1] if eq else client_unihash
            if _count(await c.execute(_INSERT_UNIHASH, method, taskhash, unihash)) == 1:
                return {"taskhash": taskhash, "method": method, "unihash": unihash}, n + 1
            stored = await c.fetchval(_UNIHASH_SQL, method, taskhash)
            return {"taskhash": taskhash, "method": method, "unihash": stored or unihash}, n

        result, n = await self._run(tx, write=True)
        self._changed(n)
        return result

    async def remove(self, where: dict[str, Any]) -> int:
        """Delete matching rows from both hash tables (the SQLite engine's rules, including its
        deviation for unihash-only columns); the total number of rows deleted."""
        if not isinstance(where, dict):
            raise TypeError("where must be a dict")
        oc = _Conditions()
        o_clause = oc.clause(OUTHASH_COLUMNS, where, "outhashes_v2.")
        if any(where.get(c) is not None for c in _UNIHASH_ONLY) and o_clause:
            tied = oc.clause(UNIHASH_COLUMNS, where, "u.")
            o_clause += (" AND EXISTS (SELECT 1 FROM unihashes_v3 AS u WHERE u.method = outhashes_v2.method"
                         f" AND u.taskhash = outhashes_v2.taskhash AND {tied})")
        uc = _Conditions()
        u_clause = uc.clause(UNIHASH_COLUMNS, where)

        async def tx(c: asyncpg.Connection) -> int:
            count = 0
            if o_clause:
                count += _count(await c.execute(f"DELETE FROM outhashes_v2 WHERE {o_clause}", *oc.params,
                                                timeout=BULK_TIMEOUT_S))
            if u_clause:
                count += _count(await c.execute(f"DELETE FROM unihashes_v3 WHERE {u_clause}", *uc.params,
                                                timeout=BULK_TIMEOUT_S))
            return count

        n = await self._run(tx, write=True)
        self._changed(n)
        return n

    async def clean_unused(self, oldest: datetime) -> int:
        """Delete outhash rows created before ``oldest`` whose (method, taskhash) has no unihash."""
        cutoff = to_created(oldest)
        n = _count(await self._run(lambda c: c.execute(
            "DELETE FROM outhashes_v2 WHERE created < $1 AND NOT EXISTS (SELECT 1 FROM unihashes_v3 AS u"
            " WHERE u.method = outhashes_v2.method AND u.taskhash = outhashes_v2.taskhash)",
            cutoff, timeout=BULK_TIMEOUT_S), write=True))
        self._changed(n)
        return n

    async def gc_mark(self, mark: str, where: dict[str, Any]) -> int:
        if not isinstance(mark, str):
            raise TypeError("mark must be a string")
        if not isinstance(where, dict):
            raise TypeError("where must be a dict")
        cond = _Conditions()
        cond.params.append(mark)
        clause = cond.clause(UNIHASH_COLUMNS, where)

        async def tx(c: asyncpg.Connection) -> int:
            await c.execute(_SET_CONFIG, GC_MARK_NAME, mark)
            if not clause:
                return 0
            return _count(await c.execute(f"UPDATE unihashes_v3 SET gc_mark = $1 WHERE {clause}", *cond.params,
                                          timeout=BULK_TIMEOUT_S))

        n = await self._run(tx, write=True)
        self._changed(n)
        return n

    async def gc_sweep(self) -> int:
        async def tx(c: asyncpg.Connection) -> int:
            n = _count(await c.execute(
                "DELETE FROM unihashes_v3 WHERE gc_mark != (SELECT value FROM config WHERE name = 'gc-mark')",
                timeout=BULK_TIMEOUT_S))
            await c.execute(_SET_CONFIG, GC_MARK_NAME, None)
            return n

        n = await self._run(tx, write=True)
        self._changed(n)
        return n

    async def gc_status(self) -> tuple[int, int, str | None]:
        async def run(c: asyncpg.Connection) -> tuple[int, int, str | None]:
            mark = await c.fetchval("SELECT value FROM config WHERE name = $1", GC_MARK_NAME)
            keep = await c.fetchval("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark = $1", mark or "",
                                    timeout=BULK_TIMEOUT_S)
            remove = await c.fetchval("SELECT COUNT(*) FROM unihashes_v3 WHERE gc_mark != $1", mark or "",
                                      timeout=BULK_TIMEOUT_S)
            return keep, remove, mark

        return await self._run(run)

    async def get_current_gc_mark(self) -> str | None:
        return await self._run(lambda c: c.fetchval("SELECT value FROM config WHERE name = $1", GC_MARK_NAME))

    async def get_usage(self) -> dict[str, dict[str, int]]:
        """Row counts of the tables of the current schema, sstate-proxy's own left out."""
        async def run(c: asyncpg.Connection) -> dict[str, dict[str, int]]:
            names = [r[0] for r in await c.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_type = 'BASE TABLE' ORDER BY table_name")]
            usage = {}
            for name in names:
                if name in schema.OWN_TABLES:
                    continue
                quoted = '"' + name.replace('"', '""') + '"'
                usage[name] = {"rows": await c.fetchval(f"SELECT COUNT(*) FROM {quoted}", timeout=BULK_TIMEOUT_S)}
            return usage

        return await self._run(run)

    async def get_query_columns(self) -> list[str]:
        return list(dict.fromkeys((*UNIHASH_COLUMNS, *OUTHASH_TEXT_COLUMNS)))

    # --- users ---------------------------------------------------------------------------------
    @staticmethod
    def _user(r: asyncpg.Record | None) -> User | None:
        if r is None:
            return None
        return User(username=r[0], token_hash=r[1], permissions=tuple((r[2] or "").split()))

    async def lookup_user(self, username: str) -> User | None:
        return self._user(await self._fetchrow(
            "SELECT username, token, permissions FROM users WHERE username = $1", username))

    async def get_all_users(self) -> list[User]:
        return [self._user(r) for r in await self._fetch(  # type: ignore[misc]
            "SELECT username, token, permissions FROM users ORDER BY username")]

    async def new_user(self, username: str, permissions: tuple[str, ...], token_hash: str) -> bool:
        perms = " ".join(permissions)
        return _count(await self._run(lambda c: c.execute(
            "INSERT INTO users (username, token, permissions) VALUES ($1, $2, $3) "
            "ON CONFLICT (username) DO NOTHING", username, token_hash, perms), write=True)) > 0

    async def set_user_token(self, username: str, token_hash: str) -> bool:
        return _count(await self._run(lambda c: c.execute(
            "UPDATE users SET token = $1 WHERE username = $2", token_hash, username), write=True)) > 0

    async def set_user_perms(self, username: str, permissions: tuple[str, ...]) -> bool:
        perms = " ".join(permissions)
        return _count(await self._run(lambda c: c.execute(
            "UPDATE users SET permissions = $1 WHERE username = $2", perms, username), write=True)) > 0

    async def delete_user(self, username: str) -> bool:
        return _count(await self._run(lambda c: c.execute(
            "DELETE FROM users WHERE username = $1", username), write=True)) > 0

    # --- archive identity (storage dedup) -------------------------------------------------------
    async def _own_read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], empty: T) -> T:
        """A read of one of sstate-proxy's own tables (dedup, catalog, traffic); ``empty`` on a read-only
        open of a database this service never migrated (no such table)."""
        try:
            return await self._run(fn)
        except asyncpg.UndefinedTableError:
            if self.read_only:
                return empty
            raise

    async def record_archive(self, key: str, identity: str, size: int) -> str:
        async def tx(c: asyncpg.Connection) -> tuple[str, bool]:
            # Concurrent first records of one identity: serialised, so exactly one is canonical.
            await c.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))", identity)
            r = await c.fetchval("SELECT canonical FROM sstate_proxy_archives WHERE key = $1", key)
            if r is not None:
                return r, False
            r = await c.fetchval(
                "SELECT key FROM sstate_proxy_archives WHERE identity = $1 AND canonical = key "
                "ORDER BY created, key LIMIT 1", identity)
            canonical = r if r is not None else key
            await c.execute(
                "INSERT INTO sstate_proxy_archives (key, identity, size, canonical, created) "
                "VALUES ($1, $2, $3, $4, $5)", key, identity, int(size), canonical, migrations.now_text())
            return canonical, True

        canonical, new = await self._run(tx, write=True)
        self._changed(new)
        return canonical

    async def archive_alias(self, key: str) -> str | None:
        return await self._own_read(lambda c: c.fetchval(
            "SELECT canonical FROM sstate_proxy_archives WHERE key = $1 AND canonical != key", key), None)

    async def archive_aliases(self, canonical: str) -> list[str]:
        rows = await self._own_read(lambda c: c.fetch(
            "SELECT key FROM sstate_proxy_archives WHERE canonical = $1 AND key != canonical "
            "ORDER BY created, key", canonical), [])
        return [r[0] for r in rows]

    async def forget_archive(self, key: str, successor: str | None = None) -> int:
        async def tx(c: asyncpg.Connection) -> int:
            n = _count(await c.execute("DELETE FROM sstate_proxy_archives WHERE key = $1", key))
            if successor is not None:
                await c.execute("UPDATE sstate_proxy_archives SET canonical = $1 WHERE canonical = $2",
                                successor, key)
            else:
                n += _count(await c.execute("DELETE FROM sstate_proxy_archives WHERE canonical = $1", key))
            return n

        n = await self._run(tx, write=True)
        self._changed(n)
        return n

    async def dedup_stats(self) -> dict[str, int]:
        r = await self._own_read(lambda c: c.fetchrow(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE canonical = key), "
            "COALESCE(SUM(size) FILTER (WHERE canonical != key), 0) FROM sstate_proxy_archives"), None)
        if r is None:
            return {"objects": 0, "unique": 0, "bytes_saved": 0}
        return {"objects": int(r[0]), "unique": int(r[1]), "bytes_saved": int(r[2])}

    # --- the object catalog (retention) ----------------------------------------------------------
    # No trigger on sstate_proxy_objects: its writes never move generation() (migration 3).

    async def touch_objects(self, accessed: Mapping[str, float]) -> None:
        if not accessed:
            return
        keys = sorted(accessed)  # one lock order for every writer: concurrent flushes never deadlock
        times = [float(accessed[k]) for k in keys]
        await self._run(lambda c: c.execute(
            "INSERT INTO sstate_proxy_objects (key, size, origin, last_access) "
            "SELECT k, 0, 'local', t FROM unnest($1::text[], $2::float8[]) WITH ORDINALITY AS r(k, t, o) "
            "ORDER BY o ON CONFLICT (key) DO UPDATE SET last_access = excluded.last_access "
            "WHERE excluded.last_access > sstate_proxy_objects.last_access",
            keys, times, timeout=BULK_TIMEOUT_S), write=True)

    async def record_object(self, key: str, size: int, origin: str, when: float) -> None:
        check_origin(origin)
        await self._run(lambda c: c.execute(
            "INSERT INTO sstate_proxy_objects (key, size, origin, last_access) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (key) DO UPDATE SET size = excluded.size, origin = excluded.origin, "
            "last_access = GREATEST(sstate_proxy_objects.last_access, excluded.last_access)",
            key, int(size), origin, float(when)), write=True)

    async def object_usage(self, origin: str | None = None) -> tuple[int, int]:
        sql = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM sstate_proxy_objects"
        args: tuple[Any, ...] = ()
        if origin is not None:
            sql, args = sql + " WHERE origin = $1", (check_origin(origin),)
        r = await self._own_read(lambda c: c.fetchrow(sql, *args, timeout=BULK_TIMEOUT_S), None)
        return (0, 0) if r is None else (int(r[0]), int(r[1]))

    async def lru_objects(self, origin: str | None, limit: int) -> list[ObjectRow]:
        if limit <= 0:
            return []
        select = "SELECT key, size, origin, last_access FROM sstate_proxy_objects"
        if origin is None:
            sql, args = f"{select} ORDER BY last_access LIMIT $1", (limit,)
        else:
            sql, args = f"{select} WHERE origin = $1 ORDER BY last_access LIMIT $2", (check_origin(origin), limit)
        rows = await self._own_read(lambda c: c.fetch(sql, *args, timeout=BULK_TIMEOUT_S), [])
        return [ObjectRow(r[0], int(r[1]), r[2], float(r[3])) for r in rows]

    async def iter_objects(self, batch: int = 5000) -> AsyncIterator[list[ObjectRow]]:
        """Every row in key order through a cursor in one read-only REPEATABLE READ transaction."""
        if batch <= 0:
            raise ValueError("batch must be positive")
        pool = await self._get_pool()
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                if not await conn.fetchval("SELECT to_regclass('sstate_proxy_objects') IS NOT NULL"):
                    return
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    cursor = await conn.cursor(
                        "SELECT key, size, origin, last_access FROM sstate_proxy_objects ORDER BY key")
                    while True:
                        records = await cursor.fetch(batch, timeout=BULK_TIMEOUT_S)
                        if not records:
                            break
                        yield [ObjectRow(r[0], int(r[1]), r[2], float(r[3])) for r in records]
        except Exception as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    async def forget_objects(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        keys = list(keys)
        now = time.time()

        async def tx(c: asyncpg.Connection) -> int:
            await c.execute("SELECT pg_advisory_xact_lock($1)", REMOVALS_LOCK)
            # rows locked in key order, as touch_objects locks them: the two never deadlock
            n = _count(await c.execute(
                "DELETE FROM sstate_proxy_objects WHERE key IN (SELECT key FROM sstate_proxy_objects "
                "WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE)", keys, timeout=BULK_TIMEOUT_S))
            await c.execute(
                "INSERT INTO sstate_proxy_removals (key, removed) "
                "SELECT k, $2 FROM unnest($1::text[]) WITH ORDINALITY AS r(k, o) ORDER BY o",
                keys, now, timeout=BULK_TIMEOUT_S)
            await c.execute("DELETE FROM sstate_proxy_removals WHERE removed < $1", now - REMOVALS_KEEP_S)
            return n

        n = await self._run(tx, write=True)
        self._gen += 1  # the removal log changed (the trigger tells the other instances)
        return n

    async def removals_since(self, after: int | None) -> tuple[int, list[str]]:
        if after is None:
            seq = await self._own_read(
                lambda c: c.fetchval("SELECT COALESCE(MAX(seq), 0) FROM sstate_proxy_removals"), 0)
            return int(seq), []
        rows = await self._own_read(lambda c: c.fetch(
            "SELECT seq, key FROM sstate_proxy_removals WHERE seq > $1 ORDER BY seq LIMIT $2",
            after, REMOVALS_BATCH), [])
        return (int(rows[-1][0]) if rows else after), [r[1] for r in rows]

    # --- traffic history ------------------------------------------------------------------------
    async def add_traffic(self, rows: Sequence[TrafficRow]) -> None:
        if not rows:
            return
        # One statement for the batch: a key may appear once in it (merged here), and sorted
        # so that two replicas adding to the same buckets take the row locks in one order.
        merged: dict[tuple[int, str, str], list[int]] = {}
        for r in rows:
            acc = merged.setdefault((r.bucket, r.source, r.recipe), [0, 0])
            acc[0] += r.requests
            acc[1] += r.bytes
        rows = [TrafficRow(*k, n, nb) for k, (n, nb) in sorted(merged.items())]
        await self._run(lambda c: c.execute(
            "INSERT INTO sstate_proxy_traffic (bucket, source, recipe, requests, bytes) "
            "SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) "
            "ON CONFLICT (bucket, source, recipe) DO UPDATE SET "
            "requests = sstate_proxy_traffic.requests + excluded.requests, "
            "bytes = sstate_proxy_traffic.bytes + excluded.bytes",
            [r.bucket for r in rows], [r.source for r in rows], [r.recipe for r in rows],
            [r.requests for r in rows], [r.bytes for r in rows]), write=True)

    async def traffic_series(self, since: int) -> list[TrafficRow]:
        rows = await self._own_read(lambda c: c.fetch(
            "SELECT bucket, source, SUM(requests), SUM(bytes) FROM sstate_proxy_traffic "
            "WHERE bucket >= $1 GROUP BY bucket, source ORDER BY bucket, source", since), [])
        return [TrafficRow(int(r[0]), r[1], "", int(r[2]), int(r[3])) for r in rows]

    async def top_missed_recipes(self, since: int, limit: int) -> list[tuple[str, int]]:
        rows = await self._own_read(lambda c: c.fetch(
            "SELECT recipe, SUM(requests) AS n FROM sstate_proxy_traffic "
            "WHERE source = 'miss' AND recipe != '' AND bucket >= $1 "
            "GROUP BY recipe ORDER BY n DESC, recipe COLLATE \"C\" LIMIT $2", since, limit), [])
        return [(r[0], int(r[1])) for r in rows]

    async def prune_traffic(self, before: int) -> int:
        return _count(await self._run(lambda c: c.execute(
            "DELETE FROM sstate_proxy_traffic WHERE bucket < $1", before), write=True))

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock on ``hashtextextended(name)``, held on a connection of its
        own (not a pooled one) for the whole block; PostgreSQL drops it if that session ends."""
        if not name.isidentifier():
            raise ValueError(f"bad lock name {name!r}")
        try:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise
        try:
            held = await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 7))",
                                       "sstate-proxy:" + name)
            yield bool(held)
        finally:
            try:  # the lock ends with the session
                await asyncio.wait_for(conn.close(), CONNECT_TIMEOUT_S)
            except Exception:
                conn.terminate()

    # --- bulk copy (`sstate-proxy db copy`) ----------------------------------------------------
    async def iter_rows(self, table: str, batch: int = 2000) -> AsyncIterator[list[Row]]:
        """Every row of ``table`` in insertion order (``id``; the dedup table by created, key),
        ``batch`` rows at a time, through a cursor in one read-only REPEATABLE READ transaction
        (one snapshot). ``created`` of outhashes_v2 comes as UTC ISO text (``+00:00``)."""
        columns = COPY_COLUMNS.get(table)
        if columns is None:
            raise ValueError(f"no such table to copy: {table!r}")
        if batch <= 0:
            raise ValueError("batch must be positive")
        order = _COPY_ORDER.get(table, "id")
        sql = f"SELECT {', '.join(pg_ident(c) for c in columns)} FROM {table} ORDER BY {order}"
        pool = await self._get_pool()
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
                if not exists:
                    return
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    cursor = await conn.cursor(sql)
                    while True:
                        records = await cursor.fetch(batch, timeout=BULK_TIMEOUT_S)
                        if not records:
                            break
                        rows = []
                        for record in records:
                            row = dict(zip(columns, record, strict=True))
                            created = row.get("created")
                            if isinstance(created, datetime):  # naive local time, as bitbake writes
                                row["created"] = created.astimezone(UTC).isoformat()
                            rows.append(row)
                        yield rows
        except Exception as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    async def copy_in(self, table: str, rows: list[Row]) -> int:
        """One ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` (first writer wins),
        in the rows' order; rows inserted."""
        columns = COPY_COLUMNS.get(table)
        if columns is None:
            raise ValueError(f"no such table to copy: {table!r}")
        if not rows:
            return 0
        types, arrays = [], []
        for col in columns:
            values: list[Any] = [row.get(col) for row in rows]
            if col == "created" and table == "outhashes_v2":
                types.append("timestamp")
                values = [None if v is None else to_created(v) for v in values]
            elif col in _BIGINT_COLUMNS:
                types.append("bigint")
                values = [None if v is None else int(v) for v in values]
            elif col == "last_access":
                types.append("double precision")
                values = [None if v is None else float(v) for v in values]
            else:
                types.append("text")
                values = [None if v is None else _text(col, v) for v in values]
            arrays.append(values)
        names = ", ".join(pg_ident(c) for c in columns)
        unnest = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
        sql = (f"INSERT INTO {table} ({names}) SELECT {names} FROM unnest({unnest}) "
               f"WITH ORDINALITY AS r({names}, ord) ORDER BY ord ON CONFLICT DO NOTHING")
        n = _count(await self._run(lambda c: c.execute(sql, *arrays, timeout=BULK_TIMEOUT_S), write=True))
        self._changed(n)
        return n

    async def close(self) -> None:
        """Wait for the queries in flight, close the pool and the listener."""
        self._closed = True
        task, self._listener_task = self._listener_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT_S)
            except Exception:  # a server gone away: drop the connections
                pool.terminate()

