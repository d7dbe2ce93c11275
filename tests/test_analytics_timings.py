"""The analytics' per-request figures and windows, on synthetic events (no broker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.analytics import Distribution, RequestTimings, WindowStats
from consumers.analytics.metrics import AnalyticsMetrics
from consumers.analytics.tracker import RequestTracker
from schemas import (
    FailedEvent,
    FinishedEvent,
    FinishReason,
    GenerationRequest,
    StartedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
    uuid7,
)
from schemas.events import ErrorCode

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def request(rid: uuid.UUID, *, tenant: str = "acme", submitted_ms: float = 0) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid, tenant=tenant, prompt="hi", submitted_at=at(submitted_ms)
    )


def stream(rid: uuid.UUID, token_ms: list[float], *, attempt: int = 1) -> list[StreamEvent]:
    """started at 100 ms, a token event at each of ``token_ms``, finished 10 ms later."""
    base = {"request_id": rid, "worker": "w1", "attempt": attempt}
    events: list[StreamEvent] = [
        StartedEvent(**base, seq=0, ts=at(100), model="m", model_revision="r",
                     prompt_tokens=3, queue_wait_ms=100),
    ]  # fmt: skip
    for i, ms in enumerate(token_ms, start=1):
        events.append(TokenEvent(**base, seq=i, ts=at(ms), text="x", token_ids=[i]))
    events.append(
        FinishedEvent(
            **base, seq=len(token_ms) + 1, ts=at(token_ms[-1] + 10),
            finish_reason=FinishReason.LENGTH,
            usage=Usage(prompt_tokens=3, completion_tokens=len(token_ms)),
            timings=Timings(ttft_ms=None, total_ms=0),
        )
    )  # fmt: skip
    return events


def test_a_request_timings_from_its_events() -> None:
    rid = uuid7()
    timings = RequestTimings(request=request(rid, submitted_ms=0))
    for event in stream(rid, [300, 350, 450]):
        assert timings.add(event)
    summary = timings.summary()
    assert summary.tenant == "acme" and summary.model == "m" and summary.outcome == "length"
    assert summary.queue_wait_s == pytest.approx(0.100)
    assert summary.ttft_submission_s == pytest.approx(0.300)
    assert summary.ttft_pickup_s == pytest.approx(0.200)
    assert summary.inter_token_s == pytest.approx((0.050, 0.100))
    assert summary.completion_tokens == 3
    assert summary.tokens_per_s == pytest.approx(3 / 0.360)  # started 100 -> finished 460
    assert summary.ended_at == at(460)


def test_a_stale_workers_event_is_fenced_and_not_counted() -> None:
    rid = uuid7()
    timings = RequestTimings(request=request(rid))
    events = stream(rid, [300, 350, 450], attempt=2)
    stale = TokenEvent(request_id=rid, worker="w0", attempt=1, seq=2, ts=at(320), text="y",
                       token_ids=[99, 98])  # fmt: skip
    assert timings.add(events[0]) and timings.add(events[1])
    assert not timings.add(stale)  # a lower attempt than already seen: fenced
    for event in events[2:]:
        assert timings.add(event)
    summary = timings.summary()
    assert summary.completion_tokens == 3
    assert summary.inter_token_s == pytest.approx((0.050, 0.100))


def test_empty_token_events_are_not_tokens() -> None:
    """A takeover's claim (an empty token) is neither a first token nor a gap."""
    rid = uuid7()
    events = stream(rid, [300, 400])
    claim = TokenEvent(request_id=rid, worker="w2", attempt=1, seq=2, ts=at(350), text="",
                       token_ids=[])  # fmt: skip
    timings = RequestTimings(request=request(rid))
    for event in [events[0], events[1], claim, *(e.model_copy(update={"seq": e.seq + 1})
                                                 for e in events[2:])]:  # fmt: skip
        assert timings.add(event)
    assert timings.summary().inter_token_s == pytest.approx((0.100,))


