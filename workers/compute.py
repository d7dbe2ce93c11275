"""The one thread that runs the model.

PyTorch on Linux computes with libgomp's OpenMP, and libgomp gives every thread
that starts parallel work a team of helper threads of its own. Once the process
holds more OpenMP threads than CPUs, libgomp stops letting idle helpers spin
between parallel regions, and each of the hundreds of small regions in a
forward pass pays for waking them. A model loaded in the main thread and run in
another is slowed that way (on 2 cores: 66 ms rather than 51 ms a forward pass
of 8 tokens). So loading the model and every forward pass run here, on one
long-lived thread, and no other thread of a worker starts OpenMP work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_here = threading.local()


def _mark() -> None:
    _here.compute = True


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _thread() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="tokenbus-compute", initializer=_mark
            )
        return _executor


def call(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on the compute thread and wait for it (from anywhere, blocking)."""
    if getattr(_here, "compute", False):
        return fn(*args, **kwargs)  # already there: queueing behind ourselves would hang
    return _thread().submit(fn, *args, **kwargs).result()


async def run(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on the compute thread while the event loop goes on."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_thread(), functools.partial(fn, *args, **kwargs))


def shutdown() -> None:
    """Let the compute thread end, and its OpenMP team with it, once its work is
    done; the next call starts a new one. For handing the model to a thread of
    someone else's, such as transformers' batching manager in the benchmark."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=True)
