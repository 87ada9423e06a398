"""Archive identities computed in child processes, off the serving process's GIL.

``storage.archive_identity`` decompresses and walks a tar; zstd and sha256 release the GIL but
tarfile's header parsing and the record building are pure Python. Run in a thread of a serving
worker they held its GIL in slices, and every HEAD on the event loop waited behind them. Here a
small ``ProcessPoolExecutor`` (``spawn`` context: no copy of the worker's sockets, threads or
event loop) does the work; the worker only waits on a future.

- Started at the first identity asked for (a read-only mirror never starts one), at most
  ``max_workers`` children, shut down by :meth:`IdentityPool.close`.
- A child that dies (OOM killer, a crash in the decompressor) breaks the executor: the identity
  asked for is None (that archive stays stored as written: dedup is an optimisation) and the
  next one starts a fresh pool.
- A child exits as soon as its parent is gone, SIGKILL included: it watches
  ``multiprocessing.parent_process().sentinel``, so a killed worker leaves no orphans behind
  (the supervisor's lifeline covers the workers; this covers their children).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from storage.archive_identity import identity_of_file

log = logging.getLogger("sstate_proxy.dedup")


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready only when the parent is gone
    os._exit(1)


def _child_init() -> None:
    """Runs first in every pool child."""
    # A terminal's Ctrl-C reaches the whole process group: stopping is the service's business
    # (it shuts the pool down), not a KeyboardInterrupt in the middle of a child's queue read.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="parent-watch",
                         daemon=True).start()


class IdentityPool:
    """``await pool.identity(path, fmt)``: the archive identity of a file, computed in a child
    process; None when the archive has none or the child died (see the module docstring)."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def _running(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.max_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init)
        return self._executor

    async def identity(self, path: str, fmt: str) -> str | None:
        if self._closed:  # the store is closing: no new children
            return None
        executor = self._running()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, identity_of_file, path, fmt)
        except BrokenProcessPool as e:
            log.warning("archive identity of %s: a pool process died (%s); archive stored as written, "
                        "the pool starts again", path, e)
            if self._executor is executor:  # not replaced yet by another caller that saw it broken
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            return None

    def close(self) -> None:
        """Stop the children: queued work is dropped, a running identity ends with its archive
        (the children then exit; if this process exits first, they follow it)."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
