"""Scripted object traffic with known answers, for the metrics and dashboard tests.

``seed(storage)`` writes a few objects straight into a local store (before the service starts);
``Script.run(port)`` reports one equivalence over /v1/equivalent, then sends hits, equivalents
and misses (GET and HEAD), each on a connection of its own (so ``--workers N`` spreads them),
checking every answer; its counts say what the service must have seen.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from dataclasses import dataclass, field
from pathlib import Path

METHOD = "oe.sstatesig.OEOuthashBasic"


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def object_key(pn: str, hash_: str, task: str = "populate_sysroot") -> str:
    return f"{hash_[:2]}/{hash_[2:4]}/sstate:{pn}:core2-64-poky-linux:1.0:r0:core2-64:14:{hash_}_{task}.tar.zst"


def basic(user: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# (recipe, hash tag, size) of the objects stored before the service starts
STORED = (("zlib", "zlib-1", 1000), ("busybox", "busybox-1", 2000), ("curl", "curl-unihash", 3000))


def seed(storage: Path) -> None:
    for pn, tag, size in STORED:
        path = storage / object_key(pn, h(tag))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([len(pn)]) * size)


@dataclass
class Script:
    """Hits, equivalents and misses (each answer checked); the counts it leaves behind."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, source) -> n
    bytes: dict[str, int] = field(default_factory=dict)  # source -> body bytes
    misses: dict[str, int] = field(default_factory=dict)  # recipe -> misses
    reports: int = 0

    def _object(self, port: int, method: str, key: str, want: str, size: int = 0) -> None:
        status, headers, body = call(port, method, "/" + key)
        if want == "miss":
            assert status == 404, (key, status)
        else:
            assert status == 200 and headers.get("X-Sstate-Source") == want, (key, status, headers)
            assert len(body) == (size if method == "GET" else 0)
        self.requests[(method, want)] = self.requests.get((method, want), 0) + 1
        self.bytes[want] = self.bytes.get(want, 0) + (size if method == "GET" else 0)

    def count(self, source: str) -> int:
        return sum(n for (_, s), n in self.requests.items() if s == source)

    def run(self, port: int, auth: dict[str, str]) -> None:
        # curl's taskhash is equivalent to the unihash whose object is stored
        taskhash = h("curl-taskhash")
        report = {"taskhash": taskhash, "method": METHOD, "outhash": h("curl-out"),
                  "unihash": h("curl-unihash"), "owner": "ci"}
        status, _, body = call(port, "POST", "/v1/equivalent", json.dumps(report).encode(),
                               {"Content-Type": "application/json", **auth})
        assert status == 200 and json.loads(body)["unihash"] == h("curl-unihash"), body
        self.reports += 1
        zlib, busybox, _ = (object_key(pn, h(tag)) for pn, tag, _ in STORED)
        for _ in range(3):
            self._object(port, "GET", zlib, "hit", 1000)
        self._object(port, "HEAD", busybox, "hit")
        for _ in range(2):
            self._object(port, "GET", object_key("curl", taskhash), "equivalent", 3000)
        self._object(port, "HEAD", object_key("curl", taskhash), "equivalent")
        for recipe, n in (("busybox", 3), ("openssl", 2), ("zlib", 1)):
            for i in range(n):
                self._object(port, "HEAD", object_key(recipe, h(f"{recipe}-missing-{i}")), "miss")
            self.misses[recipe] = n
