"""How SIGINT and SIGTERM end a command: as a KeyboardInterrupt (exit status 130)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def handle_interrupts() -> None:
    """SIGTERM (docker stop, systemd) shuts down as cleanly as Ctrl-C does. SIGINT
    too, even where it was ignored when we started (a shell's background job): `up`
    stops its children with it, and the audit consumer checkpoints on it."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def until_interrupted(service: Coroutine[Any, Any, None]) -> None:
    """Run ``service``; on SIGINT or SIGTERM cancel it alone, and let its shutdown (a
    last offset commit, a closing checkpoint) run while its Kafka client is still
    whole. Left to asyncio.run, the interrupt cancels every task at once, the
    client's own included, and a commit in flight then fails unseen."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None  # main() exits 130, as on any Ctrl-C
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, _interrupt)  # as handle_interrupts() set it
