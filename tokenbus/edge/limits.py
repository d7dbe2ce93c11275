"""What the HTTP server allows a client before the app sees a request: a request
head and body read in bounded time, a bounded body, a bounded number of
connections per process.

- `BodyLimits`, an ASGI middleware: a body larger than ``max_body_bytes`` is a 413,
  sent as soon as ``Content-Length`` says so (before reading it) or as soon as a
  chunked body passes the cap; a body not read whole within
  ``body_read_timeout_s`` is a 408. Both close the connection.
- `server_config`, the uvicorn configuration every way of serving uses (`tokenbus
  serve`, `tokenbus up`, the tests): its protocol refuses a connection beyond
  ``max_connections`` with a 503 and closes one whose request head has not
  arrived within ``body_read_timeout_s`` (a slow-loris client). uvicorn's own
  ``limit_concurrency`` answers only once a head has arrived, in plain text.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbus.bus.settings import ServerSettings

from .errors import error_response
from .sse_response import SHUTDOWN

if TYPE_CHECKING:
    import uvicorn


class BodyLimits:
    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers:
            await self._app(scope, receive, send)  # no body (a GET, an SSE stream)
            return
        if length is not None and (not length.isdigit() or int(length) > self._max_bytes):
            await self._refuse(scope, receive, send, 413)  # said up front: nothing is read
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client is gone: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self._max_bytes:
                        await self._refuse(scope, receive, send, 413)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(scope, receive, send, 408)
            return
        await self._app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        if status == 413:
            code, message = "body_too_large", f"the body is over {self._max_bytes} bytes"
        else:
            code, message = "body_timeout", f"the body did not arrive in {self._timeout_s:g}s"
        # The rest of the body is never read: the connection cannot carry another request.
        response = error_response(status, code, message, {"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, already read, as the app asks for it; then the client's own
    messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    error = {"code": code, "message": message, "type": "server_error", "param": None}
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def server_config(app: ASGIApp, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with ``settings``' connection limits."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limit = settings.max_connections
    head_timeout_s = settings.body_read_timeout_s
    refused = _raw_response(
        503, "Service Unavailable", "too_many_connections",
        f"this server holds {limit} connections already; retry later",
    )  # fmt: skip

    class GuardedProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_for: object = None  # the cycle before the head being waited for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limit:  # this one counted already
                transport.write(refused)
                transport.close()
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            # A new request head starts (the first, or the next on a kept-alive
            # connection): it has head_timeout_s to arrive whole.
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and (self._head_timer is None or self._head_for is not self.cycle):
                self._arm_head_timer()
            super().data_received(data)

        def shutdown(self) -> None:
            super().shutdown()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # A response still streaming (SSE) is told to end cleanly: its
                # receive() wakes, and the scope says why (see edge/sse_response.py).
                cycle.scope[SHUTDOWN] = True  # type: ignore[literal-required]
                cycle.message_event.set()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_for = self.cycle
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_late)

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is self._head_for and not self.transport.is_closing():
                self.transport.close()  # no request head since the timer was armed

    return uvicorn.Config(
        app, host=settings.host, port=settings.port, http=GuardedProtocol, **options
    )
