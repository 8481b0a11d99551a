"""Property-based fuzzing of the running gateway: no input, however malformed, gets a 5xx.

Two layers, both against the real gateway process of `module_stack` (sqlite and PostgreSQL):

* schemathesis reads the gateway's own `/openapi.json` and runs every operation it lists (so new
  endpoints are covered without touching this file) through its examples, coverage (boundary and
  negative values, wrong types, missing fields, unexpected methods and media types) and fuzzing
  (valid and invalid data) phases;
* small Hypothesis tests send what the schema cannot describe: JSON that Python reads but the
  schema cannot express (NaN, huge numbers, NUL, lone surrogates, deep nesting) and arbitrary bytes
  under arbitrary content types to `POST /v1/jobs`; arbitrary path segments, suffixes and query
  strings to `GET /v1/jobs/{id}`.

Every answer must be below 500 and hold no traceback; every 4xx must be problem details.
Generation is derandomized and uses no example database, so a run is the same locally and in CI.
Failing examples are not shrunk (each is small already; replaying against a live stack is slow):
every failure names the exact request and the answer.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, as_reported_failure
from schemathesis.core.result import Ok
from schemathesis.pytest.lazy import get_all_tests
from schemathesis.specs.openapi.schemas import OpenApiSchema

from conveyor.lifecycle import JobState

from harness import KEY_A, Stack

PROBLEM_JSON = "application/problem+json"
AUTH = {"Authorization": f"Bearer {KEY_A}"}
# Generated cases per operation, on top of the schema's examples and the coverage phase's cases.
MAX_EXAMPLES = 40
RAW_EXAMPLES = 60
SEED = 20240611
# Generous (the stack shares the machine with Kafka, PostgreSQL and workers), yet it catches a hang.
REQUEST_TIMEOUT_S = 30.0
# `?wait=` holds a request until the job changes, for up to a minute: the fuzz waits at most this long.
WAIT_CAP_S = 1
JOB_TYPES = ["demo.echo", "demo.noop", "demo.sleep", "demo.fail"]
TERMINAL = {state.value for state in JobState if state.is_terminal}

RAW_SETTINGS = settings(
    max_examples=RAW_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def describe(request: Any, status: int, headers: Any, text: str) -> str:
    """The request and the answer, enough to replay it by hand."""
    body = getattr(request, "content", None) if isinstance(request, httpx.Request) else request.body
    if isinstance(body, bytes | str) and len(body) > 2000:
        body = f"{body[:2000]!r}... ({len(body)} in all)"
    return (
        f"{request.method} {request.url}\nrequest headers: {dict(request.headers)}\nrequest body: {body!r}\n"
        f"-> {status} {dict(headers)}\n{text[:4000]}"
    )


def assert_sound(status: int, content_type: str, text: str, what: str) -> None:
    assert status < 500, f"server error:\n{what}"
    assert "Traceback" not in text, f"traceback in the body:\n{what}"
    if 400 <= status < 500:
        assert content_type.split(";")[0].strip() == PROBLEM_JSON, (
            f"a 4xx that is not problem details:\n{what}"
        )
        problem = json.loads(text)
        assert problem["status"] == status, f"problem `status` differs from the HTTP status:\n{what}"
        assert problem["title"], f"problem without a title:\n{what}"


@pytest.fixture(scope="module")
def gateway(module_stack: Stack) -> Iterator[httpx.Client]:
    # No keep-alive: the server drops a connection after an unexpected error, which would otherwise
    # surface as a reset on the next example instead of as the 500 that caused it.
    with httpx.Client(
        base_url=module_stack.gateway_url,
        headers=AUTH,
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        yield client


# --- schemathesis: every operation of the OpenAPI document ------------------------------------------------


def no_traceback_and_problem_details(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> None:
    """Stricter than `not_a_server_error`, which lets a 5xx pass on some content-type probes."""
    text = response.content.decode(errors="replace")
    content_type = (response.headers.get("content-type") or [""])[0]
    what = describe(response.request, response.status_code, response.headers, text)
    assert_sound(response.status_code, content_type, text, what)


def declared_maximum(schema: Any) -> float | None:
    """The largest `maximum`/`exclusiveMaximum` anywhere in a parameter's definition."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("maximum", "exclusiveMaximum") and isinstance(value, int | float):
                    found.append(float(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return max(found) if found else None


def cap_wait(case: schemathesis.Case[Any]) -> None:
    """A valid long `?wait=` becomes WAIT_CAP_S; invalid ones (type, range) are sent as generated."""
    if not case.query or "wait" not in case.query:
        return
    try:
        seconds = float(case.query["wait"])
    except (TypeError, ValueError):
        return
    parameter = case.operation.query.get("wait")
    maximum = declared_maximum(parameter.definition if parameter is not None else None)
    if not math.isnan(seconds) and seconds > WAIT_CAP_S and (maximum is None or seconds <= maximum):
        case.query["wait"] = WAIT_CAP_S


@pytest.fixture
def gateway_schema(module_stack: Stack) -> OpenApiSchema:
    """The OpenAPI document as the running gateway serves it."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": AUTH,
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {
                "mode": "all",  # valid and invalid (negative) data
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "no-shrink": True,
            },
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
            },
        }
    )
    return schemathesis.openapi.from_url(f"{module_stack.gateway_url}/openapi.json", config=config)


def json_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from json_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from json_refs(item)


def resolves(document: Any, ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    node = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or token not in node:
            return False
        node = node[token]
    return True


def test_every_reference_in_the_openapi_document_resolves(gateway: httpx.Client) -> None:
    """A dangling `$ref` silently blinds the fuzz: schemathesis then generates nothing there (no body)."""
    document = gateway.get("/openapi.json").json()
    dangling = sorted({ref for ref in json_refs(document) if not resolves(document, ref)})
    assert not dangling, f"the gateway's OpenAPI document refers to what it does not define: {dangling}"


def test_no_operation_answers_a_server_error(
    gateway_schema: OpenApiSchema, subtests: pytest.Subtests
) -> None:
    """Every operation of the document, through schemathesis's examples, coverage and fuzzing phases.

    This is what `schemathesis.pytest.from_fixture(...).parametrize()` runs per operation, built by
    the same function; that decorator itself fails on pytest >= 9.2 (it rewrites `Item._nodeid`,
    which pytest no longer has), so the per-operation tests run here as subtests instead.
    """
    requests: Counter[str] = Counter()

    def call_and_check(case: schemathesis.Case[Any]) -> None:
        requests[case.operation.label] += 1
        cap_wait(case)
        response = case.call(headers=AUTH, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(
            response, checks=[not_a_server_error, no_traceback_and_problem_details], headers=AUTH
        )

    labels = []
    for result in get_all_tests(
        schema=gateway_schema, test_func=call_and_check, settings=None, given_kwargs=None
    ):
        if not isinstance(result, Ok):
            raise result.err()  # the document itself is invalid
        operation, run_operation = result.ok()
        labels.append(operation.label)
        with subtests.test(msg=operation.label):
            try:
                run_operation()
            except FailureGroup as exc:
                raise as_reported_failure(exc) from None
    print("requests per operation:", dict(requests))
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}"} <= set(labels), labels
    assert all(requests[label] > 0 for label in labels), requests


# --- Hypothesis: raw bodies, content types, paths and query strings ----------------------------------------


def exchange(gateway: httpx.Client, method: str, url: str, **kwargs: Any) -> None:
    """Send one request; fail, naming it, on a 5xx, a traceback, a 4xx not in problem details, no answer."""
    request = gateway.build_request(method, url, **kwargs)
    try:
        response = gateway.send(request)
    except httpx.TransportError as exc:
        raise AssertionError(f"no answer ({exc!r}):\n{describe(request, 0, {}, '')}") from None
    what = describe(request, response.status_code, response.headers, response.text)
    assert_sound(response.status_code, response.headers.get("content-type", ""), response.text, what)


@pytest.fixture(scope="module")
def finished_job_id(gateway: httpx.Client) -> str:
    """A job of this tenant that is done, so a `?wait=` on it returns at once. It goes at the top
    priority: the fuzzing before it queues hundreds of `demo.sleep` jobs at the default one, and on a
    busy machine a job behind them all did not finish within the deadline."""
    response = gateway.post("/v1/jobs", json={"type": "demo.echo", "payload": {"fuzz": True}, "priority": 1})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    deadline = time.monotonic() + 60
    while gateway.get(f"/v1/jobs/{job_id}").json()["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.2)
    return job_id


def encode(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", errors="surrogatepass")


def percent_encode(text: str) -> str:
    return quote(text.encode("utf-8", errors="surrogatepass"), safe="")


def query_string(pairs: list[tuple[str, str | None]]) -> str:
    """`k=v&k2&...`: repeated keys, keys without a value, any code point (even lone surrogates) encoded."""
    return "&".join(
        percent_encode(key) if value is None else f"{percent_encode(key)}={percent_encode(value)}"
        for key, value in pairs
    )


# What a client can send as a header value (HTTP forbids control characters and surrounding blanks).
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "application/problem+json",
            "application/vnd.conveyor+json",
            "+json",
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "",
            ";",
        ]
    ),
    header_text,
)
# Strings that databases and JSON codecs trip over: NUL, lone surrogates, non-BMP, long ones.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "\U0001f600", "' OR 1=1 --", "%s%n", "x" * 5000, ""]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**100, 0]),
    st.floats(),  # NaN and ±Infinity too, which Python's json reads and writes
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4),
    max_leaves=20,
)
known_fields = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(JOB_TYPES), nasty_text)},
    optional={
        "payload": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {}, optional={"seconds": json_scalars, "steps": json_scalars, "fail_times": json_scalars}
            ),
        ),
        "priority": json_scalars,
        "max_attempts": json_scalars,
        "run_at": st.one_of(
            json_scalars, st.sampled_from(["2030-01-01T00:00:00Z", "9999-12-31T23:59:59+14:00"])
        ),
        "delay_s": json_scalars,
        "timeout_s": json_scalars,
        "labels": st.one_of(json_values, st.dictionaries(nasty_text, json_scalars, max_size=20)),
    },
)
# Known fields with wrong types and values, plus unknown fields.
submissions = st.tuples(known_fields, st.dictionaries(nasty_text, json_values, max_size=2)).map(
    lambda parts: {**parts[1], **parts[0]}
)
json_bodies = st.one_of(
    submissions.map(encode),
    submissions.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    submissions.map(lambda value: json.dumps(value).encode("utf-16")),
    submissions.map(encode).flatmap(lambda body: st.integers(0, len(body)).map(lambda n: body[:n])),
    json_values.map(encode),
    st.integers(2, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(2, 100_000).map(
        lambda depth: b'{"type": "demo.echo", "payload": ' + b"[" * depth + b"]" * depth + b"}"
    ),
)
json_content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.x+json"]
)
idempotency_keys = st.one_of(st.none(), header_text, st.sampled_from(["k" * 300, "same-key"]))


@RAW_SETTINGS
@given(body=json_bodies, content_type=json_content_types, idempotency_key=idempotency_keys)
def test_json_submissions_get_no_server_error(
    gateway: httpx.Client, body: bytes, content_type: str, idempotency_key: str | None
) -> None:
    """JSON that the schema cannot describe: NaN, huge numbers, NUL, lone surrogates, deep nesting."""
    headers = {"Content-Type": content_type}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    exchange(gateway, "POST", "/v1/jobs", content=body, headers=headers)


@RAW_SETTINGS
@given(body=st.one_of(st.binary(max_size=300), json_bodies), content_type=content_types)
def test_any_body_under_any_content_type_gets_no_server_error(
    gateway: httpx.Client, body: bytes, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    exchange(gateway, "POST", "/v1/jobs", content=body, headers=headers)


path_segments = st.one_of(
    st.text(max_size=80).map(percent_encode),
    st.sampled_from(
        ["", ".", "..", "%00", "%2F", "%25", "%zz", "%", "%C0%AF", "%ED%A0%80", "a%00b", "x" * 2000, "0" * 36]
    ),
    st.just("FINISHED"),  # stands for a real job of the tenant
)
suffixes = st.sampled_from(["", "/", "/result", "/cancel", "/events", "/%00", "//"])
query_keys = st.one_of(
    st.sampled_from(["wait", "limit", "cursor", "status", "type", "label", "after", "before", "page"]),
    nasty_text,
)
# Valid waits are short; the rest are invalid in type or range (the gateway should refuse them at once).
wait_values = st.one_of(
    st.sampled_from(["0", "0.5", "1", "-1", "61", "1e309", "inf", "-inf", "nan", "", "soon", "0x1", "1_0"]),
    st.floats(max_value=WAIT_CAP_S).map(str),
)
query_values = st.one_of(
    nasty_text, st.integers().map(str), st.sampled_from(["-1", "0", "1e999", "true", "null", "[]"])
)
query_pairs = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.one_of(st.none(), wait_values)),
        st.tuples(query_keys.filter(lambda key: key != "wait"), st.one_of(st.none(), query_values)),
    ),
    max_size=5,
)


@RAW_SETTINGS
@given(segment=path_segments, suffix=suffixes, pairs=query_pairs)
def test_raw_job_urls_get_no_server_error(
    gateway: httpx.Client,
    finished_job_id: str,
    segment: str,
    suffix: str,
    pairs: list[tuple[str, str | None]],
) -> None:
    job_id = finished_job_id if segment == "FINISHED" else segment
    query = query_string(pairs)
    exchange(gateway, "GET", f"/v1/jobs/{job_id}{suffix}" + (f"?{query}" if query else ""))
