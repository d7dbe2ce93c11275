"""Tenants: API keys name them; a stream is readable only by its tenant, live or
replayed, from any relay; stream tokens for EventSource; limits answer 429."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from producers import TokenbusClient, TokenbusError
from schemas import StreamEvent, decode_event
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, ServerSettings
from tokenbus.edge.access import AccessConfigError
from tokenbus.edge.app import create_app
from workers import LoadedModel

from .conftest import assert_complete, eventually, serving, working

KEYS = {"key-acme": "acme", "key-globex": "globex"}
SECRET = "test-stream-token-secret"
CHAT = [{"role": "user", "content": "Say hi."}]
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}


def relay(
    kafka: KafkaSettings, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[tuple[str, httpx.AsyncClient]]:
    return serving(kafka, api_keys=KEYS, stream_token_secret=SECRET, **overrides)


@pytest.fixture
async def http(kafka: KafkaSettings, smollm: LoadedModel) -> AsyncIterator[httpx.AsyncClient]:
    async with relay(kafka) as (_, client), working(kafka, smollm):
        yield client


async def events_of(http: httpx.AsyncClient, url: str, **kwargs: Any) -> list[StreamEvent]:
    events = []
    async with aconnect_sse(http, "GET", url, **kwargs) as source:
        source.response.raise_for_status()
        async for message in source.aiter_sse():
            if message.data:
                events.append(decode_event(message.data.encode()))
    return events


async def submit(http: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, str]:
    resp = await http.post(
        "/v1/requests", json={"messages": CHAT, "max_tokens": 4}, headers=headers
    )
    assert resp.status_code == 202, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def test_without_a_key_nothing_is_accepted(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/requests", json={"messages": CHAT})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    bad = await http.post(
        "/v1/requests", json={"messages": CHAT}, headers={"Authorization": "Bearer x"}
    )
    assert bad.status_code == 401


async def test_another_tenant_cannot_read_a_stream_live_or_replayed(
    http: httpx.AsyncClient, kafka: KafkaSettings
) -> None:
    submitted = await submit(http, ACME)
    url = submitted["events_url"]
    live = await http.get(url, headers=GLOBEX)  # while it is queued or streaming
    assert live.status_code == 404
    assert submitted["request_id"] not in live.text or "no request" in live.text

    events = await events_of(http, url, headers=ACME)
    assert_complete(events)
    assert (await http.get(url, headers=GLOBEX)).status_code == 404
    assert (
        await http.delete(f"/v1/requests/{submitted['request_id']}", headers=GLOBEX)
    ).status_code == 404

    # A relay that never saw the submission learns the owner from the log.
    async with relay(kafka) as (_, fresh):
        assert (await fresh.get(url, headers=GLOBEX)).status_code == 404
        assert await events_of(fresh, url, headers=ACME) == events


async def test_stream_token_lets_eventsource_read_without_headers(http: httpx.AsyncClient) -> None:
    submitted = await submit(http, ACME)
    events = await events_of(
        http, submitted["events_url"], params={"token": submitted["stream_token"]}
    )
    assert_complete(events)


def forge(request_id: str, tenant: str, expires: int, secret: str = SECRET) -> str:
    payload = f"{request_id}.{tenant}.{expires}"
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


async def test_forged_expired_or_foreign_stream_tokens_are_refused(http: httpx.AsyncClient) -> None:
    acme = await submit(http, ACME)
    globex = await submit(http, GLOBEX)
    url = acme["events_url"]
    future = int(time.time()) + 600
    cases = {
        "wrong secret": forge(acme["request_id"], "acme", future, secret="guessed"),
        "tampered tenant": acme["stream_token"].replace(".acme.", ".globex."),
        "other request's token": globex["stream_token"],
        "expired": forge(acme["request_id"], "acme", int(time.time()) - 1),
        "garbage": "not-a-token",
    }
    for name, token in cases.items():
        resp = await http.get(url, params={"token": token})
        assert resp.status_code == 403, name
        assert resp.json()["error"]["code"] in {"invalid_stream_token", "expired_stream_token"}
    expired = await http.get(url, params={"token": cases["expired"]})
    assert expired.json()["error"]["code"] == "expired_stream_token"


async def test_tenant_request_rate_limit_answers_429_with_retry_after(kafka: KafkaSettings) -> None:
    async with relay(kafka, tenant_requests_per_minute=2) as (_, http):
        for _ in range(2):
            assert (
                await http.post("/v1/requests", json={"messages": CHAT}, headers=ACME)
            ).status_code == 202
        limited = await http.post("/v1/requests", json={"messages": CHAT}, headers=ACME)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        other = await http.post("/v1/requests", json={"messages": CHAT}, headers=GLOBEX)
        assert other.status_code == 202  # limits are per tenant


async def test_concurrent_stream_limit_answers_429(kafka: KafkaSettings) -> None:
    async with relay(kafka, tenant_max_streams=1) as (_, http):
        submitted = await submit(http, ACME)
        url = submitted["events_url"]
        async with http.stream("GET", url, headers=ACME) as first:  # no worker: it waits
            assert first.status_code == 200
            second = await http.get(url, headers=ACME)
            assert second.status_code == 429 and second.headers["retry-after"]

        async def released() -> bool:  # once the server has seen the first one hang up
            async with http.stream("GET", url, headers=ACME) as again:
                return bool(again.status_code == 200)

        await eventually(released)


def test_without_keys_the_server_refuses_to_listen_beyond_loopback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenbus", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "no API keys are configured" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_keys_file_without_keys_is_a_startup_error(tmp_path: Path, host: str) -> None:
    empty = tmp_path / "keys.json"
    empty.write_text("{}")
    with pytest.raises(AccessConfigError, match=r"TOKENBUS_API_KEYS_FILE .* holds no API keys"):
        create_app(kafka=KafkaSettings(), settings=ServerSettings(host=host, api_keys_file=empty))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
def test_the_app_itself_refuses_anonymity_beyond_loopback(host: str) -> None:
    """Whoever builds the app (not only `tokenbus serve`) gets the rule."""
    with pytest.raises(AccessConfigError, match="no API keys are configured"):
        create_app(kafka=KafkaSettings(), settings=ServerSettings(host=host))
    create_app(kafka=KafkaSettings(), settings=ServerSettings(host=host, api_keys=KEYS))


def test_serve_with_an_empty_keys_file_on_all_interfaces_exits_with_a_reason(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "keys.json"
    empty.write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "tokenbus", "serve", "--host", "0.0.0.0",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TOKENBUS_API_KEYS_FILE": str(empty)},
    )  # fmt: skip
    assert result.returncode != 0
    assert "TOKENBUS_API_KEYS_FILE" in result.stderr and "holds no API keys" in result.stderr
    assert "Traceback" not in result.stderr


async def test_relay_metrics_need_a_key_when_keys_are_configured(kafka: KafkaSettings) -> None:
    async with relay(kafka) as (_, http):
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=ACME)).status_code == 200
    async with relay(kafka, metrics_key="scrape-me") as (_, http):
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=ACME)).status_code == 401  # only its key
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert scraped.status_code == 200 and "tokenbus_relay_subscribers" in scraped.text


async def test_the_python_client_and_the_cli_authenticate_with_an_api_key(
    kafka: KafkaSettings, smollm: LoadedModel
) -> None:
    """In the keyed setup every client can sign in: `TokenbusClient(api_key=…)`, and
    `--api-key` / TOKENBUS_API_KEY on the command line; a wrong key is one line."""
    async with relay(kafka) as (url, _), working(kafka, smollm):
        async with TokenbusClient(url, api_key="key-acme") as client:
            submission = await client.submit(messages=CHAT, max_tokens=4)
            assert (submission.stream_token or "").startswith(f"{submission.request_id}.acme.")
            assert_complete([event async for event in client.stream(submission.request_id)])
        async with TokenbusClient(url) as anonymous:
            with pytest.raises(TokenbusError) as refused:
                await anonymous.submit(messages=CHAT, max_tokens=4)
            assert refused.value.status == 401

        async def cli(*args: str, key: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tokenbus", "submit", "Say hi.", "--max-tokens", "4",
                "--url", url, *args,
                env={**os.environ, "TOKENBUS_API_KEY": key},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode is not None
            return process.returncode, err.decode()

        status, err = await cli("--follow", key="key-globex")
        assert status == 0, err
        assert "[length: 4 tokens" in err
        status, err = await cli("--api-key", "not-a-key", key="key-globex")  # the flag wins
        assert status == 1
        assert err.startswith("tokenbus: 401") and "Traceback" not in err
        assert err.count("\n") == 1 and "--api-key or TOKENBUS_API_KEY" in err  # what to do
