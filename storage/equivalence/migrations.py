"""Versioned schema migrations, declared as data, for both engines.

Each migration has a version (applied in ascending order), a name and, per engine, what it does:
a list of SQL statements (``postgres``) or a function of the open connection (``sqlite``; its
statements run inside the migration transaction). The table ``sstate_proxy_migrations(version,
name, applied)`` records each applied version; a writable open applies the missing ones, each
exactly once, all in one transaction:

* SQLite: ``BEGIN IMMEDIATE`` (the write lock) before reading the applied versions, so a second
  process opening at the same time waits (busy_timeout) and then finds them applied.
* PostgreSQL: ``pg_advisory_xact_lock(MIGRATION_LOCK)`` first in the transaction, then the same.
  (Even ``CREATE TABLE IF NOT EXISTS`` can fail when two sessions run it at once: the lock is
  taken before any DDL.)

Migration 1 is the schema as it stood before versioning (bitbake-hashserv's four tables and
indexes, its open-time upgrade of older schemas, and sstate-proxy's ``sstate_proxy_archives``),
written with ``IF NOT EXISTS``: an existing bitbake-hashserv database or an earlier sstate-proxy
database opens as it is, and only gains the version table. Later migrations are appended to
``MIGRATIONS`` with the next version; a released migration is never edited.

bitbake-hashserv ignores every table and trigger named ``sstate_proxy_*``; its own open-time
``create_all`` leaves existing tables alone, so it still opens a database migrated here.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from storage.equivalence import schema

log = logging.getLogger("sstate_proxy.equivalence.migrations")

# The advisory-lock key the PostgreSQL migration transaction holds (any constant; "sspm").
MIGRATION_LOCK = 0x7373706D
# The channel the PostgreSQL triggers of migration 2 notify on every committed change.
NOTIFY_CHANNEL = "sstate_proxy_equivalence"
# Tables whose changes move `generation()`: hash equivalence, and storage dedup (as SQLite's
# data_version moves for any commit).
NOTIFY_TABLES = (schema.UNIHASHES.name, schema.OUTHASHES.name, schema.ARCHIVES.name)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: Callable[[sqlite3.Connection], None] | None = None
    postgres: tuple[str, ...] = field(default=())


# --- 1: the base schema ------------------------------------------------------------------------
def _sqlite_base(conn: sqlite3.Connection) -> None:
    """bitbake's open-time schema work (create what is missing, lift unihashes_v2 to v3) plus
    sstate-proxy's archive table."""
    for table in schema.TABLES:
        conn.execute(schema.create_table(table))
    for name in schema.OBSOLETE_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    for index in schema.INDEXES:
        conn.execute(schema.create_index(index))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "unihashes_v2" in tables:
        log.info("upgrading unihashes_v2 -> unihashes_v3")
        conn.execute(
            "INSERT OR IGNORE INTO unihashes_v3 (id, method, taskhash, unihash, gc_mark) "
            "SELECT id, method, taskhash, unihash, '' FROM unihashes_v2"
        )
        conn.execute("DROP TABLE unihashes_v2")
    if "tasks_v2" in tables:
        log.warning("the database still holds the pre-2021 table tasks_v2; it is ignored (not dropped)")


_PG_BASE = (
    *(schema.pg_create_table(t) for t in schema.TABLES),
    *(f"DROP INDEX IF EXISTS {name}" for name in schema.OBSOLETE_INDEXES),
    *(schema.pg_create_index(i) for i in schema.INDEXES),
    # bitbake's upgrade of unihashes_v2 (ids kept; the serial then moves past them, which
    # bitbake's own upgrade forgets).
    """DO $$ BEGIN
        IF to_regclass('unihashes_v2') IS NOT NULL THEN
            INSERT INTO unihashes_v3 (id, method, taskhash, unihash, gc_mark)
                SELECT id, method, taskhash, unihash, '' FROM unihashes_v2 ON CONFLICT DO NOTHING;
            DROP TABLE unihashes_v2;
            PERFORM setval(pg_get_serial_sequence('unihashes_v3', 'id'),
                           (SELECT COALESCE(MAX(id), 0) + 1 FROM unihashes_v3), false);
        END IF;
    END $$""",
)

# --- 2: PostgreSQL change notifications ------------------------------------------------------------
# One statement-level trigger per table and event, with a transition table: it notifies only when
# the statement changed a row (an ignored `ON CONFLICT DO NOTHING` notifies nothing), once per
# statement, for any writer (sstate-proxy, bitbake-hashserv, psql). PostgreSQL delivers a
# notification only when its transaction commits, and folds identical ones of one transaction.
# (A trigger with a transition table may name one event only, hence three per table.)
_PG_NOTIFY_FUNCTION = f"""CREATE OR REPLACE FUNCTION sstate_proxy_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM sstate_proxy_changed) THEN
            PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_NAME);
        END IF;
        RETURN NULL;
    END $$"""


def _pg_notify_triggers() -> tuple[str, ...]:
    out = [_PG_NOTIFY_FUNCTION]
    for table in NOTIFY_TABLES:
        for event, ref in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
            name = f"sstate_proxy_notify_{event.lower()}"
            out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            out.append(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {ref} TABLE AS "
                "sstate_proxy_changed FOR EACH STATEMENT EXECUTE FUNCTION sstate_proxy_notify()"
            )
    return tuple(out)


# --- 3: the object catalog and the removal log (retention) -----------------------------------------
def _sqlite_catalog(conn: sqlite3.Connection) -> None:
    for table in schema.CATALOG_TABLES:
        conn.execute(schema.create_table(table))
    for index in schema.CATALOG_INDEXES:
        conn.execute(schema.create_index(index))


# The catalog is written on every access flush: it must not notify (it would drop every
# resolver's caches). A removal must: the removal log's inserts notify like the hash tables'
# (generation() moves, and the S3 indexes read the log).
_PG_CATALOG = (
    *(schema.pg_create_table(t) for t in schema.CATALOG_TABLES),
    *(schema.pg_create_index(i) for i in schema.CATALOG_INDEXES),
    f"DROP TRIGGER IF EXISTS sstate_proxy_notify_insert ON {schema.REMOVALS.name}",
    f"CREATE TRIGGER sstate_proxy_notify_insert AFTER INSERT ON {schema.REMOVALS.name} REFERENCING NEW "
    "TABLE AS sstate_proxy_changed FOR EACH STATEMENT EXECUTE FUNCTION sstate_proxy_notify()",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "bitbake-hashserv schema and sstate_proxy_archives", sqlite=_sqlite_base, postgres=_PG_BASE),
    # SQLite needs nothing: `PRAGMA data_version` already moves on every commit by anyone.
    Migration(2, "change notifications for generation()", sqlite=None, postgres=_pg_notify_triggers()),
    Migration(3, "object catalog and removal log", sqlite=_sqlite_catalog, postgres=_PG_CATALOG),
)

LATEST = MIGRATIONS[-1].version


def now_text() -> str:
    return datetime.now(UTC).isoformat()


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations on ``conn`` (autocommit mode) in one BEGIN IMMEDIATE
    transaction; the versions applied now."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(schema.create_table(schema.MIGRATIONS))
        done = {r[0] for r in conn.execute("SELECT version FROM sstate_proxy_migrations")}
        applied = []
        for m in MIGRATIONS:
            if m.version in done:
                continue
            log.info("applying migration %d: %s", m.version, m.name)
            if m.sqlite is not None:
                m.sqlite(conn)
            conn.execute("INSERT INTO sstate_proxy_migrations (version, name, applied) VALUES (?, ?, ?)",
                         (m.version, m.name, now_text()))
            applied.append(m.version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
