"""The worker group's sticky assignor: balanced like round robin, but only what
must move moves."""

from __future__ import annotations

import random

from aiokafka import TopicPartition

from workers.assignor import StickyAssignor, assign_sticky, decode_held, encode_held

TOPIC = "tokenbus.requests"


def moved(before: dict[str, list[int]], after: dict[str, list[int]]) -> int:
    """Partitions that a member held before and another holds after."""
    owner = {p: m for m, ps in before.items() for p in ps}
    return sum(owner.get(p, m) != m for m, ps in after.items() for p in ps)


def test_a_newcomer_takes_its_share_and_nothing_else_moves() -> None:
    before = {"a": [0, 1, 2, 3]}
    after = assign_sticky([0, 1, 2, 3], ["a", "b"], before)
    assert sorted(len(ps) for ps in after.values()) == [2, 2]
    assert set(after["a"]) <= set(before["a"])
    assert moved(before, after) == 2  # b's share, taken from a


def test_a_third_member_moves_one_partition_where_round_robin_moves_more() -> None:
    before = {"a": [0, 1], "b": [2, 3]}
    after = assign_sticky([0, 1, 2, 3], ["a", "b", "c"], before)
    assert moved(before, after) == 1 and len(after["c"]) == 1
    # Round robin deals 0, 1, 2, 3 to a, b, c, a: only 0 stays where it was.
    dealt = {"a": [0, 3], "b": [1], "c": [2]}
    assert moved(before, dealt) == 3


def test_a_leavers_partitions_go_to_those_with_fewest() -> None:
    before = {"a": [0, 1], "b": [2], "c": [3]}
    after = assign_sticky([0, 1, 2, 3], ["a", "b"], {"a": [0, 1], "b": [2]})
    assert after == {"a": [0, 1], "b": [2, 3]}
    assert moved(before, after) == 1  # the leaver's, and nothing between those who stay


def test_a_partition_claimed_twice_is_kept_by_neither_claim() -> None:
    # "b" was expelled while frozen and still claims what "a" now holds.
    # (A worker that knows it was expelled claims nothing: `Ownership.lose_all`.)
    after = assign_sticky([0, 1], ["a", "b"], {"a": [0, 1], "b": [0]})
    assert after == {"a": [1], "b": [0]}  # 1 is a's alone; 0 is dealt afresh


def test_claims_of_partitions_that_do_not_exist_are_ignored() -> None:
    after = assign_sticky([0, 1], ["a", "b"], {"a": [0, 7], "b": [9]})
    assert after == {"a": [0], "b": [1]}


def test_every_partition_once_and_shares_within_one_whatever_the_claims() -> None:
    rng = random.Random(4)
    for _ in range(500):
        partitions = list(range(rng.randint(0, 12)))
        members = [f"m{i}" for i in range(rng.randint(1, 6))]
        claims = {m: rng.sample(range(14), rng.randint(0, 5)) for m in members}
        after = assign_sticky(partitions, members, claims)
        assert sorted(p for ps in after.values() for p in ps) == partitions
        sizes = [len(ps) for ps in after.values()]
        assert max(sizes) - min(sizes) <= 1
        # A partition claimed by one member only stays with it unless its share is full.
        for m in members:
            unique = {p for p in claims[m] if p in partitions}
            unique -= {p for o in members if o != m for p in claims[o]}
            assert len(unique & set(after[m])) == min(len(unique), len(after[m]))


class Cluster:
    """Just what an assignor reads of cluster metadata: a topic's partitions."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self._partitions.get(topic)
        return None if n is None else set(range(n))


def test_members_metadata_carries_what_each_holds_to_the_leaders_assignment() -> None:
    held = {
        "a": {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1), TopicPartition(TOPIC, 2)},
        "b": set(),
    }
    assignors = {m: StickyAssignor(lambda m=m: held[m]) for m in held}  # type: ignore[misc]
    members = {m: a.metadata([TOPIC]) for m, a in assignors.items()}
    result = assignors["a"].assign(Cluster({TOPIC: 4}), members)
    got = {m: set(assignment.partitions()) for m, assignment in result.items()}
    assert got["a"] < held["a"] and len(got["a"]) == 2
    assert len(got["b"]) == 2 and not got["a"] & got["b"]


def test_a_member_whose_metadata_cannot_be_read_claims_nothing() -> None:
    assert decode_held(b"\xff not json") == set()
    assert decode_held(b'{"held": 3}') == set()
    assert decode_held(None) == set()
    held = {TopicPartition(TOPIC, 2), TopicPartition("other", 0)}
    assert decode_held(encode_held(held)) == held
