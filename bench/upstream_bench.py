"""Pull-through benchmark: what sstate-proxy in front of an upstream mirror costs a client.

One run on loopback:

1. writes objects of 1, 16 and 64 MiB (random bytes, sstate names) into an upstream directory
   served by Debian's nginx (sendfile, one worker), and as many into sstate-proxy's own store
   (published objects: the local hits);
2. starts sstate-proxy (one worker, access log on, local store) with ``[upstream] mirrors`` set
   to that nginx;
3. time to last byte (``curl -w %{time_total}``, body to /dev/null) of a *first* GET through the
   proxy (the object is pulled: streamed to the client while it is stored) against a direct GET
   of the same object from nginx, each repetition on a fresh object, in ABBA order;
4. GET of a *cached* object (pulled earlier, now in the store) against a local hit (published)
   of the same size, in ABBA order;
5. prints a markdown table: medians, same-run ratios against the issue's targets (pulled/direct
   <= 1.2x, cached/local >= 0.95x in throughput, i.e. time ratio <= 1/0.95), the commands and
   the machine. Exit status 1 if a check failed (wrong size or status), not for a missed target.

    python bench/upstream_bench.py [--repeat 6] [--cached-repeat 12] [--sizes 1,16,64] [--keep]
                                   [--markdown FILE]

Needs nginx and curl on PATH; run it with the interpreter of sstate-proxy's venv.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import free_port, machine, start_nginx, stop, url_path, wait_http  # noqa: E402

TARGET_PULLED = 1.2  # time of a first (pulled) GET / a direct GET from the upstream, at most
TARGET_CACHED = 0.95  # throughput of a cached GET / a local hit, at least
COMMANDS: list[str] = []


def note(cmd: list[str] | str) -> None:
    COMMANDS.append(cmd if isinstance(cmd, str) else shlex.join(cmd))


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


def start_proxy(d: Path, store: Path, upstream_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = d / "proxy.toml"
    cfg.write_text(f'[upstream]\nmirrors = ["{upstream_url}/"]\ntimeout_s = 30.0\n')
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--bind", f"127.0.0.1:{port}",
           "--storage", str(store), "--database", f"sqlite:///{d}/db.sqlite", "--workers", "1"]
    note(f"cd {d} && PYTHONPATH={REPO} {shlex.join(cmd)} 2>proxy.log")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=open(d / "proxy.log", "ab"),
                            start_new_session=True)
    return proc, port


def wait_stored(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not stored")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=6, help="first GETs per size (each of a fresh object)")
    p.add_argument("--cached-repeat", type=int, default=12, help="cached/local GET pairs per size")
    p.add_argument("--sizes", default="1,16,64", help="object sizes, MiB")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    note(["python", "bench/upstream_bench.py", *(argv if argv is not None else sys.argv[1:])])
    d = Path(tempfile.mkdtemp(prefix="upstream-bench-"))
    d.chmod(0o755)  # nginx's workers (another user when started as root) read the upstream files
    upstream, store = d / "upstream", d / "store"
    nginx = proxy = None
    failed = False
    rows = []
    try:
        for mb in sizes:
            for i in range(a.repeat):
                for root, tag in ((upstream, "pull"), (store, "local")):
                    f = root / key_for(tag, mb, i)
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(os.urandom(mb * 1024 * 1024))
        nginx, nginx_port, _ = start_nginx(d, upstream, 1)
        nginx_url = f"http://127.0.0.1:{nginx_port}"
        wait_http(nginx_url + url_path(key_for("pull", sizes[0], 0)), proc=nginx)
        proxy, port = start_proxy(d, store, nginx_url)
        proxy_url = f"http://127.0.0.1:{port}"
        wait_http(proxy_url + "/healthz", proc=proxy)
        for mb in sizes:
            size = mb * 1024 * 1024
            direct: list[float] = []
            pulled: list[float] = []
            for i in range(a.repeat):  # ABBA: A B, B A, A B, ...
                key = key_for("pull", mb, i)
                pair = [("direct", nginx_url, None), ("pulled", proxy_url, "upstream")]
                for what, base, source in pair if i % 2 == 0 else reversed(pair):
                    t = curl_get(base + url_path(key), size, source)
                    (direct if what == "direct" else pulled).append(t)
                wait_stored(store / key)
            cached: list[float] = []
            local: list[float] = []
            for i in range(a.cached_repeat):
                j = i % a.repeat
                pair = [("cached", key_for("pull", mb, j), "hit"), ("local", key_for("local", mb, j), "hit")]
                for what, key, source in pair if i % 2 == 0 else reversed(pair):
                    t = curl_get(proxy_url + url_path(key), size, source)
                    (cached if what == "cached" else local).append(t)
            rows.append((mb, direct, pulled, local, cached))
            print(f"{mb} MiB: direct {statistics.median(direct) * 1000:.1f} ms, pulled "
                  f"{statistics.median(pulled) * 1000:.1f} ms, local hit {statistics.median(local) * 1000:.1f} ms, "
                  f"cached {statistics.median(cached) * 1000:.1f} ms", flush=True)
    except Exception as e:
        failed = True
        print(f"FAILED: {e}", file=sys.stderr)
    finally:
        stop(proxy)
        stop(nginx)
        if a.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    text = render(rows, a)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text)
    return 1 if failed else 0


def render(rows, a) -> str:
    ms = lambda xs: f"{statistics.median(xs) * 1000:.1f}"  # noqa: E731
    out = [
        f"Medians of {a.repeat} first GETs (each a fresh object) and {a.cached_repeat} cached/local GET pairs "
        "per size, ABBA order; time to last byte by curl.",
        "",
        "| size | direct from nginx (ms) | first GET, pulled (ms) | pulled / direct (target <= "
        f"{TARGET_PULLED}x) | local hit (ms) | cached (ms) | cached throughput / local (target >= {TARGET_CACHED}x) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mb, direct, pulled, local, cached in rows:
        r1 = statistics.median(pulled) / statistics.median(direct)
        r2 = statistics.median(local) / statistics.median(cached)
        out.append(f"| {mb} MiB | {ms(direct)} | {ms(pulled)} | {r1:.2f}x | {ms(local)} | {ms(cached)} | {r2:.2f}x |")
    out += ["", "Commands:", "", "```", *COMMANDS, "```", "", f"Machine: {machine()}; load average before the run "
            f"{os.getloadavg()[0]:.1f}."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
