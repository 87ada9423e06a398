"""`sstate-proxy` command line: serve, user, stats (and the operations added beside them).

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration (one line on stderr that
names the key and what is wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import replace

from proxy import config as config_mod
from proxy.config import Config, ConfigError

log = logging.getLogger("sstate_proxy")


# --- argument parsing ------------------------------------------------------------------------


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: $SSTATE_PROXY_CONFIG)")
    p.add_argument("--storage", metavar="PATH|s3://BUCKET/PREFIX", help="object store")
    p.add_argument("--database", metavar="URL", help="sqlite:///path or postgresql://user@host:port/db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sstate-proxy",
        description="sstate mirror with hash-equivalence rewrite and a bitbake-hashserv drop-in",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service")
    _add_config_args(s)
    s.add_argument("--bind", metavar="HOST:PORT", help="HTTP listen address (default 127.0.0.1:8080)")
    s.add_argument("--workers", type=int, metavar="N", help="processes serving the one listening socket")
    s.add_argument("--hashserv-bind", metavar="HOST:PORT|unix:///PATH", help="raw hashserv listener")
    s.add_argument("--anon-perms", metavar="PERMS", help="anonymous permissions, comma or space separated")
    s.add_argument("--read-only", action="store_true", default=None, help="refuse every write")
    s.add_argument("--upstream-hashserv", metavar="ADDR", help="upstream hashserv for misses")
    s.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")

    u = sub.add_parser("user", help="manage users and tokens")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="create a user and print its token")
    ua.add_argument("username")
    ua.add_argument("--perms", default="@read", help="permissions, comma or space separated")
    ul = usub.add_parser("list", help="list users and permissions")
    ud = usub.add_parser("delete", help="delete a user")
    ud.add_argument("username")
    ut = usub.add_parser("token", help="issue a new token for a user (the old one stops working)")
    ut.add_argument("username")
    up = usub.add_parser("perms", help="set a user's permissions")
    up.add_argument("username")
    up.add_argument("perms")
    for leaf in (ua, ul, ud, ut, up):  # `user add NAME --config FILE`, like every other command
        _add_config_args(leaf)

    st = sub.add_parser("stats", help="print equivalence-database and dedup statistics as JSON")
    _add_config_args(st)
    st.add_argument("--url", metavar="URL", help="ask the running service at URL (GET /v1/stats) "
                    "instead of opening the database; credentials as for push")

    from proxy import push

    push.add_parser(sub)

    from proxy import operations  # the import/gc commands live beside their code

    operations.add_parsers(sub, _add_config_args)
    return parser


def split_perms(value: str) -> list[str]:
    return [p for p in (value.split(",") if "," in value else value.split()) if p]


def load_config(args: argparse.Namespace) -> Config:
    overrides: dict = {}
    if getattr(args, "storage", None):
        overrides.update(config_mod.storage_override(args.storage))
    if getattr(args, "database", None):
        overrides["database.url"] = args.database
    if getattr(args, "bind", None):
        overrides["server.bind"] = args.bind
    if getattr(args, "workers", None) is not None:
        overrides["server.workers"] = args.workers
    if getattr(args, "hashserv_bind", None) is not None:
        overrides["hashserv.bind"] = args.hashserv_bind
    if getattr(args, "anon_perms", None) is not None:
        overrides["hashserv.anon_perms"] = split_perms(args.anon_perms)
    if getattr(args, "read_only", None):
        overrides["hashserv.read_only"] = True
    if getattr(args, "upstream_hashserv", None):
        overrides["hashserv.upstream"] = args.upstream_hashserv
    if getattr(args, "log_level", None):
        overrides["server.log_level"] = args.log_level
    return config_mod.load(args.config, overrides)


# --- serve -----------------------------------------------------------------------------------


async def prepare(cfg: Config) -> None:
    """One-time start-up work done once, before workers fork: schema, admin user.
    (Worker 0's store.start() removes the temp litter of an interrupted upload.)"""
    from proxy.auth import Auth
    from storage.equivalence import DatabaseUnavailable, open_equivalence_db

    db = open_equivalence_db(cfg.database.url)
    try:
        try:
            # PostgreSQL connects lazily: connect and apply the schema migrations now, so that a
            # schema problem shows at start. An unreachable server is not fatal (requests that
            # need it get 503 until it is back), unless the admin user must be set up.
            await db.get_current_gc_mark()
        except DatabaseUnavailable as exc:
            if cfg.auth.admin_user:
                raise
            log.warning("%s; starting anyway", exc)
            return
        if cfg.auth.admin_user:
            await Auth(db, cfg.hashserv.anon_perms).ensure_admin(cfg.auth.admin_user, cfg.auth.admin_token)
            log.info("admin user %r has @all", cfg.auth.admin_user)
    finally:
        await db.close()


BACKLOG = 1024


class CannotListen(Exception):
    """A listening socket could not be made; str() is the one line the CLI prints."""


def listen_http(host: str, port: int) -> socket.socket:
    """The one HTTP listening socket, bound here (before any worker starts) and shared by every
    worker. No SO_REUSEPORT: a port in use, by anything, is an error rather than a second group
    of processes splitting its traffic. (SO_REUSEADDR only lets a restart bind over connections
    of the previous instance that are still in TIME_WAIT.)"""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise CannotListen(f"cannot listen on {where} (HTTP): {_reason(e)}") from None
    sock.setblocking(False)
    return sock


def listen_hashserv(bind: str) -> socket.socket:
    from proxy.hashserv.listeners import bind_socket

    try:
        return bind_socket(bind)
    except OSError as e:
        raise CannotListen(f"cannot listen on {bind} (hashserv): {_reason(e)}") from None


def _reason(e: OSError) -> str:
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def tls_context(cfg: Config):
    """The server's SSL context from ``[server] tls_cert``/``tls_key``, or None for plain HTTP."""
    if not cfg.server.tls_cert:
        return None
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
    return ctx


LINGER_S = 10.0  # aiohttp's default lingering_time
FINISH_WRITE_S = 1.0


async def run_worker(cfg: Config, worker: int, sock: socket.socket,
                     hashserv_sock: socket.socket | None = None) -> None:
    from aiohttp import web

    from proxy.app import access_logger_class, build_app
    from proxy.limits import LIMITS
    from proxy.services import SERVICES

    app = build_app(cfg, hashserv_sock=hashserv_sock, housekeeping=worker == 0)
    runner = web.AppRunner(
        app, access_log_class=access_logger_class(cfg), handle_signals=False,
        access_log=logging.getLogger("sstate_proxy.access"),
        keepalive_timeout=cfg.limits.idle_timeout_s,
        # the rest of a body already answered (408, 413, ...) is read and dropped for at most
        # this long before the connection closes; a stalled one need not be waited for longer
        lingering_time=min(LINGER_S, cfg.limits.body_timeout_s),
        # after our own drain (below): how long answers already given get to be written before
        # what is still running is cancelled
        shutdown_timeout=FINISH_WRITE_S,
    )
    await runner.setup()
    ssl_ctx = tls_context(cfg)
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    # Not web.SockSite: the connection limits stand between the socket and aiohttp's protocol
    # (proxy/limits.py), which asyncio's create_server takes as a protocol factory.
    server = await loop.create_server(
        app[LIMITS].protocol_factory(runner.server), sock=sock, ssl=ssl_ctx, backlog=BACKLOG,
        ssl_handshake_timeout=cfg.limits.header_timeout_s if ssl_ctx else None,
    )
    log.info("worker %d serving %s://%s (storage %s, database %s)", worker,
             "https" if ssl_ctx else "http", cfg.server.bind, cfg.storage.backend,
             cfg.database.url.split("@")[-1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace = cfg.server.shutdown_grace_s
    log.info("worker %d stopping: requests in flight get %gs", worker, grace)
    server.close()  # stop accepting (this process's copy of the listening socket is closed)
    # OEHASHEQUIV connections (raw and websocket) never end by themselves: closed first
    await app[SERVICES].hashserv.stop()
    await app[LIMITS].drain(grace)  # requests in flight finish; new ones get 503
    await runner.cleanup()  # closes every connection; cancels what still runs (FINISH_WRITE_S)


METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve(cfg: Config) -> int:
    # The workers' metrics meet in a fresh private directory (prometheus-client's multiprocess
    # mode, proxy/metrics.py), so any worker's scrape has every worker's counts. Set before
    # prometheus_client is first imported (it picks its value class at import), removed at exit.
    metrics_dir = tempfile.mkdtemp(prefix="sstate-proxy-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        return _serve(cfg)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve(cfg: Config) -> int:
    from proxy.app import setup_logging

    setup_logging(cfg)
    host, port = config_mod.split_bind("server.bind", cfg.server.bind)
    hashserv_sock = None
    try:
        sock = listen_http(host, port)
        # The raw hashserv listener too is bound once, here, and shared by every worker (a unix
        # path cannot be bound by several processes; a tcp port 0 must be the same port for all).
        hashserv_sock = listen_hashserv(cfg.hashserv.bind) if cfg.hashserv.bind else None
    except CannotListen as e:
        print(f"sstate-proxy: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    cfg = replace(cfg, server=replace(cfg.server, bind=f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    unix_path = None
    if hashserv_sock is not None and hashserv_sock.family == socket.AF_UNIX:
        unix_path = hashserv_sock.getsockname()
    try:
        asyncio.run(prepare(cfg))
        if cfg.server.workers == 1:
            asyncio.run(run_worker(cfg, 0, sock, hashserv_sock))
            return 0
        return supervise(cfg, sock, hashserv_sock)
    finally:
        sock.close()
        if hashserv_sock is not None:
            hashserv_sock.close()
            if unix_path:
                with contextlib.suppress(OSError):
                    os.unlink(unix_path)


# A worker still running this long after its grace period is killed.
KILL_AFTER_GRACE_S = 10


def _exit_when_orphaned(lifeline: int) -> None:
    """A worker's watch on its supervisor: the read returns (EOF) only when the supervisor is
    gone, which it never is by a clean stop (that stops the workers first): it crashed or was
    killed. The worker goes with it at once, as it would have with its process group, so the
    restarted service can bind its ports (a graceful drain would hold them for seconds)."""
    os.read(lifeline, 1)
    log.error("worker %d: the supervisor is gone; exiting", os.getpid())
    logging.shutdown()
    os._exit(1)


def supervise(cfg: Config, sock: socket.socket, hashserv_sock: socket.socket | None) -> int:
    """Fork ``workers`` processes that serve the listening socket(s) bound before; restart one
    that dies; on SIGTERM/SIGINT stop them all (each drains its requests in flight within
    ``[server] shutdown_grace_s``) and wait for them."""
    from prometheus_client.multiprocess import mark_process_dead

    children: dict[int, int] = {}
    stopping = False
    # The supervisor holds the write end and never writes. Without this lifeline, workers
    # orphaned by a SIGKILLed supervisor went on serving the inherited sockets, and the
    # restarted service could not bind its port.
    lifeline_r, lifeline_w = os.pipe()

    def spawn(worker: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            os.close(lifeline_w)
            threading.Thread(target=_exit_when_orphaned, args=(lifeline_r,), name="lifeline",
                             daemon=True).start()
            code = 0
            try:
                asyncio.run(run_worker(cfg, worker, sock, hashserv_sock))
            except BaseException:
                log.exception("worker %d failed", worker)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = worker

    def signal_all(sig: int) -> None:
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def on_stop(signum, frame) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        # The workers close their copies of the listening sockets; once this one is closed too
        # the kernel refuses new connections instead of queueing them for nobody.
        sock.close()
        if hashserv_sock is not None:
            hashserv_sock.close()
        signal_all(signal.SIGTERM)
        signal.alarm(math.ceil(cfg.server.shutdown_grace_s) + KILL_AFTER_GRACE_S)

    def on_alarm(signum, frame) -> None:
        log.error("workers still running after the grace period; killing them")
        signal_all(signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGALRM, on_alarm)
    for w in range(cfg.server.workers):
        spawn(w)
    log.info("supervising %d workers", cfg.server.workers)
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        worker = children.pop(pid, None)
        mark_process_dead(pid)  # its live gauges go; its counts stay in the totals
        if worker is None or stopping:
            continue
        log.error("worker %d (pid %d) exited with status %d; restarting", worker, pid, status)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10 * cfg.server.workers:
            log.critical("workers keep dying; giving up")
            on_stop(None, None)
            continue
        time.sleep(0.5)
        spawn(worker)
    signal.alarm(0)
    return 0


# --- users and stats ---------------------------------------------------------------------------


async def user_command(cfg: Config, args: argparse.Namespace) -> int:
    from proxy.auth import Auth, parse_permissions
    from storage.equivalence import open_equivalence_db

    db = open_equivalence_db(cfg.database.url)
    auth = Auth(db, cfg.hashserv.anon_perms)

    def missing(username: str) -> int:
        print(f"sstate-proxy: no user named {username!r}", file=sys.stderr)
        return 1

    try:
        cmd = args.user_command
        if cmd == "list":
            for user in await db.get_all_users():
                print(f"{user.username}\t{' '.join(user.permissions)}")
            return 0
        if cmd == "add":
            token = await auth.new_user(args.username, parse_permissions(split_perms(args.perms)))
            if token is None:
                print(f"sstate-proxy: user {args.username!r} exists already", file=sys.stderr)
                return 1
            print(token)
            return 0
        if cmd == "token":
            token = await auth.refresh_token(args.username)
            if token is None:
                return missing(args.username)
            print(token)
            return 0
        if cmd == "perms":
            ok = await auth.set_perms(args.username, parse_permissions(split_perms(args.perms)))
            return 0 if ok else missing(args.username)
        if cmd == "delete":
            return 0 if await auth.delete_user(args.username) else missing(args.username)
    finally:
        await db.close()
    return 2


async def stats_command(cfg: Config) -> int:
    from proxy import stats
    from storage.equivalence import open_equivalence_db

    db = open_equivalence_db(cfg.database.url, read_only=True)
    try:
        out = await stats.collect(db)
    finally:
        await db.close()
    print(stats.render(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The HTTP clients of a running service need no configuration of their own.
    if args.command == "push":
        from proxy import push

        return push.command(args)
    if args.command == "stats" and args.url:
        from proxy import stats

        return stats.remote_command(args.url)
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"sstate-proxy: bad configuration: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve(cfg)
        if args.command == "user":
            return asyncio.run(user_command(cfg, args))
        if args.command == "stats":
            return asyncio.run(stats_command(cfg))
        from proxy import operations

        return operations.run(args.command, cfg, args)
    except ValueError as e:  # e.g. unknown permission names given on the command line
        print(f"sstate-proxy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
