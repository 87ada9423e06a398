"""`sstate-proxy import SSTATE_DIR` into the configured store (local disk, S3 over a moto server),
then bitbake's real fetcher against the real service: every layout, idempotence, --link, dedup."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import dashspec, make_corpus, pkgspec
from tests.s3server import TEST_ENV, MotoServer
from tests.service import Service
from tests.test_upload import ADMIN, call, make_archive, obj_key

SUMMARY = re.compile(r"added (\d+) \((\d+) hard-linked, (\d+) deduplicated, \d+ bytes\), skipped (\d+) "
                     r"\(already present\), refused (\d+), failed (\d+), ignored (\d+)")


def run_import(svc: Service, src: Path, *extra: str, progress: bool = False) -> tuple[int, dict, str]:
    args = [sys.executable, "-m", "proxy.cli", "import", "--config", str(svc.config_path), str(src), *extra]
    if not progress:
        args.append("--no-progress")
    out = subprocess.run(args, cwd=svc.workdir, env=svc.env, capture_output=True, text=True, timeout=120)
    m = SUMMARY.search(out.stdout)
    assert m, out.stdout + out.stderr
    keys = ("added", "linked", "deduplicated", "skipped", "refused", "failed", "ignored")
    return out.returncode, dict(zip(keys, map(int, m.groups()), strict=True)), out.stderr


def tgz(files: dict[str, bytes], mtime: int = 1_300_000_000) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), mtime
            tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def write(root: Path, key: str, data: bytes) -> str:
    p = root / key
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return key


def legacy_dirs(base: Path) -> tuple[Path, Path, list[str]]:
    """A flat (<= 1.2, dash names) and an hh/ (1.3 .. 3.0, dash and colon) SSTATE_DIR with real .tgz
    archives and .siginfo companions; (flat dir, hh dir, every key written)."""
    rng = random.Random(5)
    flat, hh = base / "flat", base / "hh"
    keys: list[str] = []
    for i in range(6):
        h = f"{rng.getrandbits(128):032x}"
        name = dashspec(f"pkg{i}", "i586-poky-linux", "1.0", "r2", "i586", "2") + h + "_populate_sysroot.tgz"
        write(flat, name, tgz({f"sysroot-destdir/usr/lib/lib{i}.so": os.urandom(2000)}))
        write(flat, name + ".siginfo", os.urandom(300))
        keys += [name, name + ".siginfo"]
    for i in range(6):
        h = f"{rng.getrandbits(256):064x}"
        if i % 2:
            key = f"{h[:2]}/" + pkgspec(f"pkg{i}", "core2-64-poky-linux", "1.0", "r0", "core2-64", "3") + \
                f"{h}_package.tgz"
        else:
            key = f"Ubuntu-12.04/{h[:2]}/" + dashspec(f"pkg{i}-native", "x86_64-linux", "1.0", "r0", "x86_64", "2") + \
                f"{h}_populate_sysroot.tgz"
        write(hh, key, tgz({f"data/{i}": os.urandom(1500)}))
        write(hh, key + ".siginfo", os.urandom(200))
        keys += [key, key + ".siginfo"]
    return flat, hh, keys


def add_litter(root: Path, some_key: str, outside: Path) -> None:
    """bitbake's temp/lock files (ignored) and things import must refuse."""
    write(root, some_key + ".lock", b"")
    write(root, some_key + ".tmp", b"partial download")
    write(root, some_key + "ab12cd_9", b"NamedTemporaryFile litter")
    write(root, some_key + ".done", b"")
    write(root, "README.txt", b"not an sstate object")
    outside.write_text("secret")
    os.symlink(outside, root / "escape.tar.zst")


# --- local store -------------------------------------------------------------------------------------


def test_import_every_layout_then_bitbake_finds_everything(tmp_path):
    svc = Service(tmp_path / "svc")
    corpus = make_corpus(tmp_path / "current", n=80, seed=3)
    assert corpus.legacy and any(k.startswith("universal/") for k in corpus.objects)
    add_litter(corpus.root, corpus.objects[0], tmp_path / "secret.txt")
    flat, hh, legacy_keys = legacy_dirs(tmp_path)
    svc.start()  # import while the service runs: new objects are visible at once
    try:
        code, s, err = run_import(svc, corpus.root, progress=True)
        assert code == 0, err
        assert s["added"] == len(corpus.files) and s["failed"] == 0 and s["skipped"] == 0
        assert s["ignored"] == 4 and s["refused"] == 2, err
        assert "README.txt" in err and "escape.tar.zst" in err
        for src in (flat, hh):
            code, s2, err = run_import(svc, src)
            assert code == 0 and s2["added"] == len(list(p for p in src.rglob("*") if p.is_file())), err

        stored = {p.relative_to(svc.storage).as_posix() for p in svc.storage.rglob("*") if p.is_file()}
        assert stored == set(corpus.files) | set(legacy_keys)
        assert not list(svc.storage.rglob(".tmp-*"))

        client = BitbakeMirrorClient(svc.url, tmp_path / "bb")
        objects = corpus.objects + [k for k in legacy_keys if not k.endswith(".siginfo")]
        found = client.check(objects + corpus.absent)
        assert all(found[k] for k in objects), [k for k in objects if not found[k]]
        assert not any(found[k] for k in corpus.absent)
        for key in objects[:3] + objects[-3:]:
            assert client.download(key) == ((corpus.root / key).read_bytes() if key in corpus.files
                                             else ((flat / key) if (flat / key).exists() else (hh / key)).read_bytes())

        # idempotent: a second run skips everything
        code, again, err = run_import(svc, corpus.root)
        assert code == 0 and again["added"] == 0 and again["skipped"] == len(corpus.files), err
    finally:
        svc.stop()


