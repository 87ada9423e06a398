"""Task-data privacy on every face of the real service: ``owner``, ``PN``, ``PV``, ``PR``, ``task``
and ``outhash_siginfo`` are shown only to a logged-in user holding ``@task-data`` (or ``@all``),
and to the user who reported the row; never to anonymous clients. Unihash answers stay public.

Identities: anonymous, a ``@read`` user, a ``@read @task-data`` user, an ``@all`` user (the admin)
and the reporter itself (``@read @report``)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
from base64 import b64encode
from urllib.parse import quote

import bb.asyncrpc
import pytest

from proxy.config import ConfigError, load
from tests.hashserv_client import connect
from tests.service import REPO, free_port, write_config

M = "TestMethod"
ADMIN = ("admin", "admin-token-for-privacy-tests")
TASK_DATA = {"PN": "secret-recipe", "PV": "1.0", "PR": "r7", "task": "do_compile",
             "outhash_siginfo": "siginfo of a private build"}
COLUMNS = ("owner", *TASK_DATA)


def h(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def cli(svc, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--config", str(svc.config_path)],
                         cwd=svc.workdir, env=svc.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def http_json(svc, method: str, path: str, body: dict | None = None,
              user: tuple[str, str] | None = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if resp.status == 200 else data)
    finally:
        conn.close()


@pytest.fixture
async def svc(service_factory, tmp_path):
    """The service with tcp and ws hashserv, and its users (made with bitbake's new-user)."""
    tcp = free_port()
    s = service_factory("privacy", env={"SSTATE_PROXY_ADMIN_USER": ADMIN[0], "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]},
                        args=["--hashserv-bind", f"127.0.0.1:{tcp}"])
    s.start()
    s.addresses = {"tcp": f"127.0.0.1:{tcp}", "ws": f"ws://127.0.0.1:{s.port}/ws"}
    s.users = {"admin": ADMIN}
    admin = await connect(s.addresses["tcp"], *ADMIN)
    try:
        for name, perms in (("reader", ["@read"]), ("taskreader", ["@read", "@task-data"]),
                            ("builder", ["@read", "@report"])):
            s.users[name] = (name, (await admin.new_user(name, perms))["token"])
    finally:
        await admin.close()
    return s


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_oehashequiv_shows_task_data_only_to_holders_and_owner(svc, transport):
    addr = svc.addresses[transport]
    t, o, u = h("t", transport), h("o", transport), h("u", transport)
    builder = await connect(addr, *svc.users["builder"])
    anon = await connect(addr)
    clients = {name: await connect(addr, *svc.users[name]) for name in ("reader", "taskreader", "admin")}
    try:
        reply = await builder.report_unihash(t, M, o, u, TASK_DATA)
        assert reply == {"taskhash": t, "method": M, "unihash": u}  # a report's answer is public data only
        expected = {"owner": "builder", **TASK_DATA}
        for name, c, sees in (("anonymous", anon, False), ("reader", clients["reader"], False),
                              ("taskreader", clients["taskreader"], True), ("admin", clients["admin"], True),
                              ("builder (the owner)", builder, True)):
            full = await c.get_taskhash(M, t, True)
            by_outhash = await c.get_outhash(M, o, t)
            bare = await c.get_outhash(M, o, t, False)
            for row in (full, by_outhash, bare):
                # the public columns are there for everyone, in bitbake's shape
                assert row["taskhash"] == t and row["outhash"] == o and row["method"] == M, name
                got = {k: row[k] for k in COLUMNS}
                assert got == (expected if sees else dict.fromkeys(COLUMNS)), name
            assert full["unihash"] == u and by_outhash["unihash"] == u
            # unihash answers stay public
            assert await c.get_taskhash(M, t) == {"taskhash": t, "method": M, "unihash": u}
            assert await c.get_unihash(M, t) == u
            assert await c.unihash_exists(u)
    finally:
        for c in (builder, anon, *clients.values()):
            await c.close()


async def test_remove_by_task_data_needs_the_permission(svc):
    addr = svc.addresses["tcp"]
    admin = await connect(addr, *ADMIN)
    try:
        janitor = await connect(addr, "janitor", (await admin.new_user("janitor", ["@read", "@db-admin"]))["token"])
        t, o, u = h("rm", "t"), h("rm", "o"), h("rm", "u")
        await admin.report_unihash(t, M, o, u, TASK_DATA)
        # a count of rows removed by PN would tell which recipes were built
        with pytest.raises(bb.asyncrpc.InvokeError, match="janitor needs @task-data to select rows by PN"):
            await janitor.remove({"PN": "secret-recipe"})
        assert await admin.get_unihash(M, t) == u  # nothing was removed
        assert (await janitor.remove({"taskhash": t}))["count"] > 0  # public columns are fine
        await admin.report_unihash(h("rm2", "t"), M, h("rm2", "o"), h("rm2", "u"), TASK_DATA)
        assert (await admin.remove({"PN": "secret-recipe"}))["count"] == 1
        await janitor.close()
    finally:
        await admin.close()


async def test_bitbake_set_user_perms_and_cli_grant_task_data(svc):
    addr = svc.addresses["ws"]
    admin = await connect(addr, *ADMIN)
    reader = await connect(addr, *svc.users["reader"])
    try:
        t, o, u = h("g", "t"), h("g", "o"), h("g", "u")
        await admin.report_unihash(t, M, o, u, TASK_DATA)
        assert (await reader.get_taskhash(M, t, True))["PN"] is None
        # granted through bitbake's set-user-perms (shown as stored, not expanded)
        r = await admin.set_user_perms("reader", ["@read", "@task-data"])
        assert r["permissions"] == ["@read", "@task-data"]
        reader2 = await connect(addr, *svc.users["reader"])  # a fresh login reads the new permissions
        assert (await reader2.get_taskhash(M, t, True))["PN"] == "secret-recipe"
        await reader2.close()
        # and granted with the CLI too (to a user who has not got it: checked in the users table,
        # as the service's login cache only notices within its TTL)
        janitor = (await admin.new_user("janitor", ["@read"]))["token"]
        cli(svc, "user", "perms", "janitor", "@read,@task-data")
        assert "janitor\t@read @task-data" in cli(svc, "user", "list").splitlines()
        j = await connect(addr, "janitor", janitor)  # a first login: no cached permissions
        assert (await j.get_taskhash(M, t, True))["PN"] == "secret-recipe"
        await j.close()
        # @all shows bitbake's list; @task-data is implied, not listed (bitbake's clients expect it)
        assert (await admin.get_user("admin"))["permissions"] == ["@all", "@db-admin", "@read", "@report",
                                                                  "@user-admin"]
    finally:
        await admin.close()
        await reader.close()


async def test_v1_equivalent_never_answers_task_data(svc):
    t, o, u = h("v1", "t"), h("v1", "o"), h("v1", "u")
    status, body = http_json(svc, "POST", "/v1/equivalent",
                             {"taskhash": t, "method": M, "outhash": o, "unihash": u, **TASK_DATA},
                             user=svc.users["builder"])
    assert status == 200 and body == {"taskhash": t, "method": M, "unihash": u, "depid": u}
    for who in (None, svc.users["reader"], svc.users["taskreader"], ADMIN, svc.users["builder"]):
        status, body = http_json(svc, "GET", f"/v1/equivalent?method={quote(M)}&taskhash={t}", user=who)
        assert status == 200 and body == {"taskhash": t, "method": M, "unihash": u, "depid": u}, who
    # what was stored with the report is there for those who may see it
    admin = await connect(svc.addresses["tcp"], *ADMIN)
    try:
        row = await admin.get_taskhash(M, t, True)
        assert row["owner"] == "builder" and row["PN"] == "secret-recipe"
    finally:
        await admin.close()


def test_task_data_is_refused_in_anon_perms(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"hashserv": {"anon_perms": ["@read", "@task-data"]}})
    with pytest.raises(ConfigError, match="hashserv.anon_perms: @task-data is never granted to anonymous"):
        load(cfg)
    # the flag too: exit status 2 and one line naming the key, before anything starts
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--storage", str(tmp_path / "s"),
                          "--database", f"sqlite:///{tmp_path / 'db'}", "--bind", f"127.0.0.1:{free_port()}",
                          "--anon-perms", "@read,@task-data"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "@task-data is never granted to anonymous users" in out.stderr
