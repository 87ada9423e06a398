"""Counters of what the mirror and the equivalence faces did, exported for Prometheus.

One registry per process (each worker counts its own requests; Prometheus sums the scrapes or
the ``pid`` label tells them apart).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy import busypoll

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
            "sstate_proxy_object_bytes_sent", "Object bytes sent (GET bodies)", ["pid"],
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
        self.registry.register(_BusyPollCollector(pid))

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


class _BusyPollCollector:
    """The event loop's busy-polling counters (proxy/busypoll.py), read when scraped: the loop
    counts in plain attributes, as a Prometheus counter per poll would cost more than a poll."""

    def __init__(self, pid: str) -> None:
        self._pid = pid

    def describe(self) -> list:
        return []  # unchecked collector: names may appear only once the loop polls

    def collect(self):
        stats = busypoll.current_stats()
        if stats is None:
            return
        polls = CounterMetricFamily(
            "sstate_proxy_busy_polls", "Times a worker polled before sleeping, by outcome "
            "(hit: work arrived while polling, so no sleep and wake-up; yielded: stopped because "
            "another task wanted the CPU)", labels=["outcome", "pid"])
        polls.add_metric(["hit", self._pid], stats.hits)
        polls.add_metric(["yielded", self._pid], stats.preempted)
        polls.add_metric(["miss", self._pid], stats.polls - stats.hits - stats.preempted)
        yield polls
        seconds = CounterMetricFamily(
            "sstate_proxy_busy_poll_seconds", "CPU time workers spent polling before sleeping",
            labels=["pid"])
        seconds.add_metric([self._pid], stats.seconds)
        yield seconds
