"""The ``tokenbus`` command line. Every flag also reads ``TOKENBUS_<FLAG>``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tokenbus.bus.children import die_with_parent
from tokenbus.bus.settings import (
    AuditSettings,
    ClientSettings,
    KafkaSettings,
    ServerSettings,
    WorkerSettings,
    kafka_env,
)

if TYPE_CHECKING:
    from workers import Worker  # imported where used: torch is slow to import

log = logging.getLogger("tokenbus")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in {"up", "broker", "serve", "worker", "audit"}:
        logging.basicConfig(
            level=os.environ.get("TOKENBUS_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        )
        # SIGTERM (docker stop, systemd) shuts down as cleanly as Ctrl-C does. SIGINT
        # too, even where it was ignored when we started (a shell's background job):
        # `up` stops its children with it, and the audit consumer checkpoints on it.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SetupError as exc:
        print(f"tokenbus {args.command}: {exc}", file=sys.stderr)
        return 2


class SetupError(Exception):
    """A setting that cannot work: printed as one line, exit status 2."""


def _kafka_settings(**flags: Any) -> KafkaSettings:
    """The Kafka settings from flags and the environment; a bad one is a `SetupError`
    naming the variable, not a traceback."""
    from pydantic import ValidationError

    try:
        return KafkaSettings(**flags)
    except ValidationError as exc:
        raise SetupError("; ".join(_setting_error(error) for error in exc.errors())) from None


def _setting_error(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # the model's own check: its message names the variables
    return f"TOKENBUS_{str(error['loc'][0]).upper()}: {message}"


def _check_kafka(kafka: KafkaSettings) -> None:
    """Fail at start, in one line, if the broker refuses these settings (a wrong
    password, an untrusted certificate) rather than retry them forever."""
    from tokenbus.bus.kafka import KafkaSetupError, check_connection

    try:
        asyncio.run(check_connection(kafka))
    except KafkaSetupError as exc:
        raise SetupError(str(exc)) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _given(**flags: Any) -> dict[str, Any]:
    """Flags the user gave; the rest fall back to the environment and defaults."""
    return {name: value for name, value in flags.items() if value is not None}


# -- services -------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from tokenbus.bus.broker import EmbeddedBroker

    kafka = _kafka_settings(**_given(broker_port=args.broker_port))
    server = ServerSettings(**_given(port=args.port, host=args.host))
    if not kafka.embedded:
        _check_kafka(kafka)
    started = time.perf_counter()
    broker = EmbeddedBroker(port=kafka.broker_port) if kafka.embedded else None
    try:
        if broker is not None:
            broker.start()
        worker_cmd = [sys.executable, "-m", "tokenbus", "worker"]
        worker_cmd += [f"--model={args.model}"] if args.model else []
        worker_cmd += [f"--device={args.device}"] if args.device else []
        return asyncio.run(_run_stack(kafka, server, worker_cmd, started))
    finally:
        if broker is not None:
            broker.stop()


async def _run_stack(
    kafka: KafkaSettings, server: ServerSettings, worker_cmd: list[str], started: float
) -> int:
    """Topics, a worker, the audit and analytics consumers and the HTTP server, until
    Ctrl-C or until the worker or the audit consumer dies (then everything stops: a
    stack without a worker only queues, and one without its audit keeps no record)."""
    from tokenbus.bus.kafka import ensure_topics

    await ensure_topics(kafka)
    # The worker says on this pipe when it serves (loading the model takes seconds),
    # and `up` is ready then, not before; if it dies first, the pipe just closes.
    ready_fd, worker_fd = os.pipe()
    worker = await asyncio.create_subprocess_exec(
        *worker_cmd,
        env=os.environ | kafka_env(kafka) | {"TOKENBUS_READY_FD": str(worker_fd)},
        pass_fds=(worker_fd,),
        preexec_fn=die_with_parent,
    )
    os.close(worker_fd)
    # The audit consumer (on SQLite: TOKENBUS_AUDIT_STORE, default under ~/.local/share).
    audit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "audit", "run",
        env=os.environ | kafka_env(kafka), preexec_fn=die_with_parent,
    )  # fmt: skip
    children = {"worker": worker, "audit consumer": audit}
    analytics = await _start_analytics(kafka)  # not watched: the stack goes on without it
    serving, uv = _start_server(kafka, server)
    watching = {asyncio.create_task(child.wait()): name for name, child in children.items()}
    try:
        await _announce(server, serving, since=started, worker_ready_fd=ready_fd)
        await asyncio.wait({serving, *watching}, return_when=asyncio.FIRST_COMPLETED)
        ended = [name for task, name in watching.items() if task.done()]
        if ended:
            log.error("the %s exited with status %s; stopping", ended[0],
                      children[ended[0]].returncode)  # fmt: skip
            uv.should_exit = True
            await serving
            return 1
        return 0
    finally:
        await _stop_child(analytics, timeout_s=5)  # its state is in changelogs: kill is safe
        for child in children.values():
            await _stop_child(child)


async def _start_analytics(kafka: KafkaSettings) -> asyncio.subprocess.Process:
    """`up`'s analytics consumer. Not essential: if it stops, the stack goes on."""
    from tokenbus.bus.settings import AnalyticsSettings

    settings = AnalyticsSettings()
    log.info("analytics on http://%s:%d/summary", settings.analytics_host, settings.analytics_port)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "analytics",
        env=os.environ | kafka_env(kafka), preexec_fn=die_with_parent,
    )  # fmt: skip


