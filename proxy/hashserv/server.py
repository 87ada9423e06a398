"""OEHASHEQUIV 1.1: the per-connection state machine and the message table.

Semantics follow bitbake-hashserv 2.19; the code is our own. Lookups and reports are the
Reporter's (proxy.reports), shared with /v1/equivalent. Each handler is registered with the
permissions it needs (``@handler``), checked in one place (``Connection._check``) before it
runs; the table is built once per mode (read-write / read-only: the write handlers are simply
absent, so a read-only server treats them as unknown commands and closes the connection, as
bitbake does).

Error model (what bitbake's client expects):
* ``InvokeError`` (or the Reporter's ``ReportError``): reply ``{"invoke-error": {"message":
  ...}}``, then close the connection;
* anything else malformed (bad JSON, unknown command, missing key, wrong type, oversized
  message): close without a reply. Nothing is written before the input has been validated.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from proxy.auth import (
    DB_ADMIN_PERM,
    READ_PERM,
    REPORT_PERM,
    TASK_DATA_PERM,
    USER_ADMIN_PERM,
    Auth,
    Identity,
    PermissionArgError,
    display_permissions,
    parse_permissions,
    sees_task_data,
    task_data_filter_keys,
    visible_row,
)
from proxy.hashserv.framing import ConnectionClosed, MessageIO, ProtocolError, dumps, loads
from proxy.reports import ReportError, is_valid_unihash
from storage.equivalence import DatabaseUnavailable

if TYPE_CHECKING:
    from proxy.hashserv import HashservService

log = logging.getLogger("sstate_proxy.hashserv")

PROTO_NAME = "OEHASHEQUIV"
MAX_HEADERS = 256
REPORT_EXTRA_KEYS = ("owner", "PN", "PV", "PR", "task", "outhash_siginfo")


class InvokeError(Exception):
    """Sent to the client as {"invoke-error": {"message": str(e)}}; the connection then closes."""


def validate_unihash(value: Any) -> None:
    if not is_valid_unihash(value):
        raise InvokeError("Invalid unihash")


def _str(arg: Any, key: str) -> str:
    """A required string argument; anything else is malformed input (close, no reply)."""
    v = arg[key]
    if type(v) is not str:
        raise ProtocolError(f"{key} must be a string")
    return v


# --- request statistics (get-stats / reset-stats) --------------------------------------------


class Stats:
    """Running count/total/max/mean/stdev of request durations (Welford), bitbake's shape."""

    __slots__ = ("num", "total_time", "max_time", "_m", "_s")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num = 0
        self.total_time = 0.0
        self.max_time = 0.0
        self._m = 0.0
        self._s = 0.0

    def add(self, elapsed: float) -> None:
        self.num += 1
        if self.num == 1:
            self._m = elapsed
            self._s = 0.0
        else:
            last = self._m
            self._m = last + (elapsed - last) / self.num
            self._s += (elapsed - last) * (elapsed - self._m)
        self.total_time += elapsed
        if elapsed > self.max_time:
            self.max_time = elapsed

    def todict(self) -> dict[str, float]:
        avg = self.total_time / self.num if self.num else 0
        stdev = math.sqrt(self._s / (self.num - 1)) if self.num > 1 else 0
        return {"num": self.num, "total_time": self.total_time, "max_time": self.max_time,
                "average": avg, "stdev": stdev}


# --- the handler table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handler:
    name: str
    fn: Callable[[Connection, Any], Awaitable[Any]]
    perms: tuple[str, ...]  # in bitbake's order (for the denial text)
    perm_set: frozenset[str]
    allow_anon: bool
    self_service: bool
    writes: bool  # absent on a read-only server
    stream: bool  # not timed as one request (its lines are)


_TABLE: list[Handler] = []


def handler(name: str, *perms: str, allow_anon: bool = True, self_service: bool = False,
            writes: bool = False, stream: bool = False):
    """Register ``fn`` for message ``name`` needing ``perms`` (checked before it runs)."""

    def deco(fn: Callable[[Connection, Any], Awaitable[Any]]):
        _TABLE.append(Handler(name, fn, perms, frozenset(perms), allow_anon, self_service, writes, stream))
        return fn

    return deco


