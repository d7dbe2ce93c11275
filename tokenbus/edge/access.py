"""Who may do what: API keys mapped to tenants, signed stream tokens, and limits.

- ``Authorization: Bearer <key>`` names the tenant (the ``openai`` SDK sends its
  ``api_key`` this way). With no keys configured there is one tenant, ``default``,
  and the server refuses to listen beyond loopback.
- A stream token (returned on submission) lets a browser's EventSource, which
  cannot set headers, read one request's stream with ``?token=``. It is
  ``<request_id>.<tenant>.<expiry>.<HMAC-SHA256>``, checked in constant time.
- Limits are per process (per relay instance): submissions per tenant per minute,
  open streams per tenant, open streams per client address. Each answers 429 with
  ``Retry-After``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from tokenbus.bus.settings import ServerSettings

from .errors import ApiError

ANONYMOUS_TENANT = "default"


class AccessConfigError(ValueError):
    """The access settings cannot be served as they are: a one-line reason, naming
    the setting to change. Raised when the app is built, before it listens."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    client: str  # the client's address, for per-client limits


class Access:
    def __init__(self, settings: ServerSettings) -> None:
        keys = dict(settings.api_keys)
        if settings.api_keys_file is not None:
            keys |= _read_keys_file(settings.api_keys_file)
        self._keys = keys
        # Anonymity is decided by the keys loaded, not by whether a keys file was
        # named: a file that yields no keys would otherwise turn authentication off.
        if not keys and not is_loopback(settings.host):
            raise AccessConfigError(
                f"no API keys are configured, so it will not listen on {settings.host}. "
                'Set TOKENBUS_API_KEYS=\'{"<key>": "<tenant>"}\' (or TOKENBUS_API_KEYS_FILE), '
                "or listen on 127.0.0.1 (TOKENBUS_HOST)."
            )
        secret = settings.stream_token_secret
        self._secret = secret.get_secret_value().encode() if secret else secrets.token_bytes(32)
        self._token_ttl_s = settings.stream_token_ttl_s
        key = settings.metrics_key
        self._metrics_key = key.get_secret_value().encode() if key else None
        self._submissions = _RateLimiter(settings.tenant_requests_per_minute, per_s=60.0)
        self._streams_per_tenant = _Gauge(settings.tenant_max_streams, "open streams for tenant")
        self._streams_per_client = _Gauge(
            settings.max_connections_per_client, "open streams from this client"
        )

    @property
    def anonymous(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None, client: str) -> Caller:
        if self.anonymous:
            return Caller(ANONYMOUS_TENANT, client)
        scheme, _, key = (authorization or "").partition(" ")
        tenant = self._keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise ApiError(
                401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return Caller(tenant, client)

    def authorize_metrics(self, authorization: str | None, client: str) -> None:
        """``/metrics`` is for the operator: with a metrics key only that key reads it;
        without one, any valid API key does (and none is needed only without keys)."""
        if self._metrics_key is None:
            self.authenticate(authorization, client)
            return
        scheme, _, key = (authorization or "").partition(" ")
        given = key.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self._metrics_key):
            raise ApiError(
                401, "unauthorized",
                "send the metrics key (TOKENBUS_METRICS_KEY) as 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    # -- stream tokens ---------------------------------------------------------------

    def stream_token(self, request_id: uuid.UUID, tenant: str) -> str:
        expires = int(time.time()) + self._token_ttl_s
        payload = f"{request_id}.{tenant}.{expires}"
        return f"{payload}.{self._sign(payload)}"

    def check_stream_token(self, token: str, request_id: uuid.UUID, client: str) -> Caller:
        """The caller a stream token stands for; 403 for a forged, expired or foreign one."""
        payload, _, signature = token.rpartition(".")
        rid, _, rest = payload.partition(".")
        tenant, _, expires = rest.rpartition(".")
        valid = hmac.compare_digest(signature.encode(), self._sign(payload).encode())
        if not valid or rid != str(request_id):
            raise ApiError(403, "invalid_stream_token", "this stream token is not valid here")
        if not expires.isdigit() or int(expires) < time.time():
            raise ApiError(403, "expired_stream_token", "this stream token has expired; "
                           "submit again or authenticate with an API key")  # fmt: skip
        return Caller(tenant, client)

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    # -- limits ----------------------------------------------------------------------

    def admit_submission(self, caller: Caller) -> None:
        retry_after = self._submissions.take(caller.tenant)
        if retry_after is not None:
            raise ApiError(
                429, "rate_limited", f"tenant {caller.tenant!r} is over its request rate",
                {"Retry-After": str(max(1, round(retry_after)))},
            )  # fmt: skip

    def open_stream(self, caller: Caller) -> Callable[[], None]:
        """Count a stream against the caller's limits (429 when over); returns the
        function that releases it."""
        self._streams_per_tenant.acquire(caller.tenant)
        try:
            self._streams_per_client.acquire(caller.client)
        except ApiError:
            self._streams_per_tenant.release(caller.tenant)
            raise

        def release() -> None:
            self._streams_per_client.release(caller.client)
            self._streams_per_tenant.release(caller.tenant)

        return release


class _RateLimiter:
    """A token bucket per key: ``rate`` per ``per_s`` seconds, bursts up to ``rate``."""

    def __init__(self, rate: int, *, per_s: float) -> None:
        self._capacity = float(rate)
        self._refill_per_s = rate / per_s
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float | None:
        """Take one token; None if granted, else seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._refill_per_s)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._refill_per_s
        self._buckets[key] = (tokens - 1, now)
        return None


class _Gauge:
    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._what = what
        self._open: defaultdict[str, int] = defaultdict(int)

    def acquire(self, key: str) -> None:
        if self._open[key] >= self._limit:
            raise ApiError(
                429, "too_many_streams", f"{self._limit} {self._what} already; close one first",
                {"Retry-After": "1"},
            )  # fmt: skip
        self._open[key] += 1

    def release(self, key: str) -> None:
        self._open[key] -= 1
        if not self._open[key]:
            del self._open[key]


def _read_keys_file(path: object) -> dict[str, str]:
    where = f"TOKENBUS_API_KEYS_FILE ({path})"
    try:
        with open(str(path)) as f:
            keys = json.load(f)
    except OSError as exc:
        raise AccessConfigError(f"{where} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise AccessConfigError(f"{where} is not JSON: {exc}") from None
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in keys.items()
    ):
        raise AccessConfigError(f"{where}: expected a JSON object of API key -> tenant")
    if not keys:
        # Named but empty is a mistake (a file not yet filled in, a bad deploy), not
        # a wish for anonymous access: refuse to start rather than serve anyone.
        raise AccessConfigError(f"{where} holds no API keys; put at least one in it, "
                                "or unset TOKENBUS_API_KEYS_FILE")  # fmt: skip
    return keys
