"""Ending background tasks from the code that owns them."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until all have ended; an error one ended with is
    raised.

    A cancellation of the caller meanwhile is raised too, once they have ended
    (their stops do not outlive their owner). The usual idiom, ``with
    suppress(CancelledError): await task``, swallows that one as if it were the
    task's own, and a caller being stopped runs on."""
    for task in tasks:
        task.cancel()
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        while not all(task.done() for task in tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(tasks)
        raise
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
