"""Adaptive busy polling (proxy/busypoll.py): an idle loop never polls, a loop whose requests
keep coming soon after it went to sleep polls and catches the next one awake, the window never
outlasts the loop's own timeout, and the real service reports what polling did on /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from proxy import busypoll
from proxy.busypoll import GROW_START, AdaptivePollSelector
from tests.hashserv_client import connect
from tests.service import REPO, free_port

MAX = 0.02  # a 20 ms maximum: wide enough for another thread's send to land in it


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    sel = AdaptivePollSelector(MAX)
    sel.register(a, 1)  # EVENT_READ
    yield sel, a, b
    sel.close()
    a.close()
    b.close()


def drain(a: socket.socket) -> None:
    a.setblocking(False)
    try:
        while a.recv(4096):
            pass
    except BlockingIOError:
        pass


def send_after(b: socket.socket, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), b.send(b"x")))
    t.start()
    return t


def test_an_idle_loop_never_polls(pair):
    sel, a, b = pair
    for _ in range(3):
        assert sel.select(0.02) == []  # timers only: nothing arrives
    assert sel.stats.polls == 0 and sel._window == 0


def test_requests_soon_after_sleeping_grow_the_window_until_they_are_caught_awake(pair, monkeypatch):
    # about growth only: on a busy machine a preempted poll would pause it (see the next test)
    monkeypatch.setattr(busypoll, "PREEMPTED", 1.0)
    sel, a, b = pair
    windows = []
    for _ in range(16):
        t = send_after(b, 0.001)  # 1 ms after the loop went to sleep, well under the maximum
        assert sel.select(1.0)
        t.join()
        drain(a)
        windows.append(sel._window)
    assert windows[0] == GROW_START and windows[1] == 2 * GROW_START  # doubling...
    assert sel.stats.hits >= 1  # ...until requests arrived while it was still polling
    assert 0.001 <= windows[-1] <= MAX  # the window that catches a 1 ms gap is kept
    assert sel.stats.seconds > 0


def test_polling_stops_for_a_while_when_another_task_wants_the_cpu(pair, monkeypatch):
    monkeypatch.setattr(busypoll, "CALM", 1.0)  # longer than the steps below can take
    sel, a, b = pair
    sel._window = MAX
    # another process that wants this thread's CPU: both pinned to one core
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
                            "print(flush=True)\nwhile True: pass"], stdout=subprocess.PIPE)
    try:
        hog.stdout.readline()  # pinned and spinning
        os.sched_setaffinity(0, {cpu})
        try:
            assert sel.select(0.005) == []
        finally:
            os.sched_setaffinity(0, saved)
    finally:
        hog.kill()
        hog.wait()
    assert sel.stats.preempted == 1 and sel._window == 0
    # short sleeps right after do not grow it back while the calm period lasts
    t = send_after(b, 0.001)
    assert sel.select(1.0)
    t.join()
    drain(a)
    assert sel._window == 0
    sel._calm_until = 0  # ...after it, they do
    t = send_after(b, 0.001)
    assert sel.select(1.0)
    t.join()
    assert sel._window == GROW_START


def test_long_sleeps_shrink_the_window_to_nothing(pair):
    sel, a, b = pair
    sel._window = MAX
    for _ in range(14):
        t = send_after(b, 2.5 * MAX)  # longer than the maximum: polling would not have caught it
        assert sel.select(1.0)
        t.join()
        drain(a)
    assert sel._window == 0
    polls = sel.stats.polls
    assert sel.select(0.01) == [] and sel.stats.polls == polls


def test_the_window_never_outlasts_the_loops_timeout(pair):
    sel, a, b = pair
    sel._max = sel._window = 0.5
    t0 = time.monotonic()
    assert sel.select(0.01) == []
    assert time.monotonic() - t0 < 0.25  # a timer due in 10 ms is not delayed by the 500 ms window
    assert sel.select(0) == []  # a zero timeout never polls
    assert sel.stats.polls == 1


def test_a_zero_setting_keeps_the_default_loop():
    loop = busypoll.loop_factory(0)()
    try:
        assert not isinstance(loop._selector, AdaptivePollSelector)  # type: ignore[attr-defined]
        assert busypoll.current_stats() is None
    finally:
        loop.close()
    loop = busypoll.loop_factory(200)()
    try:
        assert isinstance(loop._selector, AdaptivePollSelector)  # type: ignore[attr-defined]
        assert busypoll.current_stats() is loop._selector.stats  # type: ignore[attr-defined]
        assert loop.run_until_complete(asyncio.sleep(0.001, "ran")) == "ran"
    finally:
        loop.close()


def busy_poll_counts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(
        r'^sstate_proxy_busy_polls_total\{outcome="(\w+)",pid="\d+"\} (\S+)$', text, re.M)}


async def test_the_service_polls_under_sequential_load_and_says_so(service_factory):
    tcp = free_port()
    svc = service_factory(args=["--hashserv-bind", f"127.0.0.1:{tcp}", "--anon-perms", "@read,@report"])
    svc.start()
    client = await connect(f"127.0.0.1:{tcp}")
    try:
        for _ in range(300):  # bitbake's client: one question, then the next
            await client.ping()
    finally:
        await client.close()
    counts = busy_poll_counts(svc.port)
    assert counts["hit"] > 0 and counts["hit"] + counts["miss"] > 0


async def test_polling_can_be_turned_off(service_factory):
    tcp = free_port()
    svc = service_factory(config={"server": {"busy_poll_us": 0}},
                          args=["--hashserv-bind", f"127.0.0.1:{tcp}"])
    svc.start()
    client = await connect(f"127.0.0.1:{tcp}")
    try:
        for _ in range(50):
            await client.ping()
    finally:
        await client.close()
    assert busy_poll_counts(svc.port) == {}


def test_bad_busy_poll_setting_exits_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nbusy_poll_us = 20000\n")
    p = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "server.busy_poll_us" in p.stderr
