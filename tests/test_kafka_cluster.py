"""The Apache Kafka test helper itself (`tokenbus.bus.kafka_cluster`): what it hands the
storage tool, and what a failed start leaves behind."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from tokenbus.bus.kafka_cluster import KafkaCluster, _cluster_id
from tokenbus.bus.kafka_jars import KafkaStartError
from tokenbus.bus.ports import free_port

from .conftest import ON_TANSU


def test_a_cluster_id_is_a_base64url_uuid_that_never_starts_with_a_dash() -> None:
    # One id in 64 used to start with "-", which the storage tool reads as an option
    # ("argument --cluster-id/-t: expected one argument"): CI failed on one.
    ids = [_cluster_id() for _ in range(3000)]
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(ON_TANSU, reason="runs Apache Kafka's storage tool; the Kafka half has it")
def test_a_failed_format_leaves_no_process_no_open_pipe_and_no_folder() -> None:
    before = set(Path(tempfile.gettempdir()).glob("tokenbus-kafka-*"))
    # An option the storage tool does not know fails every node's format; with three
    # nodes, two are still running when the first fails. filterwarnings=error (the
    # suite's setting) turns a process or pipe left behind into this test's failure.
    cluster = KafkaCluster(ports=[free_port() for _ in range(3)], format_args=["--no-such-option"])
    with pytest.raises(KafkaStartError, match="kafka storage format failed"):
        cluster.start()
    assert set(Path(tempfile.gettempdir()).glob("tokenbus-kafka-*")) == before
    assert cluster.running() == []
