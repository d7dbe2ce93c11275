"""An SSE client that costs next to nothing per event, so that a benchmark measures
the relay rather than its client: a GET written by hand on a plain asyncio socket,
and each read scanned once, in C, for the parts of a frame that matter.

    id: <seq>\\r\\n event: <type>\\r\\n data: {... "ts":"<publish time>" ...}\\r\\n\\r\\n

It checks what a real client would (the status, seqs contiguous from 0, the
terminal event, an ``event: error``) and hands each event to an `Observer`:
``started`` for seq 0, ``event`` with the receipt time and the event's ``ts`` for
every later one, ``terminal`` at the end. It does not decode the JSON: the
relay's frames are the schema's (`schemas.wire.sse_frame`), one line of JSON that
escapes newlines, so a frame's ``id:`` line starts after a line break, and
``event: `` and ``"ts":"`` occur once in a frame, ``"ts":"`` in the data.

The response is HTTP/1.1 chunked; every chunk the relay writes holds whole frames,
and the chunk-size lines between them end in a line break like a frame does, so
the scan needs no de-chunking. A read may end mid-frame: the last bytes of each
read are kept and scanned again with the next, and a part found wholly inside
them is not counted twice.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from typing import Protocol
from urllib.parse import urlsplit

# One alternative per part: a frame's seq, its publish time, a terminal or error event.
FRAME_PARTS = re.compile(rb'\nid: (\d+)\r\n|"ts":"([^"]+)"|event: (finished|failed|error)\r\n')
_CARRY = 64  # longer than any part above, so a part split between reads is found
_HEAD_END = b"\r\n\r\n"


class Observer(Protocol):
    def started(self) -> None: ...

    def event(self, received_at: float, published_at: float) -> None: ...

    def terminal(self) -> None: ...


def request_bytes(url: str, path: str) -> bytes:
    """A GET of ``path``; the server closes the connection once the response ends."""
    host = urlsplit(url).netloc
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url}: want http://host:port")
    return parts.hostname, parts.port


class RawSubscription(asyncio.Protocol):
    """One request's event stream on its own connection; ``headers`` resolves once a
    200 head has come, ``done`` once the terminal event has (or with the error)."""

    def __init__(self, request_id: str, observer: Observer) -> None:
        loop = asyncio.get_running_loop()
        self.headers: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._request_id = request_id
        self._observer = observer
        self._carry = b""
        self._head = b""  # until the response head has been read
        self._in_body = False
        self._next_seq = 0
        self._seq = -1

    def data_received(self, data: bytes) -> None:
        now = time.time()
        try:
            if not self._in_body:
                data = self._read_head(data)
            self._scan(data, now)
        except Exception as exc:  # noqa: BLE001 - handed to whoever awaits this stream
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RuntimeError(f"{self._request_id}: the stream ended before its terminal event"))

    def _read_head(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(_HEAD_END)
        if end < 0:
            return b""
        status = self._head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET events of {self._request_id}: {self._head[:500]!r}")
        self._in_body = True
        self.headers.set_result(None)
        body = self._head[end + 2 :]  # from the head's last line break, which a frame follows
        self._head = b""
        return body

    def _scan(self, data: bytes, now: float) -> None:
        buffer = self._carry + data
        seen = len(self._carry)
        for part in FRAME_PARTS.finditer(buffer):
            if part.end() <= seen:
                continue  # wholly in the carried bytes: scanned with the previous read
            seq, ts, kind = part.groups()
            if seq is not None:
                self._seq = int(seq)
                if self._seq != self._next_seq:
                    raise RuntimeError(
                        f"{self._request_id}: got seq {self._seq}, expected {self._next_seq}"
                    )
                self._next_seq += 1
                if self._seq == 0:
                    self._observer.started()
            elif ts is not None:
                if self._seq > 0:
                    self._observer.event(now, datetime.fromisoformat(ts.decode()).timestamp())
            elif kind == b"error":
                raise RuntimeError(f"relay error on {self._request_id}: {buffer[-300:]!r}")
            elif not self.done.done():
                self._observer.terminal()
                self.done.set_result(None)
        self._carry = buffer[-_CARRY:]

    def _fail(self, exc: BaseException) -> None:
        if not self.headers.done():
            self.headers.set_exception(exc)
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: the head's waiter raises it
        elif not self.done.done():
            self.done.set_exception(exc)


async def open_subscription(
    url: str, request_id: str, observer: Observer
) -> tuple[asyncio.Transport, RawSubscription]:
    """Connect, ask for the stream, and wait for its 200 head."""
    host, port = address(url)
    loop = asyncio.get_running_loop()
    transport, subscription = await loop.create_connection(
        lambda: RawSubscription(request_id, observer), host, port
    )
    transport.write(request_bytes(url, f"/v1/requests/{request_id}/events"))
    await subscription.headers
    return transport, subscription


async def read_whole(url: str, path: str) -> tuple[bytes, float]:
    """The whole response to a GET of ``path`` on a new connection, and the seconds
    from connecting to its last byte (the server's close)."""
    host, port = address(url)
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_bytes(url, path))
        chunks = []
        while chunk := await reader.read(1 << 16):
            chunks.append(chunk)
        took = time.perf_counter() - began
    finally:
        writer.close()
    return b"".join(chunks), took


def frames_in(response: bytes) -> tuple[bytes, int, bytes | None]:
    """A whole response's status line, its event count, and its last event's type."""
    status = response.split(b"\r\n", 1)[0]
    body = response[response.find(_HEAD_END) + 2 :]
    kinds = re.findall(rb"\nevent: (\w+)\r\n", body)
    return status, body.count(b"\nid: "), kinds[-1] if kinds else None
