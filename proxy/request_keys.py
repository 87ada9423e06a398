"""What a request carries between the parts that handle it (aiohttp's typed request storage).

Set by the handler side, read by the middleware (metrics, traffic history) and the access log
after the answer, so they need not parse or decide anything again.
"""

from __future__ import annotations

from aiohttp import web

from proxy.auth import Identity
from proxy.names import SstateName

RID_KEY = web.RequestKey("rid", str)  # the request id (errors.request_id), logged and sent back
STARTED_KEY = web.RequestKey("started", bool)  # the response head is out: no other answer now
IDENTITY_KEY = web.RequestKey("identity", Identity)  # the caller, once identified (http_auth)
USER_KEY = web.RequestKey("user", str)  # the caller's user name (not set: anonymous)
# An object request's source: hit, equivalent, upstream, miss (GET/HEAD), upload, delete.
SOURCE_KEY = web.RequestKey("source", str)
NAME_KEY: web.RequestKey[SstateName | None] = web.RequestKey("name")  # the parsed name asked for
SENT_KEY = web.RequestKey("sent", int)  # object body bytes written to the client
