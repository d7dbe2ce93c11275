"""The Faust app: one agent reads ``tokenbus.requests`` and ``tokenbus.tokens``
together, joins each request with its events (`RequestTracker`), and adds every
finished request to one-minute tumbling windows per model and per tenant, held in
Faust tables. Faust's web server serves ``/metrics``, ``/summary`` and ``/readyz``.

Departures from Faust's defaults, each for the embedded broker (Tansu):

- group timeouts are short (`AnalyticsSettings`): Tansu answers a first JoinGroup
  after half the session timeout, 30 s with Faust's 60 s, 3 s with our 6 s;
- the producer (table changelogs) is not idempotent: Tansu has no InitProducerId.
  Faust turns idempotence on only for ``processing_guarantee="exactly_once"``,
  which is not used: a changelog is last-write-wins per key, so a duplicate
  written by a producer retry is harmless;
- changelog batches hold one record each (see `_faust_app`);
- tables live in memory (``memory://``) and are rebuilt from their changelogs on
  start; ``stream_wait_empty`` is off: a rebalance need not wait for the event
  in hand, since one read again is a duplicate that the fencing rule drops.

Values are read as raw bytes and decoded by `schemas.wire`, the one wire format;
a malformed message is counted and skipped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import generate_latest

from schemas import MalformedMessage, decode_event, decode_request
from tokenbus.bus.kafka import ssl_context
from tokenbus.bus.settings import AnalyticsSettings, KafkaSettings

from .metrics import AnalyticsMetrics
from .timings import RequestSummary
from .tracker import RequestTracker
from .windows import WindowStats

log = logging.getLogger(__name__)

# aiohttp takes the charset apart from the content type; the text format is UTF-8.
_PROMETHEUS_TEXT = "text/plain; version=0.0.4"


class Analytics:
    """The analytics consumer: a Faust app and the state its agent keeps."""

    def __init__(self, *, kafka: KafkaSettings, settings: AnalyticsSettings) -> None:
        self.kafka = kafka
        self.settings = settings
        self.metrics = AnalyticsMetrics()
        self.tracker = RequestTracker(
            max_open=settings.analytics_max_open_requests, on_dropped=self.metrics.fenced.inc
        )
        self.created = time.monotonic()
        self.first_event_after_s: float | None = None  # built -> first message read
        self.app = _faust_app(kafka, settings)
        self._by_model = self._window_table("by-model")
        self._by_tenant = self._window_table("by-tenant")
        topics = kafka.topics
        source = self.app.topic(
            topics.requests, topics.tokens, key_serializer="raw", value_serializer="raw"
        )
        self.app.agent(source, name="analytics")(self._process)
        self._add_pages()

    def _window_table(self, name: str) -> Any:  # faust's WindowWrapper is untyped
        table = self.app.Table(
            name,
            default=dict,
            partitions=self.kafka.partitions,  # co-partitioned with the topics read
        )  # keys and values go to the changelog as JSON, Faust's default for tables
        return table.tumbling(
            self.settings.analytics_window_s, expires=self.settings.analytics_window_retention_s
        )

    def run(self, *, loglevel: str = "INFO") -> None:
        """Run until SIGINT or SIGTERM, in a Faust worker (which owns the event
        loop, the signal handlers and the logging set-up)."""
        worker = faust.Worker(
            self.app,
            loglevel=loglevel,
            logging_config=_logging_config(loglevel),
            quiet=True,  # no banner: under `tokenbus up` it shares a terminal
            redirect_stdouts=False,
        )
        worker.execute_from_commandline()

    # -- the agent --------------------------------------------------------------

    async def _process(self, stream: faust.StreamT[bytes]) -> None:
        requests_topic = self.kafka.topics.requests
        async for event in stream.events():
            if self.first_event_after_s is None:
                self.first_event_after_s = time.monotonic() - self.created
                log.info(
                    "first message read %.2fs after start", self.first_event_after_s
                )  # the tuning's figure
            message = event.message
            try:
                if message.topic == requests_topic:
                    summary = self.tracker.request(decode_request(message.value))
                else:
                    summary = self.tracker.event(decode_event(message.value))
            except MalformedMessage as exc:
                self.metrics.malformed.labels(message.topic).inc()
                log.warning(
                    "skipping malformed message at %s[%d]@%d: %s",
                    message.topic, message.partition, message.offset, exc,
                )  # fmt: skip
                continue
            if summary is not None:
                self.count(summary)

    def count(self, summary: RequestSummary) -> None:
        """Add a finished request to its windows (by its terminal event's time)."""
        model = self.metrics.record(summary)  # bounded, as the metrics' labels are
        for windows, key in ((self._by_model, model), (self._by_tenant, summary.tenant)):
            at_end = windows.relative_to(summary.ended_at)
            stats = WindowStats.from_json(at_end[key].value())
            stats.add(summary)
            at_end[key] = stats.to_json()

    # -- HTTP ---------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "window_s": self.settings.analytics_window_s,
            "by_model": _windows(self._by_model, "model"),
            "by_tenant": _windows(self._by_tenant, "tenant"),
            "open_requests": len(self.tracker),
            "first_event_after_s": self.first_event_after_s,
        }

    def _add_pages(self) -> None:
        @self.app.page("/summary")
        async def summary(view: View, request: Request) -> Response:
            return view.json(self.summary())

        @self.app.page("/metrics")
        async def metrics(view: View, request: Request) -> Response:
            body = generate_latest(self.metrics.registry)
            return view.bytes(body, content_type=_PROMETHEUS_TEXT)

        @self.app.page("/readyz")
        async def ready(view: View, request: Request) -> Response:
            """200 once the group is joined and partitions are assigned."""
            if not self.app.consumer.assignment():
                return view.json({"status": "joining"}, status=503)
            return view.json({"status": "ready"})


def _faust_app(kafka: KafkaSettings, settings: AnalyticsSettings) -> faust.App:
    return faust.App(
        kafka.topic_prefix + settings.analytics_group_id,
        broker=[f"kafka://{server}" for server in kafka.bootstrap.split(",")],
        broker_client_id=kafka.client_id,
        broker_credentials=broker_credentials(kafka),
        store="memory://",
        # Faust makes its data directory (empty with the memory store) even so; by
        # default in the current directory, which is the user's.
        datadir=str(Path(tempfile.gettempdir()) / "tokenbus-analytics"),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.analytics_session_timeout_s,
        broker_heartbeat_interval=settings.analytics_heartbeat_interval_s,
        broker_rebalance_timeout=settings.analytics_rebalance_timeout_s,
        # Faust refuses a request timeout shorter than the session timeout.
        broker_request_timeout=max(
            kafka.request_timeout_ms / 1000, settings.analytics_session_timeout_s
        ),
        stream_wait_empty=False,
        # One record per changelog batch: Tansu answers ListOffsets(LATEST) with the
        # last batch's first offset + 1, and Faust's recovery reads a changelog up to
        # that answer, so the rest of a multi-record last batch was lost on restart.
        # A changelog write per finished request and table is few enough to send alone.
        producer_max_batch_size=1,
        web_enabled=True,
        web_bind=settings.analytics_host,
        web_port=settings.analytics_port,
        web_host=settings.analytics_host,
    )


def broker_credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """The security settings every tokenbus client uses (`tokenbus.bus.kafka.client_options`),
    in Faust's words; its transport turns them back into the same aiokafka options
    for its consumer, producer and admin client."""
    if kafka.uses_sasl:
        assert kafka.kafka_sasl_password is not None  # the settings' validator says so
        return faust.SASLCredentials(
            username=kafka.kafka_sasl_username,
            password=kafka.kafka_sasl_password.get_secret_value(),
            mechanism=kafka.kafka_sasl_mechanism,
            ssl_context=ssl_context(kafka) if kafka.uses_ssl else None,
        )
    if kafka.uses_ssl:
        return faust.SSLCredentials(ssl_context(kafka))
    return None


def _logging_config(level: str) -> dict[str, Any]:
    """tokenbus' log format (see `tokenbus.cli`); Faust's and aiokafka's chatter
    (every service's "Starting...") only when debugging."""
    quiet = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"tokenbus": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "tokenbus"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": quiet} for name in ("aiokafka", "faust", "mode")},
    }


def _windows(windows: Any, name: str) -> list[dict[str, Any]]:
    """Every window a table holds, oldest first."""
    rows = []
    for (key, (start, end)), value in windows.table.data.items():
        rows.append({
            name: key,
            "window_start": datetime.fromtimestamp(start, UTC).isoformat(),
            "window_end": datetime.fromtimestamp(end, UTC).isoformat(),
            **WindowStats.from_json(value).report(),
        })  # fmt: skip
    return sorted(rows, key=lambda row: (row["window_start"], row[name]))
