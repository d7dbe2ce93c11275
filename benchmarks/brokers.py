"""The two brokers the benchmarks compare, started the same way: `--broker tansu|kafka|both`.

- ``tansu``: the embedded default, `tokenbus.bus.broker.EmbeddedBroker` (Tansu, memory-only);
- ``kafka``: Apache Kafka 4.1.1, one KRaft node (broker and controller in one JVM),
  `tokenbus.bus.kafka_cluster.KafkaCluster`, data in a temporary folder.

Each benchmark runs its measurement once per broker, in the same run, and labels
every result with the broker it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenbus.bus.broker import EmbeddedBroker
from tokenbus.bus.kafka_cluster import KafkaCluster
from tokenbus.bus.kafka_jars import KAFKA_VERSION
from tokenbus.bus.ports import free_port

BROKERS = ("tansu", "kafka")
DESCRIPTION = {
    "tansu": "Tansu (embedded, memory-only; tokenbus.bus.broker.EmbeddedBroker)",
    "kafka": f"Apache Kafka {KAFKA_VERSION}, one KRaft node (combined broker+controller, "
    "tokenbus.bus.kafka_cluster.KafkaCluster: group.initial.rebalance.delay.ms=0, "
    "8 offsets-topic partitions, 512 MB heap)",
}


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        choices=(*BROKERS, "both"),
        default="both",
        help="which broker to measure on; both (the default) runs one after the other",
    )


def chosen(option: str) -> list[str]:
    return list(BROKERS) if option == "both" else [option]


@dataclass(frozen=True)
class Running:
    name: str
    bootstrap: str
    start_s: float  # process start -> serving
    pid: int | None  # the broker's process (Tansu, or Kafka's JVM), for CPU accounting

    @property
    def description(self) -> str:
        return DESCRIPTION[self.name]


@contextlib.contextmanager
def running(name: str) -> Iterator[Running]:
    """The broker ``name`` on a free loopback port, until the block ends."""
    began = time.perf_counter()
    if name == "tansu":
        with EmbeddedBroker(port=free_port()) as broker:
            yield Running(name, broker.bootstrap, time.perf_counter() - began, _child("tansu"))
    elif name == "kafka":
        with KafkaCluster(ports=[free_port()]) as cluster:
            yield Running(
                name, cluster.bootstrap, time.perf_counter() - began, _child("kafka.Kafka")
            )
    else:
        raise ValueError(f"unknown broker {name!r}")


def _child(marker: str) -> int | None:
    """The child of this process whose command line holds ``marker``."""
    me = os.getpid()
    for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    return None


def load() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]
