"""An external witness for the audit store: every signed checkpoint is also published
to ``tokenbus.audit-checkpoints``, keyed by the store's id, where whoever controls
the store's host cannot take it back.

A store rewritten with its checkpoints deleted is consistent with itself: its
chains recompute, and no checkpoint is left to contradict them. `verify` with the
witness compares the store with what was published (every published checkpoint,
signed under the trusted key, must be in the store, unchanged) and with a
checkpoint the operator noted elsewhere (``--expect-checkpoint N:HASH``).

The store id defaults to the public key's hex: the verifier knows it from the key
it trusts, so a tampered store cannot point it elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tokenbus.bus.kafka import at_end, new_consumer, partitions_of, start_producer, stop_all
from tokenbus.bus.settings import KafkaSettings

from .chain import CheckpointBody
from .keys import signature_valid
from .records import Checkpoint
from .verify import Finding

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def default_store_id(public_key: bytes) -> str:
    return public_key.hex()


def encode_checkpoint(store_id: str, checkpoint: Checkpoint) -> bytes:
    body = checkpoint.body
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "store_id": store_id,
            "number": body.number,
            "previous": body.previous.hex(),
            "delta": body.delta.hex(),
            "records": body.records,
            "requests": body.requests,
            "created_ms": body.created_ms,
            "hash": checkpoint.hash.hex(),
            "signature": checkpoint.signature.hex(),
            "public_key": checkpoint.public_key.hex(),
        },
        separators=(",", ":"),
    ).encode()


def decode_checkpoint(value: bytes | None) -> Checkpoint | None:
    """A published checkpoint, or None for a message that is not one."""
    try:
        data = json.loads(value or b"")
        body = CheckpointBody(
            number=int(data["number"]),
            previous=bytes.fromhex(data["previous"]),
            delta=bytes.fromhex(data["delta"]),
            records=int(data["records"]),
            requests=int(data["requests"]),
            created_ms=int(data["created_ms"]),
        )
        return Checkpoint(
            body,
            bytes.fromhex(data["hash"]),
            bytes.fromhex(data["signature"]),
            bytes.fromhex(data["public_key"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class Publisher:
    """Publishes each checkpoint, acknowledged; a failure is logged, never fatal (the
    store holds the checkpoint, and `verify` reports one the witness lacks)."""

    def __init__(self, kafka: KafkaSettings, store_id: str) -> None:
        self._kafka = kafka
        self._store_id = store_id
        # Made on first use: a Kafka client needs the running event loop.
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, checkpoint: Checkpoint) -> None:
        try:
            if self._producer is None:
                self._producer = await start_producer(self._kafka)
            await self._producer.send_and_wait(
                self._kafka.topics.audit_checkpoints,
                encode_checkpoint(self._store_id, checkpoint),
                key=self._store_id.encode(),
            )
        except KafkaError as exc:
            log.error("could not publish checkpoint %d: %s", checkpoint.body.number, exc)

    async def close(self) -> None:
        if self._producer is not None:
            await stop_all(self._producer)
            self._producer = None


async def published(kafka: KafkaSettings, store_id: str) -> list[Checkpoint]:
    """Every checkpoint published for ``store_id``, in the order published."""
    topic = kafka.topics.audit_checkpoints
    key = store_id.encode()
    consumer = new_consumer(kafka, fetch_max_wait_ms=50)
    try:
        await consumer.start()  # inside: a start that fails halfway is stopped too
        partitions = await partitions_of(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found = []
        while True:
            batches = await consumer.getmany(*partitions, timeout_ms=200)
            for records in batches.values():
                for record in records:
                    if record.key == key and (checkpoint := decode_checkpoint(record.value)):
                        found.append(checkpoint)
            if await at_end(consumer, *partitions):
                return found
    finally:
        await stop_all(consumer)


def compare(
    held: Sequence[Checkpoint],
    witnessed: Sequence[Checkpoint],
    public_key: Ed25519PublicKey,
    expected: tuple[int, bytes] | None = None,
) -> list[Finding]:
    """What the store's checkpoints lack of the witness's (and of ``expected``)."""
    in_store = {c.body.number: c.hash for c in held}
    findings = []
    seen: set[int] = set()
    for checkpoint in witnessed:
        number = checkpoint.body.number
        if number in seen:
            continue
        if checkpoint.body.hash() != checkpoint.hash or not signature_valid(
            public_key, checkpoint.signature, checkpoint.hash
        ):
            continue  # not signed by the trusted key: no evidence either way
        seen.add(number)
        findings += _against(in_store, number, checkpoint.hash, "published to the witness topic")
    if expected is not None:
        findings += _against(in_store, *expected, "expected (--expect-checkpoint)")
    return findings


def _against(in_store: dict[int, bytes], number: int, digest: bytes, what: str) -> list[Finding]:
    held = in_store.get(number)
    if held is None:
        message = f"checkpoint {number} {what} is not in the store: it was deleted"
    elif held != digest:
        message = f"checkpoint {number} in the store is not the one {what}: it was replaced"
    else:
        return []
    return [Finding("witness", message, checkpoint=number)]
