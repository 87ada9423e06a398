"""What the connection limits and TLS cost, in interleaved rounds on loopback, one worker each.

1. HEAD requests/s of a hit (``ab -k -c 16``), this tree against a baseline tree given with
   ``--baseline DIR`` (e.g. ``git worktree add /tmp/base <commit before the limits>``): every
   connection now goes through the limits' guard protocol and middleware.
2. GET throughput over TLS: sstate-proxy over https vs over plain http, and vs Debian's nginx
   over https on the same file. Under TLS the mirror cannot use sendfile (the bytes must be
   encrypted in the process): it sends files with plain reads. This checks that the path is not
   slow by accident: against nginx's TLS rate (nginx encrypts in its worker too, no kTLS here)
   and against the proxy's own plain-http sendfile rate.

    python bench/limits_bench.py [--baseline DIR] [--size-mb 256] [--repeat 5]

Needs ab (apache2-utils), curl and nginx on PATH, trustme in the venv.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trustme  # noqa: E402

from tests.corpus import make_corpus  # noqa: E402
from tests.service import Service, free_port  # noqa: E402

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
daemon off;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/chain.pem;
        ssl_certificate_key {dir}/key.pem;
        root {root};
    }}
}}
"""


def curl_mbps(url: str, ca: str | None) -> float:
    cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
    if ca:
        cmd[1:1] = ["--cacert", ca]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    size, seconds = int(out[0]), float(out[1])
    return size / seconds / 1e6


def ab_rate(url: str, n: int) -> float:
    out = subprocess.run(["ab", "-k", "-i", "-q", "-c", "16", "-n", str(n), url],
                         capture_output=True, text=True, check=True).stdout
    failed = int(out.split("Failed requests:")[1].split()[0])
    if failed or "Non-2xx responses" in out:
        raise RuntimeError(f"ab saw errors:\n{out}")
    return float(out.split("Requests per second:")[1].split()[0])


def head_rates(work: Path, baseline: Path, repeat: int, n: int) -> None:
    storage = work / "head-store"
    key = quote(make_corpus(storage, n=200, seed=5).objects[0])
    services = {
        "this tree": Service(work / "head-this", config={"storage": {"path": str(storage)}}),
        "baseline": Service(work / "head-base", config={"storage": {"path": str(storage)}},
                            env={"PYTHONPATH": str(baseline)}),
    }
    rates: dict[str, list[float]] = {k: [] for k in services}
    try:
        for svc in services.values():
            svc.start()
            ab_rate(f"{svc.url}/{key}", n // 5)  # warm-up
        for r in range(repeat):
            order = list(services) if r % 2 == 0 else list(reversed(services))
            for name in order:
                rates[name].append(ab_rate(f"{services[name].url}/{key}", n))
    finally:
        for svc in services.values():
            svc.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"HEAD of a hit, ab -k -i -c 16 -n {n}, {repeat} interleaved rounds, median req/s")
    for k, v in med.items():
        print(f"  {k:32s} {v:8.0f}   rounds: {', '.join(f'{x:.0f}' for x in rates[k])}")
    ratios = [a / b for a, b in zip(rates["this tree"], rates["baseline"], strict=True)]
    print(f"  this tree / baseline = {med['this tree'] / med['baseline']:.2f}x "
          f"(per round {min(ratios):.2f}x-{max(ratios):.2f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="a tree without the limits, for the HEAD rates")
    ap.add_argument("--requests", type=int, default=30000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="limits-bench-"))
    work.chmod(0o755)  # nginx's workers read the files and certificates
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    try:
        if a.baseline:
            head_rates(work, a.baseline.resolve(), a.repeat, a.requests)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca_pem, chain, key = work / "ca.pem", work / "chain.pem", work / "key.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        cert.private_key_pem.write_to_path(str(key))
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(chain), append=i > 0)
        key.chmod(0o644)
        root = work / "plain" / "sstate-cache"
        obj = "ab/cd/big.bin"
        (root / obj).parent.mkdir(parents=True)
        with open(root / obj, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(a.size_mb):
                f.write(block)
        for p in (work / "plain", root, root / "ab", root / "ab" / "cd"):
            p.chmod(0o755)
        (root / obj).chmod(0o644)
        plain = Service(work / "plain")
        tls = Service(work / "tls", config={"server": {"tls_cert": str(chain), "tls_key": str(key)},
                                            "storage": {"path": str(root)}})
        (work / "tmp").mkdir()
        nginx_port = free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=nginx_port, root=root))
        nginx = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(work / "nginx.conf")],
                                 stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        plain.start()
        tls.start()
        targets = {
            "sstate-proxy http (sendfile)": (f"{plain.url}/{obj}", None),
            "sstate-proxy https (reads)": (f"{tls.url}/{obj}", str(ca_pem)),
            "nginx https": (f"https://127.0.0.1:{nginx_port}/{obj}", str(ca_pem)),
        }
        rates: dict[str, list[float]] = {k: [] for k in targets}
        try:
            for url, cafile in targets.values():  # warm-up (page cache, TLS sessions)
                curl_mbps(url, cafile)
            for r in range(a.repeat):
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in order:
                    rates[name].append(curl_mbps(*targets[name]))
        finally:
            plain.stop()
            tls.stop()
            nginx.terminate()
            nginx.wait()
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"GET of one {a.size_mb} MiB file with curl, {a.repeat} interleaved rounds, median MB/s")
        for k, v in med.items():
            print(f"  {k:32s} {v:8.0f}   rounds: {', '.join(f'{x:.0f}' for x in rates[k])}")
        https, http_, ng = (med["sstate-proxy https (reads)"], med["sstate-proxy http (sendfile)"],
                            med["nginx https"])
        print(f"  proxy https / nginx https = {https / ng:.2f}x; proxy https / proxy http = {https / http_:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
