"""Content identity of an sstate archive (``.tar.zst`` / ``.tgz``): what it restores, not its bytes.

Two builders that produce the same files write archives that differ only in tar mtimes (and
compression framing). The identity is a sha256 over the *sorted* member records

    name, type, mode, uid/gid, uname/gname, link target, device numbers, size,
    sha256 of the content, extended attributes (pax headers other than times)

and deliberately **not** mtimes/atimes/ctimes. Equal identity => extracting either archive gives
identical files, so the mirror may store one copy and serve it for both names (dedup).

This is NOT bitbake's OEOuthashBasic and must never become a hash-equivalence mapping
(it lacks what bitbake's outhash adds, such as HASHEQUIV_EXTRA_SIGDATA). It is
kept under its own method name, :data:`METHOD`, in its own table, and only ever used for dedup.

Pure and synchronous (no I/O besides reading the file object it is given); streaming: zstd via
``zstandard.ZstdDecompressor().stream_reader`` (multi-frame, pzstd's skippable frame is skipped),
gzip via ``gzip.GzipFile``, tar via ``tarfile`` mode ``'r|'``. Callers run it in an executor.
Work is capped (members, uncompressed bytes): past a cap the archive has no identity (None) and
is simply stored as is.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import zlib
from typing import BinaryIO

METHOD = "sstate-proxy.archive-identity/1"
FORMATS = {".tar.zst": "zst", ".tgz": "gz"}
MAX_MEMBERS = 500_000
MAX_BYTES = 32 * 1024**3  # uncompressed member bytes hashed at most
READ_BLOCK = 1024 * 1024
_TIME_PAX = frozenset({"mtime", "atime", "ctime"})
# pax keys already represented by the record's own fields (or irrelevant to restored content)
_FIELD_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname"})


class Uncomputable(Exception):
    """Not a readable archive of this format, or over the work caps."""


def archive_format(key: str) -> str | None:
    """'zst' / 'gz' for an sstate *object* key (not a companion), else None."""
    for ext, fmt in FORMATS.items():
        if key.endswith(ext):
            return fmt
    return None


def _norm_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


def _record(tf: tarfile.TarFile, m: tarfile.TarInfo, budget: list[int]) -> list:
    digest = ""
    if m.isreg():
        budget[0] -= m.size
        if budget[0] < 0:
            raise Uncomputable("archive content exceeds the identity work cap")
        f = tf.extractfile(m)
        h = hashlib.sha256()
        if f is not None:
            while True:
                block = f.read(READ_BLOCK)
                if not block:
                    break
                h.update(block)
        digest = h.hexdigest()
    xattrs = sorted((k, v) for k, v in m.pax_headers.items() if k not in _TIME_PAX and k not in _FIELD_PAX)
    link = _norm_name(m.linkname) if m.islnk() else m.linkname
    return [
        _norm_name(m.name), m.type.decode("latin-1"), m.mode, m.uid, m.gid, m.uname, m.gname, link,
        m.devmajor if m.ischr() or m.isblk() else 0, m.devminor if m.ischr() or m.isblk() else 0,
        m.size if m.isreg() else 0, digest, xattrs,
    ]


def identity_of_tar(stream: BinaryIO, fmt: str, *, max_members: int = MAX_MEMBERS,
                    max_bytes: int = MAX_BYTES) -> str:
    """Identity of the tar carried by ``stream`` (already decompressed); raises Uncomputable."""
    records = []
    budget = [max_bytes]
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                if len(records) >= max_members:
                    raise Uncomputable("too many archive members")
                records.append(_record(tf, m, budget))
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise Uncomputable(f"not a readable {fmt} tar archive: {e}") from e
    records.sort(key=lambda r: (r[0], json.dumps(r)))
    h = hashlib.sha256()
    h.update(f"{METHOD}\nformat={fmt}\n".encode())
    for r in records:
        h.update(json.dumps(r, separators=(",", ":"), ensure_ascii=True).encode())
        h.update(b"\n")
    return f"{fmt}-sha256:{h.hexdigest()}"


def identity_of_fileobj(fileobj: BinaryIO, fmt: str, **caps: int) -> str:
    """Identity of a compressed archive read from ``fileobj``; raises Uncomputable."""
    if fmt == "zst":
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - a runtime dependency
            raise Uncomputable("zstandard is not installed") from e
        reader = zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True,
                                                             read_size=READ_BLOCK)
        try:
            return identity_of_tar(reader, fmt, **caps)
        except zstandard.ZstdError as e:
            raise Uncomputable(f"bad zstd data: {e}") from e
        finally:
            reader.close()
    if fmt == "gz":
        with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz:
            return identity_of_tar(gz, fmt, **caps)  # type: ignore[arg-type]
    raise Uncomputable(f"unknown archive format {fmt!r}")


def identity_of_file(path: str, fmt: str, **caps: int) -> str | None:
    """Identity of the archive at ``path``, or None when it has none (not a tar, over caps)."""
    try:
        with open(path, "rb") as f:
            return identity_of_fileobj(f, fmt, **caps)
    except Uncomputable:
        return None
