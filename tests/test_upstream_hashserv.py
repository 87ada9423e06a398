"""The legacy-builder case: a builder asks for an object by a taskhash only the upstream hashserv
knows; sstate-proxy learns its unihash there and answers with the upstream mirror's object of
that unihash. Two sstate-proxy instances stand in for the public mirror and the public hashserv."""

from __future__ import annotations

import time
from urllib.parse import quote

from tests.bbfetch import BitbakeMirrorClient
from tests.corpus import make_corpus
from tests.test_rewrite import call, report


def test_taskhash_known_only_upstream_is_answered_with_the_upstream_unihash_object(service_factory, tmp_path):
    public_mirror = service_factory("public-mirror")
    corpus = make_corpus(public_mirror.storage, n=30, seed=31, equiv_fraction=0.5)
    public_mirror.start()
    public_hashserv = service_factory("public-hashserv", args=["--anon-perms", "@read,@report"]).start()
    d = corpus.details[0]
    other = next(e for e in corpus.details if e.unihash != d.unihash)
    for e in (d, other):
        report(public_hashserv, e.unihash, e.outhash, e.unihash, method=e.method)  # the first builder
        assert report(public_hashserv, e.taskhash, e.outhash, e.taskhash, method=e.method)["unihash"] == e.unihash
    site = service_factory("site", config={
        "upstream": {"mirrors": [public_mirror.url], "timeout_s": 5.0},
        "hashserv": {"upstream": f"ws://127.0.0.1:{public_hashserv.port}/ws"},
    }).start()

    # bitbake without hash equivalence asks for its own taskhash's name: HEAD, then wget GET, for
    # the object and its .siginfo
    bb = BitbakeMirrorClient(site.url, tmp_path / "bitbake")
    try:
        assert bb.download(d.taskhash_key) == corpus.read(d.unihash_key)
        assert bb.download(d.taskhash_key + ".siginfo") == corpus.read(d.unihash_key + ".siginfo")
    finally:
        bb.cleanup()
    # the answer says what it is; the object is kept under its own (unihash) name
    resp, body = call(site, "GET", "/" + quote(other.taskhash_key))
    assert resp.status == 200 and body == corpus.read(other.unihash_key)
    assert resp.getheader("X-Sstate-Source") == "upstream"
    assert resp.getheader("X-Sstate-Served-Hash") == other.unihash
    deadline = time.monotonic() + 5  # stored just after the last byte went out
    while not (site.storage / other.unihash_key).is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (site.storage / other.unihash_key).is_file() and not (site.storage / other.taskhash_key).exists()
    # the mapping was learnt (stored locally): the next request is a local rewrite
    resp, body = call(site, "GET", "/" + quote(d.taskhash_key))
    assert resp.status == 200 and body == corpus.read(d.unihash_key)
    assert resp.getheader("X-Sstate-Source") == "equivalent"
    # a taskhash nobody knows, under a name the mirror lacks: a miss
    unknown = next(e for e in corpus.details if e.unihash not in (d.unihash, other.unihash))
    resp, _ = call(site, "HEAD", "/" + quote(unknown.taskhash_key))
    assert resp.status == 404
    t0 = time.monotonic()
    site.stop()  # (the downstream first: it holds a websocket to the public hashserv)
    assert time.monotonic() - t0 < 5
