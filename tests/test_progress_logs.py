"""Keys never reach the logs: a browser's `?token=<key>` on a WebSocket or an EventSource URL is in no
log line of any service, at INFO or at DEBUG. uvicorn's WebSocket handshake lines, which carry URLs,
and websockets' "connection open" and "connection closed" are logged at DEBUG only (three per socket,
as an access log would be)."""

from __future__ import annotations

import contextlib
import json
import logging

import httpx
import structlog
import websockets

from conveyor.logs import REDACTED, WEBSOCKET_LOGGER, configure_logging, redact

from harness import KEY_A, Stack, eventually, wait_for_status

JOB_TIMEOUT_S = 90
LOG_TIMEOUT_S = 15
# A key of the right shape that no tenant has: a refused key must not be logged either.
UNKNOWN_KEY = "key-x-9876543210"


def test_the_value_of_every_token_parameter_is_redacted_and_nothing_else() -> None:
    line = '127.0.0.1:5 - "WebSocket /v1/events?after_seq=3&token=k1%2B&TOKEN=k2" [accepted]'
    assert redact(line) == (
        f'127.0.0.1:5 - "WebSocket /v1/events?after_seq=3&token={REDACTED}&TOKEN={REDACTED}" [accepted]'
    )
    assert (
        redact("GET /v1/jobs?tokens=1&my_token=2 a token= here")
        == "GET /v1/jobs?tokens=1&my_token=2 a token= here"
    )


def test_the_lines_about_each_websocket_are_logged_at_debug_only() -> None:
    uvicorn_errors = logging.getLogger("uvicorn.error")
    handshake = uvicorn_errors.makeRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/v1/events"),
        None,
    )
    started = uvicorn_errors.makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Application startup complete.", (), None
    )
    # configure_logging adds filters to uvicorn's logger and to the root's handlers: put back what the
    # other tests of this process found.
    sockets = logging.getLogger(WEBSOCKET_LOGGER)
    handlers = list(logging.getLogger().handlers)
    filters_before = [list(uvicorn_errors.filters), *(list(handler.filters) for handler in handlers)]
    level_before = sockets.level
    try:
        configure_logging("INFO")
        assert (uvicorn_errors.filter(handshake), uvicorn_errors.filter(started)) == (False, True)
        # The progress service's sockets: their INFO lines are not even made, their errors are logged.
        assert (sockets.isEnabledFor(logging.INFO), sockets.isEnabledFor(logging.WARNING)) == (False, True)
        configure_logging("DEBUG")
        assert (uvicorn_errors.filter(handshake), uvicorn_errors.filter(started)) == (True, True)
        # ...and at DEBUG whatever uvicorn's logger logs (the integration test below sees them).
        assert sockets.level == logging.NOTSET
    finally:
        for filterer, filters in zip([uvicorn_errors, *handlers], filters_before, strict=True):
            filterer.filters[:] = filters
        sockets.setLevel(level_before)
        structlog.reset_defaults()


def http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://")


async def use_keys_in_urls(progress_url: str, gateway_url: str, job_id: str) -> None:
    """Every way a key can travel in a URL: both sockets, SSE and the JSON history, and the gateway."""
    for key in (KEY_A, UNKNOWN_KEY):
        # The unknown key's sockets are closed with 1008 as soon as they open.
        with contextlib.suppress(websockets.ConnectionClosed):
            async with websockets.connect(f"{progress_url}/v1/jobs/{job_id}/events?token={key}") as ws:
                async for _ in ws:
                    pass
        with contextlib.suppress(websockets.ConnectionClosed):
            async with websockets.connect(f"{progress_url}/v1/events?after_seq=0&token={key}") as ws:
                await ws.send(json.dumps({"op": "ping"}))
                await ws.recv()
        async with httpx.AsyncClient(timeout=30) as client:
            events_url = f"{http_url(progress_url)}/v1/jobs/{job_id}/events"
            async with client.stream(
                "GET", events_url, params={"token": key}, headers={"Accept": "text/event-stream"}
            ) as response:
                async for _ in response.aiter_lines():
                    pass
            await client.get(events_url, params={"token": key})
            await client.get(f"{gateway_url}/v1/jobs/{job_id}", params={"token": key})


async def test_a_key_in_a_url_is_in_no_log_line_at_info_or_debug(module_stack: Stack) -> None:
    debug_progress = await module_stack.start_progress("progress-debug", CONVEYOR_LOG_LEVEL="DEBUG")
    debug_gateway = module_stack.start_gateway("gateway-debug", CONVEYOR_LOG_LEVEL="DEBUG")
    try:
        await module_stack.wait_ready(debug_gateway)
        job_id = await module_stack.submit_job({"type": "demo.noop"})
        async with module_stack.client() as client:
            await wait_for_status(client, job_id, {"succeeded"}, JOB_TIMEOUT_S)
        await use_keys_in_urls(module_stack.progress_url, module_stack.gateway_url, job_id)
        await use_keys_in_urls(debug_progress, debug_gateway, job_id)

        # At DEBUG the handshakes are logged, URL and all (so the lines a key could be in are there);
        # at INFO they are not (uvicorn logs each as it answers it, before the client has the answer).
        def handshakes_logged() -> bool:
            return module_stack.log("progress-debug").count("/v1/events?after_seq=0&token=") == 2

        await eventually(handshakes_logged, LOG_TIMEOUT_S, "the DEBUG progress service to log the handshakes")
        assert "WebSocket /v1/" not in module_stack.log("progress")
        assert "connection open" not in module_stack.log("progress")
        assert "connection open" in module_stack.log("progress-debug")
        # ...with the key's place kept and its value gone, here and in every other line of every service.
        for log in module_stack.log_dir.glob("*.log"):
            text = log.read_text(errors="replace")
            for key in (KEY_A, UNKNOWN_KEY):
                assert key not in text, f"{log.name} logged a key: {key}"
        assert module_stack.log("progress-debug").count(f"token={REDACTED}") >= 2
    finally:
        module_stack.stop("progress-debug")
        module_stack.stop("gateway-debug")
