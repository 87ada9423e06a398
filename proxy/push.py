"""`sstate-proxy push SSTATE_DIR --url URL`: publish an sstate directory to a running service.

* The directory is walked as `import` walks it (``importer.scan``): every layout bitbake has
  written, objects and their ``.siginfo``/``.sig``; temp/lock files ignored; names that are not
  sstate names, symlinks leading outside, special files refused (listed, not fatal).
* What the service has is skipped: a ``HEAD`` answered ``200`` with ``X-Sstate-Source: hit``.
  A ``200`` with ``equivalent`` (the rewrite answering for a missing name) or without the
  header is not proof, so the object is sent; a ``PUT`` answered ``200`` (the name existed:
  first write wins) counts as skipped too. So a rerun, after a failure or a kill, sends only
  what is missing.
* ``--jobs N`` objects in flight, on one aiohttp session. Each ``PUT`` streams the file (never
  read whole into memory) with ``Content-Length`` and ``Digest: sha-256=`` (computed first, in a
  thread), which the service verifies before it makes the object visible.
* Fails early and clearly: a service that cannot be reached, or answers ``401``/``403`` (wrong
  credentials, no ``@upload``, read-only), stops the run with one line. The first ``PUT`` goes
  alone, with ``Expect: 100-continue`` (the service checks the permission before the body is
  sent), so a missing permission costs one refused request, not one per job.
* Transient faults (``502``/``503``/``504``, a dropped connection) are retried a few times; an
  object that still fails is counted, listed, and makes the exit status 1.
* ``--dry-run``: only the ``HEAD`` requests; prints the keys that would be sent.

Credentials: ``proxy.credentials`` (``SSTATE_PROXY_USER``/``SSTATE_PROXY_TOKEN``, else
``~/.netrc``), sent as HTTP Basic.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy import importer
from proxy.credentials import Credentials, CredentialsError, check_url, find_credentials

SOURCE_HEADER = "X-Sstate-Source"
RETRIES = 3  # attempts per request for transient faults (UNAVAILABLE, a dropped connection)
RETRY_DELAY_S = 0.5  # times the attempt number; a 503's Retry-After is honoured up to MAX_DELAY_S
MAX_DELAY_S = 5.0
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 300.0  # between two reads; a big upload's answer comes after its whole body
LISTED = 50  # failures and refusals printed at most
REDIRECTS = (301, 302, 303, 307, 308)
UNAVAILABLE = (502, 503, 504)  # the service's 503 (database unavailable), a load balancer's 502/504


class PushAborted(Exception):
    """The run cannot go on (unreachable service, wrong credentials, no permission, wrong URL);
    str() is the one line the CLI prints."""


class ObjectFailed(Exception):
    """One object could not be checked or sent; the run goes on."""


class Transient(Exception):
    """A fault worth another attempt (503, a dropped connection)."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass
