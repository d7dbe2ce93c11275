"""How tokenbus connects to Kafka: the options every client takes (servers, TLS,
SASL), and the check each command makes at start, which turns a wrong password,
an untrusted certificate or the wrong protocol into one line naming the setting."""

from __future__ import annotations

import functools
import logging
import ssl
from pathlib import Path
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from .settings import KafkaSettings

log = logging.getLogger(__name__)


class KafkaSetupError(KafkaError):  # type: ignore[misc]
    """A setting keeps tokenbus from talking to the broker. The message is one line
    that names the setting to fix; the command line prints it and exits."""

    def __str__(self) -> str:
        return str(self.args[0])  # KafkaError's own puts its class name first


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """What every aiokafka client (producer, consumer, admin) is built with: the
    servers, the client id, the request timeout and the security settings. No
    client is built without it, so none talks to the broker in the clear by
    mistake."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": kafka.kafka_security_protocol,
    }
    if kafka.uses_ssl:
        options["ssl_context"] = ssl_context(kafka)
    if kafka.uses_sasl:
        assert kafka.kafka_sasl_password is not None  # the settings' validator says so
        options |= {
            "sasl_mechanism": kafka.kafka_sasl_mechanism,
            "sasl_plain_username": kafka.kafka_sasl_username,
            "sasl_plain_password": kafka.kafka_sasl_password.get_secret_value(),
        }
    return options


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of the SSL and SASL_SSL protocols: the broker's certificate
    must chain to ``TOKENBUS_KAFKA_SSL_CAFILE`` (the system's CAs when unset) and
    name the host it was reached at; a client certificate is presented when set."""
    password = kafka.kafka_ssl_key_password
    return _ssl_context(
        kafka.kafka_ssl_cafile,
        kafka.kafka_ssl_certfile,
        kafka.kafka_ssl_keyfile,
        password.get_secret_value() if password is not None else None,
    )


@functools.lru_cache(maxsize=8)
def _ssl_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, password: str | None
) -> ssl.SSLContext:
    # Cached: the relay builds a consumer per log read, and one context (read-only
    # once built) serves them all.
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (ssl.SSLError, OSError) as exc:
        raise KafkaSetupError(
            f"TOKENBUS_KAFKA_SSL_CAFILE: {cafile} holds no usable PEM certificate ({exc})"
        ) from None
    if certfile is not None:
        try:
            context.load_cert_chain(certfile, keyfile, password)
        except (ssl.SSLError, OSError) as exc:
            raise KafkaSetupError(
                "TOKENBUS_KAFKA_SSL_CERTFILE/KEYFILE/KEY_PASSWORD: cannot load the client "
                f"certificate {certfile} with its key {keyfile or certfile} ({exc})"
            ) from None
    return context


