"""tokenbus's own processes for a benchmark: `tokenbus worker`, `guard`, `serve`, as
`tokenbus up` runs them, this checkout's code, against a broker already running.

    with Stack(bootstrap, prefix, port, settings) as stack:
        stack.start("worker", "serve")        # waits for the relay's /readyz
        stack.start("guard", env={...})       # a part's own settings
        stack.stop("guard")                   # SIGTERM, as Ctrl-C would
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parent.parent
START_WITHIN_S = 180.0


class Stack:
    def __init__(self, bootstrap: str, prefix: str, port: int, settings: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
        self._env = env | settings | {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "TOKENBUS_TOPIC_PREFIX": prefix,
            "TOKENBUS_PORT": str(port),
            "TOKENBUS_GROUP_ID": f"{prefix}workers",
            "TOKENBUS_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        }  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *parts: str, env: dict[str, str] | None = None) -> None:
        for part in parts:
            self._procs[part] = subprocess.Popen(
                [sys.executable, "-m", "tokenbus", part],
                env=self._env | (env or {}),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if "serve" in parts:
            self._wait_ready(f"{self.url}/readyz")

    def pid(self, part: str) -> int:
        return self._procs[part].pid

    def stop(self, *parts: str) -> None:
        for part in parts:
            self._procs[part].terminate()
        for part in parts:
            self._procs.pop(part).wait(timeout=60)

    def check(self) -> None:
        """Raises if a part has exited."""
        for part, proc in self._procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"tokenbus {part} exited with {proc.returncode}")

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + START_WITHIN_S
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)  # polling a process's start, bounded by the deadline
        raise SystemExit(f"{url} not ready within {START_WITHIN_S:g}s")

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(*self._procs)
