"""glibc malloc thresholds (proxy/allocator.py): with them, a socket read of asyncio's 256 KiB
no longer maps and unmaps memory per request."""

from __future__ import annotations

import subprocess
import sys

import pytest

from proxy import allocator
from tests.service import REPO

PROBE = r"""
import ctypes, ctypes.util, socket, sys
sys.path.insert(0, sys.argv[1])
from proxy import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[2] == "tuned":
    assert allocator.keep_read_buffers_on_the_heap()
a, b = socket.socketpair()
b.send(b"x" * 300)
before = libc.mallinfo2().hblks
data = a.recv(256 * 1024)  # what asyncio's transports do for every read
held = bytearray(256 * 1024)  # a buffer still alive while we look
print(libc.mallinfo2().hblks - before, len(data))
"""


def mmapped_chunks(mode: str) -> int:
    p = subprocess.run([sys.executable, "-c", PROBE, str(REPO), mode], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    hblks, n = map(int, p.stdout.split())
    assert n == 300
    return hblks


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc")
def test_read_buffers_stay_on_the_heap():
    assert mmapped_chunks("default") == 2  # glibc maps each 256 KiB buffer by default
    assert mmapped_chunks("tuned") == 0
