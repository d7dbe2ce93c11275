"""The relay's SSE response (`tokenbus.edge.sse_response`) on a real server: a
keep-alive comment when a stream is idle, a hang-up that frees the stream's slot, and a
server shutdown that ends open streams cleanly rather than waiting on them."""

from __future__ import annotations

import asyncio

import httpx

from tokenbus.bus.settings import KafkaSettings

from .conftest import serving
from .test_fanout import submit_only


async def test_an_idle_stream_gets_keep_alive_comments(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)  # no worker: the stream stays empty
    async with serving(kafka, keepalive_s=0.2) as (_url, http):
        path = f"/v1/requests/{request.request_id}/events"
        async with http.stream("GET", path) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["x-accel-buffering"] == "no"
            received = b""
            async with asyncio.timeout(10):
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if received.count(b": ping\r\n\r\n") >= 2:
                        break
            assert received == b": ping\r\n\r\n" * 2


async def test_a_client_that_hangs_up_frees_its_stream_slot(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)
    async with serving(kafka, tenant_max_streams=1) as (_url, http):
        path = f"/v1/requests/{request.request_id}/events"
        for _ in range(3):  # each would hold the tenant's one slot if it leaked
            async with asyncio.timeout(10):
                while True:
                    async with http.stream("GET", path) as response:
                        if response.status_code == 200:
                            second = await http.get(path)
                            assert second.status_code == 429  # the slot is this stream's
                            break
                    # 429: the last one's hang-up is still being noticed
                    assert response.status_code == 429
                    await asyncio.sleep(0.01)  # retry; bounded by the timeout


async def test_server_shutdown_ends_open_streams_cleanly(kafka: KafkaSettings) -> None:
    request = await submit_only(kafka)
    received: list[bytes] = []
    async with asyncio.timeout(60), httpx.AsyncClient(timeout=30) as client:
        async with serving(kafka) as (url, _):
            path = f"{url}/v1/requests/{request.request_id}/events"
            stream = client.stream("GET", path)
            response = await stream.__aenter__()
            assert response.status_code == 200

            async def read() -> None:
                async for chunk in response.aiter_bytes():
                    received.append(chunk)

            reading = asyncio.create_task(read())
        # The server has stopped (it did not wait on the open stream), and the
        # response ended as a complete chunked body: reading it raised nothing.
        await reading
        await stream.__aexit__(None, None, None)
    assert b"".join(received) == b""
