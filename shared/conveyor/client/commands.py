"""The `conveyor` command as a client: submit, status, watch, cancel, retry, ls, types, top.

Each takes `--url` (`CONVEYOR_URL`, default http://127.0.0.1:8000) and `--key` (`CONVEYOR_API_KEY`,
default: the `data/dev-api-key` that `make run` writes). `--json` prints the job resource as one JSON
object and nothing else on stdout. An API error prints its problem's title and detail on stderr and
exits 1; a watched or waited-for job exits 0 if it succeeded, 1 if it failed, 2 if it was canceled.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from conveyor.client import display
from conveyor.client.config import DEFAULT_URL, KEY_ENV, URL_ENV
from conveyor.client.errors import ConveyorError, ValidationFailed
from conveyor.client.models import Job, JobStatus
from conveyor.client.syncclient import Client

# Exit codes of a job that was waited for or watched to its end.
EXIT_CODES = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELED: 2}
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEV_KEY_FILE = "dev-api-key"
DEFAULT_LIST_LIMIT = 50
TOP_REFRESH_S = 1.0

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

Url = Annotated[str, typer.Option("--url", envvar=URL_ENV, help="The gateway's base URL.")]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar=KEY_ENV,
        show_default=False,
        show_envvar=True,
        help="API key; default: the development key of `make run` (data/dev-api-key).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the job resource as JSON, nothing else.")]
JobId = Annotated[str, typer.Argument(help="The job's id.", show_default=False)]


def register(app: typer.Typer) -> None:
    """Add the client commands to the `conveyor` command."""
    for command in (submit, status, watch, cancel, retry):
        app.command(rich_help_panel="Client")(command)
    app.command("ls", rich_help_panel="Client")(list_jobs)
    app.command("types", rich_help_panel="Client")(job_types)
    app.command("top", rich_help_panel="Client")(top)


def submit(
    job_type: Annotated[str, typer.Argument(metavar="TYPE", help="A registered job type.")],
    payload: Annotated[
        str | None, typer.Option(help="The payload: JSON, @file (JSON in a file), or - (JSON on stdin).")
    ] = None,
    priority: Annotated[int | None, typer.Option(min=1, max=5, help="1 (most urgent) to 5.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value; may repeat.")] = None,
    delay: Annotated[float | None, typer.Option(min=0, help="Run this many seconds from now.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Default: a new one (reused on retries).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job finishes.")] = False,
    watch_it: Annotated[bool, typer.Option("--watch", help="Draw its progress until it finishes.")] = False,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Submit a job."""
    if wait and watch_it:
        _usage("--wait and --watch: give one of them")
    body = _payload(payload)
    labels = _labels(label or [])
    with _client(url, key) as client, _api_errors():
        job = client.submit(
            job_type, body, priority=priority, labels=labels, delay_s=delay, idempotency_key=idempotency_key
        )
        if not as_json:
            stdout.print(f"{job.id} ", display.status_text(job.status), Text(f" ({job.type})"))
        if watch_it:
            job = display.watch(client, job, stderr)
        elif wait:
            job = client.wait(job.id)
    _finish(job, as_json, waited=wait or watch_it)


