"""The parts one worker process runs, built once at start-up and shared by every handler."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.access import AccessRecorder
from proxy.auth import Auth
from proxy.dashboard import Dashboard
from proxy.equiv_api import EquivalenceAPI
from proxy.hashserv.service import HashservService
from proxy.metrics import Metrics
from proxy.mirror import Mirror
from proxy.reports import Reporter
from proxy.resolver import Resolver
from proxy.retention import Scheduler
from proxy.traffic import TrafficRecorder
from proxy.uploads import Uploads
from proxy.upstream import UpstreamMirrors
from storage import ObjectStore
from storage.equivalence import EquivalenceDB


@dataclass
class Services:
    store: ObjectStore
    db: EquivalenceDB
    auth: Auth
    resolver: Resolver
    reporter: Reporter
    hashserv: HashservService
    mirror: Mirror
    uploads: Uploads
    equiv: EquivalenceAPI
    metrics: Metrics
    traffic: TrafficRecorder
    dashboard: Dashboard
    access: AccessRecorder
    upstream: UpstreamMirrors | None = None  # [upstream] mirrors
    retention: Scheduler | None = None  # the scheduled gc, in the one worker that runs it


SERVICES = web.AppKey("services", Services)
