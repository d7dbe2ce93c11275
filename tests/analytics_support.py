"""`tokenbus analytics` as a child process, for the tests that read what it serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import KafkaSettings, kafka_env

from .conftest import eventually


@dataclass
class AnalyticsProcess:
    url: str
    process: asyncio.subprocess.Process
    log_path: Path
    killed: bool = False  # it had not exited 20 s after its stop signal

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.asynccontextmanager
async def analytics_process(
    kafka: KafkaSettings, log_path: Path, *, ready_within: float, stop: signal.Signals
) -> AsyncIterator[AnalyticsProcess]:
    """`tokenbus analytics` given these settings the way `up` gives them (`kafka_env`),
    yielded once it answers /readyz (its group joined). On the way out it is sent
    ``stop``, and killed if it has not exited 20 s later; the caller judges how it
    ended (`returncode`, `killed`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    env |= kafka_env(kafka) | {"TOKENBUS_ANALYTICS_PORT": str(port)}
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenbus", "analytics", env=env,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    child = AnalyticsProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        async with httpx.AsyncClient(base_url=child.url, timeout=10) as http:

            async def ready() -> bool:
                if process.returncode is not None:
                    return True
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/readyz")).status_code == 200
                return False

            await eventually(ready, within=ready_within)
        assert process.returncode is None, child.log_tail()
        yield child
    finally:
        if process.returncode is None:
            process.send_signal(stop)
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
                child.killed = True
