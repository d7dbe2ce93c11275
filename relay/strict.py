"""Strict moderation: a subscriber receives an event only once the guard has judged
it, and never a token the guard flagged.

A batch of the subscription waits (once, for its last token) until the guard's
watermark (`tokenbus.bus.verdicts.VerdictTail`) has passed it. A token the verdicts
withhold (the flagged one and every one after it) is sent redacted: the same seq,
no text, no token ids; so the stream stays contiguous, a client resumes by seq as
ever, and the terminal event that follows says why (``content_filter``). Events
without generated text (``started``, the terminal one) pass once what precedes them
has been judged.

When the guard has not judged an event within ``wait_s`` (down, or far behind),
`GuardTimeout` ends the subscription: the stream fails closed, with that reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from schemas import TokenEvent
from tokenbus.bus.verdicts import GuardTimeout, VerdictTail

from .hub import Held

__all__ = ["GuardTimeout", "judged"]


def redacted(event: TokenEvent) -> TokenEvent:
    return event.model_copy(update={"text": "", "token_ids": [], "logprob": None})


async def judged(
    batches: AsyncIterator[list[Held]], verdicts: VerdictTail, request_id: uuid.UUID, wait_s: float
) -> AsyncGenerator[list[Held], None]:
    """``batches`` as a strict subscriber may receive them."""
    loop = asyncio.get_running_loop()
    async for batch in batches:
        tokens = [held.event.seq for held in batch if isinstance(held.event, TokenEvent)]
        if not tokens:
            yield batch
            continue
        view = await verdicts.wait_judged(request_id, tokens[-1], deadline=loop.time() + wait_s)
        if view.flagged is None:
            yield batch
            continue
        yield [
            Held(redacted(held.event))
            if isinstance(held.event, TokenEvent) and view.withheld(held.event.seq)
            else held
            for held in batch
        ]
