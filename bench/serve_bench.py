"""Serving benchmark: sstate-proxy vs nginx on the same sstate directory, same worker count.

One run does everything on loopback:

1. writes a corpus (tests/corpus.py, a few thousand small objects) plus big objects of
   1, 16 and 64 MiB in a temp dir;
2. for each worker count (default 1 and 2), starts Debian's nginx (sendfile, keepalive, access
   log to a file, ``worker_processes N``) and sstate-proxy (``--workers N``, access log on, to
   a file) on that directory;
3. measures HEAD requests/s of one typical object (``ab -k -i -c 16 -n 50000``) on both,
   HEAD of a *rewritten* path on the proxy (taskhash name, only the unihash object stored,
   mapping reported through ``POST /v1/equivalent``), and GET MB/s of every big object
   (``wrk -t2 -c4 -d10s``) on both, in interleaved rounds (nginx, proxy, nginx, ...);
4. optionally (``--no-log``) the proxy's HEAD rates again with ``[server] access_log = false``;
5. optionally (``--aiohttp-floor``) the HEAD rate of a bare aiohttp application on the same
   object (bench/aiohttp_floor.py: one handler, fixed headers, no stat, middleware or log), in
   the same rounds: the ceiling of the framework itself on this machine;
6. optionally (``--profile``) samples a proxy worker with py-spy during a HEAD run (direct and
   rewritten) and prints where the time goes (self and inclusive %, by function);
7. prints a table with the median of the rounds, the ratios (proxy/nginx; rewritten/direct
   hit) against issue 12's targets, the exact commands and the machine; stops everything it
   started. Exit status 1 if a target is missed or a check failed.

    PYTHON=python bench/serve_bench.sh [--workers 1,2] [--objects 3000] [--requests 50000]
                                       [--duration 10] [--repeat 3] [--no-log] [--aiohttp-floor]
                                       [--profile]
                                       [--keep] [--markdown FILE]

Needs nginx, ab (apache2-utils), wrk, curl on PATH (bench/serve_bench.sh installs them on
Debian); py-spy for --profile. Run it with the interpreter of sstate-proxy's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import make_corpus  # noqa: E402

BIG_SIZES_MB = (1, 16, 64)
# issue 12's acceptance targets
TARGET_HEAD = 0.15
TARGET_GET = 0.8
TARGET_REWRITE = 0.9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

COMMANDS: list[str] = []
FAILURES: list[str] = []


def tail_errors(logf: Path, n: int = 8) -> str:
    """The last lines of ``logf`` that are not access-log lines (those name an HTTP method)."""
    lines = [line.rstrip() for line in open(logf, errors="replace")
             if not re.search(r" (GET|HEAD|PUT|DELETE|POST) /", line)]
    return "\n".join(lines[-n:])


def note(cmd: list[str] | str) -> None:
    s = cmd if isinstance(cmd, str) else shlex.join(cmd)
    if s not in COMMANDS:
        COMMANDS.append(s)


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_path(key: str) -> str:
    """What bitbake sends: ':' as %3A, '+' as %2B."""
    return "/" + key.replace("%", "%25").replace(":", "%3A").replace("+", "%2B")


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM (then SIGKILL) the process group we created for ``proc``; bounded."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    # leftover children of the group (proxy workers / nginx workers)
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd: list[str], timeout: float) -> str:
    note(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def ab_head(url: str, n: int, c: int = 16) -> float:
    """HEAD requests/s (keep-alive); fails on any non-2xx or failed request."""
    run(["ab", "-k", "-i", "-c", str(c), "-n", str(min(n, 2000)), url], 120)  # warm-up
    out = run(["ab", "-k", "-i", "-c", str(c), "-n", str(n), url], 600)
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if failed or non2xx:
        raise RuntimeError(f"ab against {url}: {failed} failed, {non2xx.group(1) if non2xx else 0} non-2xx\n{out}")
    return rps


def wrk_get(url: str, size: int, duration: int, threads: int = 2, conns: int = 4) -> float:
    """GET MB/s (10^6 bytes of object body per second)."""
    run(["wrk", f"-t{threads}", f"-c{conns}", "-d2s", url], 60)  # warm-up (page cache, workers)
    out = run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", url], duration + 60)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk against {url} saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps * size / 1e6


# --------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    access_log {d}/nginx-access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def start_nginx(d: Path, root: Path, workers: int) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    (d / "nginx-tmp").mkdir(exist_ok=True)
    conf = d / f"nginx-w{workers}.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, d=d, port=port, root=root))
    cmd = ["nginx", "-p", str(d), "-c", str(conf)]
    note(cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(d / "nginx-stderr.log", "ab"),
                            start_new_session=True)
    return proc, port, conf


def start_floor(d: Path, obj: Path, workers: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, str(REPO / "bench" / "aiohttp_floor.py"), "--port", str(port),
           "--workers", str(workers), str(obj)]
    note(shlex.join(cmd))
    proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=open(d / "floor.log", "ab"),
                            start_new_session=True)
    return proc, port


def start_proxy(d: Path, root: Path, workers: int, access_log: bool) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    tag = f"w{workers}{'' if access_log else '-nolog'}"
    cfg = d / f"proxy-{tag}.toml"
    cfg.write_text(f"[server]\naccess_log = {'true' if access_log else 'false'}\n")
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--bind", f"127.0.0.1:{port}",
           "--storage", str(root), "--database", f"sqlite:///{d}/db.sqlite",
           "--workers", str(workers), "--anon-perms", "@read,@report"]
    if not access_log:
        cmd[4:4] = ["--config", str(cfg)]
    logf = d / f"proxy-{tag}.log"  # the access log (stderr, as users run it under systemd)
    note(f"cd {d} && PYTHONPATH={REPO} {shlex.join(cmd)} 2>{logf}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=open(logf, "ab"),
                            start_new_session=True)
    return proc, port, logf


def report_equivalence(port: int, detail) -> dict:
    body = {"taskhash": detail.taskhash, "method": detail.method, "outhash": detail.outhash,
            "unihash": detail.unihash}
    note(f"curl -s -X POST -H 'Content-Type: application/json' -d '{json.dumps(body)}' "
         f"http://127.0.0.1:PORT/v1/equivalent")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/equivalent", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def curl_head(url: str) -> tuple[int, dict[str, str]]:
    cmd = ["curl", "-sS", "-I", url]
    note(cmd)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    lines = out.replace("\r", "").splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if v:
            headers[k.strip().lower()] = v.strip()
    return status, headers


# --------------------------------------------------------------------------------------------
# profiling
# --------------------------------------------------------------------------------------------

def profile_summary(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample % by function from py-spy's collapsed ('raw') output."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # drop line numbers
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    if not total:
        return "(no samples)\n"
    out = [f"{total} samples\n", "self %  function (file)"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in self_c.most_common(top)]
    out += ["", "incl %  function (file)"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in incl_c.most_common(top)]
    return "\n".join(out) + "\n"


def profile_run(d: Path, root: Path, url_path_: str, label: str, n: int, access_log: bool = True,
                get_duration: int = 0) -> str:
    """py-spy record a 1-worker proxy while ab HEADs (or, with ``get_duration``, wrk GETs) a path."""
    proc, port, _ = start_proxy(d, root, 1, access_log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        url = f"http://127.0.0.1:{port}{url_path_}"
        if get_duration:
            load = ["wrk", "-t2", "-c4", f"-d{get_duration}s", url]
        else:
            load = ["ab", "-k", "-i", "-c", "16", "-n", str(n), url]
        run(load[:3] + ["-d2s", url] if get_duration else load[:5] + ["-n", "2000", url], 120)
        raw = d / f"pyspy-{label}.txt"
        spy = ["py-spy", "record", "--pid", str(proc.pid), "--rate", "250", "--format", "raw",
               "--nonblocking", "--output", str(raw), "--duration", "8"]
        if shutil.which("py-spy") is None:
            spy[0] = str(Path(sys.executable).parent / "py-spy")
        note(spy)
        sp = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        run(load, 600)
        try:
            _, err = sp.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            sp.send_signal(signal.SIGINT)
            _, err = sp.communicate(timeout=10)
        if not raw.exists():
            return f"(py-spy failed: {err.strip()[-500:]})\n"
        return profile_summary(raw)
    finally:
        stop(proc)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    what: str
    proxy: float
    nginx: float | None
    unit: str
    target: float
    ratio_of: str = "nginx"
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.proxy / self.nginx if self.nginx else float("nan")


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for cmd in (["nginx", "-v"], ["ab", "-V"], ["wrk", "-v"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            versions.append((r.stdout + r.stderr).strip().splitlines()[0])
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    import aiohttp

    return (f"nproc={os.cpu_count()} ({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} "
            f"usable), CPU: {model}, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}; " + "; ".join(versions))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--objects", type=int, default=3000, help="small objects in the corpus")
    ap.add_argument("--requests", type=int, default=50000, help="ab -n for HEAD runs")
    ap.add_argument("--duration", type=int, default=10, help="wrk -d seconds for GET runs")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved rounds per measurement (nginx, proxy, nginx, ...); the median is kept")
    ap.add_argument("--no-log", action="store_true", help="also measure proxy HEAD with access_log = false")
    ap.add_argument("--aiohttp-floor", action="store_true",
                    help="also measure HEAD on a bare aiohttp app (bench/aiohttp_floor.py)")
    ap.add_argument("--profile", action="store_true", help="py-spy a 1-worker proxy during HEAD runs")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--markdown", type=Path, help="also write the table + commands here (markdown)")
    a = ap.parse_args(argv)
    for tool in ("nginx", "ab", "wrk", "curl"):
        if shutil.which(tool) is None:
            print(f"serve_bench: {tool} not found (apt-get install nginx apache2-utils wrk curl)", file=sys.stderr)
            return 2
    worker_counts = [int(x) for x in a.workers.split(",") if x]
    # SIGTERM/SIGHUP -> SystemExit, so that the finally below stops every server we started
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    d = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.chmod(d, 0o755)  # nginx workers run as nobody
    root = d / "sstate"
    procs: list[subprocess.Popen] = []
    rows: list[Row] = []
    profiles: dict[str, str] = {}
    try:
        t0 = time.monotonic()
        corpus = make_corpus(root, n=a.objects, seed=1, equiv_fraction=0.3)
        big: dict[int, str] = {}
        for mb in BIG_SIZES_MB:
            h = f"abcd{mb:02d}" + os.urandom(29).hex()[:58]
            key = f"ab/cd/sstate:big{mb}:core2-64-poky-linux:1.0:r0:core2-64:14:{h}_package.tar.zst"
            p = root / key
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
            big[mb] = key
        for dirpath, _dirs, _files in os.walk(d):
            os.chmod(dirpath, 0o755)
        log(f"corpus: {len(corpus.objects)} objects + {len(big)} big ones in {time.monotonic() - t0:.1f}s -> {root}")

        # a typical object (target package, current layout, no '+' in the name) for HEAD
        typical = next(k for k in corpus.objects
                       if k.count("/") == 2 and "poky-linux" in k and "+" not in k and len(k) < 200)
        # a rewrite: the taskhash-named key is never written, its unihash object is
        detail = next(x for x in corpus.details if "+" not in x.taskhash_key)
        assert not (root / detail.taskhash_key).exists() and (root / detail.unihash_key).exists()

        for w in worker_counts:
            log(f"--- workers={w}: starting nginx and sstate-proxy (access log on{', and off' if a.no_log else ''})")
            ng, ng_port, _ = start_nginx(d, root, w)
            procs.append(ng)
            px, px_port, px_log = start_proxy(d, root, w, access_log=True)
            procs.append(px)
            fl = None
            if a.aiohttp_floor:
                fl, fl_port = start_floor(d, root / typical, w)
                procs.append(fl)
            nl = None
            if a.no_log:
                nl, nl_port, _ = start_proxy(d, root, w, access_log=False)
                procs.append(nl)
            try:
                ngb = f"http://127.0.0.1:{ng_port}"
                base = f"http://127.0.0.1:{px_port}"
                wait_http(ngb + url_path(typical), proc=ng)
                wait_http(f"{base}/healthz", proc=px)
                if nl is not None:
                    wait_http(f"http://127.0.0.1:{nl_port}/healthz", proc=nl)
                if fl is not None:
                    wait_http(f"http://127.0.0.1:{fl_port}/", proc=fl)
                st, _ = curl_head(ngb + url_path(typical))
                assert st == 200, f"nginx HEAD {st}"
                answer = report_equivalence(px_port, detail)
                assert answer.get("unihash") == detail.unihash, answer
                time.sleep(0.5)  # other workers/processes see the new generation within 0.2 s
                rew_problem = None
                bases = [base] + ([f"http://127.0.0.1:{nl_port}"] if nl is not None else [])
                for b in bases:
                    for _ in range(4 * w):  # new connections, so that every worker is asked
                        st, hdr = curl_head(b + url_path(detail.taskhash_key))
                        if st != 200 or hdr.get("x-sstate-source") != "equivalent":
                            rew_problem = f"HTTP {st}, X-Sstate-Source: {hdr.get('x-sstate-source', '-')}"
                    st, hdr = curl_head(b + url_path(typical))
                    assert st == 200 and hdr.get("x-sstate-source") == "hit", (st, hdr)
                if rew_problem:
                    log(f"rewritten path check FAILED: {rew_problem} (see {px_log})")
                    FAILURES.append(f"workers={w}: curl -I of the rewritten path answered {rew_problem}; "
                                    f"proxy log excerpt:\n{tail_errors(px_log)}")

                # interleaved rounds (the machine may be shared): the median of a.repeat for each
                runs: dict[str, list[float]] = {}

                def measure(label: str, fn, *args, runs=runs, w=w) -> None:
                    v = fn(*args)
                    runs.setdefault(label, []).append(v)
                    log(f"workers={w} {label}: {v:,.0f}")

                for _r in range(a.repeat):
                    measure("nginx HEAD", ab_head, ngb + url_path(typical), a.requests)
                    measure("proxy HEAD hit", ab_head, base + url_path(typical), a.requests)
                    if not rew_problem:
                        measure("proxy HEAD rewritten", ab_head, base + url_path(detail.taskhash_key), a.requests)
                    if fl is not None:
                        measure("aiohttp floor HEAD", ab_head, f"http://127.0.0.1:{fl_port}{url_path(typical)}",
                                a.requests)
                    if nl is not None:
                        nlb = f"http://127.0.0.1:{nl_port}"
                        measure("proxy-nolog HEAD hit", ab_head, nlb + url_path(typical), a.requests)
                        if not rew_problem:
                            measure("proxy-nolog HEAD rewritten", ab_head, nlb + url_path(detail.taskhash_key),
                                    a.requests)
                for mb, key in big.items():
                    for _r in range(a.repeat):
                        measure(f"nginx GET {mb}", wrk_get, ngb + url_path(key), mb << 20, a.duration)
                        measure(f"proxy GET {mb}", wrk_get, base + url_path(key), mb << 20, a.duration)
                lines = sum(1 for line in open(px_log, errors="replace") if re.search(r" (GET|HEAD) /", line))
                log(f"proxy access log: {lines} GET/HEAD lines")
            finally:
                for p in (ng, px, nl, fl):
                    stop(p)

            def med(label: str, runs=runs) -> float:
                return statistics.median(runs[label]) if label in runs else float("nan")

            def all_runs(*labels: str, runs=runs) -> dict:
                return {"runs": {lb: runs.get(lb, []) for lb in labels}}

            rows.append(Row(f"HEAD hit, workers={w}", med("proxy HEAD hit"), med("nginx HEAD"), "req/s",
                            TARGET_HEAD, extra=all_runs("proxy HEAD hit", "nginx HEAD")))
            for mb in big:
                rows.append(Row(f"GET {mb} MiB, workers={w}", med(f"proxy GET {mb}"), med(f"nginx GET {mb}"),
                                "MB/s", TARGET_GET, extra=all_runs(f"proxy GET {mb}", f"nginx GET {mb}")))
            extra = all_runs("proxy HEAD rewritten", "proxy HEAD hit")
            if rew_problem:
                extra["failed"] = rew_problem
            rows.append(Row(f"HEAD rewritten, workers={w}", med("proxy HEAD rewritten"), med("proxy HEAD hit"),
                            "req/s", TARGET_REWRITE, ratio_of="proxy HEAD hit", extra=extra))
            if fl is not None:
                rows.append(Row(f"HEAD, bare aiohttp app, workers={w}", med("aiohttp floor HEAD"),
                                med("nginx HEAD"), "req/s", TARGET_HEAD,
                                extra={"info": True, **all_runs("aiohttp floor HEAD", "nginx HEAD")}))
            if nl is not None:
                rows.append(Row(f"HEAD hit, no access log, workers={w}", med("proxy-nolog HEAD hit"),
                                med("nginx HEAD"), "req/s", TARGET_HEAD,
                                extra={"info": True, **all_runs("proxy-nolog HEAD hit", "nginx HEAD")}))
                rows.append(Row(f"HEAD rewritten, no access log, workers={w}", med("proxy-nolog HEAD rewritten"),
                                med("proxy-nolog HEAD hit"), "req/s", TARGET_REWRITE,
                                ratio_of="proxy HEAD hit (no log)",
                                extra={"info": True, **all_runs("proxy-nolog HEAD rewritten", "proxy-nolog HEAD hit")}))

        if a.profile:
            log("--- profiling a 1-worker proxy with py-spy (HEAD hit, HEAD rewritten)")
            profiles["HEAD hit (access log on)"] = profile_run(d, root, url_path(typical), "hit", a.requests)
            if not FAILURES:
                profiles["HEAD rewritten (access log on)"] = profile_run(
                    d, root, url_path(detail.taskhash_key), "rewritten", a.requests)
            profiles["GET 1 MiB (access log on)"] = profile_run(
                d, root, url_path(big[1]), "get1m", 0, get_duration=8)

        text = render(rows, typical, detail, big, profiles)
        print(text)
        if a.markdown:
            a.markdown.write_text(text)
        ok = not FAILURES and all(r.ratio >= r.target for r in rows if not r.extra.get("info"))
        return 0 if ok else 1
    finally:
        for p in procs:
            stop(p)
        if a.keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def render(rows: list[Row], typical: str, detail, big: dict[int, str], profiles: dict[str, str]) -> str:
    out = ["## Machine", "", machine(), "",
           "Client (ab/wrk) and server share the same cores: numbers are relative, not absolute.", "",
           "## Results", "",
           "| measurement | sstate-proxy | baseline | unit | ratio | baseline is | target | ok |",
           "| --- | ---: | ---: | --- | ---: | --- | ---: | --- |"]
    for r in rows:
        ok = "yes" if r.ratio >= r.target else "**NO**"
        if r.extra.get("failed"):
            ok = f"**FAILED** ({r.extra['failed']})"
        if r.extra.get("info"):
            ok += " (info)"
        out.append(f"| {r.what} | {r.proxy:,.0f} | {r.nginx:,.0f} | {r.unit} | {r.ratio:.2f} | {r.ratio_of} "
                   f"| >= {r.target} | {ok} |")
    out += ["", "Each cell is the median of the interleaved rounds; every round:", ""]
    for r in rows:
        rr = "; ".join(f"{lb}: " + ", ".join(f"{v:,.0f}" for v in vs) for lb, vs in r.extra.get("runs", {}).items())
        out.append(f"- {r.what}: {rr}")
    out += ["", f"HEAD object: `{typical}`", "",
            f"Rewritten path: `{detail.taskhash_key}` -> stored `{detail.unihash_key}` "
            f"(taskhash {detail.taskhash[:12]}... -> unihash {detail.unihash[:12]}..., reported with POST /v1/equivalent; "
            "curl -I answers 200 with X-Sstate-Source: equivalent)", "",
            "Big objects: " + ", ".join(f"{mb} MiB `{k}`" for mb, k in big.items()), "",
            "## Commands", "", "```"] + COMMANDS + ["```"]
    if FAILURES:
        out += ["", "## Failures", ""]
        for f in FAILURES:
            out += ["```", f, "```"]
    for label, summary in profiles.items():
        out += ["", f"## py-spy: {label}, 1 worker", "", "```", summary.rstrip(), "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
