"""A real moto S3 server over HTTP, in a subprocess, for tests and benchmarks.

    server = MotoServer()          # picks a free port
    server.start()                 # python -m moto.server, waits until it answers
    server.create_bucket("b")
    server.stop(); server.start()  # an outage: same port, but moto forgets everything
    server.pause(); server.resume()  # a hung server (SIGSTOP/SIGCONT): connections hang
    server.close()

``use_test_credentials()`` puts dummy AWS credentials and region into the environment (and
points the AWS config files at /dev/null, disables the EC2 metadata lookup), so boto3's standard
chain finds them. Plain functions and a class, no pytest fixtures: the test modules build theirs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import MutableMapping
from typing import Any

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def use_test_credentials(environ: MutableMapping[str, str] | None = None) -> dict[str, str | None]:
    """Set TEST_ENV in ``environ`` (os.environ); returns the previous values for restore_env."""
    environ = os.environ if environ is None else environ
    old = {k: environ.get(k) for k in TEST_ENV}
    environ.update(TEST_ENV)
    return old


def restore_env(old: dict[str, str | None], environ: MutableMapping[str, str] | None = None) -> None:
    environ = os.environ if environ is None else environ
    for k, v in old.items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        self.buckets: list[str] = []
        self._client: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart after stop()) on the same port; re-creates the known buckets."""
        if self.proc is not None and self.proc.poll() is None:
            return
        env = dict(os.environ, **TEST_ENV)
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            )
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    for b in self.buckets:
                        self._create(b)
                    return
                time.sleep(0.05)
            if self.proc.poll() is None or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"moto server did not come up on {self.endpoint_url} (log: {self.log.name})")
            time.sleep(0.2)  # port still held (TIME_WAIT / old process): try again

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1) as r:
                r.read()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server: connections are refused until start(). Its data is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel but never answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)

    def client(self) -> Any:
        """A plain boto3 client for the test's own checks (cached)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        return self._client

    def create_bucket(self, name: str) -> None:
        self._create(name)
        if name not in self.buckets:
            self.buckets.append(name)

    def _create(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

