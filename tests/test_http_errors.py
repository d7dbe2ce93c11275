"""Bad input gets a 4xx with a reason; an unreachable broker gets a 503."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import psutil
import pytest

from schemas import uuid7
from tokenbus.bus.kafka import STOP_WITHIN_S, ensure_topics
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings

from .conftest import broker_under_test, serving

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def http(kafka: KafkaSettings) -> AsyncIterator[httpx.AsyncClient]:
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
        assert resp.json()["error"]["code"] == "broker_unavailable"
        chat = await http.post("/v1/chat/completions", json={"messages": CHAT})
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error"
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert (await http.get("/healthz")).status_code == 200


@contextlib.asynccontextmanager
async def own_broker() -> AsyncIterator[tuple[str, psutil.Process]]:
    """A broker of the kind under test, for this test alone: its bootstrap address
    and its process (the one listening on its port). Started and stopped in a
    thread: KafkaCluster waits for its node with an event loop of its own."""
    port = free_port()
    running = broker_under_test(port)
    await asyncio.to_thread(running.start)
    try:
        process = next(
            psutil.Process(c.pid)
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        )
        yield running.bootstrap, process
    finally:
        await asyncio.to_thread(running.stop)


@pytest.mark.broker_behaviour
async def test_a_send_the_broker_leaves_unanswered_is_a_503_at_once_naming_the_request() -> None:
    """A broker that holds the connection and answers nothing (a frozen node; here a
    paused one): the 503 comes at the send timeout, not after the failed producer's
    stop (which waits up to stop_all's bound for what it has in flight), and it
    names the request, since the broker may write it all the same."""
    async with own_broker() as (bootstrap, process):
        kafka = KafkaSettings(
            bootstrap_servers=bootstrap,
            request_timeout_ms=2000,
            topic_prefix=f"p{uuid.uuid4().hex[:8]}.",
        )
        await ensure_topics(kafka)
        async with serving(kafka) as (_, http):
            assert (await http.post("/v1/requests", json={"messages": CHAT})).status_code == 202
            process.suspend()
            try:
                began = time.monotonic()
                resp = await http.post("/v1/requests", json={"messages": CHAT})
                took = time.monotonic() - began
            finally:
                process.resume()
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "broker_unavailable"
            assert resp.headers["retry-after"]
            named = re.search(
                r"did not acknowledge request ([0-9a-f-]{36}) within 2s", reason(resp)
            )
            assert named, reason(resp)
            assert "may be written all the same" in reason(resp)
            assert took < STOP_WITHIN_S, f"the 503 took {took:.1f} s: it waited for the stop"
            # Still serving once the broker answers again (a fresh producer).
            again = await http.post("/v1/requests", json={"messages": CHAT})
            assert again.status_code == 202, again.text


# -- every validation error is a 4xx in the documented shape (issue 13) ------------

LONE_SURROGATE = '{"role": "user", "content": "\\udc00"}'  # the JSON escape, as sent


def openai_error(resp: httpx.Response) -> dict[str, object]:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"code", "message", "type", "param"}
    assert error["type"] == "invalid_request_error"
    return error  # type: ignore[no-any-return]


async def test_oversized_or_unencodable_messages_are_4xx_on_every_endpoint(
    http: httpx.AsyncClient,
) -> None:
    huge = {"role": "user", "content": "x" * 2_000_000}
    parts = [{"type": "text", "text": "x" * 20_000}] * 2  # each part fits, together not
    for body in ({"messages": [huge]}, {"messages": [{"role": "user", "content": parts}]}):
        resp = await http.post("/v1/chat/completions", json=body)
        assert "messages" in str(openai_error(resp)["message"])
    assert (await http.post("/v1/requests", json={"messages": [huge]})).status_code == 422

    raw = {"content-type": "application/json"}
    chat = '{"messages": [' + LONE_SURROGATE + "]}"
    openai_error(await http.post("/v1/chat/completions", content=chat, headers=raw))
    prompt = '{"prompt": "a\\udc00b"}'
    openai_error(await http.post("/v1/completions", content=prompt, headers=raw))
    native = await http.post("/v1/requests", content=chat, headers=raw)
    assert native.status_code == 422 and reason(native)


async def openai_post(http: httpx.AsyncClient, path: str, body: object) -> httpx.Response:
    """Only the head of the answer is awaited: a request wrongly accepted (streaming,
    so that it answers at once though no worker runs) fails the test, never hangs it."""
    async with asyncio.timeout(15), http.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
        return resp


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_openai_max_tokens_zero_is_refused_not_defaulted(
    http: httpx.AsyncClient, path: str, field: str
) -> None:
    body = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    resp = await openai_post(http, path, body | {field: 0, "stream": True})
    assert "max_tokens" in str(openai_error(resp)["message"])


@pytest.mark.parametrize(
    ("extra", "mentions"),
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 10.0}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": "7"}, "seed"),
        ({"deadline": 123}, "deadline"),
        ({"deadline": 2_000_000_000}, "deadline"),
        ({"cancel_on_disconnect": "true"}, "cancel_on_disconnect"),
        ({"cancel_on_disconnect": 1}, "cancel_on_disconnect"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
async def test_wrong_types_are_refused_not_coerced(
    http: httpx.AsyncClient, extra: dict[str, object], mentions: str
) -> None:
    resp = await http.post("/v1/requests", json={"messages": CHAT} | extra)
    assert resp.status_code == 422, resp.text
    assert mentions in reason(resp)


@pytest.mark.parametrize(
    "extra",
    [{"max_tokens": "10"}, {"n": "1"}, {"stream": "true"}, {"temperature": "0"}, {"seed": 1.5}],
)
async def test_openai_wrong_types_are_refused_not_coerced(
    http: httpx.AsyncClient, extra: dict[str, object]
) -> None:
    resp = await openai_post(
        http, "/v1/chat/completions", {"messages": CHAT, "stream": True} | extra
    )
    assert next(iter(extra)) in str(openai_error(resp)["message"])


async def test_strict_bodies_still_take_what_the_docs_say(http: httpx.AsyncClient) -> None:
    ok = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "top_p": 1,
          "deadline": "2030-01-01T00:00:00+02:00", "cancel_on_disconnect": True,
          "metadata": {"k": "v"}}  # fmt: skip
    resp = await http.post("/v1/requests", json=ok)
    assert resp.status_code == 202, resp.text
