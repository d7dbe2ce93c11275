"""The HTTP process: submission API and SSE relay in one ASGI app.

Clients (the producer and the hub's consumer) are built in the lifespan and
handed to the routes through the request state; nothing is created at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producers.submitter import Submitter
from relay.hub import StreamHub
from tokenbus import __version__
from tokenbus.bus.log import LogReader
from tokenbus.bus.settings import AuditSettings, KafkaSettings, ServerSettings
from tokenbus.bus.tasks import cancel_and_wait
from tokenbus.bus.verdicts import VerdictTail

from .access import Access
from .audit_routes import AuditView
from .audit_routes import router as audit_router
from .directory import RequestDirectory
from .errors import client_address, error_response, install_error_handlers
from .http_metrics import HttpMetrics, HttpMetricsMiddleware
from .limits import BodyLimits
from .moderation import ModerationDefaults
from .openai_routes import router as openai_router
from .stream_routes import router as relay_router
from .submit_routes import router as submit_router

log = logging.getLogger(__name__)


def create_app(
    *, kafka: KafkaSettings, settings: ServerSettings, audit: AuditSettings | None = None
) -> FastAPI:
    """``audit``: the audit store to serve the audit view from (none: not served)."""
    # Reads the keys file now, and refuses (AccessConfigError) a file without keys, or
    # no keys at all on an address beyond loopback: whoever builds the app, it fails
    # at start rather than serve without authentication.
    access = Access(settings)
    if access.anonymous:
        log.warning("no API keys configured: one anonymous tenant, listening on loopback only")
    http_metrics = HttpMetrics()
    moderation = ModerationDefaults(settings)  # reads the policy file: a bad one fails here

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        submitter = Submitter(kafka)
        hub = StreamHub(kafka=kafka, settings=settings)
        log_reader = LogReader(
            kafka=kafka,
            clock_skew_ms=settings.clock_skew_ms,
            timeout_s=settings.log_read_timeout_s,
        )
        background: set[asyncio.Task[None]] = set()
        registry = CollectorRegistry()
        registry.register(_RelayCollector(hub))
        registry.register(http_metrics)
        # Strict moderation (relay/strict.py): how long a strict stream's events
        # waited for the guard's verdicts, the delay strict mode adds to delivery.
        strict_wait = Histogram(
            "tokenbus_relay_strict_wait_seconds",
            "Strict moderation: how long a batch of a strict stream waited for the "
            "guard to judge it before it was sent (0 when judged already)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        # Its log reader reads back the verdicts on a request older than its lookback.
        verdicts = VerdictTail(kafka, log_reader=log_reader, on_wait=strict_wait.observe)
        hub_task = asyncio.create_task(_keep_running("relay hub", hub.run), name="relay-hub")
        verdicts_task = asyncio.create_task(
            _keep_running("verdict tail", verdicts.run), name="relay-verdicts"
        )
        try:
            yield {
                "submitter": submitter,
                "hub": hub,
                "verdicts": verdicts,
                "log": log_reader,
                "directory": RequestDirectory(log_reader, access),
                "access": access,
                "moderation": moderation,
                "background": background,
                "server_settings": settings,
                "registry": registry,
                "audit_view": AuditView(audit) if audit is not None else None,
            }
        finally:
            try:
                await cancel_and_wait(hub_task, verdicts_task)
            finally:  # even if the lifespan is cancelled meanwhile
                await asyncio.gather(*background, return_exceptions=True)
                await submitter.close()

    app = FastAPI(title="tokenbus", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_read_timeout_s
    )
    if settings.cors_allow_origins:
        # Outside the body limits, so a preflight is answered before them, and a refusal
        # (401, 413, 429) still carries the header a page needs to read its reason.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    # Added last, so outermost: it sees every answer, those of BodyLimits and CORS
    # (a preflight) included.
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.include_router(submit_router)
    app.include_router(openai_router)
    app.include_router(relay_router)
    app.include_router(audit_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz(request: Request) -> JSONResponse | dict[str, str]:
        """200 once the API can produce to the broker and the relay is reading."""
        if not await request.state.submitter.ready():
            return error_response(
                503, "broker_unavailable", f"cannot produce to the broker at {kafka.bootstrap}"
            )
        if not request.state.hub.ready.is_set():
            return error_response(503, "relay_starting", "the relay is not reading the log yet")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        access.authorize_metrics(request.headers.get("authorization"), client_address(request))
        return Response(generate_latest(request.state.registry), media_type="text/plain")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return resources.files("tokenbus.edge").joinpath("static/index.html").read_text()

    return app


async def _keep_running(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Restart a background loop that failed (the broker went away, say)."""
    delay = 0.5
    while True:
        try:
            await run()
        except Exception:
            log.exception("%s stopped; restarting in %.1fs", name, delay)
            await asyncio.sleep(delay)  # back off before reconnecting
            delay = min(delay * 2, 10.0)


class _RelayCollector(Collector):
    def __init__(self, hub: StreamHub) -> None:
        self._hub = hub

    def collect(self) -> Any:
        yield CounterMetricFamily(
            "tokenbus_relay_events_read",
            "Events read from the tokens topic",
            value=self._hub.events_read,
        )
        yield CounterMetricFamily(
            "tokenbus_relay_malformed_events",
            "Undecodable events skipped",
            value=self._hub.malformed,
        )
        yield CounterMetricFamily(
            "tokenbus_relay_subscriber_overflows",
            "Subscribers that fell behind the live stream and caught up from the log",
            value=self._hub.overflows,
        )
        yield CounterMetricFamily(
            "tokenbus_relay_log_restarts",
            "Times the broker was seen to have lost its log (a restarted embedded broker); "
            "the hub then read it again from the start",
            value=self._hub.log_restarts,
        )
        yield GaugeMetricFamily(
            "tokenbus_relay_subscribers", "Open SSE subscriptions", value=self._hub.subscribers
        )
        yield GaugeMetricFamily(
            "tokenbus_relay_streams_held", "Streams held in memory", value=len(self._hub)
        )
        yield from self._hub.delivery_delay.collect()
