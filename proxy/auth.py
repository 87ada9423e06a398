"""Users, tokens and permissions: one model for every face (HTTP mirror, /v1/equivalent, hashserv).

The rules are bitbake-hashserv's, so an existing bitbake-hashserv database keeps working:

* tokens are stored as ``"sha256:<salt>:<hex>"`` where ``hex = sha256(salt + token)`` and the salt
  is 16 hex characters; the token a client sends is the secret itself (64 url-safe characters);
* a request needing the permission set ``R`` is allowed iff
  ``(@all in anon or R <= anon) or (logged in and (@all in user or R <= user))``:
  logged-in users also get everything anonymous users get (not the union of the two sets);
* ``@none`` is accepted in permission lists and dropped.

Our additions, both implied by ``@all``: ``@upload`` (PUT of sstate objects) and ``@task-data``
(seeing who reported a row and what it built: ``TASK_DATA_COLUMNS``). Task data is shown to a
logged-in user holding ``@task-data`` or ``@all``, and to the user a row names as its ``owner``
(their own report); never to anonymous clients: ``@task-data`` is refused in the anonymous
permissions. ``visible_row`` is the one filter every face applies to a row it answers with.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from storage.equivalence import EquivalenceDB, User

log = logging.getLogger("sstate_proxy.auth")

NONE_PERM = "@none"
READ_PERM = "@read"
REPORT_PERM = "@report"
DB_ADMIN_PERM = "@db-admin"
USER_ADMIN_PERM = "@user-admin"
UPLOAD_PERM = "@upload"
TASK_DATA_PERM = "@task-data"
ALL_PERM = "@all"

#: every permission a user may hold (``@none`` is accepted on input and dropped)
KNOWN_PERMISSIONS = frozenset({READ_PERM, REPORT_PERM, DB_ADMIN_PERM, USER_ADMIN_PERM, UPLOAD_PERM,
                               TASK_DATA_PERM, ALL_PERM})
#: what a reply shows for a user holding ``@all``: exactly bitbake's list, so its clients and
#: test-suite see what they expect (``@upload`` and ``@task-data`` are implied by ``@all`` all the same)
BITBAKE_ALL_PERMISSIONS = ("@all", "@db-admin", "@read", "@report", "@user-admin")
#: anonymous users may never hold these (bitbake's two, and task data: it names people and builds)
FORBIDDEN_ANON = frozenset({USER_ADMIN_PERM, ALL_PERM, TASK_DATA_PERM})
#: the columns of a reported row that say who reported it and what it built
TASK_DATA_COLUMNS = ("owner", "PN", "PV", "PR", "task", "outhash_siginfo")

TOKEN_ALGORITHM = "sha256"
TOKEN_SIZE = 48  # bytes -> 64 base64 characters, no padding
SALT_SIZE = 8  # bytes -> 16 hex characters
CACHE_TTL_S = 10.0
CACHE_MAX = 4096


class PermissionArgError(ValueError):
    """A permission list given by a client is malformed; str() is bitbake's error text."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: ``username`` None means anonymous."""

    username: str | None
    permissions: frozenset[str]

    anonymous: ClassVar[Identity]

    @classmethod
    def from_user(cls, user: User) -> Identity:
        return cls(user.username, frozenset(user.permissions))


Identity.anonymous = Identity(None, frozenset())


# --- tokens ---------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh random token: 48 random bytes, base64 with altchars ``._`` (64 characters)."""
    return base64.b64encode(os.urandom(TOKEN_SIZE), b"._").decode("ascii")


def new_salt() -> str:
    return os.urandom(SALT_SIZE).hex()


def hash_token(token: str, salt: str | None = None, algo: str = TOKEN_ALGORITHM) -> str:
    """``"<algo>:<salt>:<hexdigest(salt + token)>"``, bitbake's stored form."""
    if salt is None:
        salt = new_salt()
    h = hashlib.new(algo)
    h.update(salt.encode("utf-8"))
    h.update(token.encode("utf-8"))
    return f"{algo}:{salt}:{h.hexdigest()}"


