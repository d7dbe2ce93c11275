"""Secure connections (TOKENBUS_KAFKA_SECURITY_PROTOCOL and friends) against Apache
Kafka with a SASL_SSL listener: a CA made here signs the broker's certificate,
alice has a PLAIN password and SCRAM credentials. Every part of tokenbus talks to
it (topics, API, relay, worker and its cancel reader, audit, analytics), and the
settings it refuses (a wrong password, an untrusted CA, the wrong protocol) are
one line naming the setting, at once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr, ValidationError

from consumers.audit import open_store
from producers import TokenbusClient
from schemas import FinishedEvent, FinishReason, decode_event, is_terminal
from tokenbus.bus.kafka import (
    KafkaSetupError,
    check_connection,
    client_options,
    ensure_topics,
    new_consumer,
    start_producer,
)
from tokenbus.bus.kafka_cluster import KafkaCluster, Listener
from tokenbus.bus.settings import KafkaSettings, kafka_env
from workers import LoadedModel

from .audit_support import auditing
from .conftest import ON_TANSU, assert_complete, collect, eventually, free_port, serving, working

USER, PASSWORD = "alice", "alice-secret"
CLIENT_KEY_PASSWORD = "client-key-secret"
on_kafka = pytest.mark.skipif(
    ON_TANSU, reason="TLS and SASL are Apache Kafka's listeners; Tansu has neither"
)


# -- certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA that signed the broker's certificate (PEM)
    other_ca: Path  # a CA that signed nothing the broker has
    broker_keystore: Path  # the broker's PKCS#8 key and certificate chain (PEM)
    client_cert: Path  # a client certificate the CA signed (PEM)
    client_key: Path  # its key, encrypted with CLIENT_KEY_PASSWORD (PEM, PKCS#8)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _signed(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName],
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _key_pem(key: rsa.RSAPrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password is not None
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def make_certificates(directory: Path) -> Certificates:
    ca_key, ca_cert = _ca("tokenbus test CA")
    _, other_cert = _ca("a CA the broker never heard of")
    broker_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    key, cert = _signed(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, broker_names)
    client_key, client_cert = _signed(
        ca_key, ca_cert, "tokenbus", ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    paths = Certificates(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        broker_keystore=directory / "broker.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    paths.ca.write_bytes(_pem(ca_cert))
    paths.other_ca.write_bytes(_pem(other_cert))
    paths.broker_keystore.write_bytes(_key_pem(key) + _pem(cert) + _pem(ca_cert))
    paths.client_cert.write_bytes(_pem(client_cert))
    paths.client_key.write_bytes(_key_pem(client_key, CLIENT_KEY_PASSWORD))
    return paths


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


@contextlib.asynccontextmanager
async def analytics_process(kafka: KafkaSettings, log_path: Path) -> AsyncIterator[str]:
    """`tokenbus analytics` in a child process given these settings the way `up`
    gives them (`kafka_env`); yields its URL once its group is joined."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    env |= kafka_env(kafka) | {"TOKENBUS_ANALYTICS_PORT": str(port)}
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenbus", "analytics", env=env,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def joined() -> bool:
                if process.returncode is not None:
                    return True
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/readyz")).status_code == 200
                return False

            await eventually(joined, within=60)
            assert process.returncode is None, _tail(log_path)
            yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:]


