"""Counters of what the mirror and the equivalence faces did, exported for Prometheus.

One registry per process (each worker counts its own requests; Prometheus sums the scrapes or
the ``pid`` label tells them apart).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SOURCES = ("hit", "equivalent", "upstream", "miss")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        pid = str(os.getpid())
        self.objects = Counter(
            "sstate_proxy_object_requests", "Object GET/HEAD requests by how they were answered",
            ["method", "source", "pid"], registry=self.registry,
        )
        self.bytes_sent = Counter(
            "sstate_proxy_object_bytes_sent", "Object body bytes written to clients (the access log's byte counts of object GETs)", ["pid"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "sstate_proxy_uploads", "Object uploads by outcome", ["outcome", "pid"], registry=self.registry
        )
        self.equiv_requests = Counter(
            "sstate_proxy_equivalence_requests", "Equivalence requests by face and message",
            ["face", "message", "pid"], registry=self.registry,
        )
        self.latency = Histogram(
            "sstate_proxy_request_seconds", "HTTP request latency", ["kind", "pid"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        self._pid = pid
        # plain counters for the hot path; Prometheus counters are children cached here
        self._obj_children: dict[tuple[str, str], Counter] = {}
        self._bytes_sent = self.bytes_sent.labels(pid)

    def object_request(self, method: str, source: str) -> None:
        child = self._obj_children.get((method, source))
        if child is None:
            child = self._obj_children[(method, source)] = self.objects.labels(method, source, self._pid)
        child.inc()

    def sent(self, nbytes: int) -> None:
        if nbytes:
            self._bytes_sent.inc(nbytes)

    def upload(self, outcome: str) -> None:
        self.uploads.labels(outcome, self._pid).inc()

    def equivalence(self, face: str, message: str) -> None:
        self.equiv_requests.labels(face, message, self._pid).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
