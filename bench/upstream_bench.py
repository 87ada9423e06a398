"""Pull-through benchmark: what sstate-proxy in front of an upstream mirror costs a client.

One run on loopback:

1. writes objects of 1, 16 and 64 MiB (random bytes, sstate names) into an upstream directory
   served by Debian's nginx (sendfile, one worker), and as many into sstate-proxy's own store
   (published objects: the local hits);
2. for each upstream rate (default: unlimited, i.e. loopback speed, then nginx ``limit_rate
   100m``, an upstream about as fast as a 1 Gbit/s link), starts that nginx and sstate-proxy
   (one worker, access log on, local store, ``[upstream] mirrors`` = the nginx);
3. time to last byte (``curl -w %{time_total}``, body to /dev/null) of a *first* GET through the
   proxy (the object is pulled: streamed to the client while it is stored) against a direct GET
   of the same object from nginx, each repetition on a fresh object, in ABBA order; after each
   pull the bench waits until the proxy has recorded it (so its tail does not overlap the next
   measurement);
4. (first rate only) GET of a *cached* object (pulled earlier, now in the store) against a local
   hit (published) of the same size, in ABBA order;
5. prints markdown tables: medians, same-run ratios against the issue's targets (pulled/direct
   <= 1.2x; cached/local >= 0.95x in throughput), the proxy's CPU time per pull (user + system,
   from ``/proc``, its tail after the client's last byte included: a figure the other processes
   on the machine disturb far less than a time), the commands and the machine. Exit status 1 if
   a check failed (wrong status, size or source), not for a missed target.

    python bench/upstream_bench.py [--repeat 6] [--cached-repeat 12] [--sizes 1,16,64]
                                   [--rates ,100m] [--keep] [--markdown FILE]

Needs nginx and curl on PATH; run it with the interpreter of sstate-proxy's venv.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import NGINX_CONF, free_port, machine, stop, url_path, wait_http  # noqa: E402

TARGET_PULLED = 1.2  # time of a first (pulled) GET / a direct GET from the upstream, at most
TARGET_CACHED = 0.95  # throughput of a cached GET / a local hit, at least
COMMANDS: list[str] = []


PLACES: dict[str, str] = {sys.executable: "python", str(REPO): "$REPO"}  # paths -> how the table names them


def note(cmd: list[str] | str) -> None:
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    for path, name in PLACES.items():
        text = text.replace(path, name)
    COMMANDS.append(text)


def start_nginx(d: Path, root: Path, rate: str) -> tuple[subprocess.Popen, int]:
    """serve_bench's nginx (one worker, sendfile), with ``limit_rate`` per connection if given:
    an upstream as fast as a network link rather than loopback."""
    port = free_port()
    (d / "nginx-tmp").mkdir(exist_ok=True)
    conf = d / f"nginx-{rate or 'unlimited'}.conf"
    text = NGINX_CONF.format(workers=1, d=d, port=port, root=root)
    if rate:
        text = text.replace("location / { }", f"location / {{ limit_rate {rate}; }}")
    conf.write_text(text)
    cmd = ["nginx", "-p", str(d), "-c", str(conf)]
    note(cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(d / "nginx-stderr.log", "ab"),
                            start_new_session=True)
    return proc, port


def key_for(tag: str, size_mb: int, i: int) -> str:
    h = f"{tag}{size_mb:03d}{i:03d}".encode().hex().ljust(64, "0")[:64]
    return f"{h[:2]}/{h[2:4]}/sstate:bench-{tag}:core2-64-poky-linux:1.0:r0:core2-64:14:{h}_package.tar.zst"


def curl_get(url: str, expect_size: int, source: str | None = None) -> float:
    """Seconds to the last byte of a GET (body discarded); checks status, size and source."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total} %header{x-sstate-source}",
           url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    status, size, seconds = int(out[0]), int(out[1]), float(out[2])
    got_source = out[3] if len(out) > 3 else ""
    if status != 200 or size != expect_size or (source is not None and got_source != source):
        raise RuntimeError(f"GET {url}: status {status}, {size} bytes (want {expect_size}), source {got_source!r}")
    return seconds


def start_proxy(d: Path, store: Path, db: Path, upstream_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = d / f"proxy-{store.name}.toml"
    cfg.write_text(f'[upstream]\nmirrors = ["{upstream_url}/"]\ntimeout_s = 30.0\n')
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--bind", f"127.0.0.1:{port}",
           "--storage", str(store), "--database", f"sqlite:///{db}", "--workers", "1"]
    note(f"cd {d} && PYTHONPATH={REPO} {shlex.join(cmd)} 2>{store.name}.log")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(d / f"{store.name}.log", "ab"), start_new_session=True)
    return proc, port


