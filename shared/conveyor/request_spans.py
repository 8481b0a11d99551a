"""The server span of every HTTP request and WebSocket, when tracing is on: FastAPI's own telemetry.

FastAPI creates it once a tracer provider is set (`conveyor.tracing.configure_tracing`): named by the
route's template (`POST /v1/jobs`, `GET /v1/jobs/{job_id}`), never by the path with its ids, and
continuing the client's trace if the request carries a `traceparent`. It is the current span while the
route runs, so what the route changes (`conveyor.committer` takes the context) carries the request's
trace on to Kafka. This module says how the services use it: no spans for probes and scrapes, no
spans of FastAPI's own steps (dependencies, the endpoint: two more per request, on the submission's
hot path), and no OpenTelemetry metrics or logs (metrics are Prometheus', logs structlog's). While
tracing is off FastAPI passes every request straight through.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig

# Paths called by probes and scrapers many times a minute: no span.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def http_telemetry() -> TelemetryConfig:
    """The `telemetry` of the services' FastAPI apps."""
    return {"metrics": False, "logs": False, "operation_spans": False, "exclude": untraced}
