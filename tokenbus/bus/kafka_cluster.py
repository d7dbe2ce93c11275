"""Apache Kafka for tests and development: one KRaft broker, or a cluster of three,
on loopback ports the caller chooses.

The jars come from Maven Central, once (`tokenbus.bus.kafka_jars`). Every node
runs in combined mode (broker and controller in one JVM), as a small production
cluster may; a cluster of three is what the broker-failure tests kill nodes of.

``scripts/kafka`` runs this by hand; the test suite's ``broker`` fixture uses it
when ``TOKENBUS_TEST_BROKER=kafka``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .children import die_with_parent
from .kafka_jars import KAFKA_VERSION, KafkaStartError, fetch
from .ports import free_port, port_open

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listener:
    """A client listener besides PLAINTEXT, e.g. SASL_SSL for the security tests.

    ``settings`` are extra broker settings (keystores, JAAS configs), written as
    ``listener.name.<name>.…`` where the caller says so."""

    name: str
    protocol: str
    ports: tuple[int, ...]
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    config: Path
    data: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


class KafkaCluster:
    """``with KafkaCluster(ports=[9092]) as kafka:`` runs Apache Kafka in KRaft mode.

    With three ports it is a three-node cluster whose topics are replicated three
    times with ``min.insync.replicas=2`` and no unclean leader election: the
    production shape the broker-failure tests use. Nodes can be killed and
    started again (`kill`, `start_node`); the data lives in a temporary folder
    that `stop` removes.
    """

    def __init__(
        self,
        *,
        ports: list[int],
        host: str = "127.0.0.1",
        cache_dir: Path | None = None,
        listeners: tuple[Listener, ...] = (),
        settings: Mapping[str, str] | None = None,
        heap: str = "512m",
        format_args: Sequence[str] = (),
    ) -> None:
        """``format_args`` go to ``kafka-storage format``: KRaft keeps SCRAM users in
        its metadata, so they are made there, e.g. ``("--add-scram",
        "SCRAM-SHA-256=[name=alice,password=alice-secret]")``."""
        if not ports:
            raise ValueError("a cluster needs at least one port")
        self.host = host
        self.ports = list(ports)
        self._cache_dir = cache_dir
        self._listeners = listeners
        self._settings = dict(settings or {})
        self._heap = heap
        self._format_args = list(format_args)
        self._root: Path | None = None
        self.nodes: list[_Node] = []
        self._lib: Path | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.host}:{port}" for port in self.ports)

    def start(self, *, timeout_s: float = 120.0) -> None:
        self._lib = fetch(self._cache_dir)
        for port in self.ports:
            if port_open(self.host, port):
                raise KafkaStartError(f"{self.host}:{port} is already in use: choose another port")
        self._root = Path(tempfile.mkdtemp(prefix="tokenbus-kafka-"))
        self.nodes = [
            _Node(
                node_id=i + 1,
                port=port,
                controller_port=free_port(),
                config=self._root / f"node-{i + 1}.properties",
                data=self._root / f"node-{i + 1}",
                log_path=self._root / f"node-{i + 1}.log",
            )
            for i, port in enumerate(self.ports)
        ]
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.config.write_text(self._config(node))
        # Formatting is one short JVM per node; run them side by side.
        formats = [
            subprocess.Popen(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c",
                           str(node.config), *self._format_args),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            for node in self.nodes
        ]  # fmt: skip
        # Every format is waited for before any failure is raised: a JVM left running
        # (and its pipe left open) would outlive the caller's error.
        outputs = [process.communicate(timeout=timeout_s)[0] for process in formats]
        for process, out in zip(formats, outputs, strict=True):
            if process.returncode != 0:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
                raise KafkaStartError(f"kafka storage format failed: {out.decode()[-2000:]}")
        try:
            for node in self.nodes:
                self.start_node(node.node_id, wait=False)
            self.wait_serving(timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("Apache Kafka %s serving on %s", KAFKA_VERSION, self.bootstrap)

    def start_node(self, node_id: int, *, wait: bool = True, timeout_s: float = 60.0) -> None:
        """Start (or start again, on its kept data) one node."""
        node = self._node(node_id)
        if node.process is not None and node.process.poll() is None:
            raise KafkaStartError(f"node {node_id} is already running")
        with node.log_path.open("ab") as out:
            node.process = subprocess.Popen(
                self._java(
                    f"-Xmx{self._heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self._lib_dir / 'log4j2.properties'}",
                    "kafka.Kafka", str(node.config),
                ),
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_death_signal(),
            )  # fmt: skip
        if wait:
            self.wait_serving(timeout_s=timeout_s)

    def kill(self, node_id: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send a node a signal (kill -9 by default) and wait until it has exited."""
        node = self._node(node_id)
        if node.process is None:
            return
        node.process.send_signal(sig)
        node.process.wait(timeout=60)
        node.process = None

    def restart(self, node_id: int, *, timeout_s: float = 60.0) -> None:
        """A clean restart, as in a rolling restart: SIGTERM, wait, start again."""
        self.kill(node_id, signal.SIGTERM)
        self.start_node(node_id, timeout_s=timeout_s)

    def running(self) -> list[int]:
        return [n.node_id for n in self.nodes if n.process is not None and n.process.poll() is None]

    def node_of_port(self, port: int) -> int:
        return next(n.node_id for n in self.nodes if n.port == port)

    def wait_serving(self, *, timeout_s: float = 60.0) -> None:
        """Until every running node is a broker the cluster's metadata lists."""
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise KafkaStartError(
                        f"Kafka node {node.node_id} exited with {node.process.returncode}: "
                        f"{_tail(node.log_path)}"
                    )
            expected = set(self.running())
            listening = all(port_open(self.host, self._node(i).port) for i in expected)
            if (
                expected
                and listening
                and asyncio.run(_registered_brokers(self._live_bootstrap())) >= expected
            ):
                return
            if time.monotonic() > deadline:
                raise KafkaStartError(
                    f"Apache Kafka did not serve on {self.bootstrap} within {timeout_s:.0f}s"
                )
            time.sleep(0.2)  # polling a starting JVM; bounded by the deadline

    def stop(self) -> None:
        """Stop every node (SIGTERM together, SIGKILL after 20 s) and remove the data."""
        live = [n for n in self.nodes if n.process is not None]
        for node in live:
            assert node.process is not None
            with contextlib.suppress(ProcessLookupError):
                node.process.terminate()
        for node in live:
            assert node.process is not None
            try:
                node.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            node.process = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def wait(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.wait()

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    @property
    def _lib_dir(self) -> Path:
        assert self._lib is not None, "start() first"
        return self._lib

    def _java(self, *args: str) -> list[str]:
        return ["java", "-cp", f"{self._lib_dir}/*", *args]

    def _node(self, node_id: int) -> _Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node {node_id}")

    def _live_bootstrap(self) -> str:
        live = set(self.running())
        return ",".join(f"{self.host}:{n.port}" for n in self.nodes if n.node_id in live)

    def _config(self, node: _Node) -> str:
        size = len(self.nodes)
        replicas = min(size, 3)
        voters = ",".join(f"{n.node_id}@{self.host}:{n.controller_port}" for n in self.nodes)
        listeners = [f"PLAINTEXT://{self.host}:{node.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        advertised = [f"PLAINTEXT://{self.host}:{node.port}"]
        for extra in self._listeners:
            port = extra.ports[node.node_id - 1]
            listeners.append(f"{extra.name}://{self.host}:{port}")
            advertised.append(f"{extra.name}://{self.host}:{port}")
            protocols.append(f"{extra.name}:{extra.protocol}")
        settings: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": ",".join([*listeners, f"CONTROLLER://{self.host}:{node.controller_port}"]),
            "advertised.listeners": ",".join(advertised),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(protocols),
            "log.dirs": str(node.data),
            "num.partitions": "1",
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min(replicas, 2)),
            "unclean.leader.election.enable": "false",
            "offsets.topic.replication.factor": str(replicas),
            # Few partitions for the offsets topic: a test cluster makes it on the
            # first group join, and 50 partitions cost seconds on two cores.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(replicas, 2)),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min(replicas, 2)),
            # A test's first group forms at once, not after the default 3 s.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
        }
        for extra in self._listeners:
            settings.update(extra.settings)
        settings.update(self._settings)
        return "".join(f"{key}={value}\n" for key, value in settings.items())


