"""`tokenbus up` runs the audit consumer as a child: a request served by the stack
is in the audit store, which verifies, once Ctrl-C has stopped everything."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from consumers.audit import open_store
from schemas import decode_event, is_terminal
from tokenbus.bus.ports import free_port
from tokenbus.cli import main

from .test_cli import _up_env, tiny_model_dir  # noqa: F401 (a fixture)


def test_up_audits_what_it_serves(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    store = tmp_path / "audit.db"
    env = _up_env(tmp_path)
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "tokenbus", "up", f"--port={port}",
         f"--broker-port={free_port()}", f"--model={tiny_model_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert up.stdout is not None
    output = up.stdout
    # Its output is read to the end in a thread, so the pipe never fills.
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.append(output.read()), daemon=True)
    try:
        for line in up.stdout:  # ends with the process; the test timeout bounds it
            if "tokenbus is ready" in line:
                break
        drain.start()
        submit = subprocess.run(
            [sys.executable, "-m", "tokenbus", "submit", "Hi", "--follow", "--max-tokens=4",
             f"--url=http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        request_id = uuid.UUID(submit.stderr.splitlines()[0])
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        if drain.is_alive():
            drain.join(timeout=10)
        up.stdout.close()

    assert up.returncode == 130  # Ctrl-C stopped the stack, the audit consumer included
    # ... cleanly: nothing of its shutdown failed unseen (a group commit cut off by
    # the broker going away showed up as "Task exception was never retrieved").
    assert "never retrieved" not in "".join(rest)
    # The audit child checkpointed on its way out: everything verifies.
    assert main(["audit", "verify", "--store", str(store)]) == 0
    with open_store(str(store), create=False) as audit:
        events = [decode_event(e.value) for e in audit.events(request_id)]
        assert audit.request(request_id) is not None
    assert events and is_terminal(events[-1])
