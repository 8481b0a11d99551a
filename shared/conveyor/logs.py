"""Structured logging for every process (structlog), human-readable by default, JSON on request."""

from __future__ import annotations

import logging
import re

import structlog
from structlog.typing import EventDict, WrappedLogger

from conveyor import tracing

# A query parameter that carries an API key (`?token=`, for browsers, which cannot set headers on a
# WebSocket or an EventSource): its value never reaches a log line.
SECRET_PARAMETER = re.compile(r"(?P<name>[?&]token=)[^&\s\"']*", re.IGNORECASE)
REDACTED = "[redacted]"
# How uvicorn begins the line it logs for every WebSocket handshake (`[accepted]`, `403`, a status).
WEBSOCKET_HANDSHAKE_LINE = '%s - "WebSocket %s"'
# The logger the progress service's sockets log through (`services/progress/frames.py`), a child of
# uvicorn's error logger: uvicorn's handshake line and websockets' "connection open" and "connection
# closed", three INFO lines per socket that say nothing the metrics do not. Below DEBUG it is set to
# WARNING, so those records are never made (a filter sees a record only once it is made: at 10,000
# sockets connecting, ~7% of the service's CPU); a socket's errors still reach the log.
WEBSOCKET_LOGGER = "uvicorn.error.websockets"


def redact(text: str) -> str:
    """The text with the value of every `token` query parameter replaced."""
    return SECRET_PARAMETER.sub(rf"\g<name>{REDACTED}", text)


class RedactSecrets(logging.Filter):
    """uvicorn logs every WebSocket handshake at INFO with its path and query string (and its access
    log, when enabled, every request's): a key in a URL would land in the logs as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class SkipHandshakeLines(logging.Filter):
    """uvicorn logs every WebSocket handshake through its error logger at INFO, whatever `access_log`
    says: an access-log line per socket, and 1,000 a second when clients reconnect together (about 4%
    of the progress service's CPU while 10,000 connect). Like the HTTP access log, which our services
    turn off, they are left to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(WEBSOCKET_HANDSHAKE_LINE))


def add_trace_ids(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """A line logged inside a span carries its `trace_id` and `span_id`, to find the trace from the log."""
    ids = tracing.trace_ids()
    if ids is not None:
        for name, value in ids.items():
            event_dict.setdefault(name, value)
    return event_dict


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    # Our own lines (structlog) at `level`; libraries' (standard logging) at INFO at the most verbose:
    # DEBUG is for following jobs (`job.started`, `job.recorded`), not every statement of a driver.
    library_level = max(logging.INFO, logging.getLevelName(level.upper()))
    logging.basicConfig(level=library_level, format="%(message)s")
    # On the handlers, not a logger: a filter there sees every library's records, whichever logger.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    uvicorn_errors = logging.getLogger("uvicorn.error")
    for earlier in [f for f in uvicorn_errors.filters if isinstance(f, SkipHandshakeLines)]:
        uvicorn_errors.removeFilter(earlier)  # configured again (a child process): its level decides
    debug = logging.getLevelName(level.upper()) == logging.DEBUG
    if not debug:
        uvicorn_errors.addFilter(SkipHandshakeLines())
    # At DEBUG it takes uvicorn's level, and its lines are logged, like the handshake lines above (the
    # filter on uvicorn's logger never sees a child's records: they go straight to the handlers).
    logging.getLogger(WEBSOCKET_LOGGER).setLevel(logging.NOTSET if debug else logging.WARNING)
    # aiokafka is chatty about reconnects that we already report ourselves.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # Alembic announces its dialect at every start; keep only the upgrades it runs.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    # Plain tracebacks: rich's pretty ones with local variables cost seconds of CPU and a megabyte of
    # log per error, on the request path.
    renderers: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)]
    )
    # Only when tracing is on (`conveyor.tracing`): otherwise there is never a span to name.
    trace_ids: list[structlog.types.Processor] = [add_trace_ids] if tracing.wanted() else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
