"""Prometheus metrics of /metrics: what every face did, counted where it happens.

With ``--workers N`` every worker counts its own traffic, and a scrape is answered by whichever
worker the kernel hands the connection to. So the counts live in prometheus-client's
multiprocess mode: ``sstate-proxy serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
private directory before any worker starts (proxy/cli.py), each process writes its values to
memory-mapped files there, and a scrape merges the files of every worker, live or dead, into one
set of totals. No sample carries a process label. Without that variable (tests that build one
app in-process) the counts are this process's own.

The hot path uses label children looked up once and kept in dicts (``labels()`` costs more than
the increment itself).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from proxy.traffic import TrafficRecorder

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Faces of the latency histogram: object GET/HEAD, object PUT/DELETE, /v1/equivalent, one
# OEHASHEQUIV message (any transport; stream-mode lines have their own counters), and
# everything else on HTTP (/metrics, /ui/, /healthz, /readyz, a websocket upgrade's refusal).
FACES = ("object", "upload", "equivalent", "hashserv", "operations")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.objects = Counter(
            "sstate_proxy_object_requests", "Requests for objects (GET, HEAD, PUT, DELETE) by method, "
            "HTTP status and source (hit, equivalent, upstream, miss, upload, delete; none when "
            "refused before the object was looked up)",
            ["method", "status", "source"], registry=reg)
        self.bytes_sent = Counter(
            "sstate_proxy_object_bytes_sent", "Object body bytes written to clients (the access "
            "log's byte counts of object GETs)", registry=reg)
        self.uploads = Counter("sstate_proxy_uploads", "Object uploads by outcome", ["outcome"], registry=reg)
        self.equiv_requests = Counter(
            "sstate_proxy_equivalence_requests", "Requests of the HTTP equivalence API "
            "(/v1/equivalent; face is http) by message (get, report)",
            ["face", "message"], registry=reg)
        self.hashserv_messages = Counter(
            "sstate_proxy_hashserv_messages", "OEHASHEQUIV messages by type and transport "
            "(ws, tcp, unix); a stream mode (get-stream, ...) counts once here",
            ["message", "transport"], registry=reg)
        self.hashserv_lines = Counter(
            "sstate_proxy_hashserv_stream_lines", "Lines read in OEHASHEQUIV stream modes (the "
            "closing END included, as get-stats counts them) by mode and transport",
            ["message", "transport"], registry=reg)
        # Stream lines are the bulk of the hashserv load and cost a few microseconds each: their
        # time is summed (added per written batch), not put in the histogram line by line.
        self.hashserv_line_seconds = Counter(
            "sstate_proxy_hashserv_stream_seconds", "Time spent answering the lines of OEHASHEQUIV "
            "stream modes (divide by the lines for the mean), by mode and transport",
            ["message", "transport"], registry=reg)
        self.upstream_fetches = Counter(
            "sstate_proxy_upstream_fetches", "Objects asked of the upstream mirrors, by result "
            "(fetched, missing, error)", ["result"], registry=reg)
        self.upstream_evicted_objects = Counter(
            "sstate_proxy_upstream_cache_evicted_objects", "Pulled objects evicted to keep "
            "[upstream] cache_max_bytes (least recently used first)", registry=reg)
        self.upstream_evicted_bytes = Counter(
            "sstate_proxy_upstream_cache_evicted_bytes", "Bytes of the pulled objects evicted to "
            "keep [upstream] cache_max_bytes", registry=reg)
        self.gc_objects = Counter(
            "sstate_proxy_gc_removed_objects", "Objects removed by retention (gc)", registry=reg)
        self.gc_bytes = Counter(
            "sstate_proxy_gc_removed_bytes", "Bytes of the objects removed by retention (gc)", registry=reg)
        self.latency = Histogram(
            "sstate_proxy_request_seconds", "Time to answer one request, by face (object, upload, "
            "equivalent, hashserv: one message, operations)",
            ["face"], buckets=LATENCY_BUCKETS, registry=reg)
        # Cached label children (the hot path).
        self._objects: dict[tuple[str, int, str], Counter] = {}
        self._messages: dict[tuple[str, str], Counter] = {}
        self._lines: dict[tuple[str, str], Counter] = {}
        self._line_seconds: dict[tuple[str, str], Counter] = {}
        self._latency = {face: self.latency.labels(face) for face in FACES}
        # The traffic history (set once the database is open): reports counted here, on every face.
        self.traffic: TrafficRecorder | None = None

    # --- counting ----------------------------------------------------------------------------
    @staticmethod
    def _child(cache: dict, metric: Counter, key: tuple) -> Counter:
        """The child of ``metric`` labelled ``key`` (looked up once, then kept in ``cache``)."""
        child = cache.get(key)
        if child is None:
            child = cache[key] = metric.labels(*key)
        return child

    def object_request(self, method: str, status: int, source: str) -> None:
        self._child(self._objects, self.objects, (method, status, source)).inc()

    def sent(self, nbytes: int) -> None:
        if nbytes:
            self.bytes_sent.inc(nbytes)

    def upload(self, outcome: str) -> None:
        self.uploads.labels(outcome).inc()

    def equivalence(self, face: str, message: str) -> None:
        self.equiv_requests.labels(face, message).inc()
        if message == "report" and self.traffic is not None:
            self.traffic.record("report")

    def hashserv_message(self, message: str, transport: str) -> None:
        self._child(self._messages, self.hashserv_messages, (message, transport)).inc()
        if message == "report" and self.traffic is not None:
            self.traffic.record("report")

    def hashserv_stream_counters(self, message: str, transport: str) -> tuple[Counter, Counter]:
        """The (lines, seconds) counter children of one stream mode (a stream loop keeps them)."""
        key = (message, transport)
        return (self._child(self._lines, self.hashserv_lines, key),
                self._child(self._line_seconds, self.hashserv_line_seconds, key))

    def upstream_fetch(self, result: str) -> None:
        """One object asked of the upstream mirrors: ``fetched``, ``missing`` or ``error``."""
        self.upstream_fetches.labels(result).inc()

    def upstream_cache_evicted(self, objects: int, nbytes: int) -> None:
        """The bound of pulled objects evicted ``objects`` objects holding ``nbytes`` bytes."""
        if objects:
            self.upstream_evicted_objects.inc(objects)
        if nbytes:
            self.upstream_evicted_bytes.inc(nbytes)

    def gc_removed(self, objects: int, nbytes: int) -> None:
        """Retention removed ``objects`` objects holding ``nbytes`` bytes."""
        if objects:
            self.gc_objects.inc(objects)
        if nbytes:
            self.gc_bytes.inc(nbytes)

    def observe(self, face: str, seconds: float) -> None:
        self._latency[face].observe(seconds)

    def latency_of(self, face: str) -> Histogram:
        """The histogram child of one face (a loop that observes many times keeps it)."""
        return self._latency[face]

    # --- exposition --------------------------------------------------------------------------
    def render(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        # Every process's files, merged (a fresh registry per scrape, as the library documents).
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)
