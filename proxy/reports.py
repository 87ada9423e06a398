"""bitbake-hashserv's lookup and report algorithm, shared by every equivalence face.

Kept apart from the faces so /v1/equivalent and OEHASHEQUIV cannot drift: first writer wins
per (method, taskhash); a report takes the unihash of the oldest equivalent outhash, else its
own; without @report (or on a read-only server) a report is only a lookup.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.auth import Auth, Identity
from storage.equivalence import EquivalenceDB, Row

_HEX = frozenset("0123456789abcdef")


class ReportError(ValueError):
    """The report is malformed (bad unihash...): the face answers 400 / invoke-error."""


def is_valid_unihash(value: object) -> bool:
    """``^[0-9a-f]{64}$`` on a str, as bitbake's ``is_valid_unihash`` (every face uses this one)."""
    return type(value) is str and len(value) == 64 and _HEX.issuperset(value)


class Reporter:
    def __init__(self, db: EquivalenceDB, auth: Auth, *, read_only: bool = False,
                 on_change: Callable[[], None] | None = None) -> None:
        self.db = db
        self.auth = auth
        self.read_only = read_only
        self.on_change = on_change or (lambda: None)

    async def get(self, method: str, taskhash: str) -> Row | None:
        return await self.db.get_unihash(method, taskhash)

    async def report(self, row: Row, unihash: object, ident: Identity) -> Row:
        """``row`` holds taskhash, method, outhash and optional owner/PN/PV/PR/task/outhash_siginfo."""
        if not is_valid_unihash(unihash):
            raise ReportError("Invalid unihash")
        if self.read_only or not self.auth.allowed(ident, ("@report",)):
            found = await self.db.get_outhash(row["method"], row["outhash"])
            return {"taskhash": row["taskhash"], "method": row["method"],
                    "unihash": found["unihash"] if found else unihash}
        if ident.username is not None:
            row = {**row, "owner": ident.username}
        stored = await self.db.insert_report(row, unihash)
        self.on_change()
        return stored
