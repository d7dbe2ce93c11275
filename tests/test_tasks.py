"""`cancel_and_wait`: the owner of a background task ends it, and a cancellation of
the owner meanwhile is never lost (a guard whose cancel was swallowed ran on and
hung a test's teardown for its whole timeout)."""

from __future__ import annotations

import asyncio

import pytest

from tokenbus.bus.tasks import cancel_and_wait


async def test_a_cancel_of_the_owner_while_it_waits_is_raised() -> None:
    ending = asyncio.Event()
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ending.set()
            await release.wait()  # its stop takes a while: the owner waits meanwhile

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)  # let it begin waiting
    owner = asyncio.create_task(cancel_and_wait(task))
    await ending.wait()  # cancelled: the owner now waits for it to end
    owner.cancel()
    await asyncio.sleep(0)  # the owner takes its cancel while the task still ends
    assert not owner.done(), "the owner left before the task it owns had ended"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert task.done()


async def test_the_error_a_task_ended_with_is_raised() -> None:
    async def fails_on_the_way_out() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("could not close")

    task = asyncio.create_task(fails_on_the_way_out())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="could not close"):
        await cancel_and_wait(task)


async def test_a_task_that_ends_as_cancelled_ends_quietly() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
