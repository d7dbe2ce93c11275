"""Secure connections (TOKENBUS_KAFKA_SECURITY_PROTOCOL and friends) against Apache
Kafka with a SASL_SSL listener: a CA made here signs the broker's certificate,
alice has a PLAIN password and SCRAM credentials. Every part of tokenbus talks to
it (topics, API, relay, worker and its cancel reader, audit, analytics), and the
settings it refuses (a wrong password, an untrusted CA, the wrong protocol) are
one line naming the setting, at once. The settings checked without a broker are in
test_kafka_security_settings.py."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from consumers.audit import open_store
from producers import TokenbusClient
from schemas import FinishedEvent, FinishReason, decode_event, is_terminal
from tokenbus.bus.kafka import (
    KafkaSetupError,
    check_connection,
    ensure_topics,
    new_consumer,
    start_producer,
)
from tokenbus.bus.kafka_cluster import KafkaCluster, Listener
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, kafka_env
from workers import LoadedModel

from .analytics_support import analytics_process
from .audit_support import auditing
from .conftest import ON_TANSU, assert_complete, collect, eventually, serving, working
from .guard_support import guarding
from .kafka_security_support import (
    CLIENT_KEY_PASSWORD,
    PASSWORD,
    USER,
    Certificates,
    make_certificates,
    run_tokenbus,
)

on_kafka = pytest.mark.skipif(
    ON_TANSU, reason="TLS and SASL are Apache Kafka's listeners; Tansu has neither"
)


# -- the cluster ----------------------------------------------------------------


@dataclass(frozen=True)
class SecureKafka:
    bootstrap: str  # the SASL_SSL listener
    mutual_tls: str  # an SSL listener that requires a client certificate
    plaintext: str  # the cluster's PLAINTEXT listener, beside it
    certificates: Certificates

    def settings(self, **overrides: Any) -> KafkaSettings:
        """Settings for this listener (SCRAM-SHA-256 as alice) and fresh topics."""
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "topic_prefix": f"t{uuid.uuid4().hex[:12]}.",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-256",
            "kafka_sasl_username": USER,
            "kafka_sasl_password": SecretStr(PASSWORD),
            "kafka_ssl_cafile": self.certificates.ca,
        }
        return KafkaSettings(**(values | overrides))


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    if ON_TANSU:
        pytest.skip("TLS and SASL are Apache Kafka's listeners; Tansu has neither")
    certificates = make_certificates(tmp_path_factory.mktemp("certificates"))
    port = free_port()
    prefix = "listener.name.sasl_ssl."
    listener = Listener(
        name="SASL_SSL",
        protocol="SASL_SSL",
        ports=(port,),
        settings={
            prefix + "ssl.keystore.type": "PEM",
            prefix + "ssl.keystore.location": str(certificates.broker_keystore),
            prefix + "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            prefix + "plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'user_{USER}="{PASSWORD}";'
            ),
            prefix + "scram-sha-256.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            prefix + "scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        },
    )
    tls_port = free_port()
    tls = "listener.name.ssl."
    mutual_tls = Listener(
        name="SSL",
        protocol="SSL",
        ports=(tls_port,),
        settings={
            tls + "ssl.keystore.type": "PEM",
            tls + "ssl.keystore.location": str(certificates.broker_keystore),
            tls + "ssl.truststore.type": "PEM",
            tls + "ssl.truststore.location": str(certificates.ca),
            tls + "ssl.client.auth": "required",
        },
    )
    # KRaft keeps SCRAM credentials in its metadata: they are made at format time.
    scram = [
        arg
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
        for arg in ("--add-scram", f"{mechanism}=[name={USER},password={PASSWORD}]")
    ]
    listeners = (listener, mutual_tls)
    with KafkaCluster(ports=[free_port()], listeners=listeners, format_args=scram) as cluster:
        yield SecureKafka(
            bootstrap=f"127.0.0.1:{port}",
            mutual_tls=f"127.0.0.1:{tls_port}",
            plaintext=cluster.bootstrap,
            certificates=certificates,
        )


@pytest.fixture
async def secure(secure_kafka: SecureKafka) -> KafkaSettings:
    kafka = secure_kafka.settings()
    await ensure_topics(kafka)
    return kafka


# -- every part over SASL_SSL -----------------------------------------------------


@on_kafka
async def test_every_part_works_over_sasl_ssl_with_scram(
    secure: KafkaSettings, smollm: LoadedModel, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await check_connection(secure)
    store = str(tmp_path / "audit.db")
    key = Ed25519PrivateKey.generate()
    async with (
        analytics_process(
            secure, tmp_path / "analytics.log", ready_within=60, stop=signal.SIGTERM
        ) as analytics,
        serving(secure) as (url, http),
        TokenbusClient(url) as client,
        auditing(secure, store, key),
    ):
        # Cancelled before any worker runs: the worker's cancel reader must read it
        # back from tokenbus.control, or the request would be generated.
        cancelled = await client.submit(prompt="Never generated.", max_tokens=20)
        assert (await http.delete(f"/v1/requests/{cancelled.request_id}")).status_code == 202
        async with working(secure, smollm), guarding(secure):
            # Strict: the relay delivers only what the guard has judged, so the
            # stream completes only if the guard and the relay's verdict tail both
            # work over SASL_SSL (else it fails closed).
            submission = await client.submit(
                prompt="Say hi.", max_tokens=5, temperature=0, moderation="strict"
            )
            events = await collect(client, submission.request_id)
            skipped = await collect(client, cancelled.request_id)
        assert_complete(events)
        assert isinstance(events[-1], FinishedEvent)
        assert events[-1].content_filter is None
        assert [type(e) for e in skipped] == [FinishedEvent]
        assert skipped[0].finish_reason == FinishReason.CANCELLED  # type: ignore[union-attr]

        with open_store(store) as reader:

            def audited() -> bool:
                stored = reader.events(submission.request_id)
                return bool(stored) and is_terminal(decode_event(stored[-1].value))

            await eventually(audited, within=30)
            assert [decode_event(r.value) for r in reader.events(submission.request_id)] == events

        async with httpx.AsyncClient(base_url=analytics.url, timeout=10) as summaries:

            async def counted() -> bool:
                summary = (await summaries.get("/summary")).json()
                return bool(sum(row["requests"] for row in summary["by_model"]) >= 1)

            await eventually(counted, within=30)


@on_kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
async def test_each_mechanism_produces_and_consumes(
    secure_kafka: SecureKafka, mechanism: str
) -> None:
    kafka = secure_kafka.settings(kafka_sasl_mechanism=mechanism)
    await check_connection(kafka)
    await ensure_topics(kafka)
    producer = await start_producer(kafka)
    try:
        sent = await producer.send_and_wait(kafka.topics.control, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = new_consumer(kafka, kafka.topics.control)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert (record.partition, record.offset) == (sent.partition, sent.offset)
    assert record.value == b"hello"


def mutual_tls(secure_kafka: SecureKafka, **overrides: Any) -> KafkaSettings:
    certificates = secure_kafka.certificates
    values: dict[str, Any] = {
        "bootstrap_servers": secure_kafka.mutual_tls,
        "topic_prefix": f"t{uuid.uuid4().hex[:12]}.",
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": certificates.ca,
        "kafka_ssl_certfile": certificates.client_cert,
        "kafka_ssl_keyfile": certificates.client_key,
        "kafka_ssl_key_password": SecretStr(CLIENT_KEY_PASSWORD),
    }
    return KafkaSettings(**(values | overrides))


@on_kafka
async def test_a_client_certificate_with_an_encrypted_key_gets_in(
    secure_kafka: SecureKafka,
) -> None:
    kafka = mutual_tls(secure_kafka)
    await check_connection(kafka)
    await ensure_topics(kafka)
    producer = await start_producer(kafka)
    try:
        await producer.send_and_wait(kafka.topics.control, b"hello", key=b"k")
    finally:
        await producer.stop()


@on_kafka
async def test_plaintext_is_still_the_default(secure_kafka: SecureKafka) -> None:
    await check_connection(KafkaSettings(bootstrap_servers=secure_kafka.plaintext))


# -- refusals: one line naming the setting, at once ---------------------------------


async def refusal(kafka: KafkaSettings) -> str:
    """The startup check's error, which must come within a few seconds."""
    started = time.monotonic()
    with pytest.raises(KafkaSetupError) as refused:
        async with asyncio.timeout(5):
            await check_connection(kafka)
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "\n" not in message
    return message


