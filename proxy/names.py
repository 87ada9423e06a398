"""Request paths and sstate object names: validation, parsing, hash swapping.

Pure functions, no I/O; they run on every request.

* ``safe_key(raw_path)`` turns the percent-encoded URL path (after the mirror prefix, without
  the query) into a relative storage key, or raises ``BadPath`` (-> HTTP 400).
* ``parse(key)`` recognises an sstate object / companion name of any OE-core release and
  returns an ``SstateName``; ``None`` means "not an sstate name" (served as a plain file,
  never rewritten).
* ``SstateName.with_hash(h)`` is the rewrite primitive: same name, other hash, hh/ dirs
  recomputed.

Names understood (as OE-core's sstate.bbclass writes them, release by release)::

    sstate-PN-ARCH-VENDOR-OS-PV-PR-PKGARCH-VER-<hash>_<task>.tgz           <= 1.2, flat, '-'
    [EXTRA/]hh/sstate-...-<hash>_<task>.tgz                                 1.3 .. 1.5
    [EXTRA/]hh/sstate:PN:ARCH-VENDOR-OS:PV:PR:PKGARCH:VER:<hash>_<task>.tgz 1.6 .. 3.0
    [EXTRA/]hh/hh/sstate:...:<hash>_<task>.tgz                              3.1 .. 3.4
    [EXTRA/]hh/hh/sstate:...:<hash>_<task>.tar.zst                          4.0 ..
    each optionally followed by .siginfo or .sig (companions)

``EXTRA/`` is SSTATE_EXTRAPATH (``universal/``, ``ubuntu-24.04/``, ...; any number of
leading directories).  SWSPEC names (``sstate:PN::PV:PR::VER:``) and truncated long names
need no special case: the stem is simply everything before the hash (the colon form ends
at the last ':', the dash form at the last '-').  The hash is 32..128 lowercase hex
(md5 before bitbake switched to sha256, sha256 since) or the literal ``INVALID`` (dirs
``IN/VA/``).  The hh dirs must equal the hash's first 2 (and next 2) characters, otherwise
the path is not an sstate name; neither is a name whose EXTRAPATH ends in a 2-hex-digit
directory (``a8/d7/<hash d7a8...>``: swapped/stale hash dirs, not ``EXTRA=a8/`` + ``hh/``).
Flat names (no directory at all) exist only in the dash form.  Lock/temp files (``.lock``,
``.tmp``, ``.done``, NamedTemporaryFile suffixes) never match, so they are not objects.

parse() and safe_key() run on every object request, so they are kept cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "BadPath",
    "COMPANIONS",
    "EXTENSIONS",
    "LAYOUTS",
    "MAX_KEY_BYTES",
    "MAX_SEGMENT_BYTES",
    "SstateName",
    "is_valid_hash",
    "parse",
    "safe_key",
]

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255

LAYOUTS = ("flat", "hh", "hhhh")
EXTENSIONS = (".tar.zst", ".tgz")
COMPANIONS = ("", ".siginfo", ".sig")


class BadPath(ValueError):
    """A request path that must be answered with 400; str() is the one-line reason."""


# --------------------------------------------------------------------------------------------
# safe_key
# --------------------------------------------------------------------------------------------

_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_key(raw_path: str) -> str:
    """Percent-decode ``raw_path`` once and return it as a safe relative key.

    ``raw_path`` is the URL path after the mirror prefix, as received (still percent-encoded,
    query removed).  ``+`` is kept (never a space), ``%2B`` becomes ``+``, ``%3A`` ``:``.
    Decoding happens exactly once: ``%252e%252e`` becomes the literal, harmless name
    ``%2e%2e``.  Raises ``BadPath`` for: empty, leading '/', invalid UTF-8, NUL/control
    characters (< 0x20, 0x7f), backslash, empty segments ('//', trailing '/'), '.' or '..'
    segments (in any encoding), a key over 1024 bytes or a segment over 255 bytes (UTF-8).
    """
    if not raw_path:
        raise BadPath("empty path")
    if "%" in raw_path:
        # Fast path for what bitbake sends (only %3A and %2B); same result as unquote().
        key = raw_path.replace("%3A", ":").replace("%2B", "+").replace("%3a", ":").replace("%2b", "+")
        if "%" in key:
            try:
                key = unquote(raw_path, errors="strict")
            except UnicodeDecodeError:
                raise BadPath("path is not valid UTF-8 after percent-decoding") from None
        if not key:
            raise BadPath("empty path")
    else:
        key = raw_path
    if key[0] == "/":
        raise BadPath("absolute path")
    m = _BAD_CHAR.search(key)
    if m is not None:
        if m.group() == "\\":
            raise BadPath("backslash in path")
        raise BadPath(f"control character 0x{ord(m.group()):02x} in path")
    try:
        nbytes = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a non-UTF-8 request line
        raise BadPath("path is not valid UTF-8") from None
    if nbytes > MAX_KEY_BYTES:
        raise BadPath(f"path longer than {MAX_KEY_BYTES} bytes")
    if "//" in key or key[-1] == "/":
        raise BadPath("empty path segment")
    if "." in key:
        k = "/" + key + "/"
        if "/./" in k or "/../" in k:
            raise BadPath("'.' or '..' path segment")
    if nbytes > MAX_SEGMENT_BYTES:
        ascii_only = nbytes == len(key)
        for seg in key.split("/"):
            if len(seg) > MAX_SEGMENT_BYTES // 4 and (
                len(seg) > MAX_SEGMENT_BYTES
                if ascii_only
                else len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES
            ):
                raise BadPath(f"path segment longer than {MAX_SEGMENT_BYTES} bytes")
    return key


# --------------------------------------------------------------------------------------------
# sstate names
# --------------------------------------------------------------------------------------------

_HASH = r"(?:[0-9a-f]{32,128}|INVALID)"
# What follows the stem.  The stem is everything up to the last separator: ':' for the
# colon form (1.6+), '-' for the dash form (<= 1.5); hash, task and extension contain neither.
_TAIL = re.compile(
    r"(?P<hash>" + _HASH + r")_(?P<task>[A-Za-z0-9_]+)(?P<ext>\.tar\.zst|\.tgz)(?P<comp>\.siginfo|\.sig)?"
)
_HASH_RE = re.compile(_HASH)


def is_valid_hash(h: str) -> bool:
    """True for what can appear as the hash of an sstate name (32..128 lowercase hex or INVALID)."""
    return _HASH_RE.fullmatch(h) is not None


@dataclass(frozen=True, slots=True)
class SstateName:
    """A parsed sstate object or companion name.

    ``key == dirpath + <hash dirs> + stem + hash + "_" + task + ext + companion`` where the hash
    dirs are ``""`` (flat), ``hash[:2] + "/"`` (hh) or ``hash[:2] + "/" + hash[2:4] + "/"``
    (hhhh).
    """

    dirpath: str  # SSTATE_EXTRAPATH, "" or e.g. "universal/" (always ends with '/')
    layout: str  # 'flat' | 'hh' | 'hhhh'
    stem: str  # everything in the basename before the hash, e.g. "sstate:zlib::1.3.1:r0::14:"
    hash: str  # 32..128 lowercase hex or "INVALID"
    task: str  # "populate_sysroot", "package_write_rpm", ... (without "do_")
    ext: str  # ".tar.zst" | ".tgz"
    companion: str = ""  # "" | ".siginfo" | ".sig"

    @property
    def hash_dirs(self) -> str:
        """The hash directories: '' (flat), 'hh/' or 'hh/hh/'."""
        h = self.hash
        if self.layout == "hhhh":
            return h[:2] + "/" + h[2:4] + "/"
        if self.layout == "hh":
            return h[:2] + "/"
        return ""

    @property
    def basename(self) -> str:
        return self.stem + self.hash + "_" + self.task + self.ext + self.companion

    @property
    def key(self) -> str:
        """The full relative key (what parse() was given)."""
        h = self.hash
        layout = self.layout
        if layout == "hhhh":
            d = h[:2] + "/" + h[2:4] + "/"
        elif layout == "hh":
            d = h[:2] + "/"
        else:
            d = ""
        return self.dirpath + d + self.stem + h + "_" + self.task + self.ext + self.companion

    @property
    def object_key(self) -> str:
        """The key of the object itself (companion suffix removed)."""
        key = self.key
        return key[: len(key) - len(self.companion)]

    @property
    def is_companion(self) -> bool:
        return self.companion != ""

    @property
    def is_colon_form(self) -> bool:
        """True for 'sstate:...' names (1.6+), False for the old 'sstate-...' form."""
        return self.stem[6] == ":"

    def with_hash(self, new_hash: str) -> SstateName:
        """The same name for another hash; only the hash and the hh/ dirs change.

        The stem is kept verbatim (a truncated stem stays truncated exactly as it was; for
        hashes of the same length that is what generate_sstatefn would produce)."""
        if not is_valid_hash(new_hash):
            raise ValueError(f"not an sstate hash: {new_hash!r}")
        return _make(self.dirpath, self.layout, self.stem, new_hash, self.task, self.ext, self.companion)

    def companion_of(self, companion: str) -> SstateName:
        """The same name with another companion suffix ("" gives the object itself)."""
        if companion not in COMPANIONS:
            raise ValueError(f"unknown companion {companion!r} (expected one of {COMPANIONS!r})")
        return _make(self.dirpath, self.layout, self.stem, self.hash, self.task, self.ext, companion)

    def __str__(self) -> str:
        return self.key


# parse() builds an SstateName per request; the generated frozen __init__ (object.__setattr__
# per field) costs several times more than setting the slots directly.
_new_object = object.__new__
(_set_dirpath, _set_layout, _set_stem, _set_hash, _set_task, _set_ext, _set_companion) = (
    getattr(SstateName, f).__set__ for f in ("dirpath", "layout", "stem", "hash", "task", "ext", "companion")
)


def _make(dirpath: str, layout: str, stem: str, h: str, task: str, ext: str, comp: str) -> SstateName:
    """SstateName(dirpath, layout, stem, h, task, ext, comp), faster."""
    n = _new_object(SstateName)
    _set_dirpath(n, dirpath)
    _set_layout(n, layout)
    _set_stem(n, stem)
    _set_hash(n, h)
    _set_task(n, task)
    _set_ext(n, ext)
    _set_companion(n, comp)
    return n


def parse(key: str) -> SstateName | None:
    """Parse a key from safe_key(); None if it is not an sstate object/companion name."""
    i = key.rfind("/")
    sep = key[i + 7 : i + 8]
    if sep == ":":
        if key[i + 1 : i + 7] != "sstate":
            return None
    elif sep != "-" or key[i + 1 : i + 7] != "sstate":
        return None
    j = key.rfind(sep)
    if j <= i + 7:  # the stem needs a separator after "sstate:" / "sstate-"
        return None
    m = _TAIL.fullmatch(key, j + 1)
    if m is None:
        return None
    stem = key[i + 1 : j + 1]
    h, task, ext, comp = m.group("hash", "task", "ext", "comp")
    comp = comp or ""
    if i < 0:
        # Only <= 1.2 (dash names) stored objects without directories.
        if stem[6] != "-":
            return None
        return _make("", "flat", stem, h, task, ext, comp)
    dirs = key[:i]  # without the trailing '/'
    h01 = h[:2]
    if len(dirs) >= 5 and dirs[-3] == "/" and dirs[-2:] == h[2:4] and dirs[-5:-3] == h01:
        if len(dirs) == 5:
            return _make("", "hhhh", stem, h, task, ext, comp)
        if dirs[-6] == "/":
            return _with_extrapath(dirs[:-5], "hhhh", stem, h, task, ext, comp)
    if dirs[-2:] == h01:
        if len(dirs) == 2:
            return _make("", "hh", stem, h, task, ext, comp)
        if dirs[-3] == "/":
            return _with_extrapath(dirs[:-2], "hh", stem, h, task, ext, comp)
    return None


_HEX2 = frozenset(f"{i:02x}" for i in range(256))


def _with_extrapath(dirpath: str, layout: str, stem: str, h: str, task: str, ext: str,
                    comp: str) -> SstateName | None:
    # An EXTRAPATH ending in a hash-like dir ("a8/d7/<name of hash d7a8..>") means hash dirs
    # that do not match (swapped, stale, one level too many): not an sstate name.
    last = dirpath[-3:-1] if len(dirpath) == 3 or dirpath[-4:-3] == "/" else ""
    if last in _HEX2:
        return None
    return _make(dirpath, layout, stem, h, task, ext, comp)
