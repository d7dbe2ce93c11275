"""Keeping the garbage collector's full passes short in the long-running services.

A service's start leaves hundreds of thousands of objects on the heap for good
(FastAPI, pydantic, aiokafka; torch and transformers in a worker) and a full
collection walks all of them: ~200 ms on this project's 2-core machines for a
process that imported torch, ~40-100 ms for a relay. Such a pause lands at random
on whatever the service is doing, and showed up as a replay from the log taking
240-440 ms instead of 15-30 (benchmarks/relay_delivery.py). Freezing what the
start left behind (`gc.freeze`, as CPython's docs advise for servers) moves it
out of the collector's reach, so a full pass walks only what came after.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Call once a service has imported and built what it keeps for its lifetime."""
    gc.collect()  # what is garbage already should not be frozen with the rest
    gc.freeze()
