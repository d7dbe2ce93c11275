"""`tokenbus serve --workers N`: N relay processes on one port.

Each process is a whole `tokenbus serve` (its own hub reading ``tokenbus.tokens``
once, its own submitter and log reader) with a listening socket of its own on the
same address, bound with SO_REUSEPORT: the kernel spreads new connections evenly
over the processes, and no process wakes for a connection another one takes. Any
process serves any stream (every hub reads every partition, and a stream it does
not hold comes from the log), so it does not matter which one a client reaches.

What the processes must agree on is passed down: the stream-token secret (one is
made up here when none is configured, so a token minted by one process is
honoured by the others). What they do not share, each keeps: per-tenant limits
and /metrics are per process (see docs/limits.md).

This process only supervises: it prints one line when the port answers, restarts
a process that dies once serving, and on Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from tokenbus.bus.children import supervised
from tokenbus.bus.settings import ServerSettings

# A process that dies before the port first answered failed to start (a bad
# setting, the broker unreachable): restarting it would only fail again. Once
# serving, one that dies is replaced, unless this many died within the window.
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_STOP_TIMEOUT_S = 15.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) that other processes of this user may
    bind as well (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class _Processes:
    def __init__(self, server: ServerSettings, count: int) -> None:
        self._argv = [sys.executable, "-m", "tokenbus", "serve", "--reuse-port"]
        secret = server.stream_token_secret
        self._env = os.environ | {
            "TOKENBUS_HOST": server.host,
            "TOKENBUS_PORT": str(server.port),
            "TOKENBUS_STREAM_TOKEN_SECRET": (
                secret.get_secret_value() if secret else secrets.token_urlsafe(32)
            ),
        }
        self._count = count
        self.running: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.serving = False  # the port has answered /readyz
        self._restarts: list[float] = []

    def start(self) -> None:
        while len(self.running) < self._count:
            # A process group of its own: a Ctrl-C reaches this supervisor, which
            # stops each process once (not twice, by the terminal and by us).
            child = subprocess.Popen(self._argv, env=self._env, preexec_fn=supervised)
            self.running[child.pid] = child

    def stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        self.stopping = True
        for child in self.running.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def reap(self) -> int | None:
        """Wait for a process to end; an exit code to end with, or None to go on."""
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0  # none left
        child = self.running.pop(pid, None)
        if child is None:
            return None
        code = os.waitstatus_to_exitcode(status)
        child.returncode = code
        if self.stopping:
            return 0 if not self.running else None
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S] + [now]
        if not self.serving or len(self._restarts) > _MAX_RESTARTS:
            when = "at start" if not self.serving else f"{len(self._restarts)} times in a minute"
            print(
                f"tokenbus: a relay process exited {when} (code {code}): stopping", file=sys.stderr
            )
            self.stop()
            self.wait_all()
            return code or 1
        print(f"tokenbus: relay process {pid} exited (code {code}); starting another")
        self.start()
        return None

    def wait_all(self) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for child in list(self.running.values()):
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.running.clear()


def run(server: ServerSettings, count: int) -> int:
    processes = _Processes(server, count)
    signal.signal(signal.SIGINT, processes.stop)
    signal.signal(signal.SIGTERM, processes.stop)
    processes.start()
    if _answering(server, processes):
        processes.serving = True
        base = f"http://{server.host}:{server.port}"
        print(f"tokenbus is serving on {base} with {count} relay processes. Ctrl-C stops them.")
    while True:
        code = processes.reap()
        if code is not None:
            processes.wait_all()
            return code


def _answering(server: ServerSettings, processes: _Processes) -> bool:
    """Once the port answers /readyz (a process that dies meanwhile is reaped, and
    said, by the main loop)."""
    import httpx

    url = f"http://{server.host}:{server.port}/readyz"
    deadline = time.monotonic() + 120
    while not processes.stopping and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling our own children's readiness, with a deadline
    return False
