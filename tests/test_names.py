"""Table-driven tests for proxy.names (safe_key, parse, SstateName) and tests.corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from proxy.names import BadPath, SstateName, is_valid_hash, parse, safe_key
from tests.corpus import HASHEQUIV_METHOD, generate_sstatefn, make_corpus, pkgspec

H = hashlib.sha256(b"taskhash").hexdigest()  # 64 hex
H2 = hashlib.sha256(b"unihash").hexdigest()
M = hashlib.md5(b"old").hexdigest()  # 32 hex, bitbake < 2.7 era
assert H[:4] != H2[:4]


def dirs(h: str, layout: str) -> str:
    return {"flat": "", "hh": h[:2] + "/", "hhhh": h[:2] + "/" + h[2:4] + "/"}[layout]


# Long spec: AUTOINC PV with two SRCREVs and a long tune -> generate_sstatefn truncates it.
LONG_TUNE = "cortexa76-crypto-virtualization-multilib-lib32-very-long-machine"
LONG_SPEC = pkgspec("linux-yocto-custom-bsp-kernel", LONG_TUNE + "-poky-linux-gnueabi",
                    "6.12.11+git0+" + "a" * 40 + "_" + "b" * 40, "r17", LONG_TUNE)
LONG_SPEC_DUNFELL = pkgspec("gstreamer1.0-plugins-bad-extra", LONG_TUNE + "-poky-linux-gnueabi",
                            "1.16.2+git" + "c" * 120, "r3", LONG_TUNE, version="3")


def _trunc(spec: str, h: str, task: str, siginfo: bool = False, ext: str = ".tar.zst") -> str:
    return generate_sstatefn(spec, h, task, siginfo=siginfo, ext=ext)


# (id, key, dirpath, layout, stem, hash, task, ext, companion)
NAMES = [
    # <= 1.2 denzil: flat, '-' separators, md5, .tgz
    ("denzil-flat", f"sstate-zlib-i586-poky-linux-1.2.6-r2-i586-2-{M}_populate_sysroot.tgz",
     "", "flat", "sstate-zlib-i586-poky-linux-1.2.6-r2-i586-2-", M, "populate_sysroot", ".tgz", ""),
    ("denzil-flat-siginfo", f"sstate-eglibc-i586-poky-linux-2.15-r17-i586-2-{M}_package.tgz.siginfo",
     "", "flat", "sstate-eglibc-i586-poky-linux-2.15-r17-i586-2-", M, "package", ".tgz", ".siginfo"),
    # 1.3 danny: hh/ + dash names, NATIVELSBSTRING for native
    ("danny-hh", f"{M[:2]}/sstate-busybox-armv5te-poky-linux-gnueabi-1.20.2-r3-armv5te-2-{M}"
     "_package_write_ipk.tgz",
     "", "hh", "sstate-busybox-armv5te-poky-linux-gnueabi-1.20.2-r3-armv5te-2-", M,
     "package_write_ipk", ".tgz", ""),
    ("danny-native", f"Ubuntu-12.04/{M[:2]}/sstate-zlib-native-x86_64-linux-1.2.7-r0-x86_64-2-{M}"
     "_populate_sysroot.tgz",
     "Ubuntu-12.04/", "hh", "sstate-zlib-native-x86_64-linux-1.2.7-r0-x86_64-2-", M,
     "populate_sysroot", ".tgz", ""),
    # 1.6 daisy: ':' separators, SWSPEC
    ("daisy-colon", f"{M[:2]}/sstate:zlib:i586-poky-linux:1.2.8:r0:i586:3:{M}_populate_sysroot.tgz",
     "", "hh", "sstate:zlib:i586-poky-linux:1.2.8:r0:i586:3:", M, "populate_sysroot", ".tgz", ""),
    ("daisy-swspec", f"{M[:2]}/sstate:zlib::1.2.8:r0::3:{M}_populate_lic.tgz",
     "", "hh", "sstate:zlib::1.2.8:r0::3:", M, "populate_lic", ".tgz", ""),
    # 2.7 warrior: unihash (sha256), still hh/
    ("warrior", f"{H[:2]}/sstate:openssl:core2-64-poky-linux:1.1.1b:r0:core2-64:3:{H}"
     "_package_write_rpm.tgz",
     "", "hh", "sstate:openssl:core2-64-poky-linux:1.1.1b:r0:core2-64:3:", H,
     "package_write_rpm", ".tgz", ""),
    ("warrior-universal", f"universal/{H[:2]}/sstate:quilt-native:x86_64-linux:0.65:r0:x86_64:3:{H}"
     "_populate_sysroot.tgz.siginfo",
     "universal/", "hh", "sstate:quilt-native:x86_64-linux:0.65:r0:x86_64:3:", H,
     "populate_sysroot", ".tgz", ".siginfo"),
    # 3.1 dunfell: hh/hh/, .tgz, truncation
    ("dunfell", f"{H[:2]}/{H[2:4]}/sstate:glibc:core2-64-poky-linux:2.31+git:r0:core2-64:3:{H}"
     "_populate_sysroot.tgz",
     "", "hhhh", "sstate:glibc:core2-64-poky-linux:2.31+git:r0:core2-64:3:", H,
     "populate_sysroot", ".tgz", ""),
    ("dunfell-universal", f"universal/{H[:2]}/{H[2:4]}/sstate:zlib-native:x86_64-linux:1.2.11:r0:x86_64:3:"
     f"{H}_populate_sysroot.tgz.siginfo",
     "universal/", "hhhh", "sstate:zlib-native:x86_64-linux:1.2.11:r0:x86_64:3:", H,
     "populate_sysroot", ".tgz", ".siginfo"),
    ("dunfell-truncated", _trunc(LONG_SPEC_DUNFELL, H, "package_write_rpm", ext=".tgz"),
     "", "hhhh", _trunc(LONG_SPEC_DUNFELL, H, "package_write_rpm", ext=".tgz").split("/")[2][:-len(
         H + "_package_write_rpm.tgz")], H, "package_write_rpm", ".tgz", ""),
    # 4.0 kirkstone: .tar.zst
    ("kirkstone", f"{H[:2]}/{H[2:4]}/sstate:busybox:cortexa57-poky-linux:1.35.0:r0:cortexa57:10:{H}"
     "_package.tar.zst",
     "", "hhhh", "sstate:busybox:cortexa57-poky-linux:1.35.0:r0:cortexa57:10:", H, "package",
     ".tar.zst", ""),
    # current (SSTATE_VERSION 14)
    ("current", f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}"
     "_populate_sysroot.tar.zst",
     "", "hhhh", "sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:", H, "populate_sysroot",
     ".tar.zst", ""),
    ("current-universal", f"universal/{H[:2]}/{H[2:4]}/sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:"
     f"{H}_populate_sysroot.tar.zst",
     "universal/", "hhhh", "sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:", H,
     "populate_sysroot", ".tar.zst", ""),
    ("current-distro-id", f"ubuntu-24.04/{H[:2]}/{H[2:4]}/sstate:cmake-native:x86_64-linux:3.31.5:r0:x86_64:14:"
     f"{H}_populate_sysroot.tar.zst",
     "ubuntu-24.04/", "hhhh", "sstate:cmake-native:x86_64-linux:3.31.5:r0:x86_64:14:", H,
     "populate_sysroot", ".tar.zst", ""),
    ("current-universal-4.8", f"universal-4.8/{H[:2]}/{H[2:4]}/sstate:gcc-cross-x86_64:x86_64-linux:14.2.0:r0:"
     f"x86_64:14:{H}_populate_sysroot.tar.zst",
     "universal-4.8/", "hhhh", "sstate:gcc-cross-x86_64:x86_64-linux:14.2.0:r0:x86_64:14:", H,
     "populate_sysroot", ".tar.zst", ""),
    ("current-multilevel-extrapath", f"fleet/a/universal/{H[:2]}/{H[2:4]}/sstate:m4-native:x86_64-linux:"
     f"1.4.19:r0:x86_64:14:{H}_populate_sysroot.tar.zst",
     "fleet/a/universal/", "hhhh", "sstate:m4-native:x86_64-linux:1.4.19:r0:x86_64:14:", H,
     "populate_sysroot", ".tar.zst", ""),
    ("current-swspec-lic", f"{H[:2]}/{H[2:4]}/sstate:zlib::1.3.1:r0::14:{H}_populate_lic.tar.zst",
     "", "hhhh", "sstate:zlib::1.3.1:r0::14:", H, "populate_lic", ".tar.zst", ""),
    ("current-nativesdk", f"{H[:2]}/{H[2:4]}/sstate:nativesdk-zlib:x86_64-nativesdk-pokysdk-linux:1.3.1:r0:"
     f"x86_64-nativesdk:14:{H}_package.tar.zst",
     "", "hhhh", "sstate:nativesdk-zlib:x86_64-nativesdk-pokysdk-linux:1.3.1:r0:x86_64-nativesdk:14:", H,
     "package", ".tar.zst", ""),
    ("current-allarch", f"{H[:2]}/{H[2:4]}/sstate:os-release:all-poky-linux:1.0:r0:allarch:14:{H}"
     "_package_write_rpm.tar.zst",
     "", "hhhh", "sstate:os-release:all-poky-linux:1.0:r0:allarch:14:", H, "package_write_rpm",
     ".tar.zst", ""),
    ("current-siginfo", f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}"
     "_populate_sysroot.tar.zst.siginfo",
     "", "hhhh", "sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:", H, "populate_sysroot",
     ".tar.zst", ".siginfo"),
    ("current-sig", f"universal/{H[:2]}/{H[2:4]}/sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:{H}"
     "_populate_sysroot.tar.zst.sig",
     "universal/", "hhhh", "sstate:zlib-native:x86_64-linux:1.3.1:r0:x86_64:14:", H,
     "populate_sysroot", ".tar.zst", ".sig"),
    ("current-invalid", "IN/VA/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:INVALID"
     "_populate_sysroot.tar.zst",
     "", "hhhh", "sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:", "INVALID",
     "populate_sysroot", ".tar.zst", ""),
    ("current-siginfo-only-task", _trunc(pkgspec("zlib", "core2-64-poky-linux", "1.3.1", "r0", "core2-64"),
                                         H, "compile", siginfo=True),
     "", "hhhh", "sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:", H, "compile", ".tar.zst",
     ".siginfo"),
    ("current-plus-underscore-pv", f"{H[:2]}/{H[2:4]}/sstate:gtk+3:core2-64-poky-linux:3.24.43+git_rc1:r0:"
     f"core2-64:14:{H}_deploy_source_date_epoch.tar.zst",
     "", "hhhh", "sstate:gtk+3:core2-64-poky-linux:3.24.43+git_rc1:r0:core2-64:14:", H,
     "deploy_source_date_epoch", ".tar.zst", ""),
    ("current-hexy-pv", f"{H[:2]}/{H[2:4]}/sstate:linux-yocto:qemux86_64-poky-linux:6.12+git{H2[:40]}:r0:"
     f"qemux86_64:14:{H}_deploy.tar.zst",
     "", "hhhh", f"sstate:linux-yocto:qemux86_64-poky-linux:6.12+git{H2[:40]}:r0:qemux86_64:14:", H,
     "deploy", ".tar.zst", ""),
    ("task-with-digits", f"{H[:2]}/{H[2:4]}/sstate:u-boot:raspberrypi5-poky-linux:2025.01:r0:raspberrypi5:14:"
     f"{H}_deploy_rpi5_fit2.tar.zst",
     "", "hhhh", "sstate:u-boot:raspberrypi5-poky-linux:2025.01:r0:raspberrypi5:14:", H,
     "deploy_rpi5_fit2", ".tar.zst", ""),
    ("hash-prefix-equals-dirs", f"3f/3f/sstate:zlib::1.3.1:r0::14:3f3f{H[4:]}_populate_lic.tar.zst",
     "", "hhhh", "sstate:zlib::1.3.1:r0::14:", "3f3f" + H[4:], "populate_lic", ".tar.zst", ""),
]
# truncated current names (object, its .siginfo, a siginfo-only non-sstate task)
_LONG_OBJ = _trunc(LONG_SPEC, H, "package_write_rpm")
_LONG_STEM = _LONG_OBJ.split("/")[2][: -len(H + "_package_write_rpm.tar.zst")]
_LONG_SIGONLY = _trunc(LONG_SPEC, H, "compile", siginfo=True)
NAMES += [
    ("current-truncated", _LONG_OBJ, "", "hhhh", _LONG_STEM, H, "package_write_rpm", ".tar.zst", ""),
    ("current-truncated-siginfo", _LONG_OBJ + ".siginfo", "", "hhhh", _LONG_STEM, H, "package_write_rpm",
     ".tar.zst", ".siginfo"),
    ("current-truncated-universal", "universal/" + _LONG_OBJ, "universal/", "hhhh", _LONG_STEM, H,
     "package_write_rpm", ".tar.zst", ""),
    ("current-truncated-siginfo-only", _LONG_SIGONLY, "", "hhhh",
     _LONG_SIGONLY.split("/")[2][: -len(H + "_compile.tar.zst.siginfo")], H, "compile", ".tar.zst",
     ".siginfo"),
]
NAME_IDS = [n[0] for n in NAMES]


@pytest.mark.parametrize("case", NAMES, ids=NAME_IDS)
def test_parse_fields(case):
    _id, key, dirpath, layout, stem, h, task, ext, companion = case
    n = parse(key)
    assert n == SstateName(dirpath, layout, stem, h, task, ext, companion)


@pytest.mark.parametrize("case", NAMES, ids=NAME_IDS)
def test_round_trip(case):
    key, companion = case[1], case[8]
    n = parse(key)
    assert n is not None
    assert n.key == key
    assert str(n) == key
    assert safe_key(key) == key  # every real name is a safe key as is
    assert n.object_key == key[: len(key) - len(companion)]
    assert n.is_companion == bool(companion)
    assert n.is_colon_form == n.stem.startswith("sstate:")
    assert parse(n.object_key) == n.companion_of("")


@pytest.mark.parametrize("case", NAMES, ids=NAME_IDS)
@pytest.mark.parametrize("new", [H2, M, "INVALID", "00" * 32], ids=["sha256", "md5", "INVALID", "zeros"])
def test_with_hash(case, new):
    n = parse(case[1])
    m = n.with_hash(new)
    assert m.hash == new
    assert dataclasses.replace(m, hash=n.hash) == n  # nothing else changed
    assert m.key == n.dirpath + dirs(new, n.layout) + n.stem + new + "_" + n.task + n.ext + n.companion
    if n.layout != "flat":
        assert m.key.startswith(n.dirpath + new[:2] + "/")
    assert parse(m.key) == m
    assert m.with_hash(n.hash) == n
    assert m.object_key == m.key[: len(m.key) - len(n.companion)]


@pytest.mark.parametrize("case", NAMES, ids=NAME_IDS)
def test_companion_of(case):
    n = parse(case[1])
    for comp in ("", ".siginfo", ".sig"):
        c = n.companion_of(comp)
        assert c.key == n.object_key + comp
        assert parse(c.key) == c
    with pytest.raises(ValueError):
        n.companion_of(".lock")


@pytest.mark.parametrize("bad", ["", "abc", H.upper(), "g" * 64, H[:31], "a" * 129, "invalid", H + "\n"])
def test_with_hash_rejects_non_hashes(bad):
    n = parse(NAMES[0][1])
    assert not is_valid_hash(bad)
    with pytest.raises(ValueError):
        n.with_hash(bad)


def test_valid_hashes():
    for h in (H, M, "INVALID", "0" * 128, "f" * 32):
        assert is_valid_hash(h)


# --- truncation ------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".tar.zst", ".tgz"])
@pytest.mark.parametrize("task", ["package_write_rpm", "populate_sysroot", "create_package_spdx"])
def test_truncated_names(ext, task):
    full = LONG_SPEC + H + "_" + task + ext
    assert len(full) > 246  # really needs truncation
    key = _trunc(LONG_SPEC, H, task, ext=ext)
    base = key.split("/")[2]
    assert len(base) <= 246 and len(base + ".siginfo") <= 254
    n = parse(key)
    assert (n.hash, n.task, n.ext, n.layout) == (H, task, ext, "hhhh")
    assert n.stem.split(":")[1] == "linux-yocto-custom-bsp-kernel"  # PN survives truncation
    assert n.stem.split(":")[5:7] == [LONG_TUNE, "14"]  # so do PKGARCH and VERSION
    # rewriting a truncated name gives exactly what bitbake computes for the other hash
    assert n.with_hash(H2).key == _trunc(LONG_SPEC, H2, task, ext=ext)
    assert n.with_hash(H2).companion_of(".siginfo").key == _trunc(LONG_SPEC, H2, task, ext=ext) + ".siginfo"


def test_truncation_random_specs_match_generate_sstatefn():
    rng = random.Random(7)
    for _ in range(500):
        pv = "1.0+git" + "x" * rng.randint(0, 250)
        spec = pkgspec("pn" + "p" * rng.randint(0, 40), "arch-poky-linux" + "y" * rng.randint(0, 60), pv,
                       "r" + "1" * rng.randint(1, 30), "pkgarch" + "z" * rng.randint(0, 40))
        task = rng.choice(["populate_sysroot", "package_write_rpm", "create_recipe_spdx", "fetch"])
        h = f"{rng.getrandbits(256):064x}"
        siginfo = rng.random() < 0.3
        key = _trunc(spec, h, task, siginfo=siginfo)
        n = parse(key)
        assert n is not None and n.key == key
        assert (n.hash, n.task, n.companion) == (h, task, ".siginfo" if siginfo else "")
        h2 = f"{rng.getrandbits(256):064x}"
        assert n.with_hash(h2).key == _trunc(spec, h2, task, siginfo=siginfo)


# --- non-sstate keys ---------------------------------------------------------------------------

_OBJ = NAMES[12][1]  # "current"
_BASE = _OBJ.split("/")[2]
NOT_SSTATE = [
    "index.html",
    "README",
    "3f/a1/README.txt",
    "universal/3f/notes.md",
    _OBJ + ".lock",
    _OBJ + ".tmp",
    _OBJ + ".done",
    _OBJ + ".siginfo.lock",
    _OBJ + ".siginfo.tmp",
    _OBJ + "9x2k_tmp",  # NamedTemporaryFile next to the object
    _OBJ + ".sig.asc",
    _OBJ[:-4] + ".gz",  # .tar.gz
    _OBJ.replace(".tar.zst", ".tar.xz"),
    _OBJ + "/extra",
    f"{H[2:4]}/{H[:2]}/{_BASE}",  # hh dirs swapped
    f"00/00/{_BASE}" if H[:2] != "00" else f"11/11/{_BASE}",  # hh dirs of another hash
    f"{H[:2]}/{H[2:4]}x/{_BASE}",
    f"x{H[:2]}/{H[2:4]}/{_BASE}",  # first hash dir glued to another name
    f"zz/{_BASE}",  # hh/ layout with a wrong dir
    f"{H[2:4]}/{_BASE}",  # hh/ layout with the second pair only
    f"universal/{_BASE}",  # EXTRAPATH but no hash dirs
    _BASE,  # colon name without directories (never produced)
    f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}.tar.zst",  # no task
    f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}_.tar.zst",  # empty task
    f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}_populate_sysroot",  # no ext
    f"{H[:2]}/{H[2:4]}/sstate:zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H.upper()}_package.tar.zst",
    f"{H[:2]}/{H[2:4]}/sstate:zlib::1.3.1:r0::14:{H[:31]}_populate_lic.tar.zst",  # 31 hex
    f"{H[:2]}/{H[2:4]}/sstate:zlib::1.3.1:r0::14:{H}{H}a_populate_lic.tar.zst",  # 129 hex
    f"{H[:2]}/{H[2:4]}/sstatex:zlib::1.3.1:r0::14:{H}_populate_lic.tar.zst",
    f"{H[:2]}/{H[2:4]}/sstate{H}_populate_lic.tar.zst",
    f"{H[:2]}/{H[2:4]}/sstate:zlib::1.3.1:r0::14:{H}_populate-lic.tar.zst",  # '-' in task
    f"{H[:2]}/{H[2:4]}/zlib:core2-64-poky-linux:1.3.1:r0:core2-64:14:{H}_package.tar.zst",  # no 'sstate'
    "IN/VA/sstate:zlib::1.3.1:r0::14:INVALIDX_populate_lic.tar.zst",
    "in/va/sstate:zlib::1.3.1:r0::14:INVALID_populate_lic.tar.zst",
    f"{H[:2]}/{H[2:4]}/",
    "%2e%2e/x",  # literal name after one decode: safe, but not sstate
]


@pytest.mark.parametrize("key", NOT_SSTATE, ids=range(len(NOT_SSTATE)))
def test_not_sstate(key):
    assert parse(key) is None


# --- safe_key ----------------------------------------------------------------------------------

_CUR = NAMES[12][1]
_K1024 = "/".join(["x" * 255] * 3 + ["y" * 200, "z" * 55])
assert len(_K1024) == 1024
_ENC = _CUR.replace(":", "%3A")
SAFE = [
    ("plain", _CUR, _CUR),
    ("colon-encoded", _ENC, _CUR),
    ("colon-encoded-lowercase", _CUR.replace(":", "%3a"), _CUR),
    ("plus-encoded", "universal/ab/cd/sstate%3Aglibc%3Ax86_64-linux%3A2.41%2Bgit%3Ar0%3Ax86_64%3A14%3A"
     + "ab" * 32 + "_populate_sysroot.tar.zst",
     "universal/ab/cd/sstate:glibc:x86_64-linux:2.41+git:r0:x86_64:14:" + "ab" * 32 + "_populate_sysroot.tar.zst"),
    ("plus-literal-kept", "gtk+3/a+b", "gtk+3/a+b"),
    ("plus-mixed", "a+b%2Bc", "a+b+c"),
    ("space-encoded", "a%20b", "a b"),
    ("double-encoded-dotdot-literal", "%252e%252e/x", "%2e%2e/x"),
    ("double-encoded-slash-literal", "a%252Fb", "a%2Fb"),
    ("stray-percent", "a%zz/b%", "a%zz/b%"),
    ("utf8", "caf%C3%A9/x", "café/x"),
    ("raw-nonascii", "café/x", "café/x"),
    ("encoded-slash-splits", "a%2Fb", "a/b"),
    ("dots-in-names", "...a/.b/a..b/..../.siginfo", "...a/.b/a..b/..../.siginfo"),
    ("tilde", "~x/y", "~x/y"),
    ("segment-255", "a/" + "x" * 255, "a/" + "x" * 255),
    ("key-1024", _K1024, _K1024),
    ("segment-255-bytes-utf8", "é" * 127 + "x", "é" * 127 + "x"),
]


@pytest.mark.parametrize("raw,expected", [s[1:] for s in SAFE], ids=[s[0] for s in SAFE])
def test_safe_key_ok(raw, expected):
    assert safe_key(raw) == expected


def test_safe_key_encoded_names_parse():
    for case in NAMES:
        key = case[1]
        enc = key.replace("%", "%25").replace(":", "%3A").replace("+", "%2B")
        assert safe_key(enc) == key
        assert parse(safe_key(enc)).key == key


BAD = [
    ("empty", ""),
    ("slash", "/"),
    ("absolute", "/etc/passwd"),
    ("absolute-encoded", "%2Fetc%2Fpasswd"),
    ("absolute-encoded-lower", "%2fetc/passwd"),
    ("dotdot", ".."),
    ("dotdot-prefix", "../etc/passwd"),
    ("dotdot-middle", "a/../b"),
    ("dotdot-end", "a/.."),
    ("dot", "."),
    ("dot-prefix", "./a"),
    ("dot-middle", "a/./b"),
    ("enc-dotdot", "a/%2e%2e/etc/passwd"),
    ("enc-dotdot-first", "%2e%2e/etc/passwd"),
    ("enc-dotdot-upper", "%2E%2E/etc/passwd"),
    ("enc-dotdot-mixed", "%2e./etc/passwd"),
    ("enc-dotdot-mixed2", ".%2E/etc/passwd"),
    ("enc-dot", "a/%2e/b"),
    ("enc-dotdot-encslash", "a%2F..%2F..%2Fetc%2Fpasswd"),
    ("enc-traversal-deep", "universal/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
    ("double-slash", "a//b"),
    ("double-slash-encoded", "a%2F%2Fb"),
    ("trailing-slash", "a/"),
    ("trailing-slash-encoded", "a%2F"),
    ("nul", "a%00b"),
    ("nul-raw", "a\x00b"),
    ("backslash", "a%5Cb"),
    ("backslash-raw", "a\\b"),
    ("backslash-traversal", "..%5C..%5Cwindows"),
    ("backslash-traversal-lower", "x/..%5cetc"),
    ("newline", "a%0Ab"),
    ("cr", "a%0db"),
    ("tab-raw", "a\tb"),
    ("ctrl-1f", "a%1Fb"),
    ("del", "a%7Fb"),
    ("del-raw", "a\x7fb"),
    ("invalid-utf8-ff", "%ff"),
    ("invalid-utf8-FF-in-name", "3f/a1/sstate%3A%FF.tar.zst"),
    ("invalid-utf8-truncated", "caf%C3"),
    ("invalid-utf8-overlong", "%C0%AE%C0%AE/etc/passwd"),
    ("invalid-utf8-surrogate", "%ED%A0%80"),
    ("lone-surrogate-raw", "a\udcffb"),
    ("segment-256", "a/" + "x" * 256),
    ("segment-256-encoded", "a/" + "%78" * 256),
    ("segment-256-bytes-utf8", "é" * 128),
    ("segment-256-bytes-utf8-encoded", "%C3%A9" * 128),
    ("key-1025", _K1024 + "z"),
    ("key-huge", "a/" * 2000 + "b"),
]


@pytest.mark.parametrize("raw", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_safe_key_bad(raw):
    with pytest.raises(BadPath) as ei:
        safe_key(raw)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    assert isinstance(ei.value, ValueError)


# --- tests.corpus ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n=150, seed=5, equiv_fraction=0.3)


def test_corpus_files_exist_and_parse(corpus):
    assert len(corpus.objects) == 150
    assert corpus.companions and corpus.siginfo_only and corpus.absent and corpus.truncated and corpus.legacy
    for key in corpus.files:
        assert (corpus.root / key).is_file()
        assert corpus.sizes[key] == (corpus.root / key).stat().st_size > 0
        n = parse(safe_key(key))
        assert n is not None and n.key == key, key
    for key in corpus.objects:
        assert not parse(key).is_companion
    for key in corpus.companions:
        assert parse(key).object_key in corpus.sizes
    for key in corpus.absent:
        assert parse(key) is not None and not (corpus.root / key).exists()
    layouts = {(parse(k).layout, parse(k).ext) for k in corpus.objects}
    assert {("flat", ".tgz"), ("hh", ".tgz"), ("hhhh", ".tgz"), ("hhhh", ".tar.zst")} <= layouts
    assert any(parse(k).dirpath == "universal/" for k in corpus.objects)
    assert any(parse(k).task == "populate_lic" and "::" in parse(k).stem for k in corpus.objects)
    for key in corpus.truncated:
        assert len(key.rsplit("/", 1)[1]) <= 246


def test_corpus_equivalences(corpus):
    assert corpus.equivalences
    assert len(corpus.equivalences) == len(corpus.details)
    assert set(corpus.objects).isdisjoint(corpus.absent)
    for (th_key, uni_key, method), d in zip(corpus.equivalences, corpus.details, strict=True):
        assert method == HASHEQUIV_METHOD == d.method
        assert not (corpus.root / th_key).exists()
        assert th_key not in corpus.absent
        assert uni_key in corpus.objects and (corpus.root / uni_key).is_file()
        assert (corpus.root / (uni_key + ".siginfo")).is_file()
        th, uni = parse(th_key), parse(uni_key)
        assert (th.hash, uni.hash) == (d.taskhash, d.unihash)
        assert th.with_hash(d.unihash) == uni  # the proxy's rewrite
        assert len(d.outhash) == 64 and is_valid_hash(d.outhash)
    assert corpus.unihash_map()[(HASHEQUIV_METHOD, corpus.details[0].taskhash)] == corpus.details[0].unihash


def test_corpus_contents(corpus):
    zstandard = pytest.importorskip("zstandard")
    for key in corpus.objects[:40] + corpus.companions[:40]:
        data = corpus.read(key)
        if key.endswith(".tar.zst"):
            assert data[:4] == b"\x50\x2a\x4d\x18" and data[12:16] == b"\x28\xb5\x2f\xfd"
            assert zstandard.ZstdDecompressor().decompressobj().decompress(data[12:])
        elif key.endswith(".siginfo"):
            assert zstandard.ZstdDecompressor().decompressobj().decompress(data).startswith(b"{")
        elif key.endswith(".tgz"):
            assert data[:2] == b"\x1f\x8b"
    sizes = [corpus.sizes[k] for k in corpus.objects]
    assert min(sizes) < 1000 and max(sizes) > 1 << 20


def test_corpus_is_deterministic(tmp_path):
    a = make_corpus(tmp_path / "a", n=40, seed=9)
    b = make_corpus(tmp_path / "b", n=40, seed=9)
    c = make_corpus(tmp_path / "c", n=40, seed=10)
    assert a.objects == b.objects and a.equivalences == b.equivalences and a.absent == b.absent
    assert a.mtimes == b.mtimes
    assert all(a.read(k) == b.read(k) for k in a.files)
    assert a.objects != c.objects


def _reference_safe_key(raw: str) -> str:
    """Slow, obviously-correct model of safe_key (the spec in words)."""
    from urllib.parse import unquote

    key = unquote(raw, errors="strict")  # UnicodeDecodeError -> bad
    key.encode("utf-8")  # UnicodeEncodeError -> bad
    if not key or key.startswith("/") or len(key.encode()) > 1024:
        raise ValueError
    for seg in key.split("/"):
        if seg in ("", ".", "..") or len(seg.encode()) > 255:
            raise ValueError
        if any(ch == "\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in seg):
            raise ValueError
    return key


def test_safe_key_matches_reference_model():
    rng = random.Random(11)
    atoms = ["a", "b", "/", ".", "..", "%", "2", "e", "E", "3", "A", "B", "f", "F", "0", "5", "C", "%3A",
             "%3a", "%2B", "%2b", "%2e", "%2E", "%2F", "%2f", "%25", "%00", "%5C", "%ff", "%C3%A9", "é",
             "\\", "+", ":", "%7F", "%1f", " ", "x" * 100, "y" * 200]
    for _ in range(30000):
        raw = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        try:
            expected = _reference_safe_key(raw)
        except (ValueError, UnicodeError):
            expected = None
        try:
            got = safe_key(raw)
        except BadPath:
            got = None
        assert got == expected, raw
