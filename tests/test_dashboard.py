"""/ui/ in a real headless Chromium (Debian's `chromium`): scripted traffic, then the page must
show it, and a screenshot is kept (SSTATE_PROXY_TEST_ARTIFACTS, default test-artifacts/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.service import REPO
from tests.traffic import Script, basic, call, seed

ADMIN, TOKEN = "admin", "dashboard-token"
CHROMIUM_TIMEOUT_S = 60


def chromium() -> str:
    """The browser, or fail in CI (``.ci/run`` installs it) / skip elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is missing (.ci/run installs Debian's chromium)", pytrace=False)
    pytest.skip("chromium is not installed")


def artifacts_dir() -> Path:
    d = Path(os.environ.get("SSTATE_PROXY_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


class Elements(HTMLParser):
    """Every element's attributes (and the text of table cells), from the DOM chromium dumped."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def with_attr(self, tag: str, attr: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and attr in a]


def wait_for_summary(port: int, want: dict[str, int], timeout: float = 10.0) -> dict:
    """The summary once the workers' traffic sums have reached the database."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, body = call(port, "GET", "/ui/api/summary?minutes=15")
        assert status == 200, body
        summary = json.loads(body)
        got = {k: summary["totals"][k] for k in want}
        if got == want or time.monotonic() > deadline:
            return summary
        time.sleep(0.1)


def test_dashboard_shows_the_traffic(service_factory, tmp_path):
    browser = chromium()
    svc = service_factory(config={"server": {"workers": 2}, "dashboard": {"history_flush_s": 0.2}},
                          env={"SSTATE_PROXY_ADMIN_USER": ADMIN, "SSTATE_PROXY_ADMIN_TOKEN": TOKEN})
    seed(svc.storage)
    svc.start()
    script = Script()
    script.run(svc.port, basic(ADMIN, TOKEN))
    assert call(svc.port, "GET", "/favicon.ico")[0] == 404  # no sstate name: not a cache miss
    want = {s: script.count(s) for s in ("hit", "equivalent", "upstream", "miss")}
    assert want == {"hit": 4, "equivalent": 3, "upstream": 0, "miss": 6}

    summary = wait_for_summary(svc.port, want)
    # recipe names are task data: an anonymous viewer gets the counts, not the names
    assert summary["top_missed_recipes"] is None
    status, headers, _ = call(svc.port, "GET", "/ui/login")  # where a browser signs in
    assert status == 401 and "WWW-Authenticate" in headers
    status, _, body = call(svc.port, "GET", "/ui/api/summary?minutes=15", headers=basic(ADMIN, TOKEN))
    summary = json.loads(body)
    assert {k: summary["totals"][k] for k in want} == want
    assert summary["bytes_by_source"]["hit"] == script.bytes["hit"]
    assert summary["bytes_by_source"]["equivalent"] == script.bytes["equivalent"]
    assert summary["reports_24h"] == script.reports
    assert summary["top_missed_recipes"] == [
        {"recipe": r, "misses": n} for r, n in sorted(script.misses.items(), key=lambda x: (-x[1], x[0]))]
    assert summary["storage"]["max_size"] is None  # no [retention] max_size configured
    # bad input is a 400
    assert call(svc.port, "GET", "/ui/api/summary?minutes=0")[0] == 400
    assert call(svc.port, "GET", "/ui/api/summary?minutes=x")[0] == 400

    # The page, drawn by its script in a real browser: anonymous first (no recipe names) ...
    profile = tmp_path / "chromium-profile"
    done = run_chromium(browser, tmp_path / "anonymous-profile", "--dump-dom", svc.url + "/ui/")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Elements()
    dom.feed(done.stdout)
    assert not dom.with_attr("tr", "data-recipe")
    assert any(a.get("id") == "recipes-hidden" for _, a in dom.elements), done.stdout[-3000:]
    # ... then signed in as the admin (/ui/login challenges, the browser answers with the
    # URL's credentials and then sends them with the page's own requests).
    admin_url = svc.url.replace("http://", f"http://{ADMIN}:{TOKEN}@") + "/ui/login"
    done = run_chromium(browser, profile, "--dump-dom", admin_url)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Elements()
    dom.feed(done.stdout)
    legend = {a["data-source"]: a for a in dom.with_attr("li", "data-source")}
    assert {s: int(legend[s]["data-count"]) for s in want} == want, done.stdout[-3000:]
    assert int(legend["hit"]["data-bytes"]) == script.bytes["hit"]
    # the chart's bars add up to the same counts, per source
    bars: dict[str, int] = {}
    for rect in dom.with_attr("rect", "data-source"):
        if rect["data-source"] in want:  # (the reports chart's bars are "reports")
            bars[rect["data-source"]] = bars.get(rect["data-source"], 0) + int(rect["data-count"])
    assert bars == {s: n for s, n in want.items() if n}
    rows = [(a["data-recipe"], int(a["data-misses"])) for a in dom.with_attr("tr", "data-recipe")]
    assert rows == [("busybox", 3), ("openssl", 2), ("zlib", 1)]
    assert dom.with_attr("div", "id") and any(a.get("id") == "no-budget" for _, a in dom.elements)
    reports = sum(int(a["data-count"]) for a in dom.with_attr("rect", "data-count")
                  if a.get("data-source") == "reports")
    assert reports == script.reports

    shot = artifacts_dir() / "dashboard.png"
    shot.unlink(missing_ok=True)
    done = run_chromium(browser, profile, f"--screenshot={shot}", "--window-size=1280,900",
                        "--hide-scrollbars", admin_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_needs_read(service_factory):
    svc = service_factory(args=["--anon-perms", ""],
                          env={"SSTATE_PROXY_ADMIN_USER": ADMIN, "SSTATE_PROXY_ADMIN_TOKEN": TOKEN}).start()
    for path in ("/ui/", "/ui/api/summary", "/ui/dashboard.js"):
        status, headers, _ = call(svc.port, "GET", path)
        assert status == 401 and "WWW-Authenticate" in headers, (path, status)
        status, headers, body = call(svc.port, "GET", path, headers=basic(ADMIN, TOKEN))
        assert status == 200, (path, status, body)
    status, headers, body = call(svc.port, "GET", "/ui/", headers=basic(ADMIN, TOKEN))
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
    assert call(svc.port, "GET", "/ui/nope.js", headers=basic(ADMIN, TOKEN))[0] == 404
    status, headers, _ = call(svc.port, "GET", "/ui", headers=basic(ADMIN, TOKEN))
    assert status == 302 and headers["Location"] == "/ui/"
    status, headers, _ = call(svc.port, "GET", "/ui/login", headers=basic(ADMIN, TOKEN))
    assert status == 302 and headers["Location"] == "/ui/"
