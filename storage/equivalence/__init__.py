"""The equivalence database: bitbake-hashserv's tables and semantics, behind one interface.

Every face (the mirror rewrite, /v1/equivalent, OEHASHEQUIV over ws/tcp/unix) shares one
database through this interface, so a report made on any face is seen by all of them.
Rows are plain dicts whose keys are the column names: they go on the wire as they are, exactly
as bitbake-hashserv sends them.

Schema and semantics are bitbake-hashserv 2.19's (its sqlite engine), so that an existing
bitbake-hashserv SQLite file opens as it is. Every method is async and required: an engine
(sqlite.py, postgres.py) implements all of them, and callers never probe for optional
parts. Writes are answered after their commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

Row = dict[str, Any]

# The tables `iter_rows`/`copy_in` move between engines (`sstate-proxy db copy`), with the
# columns each row carries (never the engine's own `id`/rowid: the destination numbers rows
# itself, in the order they are copied in, which is the source's order).
COPY_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("username", "token", "permissions"),
    "config": ("name", "value"),
    "outhashes_v2": (
        "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task", "outhash_siginfo",
    ),
    "unihashes_v3": ("method", "taskhash", "unihash", "gc_mark"),
    "sstate_proxy_archives": ("key", "identity", "size", "canonical", "created"),
    # The object catalog (access times, pulled-through objects) and the traffic history. The
    # removal log is not copied: its positions belong to one database (readers of the
    # destination start at its own current position).
    "sstate_proxy_objects": ("key", "size", "origin", "last_access"),
    "sstate_proxy_traffic": ("bucket", "source", "recipe", "requests", "bytes"),
}

# Columns that `remove`, `gc-mark` and `get-db-query-columns` may name, per table.
UNIHASH_COLUMNS = ("method", "taskhash", "unihash", "gc_mark")
OUTHASH_COLUMNS = (
    "method", "taskhash", "outhash", "created", "owner", "PN", "PV", "PR", "task", "outhash_siginfo",
)
OUTHASH_TEXT_COLUMNS = tuple(c for c in OUTHASH_COLUMNS if c != "created")


@dataclass(frozen=True, slots=True)
class User:
    username: str
    token_hash: str  # "sha256:<salt>:<hex>" as bitbake stores it
    permissions: tuple[str, ...]  # raw stored permissions, e.g. ("@all",)


# Where a catalogued object came from: 'local' (published by PUT or import, or simply found in the
# store) or 'upstream' (pulled through from an upstream mirror).
ORIGINS = ("local", "upstream")


@dataclass(frozen=True, slots=True)
class ObjectRow:
    """One object of the catalog (``sstate_proxy_objects``)."""

    key: str
    size: int
    origin: str  # one of ORIGINS
    last_access: float  # unix seconds


@dataclass(frozen=True, slots=True)
class TrafficRow:
    """Requests (and body bytes) of one source in one time bucket (``sstate_proxy_traffic``)."""

    bucket: int  # unix seconds at the bucket's start
    source: str  # hit | equivalent | upstream | miss | report
    recipe: str  # the PN of missed objects ('' in totals and for every other source)
    requests: int
    bytes: int


class DatabaseUnavailable(Exception):
    """The database cannot take the write now (locked by another writer past the wait bound, or
    unreachable): a transient fault, the HTTP layer answers 503 + Retry-After."""


class DatabaseFull(DatabaseUnavailable):
    """The database's disk is full (SQLite's "database or disk is full"): the write was rolled
    back, reads go on; the HTTP layer answers 507, the hashserv faces an invoke-error."""


class ReadOnlyError(PermissionError):
    """A write was attempted on a database opened read-only (either engine)."""


class UnsupportedDatabase(ValueError):
    """The database URL names an engine this build does not have."""


class EquivalenceDB(Protocol):
    # --- lookups -------------------------------------------------------------------------
    async def get_unihash(self, method: str, taskhash: str) -> Row | None:
        """{taskhash, method, unihash} from unihashes_v3, or None."""

    async def get_unihash_full(self, method: str, taskhash: str) -> Row | None:
        """Oldest outhash row of the taskhash joined with its unihash (`get` with all=true)."""

    async def get_outhash(self, method: str, outhash: str, with_unihash: bool = True) -> Row | None:
        """Oldest row with this method+outhash (joined with its unihash when asked)."""

    async def get_equivalent_for_outhash(self, method: str, outhash: str, taskhash: str) -> Row | None:
        """{taskhash, unihash} of the oldest *other* taskhash with this outhash that has a unihash."""

    async def unihash_exists(self, unihash: str) -> bool: ...

    async def class_of(self, hash_: str, methods: tuple[str, ...], limit: int) -> list[str]:
        """Hashes whose objects may be served for ``hash_`` (the mirror rewrite), best first.

        First the unihash of ``hash_`` as a taskhash (in ``methods``; () = any method), then the
        other members of its class (taskhashes sharing that unihash, and the taskhashes mapped to
        ``hash_`` when ``hash_`` is itself a unihash), newest first. ``hash_`` itself is never
        included; at most ``limit`` entries.
        """

    async def generation(self) -> int:
        """A number that changes whenever any process commits a change to equivalence data.

        The rewrite caches positive answers until this changes; it must be cheap (a PRAGMA or
        one indexed row) because every worker polls it a few times a second.
        """

    async def mappings_since(self, after: int | None) -> tuple[int, list[str] | None]:
        """The hashes (taskhash and unihash) of the mappings added after position ``after``
        (``unihashes_v3.id``) and the position to ask from next time: what lets the rewrite keep
        its cached misses of unknown hashes across changes that do not name them. ``after=None``:
        the current position and []. ``None`` instead of the list: more than MAPPINGS_BATCH
        mappings came (the caller forgets what the list would have named).
        """

    # --- writes: each returns after its commit; DatabaseUnavailable when the database cannot
    # take it now; PermissionError on a database opened read-only ---------------------------
    async def insert_outhash(self, row: Row) -> bool:
        """INSERT OR IGNORE into outhashes_v2; True if the row is new."""

    async def insert_unihash(self, method: str, taskhash: str, unihash: str) -> bool:
        """INSERT OR IGNORE into unihashes_v3 (gc_mark = current mark); True if new."""

    async def insert_report(self, row: Row, client_unihash: str) -> Row:
        """The write half of bitbake-hashserv's `report` in ONE transaction.

        insert_outhash(row) (``created`` defaults to now, stored as UTC ISO text), then the
        oldest equivalent (get_equivalent_for_outhash, always run), then insert_unihash with the
        equivalent's unihash or else ``client_unihash``; returns the *stored*
        ``{taskhash, method, unihash}`` (first writer wins). No upstream lookup: a server with an
        upstream calls the separate methods instead. Validation/permissions are the caller's job.
        """

    async def remove(self, where: dict[str, Any]) -> int: ...

    async def clean_unused(self, oldest: datetime) -> int:
        """Delete outhash rows created before ``oldest`` whose (method, taskhash) has no unihash."""

    async def gc_mark(self, mark: str, where: dict[str, Any]) -> int: ...

    async def gc_sweep(self) -> int:
        """Delete every unihash row not carrying the current mark, then clear the mark."""

    async def gc_status(self) -> tuple[int, int, str | None]:
        """(keep, remove, current mark)."""

    async def get_current_gc_mark(self) -> str | None: ...

    async def get_usage(self) -> dict[str, dict[str, int]]: ...

    async def get_query_columns(self) -> list[str]: ...

    # --- users -----------------------------------------------------------------------------
    async def lookup_user(self, username: str) -> User | None: ...

    async def get_all_users(self) -> list[User]: ...

    async def new_user(self, username: str, permissions: tuple[str, ...], token_hash: str) -> bool:
        """False if the user exists already."""

    async def set_user_token(self, username: str, token_hash: str) -> bool: ...

    async def set_user_perms(self, username: str, permissions: tuple[str, ...]) -> bool: ...

    async def delete_user(self, username: str) -> bool: ...

    async def close(self) -> None:
        """Finish the queued writes and release the connections."""

    # --- bulk copy between engines (`sstate-proxy db copy`) -----------------------------------
    def iter_rows(self, table: str, batch: int = 2000) -> AsyncIterator[list[Row]]:
        """Every row of ``table`` (a key of COPY_COLUMNS), in lists of at most ``batch`` rows, in
        insertion order (``id``/rowid ascending). Each row has exactly the COPY_COLUMNS keys;
        values are str, int or None as stored (``created`` of outhashes_v2 as ISO 8601 text:
        the stored string for SQLite; an engine with a timestamp type gives UTC with ``+00:00``).
        A table that does not exist (a read-only bitbake file without sstate-proxy's own table)
        yields nothing. ValueError for any other table name."""

    async def copy_in(self, table: str, rows: list[Row]) -> int:
        """Insert ``rows`` (as ``iter_rows`` yields them) into ``table`` in one transaction,
        first writer wins: a row whose unique key (username; name; method+taskhash+outhash;
        method+taskhash; key) is already stored is skipped, never overwritten (so a rerun
        copies nothing, and a user or gc mark already in the destination is kept). Every
        column is written as given (token hashes, ``gc_mark``, ``created``, ``owner``...).
        Returns the number of rows inserted."""

    # --- archive identity (storage dedup; sstate-proxy's own table, NOT hash equivalence) ------
    # Rows live in ``sstate_proxy_archives`` (storage.dedup is their only user); they never
    # reach unihashes_v3/outhashes_v2 and are never answered to hashserv clients (an archive
    # identity is not an OEOuthashBasic).
    async def record_archive(self, key: str, identity: str, size: int) -> str:
        """Record that object ``key`` (``size`` bytes) has archive ``identity``; return the
        canonical key for that identity (``key`` itself when it is the first). Atomic: of
        concurrent callers with one identity exactly one becomes canonical. Idempotent: a key
        already recorded returns its stored canonical."""

    async def archive_alias(self, key: str) -> str | None:
        """The canonical key whose bytes serve ``key``, if ``key`` is a dedup alias, else None."""

    async def archive_aliases(self, canonical: str) -> list[str]:
        """The alias keys served by ``canonical``'s bytes, oldest first."""

    async def forget_archive(self, key: str, successor: str | None = None) -> int:
        """Drop ``key``'s row. Aliases that pointed at ``key`` now point at ``successor`` (which
        becomes canonical; its bytes must already be stored), or are dropped too when
        ``successor`` is None. Returns the number of rows deleted."""

    async def dedup_stats(self) -> dict[str, int]:
        """{"objects": recorded keys, "unique": distinct stored archives, "bytes_saved": bytes of
        the aliases (not stored)}."""

    # --- the object catalog (retention; sstate-proxy's own tables, NOT hash equivalence) -----
    # ``sstate_proxy_objects``: its writes do not move generation() on PostgreSQL (on SQLite every
    # commit moves ``data_version``). ``sstate_proxy_removals``: the log of removed keys, which
    # other processes read to drop them from their store caches (see removals_since).
    async def touch_objects(self, accessed: Mapping[str, float]) -> None:
        """Batch upsert of access times (key -> unix seconds): last_access = max(old, new); an
        unknown key is inserted with size 0 and origin 'local'. One transaction."""

    async def record_object(self, key: str, size: int, origin: str, when: float) -> None:
        """Upsert ``key``: sets size and origin (one of ORIGINS, else ValueError),
        last_access = max(old, when)."""

    async def object_usage(self, origin: str | None = None) -> tuple[int, int]:
        """(objects, bytes) of the catalog, of one origin or (None) of all."""

    async def lru_objects(self, origin: str | None, limit: int) -> list[ObjectRow]:
        """At most ``limit`` rows of one origin (None: any), least recently accessed first."""

    def iter_objects(self, batch: int = 5000) -> AsyncIterator[list[ObjectRow]]:
        """Every catalog row, in lists of at most ``batch``, in key order (one snapshot)."""

    async def forget_objects(self, keys: Sequence[str]) -> int:
        """The objects ``keys`` were removed from the store: drop their catalog rows and append
        them to the removal log, in one transaction (log entries older than a day are pruned).
        Returns the number of catalog rows deleted (a key not catalogued is still logged)."""

    async def removals_since(self, after: int | None) -> tuple[int, list[str]]:
        """Keys removed after log position ``after``, oldest first, at most REMOVALS_BATCH, and
        the position to ask from next time. ``after=None``: the current position and [] (where a
        new reader starts). Positions follow commit order."""

    # --- traffic history (the dashboard; sstate-proxy's own table, NOT hash equivalence) --------
    # Rows live in ``sstate_proxy_traffic`` (proxy.traffic is their only writer). Its writes do
    # not move ``generation()`` on PostgreSQL (no notify trigger).
    async def add_traffic(self, rows: Sequence[TrafficRow]) -> None:
        """Add each row's requests and bytes to the stored row of its (bucket, source, recipe),
        creating it when new, in one transaction (several workers and replicas add to one
        bucket)."""

    async def traffic_series(self, since: int) -> list[TrafficRow]:
        """Per bucket and source from bucket ``since`` on, summed over recipes (recipe ''),
        ordered by bucket then source. Empty on a database without the table (read-only)."""

    async def top_missed_recipes(self, since: int, limit: int) -> list[tuple[str, int]]:
        """(recipe, misses) of the ``limit`` recipes with the most misses from bucket ``since``
        on, most first (ties by name); misses of names without a recipe ('') left out."""

    async def prune_traffic(self, before: int) -> int:
        """Delete the buckets older than ``before``; the number of rows deleted."""


    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """``async with db.exclusive("gc") as held:``: a lock named ``name`` shared by every
        process on this database (workers, replicas, the CLI), taken without waiting: ``held`` is
        False when another holder has it. Released on exit, or when the holder dies. SQLite: an
        flock on a file beside the database; PostgreSQL: a session advisory lock on a connection
        of its own."""

# At most this many mappings per mappings_since answer before the caller just forgets everything.
MAPPINGS_BATCH = 5000
# At most this many keys per removals_since answer (the reader asks again for the rest).
REMOVALS_BATCH = 10000
# Removal log entries older than this are pruned: every live reader polls within seconds, and an
# S3 index re-lists the bucket far more often than this anyway.
REMOVALS_KEEP_S = 86400.0


def mapping_feed(after: int, rows: Sequence[Sequence[Any]]) -> tuple[int, list[str] | None]:
    """``mappings_since``'s answer from rows (id, taskhash, unihash) in id order, read with a
    LIMIT of MAPPINGS_BATCH + 1 (one more than the batch tells that the batch overflowed)."""
    if not rows:
        return after, []
    if len(rows) > MAPPINGS_BATCH:
        return int(rows[-1][0]), None
    hashes: list[str] = []
    for _id, taskhash, unihash in rows:
        hashes.append(taskhash)
        hashes.append(unihash)
    return int(rows[-1][0]), hashes


def check_origin(origin: str) -> str:
    if origin not in ORIGINS:
        raise ValueError(f"bad object origin {origin!r}: one of {', '.join(ORIGINS)}")
    return origin


def open_equivalence_db(url: str, *, read_only: bool = False, pool_size: int | None = None) -> EquivalenceDB:
    """The database a URL names.

    * ``sqlite:///relative.db`` or ``sqlite:////abs.db``: the embedded engine (one file).
    * ``postgresql://[user[:password]@]host[:port]/dbname`` (also ``postgres://``, and bitbake's
      SQLAlchemy spelling ``postgresql+asyncpg://``): the PostgreSQL engine. Without a password
      in the URL, ``PGPASSWORD`` or the password file (``PGPASSFILE``, ``~/.pgpass``) is used.
      ``pool_size`` bounds its connections (per process); None = the engine's default.

    Raises UnsupportedDatabase for other schemes, ValueError for a malformed URL. Opening does
    not connect: the PostgreSQL engine connects (and migrates) on first use.
    """
    if url.startswith(("postgresql://", "postgres://", "postgresql+", "postgres+")):
        from storage.equivalence.postgres import DEFAULT_POOL_SIZE, PostgresEquivalenceDB

        return PostgresEquivalenceDB(url, read_only=read_only,
                                     pool_size=DEFAULT_POOL_SIZE if pool_size is None else pool_size)
    if url.startswith("sqlite://"):
        from storage.equivalence.sqlite import SqliteEquivalenceDB

        # SQLAlchemy's convention: sqlite:///rel/x.db is relative, sqlite:////abs/x.db absolute.
        if not url.startswith("sqlite:///"):
            raise ValueError(f"bad sqlite url {url!r}: use sqlite:///relative.db or sqlite:////abs.db")
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError("sqlite url names no file")
        return SqliteEquivalenceDB(path, read_only=read_only)
    raise UnsupportedDatabase(f"unsupported database url {url!r}: use sqlite:///path or postgresql://...")