def _death_signal() -> Callable[[], None] | None:
    """`die_with_parent` where the node is started from the main thread only. The
    kernel sends that signal when the *thread* that started the child ends, so a
    node restarted from a worker thread (``asyncio.to_thread``) would be stopped
    when that thread's pool shuts down, long before the cluster is."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None


def _cluster_id() -> str:
    # KRaft wants a base64url UUID of 22 characters, what `kafka-storage random-uuid` makes.
    import base64

    # Like Kafka's Uuid.randomUuid, never one that starts with "-": the storage tool's
    # argument parser reads "-t -abc…" as a missing value and an unknown option.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


async def _registered_brokers(bootstrap: str) -> set[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return {int(b["node_id"]) for b in cluster["brokers"]}
    except Exception:  # noqa: BLE001 - not serving yet is the expected answer here
        return set()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    """``scripts/kafka [--port 9092] [--nodes 3]``: run Apache Kafka until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="scripts/kafka", description=main.__doc__)
    parser.add_argument("--port", type=int, default=9092, help="first client port")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    parser.add_argument("--fetch-only", action="store_true", help="fetch the jars and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fetch_only:
        print(fetch())  # noqa: T201
        return 0
    cluster = KafkaCluster(ports=[args.port + i for i in range(args.nodes)])
    cluster.start()
    print(f"Apache Kafka {KAFKA_VERSION}: KAFKA_BOOTSTRAP_SERVERS={cluster.bootstrap}")  # noqa: T201
    stop = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, stop)
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
