"""The equivalence database's tables, declared once as data.

The four bitbake tables are exactly those of bitbake-hashserv 2.19 (its sqlite engine declares
them the same way, as lists of (name, type, flags)); ``sstate_proxy_archives`` is sstate-proxy's
own (storage dedup) and is ignored by bitbake. A SQL engine builds its CREATE statements from
these declarations (``create_table``/``create_index``), so the schema is written down only here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # the SQL type as bitbake declares it (TEXT, INTEGER, DATETIME)
    flags: str = ""  # "NOT NULL", "PRIMARY KEY AUTOINCREMENT", ...
    pg_flags: str | None = None  # PostgreSQL flags where bitbake's SQLAlchemy engine differs


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    unique: tuple[str, ...] = ()  # one table-level UNIQUE(...) constraint, if any

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    table: str
    columns: tuple[str, ...]


_ID = Column("id", "INTEGER", "PRIMARY KEY AUTOINCREMENT")

UNIHASHES = Table("unihashes_v3", (
    _ID,
    Column("method", "TEXT", "NOT NULL"),
    Column("taskhash", "TEXT", "NOT NULL"),
    Column("unihash", "TEXT", "NOT NULL"),
    Column("gc_mark", "TEXT", "NOT NULL"),
), unique=("method", "taskhash"))

OUTHASHES = Table("outhashes_v2", (
    _ID,
    Column("method", "TEXT", "NOT NULL"),
    Column("taskhash", "TEXT", "NOT NULL"),
    Column("outhash", "TEXT", "NOT NULL"),
    Column("created", "DATETIME"),
    Column("owner", "TEXT"),
    Column("PN", "TEXT"),
    Column("PV", "TEXT"),
    Column("PR", "TEXT"),
    Column("task", "TEXT"),
    Column("outhash_siginfo", "TEXT"),
), unique=("method", "taskhash", "outhash"))

USERS = Table("users", (
    _ID,
    Column("username", "TEXT", "NOT NULL"),
    Column("token", "TEXT", "NOT NULL"),
    # space-separated; nullable in bitbake's SQLAlchemy (PostgreSQL) schema
    Column("permissions", "TEXT", "NOT NULL", pg_flags=""),
), unique=("username",))

CONFIG = Table("config", (
    _ID,
    Column("name", "TEXT", "NOT NULL"),
    Column("value", "TEXT"),
), unique=("name",))

# Storage dedup (storage.dedup): object key -> archive identity and the canonical key whose bytes
# serve it. NOT hash equivalence: never read by the hashserv faces.
ARCHIVES = Table("sstate_proxy_archives", (
    Column("key", "TEXT", "PRIMARY KEY"),
    Column("identity", "TEXT", "NOT NULL"),
    Column("size", "INTEGER", "NOT NULL"),
    Column("canonical", "TEXT", "NOT NULL"),
    Column("created", "TEXT"),
))

TABLES = (UNIHASHES, OUTHASHES, USERS, CONFIG, ARCHIVES)

# The object catalog (migration 3; retention): every object the service knows of, its size, where
# it came from ('local': published or found in the store; 'upstream': pulled through) and when it
# was last served (unix seconds). NOT hash equivalence: its writes never move generation().
OBJECTS = Table("sstate_proxy_objects", (
    Column("key", "TEXT", "PRIMARY KEY"),
    Column("size", "INTEGER", "NOT NULL"),
    Column("origin", "TEXT", "NOT NULL"),
    Column("last_access", "REAL", "NOT NULL"),
))

# The removal log (migration 3): keys removed from the store (gc, eviction), in commit order, so
# that every process's store caches (the S3 existence index) drop them within a poll.
REMOVALS = Table("sstate_proxy_removals", (
    Column("seq", "INTEGER", "PRIMARY KEY AUTOINCREMENT"),
    Column("key", "TEXT", "NOT NULL"),
    Column("removed", "REAL", "NOT NULL"),
))

CATALOG_TABLES = (OBJECTS, REMOVALS)

# sstate-proxy's schema versions (storage.equivalence.migrations): one row per applied migration.
MIGRATIONS = Table("sstate_proxy_migrations", (
    Column("version", "INTEGER", "PRIMARY KEY"),
    Column("name", "TEXT"),
    Column("applied", "TEXT"),
))

# Traffic history (migration 4, proxy.traffic): requests and bytes per time bucket and source
# (hit, equivalent, upstream, miss, report), summed over every worker and replica; for misses
# also per recipe (PN; '' for the totals and names without one). Not hash equivalence: its
# writes do not notify (migrations.NOTIFY_TABLES).
TRAFFIC = Table("sstate_proxy_traffic", (
    Column("bucket", "INTEGER", "NOT NULL"),  # unix seconds at the bucket's start
    Column("source", "TEXT", "NOT NULL"),
    Column("recipe", "TEXT", "NOT NULL"),
    Column("requests", "INTEGER", "NOT NULL"),
    Column("bytes", "INTEGER", "NOT NULL"),
), unique=("bucket", "source", "recipe"))

# Tables that are sstate-proxy's own (not hash equivalence): left out of `get_usage`.
OWN_TABLES = (ARCHIVES.name, MIGRATIONS.name, OBJECTS.name, REMOVALS.name, TRAFFIC.name)

INDEXES = (
    Index("taskhash_lookup_v4", "unihashes_v3", ("method", "taskhash")),
    Index("unihash_lookup_v1", "unihashes_v3", ("unihash",)),
    Index("outhash_lookup_v3", "outhashes_v2", ("method", "outhash")),
    Index("config_lookup", "config", ("name",)),
    Index("sstate_proxy_archives_identity", "sstate_proxy_archives", ("identity",)),
    Index("sstate_proxy_archives_canonical", "sstate_proxy_archives", ("canonical",)),
)

# The catalog's indexes (migration 3): least recently used first, overall and per origin; the
# removal log pruned by age.
CATALOG_INDEXES = (
    Index("sstate_proxy_objects_lru", "sstate_proxy_objects", ("last_access",)),
    Index("sstate_proxy_objects_origin_lru", "sstate_proxy_objects", ("origin", "last_access")),
    Index("sstate_proxy_removals_removed", "sstate_proxy_removals", ("removed",)),
)

# Indexes of older bitbake schemas, dropped at open as bitbake does.
OBSOLETE_INDEXES = (
    "taskhash_lookup", "outhash_lookup", "taskhash_lookup_v2", "outhash_lookup_v2", "taskhash_lookup_v3",
)


def create_table(table: Table) -> str:
    parts = [" ".join(p for p in (c.name, c.type, c.flags) if p) for c in table.columns]
    if table.unique:
        parts.append(f"UNIQUE({', '.join(table.unique)})")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(parts)})"


def create_index(index: Index) -> str:
    return f"CREATE INDEX IF NOT EXISTS {index.name} ON {index.table} ({', '.join(index.columns)})"


# --- PostgreSQL: the same declarations, typed as bitbake-hashserv's SQLAlchemy engine creates them
# (`\d` of a database made by `bitbake-hashserv --database postgresql+asyncpg://...`).
_PG_TYPES = {
    "TEXT": "text",
    "DATETIME": "timestamp without time zone",
    "INTEGER": "bigint",  # SQLite's INTEGER is 64-bit (object sizes); serial ids are handled apart
    "REAL": "double precision",
}


def pg_ident(name: str) -> str:
    """A column or table name as PostgreSQL needs it: mixed case ("PN") must be double-quoted."""
    return name if name == name.lower() else '"' + name.replace('"', '""') + '"'


def pg_create_table(table: Table) -> str:
    parts = []
    for c in table.columns:
        if c.flags == "PRIMARY KEY AUTOINCREMENT":
            # bitbake's tables have serial ids; sstate-proxy's own logs may outgrow 32 bits
            serial = "bigserial" if table.name.startswith("sstate_proxy_") else "serial"
            parts.append(f"{pg_ident(c.name)} {serial} PRIMARY KEY")
            continue
        if table is MIGRATIONS and c.name == "version":
            parts.append("version integer PRIMARY KEY")
            continue
        flags = c.flags if c.pg_flags is None else c.pg_flags
        parts.append(" ".join(p for p in (pg_ident(c.name), _PG_TYPES[c.type], flags) if p))
    if table.unique:
        parts.append(f"UNIQUE ({', '.join(pg_ident(c) for c in table.unique)})")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(parts)})"


def pg_create_index(index: Index) -> str:
    return (f"CREATE INDEX IF NOT EXISTS {index.name} ON {index.table} "
            f"({', '.join(pg_ident(c) for c in index.columns)})")
