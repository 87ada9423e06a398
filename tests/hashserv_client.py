"""Test-side OEHASHEQUIV client on bitbake's own RPC layer (``bb.asyncrpc`` from bitbake-setup).

bitbake-setup ships ``bb.asyncrpc`` but not ``hashserv``, so the hashserv calls are written here
(thin wrappers, the same messages and stream-mode handshakes bitbake's client sends). The
transport, framing, chunking, handshake and reconnect logic are bitbake's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import bb.asyncrpc
from bb.asyncrpc.client import ADDR_TYPE_TCP, ADDR_TYPE_UNIX, ADDR_TYPE_WS, parse_address

log = logging.getLogger("tests.hashserv_client")

MODE_NORMAL, MODE_GET_STREAM, MODE_EXISTS_STREAM, MODE_MARK_STREAM = range(4)
_MODE_CMD = {MODE_GET_STREAM: "get-stream", MODE_EXISTS_STREAM: "exists-stream",
             MODE_MARK_STREAM: "gc-mark-stream"}


class HashClient(bb.asyncrpc.AsyncClient):
    def __init__(self, username: str | None = None, password: str | None = None, timeout: float = 10) -> None:
        super().__init__("OEHASHEQUIV", "1.1", log, timeout=timeout)
        self.mode = MODE_NORMAL
        self.username = username
        self.password = password
        self.saved_become_user: str | None = None

    async def setup_connection(self) -> None:
        await super().setup_connection()
        self.mode = MODE_NORMAL
        if self.username:
            become = self.saved_become_user
            await self.auth(self.username, self.password)
            if become:
                await self.become_user(become)

    async def invoke(self, msg: Any, skip_mode: bool = False) -> Any:
        if not skip_mode:
            await self._set_mode(MODE_NORMAL)
        return await super().invoke(msg)

    async def _set_mode(self, new_mode: int) -> None:
        if new_mode == self.mode:
            return

        async def to_normal() -> str:
            if self.mode == MODE_NORMAL:
                return "ok"
            await self.socket.send("END")
            return await self.socket.recv()

        if self.mode != MODE_NORMAL:
            r = await self._send_wrapper(to_normal)
            if r != "ok":
                self.check_invoke_error(r)
                raise ConnectionError(f"bad reply leaving stream mode: {r!r}")
            self.mode = MODE_NORMAL
        if new_mode != MODE_NORMAL:
            r = await self.invoke({_MODE_CMD[new_mode]: None}, skip_mode=True)
            if r != "ok":
                self.check_invoke_error(r)
                raise ConnectionError(f"bad reply entering stream mode: {r!r}")
        self.mode = new_mode

    async def stream_batch(self, mode: int, lines: list[str]) -> list[str]:
        """Pipelined: every line is sent before the replies are read."""

        async def proc() -> list[str]:
            await self._set_mode(mode)
            for line in lines:
                await self.socket.send(line)
            return [await self.socket.recv() for _ in lines]

        return await self._send_wrapper(proc)

    # --- the calls -------------------------------------------------------------------------
    async def get_unihash(self, method: str, taskhash: str) -> str | None:
        return (await self.get_unihash_batch([(method, taskhash)]))[0]

    async def get_unihash_batch(self, args: list[tuple[str, str]]) -> list[str | None]:
        r = await self.stream_batch(MODE_GET_STREAM, [f"{m} {t}" for m, t in args])
        return [x or None for x in r]

    async def unihash_exists(self, unihash: str) -> bool:
        return (await self.unihash_exists_batch([unihash]))[0]

    async def unihash_exists_batch(self, unihashes: list[str]) -> list[bool]:
        return [r == "true" for r in await self.stream_batch(MODE_EXISTS_STREAM, unihashes)]

    async def report_unihash(self, taskhash: str, method: str, outhash: str, unihash: str,
                             extra: dict | None = None) -> Any:
        m = dict(extra or {})
        m.update(taskhash=taskhash, method=method, outhash=outhash, unihash=unihash)
        return await self.invoke({"report": m})

    async def report_unihash_equiv(self, taskhash: str, method: str, unihash: str) -> Any:
        return await self.invoke({"report-equiv": {"taskhash": taskhash, "method": method, "unihash": unihash}})

    async def get_taskhash(self, method: str, taskhash: str, all_properties: bool = False) -> Any:
        return await self.invoke({"get": {"taskhash": taskhash, "method": method, "all": all_properties}})

    async def get_outhash(self, method: str, outhash: str, taskhash: str, with_unihash: bool = True) -> Any:
        return await self.invoke({"get-outhash": {"outhash": outhash, "taskhash": taskhash, "method": method,
                                                  "with_unihash": with_unihash}})

    async def get_stats(self) -> Any:
        return await self.invoke({"get-stats": None})

    async def reset_stats(self) -> Any:
        return await self.invoke({"reset-stats": None})

    async def backfill_wait(self) -> int:
        return (await self.invoke({"backfill-wait": None}))["tasks"]

    async def remove(self, where: dict) -> Any:
        return await self.invoke({"remove": {"where": where}})

    async def clean_unused(self, max_age: float) -> Any:
        return await self.invoke({"clean-unused": {"max_age_seconds": max_age}})

    async def auth(self, username: str, token: str) -> Any:
        result = await self.invoke({"auth": {"username": username, "token": token}})
        self.username = username
        self.password = token
        self.saved_become_user = None
        return result

    async def refresh_token(self, username: str | None = None) -> Any:
        m = {"username": username} if username else {}
        result = await self.invoke({"refresh-token": m})
        if self.username and not self.saved_become_user and result["username"] == self.username:
            self.password = result["token"]
        return result

    async def set_user_perms(self, username: str, permissions: list[str]) -> Any:
        return await self.invoke({"set-user-perms": {"username": username, "permissions": permissions}})

    async def get_user(self, username: str | None = None) -> Any:
        return await self.invoke({"get-user": {"username": username} if username else {}})

    async def get_all_users(self) -> Any:
        return (await self.invoke({"get-all-users": {}}))["users"]

    async def new_user(self, username: str, permissions: list[str]) -> Any:
        return await self.invoke({"new-user": {"username": username, "permissions": permissions}})

    async def delete_user(self, username: str) -> Any:
        return await self.invoke({"delete-user": {"username": username}})

    async def become_user(self, username: str) -> Any:
        result = await self.invoke({"become-user": {"username": username}})
        self.saved_become_user = None if username == self.username else username
        return result

    async def get_db_usage(self) -> Any:
        return (await self.invoke({"get-db-usage": {}}))["usage"]

    async def get_db_query_columns(self) -> Any:
        return (await self.invoke({"get-db-query-columns": {}}))["columns"]

    async def gc_status(self) -> Any:
        return await self.invoke({"gc-status": {}})

    async def gc_mark(self, mark: str, where: dict) -> Any:
        return await self.invoke({"gc-mark": {"mark": mark, "where": where}})

    async def gc_mark_stream(self, mark: str, rows: list[dict]) -> dict:
        r = await self.stream_batch(MODE_MARK_STREAM, [json.dumps({"mark": mark, "where": w}) for w in rows])
        return {"count": sum(json.loads(x)["count"] for x in r)}

    async def gc_sweep(self, mark: str) -> Any:
        return await self.invoke({"gc-sweep": {"mark": mark}})


async def connect(address: str, username: str | None = None, password: str | None = None,
                  timeout: float = 10) -> HashClient:
    """A connected client for a bitbake address string (tcp, [v6], unix://, ws://)."""
    c = HashClient(username, password, timeout=timeout)
    kind, args = parse_address(address)
    if kind == ADDR_TYPE_UNIX:
        await c.connect_unix(*args)
    elif kind == ADDR_TYPE_WS:
        await c.connect_websocket(*args)
    elif kind == ADDR_TYPE_TCP:
        await c.connect_tcp(*args)
    await c.connect()
    return c