def status(job_id: JobId, as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Show a job: its status, progress, result or error."""
    with _client(url, key) as client, _api_errors():
        job = client.get(job_id)
    if as_json:
        _print_json(job)
    else:
        stdout.print(display.job_summary(job))


def watch(job_id: JobId, as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Draw a job's live progress until it finishes; exit 0 succeeded, 1 failed, 2 canceled."""
    with _client(url, key) as client, _api_errors():
        job = display.watch(client, job_id, stderr)
    _finish(job, as_json, waited=True)


def cancel(job_id: JobId, as_json: AsJson = False, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a job: it never runs, or its handler is told to stop."""
    with _client(url, key) as client, _api_errors():
        job = client.cancel(job_id)
    _report(job, as_json)


def retry(
    job_id: JobId,
    attempts: Annotated[int | None, typer.Option(min=1, help="More attempts; default: the type's.")] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Run a failed job again."""
    with _client(url, key) as client, _api_errors():
        job = client.retry(job_id, attempts)
    _report(job, as_json)


def list_jobs(
    status: Annotated[list[str] | None, typer.Option(help="Only jobs in this status; may repeat.")] = None,
    job_type: Annotated[list[str] | None, typer.Option("--type", help="Only this type; may repeat.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value; every one must match.")] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="At most this many jobs, newest first.")
    ] = DEFAULT_LIST_LIMIT,
    as_json: Annotated[bool, typer.Option("--json", help="One job resource per line (JSON Lines).")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List the tenant's jobs, newest first."""
    with _client(url, key) as client, _api_errors():
        jobs = client.list(status=status, type=job_type, label=_labels(label or []), limit=limit)
        if as_json:
            for job in jobs:
                _print_json(job)
            return
        listed = list(jobs)
    stdout.print(display.job_table(listed))


def job_types(
    as_json: Annotated[bool, typer.Option("--json", help="The types and their payload schemas.")] = False,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List the registered job types."""
    with _client(url, key) as client, _api_errors():
        types = client.types()
    if as_json:
        print(json.dumps([job_type.model_dump(mode="json") for job_type in types]))
        return
    table = Table("type", "description", box=None)
    for job_type in types:
        table.add_row(Text(job_type.name), Text(job_type.description))
    stdout.print(table)


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one view and exit.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = TOP_REFRESH_S,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """A live view of the tenant's queue: per priority, finished per minute, the oldest wait."""
    with _client(url, key) as client, _api_errors():
        view = display.queue_view(client.stats(), client.base_url)
        if once:
            stdout.print(view)
            return
        try:
            with Live(view, console=stdout, auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(display.queue_view(client.stats(), client.base_url), refresh=True)
        except KeyboardInterrupt:
            return


# --- Helpers ---


def _client(url: str, key: str | None) -> Client:
    api_key = key or _dev_key()
    if not api_key:
        _usage(f"no API key: pass --key, set {KEY_ENV}, or run `make run` (which writes data/{DEV_KEY_FILE})")
    return Client(url, api_key=api_key)


def _dev_key() -> str | None:
    """The development key `conveyor run` keeps in its data folder, if there is one."""
    path = Path(os.environ.get("CONVEYOR_DATA_DIR") or "data") / DEV_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """An API error is its problem's title and detail on stderr, and exit 1; Ctrl-C exits 130."""
    try:
        yield
    except ConveyorError as exc:
        problem = exc.problem
        stderr.print(f"[red]{escape(problem.title.lower())}[/red]: {escape(problem.detail or '')}")
        if isinstance(exc, ValidationFailed):
            for error in exc.errors:
                stderr.print(f"  {escape(error.get('field', ''))}: {escape(error.get('message', ''))}")
        raise typer.Exit(EXIT_API_ERROR) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _usage(message: str) -> NoReturn:
    stderr.print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(EXIT_USAGE)


def _payload(given: str | None) -> Any:
    """`--payload`: JSON, `@file` or `-` (stdin)."""
    if given is None:
        return None
    if given == "-":
        text = sys.stdin.read()
    elif given.startswith("@"):
        try:
            text = Path(given[1:]).read_text()
        except OSError as exc:
            _usage(f"--payload {given}: {exc.strerror or exc}")
    else:
        text = given
    try:
        return json.loads(text)
    except ValueError as exc:
        _usage(f"--payload is not JSON: {exc}")


def _labels(pairs: list[str]) -> dict[str, str] | None:
    labels = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _usage(f"--label {pair!r}: give key=value")
        labels[name] = value
    return labels or None


def _print_json(job: Job) -> None:
    print(job.model_dump_json())  # plain print: no markup, no wrapping, one line


def _report(job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job)
    else:
        stdout.print(f"{job.id} ", display.status_text(job.status))


def _finish(job: Job, as_json: bool, *, waited: bool) -> None:
    """Print the job (if it was waited for, what it came to) and exit with its status's code."""
    if as_json:
        _print_json(job)
    elif waited:
        stdout.print(display.job_summary(job))
    if waited:
        raise typer.Exit(EXIT_CODES.get(job.status, 0))
