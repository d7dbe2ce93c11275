"""What the Kafka security tests share: alice's SASL credentials, a CA made here and
the certificates it signs, and `tokenbus` run as a command."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USER, PASSWORD = "alice", "alice-secret"
CLIENT_KEY_PASSWORD = "client-key-secret"


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


def run_tokenbus(
    *args: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -m tokenbus ARGS` with the Kafka and tokenbus variables of ``env`` alone,
    none of this process's."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    return subprocess.run(
        [sys.executable, "-m", "tokenbus", *args],
        env=clean | env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
