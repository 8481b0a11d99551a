"""OpenTelemetry tracing: one trace per job, from `POST /v1/jobs` through Kafka to the progress service.

Off unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`,
OTLP over HTTP), and then configured by the standard `OTEL_*` variables: the service name, resource
attributes, sampler, batch processor and exporter options. Every service calls `configure_tracing` once
at start. While it is off, `enabled()` is False and every helper here returns at once: no span, no
context, nothing stored or sent.

A trace context crosses process boundaries as a *carrier*: the propagation fields (`traceparent`, and
`tracestate` when there is one; whatever `OTEL_PROPAGATORS` injects) as a small JSON object. That text
is what a job row (`jobs.trace_context`, the submission's) and an outbox row (`outbox.headers`, the span
that staged it) store, and what the relay turns into Kafka message headers. A process that does not
trace passes a carrier on as it came, so a trace survives a hop that exports nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

from conveyor.jsoncodec import dumps, loads

# Either one turns tracing on; the first, when both are set, is where spans go (the OTLP exporter's rule).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# The name spans are created under (the instrumentation scope).
TRACER_NAME = "conveyor"
# Kafka message headers, as aiokafka takes and gives them.
Headers = Sequence[tuple[str, bytes]]

_enabled = False


def enabled() -> bool:
    """Whether this process records and exports spans."""
    return _enabled


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for tracing: an OTLP endpoint is set, and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def export_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where spans go, as the environment says (the OTLP exporter's rule), if tracing is wanted."""
    if not wanted(environ):
        return None
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return traces
    return environ["OTEL_EXPORTER_OTLP_ENDPOINT"].strip().rstrip("/") + "/v1/traces"


def configure_tracing(service: str) -> bool:
    """Set up the process's tracer provider if the environment asks for tracing; whether it did.
    `service` (e.g. `conveyor-worker`) is the service name unless `OTEL_SERVICE_NAME` (or
    `OTEL_RESOURCE_ATTRIBUTES`) names one."""
    global _enabled
    if _enabled or not wanted():
        return _enabled
    # Imported here: a process that does not trace never loads the SDK or the exporter's HTTP client.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_INSTANCE_ID: f"{os.uname().nodename}-{os.getpid()}"})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # The sampler comes from OTEL_TRACES_SAMPLER; the batch processor's queue, batch size and delay from
    # OTEL_BSP_*; the exporter's endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# --- carriers: a trace context as text, to store and send ----------------------------------------------


def carrier_of(span: Span) -> str | None:
    """The span's context as a carrier (JSON text), or None when not tracing or the span is invalid."""
    if not _enabled or not span.get_span_context().is_valid:
        return None
    fields: dict[str, str] = {}
    propagate.inject(fields, context=trace.set_span_in_context(span))
    return dumps(fields).decode() if fields else None


def current_carrier() -> str | None:
    """The current span's context as a carrier: what a change made now is to carry to its messages."""
    if not _enabled:
        return None
    return carrier_of(trace.get_current_span())


def _fields_of(carrier: str | None) -> dict[str, Any] | None:
    """The propagators' fields a carrier holds; None for no carrier, or one that is not a JSON object."""
    if carrier is None:
        return None
    try:
        fields = loads(carrier)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def context_of(carrier: str | None) -> otel_context.Context | None:
    """The trace context a carrier holds, to start a child span in; None if there is none."""
    fields = _fields_of(carrier)
    return None if fields is None else propagate.extract(fields)


def headers_of(carrier: str | None) -> list[tuple[str, bytes]] | None:
    """A carrier as Kafka message headers (`traceparent`, ...); None for no carrier."""
    fields = _fields_of(carrier)
    if fields is None:
        return None
    return [(str(name), str(value).encode()) for name, value in fields.items()]


def carrier_from_headers(headers: Headers | None) -> str | None:
    """The carrier in a Kafka record's headers, or None if they carry no trace context. Only the
    propagators' own fields are taken: other headers are the producer's business."""
    if not headers:
        return None
    names = propagate.get_global_textmap().fields
    fields = {name: value.decode(errors="replace") for name, value in headers if name in names}
    return dumps(fields).decode() if fields else None


def start_child(
    name: str,
    parent: str | otel_context.Context | None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A span started under `parent` (a carrier or a context; none: a new trace), not made current."""
    context = context_of(parent) if isinstance(parent, str) or parent is None else parent
    return tracer().start_span(name, context=context, kind=kind, attributes=attributes)


def child_of(span: Span, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
    """A span started under `span`, not made current."""
    return tracer().start_span(name, context=trace.set_span_in_context(span), attributes=attributes)


def trace_ids() -> dict[str, str] | None:
    """The current span's `trace_id` and `span_id` in hex, for a log line; None outside a valid span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }
