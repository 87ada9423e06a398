"""Small deterministic sstate mirror tree for tests and benches.

    from tests.corpus import make_corpus
    c = make_corpus(tmp_path, n=300, seed=1, equiv_fraction=0.3)
    c.objects        # keys of the sstate objects written
    c.equivalences   # (taskhash_key, unihash_key, method): only unihash_key exists

Self-contained (no dependency on anything outside tests/, not even proxy/).  Same arguments -> same names,
same bytes, same mtimes (given the same zstandard version).  Also a CLI for benches::

    python -m tests.corpus OUT_DIR [-n 5000] [--seed 1] [--equiv-fraction 0.3]

What is written under ``root``:

* ``n`` objects, mostly the current layout ``hh/hh/sstate:PN:ARCH-poky-linux:PV:PR:PKGARCH:14:
  <hash>_<task>.tar.zst``; ~20 % native/cross under ``universal/``, populate_lic with SWSPEC
  names (``sstate:PN::PV:PR::14:``), a few LONG names truncated exactly like OE-core's
  generate_sstatefn, and a few legacy layouts (flat dash .tgz, hh/ dash, hh/ colon .tgz,
  dunfell hh/hh/ .tgz).
* a ``.siginfo`` next to ~90 % of the objects (always next to equivalence targets), a
  ``.sig`` next to ``sig_fraction`` of them; a few siginfo-only entries (non-sstate tasks
  such as do_compile, ``..._compile.tar.zst.siginfo``) without an object.
* contents: ``.tar.zst`` objects are pzstd-like (12-byte skippable frame + a valid zstd
  frame) of random bytes if ``zstandard`` imports, else random bytes; ``.tgz`` objects are
  gzip; ``.siginfo`` is zstd JSON; ``.sig`` random bytes.  Sizes 100 B .. 200 KB (log-uniform)
  plus ``big_objects`` objects of 1-2 MB.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on environment
    _zstd = None

__all__ = [
    "Corpus",
    "EquivDetail",
    "HASHEQUIV_METHOD",
    "SSTATE_VERSION",
    "generate_sstatefn",
    "make_corpus",
    "pkgspec",
    "swspec",
]

SSTATE_VERSION = "14"
HASHEQUIV_METHOD = "oe.sstatesig.OEOuthashBasic"
EPOCH = 1767225600  # newest mtime written (2026-01-01T00:00:00Z)


# --------------------------------------------------------------------------------------------
# naming (faithful to OE-core sstate.bbclass)
# --------------------------------------------------------------------------------------------

def generate_sstatefn(spec: str, hash: str, taskname: str, siginfo: bool = False,
                      ext: str = ".tar.zst") -> str:
    """OE-core ``sstate.bbclass:generate_sstatefn`` -> ``hh/hh/<name>``.

    ``ext`` is ".tar.zst" (4.0+) or ".tgz" (3.1 .. 3.4).  With ``siginfo`` the limit is 254
    and ".siginfo" is part of the name (used for siginfo-only entries); object names are
    limited to 246 so that ``object + ".siginfo"`` fits.  Too-long names get fields 2, 3, 4
    of the spec (arch-vendor-os, PV, PR) cut to the same length."""
    extension = ext
    limit = 254 - 8
    if siginfo:
        limit = 254
        extension = ext + ".siginfo"
    if not hash:
        hash = "INVALID"
    fn = spec + hash + "_" + taskname + extension
    if len(fn) > limit:
        components = spec.split(":")
        avail = (limit - len(hash + "_" + taskname + extension) - len(components[0])
                 - len(components[1]) - len(components[5]) - len(components[6]) - 7) // 3
        components[2] = components[2][:avail]
        components[3] = components[3][:avail]
        components[4] = components[4][:avail]
        fn = ":".join(components) + hash + "_" + taskname + extension
        if len(fn) > limit:
            raise ValueError("Unable to reduce size of sstate filename: " + fn)
    return hash[:2] + "/" + hash[2:4] + "/" + fn


def pkgspec(pn: str, target: str, pv: str, pr: str, pkgarch: str, version: str = SSTATE_VERSION) -> str:
    """SSTATE_PKGSPEC: ``sstate:PN:ARCH-VENDOR-OS:PV:PR:PKGARCH:VER:``."""
    return f"sstate:{pn}:{target}:{pv}:{pr}:{pkgarch}:{version}:"


def swspec(pn: str, pv: str, pr: str, version: str = SSTATE_VERSION) -> str:
    """SSTATE_SWSPEC (populate_lic, fetch, unpack, patch, preconfigure): ``sstate:PN::PV:PR::VER:``."""
    return f"sstate:{pn}::{pv}:{pr}::{version}:"


def dashspec(pn: str, target: str, pv: str, pr: str, pkgarch: str, version: str) -> str:
    """<= 1.5 SSTATE_PKGSPEC with '-' separators."""
    return f"sstate-{pn}-{target}-{pv}-{pr}-{pkgarch}-{version}-"


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EquivDetail:
    """One taskhash -> unihash mapping (hashserv row) and the names involved."""

    method: str
    taskhash: str
    unihash: str
    outhash: str
    taskhash_key: str  # never written
    unihash_key: str  # an entry of Corpus.objects
    pn: str
    task: str  # "do_populate_sysroot"


@dataclass
class Corpus:
    root: Path
    seed: int
    method: str = HASHEQUIV_METHOD
    objects: list[str] = field(default_factory=list)  # object keys written (no companions)
    companions: list[str] = field(default_factory=list)  # .siginfo/.sig keys written next to objects
    siginfo_only: list[str] = field(default_factory=list)  # .siginfo keys written without an object
    absent: list[str] = field(default_factory=list)  # well-formed object keys never written
    equivalences: list[tuple[str, str, str]] = field(default_factory=list)  # (taskhash_key, unihash_key, method)
    details: list[EquivDetail] = field(default_factory=list)  # same order as equivalences
    truncated: list[str] = field(default_factory=list)  # object keys with truncated (long) names
    legacy: list[str] = field(default_factory=list)  # object keys in pre-4.0 layouts
    sizes: dict[str, int] = field(default_factory=dict)  # every written key -> bytes
    mtimes: dict[str, int] = field(default_factory=dict)  # every written key -> mtime

    @property
    def files(self) -> list[str]:
        """Every key written (objects, companions, siginfo-only)."""
        return self.objects + self.companions + self.siginfo_only

    @property
    def taskhash(self) -> list[str]:
        return [d.taskhash for d in self.details]

    @property
    def unihash(self) -> list[str]:
        return [d.unihash for d in self.details]

    @property
    def outhash(self) -> list[str]:
        return [d.outhash for d in self.details]

    def unihash_map(self) -> dict[tuple[str, str], str]:
        """{(method, taskhash): unihash} for every equivalence (what a hashserv would answer)."""
        return {(d.method, d.taskhash): d.unihash for d in self.details}

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------

_TARGET = [("zlib", "1.3.1"), ("busybox", "1.37.0"), ("openssl", "3.4.1"), ("glibc", "2.41+git"),
           ("bash", "5.2.32"), ("curl", "8.12.1"), ("systemd", "257.1"), ("python3", "3.13.2"),
           ("gtk+3", "3.24.43"), ("libxml2", "2.13.6"), ("util-linux", "2.40.4"), ("xz", "5.6.4"),
           ("linux-yocto", "6.12.11+git"), ("u-boot", "2025.01"), ("mesa", "24.3.4"),
           ("gstreamer1.0-plugins-base", "1.24.12"), ("sqlite3", "3.48.0"), ("perl", "5.40.1")]
_NATIVE = [("zlib-native", "1.3.1"), ("cmake-native", "3.31.5"), ("python3-native", "3.13.2"),
           ("rust-llvm-native", "19.1.7"), ("pseudo-native", "1.9.0+git"), ("quilt-native", "0.68"),
           ("gcc-cross-x86_64", "14.2.0"), ("binutils-cross-aarch64", "2.44")]
_NATIVESDK = [("nativesdk-zlib", "1.3.1"), ("nativesdk-openssl", "3.4.1"), ("nativesdk-cmake", "3.31.5")]
_ALLARCH = [("os-release", "1.0"), ("packagegroup-core-boot", "1.0"), ("ca-certificates", "20241223"),
            ("tzdata", "2025a")]
_TUNES = [("core2-64", "x86_64"), ("cortexa57", "aarch64"), ("riscv64", "riscv64")]
_TASKS = ["populate_sysroot", "package", "packagedata", "package_write_rpm", "package_qa",
          "deploy_source_date_epoch", "create_spdx", "create_package_spdx", "recipe_qa"]
_NATIVE_TASKS = ["populate_sysroot", "deploy_source_date_epoch", "create_recipe_spdx", "recipe_qa"]
_SIGONLY_TASKS = ["fetch", "unpack", "patch", "configure", "compile", "install"]
_DISTROS = ["universal/", "universal/", "universal/", "ubuntu-24.04/", "universal-4.8/"]


def _h(rng: random.Random, bits: int = 256) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _pr(rng: random.Random) -> str:
    return "r0" if rng.random() < 0.75 else f"r{rng.randint(1, 5)}"


def _current_name(rng: random.Random, h: str, kind: str) -> tuple[str, str, str, bool]:
    """(key, pn, task, truncated) for a current-layout object of ``kind``."""
    key, pn, task, spec = _pick_current(rng, h, kind)
    return key, pn, task, len(spec + h + "_" + task + ".tar.zst") > 246


def _pick_current(rng: random.Random, h: str, kind: str) -> tuple[str, str, str, str]:
    """(key, pn, task, spec) for a current-layout object of ``kind``."""
    if kind == "native":
        pn, pv = rng.choice(_NATIVE)
        task = rng.choice(_NATIVE_TASKS)
        spec = pkgspec(pn, "x86_64-linux", pv, _pr(rng), "x86_64")
        return rng.choice(_DISTROS) + generate_sstatefn(spec, h, task), pn, task, spec
    if kind == "lic":
        pn, pv = rng.choice(_TARGET + _NATIVE + _ALLARCH)
        spec = swspec(pn, pv, _pr(rng))
        return generate_sstatefn(spec, h, "populate_lic"), pn, "populate_lic", spec
    if kind == "nativesdk":
        pn, pv = rng.choice(_NATIVESDK)
        task = rng.choice(_TASKS)
        spec = pkgspec(pn, "x86_64-nativesdk-pokysdk-linux", pv, "r0", "x86_64-nativesdk")
        return generate_sstatefn(spec, h, task), pn, task, spec
    if kind == "allarch":
        pn, pv = rng.choice(_ALLARCH)
        task = rng.choice(_TASKS)
        spec = pkgspec(pn, "all-poky-linux", pv, "r0", "allarch")
        return generate_sstatefn(spec, h, task), pn, task, spec
    if kind == "long":
        # AUTOINC/SRCREV-style PVs and long machine triples: > 246 chars before truncation.
        pn = rng.choice(["linux-yocto-custom-bsp-kernel", "gstreamer1.0-plugins-bad-extra",
                         "packagegroup-core-full-cmdline-extended"])
        pv = f"6.12.11+git{'0' * rng.randint(1, 3)}+{_h(rng, 160)}_{_h(rng, 160)}"
        task = rng.choice(["package_write_rpm", "populate_sysroot", "create_package_spdx"])
        tune = "cortexa76-crypto-virtualization-multilib-lib32-very-long-machine"
        spec = pkgspec(pn, tune + "-poky-linux-gnueabi", pv, f"r{rng.randint(0, 99)}", tune)
        return generate_sstatefn(spec, h, task), pn, task, spec
    tune, _ = rng.choice(_TUNES)
    pn, pv = rng.choice(_TARGET)
    task = rng.choice(_TASKS)
    spec = pkgspec(pn, tune + "-poky-linux", pv, _pr(rng), tune)
    return generate_sstatefn(spec, h, task), pn, task, spec


def _legacy_name(rng: random.Random, i: int) -> tuple[str, str, str]:
    """(key, pn, task) in one of the pre-4.0 layouts (cycling through 4 eras)."""
    pn, pv = rng.choice(_TARGET[:8])
    task = rng.choice(["populate_sysroot", "package", "package_write_rpm", "populate_lic"])
    era = i % 4
    if era == 0:  # denzil: flat, dash, md5
        h = _h(rng, 128)
        return dashspec(pn, "i586-poky-linux", pv, "r2", "i586", "2") + h + "_" + task + ".tgz", pn, task
    if era == 1:  # danny: hh/, dash, md5, NATIVELSBSTRING for native
        h = _h(rng, 128)
        if rng.random() < 0.5:
            spec = dashspec(pn + "-native", "x86_64-linux", pv, "r0", "x86_64", "2")
            return f"Ubuntu-12.04/{h[:2]}/{spec}{h}_populate_sysroot.tgz", pn + "-native", "populate_sysroot"
        spec = dashspec(pn, "i586-poky-linux", pv, "r0", "i586", "2")
        return f"{h[:2]}/{spec}{h}_{task}.tgz", pn, task
    # 1.6+: ':' names, SWSPEC for populate_lic
    spec = swspec(pn, pv, "r0", "3") if task == "populate_lic" else \
        pkgspec(pn, "core2-64-poky-linux", pv, "r0", "core2-64", "3")
    if era == 2:  # daisy .. warrior: hh/, colon, .tgz
        h = _h(rng, 256 if rng.random() < 0.5 else 128)
        return f"{h[:2]}/{spec}{h}_{task}.tgz", pn, task
    h = _h(rng)  # dunfell: hh/hh/, .tgz, generate_sstatefn
    return generate_sstatefn(spec, h, task, ext=".tgz"), pn, task


# --------------------------------------------------------------------------------------------
# contents
# --------------------------------------------------------------------------------------------

def _zstd_frame(data: bytes, level: int = 1) -> bytes | None:
    if _zstd is None:
        return None
    return _zstd.ZstdCompressor(level=level).compress(data)


def _object_bytes(rng: random.Random, size: int, ext: str) -> bytes:
    payload = rng.randbytes(size)
    if ext == ".tgz":
        return gzip.compress(payload, compresslevel=1, mtime=0)
    frame = _zstd_frame(payload)
    if frame is None:
        return payload
    # pzstd framing: skippable frame (magic 0x184D2A50, length 4, compressed size) + zstd frame
    return struct.pack("<III", 0x184D2A50, 4, len(frame)) + frame


def _siginfo_bytes(rng: random.Random, pn: str, task: str, h: str) -> bytes:
    data = {"task": "do_" + task, "taskhash": h, "unihash": h, "basehash": _h(rng),
            "runtaskdeps": [f"{pn}:do_prepare_recipe_sysroot"],
            "varvals": {"do_" + task: rng.randbytes(rng.randint(200, 3000)).hex()}}
    raw = json.dumps(data, sort_keys=True).encode()
    return _zstd_frame(raw, 3) or raw


def _size(rng: random.Random) -> int:
    # log-uniform 100 B .. 200 KB
    return int(100 * (2000 ** rng.random()))


# --------------------------------------------------------------------------------------------
# make_corpus
# --------------------------------------------------------------------------------------------

def make_corpus(root: Path, n: int = 300, seed: int = 1, equiv_fraction: float = 0.3, *,
                sig_fraction: float = 0.2, siginfo_fraction: float = 0.9, big_objects: int = 2,
                n_absent: int | None = None) -> Corpus:
    """Write a deterministic sstate tree of ``n`` objects under ``root``; return its description.

    ``equiv_fraction`` of the current-layout (hh/hh/) objects get one or two extra taskhashes
    mapping to their (unihash) name; the taskhash-named keys are never written.
    ``n_absent`` well-formed names are never written (default ``max(10, n // 10)``)."""
    root = Path(root)
    rng = random.Random(f"sstate-corpus:{seed}")
    c = Corpus(root=root, seed=seed)
    taken: set[str] = set()
    kinds = (["target"] * 50 + ["native"] * 20 + ["lic"] * 10 + ["nativesdk"] * 6
             + ["allarch"] * 6 + ["long"] * 3 + ["legacy"] * 5)
    plan: list[tuple[str, str, str, bool]] = []  # (key, pn, task, current layout)
    n_legacy = 0
    i = -1
    while len(plan) < n:
        i += 1
        # guarantee a few long and legacy names even in small corpora
        kind = "long" if i % 97 == 5 else "legacy" if i % 61 == 7 else rng.choice(kinds)
        if kind == "legacy":
            key, pn, task = _legacy_name(rng, n_legacy)
            n_legacy += 1
            current = truncated = False
        else:
            key, pn, task, truncated = _current_name(rng, _h(rng), kind)
            current = True
        if key in taken:
            continue
        taken.add(key)
        plan.append((key, pn, task, current))
        if not current:
            c.legacy.append(key)
        if truncated:
            c.truncated.append(key)

    # equivalences: extra taskhashes for current-layout objects
    erng = random.Random(f"sstate-corpus-equiv:{seed}")
    equiv_targets: set[str] = set()
    for key, pn, task, current in plan:
        if not current or erng.random() >= equiv_fraction:
            continue
        uni = key.rsplit("/", 1)[-1]
        stem, tail = uni.rsplit(":", 1)
        unihash = tail[:64]
        for _ in range(erng.randint(1, 2)):
            th = _h(erng)
            th_key = _rename(key, stem, tail, unihash, th)
            if th_key in taken:
                continue
            taken.add(th_key)
            d = EquivDetail(method=HASHEQUIV_METHOD, taskhash=th, unihash=unihash,
                            outhash=_h(erng), taskhash_key=th_key, unihash_key=key, pn=pn,
                            task="do_" + task)
            c.details.append(d)
            c.equivalences.append((th_key, key, HASHEQUIV_METHOD))
            equiv_targets.add(key)

    # absent names
    arng = random.Random(f"sstate-corpus-absent:{seed}")
    for _ in range(max(10, n // 10) if n_absent is None else n_absent):
        kind = arng.choice(["target", "target", "native", "lic", "allarch"])
        key = _current_name(arng, _h(arng), kind)[0]
        if key not in taken:
            taken.add(key)
            c.absent.append(key)

    # write
    big = set(range(0, len(plan), max(1, len(plan) // max(1, big_objects)))[:big_objects]) \
        if big_objects else set()
    for idx, (key, pn, task, _current) in enumerate(plan):
        orng = random.Random(f"sstate-corpus-obj:{seed}:{idx}")
        size = orng.randint(1 << 20, 2 << 20) if idx in big else _size(orng)
        ext = ".tgz" if key.endswith(".tgz") else ".tar.zst"
        mtime = EPOCH - orng.randrange(90 * 86400)
        _write(c, key, _object_bytes(orng, size, ext), mtime)
        c.objects.append(key)
        h = _hash_of(key)
        if key in equiv_targets or orng.random() < siginfo_fraction:
            _write(c, key + ".siginfo", _siginfo_bytes(orng, pn, task, h), mtime)
            c.companions.append(key + ".siginfo")
        if orng.random() < sig_fraction:
            _write(c, key + ".sig", b"\x89\x01" + orng.randbytes(orng.randint(280, 560)), mtime)
            c.companions.append(key + ".sig")

    # siginfo-only entries for non-sstate tasks
    srng = random.Random(f"sstate-corpus-sigonly:{seed}")
    for _ in range(max(2, n // 30)):
        pn, pv = srng.choice(_TARGET)
        task = srng.choice(_SIGONLY_TASKS)
        h = _h(srng)
        tune, _ = srng.choice(_TUNES)
        spec = swspec(pn, pv, "r0") if task in ("fetch", "unpack", "patch") else \
            pkgspec(pn, tune + "-poky-linux", pv, "r0", tune)
        key = generate_sstatefn(spec, h, task, siginfo=True)
        if key in taken:
            continue
        taken.add(key)
        _write(c, key, _siginfo_bytes(srng, pn, task, h), EPOCH - srng.randrange(90 * 86400))
        c.siginfo_only.append(key)
    return c


def _rename(key: str, stem: str, tail: str, old: str, new: str) -> str:
    """hh/hh/<stem>:<old>_... -> hh/hh/<stem>:<new>_... keeping any EXTRAPATH."""
    dirs = key.rsplit("/", 1)[0]
    extra = dirs[: -5]  # strip "hh/hh", keep "universal/" or ""
    return f"{extra}{new[:2]}/{new[2:4]}/{stem}:{new}{tail[len(old):]}"


def _hash_of(key: str) -> str:
    base = key.rsplit("/", 1)[-1]
    sep = ":" if base.startswith("sstate:") else "-"
    return base.rsplit(sep, 1)[1].split("_", 1)[0]


def _write(c: Corpus, key: str, data: bytes, mtime: int) -> None:
    p = c.root / key
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, (mtime, mtime))
    c.sizes[key] = len(data)
    c.mtimes[key] = mtime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write a deterministic test sstate corpus")
    ap.add_argument("out", type=Path)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--equiv-fraction", type=float, default=0.3)
    ap.add_argument("--manifest", type=Path, help="write the Corpus lists as JSON here")
    a = ap.parse_args(argv)
    c = make_corpus(a.out, n=a.n, seed=a.seed, equiv_fraction=a.equiv_fraction)
    print(f"{len(c.objects)} objects, {len(c.companions)} companions, {len(c.siginfo_only)} siginfo-only, "
          f"{len(c.equivalences)} equivalences, {len(c.absent)} absent, "
          f"{sum(c.sizes.values()) / 1e6:.1f} MB -> {a.out}")
    if a.manifest:
        a.manifest.write_text(json.dumps({
            "objects": c.objects, "companions": c.companions, "siginfo_only": c.siginfo_only,
            "absent": c.absent, "equivalences": c.equivalences,
            "details": [d.__dict__ for d in c.details]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
