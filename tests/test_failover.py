"""A worker killed mid-generation (kill -9): another worker of the group takes the
request over, finds what was published, and continues at the next seq. The
subscriber sees one contiguous, duplicate-free stream; published tokens are never
generated again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers import TokenbusClient
from schemas import FinishedEvent, StartedEvent, StreamEvent, TokenEvent
from tokenbus.bus.settings import KafkaSettings, kafka_env
from workers import LoadedModel

from .conftest import assert_complete, generate_alone, serving, text_of

pytestmark = pytest.mark.broker_behaviour

CHAT = [{"role": "user", "content": "Write a short story about a fox who learns to sail."}]


@pytest.fixture
def two_workers(kafka: KafkaSettings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two `tokenbus worker` processes in one consumer group, with the real SmolLM2."""
    env = os.environ | kafka_env(kafka)
    env |= {
        "TOKENBUS_GROUP_ID": f"{kafka.topic_prefix}workers",
        "TOKENBUS_SESSION_TIMEOUT_MS": "6000",
        "TOKENBUS_HEARTBEAT_INTERVAL_MS": "500",
        # Two workers on this machine's cores: a thread each. With an OpenMP team of
        # every core in each, a parallel region waits on threads the other holds.
        "OMP_NUM_THREADS": "1",
    }
    with contextlib.ExitStack() as files:
        logs = [files.enter_context((tmp_path / f"worker{i}.log").open("wb")) for i in range(2)]
        command = [sys.executable, "-m", "tokenbus", "worker"]
        workers = [
            subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT) for out in logs
        ]
        try:
            yield workers
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                worker.wait()


def pid_of(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 1)[1])  # worker ids are <host>-<pid>


async def stream_killing_the_worker(
    client: TokenbusClient, request_id: object, kill_after_seq: int
) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    async for event in client.stream(request_id):  # type: ignore[arg-type]
        events.append(event)
        if event.seq == kill_after_seq:
            # The worker generating it now: not always the one that started it, as
            # the second worker, joining, may have taken the partition as part of
            # its share (the takeover is correct, and also checked below).
            assert isinstance(event, TokenEvent)
            os.kill(pid_of(event.worker), signal.SIGKILL)
    return events


def greedy_continuation(
    model: LoadedModel, prompt_ids: list[int], prefix: list[int], n: int
) -> list[int]:
    generated = generate_alone(model, prompt_ids + prefix, n)
    eos = model.model.generation_config.eos_token_id
    return [t for t in generated if t != eos]


@pytest.mark.parametrize("kill_after_seq", [3, 11])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}],
                         ids=["greedy", "seeded"])  # fmt: skip
async def test_killed_worker_is_continued_without_gap_or_duplicate(
    kafka: KafkaSettings,
    smollm: LoadedModel,
    two_workers: list[subprocess.Popen[bytes]],
    sampling: dict[str, Any],
    kill_after_seq: int,
) -> None:
    async with serving(kafka) as (url, _), TokenbusClient(url) as client:
        submission = await client.submit(messages=CHAT, max_tokens=60, **sampling)
        events = await asyncio.wait_for(
            stream_killing_the_worker(client, submission.request_id, kill_after_seq), timeout=150
        )

    assert_complete(events)
    assert isinstance(events[-1], FinishedEvent)
    assert len([e for e in events if isinstance(e, StartedEvent)]) == 1
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    killed = events[kill_after_seq].worker
    # Runs of tokens by one worker under one attempt: each run ends when another
    # takes over, and takeovers only go forward (a worker whose partition a
    # rebalance moved away may own the request again once the other dies, but under
    # a new attempt: runs never interleave). The killed worker's run is followed by
    # another's.
    runs = [owner for owner, _ in itertools.groupby((t.worker, t.attempt) for t in tokens)]
    assert len(runs) == len(set(runs)), runs
    assert [attempt for _, attempt in runs] == sorted({a for _, a in runs}), runs
    workers = [worker for worker, _ in runs]
    assert killed in workers and workers[-1] != killed, "the other worker did not take it over"
    ids = [i for t in tokens for i in t.token_ids]
    assert events[-1].usage.completion_tokens == len(ids)
    assert text_of(events) == smollm.tokenizer.decode(ids, skip_special_tokens=True)
    if sampling["temperature"] == 0:
        # The survivor's tokens are what the model generates from prompt + prefix.
        prompt = smollm.tokenizer.apply_chat_template(
            CHAT, add_generation_prompt=True, tokenize=False
        )
        prompt_ids = smollm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prefix = [i for t in tokens if (t.worker, t.attempt) != runs[-1] for i in t.token_ids]
        expected = greedy_continuation(smollm, prompt_ids, prefix, 60 - len(prefix))
        assert ids[len(prefix) :] == expected


async def raw_events(kafka: KafkaSettings, request_id: object) -> list[StreamEvent]:
    """Everything in the log for the request, fenced or not, in log order."""
    from schemas import decode_event, message_key
    from tokenbus.bus.kafka import at_end, new_consumer, partitions_of

    consumer = new_consumer(kafka, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, kafka.topics.tokens)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        key = message_key(request_id)  # type: ignore[arg-type]
        found: list[StreamEvent] = []
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found += [decode_event(r.value) for r in records if r.key == key]
            if await at_end(consumer, *partitions):
                return found
    finally:
        await consumer.stop()


async def test_a_frozen_worker_that_wakes_up_is_fenced_off(
    kafka: KafkaSettings, smollm: LoadedModel, two_workers: list[subprocess.Popen[bytes]]
) -> None:
    async with serving(kafka) as (url, _), TokenbusClient(url) as client:
        submission = await client.submit(messages=CHAT, max_tokens=60, temperature=0)
        events: list[StreamEvent] = []
        frozen: int | None = None
        woken = False
        async with asyncio.timeout(150):
            async for event in client.stream(submission.request_id):
                events.append(event)
                if event.seq == 6 and frozen is None:
                    frozen = pid_of(events[0].worker)
                    os.kill(frozen, signal.SIGSTOP)  # frozen past its session timeout
                elif frozen is not None and not woken and event.worker != events[0].worker:
                    os.kill(frozen, signal.SIGCONT)  # the other worker has taken over: wake up
                    woken = True
    assert woken, "the other worker never took over"
    assert_complete(events)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    takeover = next(t for t in tokens if t.worker != events[0].worker)
    # Attempts only go up along the stream (a woken worker may own it again later,
    # but under a new attempt) ...
    attempts = [e.attempt for e in events]
    assert attempts == sorted(attempts)
    # ... and nothing written under an attempt the takeover fenced reached the subscriber,
    # though the woken worker may have written some: those are in the log, ignored.
    assert not [e for e in events if e.attempt < takeover.attempt and e.seq >= takeover.seq]
    raw = await raw_events(kafka, submission.request_id)
    assert len(raw) >= len(events)  # the log holds the stream and whatever was fenced
    ids = [i for t in tokens for i in t.token_ids]
    assert text_of(events) == smollm.tokenizer.decode(ids, skip_special_tokens=True)
