"""Settings, built once at the edge (the command line) and passed down.

Every field reads ``TOKENBUS_<FIELD>`` from the environment; a command-line flag
overrides it. ``KAFKA_BOOTSTRAP_SERVERS`` points every part at an existing
cluster instead of the embedded broker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    enable_idempotence: bool | None = Field(
        default=None,
        description="unset: idempotent wherever the broker supports it (Apache Kafka "
        "does, the embedded Tansu does not); true: required; false: off",
    )
    linger_ms: int = Field(
        default=0,
        ge=0,
        le=20,
        description="how long a producer holds a message for more to batch with it; 0: "
        "sent at once (messages sent while a request to the broker is in flight batch "
        "anyway, since aiokafka has one in flight per broker)",
    )
    fetch_max_wait_ms: int = Field(
        default=10,
        ge=1,
        le=500,
        description="how long a fetch by a reader on the first token's path (the "
        "workers' of requests, the relay's of tokens) may wait at the broker for new "
        "data: Apache Kafka answers as soon as data arrives, Tansu only when this ends",
    )
    request_timeout_ms: int = Field(default=10_000, ge=100)
    client_id: str = "tokenbus"

    # Secure connections, for every Kafka client tokenbus makes (see tokenbus.bus.kafka).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="how clients talk to the broker's listener"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="with SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="PEM CA certificates the broker's must chain to; unset: the system's",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="PEM client certificate (chain), for brokers that ask for one"
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None,
        description="PEM private key of the client certificate (unset: in the certfile)",
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="the private key's password, if it is encrypted"
    )

    @model_validator(mode="after")
    def _security_is_whole(self) -> KafkaSettings:
        """Settings that cannot work are refused here, each naming its variable, rather
        than failing later at the first connection (or being silently ignored)."""
        protocol = self.kafka_security_protocol
        if self.uses_sasl:
            missing = [
                f"TOKENBUS_KAFKA_SASL_{name.upper()}"
                for name, value in (
                    ("username", self.kafka_sasl_username),
                    ("password", self.kafka_sasl_password),
                )
                if not value
            ]
            if missing:
                raise ValueError(
                    f"TOKENBUS_KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}"
                )
        elif self.kafka_sasl_username or self.kafka_sasl_password:
            # Credentials that would never be sent are a mistake in the protocol, most
            # likely: refusing beats connecting without them.
            raise ValueError(
                "TOKENBUS_KAFKA_SASL_USERNAME/PASSWORD are set but "
                f"TOKENBUS_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL: "
                "say SASL_SSL (or SASL_PLAINTEXT)"
            )
        files = {
            "TOKENBUS_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "TOKENBUS_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "TOKENBUS_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        given = [name for name, path in files.items() if path is not None]
        if self.kafka_ssl_key_password is not None:
            given.append("TOKENBUS_KAFKA_SSL_KEY_PASSWORD")
        if given and not self.uses_ssl:
            # Same reasoning: a CA or client certificate set beside a plaintext
            # protocol would be ignored, and the connection sent in the clear.
            raise ValueError(
                f"{', '.join(given)} set but TOKENBUS_KAFKA_SECURITY_PROTOCOL={protocol} "
                "does not use TLS: say SSL or SASL_SSL"
            )
        if self.kafka_ssl_certfile is None and (
            self.kafka_ssl_keyfile is not None or self.kafka_ssl_key_password is not None
        ):
            raise ValueError(
                "TOKENBUS_KAFKA_SSL_KEYFILE/KEY_PASSWORD need TOKENBUS_KAFKA_SSL_CERTFILE "
                "(the client certificate the key belongs to)"
            )
        for name, path in files.items():
            if path is not None:
                _readable(name, path)
        return self

    @property
    def uses_ssl(self) -> bool:
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"127.0.0.1:{self.broker_port}"

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)


def _readable(name: str, path: Path) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None


class ServerSettings(_Settings):
    """The HTTP side: submission API and SSE relay."""

    host: str = "127.0.0.1"
    port: int = 8000
    # `tokenbus serve --workers N`: N processes on the port (SO_REUSEPORT), each a
    # whole relay; see tokenbus/cli/relay_processes.py.
    serve_workers: int = Field(default=1, ge=1, le=64, description="relay processes")
    keepalive_s: float = Field(default=15.0, gt=0, description="SSE comment interval")
    send_timeout_s: float = Field(default=30.0, gt=0, description="drop a client stuck this long")
    relay_max_streams: int = Field(default=1024, ge=1, description="streams held in memory")
    subscriber_buffer: int = Field(default=1024, ge=1, description="events queued per subscriber")
    # Token events carry the worker's clock, request ids the API's: look this far
    # before a request id's timestamp when locating its events in the log.
    clock_skew_ms: int = Field(default=30_000, ge=0)
    log_read_timeout_s: float = Field(default=15.0, gt=0)
    # Strict moderation: how long a strict stream waits for the guard to judge an
    # event before it fails closed (the guard down, or far behind).
    strict_wait_s: float = Field(default=15.0, gt=0)

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
    # Each tenant's default moderation mode, from the guard's policy file (the
    # variable the guard reads too); unset: `moderation_default` for every tenant.
    guard_policies: Path | None = Field(
        default=None, description="the guard's policy file: each tenant's default mode"
    )
    moderation_default: Literal["off", "monitor", "strict"] = Field(
        default="off", description="the moderation mode of a tenant no policy file names"
    )
    # GET /v1/requests/{id}/audit from the audit store (AuditSettings: TOKENBUS_AUDIT_*).
    audit_view: bool = Field(
        default=False, description="serve the audit view of requests from the audit store"
    )
    # Browser pages from these origins may call the API and read streams (CORS).
    # Credentials are never cookies: a page sends its key or a stream token itself.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed to call the API from a browser: comma-separated "
        "(https://app.example.com,http://localhost:3000) or * for any",
    )

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    # What a client may take before the app sees its request (tokenbus.edge.limits).
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
    # A worker killed outright is noticed by the group after the session timeout,
    # and only then is its partition given to another: most of the stall a client
    # sees. 6 s is the least Apache Kafka accepts (group.min.session.timeout.ms);
    # heartbeats every 0.5 s let the survivors learn of the rebalance at once.
    session_timeout_ms: int = Field(default=6_000, ge=1)
    heartbeat_interval_ms: int = Field(default=500, ge=1)
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
    # group.min.session.timeout.ms); see docs/analytics.md for the figures.
    analytics_session_timeout_s: float = Field(default=6.0, gt=0)
    analytics_heartbeat_interval_s: float = Field(default=0.5, gt=0)
    analytics_rebalance_timeout_s: float = Field(default=6.0, gt=0)


class GuardSettings(_Settings):
    """The guard (``tokenbus guard``); every field reads ``TOKENBUS_GUARD_<FIELD>``.
    Its consumer group is named after ``group_id``, behind the topic prefix."""

    model_config = SettingsConfigDict(env_prefix="TOKENBUS_GUARD_")

    policies: Path | None = Field(
        default=None, description="the policy file (TOML); unset: PII and secrets, mode off"
    )
    group_id: str = "tokenbus-guard"
    guard_id: str = Field(default_factory=_default_worker_id)
    max_open_streams: int = Field(default=100_000, ge=1, description="streams judged at once")
    commit_every_s: float = Field(default=1.0, gt=0)
    # As the workers': a guard killed outright is replaced after the session timeout.
    session_timeout_ms: int = Field(default=6_000, ge=1)
    heartbeat_interval_ms: int = Field(default=500, ge=1)
    metrics_port: int | None = Field(default=None, description="serve Prometheus metrics here")
    metrics_host: str = Field(
        default="127.0.0.1", description="the address of those metrics; loopback unless set"
    )


class ClientSettings(_Settings):
    url: str = "http://127.0.0.1:8000"
    # The key a keyed server (TOKENBUS_API_KEYS on its side) knows this client by.
    api_key: SecretStr | None = None

    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


def kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """The environment that gives a child process these same Kafka settings."""
    env = {}
    for name, value in kafka.model_dump(exclude={"bootstrap_servers"}).items():
        if value is None:
            continue  # unset stays unset (None is no value a variable can hold)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"TOKENBUS_{name.upper()}"] = str(value)
    if kafka.bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    return env
