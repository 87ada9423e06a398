"""/readyz answers 503 with one line while the store (or the database) is unreachable, within
about two seconds even when a backend hangs, and 200 again when it is back; /healthz is about
the process only. (PostgreSQL down is in tests/test_deploy.py.)"""

from __future__ import annotations

import http.client
import shutil
import time

import pytest

from tests.s3server import TEST_ENV, MotoServer
from tests.service import Service


def get(svc: Service, path: str) -> tuple[int, str, dict, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders()), time.monotonic() - t0
    finally:
        conn.close()


def wait_status(svc: Service, status: int, timeout: float = 15.0) -> tuple[int, str, dict, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = get(svc, "/readyz")
        if got[0] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def assert_not_ready(got, word: str) -> None:
    status, text, headers, took = got
    assert status == 503, text
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert word in text
    assert headers.get("Retry-After")
    assert took < 2.5, took


def test_local_store_gone(service_factory):
    svc = service_factory().start()
    assert get(svc, "/readyz")[:2] == (200, "ready\n")
    shutil.rmtree(svc.storage)
    assert_not_ready(get(svc, "/readyz"), "storage")
    assert get(svc, "/healthz")[0] == 200
    svc.storage.mkdir()
    assert wait_status(svc, 200)[0] == 200


@pytest.fixture
def moto():
    server = MotoServer()
    server.start()
    server.create_bucket("sstate")
    yield server
    server.close()


def test_s3_down_and_hung(service_factory, moto):
    svc = service_factory(env=TEST_ENV, config={
        "storage": {"backend": "s3"},
        "storage.s3": {"bucket": "sstate", "prefix": "p", "endpoint_url": moto.endpoint_url,
                       "region": "us-east-1", "timeout_s": 5.0},
        "server": {"workers": 2},
    }).start()
    assert wait_status(svc, 200)[0] == 200
    moto.stop()  # connections refused
    for _ in range(3):  # every worker
        assert_not_ready(get(svc, "/readyz"), "storage")
    assert get(svc, "/healthz")[0] == 200
    moto.start()
    assert wait_status(svc, 200)[0] == 200
    moto.pause()  # connections accepted, never answered: the probe's own timeout answers
    try:
        for _ in range(3):
            assert_not_ready(get(svc, "/readyz"), "storage")
        assert get(svc, "/healthz")[0] == 200
    finally:
        moto.resume()
    assert wait_status(svc, 200)[0] == 200