async def _stop_child(child: asyncio.subprocess.Process, timeout_s: float = 15) -> None:
    if child.returncode is None:
        child.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(child.wait(), timeout=timeout_s)
        except TimeoutError:
            child.kill()
            await child.wait()


def _broker(args: argparse.Namespace) -> int:
    from tokenbus.bus.broker import EmbeddedBroker
    from tokenbus.bus.kafka import ensure_topics

    kafka = _kafka_settings(**_given(broker_port=args.broker_port))
    with EmbeddedBroker(port=kafka.broker_port, quiet=False) as broker:
        asyncio.run(ensure_topics(kafka))
        print(f"broker on {broker.bootstrap}; KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}")
        broker.wait()
    return 0


def _topics(args: argparse.Namespace) -> int:
    from tokenbus.bus.kafka import ensure_topics

    kafka = _kafka_settings()
    _check_kafka(kafka)
    asyncio.run(ensure_topics(kafka))
    print(f"topics ready on {kafka.bootstrap}: {', '.join(kafka.topics.all())}")
    return 0


def _serve_cmd(args: argparse.Namespace) -> int:
    server = ServerSettings(**_given(port=args.port, host=args.host))
    kafka = _kafka_settings()
    _check_kafka(kafka)
    asyncio.run(_serve(kafka, server))
    return 0


async def _serve(kafka: KafkaSettings, server: ServerSettings) -> None:
    serving, _ = _start_server(kafka, server)
    await _announce(server, serving, since=None)
    await serving


def _start_server(kafka: KafkaSettings, server: ServerSettings) -> tuple[asyncio.Task[None], Any]:
    import uvicorn

    from tokenbus.edge.access import AccessConfigError
    from tokenbus.edge.app import create_app
    from tokenbus.edge.limits import server_config

    try:
        app = create_app(kafka=kafka, settings=server)  # enforces the access rules
    except AccessConfigError as exc:
        raise SystemExit(f"tokenbus: {exc}") from None
    uv = uvicorn.Server(server_config(app, server, log_level="warning"))
    serving = asyncio.create_task(uv.serve())
    # On Ctrl-C uvicorn finishes serving, then raises the signal again for us: the
    # KeyboardInterrupt ends `up` (exit 130) through the loop, so the task's copy of
    # it is marked seen here rather than logged as "never retrieved".
    serving.add_done_callback(lambda task: task.cancelled() or task.exception())
    return serving, uv


_EXAMPLE_BODY = '{"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.2}'