class PushSummary:
    dry_run: bool = False
    sent: int = 0
    bytes_sent: int = 0
    skipped: int = 0  # the service has them already
    failed: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    seconds: float = 0.0
    would_send: list[str] = field(default_factory=list)  # --dry-run: the keys missing there
    aborted: str | None = None

    def line(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        n = len(self.would_send) if self.dry_run else self.sent
        failed = "" if self.dry_run else f"failed {len(self.failed)}, "
        return (f"{verb} {n} ({self.bytes_sent} bytes), skipped {self.skipped} (already on the service), "
                f"{failed}refused {len(self.refused)}, ignored {self.ignored} temp/lock files, "
                f"in {self.seconds:.1f} s")


def _describe(status: int, text: str) -> str:
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"{status} {first}".strip()


def _sha256_b64(f) -> str:
    return base64.b64encode(hashlib.file_digest(f, "sha256").digest()).decode()


class Pusher:
    """Checks and sends objects to ``base_url`` (the mirror's URL, under which keys are paths)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, jobs: int, dry_run: bool,
                 credentials: Credentials | None) -> None:
        self.session = session
        self.base = base_url.rstrip("/")
        self.jobs = max(1, jobs)
        self.dry_run = dry_run
        self.credentials = credentials
        self._gate = asyncio.Lock()  # the first PUT goes alone (see the module docstring)
        self._gate_passed = False
        self.aborted: str | None = None  # why the run stopped (the first PushAborted)

    def url_of(self, key: str) -> URL:
        # ':' and '+' percent-encoded as bitbake's fetcher sends them; the service decodes once
        return URL(self.base + "/" + quote(key, safe="/"), encoded=True)

    # -- the requests ------------------------------------------------------------------------

    def _auth_failure(self, method: str, status: int, text: str) -> PushAborted:
        who = (f"user {self.credentials.username!r} (from {self.credentials.origin})"
               if self.credentials else "anonymous (no credentials in SSTATE_PROXY_USER/_TOKEN or ~/.netrc)")
        if status == 401:
            why = "wrong credentials" if self.credentials else "authentication required"
        else:
            why = "permission refused"
        return PushAborted(f"{method} {self.base}: {why} for {who}: {_describe(status, text)}")

    def _redirected(self, method: str, headers) -> PushAborted:
        # not followed: a PUT's body cannot be replayed to another place, and credentials must not
        # go wherever a redirect points (http -> https, another host)
        return PushAborted(f"{method} {self.base}: redirected to {headers.get('Location', '?')}; "
                           "give the URL it points to")

    async def _attempts(self, what: str, request):
        """Run ``request()`` until it returns, retrying Transient faults; ObjectFailed at the end."""
        attempt = 1
        while True:
            try:
                return await request()
            except Transient as t:
                if attempt >= RETRIES:
                    raise ObjectFailed(f"{what}: {t}") from None
                await asyncio.sleep(min(MAX_DELAY_S, max(t.delay, RETRY_DELAY_S * attempt)))
                attempt += 1

    async def has(self, key: str) -> bool:
        """True when the service stores ``key`` itself (not an equivalent object for it)."""

        async def head() -> bool:
            try:
                async with self.session.head(self.url_of(key), allow_redirects=False) as r:
                    # a HEAD answer has no body to explain itself: the reason phrase does
                    text = "" if r.status < 400 else (await r.text(errors="replace")) or (r.reason or "")
                    return self._head_answer(r.status, r.headers, text)
            except aiohttp.ClientConnectorError as e:
                raise PushAborted(f"cannot connect to {self.base}: {e.os_error or e}") from None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise Transient(f"HEAD: {type(e).__name__}: {e}", 0) from None

        return await self._attempts("HEAD", head)

    def _head_answer(self, status: int, headers, text: str) -> bool:
        if status == 200:
            return headers.get(SOURCE_HEADER) == "hit"
        if status == 404:
            return False
        if status in (401, 403):
            raise self._auth_failure("HEAD", status, text)
        if status in REDIRECTS:
            raise self._redirected("HEAD", headers)
        if status in UNAVAILABLE:
            raise Transient(_describe(status, text), _retry_after(headers))
        raise ObjectFailed(f"HEAD answered {_describe(status, text)}")

    async def send(self, key: str, path: str) -> tuple[bool, int]:
        """PUT ``key`` from ``path``: (True, bytes) when stored now, (False, 0) when it existed."""
        if not self._gate_passed:
            async with self._gate:
                if self.aborted is not None:  # the PUT before this one stopped the run
                    raise PushAborted(self.aborted)
                if not self._gate_passed:
                    result = await self._attempts("PUT", lambda: self._put(key, path, gate=True))
                    self._gate_passed = True
                    return result
        return await self._attempts("PUT", lambda: self._put(key, path, gate=False))

    async def _put(self, key: str, path: str, *, gate: bool) -> tuple[bool, int]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; aiohttp reads it in its executor
        except OSError as e:
            raise ObjectFailed(f"cannot read {path}: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            # size and digest of this open file: a file replaced meanwhile does not mix two versions
            digest = await asyncio.to_thread(_sha256_b64, f)
            f.seek(0)
            headers = {"Content-Length": str(size), "Digest": f"sha-256={digest}",
                       "Content-Type": "application/octet-stream"}
            try:
                async with self.session.put(self.url_of(key), data=f, headers=headers, expect100=gate,
                                            allow_redirects=False) as r:
                    text = await r.text(errors="replace")
                    status, rheaders = r.status, r.headers
            except aiohttp.ClientConnectorError as e:
                raise PushAborted(f"cannot connect to {self.base}: {e.os_error or e}") from None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise Transient(f"{type(e).__name__}: {e}", 0) from None
        if status == 201:
            return True, size
        if status == 200:
            return False, 0
        if status in (401, 403):
            raise self._auth_failure("PUT", status, text)
        if status in REDIRECTS:
            raise self._redirected("PUT", rheaders)
        if status in UNAVAILABLE:
            raise Transient(_describe(status, text), _retry_after(rheaders))
        if gate and status in (404, 405, 501):  # not a mirror that takes uploads at this URL
            raise PushAborted(f"PUT {self.url_of(key)} answered {_describe(status, text)}: is {self.base} "
                              "the sstate-proxy mirror URL?")
        raise ObjectFailed(f"PUT answered {_describe(status, text)}")

    # -- the run -------------------------------------------------------------------------------

    async def one(self, key: str, path: str, s: PushSummary) -> None:
        try:
            if await self.has(key):
                s.skipped += 1
                return
            if self.dry_run:
                s.would_send.append(key)
                try:
                    s.bytes_sent += os.stat(path).st_size
                except OSError as e:
                    s.failed.append((key, f"cannot read {path}: {e.strerror}"))
                return
            stored, nbytes = await self.send(key, path)
            if stored:
                s.sent += 1
                s.bytes_sent += nbytes
            else:
                s.skipped += 1
        except ObjectFailed as e:
            s.failed.append((key, str(e)))

    async def run(self, items: list[tuple[str, str]], s: PushSummary, advance=None) -> None:
        """Push ``items`` ((key, path)) with ``jobs`` workers; stops at the first PushAborted,
        recorded in ``s.aborted`` (requests in flight finish)."""
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for it in items:
            queue.put_nowait(it)

        async def worker() -> None:
            while self.aborted is None:
                try:
                    key, path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await self.one(key, path, s)
                except PushAborted as e:
                    if self.aborted is None:
                        self.aborted = s.aborted = str(e)
                    return
                if advance is not None:
                    advance(s)

        await asyncio.gather(*(worker() for _ in range(self.jobs)))


def _retry_after(headers) -> float:
    try:
        return float(headers.get("Retry-After", "0"))
    except ValueError:
        return 0.0


async def push_dir(top: str, url: str, *, jobs: int = 8, dry_run: bool = False,
                   credentials: Credentials | None = None, show_progress: bool = True) -> PushSummary:
    """Publish ``top`` to the service at ``url`` (see the module docstring)."""
    started = time.monotonic()
    s = PushSummary(dry_run=dry_run)
    scanned = importer.Summary()  # scan() records refusals and ignored litter there
    items = await asyncio.to_thread(importer.scan, top, scanned)
    s.refused, s.ignored = scanned.refused, scanned.ignored
    headers = {"User-Agent": "sstate-proxy-push"}
    if credentials:
        headers["Authorization"] = credentials.authorization()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=max(1, jobs))
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        pusher = Pusher(session, url, jobs=jobs, dry_run=dry_run, credentials=credentials)
        if show_progress and items:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[counts]}"), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False) as progress:
                task = progress.add_task("checking" if dry_run else "pushing", total=len(items), counts="")

                def advance(st: PushSummary) -> None:
                    done = len(st.would_send) if dry_run else st.sent
                    counts = (f"{'missing' if dry_run else 'sent'} {done}, skipped {st.skipped}, "
                              f"failed {len(st.failed)}")
                    progress.update(task, advance=1, counts=counts)

                await pusher.run(items, s, advance)
        else:
            await pusher.run(items, s)
    s.would_send.sort()
    s.seconds = time.monotonic() - started
    return s


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="publish an SSTATE_DIR to a running service over HTTP (PUT)")
    p.add_argument("sstate_dir", metavar="SSTATE_DIR")
    p.add_argument("--url", required=True, metavar="URL",
                   help="the service's mirror URL, e.g. http://sstate.example.com:8080")
    p.add_argument("--jobs", "-j", type=int, default=8, metavar="N", help="objects in flight (default 8)")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    top = args.sstate_dir
    if not os.path.isdir(top):
        print(f"sstate-proxy push: {top!r} is not a directory", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("sstate-proxy push: --jobs must be at least 1", file=sys.stderr)
        return 2
    try:
        url = check_url(args.url)
        credentials = find_credentials(url)
    except CredentialsError as e:
        print(f"sstate-proxy push: {e}", file=sys.stderr)
        return 2
    try:
        s = asyncio.run(push_dir(top, url, jobs=args.jobs, dry_run=args.dry_run, credentials=credentials,
                                 show_progress=not args.no_progress))
    except KeyboardInterrupt:  # what was stored is complete; a rerun sends the rest
        return 130
    for rel, why in s.refused[:LISTED]:
        print(f"refused {rel}: {why}", file=sys.stderr)
    if len(s.refused) > LISTED:
        print(f"... and {len(s.refused) - LISTED} more refused", file=sys.stderr)
    for rel, why in s.failed[:LISTED]:
        print(f"FAILED {rel}: {why}", file=sys.stderr)
    if len(s.failed) > LISTED:
        print(f"... and {len(s.failed) - LISTED} more failed", file=sys.stderr)
    for key in s.would_send:
        print(key)
    print(s.line())
    if s.aborted is not None:
        print(f"sstate-proxy push: {s.aborted}", file=sys.stderr)
        return 1
    return 1 if s.failed else 0
