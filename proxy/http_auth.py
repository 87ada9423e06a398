"""HTTP credentials -> Identity, and the one permission gate every HTTP handler goes through.

bitbake's HEAD check sends netrc/URL credentials pre-emptively; wget only after a 401 with
``WWW-Authenticate``. So a request that lacks a permission gets 401 + challenge when it came
anonymously (the client may retry with credentials) and 403 when it was already authenticated.
Wrong credentials are always 401, never a silent downgrade to anonymous.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from aiohttp import web

from proxy.auth import Auth, Identity
from proxy.request_keys import IDENTITY_KEY, USER_KEY

CHALLENGE = {"WWW-Authenticate": 'Basic realm="sstate-proxy"'}


def _unauthorized(reason: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=reason + "\n", headers=CHALLENGE)


async def identify(request: web.Request, auth: Auth) -> Identity:
    """The caller's identity (cached on the request); raises 401 for malformed or wrong credentials."""
    cached = request.get(IDENTITY_KEY)
    if cached is not None:
        return cached
    ident = request[IDENTITY_KEY] = await identify_headers(request.headers, auth)
    if ident.username is not None:
        request[USER_KEY] = ident.username  # for the access log
    return ident


async def identify_headers(h: Mapping[str, str], auth: Auth) -> Identity:
    """The identity the request headers ``h`` (case-insensitive mapping) carry; raises 401 for
    malformed or wrong credentials."""
    header = h.get("Authorization")
    if not header:
        return auth.anonymous()
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise _unauthorized("unsupported Authorization scheme (use Basic user:token)")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("malformed Basic credentials") from None
    username, sep, token = decoded.partition(":")
    if not sep or not username:
        raise _unauthorized("malformed Basic credentials")
    found = await auth.authenticate(username, token)
    if found is None:
        raise _unauthorized("wrong credentials")
    return found


def check(ident: Identity, auth: Auth, perms: tuple[str, ...]) -> Identity:
    """``ident`` if it holds ``perms``; else raises 401 (anonymous) or 403 (logged in)."""
    if auth.allowed(ident, perms):
        return ident
    if ident.username is None:
        raise _unauthorized(f"authentication required for {' '.join(perms)}")
    raise web.HTTPForbidden(text=f"{ident.username} lacks {' '.join(perms)}\n")


async def require_user(request: web.Request, auth: Auth) -> Identity:
    """The caller, who must be logged in: anonymous gets 401 with the challenge (a browser then
    asks for credentials and keeps sending them to the pages below)."""
    ident = await identify(request, auth)
    if ident.username is None:
        raise _unauthorized("log in first")
    return ident


async def require(request: web.Request, auth: Auth, *perms: str) -> Identity:
    """Identity of the caller if it holds ``perms``; else 401 (anonymous) or 403 (logged in)."""
    return check(await identify(request, auth), auth, perms)
