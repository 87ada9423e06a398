"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temp dir.

One cluster per test session (``pg_cluster``), a fresh database per test (``pg_url``). The
cluster listens on a free loopback TCP port (and a unix socket inside its temp dir) with trust
authentication, so it is for local test use only; it is stopped with ``pg_ctl stop -m
immediate`` at the end. Run as root (CI containers), the server runs as the ``postgres`` user
through ``runuser`` (initdb refuses root) and the temp dir belongs to it.

The binaries come from ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``
(Debian's ``postgresql`` package), else ``PATH``. With ``CI=true`` a missing PostgreSQL fails
the tests that need it (``.ci/run`` installs it); elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.service import free_port

_counter = itertools.count()


def find_bindir() -> Path | None:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))

    def version(p: str) -> tuple[int, ...]:
        v = Path(p).parent.name
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file() and (d / "postgres").is_file():
            return d
    return None


def unavailable(reason: str):
    """Fail in CI (PostgreSQL must be there), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class PgCluster:
    """One PostgreSQL server in a temp dir, on 127.0.0.1:<port>, trust auth, superuser ``postgres``."""

    def __init__(self, bindir: Path, password: str | None = None, options: str = "") -> None:
        """``password``: TCP connections must authenticate with it (scram-sha-256) instead of trust.
        ``options``: more server options (``-c name=value ...``), after the defaults: the last one
        of a name wins (bench/hashserv_bench.py runs with PostgreSQL's durability defaults)."""
        self.bindir = bindir
        self.password = password
        self.options = options
        self.root = Path(tempfile.mkdtemp(prefix="sstate-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.sockdir.mkdir()
        self.log = self.root / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            for p in (self.root, self.sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o755)
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(password + "\n")
            if self.as_root:
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.data), *auth, "-U", self.user, "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self.start()

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_root else cmd

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, cwd=self.root)
        if check and out.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stdout}{out.stderr}\n{log[-3000:]}")
        return out

    def start(self) -> None:
        opts = (f"-c listen_addresses={self.host} -p {self.port} -k {self.sockdir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 " + self.options)
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode, check=False)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        env = {**os.environ}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        out = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host,
             "-p", str(self.port), "-U", self.user, "-d", dbname, "-c", sql],
            capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(password: str | None = None) -> PgCluster:
    bindir = find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres): install Debian's "
                    "`postgresql` package")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run the server as")
    if shutil.which("runuser") is None and os.geteuid() == 0:
        unavailable("running as root without `runuser`")
    return PgCluster(bindir, password)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty database on the session's cluster."""
    return pg_cluster.create_database()
