"""Configuration: TOML file + environment + command-line flags -> frozen dataclasses.

Every key is validated here, once, so the rest of the code can trust its config. A bad value
raises ConfigError naming the key (`storage.s3.bucket: must be a non-empty string`); the CLI
prints that one line and exits 2.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from proxy.auth import parse_anon_perms
from storage.s3_config import S3Config  # each backend owns its config type (beside it, without boto3)


class ConfigError(ValueError):
    """A configuration value is wrong; str() is one line naming the key."""


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1:8080"
    workers: int = 1
    mirror_prefix: str = "/"
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    access_log: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    # Peers (addresses or networks) whose X-Forwarded-For names the client in the access log.
    trusted_proxies: tuple[str, ...] = ()
    # SIGTERM: seconds requests in flight get to finish before their connections are cut.
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "local"  # local | s3
    path: str = "./sstate-cache"
    dedup: bool = True
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///./sstate-proxy.db"
    pool_size: int = 10  # PostgreSQL: connections per worker process


@dataclass(frozen=True)
class EquivalenceConfig:
    methods: tuple[str, ...] = ()  # () = any method
    class_limit: int = 16
    negative_ttl_s: float = 1.0
    cache_entries: int = 200_000


@dataclass(frozen=True)
class HashservConfig:
    bind: str = ""  # "" | host:port | [v6]:port | unix:///path
    websocket: bool = True
    anon_perms: tuple[str, ...] = ("@read",)
    read_only: bool = False
    upstream: str = ""


@dataclass(frozen=True)
class AuthConfig:
    admin_user: str = ""
    admin_token: str = ""


@dataclass(frozen=True)
class UpstreamConfig:
    mirrors: tuple[str, ...] = ()  # http(s) base URLs, asked in order; the object path is appended
    cache_max_bytes: int = 0  # bytes of pulled objects kept (least recently used evicted); 0 = no bound
    timeout_s: float = 10.0  # connect, and between bytes, of every upstream call
    negative_ttl_s: float = 10.0  # how long an upstream 404 is remembered


@dataclass(frozen=True)
class RetentionConfig:
    """Object retention (proxy/retention.py): the defaults of `sstate-proxy gc`, and with
    ``interval`` the same gc run by the service on a schedule."""

    max_size: str = ""  # SIZE: bytes, or with K/M/G/T (powers of 1024); "" = no bound
    unused_for: str = ""  # DURATION: 30d, 12h, 90m, 45s, 2w; "" = no age limit
    interval: str = ""  # DURATION between scheduled runs; "" = no scheduled gc
    pin: tuple[str, ...] = ()  # globs of keys or file names never removed ('*' also crosses '/')
    record_access: bool = True  # record when each object was last served (the catalog)
    access_flush_s: float = 5.0  # seconds between a worker's batched access writes


@dataclass(frozen=True)
class LimitsConfig:
    max_upload_bytes: int = 4 * 1024**3
    max_request_body_bytes: int = 1024 * 1024  # JSON bodies (/v1/equivalent)
    max_message_bytes: int = 1024 * 1024  # hashserv messages
    max_hashserv_connections: int = 4096  # per worker, raw tcp/unix hashserv clients
    max_connections: int = 4096  # per worker, HTTP (websocket hashserv clients included)
    header_timeout_s: float = 30.0  # a request head (or hashserv handshake) must arrive within
    idle_timeout_s: float = 60.0  # an idle keep-alive HTTP connection is closed after
    body_timeout_s: float = 60.0  # a request body that sends nothing for this long is cut (408)


@dataclass(frozen=True)
class DashboardConfig:
    # Each worker writes its traffic sums to the database this often (the dashboard lags by it).
    history_flush_s: float = 10.0
    # Traffic history older than this is pruned.
    history_days: int = 14


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    equivalence: EquivalenceConfig = field(default_factory=EquivalenceConfig)
    hashserv: HashservConfig = field(default_factory=HashservConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


# --- validation helpers -------------------------------------------------------------------


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, not {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings, not {value!r}")
        return tuple(value)
    raise AssertionError(key)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: must be a table")
    defaults = cls()
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
        default = getattr(defaults, key)
        if hasattr(default, "__dataclass_fields__"):
            kwargs[key] = _build(type(default), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, default)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Checks that cross keys or need more than a type; returns the normalised config."""
    s = cfg.server
    if s.workers < 1 or s.workers > 256:
        raise ConfigError(f"server.workers: must be between 1 and 256, not {s.workers}")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"server.log_format: must be 'text' or 'json', not {s.log_format!r}")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"server.log_level: must be DEBUG, INFO, WARNING or ERROR, not {s.log_level!r}")
    split_bind("server.bind", s.bind)
    for proxy in s.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: not an address or network: {proxy!r}") from None
    if not s.mirror_prefix.startswith("/") or not s.mirror_prefix.endswith("/"):
        raise ConfigError(f"server.mirror_prefix: must start and end with '/', not {s.mirror_prefix!r}")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert: tls_cert and tls_key must be given together")
    st = cfg.storage
    if st.backend not in ("local", "s3"):
        raise ConfigError(f"storage.backend: must be 'local' or 's3', not {st.backend!r}")
    if st.backend == "local" and not st.path:
        raise ConfigError("storage.path: must name a directory")
    if st.backend == "s3":
        if not st.s3.bucket:
            raise ConfigError("storage.s3.bucket: must be set when storage.backend is 's3'")
        if st.s3.max_connections < 1:
            raise ConfigError("storage.s3.max_connections: must be at least 1")
        if st.s3.timeout_s <= 0:
            raise ConfigError("storage.s3.timeout_s: must be positive")
    if cfg.database.url.startswith(("postgresql:", "postgres:", "postgresql+", "postgres+")):
        from storage.equivalence.postgres import parse_url

        try:
            parse_url(cfg.database.url)
        except ValueError as exc:
            raise ConfigError(f"database.url: {exc}") from None
    elif not cfg.database.url.startswith("sqlite:///"):
        raise ConfigError(f"database.url: must be sqlite:///path or postgresql://..., not {cfg.database.url!r}")
    if cfg.database.pool_size < 1:
        raise ConfigError("database.pool_size: must be at least 1")
    if cfg.equivalence.class_limit < 0:
        raise ConfigError("equivalence.class_limit: must be >= 0")
    if cfg.equivalence.negative_ttl_s < 0 or cfg.equivalence.negative_ttl_s > 5:
        raise ConfigError("equivalence.negative_ttl_s: must be between 0 and 5 seconds")
    h = cfg.hashserv
    try:
        anon = tuple(sorted(parse_anon_perms(h.anon_perms)))
    except ValueError as e:
        raise ConfigError(f"hashserv.anon_perms: {e}") from None
    if h.bind:
        parse_hashserv_bind("hashserv.bind", h.bind)
    if h.read_only and h.upstream:
        raise ConfigError("hashserv.upstream: an upstream cannot be used with read_only")
    if bool(cfg.auth.admin_user) != bool(cfg.auth.admin_token):
        raise ConfigError("auth.admin_token: admin_user and admin_token must be given together")
    lim = cfg.limits
    for name in ("max_upload_bytes", "max_request_body_bytes", "max_message_bytes",
                 "max_hashserv_connections", "max_connections"):
        if getattr(lim, name) < 1:
            raise ConfigError(f"limits.{name}: must be positive")
    for name in ("header_timeout_s", "idle_timeout_s", "body_timeout_s"):
        if not 0 < getattr(lim, name) <= 86400:
            raise ConfigError(f"limits.{name}: must be more than 0 and at most 86400 seconds")
    if not 0 <= s.shutdown_grace_s <= 3600:
        raise ConfigError("server.shutdown_grace_s: must be between 0 and 3600 seconds")
    if not 0.1 <= cfg.dashboard.history_flush_s <= 3600:
        raise ConfigError("dashboard.history_flush_s: must be between 0.1 and 3600 seconds")
    if cfg.dashboard.history_days < 1:
        raise ConfigError("dashboard.history_days: must be at least 1")
    validate_upstream(cfg.upstream)
    _validate_retention(cfg.retention)
    return replace(cfg, hashserv=replace(h, anon_perms=anon))


