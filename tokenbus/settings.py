"""Settings, built once at the edge (the command line) and passed down.

Every field reads ``TOKENBUS_<FIELD>`` from the environment; a command-line flag
overrides it. ``KAFKA_BOOTSTRAP_SERVERS`` points every part at an existing
cluster instead of the embedded broker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENBUS_", extra="ignore", frozen=True, populate_by_name=True
    )


class KafkaSettings(_Settings):
    bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "TOKENBUS_BOOTSTRAP_SERVERS"),
        description="host:port[,host:port]; unset means the embedded broker on broker_port",
    )
    broker_port: int = 9092
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Tansu (the embedded broker) has no InitProducerId; Apache Kafka should have this on.
    enable_idempotence: bool = False
    linger_ms: int = Field(default=2, ge=0, le=20)
    request_timeout_ms: int = Field(default=10_000, ge=100)
    client_id: str = "tokenbus"

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"127.0.0.1:{self.broker_port}"

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)


class ServerSettings(_Settings):
    """The HTTP side: submission API and SSE relay."""

    host: str = "127.0.0.1"
    port: int = 8000
    keepalive_s: float = Field(default=15.0, gt=0, description="SSE comment interval")
    send_timeout_s: float = Field(default=30.0, gt=0, description="drop a client stuck this long")
    relay_max_streams: int = Field(default=1024, ge=1, description="streams held in memory")
    subscriber_buffer: int = Field(default=1024, ge=1, description="events queued per subscriber")
    # Token events carry the worker's clock, request ids the API's: look this far
    # before a request id's timestamp when locating its events in the log.
    clock_skew_ms: int = Field(default=30_000, ge=0)
    log_read_timeout_s: float = Field(default=15.0, gt=0)

    # Access. No keys (the embedded default): one anonymous tenant, loopback only.
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (JSON)")
    api_keys_file: Path | None = Field(default=None, description="JSON object: API key -> tenant")
    stream_token_secret: SecretStr | None = Field(
        default=None, description="HMAC key for stream tokens; share it between relays"
    )
    stream_token_ttl_s: int = Field(default=3600, ge=1)
    tenant_requests_per_minute: int = Field(default=600, ge=1)
    tenant_max_streams: int = Field(default=256, ge=1, description="open SSE streams per tenant")
    max_connections_per_client: int = Field(default=64, ge=1, description="open streams per IP")
    # /metrics: with this set, only `Authorization: Bearer <metrics_key>` reads it;
    # unset, any valid API key does (none is needed only when there are no keys).
    metrics_key: SecretStr | None = Field(default=None, description="the key /metrics asks for")

    # What a client may take before the app sees its request (tokenbus.edge).
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="larger request bodies are refused (413)"
    )
    body_read_timeout_s: float = Field(
        default=10.0, gt=0,
        description="a request head, and then its body, must each arrive within this",
    )  # fmt: skip
    max_connections: int = Field(
        default=1024, ge=1, description="open HTTP connections per process; beyond: 503"
    )


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(_Settings):
    model: str | None = Field(default=None, description="local model directory; default SmolLM2")
    model_name: str | None = Field(default=None, description="name requests use; default: derived")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_id: str = Field(default_factory=_default_worker_id)
    group_id: str = "tokenbus-workers"
    max_queued: int = Field(default=8, ge=1, description="requests fetched ahead of generation")
    max_batch: int = Field(default=32, ge=1, description="sequences generated at once")
    max_batch_tokens: int = Field(
        default=32_768,
        ge=1,
        description="KV cache positions reserved at once: in each size class of "
        "prompt + max_tokens (powers of two from 256), sequences times the longest of them",
    )
    prefill_chunk: int = Field(
        default=256, ge=1, description="prompt tokens prefilled per step, between decode steps"
    )
    max_attempts: int = Field(
        default=3, ge=1, description="attempts at a request whose generation crashes"
    )
    cache_dir: Path = Path.home() / ".cache" / "tokenbus"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 60_000
    worker_metrics_port: int | None = Field(
        default=None, description="serve the worker's Prometheus metrics here"
    )
    worker_metrics_host: str = Field(
        default="127.0.0.1", description="the address of those metrics; loopback unless set"
    )
    ready_fd: int | None = Field(
        default=None,
        description="a pipe to write 'ready' to once serving (`tokenbus up` passes one)",
    )


def _default_audit_store() -> str:
    return str(Path.home() / ".local" / "share" / "tokenbus" / "audit.db")


class AuditSettings(_Settings):
    """The audit consumer and its tools; every field reads ``TOKENBUS_AUDIT_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TOKENBUS_AUDIT_")

    store: str = Field(
        default_factory=_default_audit_store,
        description="a SQLite file path, or a postgresql:// URL",
    )
    group_id: str = "tokenbus-audit"
    from_beginning: bool = Field(
        default=False, description="read the whole log again (rebuilds a fresh store)"
    )
    signing_key: SecretStr | None = Field(default=None, description="Ed25519 seed, hex or base64")
    signing_key_file: Path | None = Field(
        default=None, description="file holding the seed; default for SQLite: <store>.key"
    )
    public_key: str | None = Field(
        default=None, description="what verify checks signatures with; keep it off the store host"
    )
    checkpoint_every_records: int = Field(default=10_000, ge=1)
    checkpoint_every_s: float = Field(default=60.0, gt=0)
    max_batch: int = Field(default=5_000, ge=1, description="records per fetch and transaction")
    state_cache: int = Field(default=100_000, ge=1, description="streams' state kept in memory")
    store_id: str | None = Field(
        default=None,
        description="the key its checkpoints are published under; default: the public key (hex)",
    )
    metrics_port: int | None = Field(default=None, description="serve Prometheus metrics here")
    metrics_host: str = Field(
        default="127.0.0.1", description="the address of those metrics; loopback unless set"
    )


class AnalyticsSettings(_Settings):
    """The analytics consumer (``tokenbus analytics``). Its consumer group and table
    changelogs are named after ``analytics_group_id``, behind the topic prefix."""

    analytics_host: str = "127.0.0.1"
    analytics_port: int = Field(default=8001, description="/metrics and /summary")
    analytics_group_id: str = "tokenbus-analytics"
    analytics_window_s: float = Field(default=60.0, gt=0, description="tumbling window length")
    analytics_window_retention_s: float = Field(
        default=3600.0, gt=0, description="windows kept this long"
    )
    analytics_max_open_requests: int = Field(
        default=100_000, ge=1, description="requests not yet ended"
    )
    # Tansu answers a first JoinGroup after half the session timeout: 30 s with
    # Faust's default 60 s. 6 s is the least Apache Kafka accepts (its
    # group.min.session.timeout.ms); see the README for the figures.
    analytics_session_timeout_s: float = Field(default=6.0, gt=0)
    analytics_heartbeat_interval_s: float = Field(default=0.5, gt=0)
    analytics_rebalance_timeout_s: float = Field(default=6.0, gt=0)


class ClientSettings(_Settings):
    url: str = "http://127.0.0.1:8000"


def kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """The environment that gives a child process these same Kafka settings."""
    env = {
        f"TOKENBUS_{name.upper()}": str(value)
        for name, value in kafka.model_dump(exclude={"bootstrap_servers"}).items()
    }
    if kafka.bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    return env
