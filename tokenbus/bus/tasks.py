"""Ending a background task from the code that owns it."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an error it ended with is raised.

    Its own cancellation stays in it, but a cancellation of the caller meanwhile is
    raised: ``with suppress(CancelledError): await task``, the usual idiom, swallows
    that one too, and a caller being stopped would run on."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
