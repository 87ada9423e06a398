"""`sstate-proxy push DIR --url URL` against the real service over HTTP: every layout published and
served back as hits, names the rewrite answers for are still sent, reruns send nothing, a killed
push resumes, --dry-run sends nothing, credentials from the environment and ~/.netrc, and bad
credentials, permissions, URLs fail early with one line."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from proxy.credentials import CredentialsError, check_url, find_credentials
from tests.corpus import make_corpus
from tests.service import Service, free_port
from tests.test_import import add_litter, legacy_dirs
from tests.test_mirror import quote
from tests.test_rewrite import report
from tests.test_upload import add_user

SUMMARY = re.compile(r"(?:sent|would send) (\d+) \((\d+) bytes\), skipped (\d+) \(already on the service\), "
                     r"(?:failed (\d+), )?refused (\d+), ignored (\d+) temp/lock files")
ACCESS = re.compile(r" access \S+ (\S+) (PUT|HEAD|GET) (\S+) (\d+) ")
CLEAN_ENV = ("SSTATE_PROXY_USER", "SSTATE_PROXY_TOKEN", "NETRC")


@pytest.fixture
def push(monkeypatch, capsys, tmp_path):
    """Run `sstate-proxy push` (the CLI's main, in this process: a real client against the real
    service, without a second interpreter start per run); returns a callable giving
    (exit status, summary numbers, stdout, stderr)."""
    from proxy import cli

    def run(src: Path, url: str, *extra: str, env: dict | None = None,
            home: Path | None = None) -> tuple[int, dict, str, str]:
        with monkeypatch.context() as m:
            for name in CLEAN_ENV:
                m.delenv(name, raising=False)
            m.setenv("HOME", str(home or tmp_path / "empty-home"))
            for name, value in (env or {}).items():
                m.setenv(name, value)
            capsys.readouterr()
            code = cli.main(["push", str(src), "--url", url, *extra])
            out, err = capsys.readouterr()
        m = SUMMARY.search(out)
        numbers = {}
        if m:
            keys = ("sent", "bytes", "skipped", "failed", "refused", "ignored")
            numbers = {k: int(v) for k, v in zip(keys, m.groups(), strict=True) if v is not None}
        return code, numbers, out, err

    return run


def access_lines(svc: Service) -> list[tuple[str, str, str, int]]:
    """(user, method, path, status) of every object request the service logged so far: a marker
    request is sent and waited for, so every earlier line has been written (one process)."""
    marker = f"/healthz?marker={uuid.uuid4().hex}"
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("GET", marker)
    conn.getresponse().read()
    conn.close()
    deadline = time.monotonic() + 10
    while marker not in (text := svc.read_log()):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.02)
    return [(m[1], m[2], m[3], int(m[4])) for m in ACCESS.finditer(text) if not m[3].startswith("/healthz")]


def puts(svc: Service) -> list[tuple[str, str, str, int]]:
    return [line for line in access_lines(svc) if line[1] == "PUT"]


def stored(svc: Service) -> dict[str, bytes]:
    return {p.relative_to(svc.storage).as_posix(): p.read_bytes()
            for p in svc.storage.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def count_stored(svc: Service) -> int:
    return sum(1 for p in svc.storage.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def files_of(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def copy_keys(src: Path, dst: Path, keys) -> None:
    for key in keys:
        (dst / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / key, dst / key)


def served_as_hits(svc: Service, expected: dict[str, bytes]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        for key, body in expected.items():
            conn.request("GET", quote(key))
            r = conn.getresponse()
            got = r.read()
            assert (r.status, r.getheader("X-Sstate-Source")) == (200, "hit"), key
            assert got == body, key
    finally:
        conn.close()


@pytest.fixture
def uploader(service_factory):
    """A service (anonymous @read and @report) with a user that may upload; (service, env)."""
    svc = service_factory(args=["--anon-perms", "@read,@report"])
    token = add_user(svc, "ci-uploader", "@read,@upload")
    svc.start()
    return svc, {"SSTATE_PROXY_USER": "ci-uploader", "SSTATE_PROXY_TOKEN": token}


# --- publishing, skipping, rerunning -------------------------------------------------------------------


def test_push_every_layout_skips_what_is_there_and_reruns_send_nothing(uploader, push, tmp_path):
    svc, creds = uploader
    corpus = make_corpus(tmp_path / "sstate", n=60, seed=7, equiv_fraction=0.4, big_objects=1)
    src = corpus.root
    flat, hh, legacy = legacy_dirs(tmp_path / "legacy")  # <= 1.2 flat dash names, 1.3 .. 3.0 hh/
    shutil.copytree(flat, src, dirs_exist_ok=True)
    shutil.copytree(hh, src, dirs_exist_ok=True)
    add_litter(src, corpus.objects[0], tmp_path / "secret.txt")  # 4 ignored, 2 refused
    assert corpus.legacy and corpus.truncated and len(corpus.details) >= 5

    # Half of it (and every object the equivalences point at) is on the service already.
    half = set(corpus.files[::2]) | set(legacy[::3]) | {d.unihash_key for d in corpus.details} \
        | {d.unihash_key + ".siginfo" for d in corpus.details}
    copy_keys(src, tmp_path / "half", half)
    code, s, out, err = push(tmp_path / "half", svc.url, "--no-progress", env=creds)
    assert code == 0 and s["sent"] == len(half) and s["skipped"] == 0, out + err
    assert s["bytes"] == sum((src / k).stat().st_size for k in half)

    # Names the rewrite answers for (HEAD 200 "equivalent") are not on the service: they must be sent.
    for d in corpus.details:
        for key in (d.taskhash_key, d.taskhash_key + ".siginfo"):
            (src / key).parent.mkdir(parents=True, exist_ok=True)
            (src / key).write_bytes(os.urandom(700))
        report(svc, d.unihash, d.outhash, d.unihash, method=d.method)
        assert report(svc, d.taskhash, d.outhash, d.taskhash, method=d.method)["depid"] == d.unihash
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("HEAD", quote(corpus.details[0].taskhash_key + ".siginfo"))
    r = conn.getresponse()
    r.read()
    conn.close()
    assert (r.status, r.getheader("X-Sstate-Source")) == (200, "equivalent")

    every = files_of(src) - {"README.txt", corpus.objects[0] + ".lock", corpus.objects[0] + ".tmp",
                             corpus.objects[0] + "ab12cd_9", corpus.objects[0] + ".done"}
    missing = every - half
    before = stored(svc)
    puts_before = len(puts(svc))

    # --dry-run: the keys that would be sent, nothing sent
    code, s, out, err = push(src, svc.url, "--dry-run", "--no-progress", env=creds)
    assert code == 0, err
    listed = out.splitlines()[:-1]
    assert listed == sorted(missing), set(listed) ^ missing
    assert s["sent"] == len(missing) and s["skipped"] == len(half) and s["refused"] == 2 and s["ignored"] == 4
    assert len(puts(svc)) == puts_before and stored(svc) == before

    # the real push, with its progress bar
    code, s, out, err = push(src, svc.url, "--jobs", "4", env=creds)
    assert code == 0, out + err
    assert (s["sent"], s["skipped"], s["failed"], s["refused"], s["ignored"]) == (len(missing), len(half), 0, 2, 4)
    assert "README.txt" in err and "escape.tar.zst" in err
    new_puts = puts(svc)[puts_before:]
    assert len(new_puts) == len(missing) and {p[3] for p in new_puts} == {201}
    assert {p[0] for p in new_puts} == {"ci-uploader"}

    # everything is served as a hit, byte for byte
    assert set(stored(svc)) == every
    served_as_hits(svc, {k: (src / k).read_bytes() for k in every})

    # a rerun sends nothing
    code, s, out, err = push(src, svc.url, "--no-progress", env=creds)
    assert code == 0 and (s["sent"], s["skipped"], s["failed"]) == (0, len(every), 0), out + err
    assert len(puts(svc)) == puts_before + len(missing)


def test_killed_push_resumes_and_sends_only_the_rest(uploader, push, tmp_path):
    svc, creds = uploader
    corpus = make_corpus(tmp_path / "sstate", n=160, seed=11, big_objects=4)
    total = set(corpus.files)
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(creds, HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "push", str(corpus.root), "--url", svc.url,
                             "--jobs", "2", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Part way through, freeze the service (requests in flight hang), kill the push, thaw it.
    deadline = time.monotonic() + 30
    while count_stored(svc) < 20:
        assert proc.poll() is None and time.monotonic() < deadline, "push ended before it could be killed"
        time.sleep(0.005)
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        seen = count_stored(svc)
        proc.kill()
        proc.wait()
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)
    assert seen < len(total)
    puts_before = len(puts(svc))

    code, s, out, err = push(corpus.root, svc.url, "--jobs", "4", "--no-progress", env=creds)
    assert code == 0, out + err
    assert s["sent"] + s["skipped"] == len(total) and s["failed"] == 0
    assert s["skipped"] >= seen and s["sent"] >= 1
    rerun = puts(svc)[puts_before:]
    assert len(rerun) == s["sent"] and {p[3] for p in rerun} == {201}  # nothing sent twice
    assert set(stored(svc)) == total and not list(svc.storage.rglob(".tmp-*"))
    served_as_hits(svc, {k: corpus.read(k) for k in total})


# --- credentials ---------------------------------------------------------------------------------------


def test_netrc_and_environment_credentials(uploader, push, tmp_path):
    svc, creds = uploader
    corpus = make_corpus(tmp_path / "sstate", n=6, seed=5, big_objects=0)
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"

    def write_netrc(token: str, mode: int = 0o600) -> None:
        netrc.write_text(f"machine 127.0.0.1\n  login ci-uploader\n  password {token}\n")
        netrc.chmod(mode)

    # ~/.netrc, by the URL's host
    write_netrc(creds["SSTATE_PROXY_TOKEN"])
    copy_keys(corpus.root, tmp_path / "a", corpus.files[:5])
    code, s, out, err = push(tmp_path / "a", svc.url, "--no-progress", home=home)
    assert code == 0 and s["sent"] == 5, out + err

    # the environment wins over ~/.netrc: a wrong token in the environment fails ...
    code, s, out, err = push(corpus.root, svc.url, "--no-progress", home=home,
                             env={**creds, "SSTATE_PROXY_TOKEN": "not-the-token"})
    assert code == 1 and "wrong credentials" in err and "SSTATE_PROXY_USER" in err, err
    # ... and a right one works with a wrong ~/.netrc
    write_netrc("not-the-token")
    code, s, out, err = push(corpus.root, svc.url, "--no-progress", home=home, env=creds)
    assert code == 0 and s["sent"] == len(corpus.files) - 5 and s["skipped"] == 5, out + err
    assert {p[0] for p in puts(svc)} == {"ci-uploader"}

    # a ~/.netrc others may read is refused (it holds a token), before any request
    write_netrc(creds["SSTATE_PROXY_TOKEN"], 0o644)
    n = len(access_lines(svc))
    code, s, out, err = push(corpus.root, svc.url, "--no-progress", home=home)
    assert code == 2 and ".netrc" in err and "permissive" in err, err
    assert len(access_lines(svc)) == n


def test_bad_credentials_permissions_and_urls_fail_early_with_one_line(service_factory, push, tmp_path):
    svc = service_factory(config={"server": {"mirror_prefix": "/sstate/"}})
    uploader_token = add_user(svc, "ci-uploader", "@read,@upload")
    reader_token = add_user(svc, "reader", "@read")
    svc.start()
    mirror = svc.url + "/sstate"
    corpus = make_corpus(tmp_path / "sstate", n=40, seed=2, big_objects=0)

    def fails(url: str, env: dict, code: int, *phrases: str) -> None:
        got, _s, out, err = push(corpus.root, url, "--jobs", "8", "--no-progress", env=env)
        assert got == code, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sstate-proxy push: "), err
        for phrase in phrases:
            assert phrase in lines[0], lines[0]
        assert "not-the-token" not in err + out and uploader_token not in err + out

    # wrong token: the first HEADs are refused, not one PUT
    fails(mirror, {"SSTATE_PROXY_USER": "ci-uploader", "SSTATE_PROXY_TOKEN": "not-the-token"}, 1,
          "wrong credentials", "ci-uploader")
    # no @upload: the first PUT goes alone and is refused before its body is sent; no other PUT
    fails(mirror, {"SSTATE_PROXY_USER": "reader", "SSTATE_PROXY_TOKEN": reader_token}, 1,
          "permission refused", "reader", "403")
    # anonymous
    fails(mirror, {}, 1, "authentication required", "401")
    # the service's root instead of its mirror URL
    fails(svc.url, {"SSTATE_PROXY_USER": "ci-uploader", "SSTATE_PROXY_TOKEN": uploader_token}, 1,
          "404", "mirror URL")
    assert [(p[0], p[3]) for p in puts(svc)] == [("reader", 403), ("-", 401), ("-", 404)]
    assert stored(svc) == {}
    # nothing listens there
    fails(f"http://127.0.0.1:{free_port()}", {}, 1, "cannot connect")
    # usage errors (exit 2): half of the environment pair, credentials in the URL
    fails(mirror, {"SSTATE_PROXY_USER": "ci-uploader"}, 2, "SSTATE_PROXY_TOKEN is not set")
    fails(mirror.replace("http://", "http://ci-uploader:secret@"), {}, 2, "credentials in the URL")

    code, s, out, err = push(corpus.root, mirror, "--no-progress",
                             env={"SSTATE_PROXY_USER": "ci-uploader", "SSTATE_PROXY_TOKEN": uploader_token})
    assert code == 0 and s["sent"] == len(corpus.files), out + err


def test_credentials_lookup(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine sstate.example.com login alice password a-token\n"
                     "machine other.example.com login bob password b-token\n")
    env = {"NETRC": str(netrc)}
    found = find_credentials("https://sstate.example.com:8443/mirror", env)
    assert (found.username, found.token, found.origin) == ("alice", "a-token", str(netrc))
    assert "a-token" not in repr(found)
    assert find_credentials("https://unknown.example.com", env) is None
    both = {**env, "SSTATE_PROXY_USER": "ci", "SSTATE_PROXY_TOKEN": "t"}
    assert find_credentials("https://sstate.example.com", both).username == "ci"
    with pytest.raises(CredentialsError, match="go together"):
        find_credentials("https://sstate.example.com", {"SSTATE_PROXY_TOKEN": "t"})
    assert find_credentials("https://sstate.example.com", {"NETRC": str(tmp_path / "absent")}) is None
    assert check_url("http://h:8080/sstate/") == "http://h:8080/sstate"
    for bad in ("ftp://h/", "h:8080", "http://u:p@h/", "http://h/?x=1"):
        with pytest.raises(CredentialsError):
            check_url(bad)


# --- what a server in front may answer ----------------------------------------------------------------


async def test_redirects_stop_the_push_and_503_is_retried(aiohttp_server, tmp_path, monkeypatch):
    """An http -> https redirect of a front server stops the run (a PUT's body and credentials
    are not sent wherever a redirect points); a 503 (database unavailable) is retried."""
    from aiohttp import web

    from proxy import push as push_mod

    monkeypatch.setattr(push_mod, "RETRY_DELAY_S", 0.01)
    corpus = make_corpus(tmp_path / "sstate", n=3, seed=1, big_objects=0)
    seen: list[tuple[str, str]] = []
    busy = {"left": 2}

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("https://sstate.example.com" + request.path_qs)

    async def flaky(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("Digest", "")))
        if busy["left"]:
            busy["left"] -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        if request.method == "HEAD":
            return web.Response(status=404)
        await request.read()
        return web.Response(status=201)

    for handler, check in ((redirect, "redirected to https://sstate.example.com/"), (flaky, None)):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app)
        s = await push_mod.push_dir(str(corpus.root), str(server.make_url("")), jobs=1, show_progress=False)
        if check:
            assert s.aborted and check in s.aborted and s.sent == 0
        else:
            assert s.aborted is None and not s.failed and s.sent == len(corpus.files)
            assert seen[:3] == [("HEAD", "")] * 3  # two 503 answers, then the answer
            assert all(d.startswith("sha-256=") for m, d in seen if m == "PUT")
