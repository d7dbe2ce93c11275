"""`SseResponse`: a server-sent event stream as lean as one subscriber can be.

A relay holds thousands of open streams, most of them idle, and writes each event
to each of them, so what a stream costs per connection and per write matters:

- one task beside the request's own: it watches ``receive()`` for the client
  going away (and cancels the stream at once, which ends its subscription), and
  sends the keep-alive comment when nothing else was sent for ``ping_s``;
- each chunk the stream yields (one frame, or a batch of frames) is one
  ``send``, under the send timeout that drops a client stuck that long;
- on server shutdown (uvicorn's graceful one) the stream ends cleanly: the
  protocol (`tokenbus.edge.limits.server_config`) marks the scope with
  `SHUTDOWN` and wakes ``receive()``, and the watcher ends the stream with a
  complete response.

(sse-starlette's response, used before, runs four tasks in an anyio task group per
stream and a cancel scope per send: about 2.5 times this one's memory per idle
stream; see docs/measured.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Set in the ASGI scope by the protocol when the server shuts down.
SHUTDOWN = "tokenbus.shutdown"
_PING = b": ping\r\n\r\n"


class SseResponse(Response):
    # A Response for FastAPI to pass through as it is; none of Response's body
    # handling is used (__init__ does not call it).

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        ping_s: float,
        send_timeout_s: float,
        headers: Mapping[str, str] | None = None,
        on_end: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_end(complete)``: called once, however the response ends; ``complete``
        is False when the client went away, was dropped, or the server shut down
        before ``chunks`` ended."""
        self.status_code = 200
        self.background = None
        self._chunks = chunks
        self._ping_s = ping_s
        self._send_timeout_s = send_timeout_s
        self._head = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"connection", b"keep-alive"),
        ] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.raw_headers = self._head
        self._on_end = on_end
        self._send: Send | None = None
        self._sending = asyncio.Lock()
        self._last_sent = 0.0
        self._ended_by: str | None = None  # "client", "shutdown": why the watcher ended it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._head})
            complete = await self._stream(scope, receive, send)
        finally:
            with contextlib.suppress(RuntimeError):  # never started: nothing to close
                await self._chunks.aclose()  # type: ignore[attr-defined]
            if self._on_end is not None:
                self._on_end(complete)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> bool:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        self._send = send
        self._last_sent = loop.time()
        watcher = loop.create_task(self._watch(scope, receive, me))
        try:
            async for chunk in self._chunks:
                await self._write(chunk)
            await self._write(b"", more_body=False)
            return True
        except asyncio.CancelledError:
            if self._ended_by is None:
                raise  # not ours: the server is cancelling its tasks
            me.uncancel()
            if self._ended_by == "shutdown":
                with contextlib.suppress(Exception):
                    await self._write(b"", more_body=False)
            return False
        except TimeoutError:
            # The client has not taken a byte for send_timeout_s: drop it (uvicorn
            # closes a connection whose response is left incomplete).
            log.info("dropped an SSE client stuck for %gs", self._send_timeout_s)
            return False
        finally:
            watcher.cancel()

    async def _write(self, body: bytes, *, more_body: bool = True) -> None:
        assert self._send is not None
        async with self._sending, asyncio.timeout(self._send_timeout_s):
            await self._send({"type": "http.response.body", "body": body, "more_body": more_body})
        self._last_sent = asyncio.get_running_loop().time()

    async def _watch(self, scope: Scope, receive: Receive, stream: asyncio.Task[object]) -> None:
        """Until the client goes away or the server shuts down, pinging when idle."""
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_sent + self._ping_s - loop.time()
            message: Message | None = None
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        message = await receive()
            if message is None:
                if loop.time() - self._last_sent >= self._ping_s and not self._sending.locked():
                    try:
                        await self._write(_PING)
                    except TimeoutError:
                        self._end(stream, "client")
                        return
                continue
            if message["type"] == "http.disconnect":
                self._end(stream, "client")
                return
            if scope.get(SHUTDOWN):
                self._end(stream, "shutdown")
                return
            # Otherwise the request's own (empty) body: nothing to do.

    def _end(self, stream: asyncio.Task[object], why: str) -> None:
        self._ended_by = why
        stream.cancel()
