"""`tokenbus worker`: one model worker; under `up`, it says on a pipe when it serves."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING

from tokenbus.bus.settings import WorkerSettings
from tokenbus.cli.settings import check_kafka, check_model_path, given, kafka_settings

if TYPE_CHECKING:
    from workers import Worker  # imported where used: torch is slow to import

log = logging.getLogger("tokenbus")


def worker(args: argparse.Namespace) -> int:
    kafka = kafka_settings()
    settings = WorkerSettings(
        **given(model=args.model, device=args.device, max_batch=args.max_batch)
    )
    check_model_path(settings.model)  # before torch is imported
    check_kafka(kafka)  # before the model loads: seconds sooner
    from workers import ModelLoadError, Worker, load_model

    from .heap import freeze_startup_heap

    try:
        loaded = load_model(
            settings.model,
            device=settings.device,
            cache_dir=settings.cache_dir,
            name=settings.model_name,
        )
    except ModelLoadError as exc:
        raise SystemExit(f"tokenbus worker: {exc}") from None
    model_worker = Worker(kafka=kafka, settings=settings, model=loaded)
    if settings.worker_metrics_port is not None:
        from workers.metrics import serve_metrics

        host, port = settings.worker_metrics_host, settings.worker_metrics_port
        serve_metrics(model_worker.engine.scheduler, port, host, requests=model_worker.metrics)
        log.info("worker metrics on http://%s:%d/metrics", host, port)
    freeze_startup_heap()  # the model's and torch's objects: out of the collector's way
    asyncio.run(_run_worker(model_worker, settings))
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
