"""Kafka security settings checked without a broker: what KafkaSettings refuses,
what building a client refuses (an unreadable CA, a wrong key password), the one
line the command line prints, and `kafka_env` handing them to a child. Against a
broker: test_kafka_security.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import SecretStr, ValidationError

from tokenbus.bus.kafka import KafkaSetupError, client_options
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, kafka_env

from .kafka_security_support import PASSWORD, USER, make_certificates, run_tokenbus


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
    result = run_tokenbus("topics", env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tokenbus topics: TOKENBUS_KAFKA_SSL_CAFILE: cannot read {tmp_path / 'nope.pem'} "
        "(No such file or directory)"
    )


def test_the_cli_names_an_unknown_protocol_in_one_line() -> None:
    env = {"TOKENBUS_KAFKA_SECURITY_PROTOCOL": "TLS"}
    result = run_tokenbus("topics", env=env, timeout=60)
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