def verify_token(token: str, stored: str) -> bool:
    """True if ``token`` matches the stored ``algo:salt:hex`` hash (constant-time compare)."""
    try:
        algo, salt, _digest = stored.split(":")
    except (ValueError, AttributeError):
        return False
    if algo not in hashlib.algorithms_available:
        return False
    try:
        computed = hash_token(token, salt, algo)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed.encode("utf-8"), stored.encode("utf-8"))


# --- permissions ----------------------------------------------------------------------------


def parse_permissions(arg: object) -> tuple[str, ...]:
    """Validate a client-supplied permission list -> sorted tuple without ``@none``.

    Raises PermissionArgError with bitbake's texts.
    """
    if not isinstance(arg, list):
        raise PermissionArgError("Unexpected type for permissions")
    perms = set()
    for p in arg:
        if not isinstance(p, str):
            raise PermissionArgError("Unexpected type for permissions")
        perms.add(p)
    perms.discard(NONE_PERM)
    unknown = perms - KNOWN_PERMISSIONS
    if unknown:
        raise PermissionArgError(f"Unknown permissions {', '.join(sorted(unknown))}")
    return tuple(sorted(perms))


def display_permissions(perms: Iterable[str]) -> list[str]:
    """What replies show: bitbake's full list for ``@all``, else the sorted stored list."""
    perms = set(perms)
    if ALL_PERM in perms:
        return list(BITBAKE_ALL_PERMISSIONS)
    return sorted(perms)


def parse_anon_perms(perms: Iterable[str]) -> frozenset[str]:
    """Anonymous permissions from config/CLI; refuses ``@all``/``@user-admin`` like bitbake, and
    ``@task-data`` (task data is never shown to anonymous clients)."""
    out = set()
    for p in perms:
        if p == NONE_PERM:
            continue
        if p not in KNOWN_PERMISSIONS:
            raise ValueError(f"unknown permission {p!r}")
        out.add(p)
    if TASK_DATA_PERM in out:
        raise ValueError(f"{TASK_DATA_PERM} is never granted to anonymous users (task data is shown only "
                         f"to logged-in users holding it); grant it to users with `sstate-proxy user perms`")
    bad = out & FORBIDDEN_ANON
    if bad:
        raise ValueError(f"Permission(s) {' '.join(sorted(bad))} are not allowed for anonymous users")
    return frozenset(out)


def sees_task_data(identity: Identity | None, owner: object = None) -> bool:
    """True if ``identity`` may see the task data of a row whose owner is ``owner``: a logged-in
    user holding ``@task-data`` or ``@all``, or the owner itself. Anonymous permissions never
    count (``parse_anon_perms`` refuses ``@task-data``)."""
    if identity is None or identity.username is None:
        return False
    perms = identity.permissions
    return TASK_DATA_PERM in perms or ALL_PERM in perms or owner == identity.username


def visible_row(identity: Identity | None, row: dict[str, Any] | None) -> dict[str, Any] | None:
    """``row`` as ``identity`` may see it: task-data columns present in it become None (the row
    keeps bitbake's shape: a client reading ``row["PN"]`` gets null, not a KeyError). Every face
    that answers with a reported row goes through this."""
    # a mapping-only row (get without all: the hot path) has none of the columns: no copy
    if row is None or row.keys().isdisjoint(TASK_DATA_COLUMNS) or sees_task_data(identity, row.get("owner")):
        return row
    return {k: (None if k in TASK_DATA_COLUMNS else v) for k, v in row.items()}


def task_data_filter_keys(where: Iterable[str]) -> list[str]:
    """The task-data columns a query filter (``remove``'s ``where``) names: filtering on them
    tells a caller which rows hold that task data, so it needs the permission too."""
    return [k for k in where if k in TASK_DATA_COLUMNS]


# --- the service ----------------------------------------------------------------------------