def test_import_link_makes_hard_links(tmp_path):
    svc = Service(tmp_path / "svc")
    corpus = make_corpus(tmp_path / "sstate", n=25, seed=9)
    code, s, err = run_import(svc, corpus.root, "--link")
    assert code == 0 and s["linked"] == s["added"] == len(corpus.files), err
    for key in corpus.files:
        src, dst = os.stat(corpus.root / key), os.stat(svc.storage / key)
        assert dst.st_ino == src.st_ino and dst.st_nlink >= 2
    code, s, _ = run_import(svc, corpus.root, "--link")
    assert s["added"] == 0 and s["skipped"] == len(corpus.files)


def test_import_dedups_equal_archives(tmp_path):
    svc = Service(tmp_path / "svc")
    src = tmp_path / "sstate"
    files = {"sysroot-destdir/usr/lib/libbar.so.2": os.urandom(40000)}
    h1, h2, h3 = (f"{random.getrandbits(256):064x}" for _ in range(3))
    spec = pkgspec("libbar", "core2-64-poky-linux", "2.0", "r0", "core2-64")
    keys = [f"{h[:2]}/{h[2:4]}/{spec}{h}_populate_sysroot.tar.zst" for h in (h1, h2, h3)]
    bodies = [make_archive(files, mtime=100), make_archive(files, mtime=200),
              make_archive({**files, "sysroot-destdir/usr/lib/other": b"x"})]
    for k, b in zip(keys, bodies, strict=True):
        write(src, k, b)
    code, s, err = run_import(svc, src)
    assert code == 0 and s["added"] == 3 and s["deduplicated"] == 1, err
    assert (svc.storage / keys[2]).exists()
    kept = [k for k in keys[:2] if (svc.storage / k).exists()]
    assert len(kept) == 1
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "stats", "--config", str(svc.config_path)],
                         cwd=svc.workdir, env=svc.env, capture_output=True, text=True, check=True)
    dedup = json.loads(out.stdout)["dedup"]
    assert dedup["objects"] == 3 and dedup["unique"] == 2
    assert dedup["bytes_saved"] == len(bodies[1 - keys.index(kept[0])])
    with svc:
        for k in keys[:2]:
            st, h, got = call(svc, "GET", k)
            assert st == 200 and h["x-sstate-source"] == "hit"
            assert got == bodies[keys.index(kept[0])]
    code, s, _ = run_import(svc, src)
    assert s["added"] == 0 and s["skipped"] == 3


# --- S3 ------------------------------------------------------------------------------------------------


@pytest.fixture
def moto():
    m = MotoServer()
    m.start()
    yield m
    m.close()


def test_import_into_s3(tmp_path, moto):
    moto.create_bucket("sstate")
    svc = Service(tmp_path / "svc", env={**TEST_ENV, "SSTATE_PROXY_ADMIN_USER": ADMIN[0],
                                         "SSTATE_PROXY_ADMIN_TOKEN": ADMIN[1]}, config={
        "storage": {"backend": "s3"},
        "storage.s3": {"bucket": "sstate", "prefix": "fleet", "endpoint_url": moto.endpoint_url,
                       "region": "us-east-1", "timeout_s": 5.0},
    })
    corpus = make_corpus(tmp_path / "sstate", n=20, seed=4)
    code, s, err = run_import(svc, corpus.root, "--link")  # no hard links into S3: copies, warns
    assert code == 0 and s["added"] == len(corpus.files) and s["linked"] == 0, err
    assert "copying instead" in err
    with svc:
        found = BitbakeMirrorClient(svc.url, tmp_path / "bb").check(corpus.objects)
        assert all(found.values())
        key = corpus.objects[0]
        assert call(svc, "GET", key)[2] == corpus.read(key)
        # uploads into S3 dedup too (the identity is computed from the stored object)
        files = {"sysroot-destdir/usr/bin/tool": os.urandom(20000)}
        k1, k2 = obj_key(), obj_key()
        assert call(svc, "PUT", k1, make_archive(files, 1), auth=ADMIN)[0] == 201
        st, h, _ = call(svc, "PUT", k2, make_archive(files, 2), auth=ADMIN)
        assert st == 201 and h["x-sstate-deduplicated-to"] == k1
        assert [o["Key"] for o in moto.client().list_objects_v2(Bucket="sstate", Prefix="fleet/" + k2)
                .get("Contents", [])] == []
        st, h, got = call(svc, "GET", k2)
        assert st == 200 and got == make_archive(files, 1) and h["x-sstate-source"] == "hit"
    code, s, _ = run_import(svc, corpus.root)
    assert s["added"] == 0 and s["skipped"] == len(corpus.files)
