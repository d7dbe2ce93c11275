"""docker-compose.yml cannot run here (no Docker engine), so its shape is checked:
every tokenbus service runs a command the CLI accepts, against Apache Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenbus.cli import _parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def tokenbus_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [""])[0] == "tokenbus"
    }


def test_kafka_is_apache_kafka_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_tokenbus_service_runs_an_existing_command(compose: dict[str, Any]) -> None:
    services = tokenbus_services(compose)
    assert {"relay", "worker", "topics", "audit", "analytics"} <= set(services)
    for name, service in services.items():
        try:
            _parser().parse_args(service["command"][1:])
        except SystemExit:
            pytest.fail(
                f"service {name}: `{' '.join(service['command'])}` is not a tokenbus command"
            )


def test_tokenbus_services_point_at_kafka_with_idempotence(compose: dict[str, Any]) -> None:
    for name, service in tokenbus_services(compose).items():
        env = service["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["TOKENBUS_ENABLE_IDEMPOTENCE"] == "true", name


def test_workers_reserve_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert "--device" in worker["command"] and "cuda" in worker["command"]


def test_audit_writes_to_the_postgres_service_once_it_is_healthy(compose: dict[str, Any]) -> None:
    audit = compose["services"]["audit"]
    assert audit["command"][1:3] == ["audit", "run"]
    store = audit["environment"]["TOKENBUS_AUDIT_STORE"]
    assert store.startswith("postgresql://") and "@postgres:5432/" in store
    postgres = compose["services"]["postgres"]
    assert audit["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in postgres
    assert "TOKENBUS_AUDIT_SIGNING_KEY" in audit["environment"]  # PostgreSQL: no key file


def test_analytics_serves_its_port_with_production_timeouts(compose: dict[str, Any]) -> None:
    from tokenbus.settings import AnalyticsSettings

    analytics = compose["services"]["analytics"]
    port = analytics["command"][analytics["command"].index("--port") + 1]
    assert f"{port}:{port}" in analytics["ports"]
    env = {k: v for k, v in analytics["environment"].items() if k.startswith("TOKENBUS_ANALYTICS")}
    settings = AnalyticsSettings(**{k.removeprefix("TOKENBUS_").lower(): v for k, v in env.items()})
    # Apache Kafka refuses sessions under group.min.session.timeout.ms (6 s by default).
    assert settings.analytics_session_timeout_s >= 6
    assert settings.analytics_heartbeat_interval_s <= settings.analytics_session_timeout_s / 3