def cpu_ms(pid: int) -> float:
    """CPU time of a process's threads so far, ms (Linux ``/proc/PID/task/*/schedstat``: in
    nanoseconds, where ``/proc/PID/stat`` counts 10 ms ticks). The executors' threads live as
    long as the process, so none of this is lost between two readings."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return total / 1e6


def wait_recorded(db: Path, key: str, timeout: float = 60.0) -> None:
    """Until the pull of ``key`` is over (stored, deduplicated, recorded in the catalog), so its
    tail does not run into the next measurement."""
    deadline = time.monotonic() + timeout
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        while conn.execute("SELECT 1 FROM sstate_proxy_objects WHERE key = ?", (key,)).fetchone() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{key} was not recorded")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=6, help="first GETs per size (each of a fresh object)")
    p.add_argument("--cached-repeat", type=int, default=12, help="cached/local GET pairs per size")
    p.add_argument("--sizes", default="1,16,64", help="object sizes, MiB")
    p.add_argument("--rates", default=",100m", help="nginx limit_rate of the upstream per run ('' = none)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    rates = a.rates.split(",")
    note(["python", "bench/upstream_bench.py", *(argv if argv is not None else sys.argv[1:])])
    d = Path(tempfile.mkdtemp(prefix="upstream-bench-"))
    d.chmod(0o755)  # nginx's workers (another user when started as root) read the upstream files
    PLACES[str(d)] = "$DIR"
    upstream = d / "upstream"
    procs: list[subprocess.Popen | None] = []
    failed = False
    pulls: list[tuple[str, int, list[float], list[float]]] = []
    hits: list[tuple[int, list[float], list[float]]] = []
    load = os.getloadavg()[0]
    try:
        for mb in sizes:
            for i in range(a.repeat):
                files = [upstream / key_for(f"p{r}", mb, i) for r in range(len(rates))]
                files.append(d / "store0" / key_for("local", mb, i))
                for f in files:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(os.urandom(mb * 1024 * 1024))
        for r, rate in enumerate(rates):
            nginx, nginx_port = start_nginx(d, upstream, rate)
            procs.append(nginx)
            nginx_url = f"http://127.0.0.1:{nginx_port}"
            wait_http(nginx_url + url_path(key_for(f"p{r}", sizes[0], 0)), proc=nginx)
            store, db = d / f"store{r}", d / f"db{r}.sqlite"
            proxy, port = start_proxy(d, store, db, nginx_url)
            procs.append(proxy)
            proxy_url = f"http://127.0.0.1:{port}"
            wait_http(proxy_url + "/healthz", proc=proxy)
            for mb in sizes:
                size = mb * 1024 * 1024
                direct: list[float] = []
                pulled: list[float] = []
                cpu: list[float] = []  # the proxy's CPU per pull, its tail (store, catalog) included
                for i in range(a.repeat):  # ABBA: A B, B A, A B, ...
                    key = key_for(f"p{r}", mb, i)
                    pair = [("direct", nginx_url, None), ("pulled", proxy_url, "upstream")]
                    for what, base, source in pair if i % 2 == 0 else reversed(pair):
                        before = cpu_ms(proxy.pid)
                        t = curl_get(base + url_path(key), size, source)
                        (direct if what == "direct" else pulled).append(t)
                        if what == "pulled":
                            wait_recorded(db, key)
                            cpu.append(cpu_ms(proxy.pid) - before)
                pulls.append((rate or "none", mb, direct, pulled, cpu))
                print(f"upstream rate {rate or 'unlimited'}, {mb} MiB: direct {statistics.median(direct) * 1000:.1f} ms, "
                      f"pulled {statistics.median(pulled) * 1000:.1f} ms", flush=True)
                if r:
                    continue
                cached: list[float] = []
                local: list[float] = []
                for i in range(a.cached_repeat):
                    j = i % a.repeat
                    pair = [("cached", key_for("p0", mb, j)), ("local", key_for("local", mb, j))]
                    for what, key in pair if i % 2 == 0 else reversed(pair):
                        t = curl_get(proxy_url + url_path(key), size, "hit")
                        (cached if what == "cached" else local).append(t)
                hits.append((mb, local, cached))
                print(f"{mb} MiB: local hit {statistics.median(local) * 1000:.1f} ms, cached "
                      f"{statistics.median(cached) * 1000:.1f} ms", flush=True)
            stop(proxy)
            stop(nginx)
    except Exception as e:
        failed = True
        print(f"FAILED: {e}", file=sys.stderr)
    finally:
        for proc in procs:
            stop(proc)
        if a.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    text = render(pulls, hits, a, load)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text)
    return 1 if failed else 0


def render(pulls, hits, a, load: float) -> str:
    ms = lambda xs: f"{statistics.median(xs) * 1000:.1f}"  # noqa: E731
    out = [
        f"Medians of {a.repeat} first GETs per size (each of a fresh object) and {a.cached_repeat} cached/local "
        "GET pairs per size, ABBA order; time to last byte by curl.",
        "",
        f"| upstream rate (nginx limit_rate) | size | direct from nginx (ms) | first GET, pulled (ms) "
        f"| pulled / direct (target <= {TARGET_PULLED}x) | proxy CPU per pull (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rate, mb, direct, pulled, cpu in pulls:
        ratio = statistics.median(pulled) / statistics.median(direct)
        out.append(f"| {rate} | {mb} MiB | {ms(direct)} | {ms(pulled)} | {ratio:.2f}x | {statistics.median(cpu):.0f} |")
    out += ["", f"| size | local hit (ms) | cached (ms) | cached throughput / local hit (target >= {TARGET_CACHED}x) |",
            "|---:|---:|---:|---:|"]
    for mb, local, cached in hits:
        ratio = statistics.median(local) / statistics.median(cached)
        out.append(f"| {mb} MiB | {ms(local)} | {ms(cached)} | {ratio:.2f}x |")
    out += ["", "Commands:", "", "```", *COMMANDS, "```", "", f"Machine: {machine()}; load average at the start "
            f"{load:.1f}."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