async def _ready_line(fd: int) -> bool:
    """Whether a line came on the pipe ``fd`` before it closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
    )
    try:
        return bool(await reader.readline())
    finally:
        transport.close()


async def _announce(
    server: ServerSettings,
    serving: asyncio.Task[None],
    since: float | None,
    worker_ready_fd: int | None = None,
) -> None:
    import httpx

    base = f"http://{server.host}:{server.port}"
    async with httpx.AsyncClient(base_url=base) as http:
        while not serving.done():
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    break
            await asyncio.sleep(0.1)  # polling our own readiness; ends with the server
    if serving.done():
        return
    if worker_ready_fd is not None and not await _ready_line(worker_ready_fd):
        return  # the worker died before it served: `up` is stopping
    took = f" in {time.perf_counter() - since:.1f}s" if since is not None else ""
    print(
        f"\ntokenbus is ready{took}: {base}  (web page: {base}/)\n"
        f"  curl -s {base}/v1/requests -H 'content-type: application/json' \\\n"
        f"       -d '{_EXAMPLE_BODY}'\n"
        f"  curl -N {base}/v1/requests/<request_id>/events\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )


def _worker(args: argparse.Namespace) -> int:
    from workers import ModelLoadError, Worker, load_model

    kafka = _kafka_settings()
    settings = WorkerSettings(
        **_given(model=args.model, device=args.device, max_batch=args.max_batch)
    )
    _check_kafka(kafka)  # before the model loads: seconds sooner
    try:
        loaded = load_model(
            settings.model,
            device=settings.device,
            cache_dir=settings.cache_dir,
            name=settings.model_name,
        )
    except ModelLoadError as exc:
        raise SystemExit(f"tokenbus worker: {exc}") from None
    worker = Worker(kafka=kafka, settings=settings, model=loaded)
    if settings.worker_metrics_port is not None:
        from workers.metrics import serve_metrics

        host, port = settings.worker_metrics_host, settings.worker_metrics_port
        serve_metrics(worker.engine.scheduler, port, host)
        log.info("worker metrics on http://%s:%d/metrics", host, port)
    asyncio.run(_run_worker(worker, settings))
    return 0


async def _run_worker(worker: Worker, settings: WorkerSettings) -> None:
    """Serve; and once serving, say so on ``ready_fd``, for `tokenbus up`."""
    if settings.ready_fd is None:
        await worker.run()
        return
    ready_fd = settings.ready_fd

    async def tell() -> None:
        await worker.ready.wait()
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(worker.run())
        tasks.create_task(tell())


# -- audit ----------------------------------------------------------------------


def _audit_settings(args: argparse.Namespace) -> AuditSettings:
    return AuditSettings(
        **_given(
            store=args.store,
            public_key=getattr(args, "public_key", None),
            from_beginning=getattr(args, "from_beginning", None) or None,
        )
    )


def _audit_command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A store or key problem is a message saying what to fix, not a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        from consumers.audit import AuditKeyError, StoreError

        try:
            return run(args)
        except (AuditKeyError, StoreError) as exc:
            print(f"tokenbus audit: {exc}", file=sys.stderr)
            return 2

    return guarded


@_audit_command
def _audit_run(args: argparse.Namespace) -> int:
    from consumers.audit import AuditConsumer, open_store, signing_key
    from consumers.audit.metrics import serve_metrics

    settings = _audit_settings(args)
    kafka = _kafka_settings()
    _check_kafka(kafka)
    consumer = AuditConsumer(
        kafka=kafka,
        settings=settings,
        store=open_store(settings.store),
        key=signing_key(settings),
    )
    if settings.metrics_port is not None:
        serve_metrics(consumer.stats, settings.metrics_port, settings.metrics_host)
    asyncio.run(_until_interrupted(consumer.run()))
    return 0


async def _until_interrupted(service: Coroutine[Any, Any, None]) -> None:
    """Run ``service``; on SIGINT or SIGTERM cancel it alone, and let its shutdown (a
    last offset commit, a closing checkpoint) run while its Kafka client is still
    whole. Left to asyncio.run, the interrupt cancels every task at once, the
    client's own included, and a commit in flight then fails unseen."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None  # main() exits 130, as on any Ctrl-C
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, _interrupt)  # as main() set it


