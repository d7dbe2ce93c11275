"""What a client may take of the HTTP server before its request reaches the app:
bodies are bounded in size and in time, request heads in time, connections in
number (against a real uvicorn, with raw sockets where a client must misbehave)."""

from __future__ import annotations

import asyncio
import json

import httpx

from tokenbus.bus.settings import KafkaSettings

from .conftest import eventually, serving

CHAT = [{"role": "user", "content": "hi"}]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port_of(url))


async def read_answer(reader: asyncio.StreamReader, within: float = 10) -> tuple[int, bytes]:
    """The status and whatever follows, up to the server closing the connection."""
    async with asyncio.timeout(within):
        data = await reader.read()  # to EOF: the server must close it
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def error_code(data: bytes) -> str:
    body = data.split(b"\r\n\r\n", 1)[1]
    return str(json.loads(body)["error"]["code"])


async def test_a_body_over_the_cap_is_413_before_it_is_read(kafka: KafkaSettings) -> None:
    async with serving(kafka, max_body_bytes=10_000) as (url, http):
        reader, writer = await connect(url)
        # Announce 20 MB and send none of it: the answer cannot wait for the body.
        writer.write(
            b"POST /v1/requests HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 20000000\r\n\r\n"
        )
        status, data = await read_answer(reader)
        writer.close()
        assert status == 413 and error_code(data) == "body_too_large"

        # Chunked, no length announced, more than the cap and no end: cut at the cap.
        reader, writer = await connect(url)
        writer.write(
            b"POST /v1/requests HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + b"1000\r\n" + b" " * 4096 + b"\r\n"
        )
        for _ in range(3):
            writer.write(b"1000\r\n" + b" " * 4096 + b"\r\n")
        status, data = await read_answer(reader)
        writer.close()
        assert status == 413 and error_code(data) == "body_too_large"
        # Under the cap all is as before.
        assert (await http.post("/v1/requests", json={"messages": CHAT})).status_code == 202


async def test_bodies_that_never_end_are_cut_off(kafka: KafkaSettings) -> None:
    async with serving(kafka, body_read_timeout_s=1) as (url, _):
        slow = []
        for _ in range(20):
            reader, writer = await connect(url)
            writer.write(
                b"POST /v1/requests HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b'transfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
            )  # and then nothing more, ever
            slow.append((reader, writer))
        answers = await asyncio.gather(*(read_answer(reader) for reader, _ in slow))
        for _, writer in slow:
            writer.close()
    assert [status for status, _ in answers] == [408] * 20
    assert error_code(answers[0][1]) == "body_timeout"


async def test_a_request_head_that_never_ends_is_cut_off(kafka: KafkaSettings) -> None:
    async with serving(kafka, body_read_timeout_s=1) as (url, _):
        reader, writer = await connect(url)
        writer.write(b"POST /v1/requests HTTP/1.1\r\nhost: x\r\n")  # no blank line, ever
        status, data = await read_answer(reader)
        writer.close()
        assert data == b"" and status == 0  # closed, nothing answered

        # A kept-alive connection's next head is bounded too.
        reader, writer = await connect(url)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        status, data = await read_answer(reader)
        writer.close()
        assert data == b""


async def test_connections_beyond_the_cap_are_refused_with_503(kafka: KafkaSettings) -> None:
    async with serving(kafka, max_connections=5, body_read_timeout_s=30) as (url, _):
        # The fixture's own client holds no connection yet; five idle ones fill the cap.
        held = [await connect(url) for _ in range(5)]
        reader, writer = await connect(url)
        status, data = await read_answer(reader)
        writer.close()
        assert status == 503 and error_code(data) == "too_many_connections"

        held.pop()[1].close()  # one goes: a new one is served again

        async def served() -> bool:
            try:
                async with httpx.AsyncClient(base_url=url) as fresh:
                    return (await fresh.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(served, within=10)
        for _, writer in held:
            writer.close()
