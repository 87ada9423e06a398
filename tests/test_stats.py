"""`sstate-proxy stats --url URL` against the real service (GET /v1/stats) gives the numbers the
offline `stats` reads from the database; the endpoint needs @read."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
from dataclasses import dataclass

import pytest

from tests.corpus import make_corpus, pkgspec
from tests.service import free_port
from tests.test_push import CLEAN_ENV, push  # noqa: F401 - the fixture
from tests.test_upload import add_user, make_archive


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def stats(monkeypatch, capsys, tmp_path):
    """Run `sstate-proxy stats ARGS` (the CLI's main, in this process) with ``env`` only."""
    from proxy import cli

    def run(*args: str, env: dict | None = None) -> Ran:
        with monkeypatch.context() as m:
            for name in CLEAN_ENV:
                m.delenv(name, raising=False)
            m.setenv("HOME", str(tmp_path))
            for name, value in (env or {}).items():
                m.setenv(name, value)
            capsys.readouterr()
            code = cli.main(["stats", *args])
            out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def test_stats_url_matches_the_offline_numbers(service_factory, push, stats, tmp_path):  # noqa: F811
    svc = service_factory(args=["--anon-perms", ""])  # anonymous may do nothing
    token = add_user(svc, "ops", "@read,@upload,@report")
    creds = {"SSTATE_PROXY_USER": "ops", "SSTATE_PROXY_TOKEN": token}
    svc.start()

    # Traffic that moves every number: objects (two equal archives: dedup), reports.
    corpus = make_corpus(tmp_path / "sstate", n=20, seed=4, equiv_fraction=0.5, big_objects=0)
    files = {"sysroot-destdir/usr/lib/libfoo.so.1": os.urandom(30000)}
    spec = pkgspec("libfoo", "core2-64-poky-linux", "1.0", "r0", "core2-64")
    for i, h in enumerate(("a1" * 32, "b2" * 32)):
        key = f"{h[:2]}/{h[2:4]}/{spec}{h}_populate_sysroot.tar.zst"
        (corpus.root / key).parent.mkdir(parents=True, exist_ok=True)
        (corpus.root / key).write_bytes(make_archive(files, mtime=1_700_000_000 + i))
    code, _s, out, err = push(corpus.root, svc.url, "--no-progress", env=creds)
    assert code == 0, out + err
    for d in corpus.details:
        for taskhash in (d.unihash, d.taskhash):
            body = {"taskhash": taskhash, "method": d.method, "outhash": d.outhash, "depid": taskhash,
                    "owner": "ci"}
            assert _call(svc.port, "POST", "/v1/equivalent", creds, json.dumps(body).encode())[0] == 200

    remote = stats("--url", svc.url, env=creds)
    assert remote.returncode == 0, remote.stderr
    offline = stats("--config", str(svc.config_path))
    assert offline.returncode == 0, offline.stderr
    assert remote.stdout == offline.stdout
    numbers = json.loads(remote.stdout)
    taskhashes = {d.unihash for d in corpus.details} | {d.taskhash for d in corpus.details}
    assert numbers["database"]["unihashes_v3"]["rows"] == len(taskhashes) > 0
    assert numbers["database"]["users"]["rows"] == 1
    assert numbers["dedup"]["objects"] == 2 and numbers["dedup"]["unique"] == 1
    assert numbers["dedup"]["bytes_saved"] > 0

    # Concurrent requests share one computation and all get the whole answer.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _call(svc.port, "GET", "/v1/stats", creds), range(16)))
    assert all(status == 200 and json.loads(body) == numbers for status, body in answers)

    # @read is needed
    denied = stats("--url", svc.url)
    assert denied.returncode == 1 and "401" in denied.stderr and "anonymous" in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1
    wrong = stats("--url", svc.url, env={**creds, "SSTATE_PROXY_TOKEN": "nope"})
    assert wrong.returncode == 1 and "401" in wrong.stderr and "'ops'" in wrong.stderr
    nobody = stats("--url", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 1 and "cannot connect" in nobody.stderr


def _call(port: int, method: str, path: str, creds: dict, body: bytes | None = None) -> tuple[int, bytes]:
    auth = base64.b64encode(f"{creds['SSTATE_PROXY_USER']}:{creds['SSTATE_PROXY_TOKEN']}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Authorization": "Basic " + auth})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()
