"""docker-compose.yml cannot run here (no Docker engine), so its shape is checked:
every tokenbus service runs a command the CLI accepts, against Apache Kafka; and
docker-compose.cluster.yml, laid over it, makes that three KRaft nodes with
replication 3, min ISR 2 and no unclean leader election. Where a compose
implementation is installed (Debian: apt-get install docker-compose), it checks
both layouts too (`docker-compose config` needs no engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenbus.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / ".env.example"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())  # type: ignore[no-any-return]


NODES = ("kafka", "kafka-2", "kafka-3")


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
            build_parser().parse_args(service["command"][1:])
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
    from tokenbus.bus.settings import AnalyticsSettings

    analytics = compose["services"]["analytics"]
    port = analytics["command"][analytics["command"].index("--port") + 1]
    assert f"{port}:{port}" in analytics["ports"]
    env = {k: v for k, v in analytics["environment"].items() if k.startswith("TOKENBUS_ANALYTICS")}
    settings = AnalyticsSettings(**{k.removeprefix("TOKENBUS_").lower(): v for k, v in env.items()})
    # Apache Kafka refuses sessions under group.min.session.timeout.ms (6 s by default).
    assert settings.analytics_session_timeout_s >= 6
    assert settings.analytics_heartbeat_interval_s <= settings.analytics_session_timeout_s / 3


# -- the three-node production profile (docker-compose.cluster.yml) ------------------


def test_cluster_profile_is_three_kraft_nodes_of_one_cluster(cluster: dict[str, Any]) -> None:
    envs = [cluster["services"][name]["environment"] for name in NODES]
    assert sorted(env["KAFKA_NODE_ID"] for env in envs) == ["1", "2", "3"]
    assert len({env["CLUSTER_ID"] for env in envs}) == 1
    for name, env in zip(NODES, envs, strict=True):
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", name
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
            "1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"
        ), name
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert cluster["services"][name]["image"].startswith("apache/kafka:")
        assert "healthcheck" in cluster["services"][name]


def test_cluster_profile_replicates_three_times_and_never_elects_uncleanly(
    cluster: dict[str, Any],
) -> None:
    for name in NODES:
        env = cluster["services"][name]["environment"]
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false", name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2", name


def test_cluster_profile_points_every_tokenbus_service_at_all_three_nodes(
    compose: dict[str, Any], cluster: dict[str, Any]
) -> None:
    # Every tokenbus service of the single-node file is overridden: a new one
    # forgotten here would bootstrap from node 1 alone with unreplicated topics.
    assert set(tokenbus_services(compose)) <= set(cluster["services"])
    for name in tokenbus_services(compose):
        service = cluster["services"][name]
        env = service["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"].split(",") == [f"{n}:9092" for n in NODES], name
        assert env["TOKENBUS_REPLICATION_FACTOR"] == "3", name
        for node in NODES:
            assert service["depends_on"][node]["condition"] == "service_healthy", name


# What docker-compose.yml insists on being given (`${VAR:?...}`).
REQUIRED = {
    "TOKENBUS_API_KEYS": '{"key": "tenant"}',
    "TOKENBUS_STREAM_TOKEN_SECRET": "secret",
    "TOKENBUS_METRICS_KEY": "metrics-key",
    "TOKENBUS_AUDIT_SIGNING_KEY": "00" * 32,
    "TOKENBUS_AUDIT_PUBLIC_KEY": "11" * 32,
    "POSTGRES_PASSWORD": "pg-password",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password",
}


def compose_config(*files: str) -> dict[str, Any]:
    """What a real compose implementation makes of these files, merged."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose to check the files with (apt-get install docker-compose)")
    # --env-file: .env.example (every value empty) rather than a .env someone left
    # in ROOT, so the environment given here alone counts.
    args = [binary, "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    result = subprocess.run(
        [*args, "config"], env=os.environ | REQUIRED,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]


def test_docker_compose_accepts_the_single_node_layout() -> None:
    services = compose_config("docker-compose.yml")["services"]
    assert services["relay"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "kafka-2" not in services
    assert {"balancer", "prometheus", "grafana"} <= set(services)
    # The secrets given in the environment reach the services that need them.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-password"
    store = services["audit"]["environment"]["TOKENBUS_AUDIT_STORE"]
    assert store == "postgresql://tokenbus:pg-password@postgres:5432/tokenbus"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-password"
    assert services["relay"]["environment"]["TOKENBUS_METRICS_KEY"] == "metrics-key"
    assert services["prometheus"]["environment"]["TOKENBUS_METRICS_KEY"] == "metrics-key"
    # The slim image for all but the worker; the worker's has torch.
    for name in ("topics", "relay", "audit", "analytics"):
        assert services[name]["build"]["target"] == "slim", name
    assert services["worker"]["build"]["target"] == "worker"
    # Only the balancer publishes the API's port: `--scale relay=N` cannot clash.
    published = {
        name: {str(port.get("published")) for port in service.get("ports", [])}
        for name, service in services.items()
    }
    assert [name for name, ports in published.items() if "8000" in ports] == ["balancer"]
    assert not published.get("relay")


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_docker_compose_refuses_to_start_without_each_secret(missing: str) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose to check the files with (apt-get install docker-compose)")
    env = {k: v for k, v in (os.environ | REQUIRED).items() if k != missing}
    result = subprocess.run(
        [binary, "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE),
         "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert missing in result.stderr


def test_docker_compose_accepts_the_cluster_layout_laid_over_it() -> None:
    services = compose_config("docker-compose.yml", "docker-compose.cluster.yml")["services"]
    assert {"kafka", "kafka-2", "kafka-3", "postgres"} <= set(services)
    for name in ("topics", "relay", "worker", "audit", "analytics"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092,kafka-2:9092,kafka-3:9092", name
        assert env["TOKENBUS_REPLICATION_FACTOR"] == "3", name
        assert env["TOKENBUS_ENABLE_IDEMPOTENCE"] == "true", name  # kept from the base
    # The single node's settings gave way to the cluster's, not the other way round.
    node_1 = services["kafka"]["environment"]
    assert node_1["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"
    assert node_1["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
    assert node_1["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2"
    assert services["audit"]["depends_on"]["postgres"]["condition"] == "service_healthy"
