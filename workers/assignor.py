"""A sticky partition assignor for the worker group.

With aiokafka's round-robin assignor, every join or leave deals all partitions
out again by member id, and partitions move between members that stayed; each
request in flight on a moved partition is then stopped and taken over (correct,
but a claim and a re-prefill). This assignor moves only what must move: each
member keeps the partitions it holds, up to its fair share, and only the rest
(a leaver's, a newcomer's share) is dealt out, to the members with fewest.

Each member says what it holds in its JoinGroup metadata (``user_data``, the one
place that format is written and read: `encode_held` / `decode_held`); the
group's leader computes the assignment. A partition claimed by two members (one
of them was expelled and does not know yet) counts as claimed by neither. Members
whose metadata cannot be read claim nothing.

aiokafka ships a ``StickyPartitionAssignor``, but it keeps its state on the class
(shared by every consumer of a process) and never learns the generation it
reconciles claims by; this one asks its worker what it holds.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Mapping
from typing import TypeAlias

from aiokafka import TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

_Assignment: TypeAlias = ConsumerProtocolMemberAssignment.Assignment


class StickyAssignor:
    """Duck-typed as aiokafka's assignors (``name``, ``metadata``, ``assign``,
    ``on_assignment``), but an instance, so that each worker has its own."""

    name = "tokenbus-sticky"
    version = 0

    def __init__(self, held: Callable[[], Iterable[TopicPartition]]) -> None:
        self._held = held

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), encode_held(self._held())
        )

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        held = {member: decode_held(meta.user_data) for member, meta in members.items()}
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        assignment: dict[str, list[_Assignment]] = {member: [] for member in members}
        for topic in topics:
            partitions = sorted(cluster.partitions_for_topic(topic) or ())
            subscribed = sorted(m for m, meta in members.items() if topic in meta.subscription)
            claims = {m: {tp.partition for tp in held[m] if tp.topic == topic} for m in subscribed}
            for member, ps in assign_sticky(partitions, subscribed, claims).items():
                if ps:
                    assignment[member].append(_Assignment(topic, ps))
        return {
            member: ConsumerProtocolMemberAssignment(self.version, topics_ps, b"")
            for member, topics_ps in assignment.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass  # what this member holds is its worker's to say (`held`)


def assign_sticky(
    partitions: list[int], members: list[str], claims: Mapping[str, Iterable[int]]
) -> dict[str, list[int]]:
    """One topic's partitions dealt to ``members``: as balanced as round robin
    (shares differ by one at most), keeping each member's claims where it can."""
    if not members:
        return {}
    base, extra = divmod(len(partitions), len(members))
    claimants = collections.Counter(p for m in members for p in set(claims.get(m, ())))
    existing = set(partitions)
    kept = {
        m: sorted(p for p in set(claims.get(m, ())) if claimants[p] == 1 and p in existing)
        for m in members
    }
    # The larger shares go to the members that would keep most.
    by_claims = sorted(members, key=lambda m: (-len(kept[m]), m))
    share = {m: base + (i < extra) for i, m in enumerate(by_claims)}
    assignment = {m: kept[m][: share[m]] for m in members}
    taken = {p for ps in assignment.values() for p in ps}
    for p in (p for p in partitions if p not in taken):
        # shares add up to the partitions, so someone is always short of theirs
        member = min((m for m in members if len(assignment[m]) < share[m]),
                     key=lambda m: (len(assignment[m]), m))  # fmt: skip
        assignment[member].append(p)
    return {m: sorted(ps) for m, ps in assignment.items()}


def encode_held(held: Iterable[TopicPartition]) -> bytes:
    by_topic: dict[str, list[int]] = collections.defaultdict(list)
    for tp in held:
        by_topic[tp.topic].append(tp.partition)
    return json.dumps({"held": {t: sorted(ps) for t, ps in sorted(by_topic.items())}}).encode()


def decode_held(user_data: bytes | None) -> set[TopicPartition]:
    """What a member says it holds; nothing, if that cannot be read."""
    try:
        held = json.loads(user_data or b"{}").get("held", {})
        return {TopicPartition(str(t), int(p)) for t, ps in held.items() for p in ps}
    except (ValueError, TypeError, AttributeError):
        return set()