@on_kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_a_wrong_password_names_the_credentials(
    secure_kafka: SecureKafka, mechanism: str
) -> None:
    kafka = secure_kafka.settings(
        kafka_sasl_mechanism=mechanism, kafka_sasl_password=SecretStr("not-the-password")
    )
    message = await refusal(kafka)
    assert message.startswith("TOKENBUS_KAFKA_SASL_USERNAME/PASSWORD: "), message
    assert f"refused {mechanism} authentication for user 'alice'" in message
    assert "not-the-password" not in message


@on_kafka
async def test_a_ca_that_did_not_sign_the_broker_names_the_ca_file(
    secure_kafka: SecureKafka,
) -> None:
    kafka = secure_kafka.settings(kafka_ssl_cafile=secure_kafka.certificates.other_ca)
    message = await refusal(kafka)
    assert message.startswith("TOKENBUS_KAFKA_SSL_CAFILE: the broker's certificate at "), message
    assert "is not trusted" in message and str(secure_kafka.certificates.other_ca) in message


@on_kafka
async def test_the_system_cas_do_not_trust_a_private_ca(secure_kafka: SecureKafka) -> None:
    kafka = secure_kafka.settings(kafka_ssl_cafile=None)
    message = await refusal(kafka)
    assert message.startswith("TOKENBUS_KAFKA_SSL_CAFILE: "), message
    assert "system's CAs" in message


