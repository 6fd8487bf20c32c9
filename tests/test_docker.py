"""docker/: the compose file and Dockerfile, checked without a Docker engine.

The compose file is parsed; every service's command line is parsed by the real
``redis-weights`` argument parser; its environment variables are the ones the CLI
reads; and the Redis service's settings, applied to a real server, satisfy
``doctor`` with no warning at all.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import redis

from redis_weights.backend.keys import Keys
from redis_weights.observe.health import OK, check_server
from redis_weights.tools.cli import build_parser
from redis_weights.tools.cli.args import ENV_NAMESPACE, ENV_URL
from tests.conftest import REPO_ROOT

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")
DOCKER = REPO_ROOT / "docker"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR:-default}`` substitution, over nested lists and dicts."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env or {})


def test_services_and_scaling() -> None:
    doc = compose({"WORKERS": "8"})
    services = doc["services"]
    assert {"redis", "doctor", "trainer", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == "8"
    trainer = build_parser().parse_args(services["trainer"]["command"])
    assert trainer.role == "trainer" and trainer.workers == 8 and trainer.versions == 0  # pushes forever
    worker = build_parser().parse_args(services["worker"]["command"])
    assert worker.role == "worker" and worker.rank is None  # replicas take the lowest free rank...
    assert worker.workers == 8  # ...of 1..WORKERS, the ranks the trainer waits for
    assert worker.size_mb == trainer.size_mb  # same model shapes on both sides
    defaults = compose()["services"]
    replicas = int(defaults["worker"]["deploy"]["replicas"])
    assert build_parser().parse_args(defaults["trainer"]["command"]).workers == replicas
    assert build_parser().parse_args(defaults["worker"]["command"]).workers == replicas
    # The fleet starts only after `doctor` passed, and the doctor only once Redis answers.
    for name in ("trainer", "worker"):
        assert services[name]["depends_on"]["doctor"]["condition"] == "service_completed_successfully"
    assert services["doctor"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_service_command_is_a_valid_cli_call_with_the_cli_environment() -> None:
    services = compose()["services"]
    ours = {name for name, service in services.items() if service.get("image") == "redis-weights:latest"}
    assert ours == {"doctor", "trainer", "worker", "exporter", "admin"}  # redis, prometheus, grafana: their images
    for name, service in services.items():
        if name not in ours:
            continue
        args = build_parser().parse_args(service["command"])  # SystemExit on anything the CLI refuses
        assert callable(args.func)
        env = service["environment"]
        assert set(env) == {ENV_URL, ENV_NAMESPACE}, name
        assert env[ENV_URL].startswith("redis://redis:6379")
        Keys(env[ENV_NAMESPACE])  # a valid namespace
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["build"]["context"] == ".."


def test_redis_settings_are_the_ones_doctor_recommends(server_factory) -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    server = server_factory(*command[1:])  # the same settings, on a private server
    client = redis.Redis.from_url(server.url)
    try:
        findings = check_server(client, Keys(compose()["services"]["trainer"]["environment"][ENV_NAMESPACE]))
    finally:
        client.close()
    assert [f for f in findings if f.level != OK] == [], json.dumps([f.to_dict() for f in findings], indent=1)


def test_dockerfile_installs_the_package_and_runs_the_console_script() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.")
    assert 'ENTRYPOINT ["redis-weights"]' in lines
    assert "COPY redis_weights ./redis_weights" in lines and "COPY pyproject.toml README.md ./" in lines
    assert any("download.pytorch.org/whl/cpu" in line for line in lines)  # no CUDA wheels by accident
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["redis-weights"] == "redis_weights.tools.cli:main"
