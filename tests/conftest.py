"""Shared fixtures: every test starts and stops what it needs itself."""

from __future__ import annotations

import pytest

from tests.service import Service


@pytest.fixture
def service_factory(tmp_path):
    started: list[Service] = []

    def make(name: str = "svc", **kwargs) -> Service:
        svc = Service(tmp_path / name, **kwargs)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


# The throwaway PostgreSQL cluster (session) and a fresh database per test (tests/pg.py).
from tests.pg import pg_cluster, pg_url  # noqa: E402, F401
