"""What the `conveyor` client commands draw: a job's live progress bar, job tables, the queue view."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from conveyor.client.models import Event, Job, JobStatus, Stats
from conveyor.client.syncclient import Client

STATUS_STYLES = {
    JobStatus.SCHEDULED: "cyan",
    JobStatus.QUEUED: "blue",
    JobStatus.RUNNING: "yellow",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELED: "magenta",
}
FULL_PERCENT = 100.0


def status_text(status: JobStatus) -> Text:
    return Text(status.value, style=STATUS_STYLES.get(status, ""))


def watch(client: Client, job: Job | str, console: Console) -> Job:
    """Draw the job's progress (percent and message) from its live events until it finishes; the
    finished job. A dropped connection is resumed by `Client.events` without a gap."""
    bar = Progress(
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )
    job_id = job if isinstance(job, str) else job.id
    with bar:
        task = bar.add_task("", total=None, status=status_text(JobStatus.QUEUED))
        for event in client.events(job):
            total, completed = _bar_position(event)
            bar.update(
                task,
                total=total,
                completed=completed,
                description=escape(event.progress.message or ""),
                status=status_text(event.status),
            )
            if event.terminal:
                bar.stop_task(task)
    return client.get(job_id)


def _bar_position(event: Event) -> tuple[float | None, float]:
    """(total, completed): an indeterminate bar while a running job reports no percent."""
    if event.status is JobStatus.SUCCEEDED:
        return FULL_PERCENT, FULL_PERCENT
    percent = event.progress.percent
    if percent is None:
        return (FULL_PERCENT, 0.0) if event.terminal else (None, 0.0)
    return FULL_PERCENT, percent


def job_summary(job: Job) -> Table:
    """One job, field by field (`conveyor status`)."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    progress = _progress_cell(job)
    rows: list[tuple[str, RenderableType]] = [
        ("id", job.id),
        ("type", Text(job.type)),
        ("status", status_text(job.status)),
        ("priority", str(job.priority)),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("progress", progress),
        ("created", _when(job.created_at)),
    ]
    if job.labels:
        rows.append(("labels", Text(", ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))))
    if job.run_at is not None and not job.finished:
        rows.append(("runs at", _when(job.run_at)))
    if job.finished_at is not None:
        rows.append(("finished", _when(job.finished_at)))
    if job.error is not None:
        rows.append(("error", Text(f"{job.error.type}: {job.error.message}", style="red")))
    if job.status is JobStatus.SUCCEEDED:
        rows.append(("result", Text(_json_text(job.result))))
    for name, value in rows:
        table.add_row(name, value)
    return table


def job_table(jobs: Iterable[Job], now: datetime | None = None) -> Table:
    """Jobs as rows: id, type, status, progress, age (`conveyor ls`)."""
    moment = now or datetime.now(UTC)
    table = Table(box=box.SIMPLE_HEAD)
    for header in ("id", "type", "status", "progress", "age"):
        table.add_column(header, overflow="fold", no_wrap=header in ("id", "status", "age"))
    for job in jobs:
        table.add_row(
            job.id, Text(job.type), status_text(job.status), _progress_cell(job), age(job.created_at, moment)
        )
    return table


def queue_view(stats: Stats, base_url: str) -> RenderableType:
    """The tenant's queue (`conveyor top`): per priority, totals, the last minute, the oldest wait."""
    table = Table(box=box.SIMPLE_HEAD, title=f"Conveyor queue · {base_url}", title_justify="left")
    for header in ("priority", "scheduled", "queued", "running"):
        table.add_column(header, justify="right")
    for priority, counts in sorted(stats.priorities.items()):
        table.add_row(f"p{priority}", str(counts.scheduled), str(counts.queued), str(counts.running))
    totals = stats.totals
    table.add_section()
    table.add_row("all", str(totals.scheduled), str(totals.queued), str(totals.running), style="bold")
    finished = stats.finished_last_minute
    oldest = (
        f"queued {age(stats.oldest_queued_at, stats.at)} ago"
        if stats.oldest_queued_at is not None
        else "none"
    )
    lines = Text.assemble(
        ("finished in the last minute: ", "bold"),
        (f"{finished.succeeded} succeeded", STATUS_STYLES[JobStatus.SUCCEEDED]),
        ", ",
        (f"{finished.failed} failed", STATUS_STYLES[JobStatus.FAILED]),
        ", ",
        (f"{finished.canceled} canceled", STATUS_STYLES[JobStatus.CANCELED]),
        "\n",
        ("oldest waiting job: ", "bold"),
        oldest,
        "\n",
        (f"at {_when(stats.at)} UTC", "dim"),
    )
    return Group(table, lines)


def age(moment: datetime, now: datetime) -> str:
    """How long ago, in its largest unit: `42s`, `7m`, `3h`, `2d`."""
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _progress_cell(job: Job) -> Text:
    percent = job.progress.percent
    message = job.progress.message or ""
    if percent is None and job.status is JobStatus.SUCCEEDED:
        percent = FULL_PERCENT
    shown = f"{percent:.0f}%" if percent is not None else ""
    return Text(" ".join(part for part in (shown, message) if part))


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
