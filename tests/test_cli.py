"""`tokenbus up` as a user runs it: a real process tree (broker, worker, server),
driven by `tokenbus submit --follow`, stopped with Ctrl-C.

A tiny random-weight model keeps this test fast; the model path itself is tested
end to end with the real SmolLM2 in test_end_to_end.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tokenbus.bus.ports import free_port
from workers import LoadedModel, compute

from .conftest import tiny_llama_config


@pytest.fixture(scope="session")
def tiny_model_dir(smollm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-model")
    config = tiny_llama_config(smollm.tokenizer)

    def build() -> None:  # on the compute thread, where models are built and run
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)  # type: ignore[no-untyped-call]

    compute.call(build)
    smollm.tokenizer.save_pretrained(directory)
    return directory


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "KAFKA_"))}
    return env | {"PYTHONUNBUFFERED": "1"}


def _up_env(directory: Path) -> dict[str, str]:
    """For `tokenbus up`: its audit store in ``directory``, not the user's home, and
    analytics on a free port."""
    return _env() | {
        "TOKENBUS_AUDIT_STORE": str(directory / "audit.db"),
        "TOKENBUS_ANALYTICS_PORT": str(free_port()),
    }


@pytest.fixture
def running_up(
    tiny_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str], int, list[str]]]:
    """`tokenbus up` until it says it is ready: its URL, process, broker port and
    what it printed until then."""
    port, broker_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "tokenbus",
        "up",
        f"--port={port}",
        f"--broker-port={broker_port}",
        f"--model={tiny_model_dir}",
    ]
    # A process group of its own, as a shell gives a foreground job: a Ctrl-C at the
    # terminal is SIGINT to the whole group (`os.killpg`).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_up_env(tmp_path),
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # ends when the process does; the test timeout bounds it
        seen.append(line)
        if "tokenbus is ready" in line:
            break
    else:
        pytest.fail("tokenbus up exited before it was ready:\n" + "".join(seen))
    try:
        yield f"http://127.0.0.1:{port}", proc, broker_port, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_serves_a_prompt_and_a_signal_stops_everything(
    running_up: tuple[str, subprocess.Popen[str], int, list[str]],
    tiny_model_dir: Path,
    stop_signal: int,
) -> None:
    url, proc, broker_port, printed = running_up
    # Ready means the worker serves, not only the API (loading a model takes seconds).
    assert any("serving" in line and "worker" in line for line in printed), printed
    # Its progress on the way, stage by stage, in order.
    stages = [line.split("] ", 1)[0].rsplit("[", 1)[1] for line in printed if "] " in line
              and re.search(r"\[\d/\d\] ", line)]  # fmt: skip
    assert stages == [f"{n}/5" for n in range(1, 6)], printed
    submit = subprocess.run(
        [sys.executable, "-m", "tokenbus", "submit", "Hello there", "--follow",
         "--max-tokens=6", f"--url={url}"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    assert "[length: 6 tokens" in submit.stderr or "[stop:" in submit.stderr

    if stop_signal == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    else:
        proc.send_signal(stop_signal)  # docker stop, systemd: the main process alone
    assert proc.wait(timeout=60) == 130  # the shell's convention for an interrupted command
    assert proc.stdout is not None
    said = proc.stdout.read().splitlines()
    # Clients stop before the broker: a few lines, no traceback, no client of the
    # broker complaining that it went away (there were hundreds).
    assert len(said) <= 12, "\n".join(said)
    assert not [line for line in said if "Traceback" in line or "Error" in line], said
    assert _processes_with(str(tiny_model_dir)) == []  # no worker left behind
    assert not _listening(int(url.rsplit(":", 1)[1]))
    assert not _listening(broker_port)


def test_killed_up_leaves_no_broker_or_worker_behind(
    running_up: tuple[str, subprocess.Popen[str], int, list[str]], tiny_model_dir: Path
) -> None:
    _, proc, broker_port, _ = running_up
    assert _processes_with(str(tiny_model_dir)) != []
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while _processes_with(str(tiny_model_dir)) or _listening(broker_port):
        assert time.monotonic() < deadline, "children outlived a killed `tokenbus up`"
        time.sleep(0.05)  # polling for process exit, bounded by the deadline


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_with(text: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", f"tokenbus.*{text}"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def test_a_worker_without_its_model_says_what_is_missing(tmp_path: Path) -> None:
    worker = subprocess.run(
        [sys.executable, "-m", "tokenbus", "worker", f"--model={tmp_path}"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert worker.returncode == 2  # a setting that cannot work, said before torch loads
    assert worker.stderr.startswith(
        f"tokenbus worker: {tmp_path} is not a transformers model directory (no config.json)"
    )
    assert "Traceback" not in worker.stderr and worker.stderr.count("\n") == 1


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenbus", "frobnicate"], capture_output=True, text=True, env=_env()
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_version() -> None:
    from tokenbus import __version__

    done = subprocess.run(
        [sys.executable, "-m", "tokenbus", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == f"tokenbus {__version__}"
