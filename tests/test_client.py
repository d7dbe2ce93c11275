"""The Python client: a dropped connection is resumed with Last-Event-ID, and what
`stream` yields stays contiguous and duplicate-free."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from producers import TokenbusClient, TokenbusError
from schemas import uuid7

from .conftest import Stack, assert_complete, collect, free_port

CHAT = [{"role": "user", "content": "Count from one to twenty in words."}]


class CuttingProxy:
    """A TCP proxy to the relay that cuts a connection once it has carried
    ``cut_after`` bytes towards the client, ``cuts`` times in all."""

    def __init__(self, upstream_port: int, *, cut_after: int, cuts: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._cut_after = cut_after
        self.cuts_left = cuts

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: int | None) -> None:  # fmt: skip
        carried = 0
        try:
            while data := await reader.read(256):
                writer.write(data)
                await writer.drain()
                carried += len(data)
                if limit is not None and carried >= limit and self.cuts_left > 0:
                    self.cuts_left -= 1
                    return
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self._upstream)
        down = asyncio.create_task(self._pipe(up_r, client_w, self._cut_after))
        up = asyncio.create_task(self._pipe(client_r, up_w, None))
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        for task in (down, up):
            task.cancel()
        client_w.close()
        up_w.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        async with server:
            yield f"http://127.0.0.1:{self.port}"


async def test_stream_resumes_after_the_connection_drops(stack: Stack) -> None:
    submission = await stack.client.submit(messages=CHAT, max_tokens=48, temperature=0)
    relay_port = int(stack.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(relay_port, cut_after=2500, cuts=2)
    async with proxy.running() as url, TokenbusClient(url) as client:
        through_cuts = await collect(client, submission.request_id)
    assert proxy.cuts_left == 0  # the connection really was cut, twice
    assert_complete(through_cuts)
    assert through_cuts == await collect(stack.client, submission.request_id)


async def test_unknown_request_raises_with_the_servers_reason(stack: Stack) -> None:
    with pytest.raises(TokenbusError) as caught:
        await collect(stack.client, uuid7())
    assert caught.value.status == 404 and caught.value.code == "unknown_request"
