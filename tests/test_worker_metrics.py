"""The worker's Prometheus metrics, read from a real engine's scheduler."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.audit.ingest import AuditStats
from consumers.audit.metrics import serve_metrics as serve_audit_metrics
from tokenbus.bus.ports import free_port
from tokenbus.bus.settings import AuditSettings, WorkerSettings
from workers import GenerationEngine, LoadedModel
from workers.metrics import WorkerCollector, serve_metrics

from .test_batching import request, steps_of


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_metrics_count_what_the_engine_did(smollm: LoadedModel) -> None:
    async with GenerationEngine(smollm, ignore_eos=True, max_batch=4) as engine:
        registry = CollectorRegistry()
        registry.register(WorkerCollector(engine.scheduler))
        reqs = [request(p, max_tokens=5) for p in ["Hi", "The quick brown fox"]]
        await asyncio.gather(*(steps_of(engine, r) for r in reqs))
        prompt = sum(len(engine.prompt_ids(r)) for r in reqs)
        found = samples(generate_latest(registry).decode())
    assert found[("tokenbus_worker_tokens_total", (("kind", "generated"),))] == 10
    assert found[("tokenbus_worker_tokens_total", (("kind", "prompt"),))] == prompt
    assert 5 <= found[("tokenbus_worker_steps_total", ())] <= 10
    assert found[("tokenbus_worker_step_seconds_total", ())] > 0
    assert found[("tokenbus_worker_failed_steps_total", ())] == 0
    assert found[("tokenbus_worker_sequences", (("state", "running"),))] == 0
    assert found[("tokenbus_worker_sequences", (("state", "waiting"),))] == 0
    assert found[("tokenbus_worker_max_sequences", ())] == 4
    assert found[("tokenbus_worker_kv_cache_positions", (("kind", "cap"),))] == 32_768


async def test_the_metrics_see_a_batch_in_flight_and_are_served(smollm: LoadedModel) -> None:
    port, long = free_port(), request("Hi", max_tokens=400)
    async with GenerationEngine(smollm, ignore_eos=True) as engine:
        server = serve_metrics(engine.scheduler, port)  # host: loopback unless told
        assert server.server_address[0] == "127.0.0.1"
        prompt = len(engine.prompt_ids(long))
        started = asyncio.Event()
        running = asyncio.create_task(steps_of(engine, long, started))
        await started.wait()
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
        running.cancel()  # seen in flight; the rest would take seconds
        with contextlib.suppress(asyncio.CancelledError):
            await running
        server.shutdown()
        server.server_close()
    assert response.status_code == 200
    found = samples(response.text)
    assert found[("tokenbus_worker_sequences", (("state", "running"),))] == 1
    assert found[("tokenbus_worker_kv_cache_positions", (("kind", "reserved"),))] == prompt + 400
    assert found[("tokenbus_worker_kv_cache_positions", (("kind", "allocated"),))] >= prompt + 1


def test_worker_and_audit_metrics_listen_on_loopback_unless_told() -> None:
    assert WorkerSettings().worker_metrics_host == "127.0.0.1"
    assert AuditSettings().metrics_host == "127.0.0.1"
    assert AuditSettings(metrics_host="0.0.0.0").metrics_host == "0.0.0.0"
    for told, host in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        port = free_port()
        server = serve_audit_metrics(AuditStats(), port, told) if told else (
            serve_audit_metrics(AuditStats(), port)
        )  # fmt: skip
        try:
            assert server.server_address[0] == host
        finally:
            server.shutdown()
            server.server_close()
