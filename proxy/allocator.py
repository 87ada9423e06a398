"""glibc malloc settings for a server that reads many small requests.

Why: asyncio reads a socket with ``sock.recv(256 KiB)`` (``max_size`` of its selector
transports): Python allocates a 256 KiB bytes object, the kernel fills a few hundred bytes, and
Python shrinks the object to fit. 256 KiB is above glibc's default mmap threshold (128 KiB), so
each read costs ``mmap``, ``mremap`` and ``munmap``: three system calls and a page fault per
request. glibc's dynamic threshold never adapts, because the chunk it frees has been shrunk
first. Every aiohttp request and websocket message pays it (strace: 3 of 6 system calls per
websocket ping); the hashserv tcp/unix face avoids it with one read buffer of its own
(``hashserv/framing.py``).

Raising the mmap threshold to 1 MiB keeps those buffers on the heap, and raising the trim
threshold keeps glibc from handing the freed top of the heap back to the kernel after every
read (``brk`` twice per request). Cost: up to ``TRIM`` bytes of free heap stay mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP = 1 << 20  # allocations below 1 MiB come from the heap (asyncio's reads are 256 KiB)
TRIM = 8 << 20  # keep up to 8 MiB of free heap instead of returning it after every read


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and others have no such symbol, and their malloc has other knobs
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_read_buffers_on_the_heap() -> bool:
    """Sets the thresholds (see the module notes); False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM))