def validate_upstream(up: UpstreamConfig) -> None:
    from yarl import URL

    for text in up.mirrors:
        try:
            url = URL(text)
        except ValueError as e:
            raise ConfigError(f"upstream.mirrors: not a URL: {text!r} ({e})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"upstream.mirrors: must be an http:// or https:// URL with a host, not {text!r}")
        if url.query_string or url.fragment:
            raise ConfigError(f"upstream.mirrors: no query or fragment in a mirror's base URL: {text!r}")
    if up.cache_max_bytes < 0:
        raise ConfigError("upstream.cache_max_bytes: must be >= 0 (0: no bound)")
    if not 0 < up.timeout_s <= 600:
        raise ConfigError("upstream.timeout_s: must be more than 0 and at most 600 seconds")
    if not 0 <= up.negative_ttl_s <= 3600:
        raise ConfigError("upstream.negative_ttl_s: must be between 0 and 3600 seconds")


def _validate_retention(r: RetentionConfig) -> None:
    from proxy.retention import parse_duration, parse_size

    try:
        if r.max_size:
            parse_size(r.max_size)
    except ValueError as e:
        raise ConfigError(f"retention.max_size: {e}") from None
    for key in ("unused_for", "interval"):
        try:
            if getattr(r, key):
                parse_duration(getattr(r, key))
        except ValueError as e:
            raise ConfigError(f"retention.{key}: {e}") from None
    if r.interval and not (r.max_size or r.unused_for):
        raise ConfigError("retention.interval: a scheduled gc needs max_size or unused_for")
    if not 0 < r.access_flush_s <= 300:
        raise ConfigError("retention.access_flush_s: must be more than 0 and at most 300 seconds")


def split_bind(key: str, bind: str, any_host: str | None = "0.0.0.0") -> tuple[str | None, int]:
    """`host:port` or `[v6]:port` -> (host, port); an empty host is ``any_host``."""
    host, sep, port = bind.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # "²" isdigit()
        raise ConfigError(f"{key}: must be host:port, not {bind!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or any_host, int(port)


def parse_hashserv_bind(key: str, bind: str) -> tuple[str, Any]:
    """``unix://PATH`` -> ('unix', path); ``host:port`` / ``[v6]:port`` -> ('tcp', (host, port)),
    host None for all interfaces. Anything bitbake could not connect to raises ConfigError."""
    if bind.startswith("unix://"):
        path = bind[len("unix://"):]
        if not path:
            raise ConfigError(f"{key}: unix:// needs a path")
        return "unix", path
    if "://" in bind:
        raise ConfigError(f"{key}: must be host:port or unix:///path, not {bind!r}")
    return "tcp", split_bind(key, bind, any_host=None)


# --- loading -------------------------------------------------------------------------------

# Environment variables that map onto keys (besides SSTATE_PROXY_CONFIG itself).
ENV_KEYS = {
    "SSTATE_PROXY_ADMIN_USER": ("auth", "admin_user"),
    "SSTATE_PROXY_ADMIN_TOKEN": ("auth", "admin_token"),
}


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (``path`` or $SSTATE_PROXY_CONFIG, else built-in defaults), apply the
    environment, then ``overrides`` (dotted keys from command-line flags), then validate."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("SSTATE_PROXY_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config: file {path!r} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise ConfigError(f"config: {path}: not valid TOML: not UTF-8 at byte {e.start}") from None
        except OSError as e:
            raise ConfigError(f"config: cannot read {path!r}: {e.strerror}") from None
    for env, (section, key) in ENV_KEYS.items():
        if environ.get(env):
            table = data.setdefault(section, {})
            if not isinstance(table, dict):  # e.g. `auth = false`: say so, not a TypeError
                raise ConfigError(f"{section}: must be a table")
            table[key] = environ[env]
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{p}: must be a table")
        node[leaf] = value
    return validate(_build(Config, data, ""))


def storage_override(value: str) -> dict[str, Any]:
    """`--storage PATH` or `--storage s3://bucket/prefix` -> dotted overrides."""
    if value.startswith("s3://"):
        bucket, _, prefix = value[5:].partition("/")
        return {"storage.backend": "s3", "storage.s3.bucket": bucket, "storage.s3.prefix": prefix}
    return {"storage.backend": "local", "storage.path": value}
