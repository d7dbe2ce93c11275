"""The relay's delivery delay (event ts -> SSE frame sent), apart from generation:
live delivery fills the histogram; a replay of a finished stream does not."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Stack, assert_complete, collect

DELAY = "tokenbus_relay_delivery_delay_seconds"


async def delivery_delay(http: httpx.AsyncClient, model: str = "") -> tuple[float, float]:
    """(count, sum) of the relay's delivery-delay histogram (one model's series, or
    all of them)."""
    text = (await http.get("/metrics")).text
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model and sample.labels.get("model") != model:
                continue
            if sample.name == f"{DELAY}_count":
                count += sample.value
            elif sample.name == f"{DELAY}_sum":
                total += sample.value
    return count, total


async def test_live_delivery_fills_the_histogram_and_replays_do_not(stack: Stack) -> None:
    assert await delivery_delay(stack.http) == (0, 0)
    submission = await stack.client.submit(
        messages=[{"role": "user", "content": "Count to ten."}], max_tokens=16, temperature=0
    )
    live = await collect(stack.client, submission.request_id)
    assert_complete(live)

    count, total = await delivery_delay(stack.http)
    # One series, labelled with the stream's model (from its `started` event).
    model = live[0].model  # type: ignore[union-attr]
    assert await delivery_delay(stack.http, model) == (count, total)
    # Events generated after the subscriber connected: most of them (the first ones
    # may be published before the subscription opens).
    assert len(live) // 2 <= count <= len(live)
    assert 0 < total / count < 1.0  # one host, nobody slow: far below a second

    replay = await collect(stack.client, submission.request_id)
    assert [e.seq for e in replay] == [e.seq for e in live]
    assert await delivery_delay(stack.http) == (count, total)
