"""Bad input gets a 4xx with a reason; an unreachable broker gets a 503."""

from __future__ import annotations

import uuid

import httpx
import pytest

from schemas import uuid7
from tokenbus.settings import KafkaSettings

from .conftest import free_port, serving

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def http(kafka: KafkaSettings) -> httpx.AsyncClient:
    async with serving(kafka) as (_, client):
        yield client


def reason(resp: httpx.Response) -> str:
    error = resp.json()["error"]
    assert error["code"] and error["message"]
    return str(error["message"])


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({}, "exactly one of"),
        ({"prompt": "x", "messages": CHAT}, "exactly one of"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": CHAT, "temperature": 2.5}, "temperature"),
        ({"messages": CHAT, "top_p": 0}, "top_p"),
        ({"messages": CHAT, "top_k": 0}, "top_k"),
        ({"messages": CHAT, "seed": -1}, "seed"),
        ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": CHAT, "stop": ["x" * 65]}, "stop"),
        ({"messages": CHAT, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"messages": CHAT, "metadata": {"k": "v" * 513}}, "metadata"),
        ({"messages": CHAT, "deadline": "2030-01-01T00:00:00"}, "deadline"),
        ({"messages": CHAT, "frobnicate": True}, "frobnicate"),
    ],
)
async def test_invalid_submission_is_422_with_a_reason(
    http: httpx.AsyncClient, body: dict[str, object], mentions: str
) -> None:
    resp = await http.post("/v1/requests", json=body)
    assert resp.status_code == 422
    assert mentions in reason(resp)


async def test_body_that_is_not_json_is_422(http: httpx.AsyncClient) -> None:
    resp = await http.post(
        "/v1/requests", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422
    assert reason(resp)


@pytest.mark.parametrize(
    ("request_id", "status"),
    [
        ("not-a-uuid", 400),
        (str(uuid.uuid4()), 400),  # a UUID, but not a tokenbus (v7) id
        (str(uuid7()), 404),  # well-formed, never submitted
        (str(uuid7(unix_ms=2_000_000_000_000 * 10)), 404),  # minted in the future
    ],
)
async def test_unknown_or_malformed_request_id(
    http: httpx.AsyncClient, request_id: str, status: int
) -> None:
    resp = await http.get(f"/v1/requests/{request_id}/events")
    assert resp.status_code == status
    assert request_id[:8] in reason(resp) or status == 404


@pytest.mark.parametrize("header", ["abc", "-5", "1.5"])
async def test_malformed_last_event_id_is_400(http: httpx.AsyncClient, header: str) -> None:
    resp = await http.get(f"/v1/requests/{uuid7()}/events", headers={"Last-Event-ID": header})
    assert resp.status_code == 400
    assert "Last-Event-ID" in reason(resp)


async def test_after_below_minus_one_is_422(http: httpx.AsyncClient) -> None:
    resp = await http.get(f"/v1/requests/{uuid7()}/events", params={"after": -2})
    assert resp.status_code == 422


async def test_unreachable_broker_gives_503_and_accepts_nothing() -> None:
    nowhere = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    async with serving(nowhere) as (_, http):
        resp = await http.post("/v1/requests", json={"messages": CHAT})
        assert resp.status_code == 503
        assert "broker" in reason(resp) and resp.headers["retry-after"]
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert (await http.get("/healthz")).status_code == 200