@on_kafka
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
async def test_a_protocol_the_listener_does_not_speak_names_the_protocol(
    secure_kafka: SecureKafka, protocol: str
) -> None:
    # SSL to a SASL_SSL listener gets as far as the version lookup (answered before
    # authentication), and is hung up on at the first real request.
    kafka = KafkaSettings(
        bootstrap_servers=secure_kafka.bootstrap,
        kafka_security_protocol=protocol,
        kafka_ssl_cafile=secure_kafka.certificates.ca if protocol == "SSL" else None,
    )
    message = await refusal(kafka)
    assert message.startswith(f"TOKENBUS_KAFKA_SECURITY_PROTOCOL={protocol}: the broker at ")
    assert "broke the connection off" in message


@on_kafka
async def test_no_client_certificate_where_one_is_required_names_the_certfile(
    secure_kafka: SecureKafka,
) -> None:
    kafka = mutual_tls(
        secure_kafka,
        kafka_ssl_certfile=None,
        kafka_ssl_keyfile=None,
        kafka_ssl_key_password=None,
    )
    message = await refusal(kafka)
    assert message.startswith("TOKENBUS_KAFKA_SSL_CERTFILE: the broker at "), message


@on_kafka
@pytest.mark.parametrize(
    "command", ["topics", "serve", "worker", "audit run", "analytics", "guard", "up"]
)
def test_each_command_prints_one_line_and_exits_for_a_wrong_password(
    secure_kafka: SecureKafka, command: str, tmp_path: Path
) -> None:
    kafka = secure_kafka.settings(kafka_sasl_password=SecretStr("not-the-password"))
    env = kafka_env(kafka) | {
        "TOKENBUS_AUDIT_STORE": str(tmp_path / "audit.db"),  # not the user's own
        "TOKENBUS_PORT": str(free_port()),
        "TOKENBUS_ANALYTICS_PORT": str(free_port()),
    }
    result = run_tokenbus(*command.split(), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    name = command.split()[0]
    assert lines[0].startswith(f"tokenbus {name}: TOKENBUS_KAFKA_SASL_USERNAME/PASSWORD: ")
    assert result.stdout == ""
