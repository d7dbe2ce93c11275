"""The guard, run in the test's process, for tests that need verdicts on the bus."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from consumers.guard import Guard, Policies
from tokenbus.bus.settings import GuardSettings, KafkaSettings

from .conftest import running


@contextlib.asynccontextmanager
async def guarding(kafka: KafkaSettings, guard_id: str = "guard-1") -> AsyncIterator[Guard]:
    guard = Guard(
        kafka=kafka, settings=GuardSettings(guard_id=guard_id), policies=Policies.builtin()
    )
    async with running(guard.run(), guard.ready):
        yield guard
