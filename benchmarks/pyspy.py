"""Where a process's CPU time goes during a window of a benchmark: py-spy samples
it (``py-spy record --format raw``: one line per distinct stack, with its count),
and the stacks are summed two ways:

- by the function on top of the stack (self time): what the CPU was executing;
- by module, each stack counted once for every module it passes through
  (inclusive time): a library, a file of this repository, or the standard
  library's ``asyncio/...`` (less the modules every stack starts with: the event
  loop's, the command's).

Only samples of a thread holding or waiting for the CPU are kept (py-spy's
default: idle threads are not sampled), so shares are of the process's busy time.
``--nonblocking``: the process is not paused to be sampled, so it runs at full
speed, and a rare stack is read torn.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SAMPLES_PER_S = 200
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+)(?::\d+)?\)$")
_REPO_DIRS = ("relay/", "tokenbus/", "schemas/", "workers/", "producers/", "consumers/")
# Under every stack of a served process: said once here rather than at 100 % each.
_ENTRY = frozenset(
    {
        "<frozen runpy>",
        "tokenbus/__main__.py",
        "tokenbus/cli/__init__.py",
        "tokenbus/cli/serve.py",
        "asyncio/runners.py",
        "asyncio/base_events.py",
        "asyncio/events.py",
    }
)


def available() -> str | None:
    """py-spy beside this Python (the venv's bin/), or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def recording(
    pids: Mapping[str, int], out: Path, into: dict[str, Any], centres: Sequence[Rule] = ()
) -> AsyncIterator[None]:
    """Sample each of ``pids`` (name -> pid) while the block runs; the raw stacks go
    to ``out``/<name>.txt and each one's `summary` into ``into[name]``."""
    exe = available()
    if exe is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    spies = {}
    for name, pid in pids.items():
        spies[name] = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--nonblocking", "--rate", str(SAMPLES_PER_S),
            "--format", "raw", "--output", str(out / f"{name}.txt"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    for spy in spies.values():  # "Sampling process ...": attached
        assert spy.stdout is not None
        await asyncio.wait_for(spy.stdout.readline(), timeout=30)
    try:
        yield
    finally:
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for name, spy in spies.items():
            await asyncio.wait_for(spy.communicate(), timeout=60)
            path = out / f"{name}.txt"
            stacks = await asyncio.to_thread(path.read_text)
            into[name] = summary(stacks, centres) | {"stacks": str(path)}


def module_of(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for folder in _REPO_DIRS:
        at = path.rfind("/" + folder)
        if at >= 0 or path.startswith(folder):
            return path[at + 1 :] if at >= 0 else path
    parts = path.split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] in ("asyncio", "json") else path


# A cost centre: (label, module prefix, function prefix or None for any function).
Rule = tuple[str, str, str | None]


def summary(raw: str, centres: Sequence[Rule] = (), top: int = 15) -> dict[str, Any]:
    """Self time by function and inclusive time by module, in % of the samples; with
    ``centres``, each sample also goes to the first rule that a frame matches, from
    the top of the stack down (``other`` when none does)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_centre: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [m for m in map(_FRAME.match, stack.split(";")) if m is not None]
        if not frames:
            continue
        modules = [module_of(frame["path"]) for frame in frames]
        leaf = frames[-1]
        self_time[f"{leaf['function']} ({modules[-1]})"] += count
        for module in set(modules) - _ENTRY:
            inclusive[module] += count
        if centres:
            by_centre[centre_of(frames, modules, centres)] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(100 * n / total, 1) for name, n in counter.most_common(top)}

    return {
        "samples": total,
        **({"cost_centres_pct": shares(by_centre)} if centres and total else {}),
        "self_pct": shares(self_time) if total else {},
        "inclusive_pct": shares(inclusive) if total else {},
    }


def centre_of(
    frames: Sequence[re.Match[str]], modules: Sequence[str], rules: Sequence[Rule]
) -> str:
    for frame, module in zip(reversed(frames), reversed(modules), strict=True):
        for label, rule_module, function in rules:
            if module.startswith(rule_module) and frame["function"].startswith(function or ""):
                return label
    return "other"
