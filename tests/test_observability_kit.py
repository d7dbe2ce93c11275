"""The Prometheus and Grafana files in deploy/: valid by promtool, their alerts
unit-tested, and every metric they query one the code exports (and documents)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from consumers.analytics.metrics import AnalyticsMetrics
from consumers.audit.ingest import AuditStats
from consumers.audit.metrics import AuditCollector, audit_lag
from consumers.guard.metrics import GuardMetrics
from relay.hub import StreamHub
from tokenbus.bus.settings import KafkaSettings, ServerSettings
from tokenbus.edge.app import _RelayCollector
from tokenbus.edge.http_metrics import HttpMetrics
from workers import GenerationEngine, LoadedModel
from workers.metrics import RequestMetrics, WorkerCollector

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tokenbus.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="no promtool (Debian's prometheus package, which scripts/test installs): "
    "the rules and config are not checked",
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
_METRIC = re.compile(r"\b(tokenbus_[a-z0-9_]+)")


def exported_names(smollm: LoadedModel) -> dict[str, str]:
    """Every series name the code exports -> its family name, from the collectors
    each process serves (the relay's, a worker's, the audit's, analytics', the guard's)."""
    collectors: list[Collector] = [
        _RelayCollector(StreamHub(kafka=KafkaSettings(), settings=ServerSettings())),
        HttpMetrics(),
        WorkerCollector(GenerationEngine(smollm).scheduler),
        RequestMetrics(),
        AuditCollector(AuditStats()),
        audit_lag(),
    ]
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    names = {}
    for source in (registry, AnalyticsMetrics().registry, GuardMetrics().registry):
        for family in source.collect():
            for suffix in _SUFFIXES[family.type]:
                names[family.name + suffix] = family.name
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [v["query"]["query"] for v in dashboard["templating"]["list"]]
    for panel in dashboard["panels"]:
        found += [target["expr"] for target in panel.get("targets", [])]
    return found


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(
    smollm: LoadedModel,
) -> None:
    exported = exported_names(smollm)
    for expr in dashboard_expressions() + alert_expressions():
        referenced = set(_METRIC.findall(expr))
        assert referenced or "up{" in expr, f"no tokenbus metric in {expr!r}"
        unknown = referenced - set(exported)
        assert not unknown, f"{expr!r} queries {sorted(unknown)}, which nothing exports"


def test_the_dashboard_shows_latency_lag_throughput_and_failures_per_model() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = "\n".join(dashboard_expressions())
    for metric in (
        "tokenbus_analytics_ttft_seconds_bucket",
        "tokenbus_analytics_inter_token_latency_seconds_bucket",
        "tokenbus_relay_delivery_delay_seconds_bucket",
        "tokenbus_analytics_queue_wait_seconds_bucket",
        "tokenbus_worker_e2e_request_latency_seconds_bucket",
        "tokenbus_worker_lag_records",
        "tokenbus_audit_lag_records",
        "tokenbus_analytics_tokens_total",
        'finish_reason="failed"',
        "tokenbus_http_requests_total",
    ):
        assert metric in exprs
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "prometheus"


def test_every_exported_metric_is_documented(smollm: LoadedModel) -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    missing = sorted({f for f in exported_names(smollm).values() if f"`{f}" not in docs})
    assert not missing, f"docs/observability.md does not describe {missing}"


def test_the_provisioning_uses_the_compose_paths() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "tokenbus.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_ports_compose_serves_metrics_on() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    ports = {job["job_name"]: _ports(job) for job in config["scrape_configs"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert ports["worker"] == {
        int(compose["worker"]["environment"]["TOKENBUS_WORKER_METRICS_PORT"])
    }
    assert ports["audit"] == {int(compose["audit"]["environment"]["TOKENBUS_AUDIT_METRICS_PORT"])}
    assert ports["relay"] == {_port_flag(compose["relay"]["command"])}
    assert ports["analytics"] == {_port_flag(compose["analytics"]["command"])}
    assert ports["guard"] == {int(compose["guard"]["environment"]["TOKENBUS_GUARD_METRICS_PORT"])}
    assert config["rule_files"] == ["alerts.yml"]  # beside it, in /etc/prometheus
    # The relay's metrics key: where compose's prometheus service writes it.
    (relay,) = (job for job in config["scrape_configs"] if job["job_name"] == "relay")
    key_file = relay["authorization"]["credentials_file"]
    assert f"> {key_file}" in " ".join(compose["prometheus"]["entrypoint"])


def _ports(job: dict[str, Any]) -> set[int]:
    ports = {int(t.rpartition(":")[2]) for c in job.get("static_configs", []) for t in c["targets"]}
    return ports | {c["port"] for c in job.get("dns_sd_configs", [])}


def _port_flag(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_the_alert_rules_pass_promtool_check_rules() -> None:
    checked = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_the_alerts_fire_when_they_should_and_not_before() -> None:
    tested = promtool("test", "rules", str(ROOT / "tests" / "prometheus" / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_the_prometheus_config_passes_promtool_check_config(tmp_path: Path) -> None:
    config = PROMETHEUS / "prometheus.yml"
    syntax = promtool("check", "config", "--syntax-only", str(config))
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # In full, with its rule file, as Prometheus will load it: the relay's metrics
    # key is a compose secret, so here it is a file of the test's.
    secret = "/run/tokenbus/metrics-key"
    assert secret in config.read_text()
    key = tmp_path / "metrics-key"
    key.write_text("test-key\n")
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(config.read_text().replace(secret, str(key)))
    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
