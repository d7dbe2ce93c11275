"""`tokenbus serve`: the HTTP API and relay, and how `up` starts the same server.

Without API keys the server will not listen beyond loopback (the rule is in
`tokenbus.edge.access`); breaking it is a one-line exit here, not a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from tokenbus.bus.settings import AuditSettings, KafkaSettings, ServerSettings
from tokenbus.cli import relay_processes
from tokenbus.cli.relay_processes import reuse_port_socket
from tokenbus.cli.settings import (
    check_kafka,
    check_port_free,
    given,
    kafka_settings,
    settings_of,
)

_EXAMPLE_BODY = '{"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.2}'


def serve(args: argparse.Namespace) -> int:
    server = settings_of(
        ServerSettings, **given(port=args.port, host=args.host, serve_workers=args.workers)
    )
    kafka = kafka_settings()
    if args.reuse_port:  # one of `serve --workers N`'s processes
        sock = reuse_port_socket(server.host, server.port)
        asyncio.run(_serve(kafka, server, sockets=[sock]))
        return 0
    check_port_free(server.host, server.port, "--port / TOKENBUS_PORT")
    check_kafka(kafka)
    if server.serve_workers > 1:
        return relay_processes.run(server, server.serve_workers)
    asyncio.run(_serve(kafka, server))
    return 0


async def _serve(
    kafka: KafkaSettings, server: ServerSettings, sockets: list[socket.socket] | None = None
) -> None:
    serving, _ = start_server(kafka, server, sockets=sockets)
    if sockets is None:
        await announce(server, serving, since=None)
    await serving


def start_server(
    kafka: KafkaSettings,
    server: ServerSettings,
    *,
    audit_view: bool = False,
    sockets: list[socket.socket] | None = None,
) -> tuple[asyncio.Task[None], Any]:
    """``audit_view`` (or TOKENBUS_AUDIT_VIEW): serve the audit view from the audit
    store TOKENBUS_AUDIT_STORE names (`up` runs the consumer that writes it)."""
    import uvicorn

    from tokenbus.edge.access import AccessConfigError
    from tokenbus.edge.app import create_app
    from tokenbus.edge.limits import server_config

    from .heap import freeze_startup_heap

    audit = settings_of(AuditSettings) if audit_view or server.audit_view else None
    try:
        app = create_app(kafka=kafka, settings=server, audit=audit)  # enforces the access rules
    except AccessConfigError as exc:
        raise SystemExit(f"tokenbus: {exc}") from None
    freeze_startup_heap()
    uv = uvicorn.Server(server_config(app, server, log_level="warning"))
    serving = asyncio.create_task(uv.serve(sockets=sockets))
    # On Ctrl-C uvicorn finishes serving, then raises the signal again for us: the
    # KeyboardInterrupt ends `up` (exit 130) through the loop, so the task's copy of
    # it is marked seen here rather than logged as "never retrieved".
    serving.add_done_callback(lambda task: task.cancelled() or task.exception())
    return serving, uv


async def announce(
    server: ServerSettings,
    serving: asyncio.Task[None],
    since: float | None,
    worker_ready_fd: int | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> None:
    """Once the server answers /readyz (and `up`'s worker serves), print where it
    is and how to use it; ``on_stage``: told as each is reached (`up`'s progress)."""
    import httpx

    base = f"http://{server.host}:{server.port}"
    async with httpx.AsyncClient(base_url=base) as http:
        while not serving.done():
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    break
            await asyncio.sleep(0.1)  # polling our own readiness; ends with the server
    if serving.done():
        return
    if on_stage is not None:
        on_stage(f"HTTP server answering on {base}")
    if worker_ready_fd is not None and not await _ready_line(worker_ready_fd):
        return  # the worker died before it served: `up` is stopping
    if on_stage is not None:
        on_stage("worker serving")
    took = f" in {time.perf_counter() - since:.1f}s" if since is not None else ""
    print(
        f"\ntokenbus is ready{took}: {base}  (web page: {base}/)\n"
        f"  curl -s {base}/v1/requests -H 'content-type: application/json' \\\n"
        f"       -d '{_EXAMPLE_BODY}'\n"
        f"  curl -N {base}/v1/requests/<request_id>/events\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )


async def _ready_line(fd: int) -> bool:
    """Whether a line came on the pipe ``fd`` before it closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
    )
    try:
        return bool(await reader.readline())
    finally:
        transport.close()
