"""Ending a background task from the code that owns it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an error it ended with is raised.

    A cancellation of the caller meanwhile is raised too, once the task has ended
    (its stop does not outlive its owner). The usual idiom, ``with
    suppress(CancelledError): await task``, swallows that one as if it were the
    task's own, and a caller being stopped runs on."""
    task.cancel()
    try:
        await asyncio.wait([task])
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        raise
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
