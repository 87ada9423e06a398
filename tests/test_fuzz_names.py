"""Property tests (hypothesis) of object names and request paths: ``safe_key`` never yields a key
that leaves the storage root, ``parse`` and the name's ``key`` are each other's inverse, and the
rewrite primitive ``with_hash`` changes only the hash and its directories."""

from __future__ import annotations

import os
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import names

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOT = "/srv/sstate-root"

# Path pieces a hostile client would try, mixed with arbitrary text.
_TRICKS = st.sampled_from(["..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2f", "%5c", "\\", "%00", "%252e%252e",
                           "/", "//", "%c0%ae", "%ff", "~", "sstate:x::1:r0::14:", "a%2f..%2fb"])
_SEGMENT = st.one_of(_TRICKS, st.text(max_size=20), st.text(alphabet="abc.%2e/\\:", max_size=12))
RAW_PATHS = st.one_of(st.text(max_size=300), st.lists(_SEGMENT, max_size=8).map("/".join))


def inside_root(key: str) -> bool:
    path = os.path.normpath(os.path.join(ROOT, key))
    return path.startswith(ROOT + os.sep)


@FUZZ
@given(RAW_PATHS)
def test_safe_key_never_leaves_the_root(raw):
    try:
        key = names.safe_key(raw)
    except names.BadPath as e:
        assert str(e)  # a one-line reason for the 400
        return
    assert inside_root(key), (raw, key)
    assert "\x00" not in key and "\\" not in key and not key.startswith("/")
    assert all(seg not in ("", ".", "..") for seg in key.split("/"))
    assert len(key.encode()) <= names.MAX_KEY_BYTES
    names.parse(key)  # any safe key parses or is "not an sstate name"; never raises


@FUZZ
@given(st.text(min_size=1, max_size=200))
def test_safe_key_decodes_exactly_once(key):
    """A key percent-encoded once by the client comes back as itself, "%" included; a key that is
    not safe is refused in any encoding."""
    try:
        names.safe_key(key.replace("%", "x"))  # the same checks, without decoding anything
    except names.BadPath:
        try:
            names.safe_key(quote(key, safe="/"))
        except names.BadPath:
            return
        raise AssertionError(f"{key!r} was refused as sent, accepted encoded") from None
    assert names.safe_key(quote(key, safe="/")) == key


_HEX = "0123456789abcdef"
HASHES = st.one_of(st.just("INVALID"), st.text(alphabet=_HEX, min_size=32, max_size=128))
_FIELD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789+._", max_size=12)


@st.composite
def sstate_names(draw) -> tuple[str, str, str, str, str, str, str]:
    """(dirpath, layout, stem, hash, task, ext, companion) as OE-core would write them."""
    colon = draw(st.booleans())
    sep = ":" if colon else "-"
    stem = "sstate" + sep + sep.join(draw(st.lists(_FIELD.filter(lambda f: sep not in f), min_size=1,
                                                  max_size=7))) + sep
    layout = draw(st.sampled_from(["flat", "hh", "hhhh"] if not colon else ["hh", "hhhh"]))
    extra = draw(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-.", min_size=3, max_size=12)
                          .filter(lambda s: s not in (".", "..") and s.strip(".")), max_size=2))
    dirpath = "".join(d + "/" for d in extra) if layout != "flat" else ""
    task = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20))
    return (dirpath, layout, stem, draw(HASHES), task, draw(st.sampled_from(names.EXTENSIONS)),
            draw(st.sampled_from(names.COMPANIONS)))


def build(dirpath: str, layout: str, stem: str, h: str, task: str, ext: str, comp: str) -> str:
    dirs = {"flat": "", "hh": h[:2] + "/", "hhhh": h[:2] + "/" + h[2:4] + "/"}[layout]
    return dirpath + dirs + stem + h + "_" + task + ext + comp


@FUZZ
@given(sstate_names(), HASHES)
def test_parse_and_build_round_trip(parts, other_hash):
    key = build(*parts)
    assert names.safe_key(quote(key, safe="/:")) == key
    name = names.parse(key)
    assert name is not None, key
    assert (name.dirpath, name.layout, name.stem, name.hash, name.task, name.ext, name.companion) == parts
    assert name.key == key and names.parse(name.key) == name
    assert name.object_key == key[: len(key) - len(parts[6])]
    moved = name.with_hash(other_hash)
    assert (moved.dirpath, moved.layout, moved.stem, moved.task, moved.ext, moved.companion) == \
        (name.dirpath, name.layout, name.stem, name.task, name.ext, name.companion)
    assert moved.hash == other_hash and names.parse(moved.key) == moved
    assert inside_root(moved.key)
    for comp in names.COMPANIONS:
        assert names.parse(name.companion_of(comp).key) == name.companion_of(comp)


@FUZZ
@given(st.text(max_size=200))
def test_parse_of_any_text_is_consistent(key):
    name = names.parse(key)
    if name is not None:
        assert name.key == key and names.is_valid_hash(name.hash)