async def check_connection(kafka: KafkaSettings) -> None:
    """Connect to the bootstrap servers as every client will (TLS, SASL) and raise
    `KafkaSetupError` naming the setting at fault if the broker refuses: an
    untrusted certificate, a wrong password, a mechanism or protocol it does not
    speak. Left to the clients, such a refusal is a log line per retry and a
    service that never becomes ready.

    A broker that cannot be reached at all is no setting's fault (it may be
    starting): that is logged, and the services' own retries take over."""
    options = client_options(kafka)
    mismatch: KafkaSetupError | None = None
    unreachable: list[str] = []
    for server in kafka.bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        where = f"{host}:{port}"
        try:
            conn = await create_conn(
                host,
                int(port),
                client_id=options["client_id"],
                request_timeout_ms=options["request_timeout_ms"],
                security_protocol=options["security_protocol"],
                ssl_context=options.get("ssl_context"),
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
            try:
                # What a client asks first. A SASL listener answers the version
                # lookup before authentication, so this is what catches a client
                # that skips SASL (SSL to a SASL_SSL listener): the broker hangs up.
                await conn.send(MetadataRequest([]))
            finally:
                conn.close()
        except ssl.SSLCertVerificationError as exc:
            raise KafkaSetupError(_untrusted(kafka, where, host, exc)) from None
        except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
            raise KafkaSetupError(
                f"TOKENBUS_KAFKA_SASL_USERNAME/PASSWORD: the broker at {where} refused "
                f"{kafka.kafka_sasl_mechanism} authentication for user "
                f"{kafka.kafka_sasl_username!r} ({_reason(exc)})"
            ) from None
        except UnsupportedSaslMechanismError as exc:
            raise KafkaSetupError(
                f"TOKENBUS_KAFKA_SASL_MECHANISM: the broker at {where} does not offer "
                f"{kafka.kafka_sasl_mechanism} ({_reason(exc)})"
            ) from None
        except (ConnectionRefusedError, TimeoutError) as exc:
            unreachable.append(f"{where} ({_reason(exc)})")
        except (ssl.SSLError, ConnectionResetError, KafkaConnectionError, KafkaError) as exc:
            # Reached, but the conversation broke off: a listener that speaks another
            # protocol does that (TLS to a plaintext port, plaintext to a TLS one).
            refused = _client_certificate_refused(exc)
            if refused is not None:
                raise KafkaSetupError(_no_client_certificate(kafka, where, refused)) from None
            mismatch = KafkaSetupError(
                f"TOKENBUS_KAFKA_SECURITY_PROTOCOL={kafka.kafka_security_protocol}: the "
                f"broker at {where} broke the connection off ({_reason(exc)}); does that "
                "listener speak another protocol?"
            )
        except OSError as exc:  # no such host, no route: not reached
            unreachable.append(f"{where} ({_reason(exc)})")
        else:
            return
    if mismatch is not None:
        raise mismatch
    log.warning("no broker answered yet: %s", "; ".join(unreachable))


def _untrusted(
    kafka: KafkaSettings, where: str, host: str, exc: ssl.SSLCertVerificationError
) -> str:
    reason = exc.verify_message or _reason(exc)
    # X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: a trusted
    # certificate, but for another name than the one in the bootstrap servers.
    if exc.verify_code in (62, 64):
        return (
            f"KAFKA_BOOTSTRAP_SERVERS: the broker's certificate at {where} is not for "
            f"{host!r} ({reason}): name the broker as its certificate does"
        )
    source = kafka.kafka_ssl_cafile or "unset, so the system's CAs"
    return (
        f"TOKENBUS_KAFKA_SSL_CAFILE: the broker's certificate at {where} is not trusted "
        f"({reason}; CA file: {source})"
    )


# TLS alerts a broker sends when it wants a client certificate it did not get, or
# does not trust the one it got (Java sends bad_certificate for a missing one).
_CLIENT_CERTIFICATE_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
}


def _client_certificate_refused(exc: BaseException) -> ssl.SSLError | None:
    """The broker's TLS alert about our certificate, where ``exc`` comes of one. In
    TLS 1.3 the client's side of the handshake ends before the broker checks the
    client's certificate, so the alert comes on the first read, and aiokafka
    reports a closed connection caused by it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) and seen.reason in _CLIENT_CERTIFICATE_ALERTS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _no_client_certificate(kafka: KafkaSettings, where: str, alert: ssl.SSLError) -> str:
    certfile = kafka.kafka_ssl_certfile
    if certfile is None:
        return (
            f"TOKENBUS_KAFKA_SSL_CERTFILE: the broker at {where} requires a client "
            f"certificate and none is set ({alert.reason})"
        )
    return (
        f"TOKENBUS_KAFKA_SSL_CERTFILE: the broker at {where} refused the client "
        f"certificate {certfile} ({alert.reason})"
    )


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase on one line. A Kafka error's message alone:
    its str() adds the error code and class name, which say nothing to the user."""
    message = exc.args[0] if isinstance(exc, KafkaError) and exc.args else exc
    text = " ".join(str(message).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
