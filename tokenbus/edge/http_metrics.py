"""HTTP request metrics of the relay: a pure ASGI middleware (no body buffering, so
SSE streams pass through untouched).

Requests are labelled by route template (``/v1/requests/{request_id}/events``),
never the raw path: every request id would be a new series. A path no route
matches is ``unmatched``; a method outside the usual few is ``other``. The
duration is to the response's start: for an SSE stream that is the time to its
headers, not the stream's length (which the client decides).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics(Collector):
    def __init__(self) -> None:
        # Unregistered: the app's registry (built in its lifespan) registers this.
        self.requests = Counter(
            "tokenbus_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=None,
        )
        self.duration = Histogram(
            "tokenbus_http_request_duration_seconds",
            "Request received to response start (for SSE: to the stream's headers)",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=None,
        )

    def collect(self) -> Any:
        yield from self.requests.collect()
        yield from self.duration.collect()

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in _METHODS else "other"
        route = _route_template(scope)
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


def _route_template(scope: Scope) -> str:
    # FastAPI puts the matched route into the scope, which routing updates in place.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        began = time.perf_counter()
        status: int | None = None

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._metrics.record(scope, status, time.perf_counter() - began)
            await send(message)

        try:
            await self._app(scope, receive, send_recording)
        except Exception:
            if status is None:  # raised before answering: the server answers 500
                self._metrics.record(scope, 500, time.perf_counter() - began)
            raise