@on_kafka
async def test_every_part_works_over_sasl_ssl_with_scram(
    secure: KafkaSettings, smollm: LoadedModel, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await check_connection(secure)
    store = str(tmp_path / "audit.db")
    key = Ed25519PrivateKey.generate()
    async with (
        analytics_process(secure, tmp_path / "analytics.log") as analytics_url,
        serving(secure) as (url, http),
        TokenbusClient(url) as client,
        auditing(secure, store, key),
    ):
        # Cancelled before any worker runs: the worker's cancel reader must read it
        # back from tokenbus.control, or the request would be generated.
        cancelled = await client.submit(prompt="Never generated.", max_tokens=20)
        assert (await http.delete(f"/v1/requests/{cancelled.request_id}")).status_code == 202
        async with working(secure, smollm):
            submission = await client.submit(prompt="Say hi.", max_tokens=5, temperature=0)
            events = await collect(client, submission.request_id)
            skipped = await collect(client, cancelled.request_id)
        assert_complete(events)
        assert isinstance(events[-1], FinishedEvent)
        assert [type(e) for e in skipped] == [FinishedEvent]
        assert skipped[0].finish_reason == FinishReason.CANCELLED  # type: ignore[union-attr]

        with open_store(store) as reader:

            def audited() -> bool:
                stored = reader.events(submission.request_id)
                return bool(stored) and is_terminal(decode_event(stored[-1].value))

            await eventually(audited, within=30)
            assert [decode_event(r.value) for r in reader.events(submission.request_id)] == events

        async with httpx.AsyncClient(base_url=analytics_url, timeout=10) as analytics:

            async def counted() -> bool:
                summary = (await analytics.get("/summary")).json()
                return sum(row["requests"] for row in summary["by_model"]) >= 1

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
@pytest.mark.parametrize("command", ["topics", "serve", "worker", "audit run", "analytics", "up"])
def test_each_command_prints_one_line_and_exits_for_a_wrong_password(
    secure_kafka: SecureKafka, command: str, tmp_path: Path
) -> None:
    kafka = secure_kafka.settings(kafka_sasl_password=SecretStr("not-the-password"))
    env = kafka_env(kafka) | {
        "TOKENBUS_AUDIT_STORE": str(tmp_path / "audit.db"),  # not the user's own
        "TOKENBUS_PORT": str(free_port()),
        "TOKENBUS_ANALYTICS_PORT": str(free_port()),
    }
    result = _tokenbus(*command.split(), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    name = command.split()[0]
    assert lines[0].startswith(f"tokenbus {name}: TOKENBUS_KAFKA_SASL_USERNAME/PASSWORD: ")
    assert result.stdout == ""


def _tokenbus(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    return subprocess.run(
        [sys.executable, "-m", "tokenbus", *args],
        env=clean | env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


# -- settings alone (no broker) -------------------------------------------------------


def test_sasl_needs_a_username_and_a_password(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs TOKENBUS_KAFKA_SASL_PASSWORD"):
        KafkaSettings(kafka_security_protocol="SASL_SSL", kafka_sasl_username=USER)
    with pytest.raises(ValidationError, match="TOKENBUS_KAFKA_SASL_USERNAME and TOKENBUS_KAFKA_"):
        KafkaSettings(kafka_security_protocol="SASL_PLAINTEXT")


def test_security_settings_beside_a_protocol_that_ignores_them_are_refused(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(ValidationError, match="TOKENBUS_KAFKA_SSL_CAFILE set but"):
        KafkaSettings(kafka_ssl_cafile=ca)
    with pytest.raises(ValidationError, match="does not use SASL"):
        KafkaSettings(
            kafka_security_protocol="SSL", kafka_sasl_username=USER, kafka_sasl_password="x"
        )


def test_a_missing_ca_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match=r"TOKENBUS_KAFKA_SSL_CAFILE: cannot read .*nope\.pem"
    ):
        KafkaSettings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "nope.pem")


def test_a_ca_file_that_is_no_certificate_names_the_setting(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    kafka = KafkaSettings(kafka_security_protocol="SSL", kafka_ssl_cafile=ca)
    with pytest.raises(KafkaSetupError, match=r"TOKENBUS_KAFKA_SSL_CAFILE: .* no usable PEM"):
        client_options(kafka)


def test_a_wrong_key_password_names_the_settings(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    kafka = KafkaSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=certificates.client_cert,
        kafka_ssl_keyfile=certificates.client_key,
        kafka_ssl_key_password=SecretStr("not-the-key-password"),
    )
    with pytest.raises(KafkaSetupError, match="TOKENBUS_KAFKA_SSL_CERTFILE/KEYFILE/KEY_PASSWORD"):
        client_options(kafka)


def test_a_client_key_that_does_not_match_its_certificate_names_the_settings(
    tmp_path: Path,
) -> None:
    certificates = make_certificates(tmp_path)
    key = tmp_path / "wrong-key.pem"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    kafka = KafkaSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=certificates.ca,
        kafka_ssl_certfile=certificates.ca,
        kafka_ssl_keyfile=key,
    )
    with pytest.raises(KafkaSetupError, match="TOKENBUS_KAFKA_SSL_CERTFILE/KEYFILE/KEY_PASSWORD"):
        client_options(kafka)


def test_the_cli_names_a_missing_ca_file_in_one_line(tmp_path: Path) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "TOKENBUS_KAFKA_SECURITY_PROTOCOL": "SSL",
        "TOKENBUS_KAFKA_SSL_CAFILE": str(tmp_path / "nope.pem"),
    }
    result = _tokenbus("topics", env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tokenbus topics: TOKENBUS_KAFKA_SSL_CAFILE: cannot read {tmp_path / 'nope.pem'} "
        "(No such file or directory)"
    )


def test_the_cli_names_an_unknown_protocol_in_one_line() -> None:
    env = {"TOKENBUS_KAFKA_SECURITY_PROTOCOL": "TLS"}
    result = _tokenbus("topics", env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "tokenbus topics: TOKENBUS_KAFKA_SECURITY_PROTOCOL: Input should be 'PLAINTEXT'"
    ), result.stderr


def test_kafka_env_gives_a_child_the_same_security_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certificates = make_certificates(tmp_path)
    kafka = KafkaSettings(
        bootstrap_servers="broker:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=USER,
        kafka_sasl_password=SecretStr(PASSWORD),
        kafka_ssl_cafile=certificates.ca,
        kafka_ssl_certfile=certificates.broker_keystore,
        kafka_ssl_key_password=SecretStr("key-secret"),
    )
    env = kafka_env(kafka)
    assert env["TOKENBUS_KAFKA_SASL_PASSWORD"] == PASSWORD
    assert env["TOKENBUS_KAFKA_SSL_KEY_PASSWORD"] == "key-secret"
    for name in list(os.environ):
        if name.startswith(("TOKENBUS_", "KAFKA_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert KafkaSettings() == kafka
