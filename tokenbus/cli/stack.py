"""`tokenbus up`: the whole stack on one machine, supervised until Ctrl-C.

The broker (embedded unless KAFKA_BOOTSTRAP_SERVERS names one), the topics, a
worker, the audit, analytics and guard consumers as child processes, and the HTTP
server in this one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

from tokenbus.bus.children import supervised
from tokenbus.bus.settings import KafkaSettings, ServerSettings, WorkerSettings, kafka_env
from tokenbus.cli.serve import announce, start_server
from tokenbus.cli.settings import (
    check_kafka,
    check_model_path,
    check_port_free,
    given,
    kafka_settings,
    settings_of,
)

log = logging.getLogger("tokenbus")


class Stages:
    """`up`'s progress: a numbered line as each stage is reached, with the time so
    far. A first run spends a minute or two converting the model; it says so."""

    TOTAL = 5

    def __init__(self, started: float) -> None:
        self._started = started
        self._reached = 0

    def reached(self, what: str) -> None:
        self._reached += 1
        took = time.perf_counter() - self._started
        log.info("[%d/%d] %s (%.1fs)", self._reached, self.TOTAL, what, took)


def up(args: argparse.Namespace) -> int:
    from tokenbus.bus.broker import EmbeddedBroker

    kafka = kafka_settings(**given(broker_port=args.broker_port))
    server = settings_of(ServerSettings, **given(port=args.port, host=args.host))
    # What would stop the stack later, said before anything starts.
    check_port_free(server.host, server.port, "--port / TOKENBUS_PORT")
    check_model_path(settings_of(WorkerSettings, **given(model=args.model)).model)
    if not kafka.embedded:
        check_kafka(kafka)
    started = time.perf_counter()
    stages = Stages(started)
    broker = EmbeddedBroker(port=kafka.broker_port) if kafka.embedded else None
    try:
        if broker is not None:
            broker.start()
            stages.reached(f"broker: the embedded one on {broker.bootstrap} (in memory)")
        else:
            stages.reached(f"broker: {kafka.bootstrap}")
        worker_cmd = [sys.executable, "-m", "tokenbus", "worker"]
        worker_cmd += [f"--model={args.model}"] if args.model else []
        worker_cmd += [f"--device={args.device}"] if args.device else []
        return asyncio.run(_run_stack(kafka, server, worker_cmd, started, stages))
    finally:
        if broker is not None:
            broker.stop()


async def _run_stack(
    kafka: KafkaSettings,
    server: ServerSettings,
    worker_cmd: list[str],
    started: float,
    stages: Stages,
) -> int:
    """Topics, a worker, the audit and analytics consumers and the HTTP server, until
    Ctrl-C or until the worker or the audit consumer dies (then everything stops: a
    stack without a worker only queues, and one without its audit keeps no record)."""
    from tokenbus.bus.kafka import ensure_topics

    await ensure_topics(kafka)
    stages.reached("topics ready")
    # The worker says on this pipe when it serves (loading the model takes seconds),
    # and `up` is ready then, not before; if it dies first, the pipe just closes.
    ready_fd, worker_fd = os.pipe()
    worker = await asyncio.create_subprocess_exec(
        *worker_cmd,
        env=os.environ | kafka_env(kafka) | {"TOKENBUS_READY_FD": str(worker_fd)},
        pass_fds=(worker_fd,),
        preexec_fn=supervised,
    )
    os.close(worker_fd)
    # The audit consumer (on SQLite: TOKENBUS_AUDIT_STORE, default under ~/.local/share).
    audit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "audit", "run",
        env=os.environ | kafka_env(kafka), preexec_fn=supervised,
    )  # fmt: skip
    children = {"worker": worker, "audit consumer": audit}
    analytics = await _start_analytics(kafka)  # not watched: the stack goes on without it
    # Not watched either: without it monitored streams run unjudged and strict ones
    # fail closed, each with a reason; the rest of the stack is unaffected.
    guard = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "guard",
        env=os.environ | kafka_env(kafka), preexec_fn=supervised,
    )  # fmt: skip
    stages.reached(
        "worker, audit, analytics and guard started; the worker loads its model (a first run "
        "converts the default model once, a minute or two; later runs take seconds)"
    )
    serving, uv = start_server(kafka, server, audit_view=True)  # the store `audit` writes
    watching = {asyncio.create_task(child.wait()): name for name, child in children.items()}
    try:
        await announce(
            server, serving, since=started, worker_ready_fd=ready_fd, on_stage=stages.reached
        )
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
        await _stop_child(guard, timeout_s=5)  # it judges open streams again on its restart
        for child in children.values():
            await _stop_child(child)


async def _start_analytics(kafka: KafkaSettings) -> asyncio.subprocess.Process:
    """`up`'s analytics consumer. Not essential: if it stops, the stack goes on."""
    from tokenbus.bus.settings import AnalyticsSettings

    settings = settings_of(AnalyticsSettings)
    log.info("analytics on http://%s:%d/summary", settings.analytics_host, settings.analytics_port)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenbus", "analytics",
        env=os.environ | kafka_env(kafka), preexec_fn=supervised,
    )  # fmt: skip


async def _stop_child(child: asyncio.subprocess.Process, timeout_s: float = 15) -> None:
    if child.returncode is None:
        child.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(timeout_s):
                await child.wait()
        except TimeoutError:
            child.kill()
            await child.wait()