@_audit_command
def _audit_verify(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from consumers.audit import open_store, verify, verifying_key
    from consumers.audit.witness import compare, default_store_id, published

    settings = _audit_settings(args)
    with open_store(settings.store, create=False) as store:
        key, source = verifying_key(settings)
        # Checkpoints come every TOKENBUS_AUDIT_CHECKPOINT_EVERY_S: records older than
        # a few intervals that none covers had theirs deleted.
        stale = datetime.now(UTC) - timedelta(seconds=3 * settings.checkpoint_every_s + 60)
        report = verify(store, key, stale_before=stale)
        held = store.checkpoints()
    # The store alone cannot show that its history was rewritten and every checkpoint
    # deleted: the witness topic and a checkpoint noted elsewhere can.
    witnessed = []
    if args.witness:
        store_id = settings.store_id or default_store_id(key.public_bytes_raw())
        try:
            witnessed = asyncio.run(asyncio.wait_for(published(KafkaSettings(), store_id), 60))
        except (KafkaError, TimeoutError) as exc:
            print(f"tokenbus audit: cannot read the witness topic: {exc}", file=sys.stderr)
            return 2
    report.findings += compare(held, witnessed, key, args.expect_checkpoint)
    for finding in report.findings:
        print(f"TAMPERED {finding}")
    witness = f"; {len(witnessed)} checkpoints published to the witness" if args.witness else ""
    print(
        f"{'FAILED' if report.findings else 'OK'}: {report.requests} requests, "
        f"{report.records} records, {report.checkpoints} checkpoints checked with the public key "
        f"{source}; {report.uncovered} records after the last checkpoint{witness}",
        file=sys.stderr,
    )
    return 1 if report.findings else 0


def _checkpoint_ref(text: str) -> tuple[int, bytes]:
    """``N:HASH``: a checkpoint's number and its hash (hex), as the consumer logs them."""
    number, _, digest = text.partition(":")
    try:
        return int(number), bytes.fromhex(digest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N:HASH (a number, a hex hash)") from None


@_audit_command
def _audit_show(args: argparse.Namespace) -> int:
    from consumers.audit import open_store, show

    with open_store(_audit_settings(args).store, create=False) as store:
        shown = show(store, args.request_id)
    if shown is None:
        print(f"the audit store holds nothing of request {args.request_id}", file=sys.stderr)
        return 1
    print(shown)
    return 0


@_audit_command
def _audit_export(args: argparse.Namespace) -> int:
    from consumers.audit import export_jsonl, open_store

    with open_store(_audit_settings(args).store, create=False) as store:
        try:
            for line in export_jsonl(store, since=args.since, until=args.until):
                print(line)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _audit_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    print(f"TOKENBUS_AUDIT_SIGNING_KEY={key.private_bytes_raw().hex()}")
    print(f"TOKENBUS_AUDIT_PUBLIC_KEY={key.public_key().public_bytes_raw().hex()}")
    return 0


def _when(text: str) -> datetime:
    """A --since/--until value: an ISO date or datetime; UTC unless it says otherwise."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _analytics(args: argparse.Namespace) -> int:
    from consumers.analytics import Analytics
    from tokenbus.bus.settings import AnalyticsSettings

    settings = AnalyticsSettings(**_given(analytics_port=args.port, analytics_host=args.host))
    kafka = _kafka_settings()
    _check_kafka(kafka)
    analytics = Analytics(kafka=kafka, settings=settings)
    analytics.run(loglevel=os.environ.get("TOKENBUS_LOG_LEVEL", "INFO"))
    return 0


# -- client commands --------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit_async(args))


async def _submit_async(args: argparse.Namespace) -> int:
    from producers import TokenbusClient

    url = ClientSettings(**_given(url=args.url)).url
    async with TokenbusClient(url) as client:
        params = _given(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        if args.raw:
            submission = await client.submit(args.prompt, **params)
        else:
            messages = [{"role": "user", "content": args.prompt}]
            submission = await client.submit(messages=messages, **params)
        print(submission.request_id, file=sys.stderr if args.follow else sys.stdout)
        if not args.follow:
            return 0
        return await _print_stream(client, str(submission.request_id), after=-1)


def _stream(args: argparse.Namespace) -> int:
    return asyncio.run(_stream_async(args, after=args.after))


def _replay(args: argparse.Namespace) -> int:
    return asyncio.run(_stream_async(args, after=-1, pace=args.pace))


async def _stream_async(args: argparse.Namespace, *, after: int, pace: str = "fast") -> int:
    from producers import TokenbusClient, TokenbusError

    async with TokenbusClient(ClientSettings(**_given(url=args.url)).url) as client:
        try:
            return await _print_stream(client, args.request_id, after=after, as_json=args.json,
                                       pace=pace)  # fmt: skip
        except TokenbusError as exc:  # 404, 416 after_end_of_stream …: a reason, no traceback
            print(f"tokenbus: {exc}", file=sys.stderr)
            return 1


async def _print_stream(
    client: Any, request_id: str, *, after: int, as_json: bool = False, pace: str = "fast"
) -> int:
    """Print the text as it arrives (or every event as a JSON line); 1 if it failed."""
    from schemas import FailedEvent, FinishedEvent, TokenEvent

    status = 0
    async for event in client.stream(request_id, after=after, pace=pace):
        if as_json:
            print(event.model_dump_json(), flush=True)
        elif isinstance(event, TokenEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, FinishedEvent):
            print(
                f"\n[{event.finish_reason}: {event.usage.completion_tokens} tokens, "
                f"ttft {event.timings.ttft_ms or 0:.0f} ms]",
                file=sys.stderr,
            )
        elif isinstance(event, FailedEvent):
            print(f"\n[failed: {event.code}: {event.message}]", file=sys.stderr)
            status = 1
    return status


# -- parser ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbus", description="LLM token streaming over Kafka.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="everything on the embedded default; Ctrl-C stops all")
    _server_flags(up)
    up.add_argument("--broker-port", type=int, help="embedded broker port [TOKENBUS_BROKER_PORT]")
    _model_flags(up)
    up.set_defaults(run=_up)

    broker = commands.add_parser("broker", help="the embedded broker alone")
    broker.add_argument("--broker-port", type=int, help="[TOKENBUS_BROKER_PORT]")
    broker.set_defaults(run=_broker)

    topics = commands.add_parser("topics", help="create the topics on KAFKA_BOOTSTRAP_SERVERS")
    topics.set_defaults(run=_topics)

    serve = commands.add_parser("serve", help="API + relay (HTTP)")
    _server_flags(serve)
    serve.set_defaults(run=_serve_cmd)

    worker = commands.add_parser("worker", help="one model worker")
    _model_flags(worker)
    worker.add_argument("--max-batch", type=int, help="sequences at once [TOKENBUS_MAX_BATCH]")
    worker.set_defaults(run=_worker)

    analytics = commands.add_parser("analytics", help="the analytics consumer")
    analytics.add_argument("--port", type=int, help="/metrics, /summary [TOKENBUS_ANALYTICS_PORT]")
    analytics.add_argument("--host", help="HTTP address [TOKENBUS_ANALYTICS_HOST]")
    analytics.set_defaults(run=_analytics)

    submit = commands.add_parser("submit", help="submit a job; --follow streams it")
    submit.add_argument("prompt")
    submit.add_argument("--follow", "-f", action="store_true", help="stream the answer")
    submit.add_argument("--raw", action="store_true", help="send as a plain prompt, not a chat")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--seed", type=int)
    _url_flag(submit)
    submit.set_defaults(run=_submit)

    stream = commands.add_parser("stream", help="subscribe by request id")
    stream.add_argument("request_id")
    stream.add_argument("--after", type=int, default=-1, help="resume after this seq")
    stream.add_argument("--json", action="store_true", help="every event as a JSON line")
    _url_flag(stream)
    stream.set_defaults(run=_stream)

    replay = commands.add_parser("replay", help="replay a finished stream")
    replay.add_argument("request_id")
    replay.add_argument("--json", action="store_true", help="every event as a JSON line")
    replay.add_argument(
        "--pace", choices=["fast", "original"], default="fast",
        help="original: with the recorded timing between events",
    )  # fmt: skip
    _url_flag(replay)
    replay.set_defaults(run=_replay)

    audit = commands.add_parser("audit", help="the audit consumer and its tools")
    audits = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    audit_run = audits.add_parser("run", help="the audit consumer")
    audit_run.add_argument("--from-beginning", action="store_true",
                           help="read the whole log again (rebuilds a fresh store) "
                                "[TOKENBUS_AUDIT_FROM_BEGINNING]")  # fmt: skip
    audit_run.set_defaults(run=_audit_run)
    verify = audits.add_parser("verify", help="check every chain and checkpoint; 1 if tampered")
    verify.add_argument("--public-key", help="hex or base64 [TOKENBUS_AUDIT_PUBLIC_KEY]")
    verify.add_argument("--witness", action="store_true",
                        help="also compare with the checkpoints published to "
                             "tokenbus.audit-checkpoints (KAFKA_BOOTSTRAP_SERVERS)")  # fmt: skip
    verify.add_argument("--expect-checkpoint", type=_checkpoint_ref, metavar="N:HASH",
                        help="a checkpoint the store must hold, as noted elsewhere")  # fmt: skip
    verify.set_defaults(run=_audit_verify)
    show = audits.add_parser("show", help="one request: prompt, model, workers, text, timings")
    show.add_argument("request_id", type=uuid.UUID)
    show.set_defaults(run=_audit_show)
    export = audits.add_parser("export", help="records as JSON lines, by submission time")
    export.add_argument("--since", type=_when, help="ISO date or time (UTC unless given)")
    export.add_argument("--until", type=_when, help="ISO date or time, exclusive")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.set_defaults(run=_audit_export)
    audits.add_parser("keygen", help="print a new signing key pair").set_defaults(run=_audit_keygen)
    for sub in (audit_run, verify, show, export):
        sub.add_argument("--store", help="SQLite path or postgresql:// URL [TOKENBUS_AUDIT_STORE]")
    return parser


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="HTTP port [TOKENBUS_PORT, default 8000]")
    parser.add_argument("--host", help="HTTP address [TOKENBUS_HOST, default 127.0.0.1]")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local transformers model directory [TOKENBUS_MODEL]")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[TOKENBUS_DEVICE]")


def _url_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="tokenbus API [TOKENBUS_URL, default http://127.0.0.1:8000]")
