"""deploy/compose.yaml cannot run here (no Docker): check that it agrees with what
tests/test_deploy.py runs (the same nginx template with every variable given, a replica config
that loads, the same config keys)."""

from __future__ import annotations

import re

import pytest

from proxy import config as config_mod
from tests.nginx import TEMPLATE, render
from tests.service import REPO

yaml = pytest.importorskip("yaml")

DEPLOY = REPO / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_fills_every_variable_of_the_nginx_template():
    nginx = compose()["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/templates/nginx.conf.template:ro" in nginx["volumes"]
    env = {k: str(v) for k, v in nginx["environment"].items()}
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    template = TEMPLATE.read_text()
    wanted = set(re.findall(r"\$\{([A-Z0-9_]+)\}", template))
    assert wanted == set(env) - {"NGINX_ENVSUBST_OUTPUT_DIR"}
    text = "\n".join(ln for ln in render(template, env).splitlines() if not ln.lstrip().startswith("#"))
    assert "${" not in text and "server replica1:8080" in text and "server replica2:8080" in text


def test_compose_replicas_run_the_deploy_config(tmp_path):
    services = compose()["services"]
    for name in ("replica1", "replica2"):
        replica = services[name]
        assert replica["command"] == ["--config", "/etc/sstate-proxy.toml"]
        assert "./sstate-proxy.toml:/etc/sstate-proxy.toml:ro" in replica["volumes"]
        assert replica["build"]["context"] == ".." and (DEPLOY / ".." / replica["build"]["dockerfile"]).exists()
    cfg = config_mod.load(str(DEPLOY / "sstate-proxy.toml"), {})
    assert cfg.storage.backend == "s3" and cfg.storage.s3.endpoint_url == "http://minio:9000"
    assert cfg.database.url.startswith("postgresql://") and "@postgres:5432/" in cfg.database.url
    assert cfg.server.workers == 2
