"""S3 unreachable: the endpoint refuses connections (the moto server stopped) or hangs (the
moto server frozen with SIGSTOP), then comes back.

Verdict, for each outage: GET of a stored object, HEAD of a miss (which cannot be confirmed)
and PUT are answered 503 with ``Retry-After``, each within the bound that ``[storage.s3]
timeout_s`` sets (not after a long hang), /readyz says 503 and /healthz stays 200; when S3 is
back, uploads and downloads work again without restarting the service.

    python -m bench.faults.s3_down [--timeout-s 1.0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from bench.faults.common import ADMIN_ENV, Service, Verdict, call, obj_key, path_of, script, wait_for
from tests.s3server import TEST_ENV, MotoServer

BUCKET, PREFIX = "sstate", "fleet"


def _bound(timeout_s: float) -> float:
    # One S3 call is cut at timeout_s; a PUT's data call gets timeout_s plus its transfer time at
    # the assumed minimum rate (storage/s3.py), a few KiB here. One second of slack for the
    # machine (the request itself, a loaded runner).
    return 2 * timeout_s + 1.0


def outage(svc: Service, moto: MotoServer, kind: str, rng: random.Random, stored: dict[str, bytes],
           args: argparse.Namespace, v: Verdict) -> None:
    bound = _bound(args.timeout_s)
    key, body = next(iter(stored.items()))
    if kind == "refused":
        moto.stop()
    else:
        moto.pause()
    try:
        new_key = obj_key(rng)
        probes = [("GET stored", "GET", path_of(key), None, True),
                  ("HEAD miss", "HEAD", path_of(obj_key(rng)), None, True),
                  ("PUT", "PUT", path_of(new_key), rng.randbytes(4096), True),
                  ("/readyz", "GET", "/readyz", None, False)]
        times = []
        for what, method, path, data, retry_after in probes:
            a = call(svc.port, method, path, data, auth=method == "PUT")
            times.append(f"{what} {a.status} in {a.seconds:.2f}s")
            v.check(a.status == 503, f"S3 {kind}: {what} answered {a.status}, not 503")
            if retry_after:
                v.check(bool(a.headers.get("retry-after")), f"S3 {kind}: {what} 503 without Retry-After")
            v.check(a.seconds <= bound, f"S3 {kind}: {what} took {a.seconds:.2f}s (bound {bound:g}s)")
        v.check(call(svc.port, "GET", "/healthz").status == 200, f"S3 {kind}: /healthz is not 200")
        v.note(f"S3 {kind} (timeout_s {args.timeout_s:g}, bound {bound:g}s): " + ", ".join(times))
    finally:
        if kind == "refused":
            moto.start()  # moto forgets its objects: the bucket comes back empty, put ours back
            for k, b in stored.items():
                moto.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/{k}", Body=b)
        else:
            moto.resume()
    t0 = time.monotonic()
    key2, body2 = obj_key(rng), rng.randbytes(4096)
    ok = wait_for(lambda: call(svc.port, "PUT", path_of(key2), body2, auth=True).status == 201,
                  timeout=15, step=0.2)
    v.check(ok, f"S3 back after {kind}: PUT did not succeed within 15 s (no restart)")
    if ok:
        stored[key2] = body2
        v.note(f"S3 back after {kind}: PUT 201 after {time.monotonic() - t0:.2f}s, no restart")
    for k, b in stored.items():
        a = call(svc.port, "GET", path_of(k))
        v.check(a.status == 200 and a.body == b, f"S3 back after {kind}: GET {k} answered {a.status}")
    v.check(call(svc.port, "GET", "/readyz").status == 200, f"S3 back after {kind}: /readyz is not 200")


def run(workdir: Path, args: argparse.Namespace) -> Verdict:
    v = Verdict(f"S3 unreachable (refused, hung), timeout_s = {args.timeout_s:g}")
    rng = random.Random(args.seed)
    moto = MotoServer()
    moto.start()
    try:
        moto.create_bucket(BUCKET)
        svc = Service(workdir, env={**TEST_ENV, **ADMIN_ENV}, config={
            "storage": {"backend": "s3"},
            "storage.s3": {"bucket": BUCKET, "prefix": PREFIX, "endpoint_url": moto.endpoint_url,
                           "region": "us-east-1", "timeout_s": args.timeout_s}})
        with svc:
            stored: dict[str, bytes] = {}
            key, body = obj_key(rng), rng.randbytes(8192)
            a = call(svc.port, "PUT", path_of(key), body, auth=True)
            v.check(a.status == 201, f"PUT before the outage answered {a.status}")
            stored[key] = body
            for kind in ("refused", "hung"):
                outage(svc, moto, kind, rng, stored, args, v)
            v.check(svc.proc is not None and svc.proc.poll() is None, "the service exited")
    finally:
        moto.close()
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout-s", type=float, default=1.0, help="[storage.s3] timeout_s of the service")
    p.add_argument("--seed", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    return script(run, parser(), "fault-s3-", argv)


if __name__ == "__main__":
    sys.exit(main())
