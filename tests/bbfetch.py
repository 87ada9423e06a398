"""Drive bitbake's real fetcher (bb.fetch2 from the bitbake-setup package) the way OE-core's
sstate class does against an SSTATE_MIRRORS entry:

* existence: ``sstate_checkhashes`` -> ``Fetch(["file://" + relpath], connection_cache=cc).checkstatus()``
  from a thread pool (HEAD requests on kept-alive connections);
* download: ``pstaging_fetch`` -> ``Fetch(["file://P;downloadfilename=P"], cache=False)``,
  ``checkstatus()`` then ``download()`` (HEAD, then a wget GET into SSTATE_DIR/P).

No bitbake code is copied here: this only configures a datastore and calls the library.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import shutil
import tempfile
from pathlib import Path

import bb  # noqa: F401 - from bitbake-setup
import bb.data
import bb.fetch2

logging.getLogger("BitBake").setLevel(logging.CRITICAL)


class BitbakeMirrorClient:
    def __init__(self, mirror_url: str, workdir: Path | None = None, netrc_home: Path | None = None):
        self.mirror_url = mirror_url.rstrip("/")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bbfetch-"))
        self.sstate_dir = self.workdir / "sstate-cache"
        self.sstate_dir.mkdir(parents=True, exist_ok=True)
        self.netrc_home = netrc_home

    def _datastore(self):
        d = bb.data.init()
        d.setVar("DL_DIR", str(self.sstate_dir))
        d.setVar("FILESPATH", str(self.sstate_dir))
        d.setVar("PERSISTENT_DIR", str(self.workdir / "persist"))
        d.setVar("PREMIRRORS", f"file://.* {self.mirror_url}/PATH;downloadfilename=PATH")
        d.setVar("MIRRORS", "")
        d.setVar("BB_NO_NETWORK", "0")
        if self.netrc_home is not None:
            d.setVar("HOME", str(self.netrc_home))
            d.setVar("FETCH_EXPORT_VARS", "HOME")
        return d

    def check(self, paths: list[str], threads: int = 8) -> dict[str, bool]:
        """HEAD-check every path like sstate_checkhashes; {path: found}."""
        d = self._datastore()
        caches: queue.Queue = queue.Queue()
        for _ in range(threads):
            caches.put(bb.fetch2.FetchConnectionCache())

        def one(path: str) -> tuple[str, bool]:
            cc = caches.get()
            try:
                bb.fetch2.Fetch(["file://" + path], d, connection_cache=cc).checkstatus()
                return path, True
            except bb.fetch2.FetchError:
                return path, False
            finally:
                caches.put(cc)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            result = dict(pool.map(one, paths))
        while not caches.empty():
            caches.get().close_connections()
        return result

    def download(self, path: str) -> bytes | None:
        """HEAD + wget GET like pstaging_fetch; the bytes, or None if bitbake found nothing."""
        local = self.sstate_dir / path
        if local.exists():
            local.unlink()
        d = self._datastore()
        try:
            fetcher = bb.fetch2.Fetch([f"file://{path};downloadfilename={path}"], d, cache=False)
            fetcher.checkstatus()
            fetcher.download()
        except bb.fetch2.BBFetchException:
            return None
        if not local.exists():
            return None
        return local.read_bytes()

    def partial(self, path: str, data: bytes) -> None:
        """Leave a partial download behind, as an interrupted wget does (P.tmp)."""
        tmp = self.sstate_dir / (path + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def wget_available() -> bool:
    return shutil.which("wget") is not None and os.access(shutil.which("wget"), os.X_OK)
