"""Debian's nginx in front of the replicas, with the repo's own deploy/nginx.conf.

    proxy = Nginx(["127.0.0.1:8001", "127.0.0.1:8002"])
    proxy.start()      # foreground child (daemon off), pid/logs/temp files in its own temp dir
    proxy.url          # http://127.0.0.1:<free port>
    proxy.stop()

The template's ${...} variables are filled in here as envsubst fills them in compose; a
variable left unfilled is an error (the template and this file must agree).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.service import REPO, free_port

TEMPLATE = REPO / "deploy" / "nginx.conf"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require(tool: str, found: object, install: str) -> None:
    """Fail in CI (``CI=true``: .ci/run installs it), skip elsewhere, when ``found`` is falsy."""
    if found:
        return
    reason = f"{tool} is not installed (Debian package `{install}`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the deployment test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"deployment test skipped: {reason}")


def render(template: str, values: dict[str, str]) -> str:
    """envsubst restricted to ``values``' names; every variable of the template must be given."""
    missing = sorted({m for m in _VARIABLE.findall(template) if m not in values})
    if missing:
        raise KeyError(f"deploy/nginx.conf needs {', '.join(missing)}")
    return _VARIABLE.sub(lambda m: values[m.group(1)], template)


class Nginx:
    def __init__(self, replicas: list[str], port: int | None = None) -> None:
        if len(replicas) != 2:
            raise ValueError("deploy/nginx.conf names two replicas")
        self.binary = find_nginx()
        self.port = port or free_port()
        # Its own dir under /tmp, readable by nginx's unprivileged workers (pytest's tmp_path is
        # 0700 root when the tests run as root).
        self.dir = Path(tempfile.mkdtemp(prefix="sstate-nginx-"))
        self.dir.chmod(0o755)
        self.error_log = self.dir / "error.log"
        self.access_log = self.dir / "access.log"
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(render(TEMPLATE.read_text(), {
            "NGINX_LISTEN": f"127.0.0.1:{self.port}",
            "NGINX_RUN_DIR": str(self.dir),
            "NGINX_ERROR_LOG": str(self.error_log),
            "NGINX_ACCESS_LOG": str(self.access_log),
            "SSTATE_PROXY_REPLICA_1": replicas[0],
            "SSTATE_PROXY_REPLICA_2": replicas[1],
        }))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Nginx:
        assert self.binary
        self.out = open(self.dir / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.error_log),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{self.read_log()}")

    def read_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.error_log, self.dir / "stdout.log")
                       if p.exists())

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.out.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