def test_a_failed_request_counts_without_token_figures() -> None:
    rid = uuid7()
    timings = RequestTimings(request=request(rid))
    timings.add(FailedEvent(request_id=rid, seq=0, ts=at(50), worker="w1",
                            code=ErrorCode.PROMPT_TOO_LONG, message="too long"))  # fmt: skip
    summary = timings.summary()
    assert summary.outcome == "failed" and summary.model == "default"
    assert summary.ttft_submission_s is None and summary.tokens_per_s is None


def test_the_tracker_joins_a_request_and_its_events_in_either_order() -> None:
    dropped: list[None] = []
    tracker = RequestTracker(max_open=10, on_dropped=lambda: dropped.append(None))
    early, late = uuid7(), uuid7()
    assert tracker.request(request(early)) is None
    *head, last = stream(early, [300])
    assert all(tracker.event(e) is None for e in head)
    assert tracker.event(last) is not None
    for event in stream(late, [300]):
        assert tracker.event(event) is None
    summary = tracker.request(request(late, tenant="globex"))
    assert summary is not None and summary.tenant == "globex"
    assert len(tracker) == 0
    assert tracker.event(last) is None  # redelivered after the end: dropped, not kept
    assert len(tracker) == 0 and len(dropped) == 1


def test_window_stats_survive_their_json_form() -> None:
    rid = uuid7()
    timings = RequestTimings(request=request(rid))
    for event in stream(rid, [300, 350, 450]):
        timings.add(event)
    stats = WindowStats()
    stats.add(timings.summary())
    stats.add(timings.summary())
    again = WindowStats.from_json(stats.to_json())
    assert again.report() == stats.report()
    report = again.report()
    assert report["requests"] == 2 and report["completion_tokens"] == 6
    assert report["outcomes"] == {"length": 2}
    assert report["ttft_submission_s"]["mean"] == pytest.approx(0.300)
    assert report["inter_token_s"]["count"] == 4


def test_quantiles_are_within_a_bucket_of_the_truth() -> None:
    values = [0.001 * 1.07**i for i in range(200)]
    distribution = Distribution()
    for value in values:
        distribution.add(value)
    ordered = sorted(values)
    for q in (0.5, 0.99):
        truth = ordered[max(0, int(q * len(values) + 0.999999) - 1)]
        estimate = distribution.quantile(q)
        assert estimate is not None
        assert truth <= estimate <= truth * 1.1 + 1e-12
    assert distribution.quantile(1.0) == max(values)
    assert Distribution().quantile(0.5) is None


def test_model_labels_are_bounded_to_the_models_served() -> None:
    """Three made-up model names (each failing before any worker picks it up) add no
    series: they count as ``unknown``; the model a worker served keeps its name."""
    metrics = AnalyticsMetrics()
    tracker = RequestTracker(max_open=100)
    served = uuid7()
    summaries = [tracker.request(request(served))]
    summaries += [tracker.event(event) for event in stream(served, [200, 300])]
    for name in ("gpt-17", "x" * 128, "../../etc"):
        rid = uuid7()
        asked = GenerationRequest(request_id=rid, model=name, prompt="hi", submitted_at=at(0))
        summaries.append(tracker.request(asked))
        summaries.append(tracker.event(FailedEvent(
            request_id=rid, seq=0, ts=at(50), worker="w1",
            code=ErrorCode.UNKNOWN_MODEL, message=f"no model {name}",
        )))  # fmt: skip
    labels = [metrics.record(s) for s in summaries if s is not None]
    models = {
        sample.labels["model"]
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if "model" in sample.labels
    }
    assert models == {"m", "unknown"}
    failed = {"model": "unknown", "finish_reason": "failed"}
    assert metrics.registry.get_sample_value("tokenbus_analytics_requests_total", failed) == 3
    assert labels == ["m", "unknown", "unknown", "unknown"]  # what the windows are keyed by
