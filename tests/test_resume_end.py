"""Resuming at or past the end of a stream: nothing waits for a seq that cannot come.

At the terminal seq of a finished stream the answer is 204 at once (an EventSource
stops reconnecting), past it a 416 that says where the stream ended; the client and
the command line end too. A live stream's end is not known, so there a high seq
is waited for as before."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import pytest

from producers import TokenbusClient, TokenbusError
from schemas import FinishReason, GenerationRequest, Timings, Usage
from tokenbus.bus.kafka import new_producer
from tokenbus.bus.settings import KafkaSettings
from workers.publisher import EventStream

from .conftest import assert_complete, collect, serving
from .test_fanout import submit_only

END = 3  # started, two tokens, finished


async def publish_short_stream(kafka: KafkaSettings, request: GenerationRequest) -> None:
    producer = new_producer(kafka)
    await producer.start()
    try:
        stream = EventStream(producer, kafka.topics.tokens, request.request_id, "w")
        await stream.started(model="m", model_revision="r", prompt_tokens=1, queue_wait_ms=0.0)
        for word in ("a", " b"):
            await stream.token(word, [1], None)
        await stream.finished(FinishReason.LENGTH, Usage(prompt_tokens=1, completion_tokens=2),
                              Timings(ttft_ms=1.0, total_ms=2.0))  # fmt: skip
    finally:
        await producer.stop()


async def status_of(http: httpx.AsyncClient, url: str, **kwargs: object) -> httpx.Response:
    """The response's head only (a stream that goes on would never be read to its end)."""
    async with asyncio.timeout(20), http.stream("GET", url, **kwargs) as resp:  # type: ignore[arg-type]
        if resp.status_code != 200:
            await resp.aread()
        return resp


async def check_the_end(http: httpx.AsyncClient, base: str, request: GenerationRequest) -> None:
    url = f"/v1/requests/{request.request_id}/events"
    for at_end in ({"headers": {"Last-Event-ID": str(END)}}, {"params": {"after": END}}):
        resp = await status_of(http, url, **at_end)
        assert resp.status_code == 204, at_end
        assert resp.content == b""
    past: list[dict[str, Any]] = [
        {"headers": {"Last-Event-ID": str(END + 1)}},
        {"params": {"after": 1_000_000}},
        {"headers": {"Last-Event-ID": str(2**62)}},
    ]
    for beyond in past:
        resp = await status_of(http, url, **beyond)
        assert resp.status_code == 416, beyond
        error = resp.json()["error"]
        assert error["code"] == "after_end_of_stream"
        assert f"ended at seq {END}" in error["message"]
    for huge in ({"headers": {"Last-Event-ID": str(2**64)}}, {"params": {"after": 10**30}}):
        resp = await status_of(http, url, **huge)
        assert resp.status_code == 400, huge  # beyond int64: malformed, not a 500
        assert resp.json()["error"]["code"] in {"invalid_last_event_id", "invalid_after"}
    # Below the end it resumes as ever.
    resp = await status_of(http, url, headers={"Last-Event-ID": str(END - 1)})
    assert resp.status_code == 200

    async with TokenbusClient(base) as client:
        async with asyncio.timeout(20):
            assert await collect(client, request.request_id, after=END) == []
            with pytest.raises(TokenbusError) as past_end:
                await collect(client, request.request_id, after=END + 5)
        assert past_end.value.status == 416 and past_end.value.code == "after_end_of_stream"
        tail = await collect(client, request.request_id, after=END - 2)
    assert_complete(tail, after=END - 2)


async def test_resuming_a_finished_stream_at_or_past_its_end_read_from_the_log(
    kafka: KafkaSettings,
) -> None:
    request = await submit_only(kafka)
    await publish_short_stream(kafka, request)
    async with serving(kafka) as (base, http):  # a relay that never saw it: the log
        await check_the_end(http, base, request)


async def test_resuming_a_finished_stream_at_or_past_its_end_held_by_the_relay(
    kafka: KafkaSettings,
) -> None:
    request = await submit_only(kafka)
    async with serving(kafka) as (base, http):
        async with TokenbusClient(base) as client:
            reading = asyncio.create_task(collect(client, request.request_id))
            await publish_short_stream(kafka, request)
            assert_complete(await asyncio.wait_for(reading, 30))  # now the hub holds it
        await check_the_end(http, base, request)


async def test_a_live_stream_still_waits_for_a_high_seq(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)  # no worker: not finished, its end unknown
    async with serving(kafka) as (_, http):
        resp = await status_of(
            http, f"/v1/requests/{request.request_id}/events", params={"after": 1_000}
        )
    assert resp.status_code == 200


async def test_stream_command_ends_at_or_past_the_end(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)
    await publish_short_stream(kafka, request)
    async with serving(kafka) as (base, _):
        results = []
        for after in (END, 1_000_000):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tokenbus", "stream", str(request.request_id),
                "--after", str(after), f"--url={base}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
            results.append((proc.returncode, out.decode(), err.decode()))
    (code_at, out_at, _), (code_past, _, err_past) = results
    assert code_at == 0 and out_at == ""
    assert code_past == 1
    assert "after_end_of_stream" in err_past and f"ended at seq {END}" in err_past
    assert "Traceback" not in err_past
