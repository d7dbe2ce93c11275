"""The audit log against what clients received, with the real SmolLM2 (guarantee 4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.audit import open_store, verify
from schemas import decode_event, decode_request, is_terminal
from tokenbus.cli import main

from .audit_support import auditing
from .conftest import Stack, assert_complete, collect, eventually, text_of

pytestmark = pytest.mark.broker_behaviour

REQUESTS = 50


async def test_audit_reconstruction_of_50_concurrent_requests_equals_what_clients_got(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    url = str(tmp_path / "audit.db")
    async with auditing(stack.kafka, url, key):
        submissions = await asyncio.gather(
            *(
                stack.client.submit(
                    messages=[{"role": "user", "content": f"Count to {i}."}],
                    max_tokens=6,
                    temperature=0.7,
                    seed=i,
                )
                for i in range(REQUESTS)
            )
        )
        received = await asyncio.gather(*(collect(stack.client, s.request_id) for s in submissions))
        with open_store(url) as reader:

            def audited_to_the_end() -> bool:
                return all(
                    (stored := reader.events(s.request_id))
                    and is_terminal(decode_event(stored[-1].value))
                    for s in submissions
                )

            await eventually(audited_to_the_end, within=60)
    # Stopped: the final checkpoint covers everything.
    with open_store(url) as store:
        for submission, events in zip(submissions, received, strict=True):
            assert_complete(events)
            audited = [decode_event(r.value) for r in store.events(submission.request_id)]
            assert audited == events  # text, seq, terminal event: every field
            request = store.request(submission.request_id)
            assert request is not None
            assert decode_request(request.value).request_id == submission.request_id
        report = verify(store, key.public_key())
        assert report.clean, report.findings
        assert (report.requests, report.uncovered) == (REQUESTS, 0)

    first, events = submissions[0], received[0]
    assert main(["audit", "show", str(first.request_id), "--store", url]) == 0
    shown = capsys.readouterr().out
    assert repr(text_of(events)) in shown and "Count to 0." in shown
    assert f"served by  {events[0].model}" in shown  # type: ignore[union-attr]