NO_RESPONSE = object()


def _get_stream_key(line: str) -> list[str]:
    """METHOD TASKHASH of a get-stream line; anything else is malformed input."""
    parts = line.split()
    if len(parts) != 2:
        raise ProtocolError("get-stream line needs METHOD TASKHASH")
    return parts


class Connection:
    """One client connection, on any transport."""

    def __init__(self, service: HashservService, io: MessageIO, transport: str = "tcp") -> None:
        self.service = service
        self.io = io
        self.transport = transport  # ws | tcp | unix: the metrics' label
        self.metrics = service.metrics
        self.latency = service.metrics.latency_of("hashserv")
        self.db = service.db
        self.reporter = service.reporter
        self.auth: Auth = service.auth
        self.identity: Identity = Identity.anonymous
        self.stats = service.stats
        self.table = service.table

    # --- driver --------------------------------------------------------------------------------
    async def run(self) -> None:
        io = self.io
        try:
            # a client that never completes its handshake holds nothing for long; an idle one
            # after it is never cut (bitbake keeps its connection for a whole build)
            try:
                async with asyncio.timeout(self.service.handshake_timeout_s):
                    await self._handshake()
            except TimeoutError:
                raise ProtocolError(f"no handshake within {self.service.handshake_timeout_s:g}s") from None
            table = self.table
            while True:
                msg = await io.recv_message()
                if msg is None:
                    break
                # Dispatch: the first table entry whose name is a key of the message (bitbake's order).
                if type(msg) is not dict:
                    raise ProtocolError("request is not an object")
                if len(msg) == 1:
                    h = table.get(next(iter(msg)))
                else:
                    h = next((entry for name, entry in table.items() if name in msg), None)
                if h is None:
                    raise ProtocolError("unrecognized command")
                arg = msg[h.name]
                self.metrics.hashserv_message(h.name, self.transport)
                try:
                    if h.stream:
                        self._check(h, arg)
                        self._stream_counters = self.metrics.hashserv_stream_counters(h.name, self.transport)
                        response = await h.fn(self, arg)
                    else:
                        t0 = time.perf_counter()
                        try:
                            self._check(h, arg)
                            response = await h.fn(self, arg)
                        finally:
                            elapsed = time.perf_counter() - t0
                            self.stats.add(elapsed)
                            self.latency.observe(elapsed)
                except (InvokeError, ReportError, DatabaseUnavailable) as e:
                    # a locked or full database is said as such (not an internal error)
                    io.write_message({"invoke-error": {"message": str(e)}})
                    break
                if response is not NO_RESPONSE:
                    io.write_message(response)  # sent when the next recv waits for input
        except ConnectionClosed:
            pass
        except ProtocolError as e:
            log.info("hashserv %s: %s; closing", io.peer, e)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            log.info("hashserv %s: malformed request (%s: %s); closing", io.peer, type(e).__name__, e)
        except (ConnectionError, OSError) as e:
            log.info("hashserv %s: %s", io.peer, e)
        except Exception:
            log.exception("hashserv %s: internal error; closing", io.peer)
        finally:
            try:
                await io.flush()
            except Exception:  # noqa: BLE001 - peer gone
                pass
            await io.close()

    async def _handshake(self) -> None:
        io = self.io
        first = await io.recv()
        parts = first.split()
        if len(parts) != 2 or parts[0] != PROTO_NAME:
            raise ProtocolError(f"bad protocol line {first[:80]!r}")
        try:
            version = tuple(int(v) for v in parts[1].split("."))
        except ValueError:
            raise ProtocolError(f"bad protocol version {parts[1][:40]!r}") from None
        if not ((1, 0) < version <= (1, 1)):
            raise ProtocolError(f"unsupported protocol version {parts[1][:40]!r}")
        headers: dict[str, str] = {}
        while line := await io.recv():
            if ":" not in line or len(headers) >= MAX_HEADERS:
                raise ProtocolError("bad header line")
            tag, value = line.split(":", 1)
            headers[tag.lower()] = value.strip()
        if headers.get("needs-headers", "false") == "true":
            io.write_line("")  # hashserv has no server headers: just the terminating empty line

    def _check(self, h: Handler, arg: Any) -> None:
        """The one permission check: the handler's permissions, or self service on oneself."""
        ident = self.identity
        if h.self_service and ident.username is not None:
            if type(arg) is not dict:
                raise ProtocolError("request argument is not an object")
            username = arg.get("username", ident.username)
            if username == ident.username:
                arg["username"] = ident.username
                return
        if not h.perms:
            return
        if not self.auth.allowed(ident, h.perm_set, allow_anon=h.allow_anon):
            log.info("hashserv %s: %s denied %s (needs %s)", self.io.peer,
                     ident.username or "anonymous", h.name, " ".join(h.perms))
            raise InvokeError(self.auth.denial_text(ident, h.perms))

    # --- stream modes --------------------------------------------------------------------------
    async def _stream(self, answer: Callable[[str], Awaitable[str]]) -> object:
        """Answer one line per line until END or an empty line (get-stream, exists-stream,
        gc-mark-stream, on every transport). Replies go out when the input runs dry, so a
        pipelined batch is answered with one write; each line is one request in the stats."""
        io = self.io
        stats = self.stats
        lines, seconds = self._stream_counters
        n, spent = 0, 0.0  # counted per written batch: the lines are many and cheap
        perf = time.perf_counter
        io.write_message("ok")
        try:
            while True:
                line = await io.recv()
                if not line or line.isspace():
                    break
                t0 = perf()
                try:
                    if line == "END":
                        break
                    io.write_line(await answer(line))
                finally:
                    elapsed = perf() - t0
                    stats.add(elapsed)
                    n += 1
                    spent += elapsed
                if io.flush_due:
                    lines.inc(n)
                    seconds.inc(spent)
                    n, spent = 0, 0.0
                    await io.flush()
        finally:
            if n:
                lines.inc(n)
                seconds.inc(spent)
        io.write_line("ok")
        return NO_RESPONSE

    # ===== handlers ===========================================================================

    @handler("ping")
    async def h_ping(self, arg: Any) -> Any:
        return {"alive": True}

    @handler("get", READ_PERM)
    async def h_get(self, arg: Any) -> Any:
        method = _str(arg, "method")
        taskhash = _str(arg, "taskhash")
        return visible_row(self.identity, await self.reporter.get(method, taskhash, bool(arg.get("all", False))))

    @handler("get-outhash", READ_PERM)
    async def h_get_outhash(self, arg: Any) -> Any:
        method = _str(arg, "method")
        outhash = _str(arg, "outhash")
        taskhash = arg["taskhash"]
        return visible_row(self.identity, await self.reporter.get_outhash(
            method, outhash, taskhash, bool(arg.get("with_unihash", True))))

    @handler("get-stream", READ_PERM, stream=True)
    async def h_get_stream(self, arg: Any) -> Any:
        unihash = self.reporter.unihash

        async def lookup(line: str) -> str:
            return await unihash(*_get_stream_key(line))

        return await self._stream(lookup)

    @handler("exists-stream", READ_PERM, stream=True)
    async def h_exists_stream(self, arg: Any) -> Any:
        exists = self.reporter.unihash_exists

        async def lookup(line: str) -> str:
            return "true" if await exists(line) else "false"

        return await self._stream(lookup)

    @handler("get-stats", READ_PERM)
    async def h_get_stats(self, arg: Any) -> Any:
        return {"requests": self.stats.todict()}

    @handler("get-db-usage", DB_ADMIN_PERM)
    async def h_get_db_usage(self, arg: Any) -> Any:
        return {"usage": await self.db.get_usage()}

    @handler("get-db-query-columns", DB_ADMIN_PERM)
    async def h_get_db_query_columns(self, arg: Any) -> Any:
        return {"columns": await self.db.get_query_columns()}

    @handler("report", READ_PERM)
    async def h_report(self, arg: Any) -> Any:
        unihash = arg.get("unihash")
        validate_unihash(unihash)
        row: dict[str, Any] = {"method": _str(arg, "method"), "outhash": _str(arg, "outhash"),
                               "taskhash": _str(arg, "taskhash")}
        for k in REPORT_EXTRA_KEYS:
            v = arg.get(k)
            if v is not None:
                if not isinstance(v, str | int | float) or isinstance(v, bool):
                    raise ProtocolError(f"{k} must be a string")
                row[k] = v
        # @report (else a lookup only) is bitbake's rule inside the report algorithm
        return await self.reporter.report(row, unihash, self.identity)

    @handler("auth")
    async def h_auth(self, arg: Any) -> Any:
        username = str(arg["username"])
        token = str(arg["token"])
        ident = await self.auth.authenticate(username, token)
        if ident is None:
            await asyncio.sleep(1)  # rate-limit guessing, as bitbake
            raise InvokeError(f"Unable to authenticate as {username}")
        self.identity = ident
        log.info("hashserv %s: authenticated as %s", self.io.peer, username)
        return {"result": True, "username": ident.username, "permissions": sorted(ident.permissions)}

    @handler("get-user", USER_ADMIN_PERM, allow_anon=False, self_service=True)
    async def h_get_user(self, arg: Any) -> Any:
        user = await self.auth.lookup_user(str(arg["username"]))
        if user is None:
            return None
        return {"username": user.username, "permissions": display_permissions(user.permissions)}

    @handler("get-all-users", USER_ADMIN_PERM, allow_anon=False)
    async def h_get_all_users(self, arg: Any) -> Any:
        users = await self.auth.get_all_users()
        return {"users": [{"username": u.username, "permissions": display_permissions(u.permissions)}
                          for u in users]}

    @handler("become-user", USER_ADMIN_PERM, allow_anon=False)
    async def h_become_user(self, arg: Any) -> Any:
        username = str(arg["username"])
        user = await self.auth.lookup_user(username)
        if user is None:
            raise InvokeError(f"User {username} doesn't exist")
        self.identity = Identity.from_user(user)
        log.info("hashserv %s: became user %s", self.io.peer, username)
        return {"username": user.username, "permissions": display_permissions(user.permissions)}

    # --- write handlers (absent on a read-only server) ------------------------------------------

    @handler("report-equiv", READ_PERM, REPORT_PERM, writes=True)
    async def h_report_equiv(self, arg: Any) -> Any:
        unihash = arg.get("unihash")
        validate_unihash(unihash)
        return await self.reporter.report_equiv(_str(arg, "method"), _str(arg, "taskhash"), unihash)

    @handler("reset-stats", DB_ADMIN_PERM, writes=True)
    async def h_reset_stats(self, arg: Any) -> Any:
        d = {"requests": self.stats.todict()}
        self.stats.reset()
        return d

    @handler("backfill-wait", READ_PERM, writes=True)
    async def h_backfill_wait(self, arg: Any) -> Any:
        return {"tasks": await self.reporter.backfill_wait()}

    @handler("remove", DB_ADMIN_PERM, writes=True)
    async def h_remove(self, arg: Any) -> Any:
        where = arg["where"]
        if type(where) is not dict:
            raise ProtocolError("where must be an object")
        hidden = task_data_filter_keys(where)
        if hidden and not sees_task_data(self.identity):  # a count by owner/PN would reveal task data
            raise InvokeError(f"{self.identity.username or 'Anonymous user'} needs {TASK_DATA_PERM} "
                              f"to select rows by {', '.join(hidden)}")
        count = await self.db.remove(where)
        if count:
            self.reporter.changed()
        return {"count": count}

    @handler("gc-mark", DB_ADMIN_PERM, writes=True)
    async def h_gc_mark(self, arg: Any) -> Any:
        where = arg["where"]
        mark = arg["mark"]
        if type(where) is not dict or type(mark) is not str:
            raise ProtocolError("bad gc-mark arguments")
        return {"count": await self.db.gc_mark(mark, where)}

    @handler("gc-mark-stream", DB_ADMIN_PERM, writes=True, stream=True)
    async def h_gc_mark_stream(self, arg: Any) -> Any:
        gc_mark = self.db.gc_mark

        async def mark_line(line: str) -> str:
            try:
                d = loads(line)
            except (ValueError, RecursionError):
                raise InvokeError(f"Could not decode JSONL input '{line}'") from None
            if type(d) is not dict:
                raise ProtocolError("gc-mark-stream line is not an object")
            try:
                mark = d["mark"]
                where = d["where"]
            except KeyError as e:
                raise InvokeError(f"Input line is missing key '{e}' ") from None
            if type(mark) is not str or type(where) is not dict:
                raise ProtocolError("bad gc-mark-stream arguments")
            return dumps({"count": await gc_mark(mark, where)})

        return await self._stream(mark_line)

    @handler("gc-sweep", DB_ADMIN_PERM, writes=True)
    async def h_gc_sweep(self, arg: Any) -> Any:
        mark = arg["mark"]
        if type(mark) is not str:
            raise ProtocolError("mark must be a string")
        current = await self.db.get_current_gc_mark()
        if not current or mark != current:
            raise InvokeError(f"'{mark}' is not the current mark. Refusing to sweep")
        count = await self.db.gc_sweep()
        if count:
            self.reporter.changed()
        return {"count": count}

    @handler("gc-status", DB_ADMIN_PERM, writes=True)
    async def h_gc_status(self, arg: Any) -> Any:
        keep, remove, mark = await self.db.gc_status()
        return {"keep": keep, "remove": remove, "mark": mark}

    @handler("clean-unused", DB_ADMIN_PERM, writes=True)
    async def h_clean_unused(self, arg: Any) -> Any:
        max_age = arg["max_age_seconds"]
        if isinstance(max_age, bool) or not isinstance(max_age, int | float) or not math.isfinite(max_age):
            raise ProtocolError("max_age_seconds must be a number")
        try:
            oldest = datetime.now(UTC) - timedelta(seconds=max_age)
        except OverflowError:
            oldest = datetime.min.replace(tzinfo=UTC) if max_age > 0 else datetime.now(UTC)
        count = await self.db.clean_unused(oldest)
        if count:
            self.reporter.changed()
        return {"count": count}

    @handler("refresh-token", USER_ADMIN_PERM, allow_anon=False, self_service=True, writes=True)
    async def h_refresh_token(self, arg: Any) -> Any:
        username = str(arg["username"])
        token = await self.auth.refresh_token(username)
        if token is None:
            raise InvokeError(f"No user named '{username}' exists")
        return {"username": username, "token": token}

    def _perm_arg(self, value: Any) -> tuple[str, ...]:
        try:
            return parse_permissions(value)
        except PermissionArgError as e:
            raise InvokeError(str(e)) from None

    @handler("set-user-perms", USER_ADMIN_PERM, allow_anon=False, writes=True)
    async def h_set_user_perms(self, arg: Any) -> Any:
        username = str(arg["username"])
        perms = self._perm_arg(arg["permissions"])
        if not await self.auth.set_perms(username, perms):
            raise InvokeError(f"No user named '{username}' exists")
        return {"username": username, "permissions": display_permissions(perms)}

    @handler("new-user", USER_ADMIN_PERM, allow_anon=False, writes=True)
    async def h_new_user(self, arg: Any) -> Any:
        username = str(arg["username"])
        perms = self._perm_arg(arg["permissions"])
        token = await self.auth.new_user(username, perms)
        if token is None:
            raise InvokeError(f"Cannot create new user '{username}'")
        return {"username": username, "permissions": display_permissions(perms), "token": token}

    @handler("delete-user", USER_ADMIN_PERM, allow_anon=False, self_service=True, writes=True)
    async def h_delete_user(self, arg: Any) -> Any:
        username = str(arg["username"])
        if not await self.auth.delete_user(username):
            raise InvokeError(f"No user named '{username}' exists")
        return {"username": username}


def build_table(read_only: bool) -> dict[str, Handler]:
    """Message name -> handler, in registration order (dispatch order for multi-key messages)."""
    return {h.name: h for h in _TABLE if not (read_only and h.writes)}
