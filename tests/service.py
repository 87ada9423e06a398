"""Start and stop the real service (`python -m proxy.cli serve`) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status_line(sock: socket.socket) -> bytes:
    """Bytes received up to (at least) the end of the response's status line; b"" if closed."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def write_config(path: Path, sections: dict) -> Path:
    """Tiny TOML writer for test configs (strings, numbers, bools, lists of strings)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Service:
    """One `sstate-proxy serve` process with its own storage dir and database."""

    def __init__(self, workdir: Path, *, config: dict | None = None, env: dict | None = None,
                 args: list[str] | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.storage = self.workdir / "sstate-cache"
        self.database = self.workdir / "sstate-proxy.db"
        sections = {
            "server": {"bind": f"127.0.0.1:{self.port}", "log_level": "WARNING"},
            "storage": {"backend": "local", "path": str(self.storage)},
            "database": {"url": f"sqlite:///{self.database}"},
        }
        for name, table in (config or {}).items():
            sections.setdefault(name, {}).update(table)
        self.scheme = "https" if sections["server"].get("tls_cert") else "http"
        self.config_path = write_config(self.workdir / "config.toml", sections)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONPATH", str(REPO))
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "service.log"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of the service's /metrics: name -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {name: float(value) for name, _, value in (line.partition(" ") for line in lines)
                if name and not name.startswith("#") and "{" not in name}

    def start(self, timeout: float = 20.0) -> Service:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path), *self.args],
            cwd=self.workdir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        context = None
        if self.scheme == "https":  # a test's self-signed certificate
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=context) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"service did not start:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