class Auth:
    """Authentication and authorisation over the users table of the equivalence database.

    All user writes should go through this object so the short authentication cache of this
    process is invalidated at once (other worker processes see a change within CACHE_TTL_S).
    """

    def __init__(self, db: EquivalenceDB, anon_perms: Iterable[str] = (READ_PERM,),
                 cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.db = db
        self.anon_perms = parse_anon_perms(anon_perms)
        self._anon_all = ALL_PERM in self.anon_perms
        self._cache_ttl = cache_ttl_s
        self._cache: dict[tuple[str, bytes], tuple[float, Identity]] = {}
        self._token_lock = asyncio.Lock()

    # identities ---------------------------------------------------------------------------

    def anonymous(self) -> Identity:
        return Identity.anonymous

    async def authenticate(self, username: str, token: str) -> Identity | None:
        """The identity for a correct username + token, else None. Never logs the token."""
        if not isinstance(username, str) or not isinstance(token, str):
            return None
        key = (username, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[key]
        user = await self.db.lookup_user(username)
        if user is None:
            hash_token(token, "0" * (2 * SALT_SIZE))  # same work as for a known user (timing)
            log.info("authentication failed for user %r", username)
            return None
        if not user.token_hash or not verify_token(token, user.token_hash):
            log.info("authentication failed for user %r", username)
            return None
        ident = Identity.from_user(user)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (now + self._cache_ttl, ident)
        return ident

    def invalidate(self, username: str | None = None) -> None:
        """Forget cached authentications (of one user, or all)."""
        if username is None:
            self._cache.clear()
            return
        for k in [k for k in self._cache if k[0] == username]:
            del self._cache[k]

    def allowed(self, identity: Identity | None, required: Iterable[str], allow_anon: bool = True) -> bool:
        """bitbake's rule: the anonymous set alone, or the user's set alone, must cover ``required``."""
        req = required if isinstance(required, (set, frozenset)) else frozenset(required)
        if allow_anon and (self._anon_all or req <= self.anon_perms):
            return True
        if identity is None or identity.username is None:
            return False
        perms = identity.permissions
        return ALL_PERM in perms or req <= perms

    def denial_text(self, identity: Identity | None, required: Iterable[str]) -> str:
        """bitbake's exact denial message."""
        who = identity.username if identity is not None and identity.username is not None else "Anonymous user"
        return f"{who} is not allowed to access permissions(s) {', '.join(required)}"

    # user management (all writes invalidate the cache) ------------------------------------

    async def lookup_user(self, username: str) -> User | None:
        return await self.db.lookup_user(username)

    async def get_all_users(self) -> list[User]:
        return await self.db.get_all_users()

    async def generate_token(self) -> str:
        """A new token, globally rate-limited (10/s per process) like bitbake's ``new_token``."""
        async with self._token_lock:
            await asyncio.sleep(0.1)
            return new_token()

    async def new_user(self, username: str, permissions: Iterable[str], token: str | None = None) -> str | None:
        """Create a user; returns its token, or None if the user exists."""
        token = token if token is not None else await self.generate_token()
        ok = await self.db.new_user(username, tuple(sorted(set(permissions))), hash_token(token))
        self.invalidate(username)
        return token if ok else None

    async def set_token(self, username: str, token: str) -> bool:
        ok = await self.db.set_user_token(username, hash_token(token))
        self.invalidate(username)
        return ok

    async def refresh_token(self, username: str) -> str | None:
        """A new random token for the user; None if no such user."""
        token = await self.generate_token()
        return token if await self.set_token(username, token) else None

    async def set_perms(self, username: str, permissions: Iterable[str]) -> bool:
        ok = await self.db.set_user_perms(username, tuple(sorted(set(permissions))))
        self.invalidate(username)
        return ok

    async def delete_user(self, username: str) -> bool:
        ok = await self.db.delete_user(username)
        self.invalidate(username)
        return ok

    async def ensure_admin(self, username: str, token: str) -> None:
        """Create ``username`` with ``@all`` and ``token``, or reset an existing one to that."""
        if await self.db.new_user(username, (ALL_PERM,), hash_token(token)):
            log.info("created admin user %r", username)
        else:
            await self.db.set_user_perms(username, (ALL_PERM,))
            await self.db.set_user_token(username, hash_token(token))
            log.info("admin user %r updated", username)
        self.invalidate(username)
