"""Credentials of the HTTP client commands (`push`, `stats --url`) for a service URL.

Order: ``SSTATE_PROXY_USER`` + ``SSTATE_PROXY_TOKEN`` when both are set (a CI job's secret
overrides whatever the machine's ``~/.netrc`` holds), else the ``~/.netrc`` entry of the URL's
host (``NETRC`` names another file, as Python's requests reads it), else anonymous. Credentials
inside the URL are refused: they would show in process lists and shell histories.
"""

from __future__ import annotations

import base64
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

USER_ENV = "SSTATE_PROXY_USER"
TOKEN_ENV = "SSTATE_PROXY_TOKEN"


class CredentialsError(ValueError):
    """Unusable URL or credentials; str() is the one line the CLI prints."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    token: str
    origin: str  # where they came from, for messages: "SSTATE_PROXY_USER" or the netrc path

    def authorization(self) -> str:
        """The ``Authorization`` header's value (HTTP Basic, UTF-8)."""
        return basic_authorization(self.username, self.token)

    def __repr__(self) -> str:  # never show the token in a traceback or a log
        return f"Credentials(username={self.username!r}, origin={self.origin!r})"


def basic_authorization(username: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic (UTF-8; aiohttp's BasicAuth is deprecated)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def netrc_entry(host: str, env: Mapping[str, str] | None = None, *,
                check_permissions: bool = True) -> tuple[str, str, str] | None:
    """(login, password, file) of ``host`` in the netrc file (``NETRC`` names another one than
    ``~/.netrc``), or None without a file or an entry; CredentialsError when it cannot be read.
    With ``check_permissions``, a ``~/.netrc`` others may read is refused (Python's netrc check)."""
    env = os.environ if env is None else env
    named = env.get("NETRC")
    path = named or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.exists(path):
        return None
    try:
        # netrc.netrc(None) reads ~/.netrc and refuses it when others may read it (a token inside)
        entry = netrc.netrc(None if check_permissions and not named else path).authenticators(host)
    except netrc.NetrcParseError as e:
        raise CredentialsError(f"cannot read {path}: {e}") from None
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror}") from None
    if entry is None:
        return None
    login, _account, password = entry
    return login or "", password or "", path


def check_url(url: str) -> str:
    """``url`` without a trailing '/', or CredentialsError when it is not an http(s) URL or
    carries credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CredentialsError(f"not an http(s) URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise CredentialsError(
            f"credentials in the URL are not accepted; use ~/.netrc or {USER_ENV}/{TOKEN_ENV}")
    if parts.query or parts.fragment:
        raise CredentialsError(f"the URL may not have a query or a fragment: {url!r}")
    return url.rstrip("/")


def find_credentials(url: str, env: dict[str, str] | None = None) -> Credentials | None:
    """The credentials to send to ``url`` (see the module docstring); None = anonymous."""
    env = os.environ if env is None else env
    user, token = env.get(USER_ENV), env.get(TOKEN_ENV)
    if user or token:
        if not (user and token):
            missing = TOKEN_ENV if user else USER_ENV
            raise CredentialsError(f"{USER_ENV} and {TOKEN_ENV} go together; {missing} is not set")
        return Credentials(user, token, USER_ENV)
    host = urlsplit(url).hostname or ""
    entry = netrc_entry(host, env)
    if entry is None:
        return None
    login, password, path = entry
    if not login or not password:
        raise CredentialsError(f"{path}: the entry for {host} needs login and password")
    return Credentials(login, password, path)
