"""Property test (hypothesis) of the configuration loader: any TOML document, well-formed or not,
either loads into a Config or raises ConfigError (one line naming the key); nothing else."""

from __future__ import annotations

import json
import math
from dataclasses import fields

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, load

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ENVIRON = {"SSTATE_PROXY_ADMIN_USER": "admin", "SSTATE_PROXY_ADMIN_TOKEN": "token"}


def toml_value(v: object) -> str:
    """A TOML literal for ``v`` (strings through JSON escapes, which TOML shares, plus DEL)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


# Every section and key the loader knows, plus unknown ones, with values of every TOML type and
# the strings that reach deeper validation (addresses, permissions, URLs, Unicode digits).
KEYS = {f.name: [g.name for g in fields(f.default_factory())] for f in fields(Config)}
KEYS["storage"].append("s3")
SCALARS = st.one_of(
    st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=30),
    st.sampled_from(["127.0.0.1:0", "[::1]:80", "h:²", ":١٢", "unix://", "unix:///tmp/x", "ws://h:1",
                     "@read", "@task-data", "@all", "@user-admin", "@none", "s3", "local", "json", "/",
                     "sqlite:///x.db", "postgresql://u:p@h:1/d", "postgresql://h:x/d", "postgresql://[",
                     "10.0.0.0/8", "not-a-net"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def section(name: str) -> st.SearchStrategy:
    return st.dictionaries(st.one_of(st.sampled_from(KEYS[name]), st.text(max_size=8)), VALUES, max_size=4)


DOCUMENTS = st.fixed_dictionaries({}, optional={n: st.one_of(section(n), VALUES) for n in KEYS})


def loads_or_config_error(path, environ) -> None:
    try:
        cfg = load(str(path), environ=environ)
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(DOCUMENTS, st.booleans())
def test_any_structured_document_loads_or_is_a_config_error(tmp_path, doc, with_env):
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()))
    loads_or_config_error(path, ENVIRON if with_env else {})


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_bytes_load_or_are_a_config_error(tmp_path, text):
    path = tmp_path / "raw.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    loads_or_config_error(path, ENVIRON)
