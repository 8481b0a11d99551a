"""Priority benchmark: how the workers share their slots between the five priority levels when every
level is backlogged, and how long jobs of each level wait under that saturation.

It prints figures and asserts nothing. It starts its own embedded stack (``python -m conveyor run``)
with no workers, in a fresh temporary data folder on free ports, and stops it at the end.

1. Backlog: ``--backlog`` ``demo.sleep`` jobs (``--job-seconds`` each) at every level, interleaved, from
   ``--tenants`` tenants in turn (jobs are keyed by job id, so each tenant's jobs fill every partition,
   and the worker takes the tenants in turn within a level).
2. The benchmark starts ``--workers`` workers. While every level still has a backlog, the starts per
   level are compared with the weights (``--weights``, else the default 16:8:4:2:1).
3. Once the top level's backlog has all started, the levels below still saturate the workers; new
   top-priority jobs then arrive at ``--arrival-rate`` per second for ``--arrival-seconds``, and their
   queue wait shows how long a new urgent job waits behind a saturating backlog.

Every figure comes from the jobs' own ``created_at`` and ``started_at``, read from the stack's database.
A backlog job's queue wait counts from the moment the workers started, since before it nothing ran.

    python bench/priority.py [--backlog 400] [--job-seconds 0.1] [--workers 2] [--worker-concurrency 8]
                             [--arrival-rate 4] [--arrival-seconds 10] [--database-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import benchkit as kit
import httpx
from sqlalchemy import select

from conveyor.auth import ALL_SCOPES, create_api_key
from conveyor.database import Database
from conveyor.lifecycle import TERMINAL_STATES
from conveyor.models import Job
from conveyor.settings import DEFAULT_PRIORITY_WEIGHTS, DEFAULT_WORKER_CONCURRENCY, Settings
from conveyor.topics import HIGHEST_PRIORITY, PRIORITIES

JOB_TYPE = "demo.sleep"
DEFAULT_BACKLOG = 400
DEFAULT_JOB_SECONDS = 0.1
DEFAULT_TENANTS = 8
DEFAULT_CONCURRENCY = 32
DEFAULT_ARRIVAL_RATE = 4.0
DEFAULT_ARRIVAL_SECONDS = 10.0
DEFAULT_WAIT_TIMEOUT_S = 600.0
# How often the benchmark reads the database while it waits; only how soon it notices, not the figures.
POLL_INTERVAL_S = 0.5
PROGRESS_EVERY_S = 5.0
TENANT_PREFIX = "bench"
ARRIVALS = "arrival"
BACKLOG = "backlog"


# --- load -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str


async def create_tenants(db: Database, count: int) -> list[Tenant]:
    """`count` tenants, each with an API key of its own, stored as `conveyor keys create` stores them."""
    tenants = []
    async with db.session() as session:
        for n in range(count):
            name = f"{TENANT_PREFIX}-{n}"
            key = await create_api_key(session, name, ALL_SCOPES, "priority benchmark")
            tenants.append(Tenant(name, key.secret))
    return tenants


def job_body(priority: int, seconds: float, label: str) -> dict[str, Any]:
    return {
        "type": JOB_TYPE,
        "payload": {"seconds": seconds, "steps": 1},
        "priority": priority,
        "labels": {"bench": label},
    }


async def submit(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], outcomes: Counter[str]
) -> None:
    try:
        response = await client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {tenant.key}"})
    except httpx.HTTPError as exc:
        outcomes[type(exc).__name__] += 1
        return
    outcomes[str(response.status_code)] += 1


async def submit_backlog(
    client: httpx.AsyncClient, tenants: Sequence[Tenant], per_level: int, seconds: float, concurrency: int
) -> tuple[Counter[str], float]:
    """`per_level` jobs at every level, the levels and tenants taking turns; (outcomes, wall seconds)."""
    outcomes: Counter[str] = Counter()
    numbers = iter(range(per_level * len(PRIORITIES)))

    async def loop() -> None:
        for n in numbers:  # shared iterator: each number goes to exactly one loop
            priority = PRIORITIES[n % len(PRIORITIES)]
            tenant = tenants[(n // len(PRIORITIES)) % len(tenants)]
            await submit(client, tenant, job_body(priority, seconds, BACKLOG), outcomes)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


async def submit_arrivals(
    client: httpx.AsyncClient, tenants: Sequence[Tenant], rate: float, duration_s: float, seconds: float
) -> Counter[str]:
    """Top-priority jobs at `rate` per second for `duration_s`, on schedule whatever the answers take
    (an open loop: a slow gateway does not slow the arrivals down)."""
    outcomes: Counter[str] = Counter()
    sent: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        body = job_body(HIGHEST_PRIORITY, seconds, ARRIVALS)
        sent.append(asyncio.create_task(submit(client, tenants[n % len(tenants)], body, outcomes)))
    await asyncio.gather(*sent)
    return outcomes


# --- reading the jobs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobTimes:
    priority: int
    kind: str  # BACKLOG or ARRIVALS
    worker: str
    status: str
    created_at: datetime
    started_at: datetime | None


async def read_jobs(db: Database) -> list[JobTimes]:
    async with db.reading() as session:
        rows = (
            await session.execute(
                select(Job.priority, Job.labels, Job.worker_id, Job.status, Job.created_at, Job.started_at)
            )
        ).all()
    return [
        JobTimes(priority, (labels or {}).get("bench", ""), worker or "", status, created, started)
        for priority, labels, worker, status, created, started in rows
    ]


async def wait_until(
    db: Database, done: Callable[[Sequence[JobTimes]], bool], what: str, timeout_s: float
) -> list[JobTimes] | None:
    """Read the jobs every POLL_INTERVAL_S until `done(jobs)`; None if `timeout_s` passes first."""
    started = time.perf_counter()
    next_report = started + PROGRESS_EVERY_S
    while True:
        jobs = await read_jobs(db)
        if done(jobs):
            return jobs
        now = time.perf_counter()
        if now - started > timeout_s:
            kit.console.print(f"[red]Deadline of {timeout_s:.0f} s hit waiting for {what}.[/red]")
            return None
        if now >= next_report:
            finished = sum(1 for job in jobs if job.status in TERMINAL_STATES)
            kit.console.print(f"  waiting for {what}: {finished:,}/{len(jobs):,} jobs finished", style="dim")
            next_report = now + PROGRESS_EVERY_S
        await asyncio.sleep(POLL_INTERVAL_S)


def backlog_started(jobs: Sequence[JobTimes], priority: int) -> bool:
    return all(job.started_at is not None for job in jobs if job.kind == BACKLOG and job.priority == priority)


def all_finished(jobs: Sequence[JobTimes]) -> bool:
    return all(job.status in TERMINAL_STATES for job in jobs)


# --- figures ----------------------------------------------------------------------------------------


@dataclass
class Figures(kit.StackFigures):
    # How the backlog went in: jobs, outcomes, wall time.
    backlog_submit: dict[str, Any] = field(default_factory=dict)
    # Each level's share of the starts while every level had work, against its weight.
    shares: dict[str, Any] = field(default_factory=dict)
    # How long each level's backlog jobs waited to start.
    backlog_waits: dict[str, Any] = field(default_factory=dict)
    # The p1 jobs that kept arriving behind the backlog: their waits to start.
    arrivals: dict[str, Any] = field(default_factory=dict)


def backlog_jobs(jobs: Sequence[JobTimes], priority: int, worker: str | None = None) -> list[JobTimes]:
    """The backlog's jobs of one level that have started (on `worker`, if given)."""
    return [
        job
        for job in jobs
        if job.kind == BACKLOG
        and job.priority == priority
        and job.started_at is not None
        and (worker is None or job.worker == worker)
    ]


def started_at(job: JobTimes) -> datetime:
    assert job.started_at is not None
    return job.started_at


def share_figures(jobs: Sequence[JobTimes], weights: Sequence[int]) -> dict[str, Any]:
    """Starts per level while every level had jobs waiting, worker by worker: from a worker's first start
    until it started the last backlog job of some level. Each worker owns its own partitions, and the job
    ids' keys spread the backlog over them a little unevenly, so one worker may run out of p1 jobs before
    another;
    from then on it rightly gives the lower levels every slot, which is not what this table measures."""
    starts: Counter[int] = Counter()
    windows = []
    for worker in sorted({job.worker for job in jobs if job.started_at is not None}):
        mine = [job for job in jobs if job.worker == worker and job.started_at is not None]
        levels = [backlog_jobs(jobs, priority, worker) for priority in PRIORITIES]
        if not all(levels):
            continue  # this worker never had every level: its partitions held none of some level's jobs
        first = min(map(started_at, mine))
        until = min(max(map(started_at, level)) for level in levels)
        windows.append((until - first).total_seconds())
        starts.update(job.priority for job in mine if started_at(job) <= until)
    total = sum(starts.values())
    weight_total = sum(weights)
    return {
        "workers": len(windows),
        "window_s": [round(window, 2) for window in windows],
        "levels": {
            f"p{priority}": {
                "started": starts[priority],
                "share": round(starts[priority] / total, 4) if total else None,
                "weight": weight,
                "weight_share": round(weight / weight_total, 4),
            }
            for priority, weight in zip(PRIORITIES, weights, strict=True)
        },
    }


def backlog_wait_figures(jobs: Sequence[JobTimes]) -> dict[str, Any]:
    """Per level: how long after the first job's start (the workers were up) the backlog's jobs started,
    which is their queue wait since nothing ran before."""
    first = min((started_at(job) for job in jobs if job.started_at is not None), default=None)
    figures = {}
    for priority in PRIORITIES:
        waits = [(started_at(job) - first).total_seconds() for job in backlog_jobs(jobs, priority) if first]
        figures[f"p{priority}"] = {
            "jobs": len(waits),
            "first": kit.rounded(min(waits, default=None)),
            **kit.quantiles(waits),
        }
    return figures


def arrival_figures(jobs: Sequence[JobTimes], saturated_until: datetime | None) -> dict[str, Any]:
    """Queue wait of the top-priority arrivals created while the backlog still saturated the workers."""
    arrivals = [job for job in jobs if job.kind == ARRIVALS and job.started_at is not None]
    during = [job for job in arrivals if saturated_until is None or job.created_at <= saturated_until]
    waits_ms = [(job.started_at - job.created_at).total_seconds() * 1000 for job in during if job.started_at]
    return {
        "arrivals": len(arrivals),
        "during_saturation": len(during),
        "queue_wait_ms": kit.quantiles(waits_ms),
    }


def saturation_end(jobs: Sequence[JobTimes]) -> datetime | None:
    """When the last backlog job started: until then every worker slot had a backlog job to take."""
    starts = [job.started_at for job in jobs if job.kind == BACKLOG and job.started_at is not None]
    return max(starts) if starts else None


# --- output -----------------------------------------------------------------------------------------


def print_header(settings: dict[str, Any]) -> None:
    rows = [
        ("job type", JOB_TYPE, f"{settings['job_seconds']:g} s each"),
        (
            "backlog",
            kit.fmt(settings["backlog"]),
            f"jobs at each of the 5 levels, from {settings['tenants']} tenants",
        ),
        ("workers", str(settings["workers"]), f"{settings['worker_concurrency']} jobs each at once"),
        ("weights", settings["weights"], "p1..p5"),
        (
            "top-priority arrivals",
            f"{settings['arrival_rate']:g}/s",
            f"for {settings['arrival_seconds']:g} s",
        ),
        ("database", str(settings["database"]), ""),
        kit.machine_row(settings),
    ]
    kit.print_header_table("Priority benchmark", rows, settings)


def print_shares(fig: dict[str, Any]) -> None:
    rows = [
        (
            level,
            kit.fmt(values["started"]),
            f"{fmt_share(values['share'])} (weight {values['weight']}: {fmt_share(values['weight_share'])})",
        )
        for level, values in fig["levels"].items()
    ]
    windows = ", ".join(kit.fmt(window, 2) for window in fig["window_s"])
    rows.append(("windows", windows or "-", f"s, one per worker ({fig['workers']}) that had every level"))
    kit.console.print(kit.table("Starts per level while every level had a backlog", rows))


def fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def print_backlog_waits(fig: dict[str, Any]) -> None:
    rows = [
        (
            level,
            f"{kit.fmt(values['p50'])} / {kit.fmt(values['p99'])}",
            f"s p50 / p99; first {kit.fmt(values['first'])} s, last {kit.fmt(values['max'])} s",
        )
        for level, values in fig.items()
    ]
    kit.console.print(kit.table("Backlog queue wait per level (from the first start)", rows))


def print_arrivals(fig: dict[str, Any]) -> None:
    wait = fig["queue_wait_ms"]
    rows = [
        (
            "arrivals",
            kit.fmt(fig["during_saturation"]),
            f"of {fig['arrivals']} created while the backlog saturated the workers",
        ),
        *kit.quantile_rows("queue wait", wait, "ms", "created_at -> started_at", ("p50", "p99", "max")),
    ]
    kit.console.print(kit.table("Top-priority arrivals behind the p2-p5 backlog", rows))


# --- main -------------------------------------------------------------------------------------------


def database_url_of(args: argparse.Namespace, stack: kit.EmbeddedStack) -> str:
    return args.database_url or Settings(data_dir=stack.data_dir, database_url="").resolved_database_url


async def run_benchmark(
    args: argparse.Namespace, figures: Figures, url: str, key: str, stack: kit.EmbeddedStack | None
) -> None:
    assert stack is not None, "the benchmark starts its own stack"
    db = Database(database_url_of(args, stack))
    workers = kit.Workers(
        stack, args.workers, args.worker_concurrency, CONVEYOR_PRIORITY_WEIGHTS=args.weights
    )
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    try:
        tenants = await create_tenants(db, args.tenants)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=kit.REQUEST_TIMEOUT_S) as client:
            total = args.backlog * len(PRIORITIES)
            kit.console.print(
                f"Backlog: submitting {total:,} jobs ({args.backlog:,} per level), no worker running..."
            )
            outcomes, wall_s = await submit_backlog(
                client, tenants, args.backlog, args.job_seconds, args.concurrency
            )
            figures.backlog_submit = {"jobs": total, "outcomes": dict(outcomes), "wall_s": round(wall_s, 2)}
            kit.console.print(
                f"Backlog: {outcomes.get('202', 0):,} accepted in {wall_s:.1f} s ({dict(outcomes)})"
            )

            kit.console.print(f"Starting {args.workers} workers...")
            workers.start()
            top_done = await wait_until(
                db,
                lambda jobs: backlog_started(jobs, HIGHEST_PRIORITY),
                "the p1 backlog to start",
                args.wait_timeout,
            )
            if top_done is not None:
                kit.console.print(
                    f"The p1 backlog has started; {args.arrival_rate:g} new p1 jobs per second for "
                    f"{args.arrival_seconds:g} s behind the rest of the backlog..."
                )
                arrival_outcomes = await submit_arrivals(
                    client, tenants, args.arrival_rate, args.arrival_seconds, args.job_seconds
                )
                figures.arrivals["outcomes"] = dict(arrival_outcomes)
        jobs = await wait_until(
            db, all_finished, "every job to finish", args.wait_timeout
        ) or await read_jobs(db)
    finally:
        kit.console.print("Stopping the workers...", style="dim")
        workers.stop()
        await db.close()

    weights = Settings(priority_weights=args.weights).priority_weights
    figures.shares = share_figures(jobs, weights)
    print_shares(figures.shares)
    figures.backlog_waits = backlog_wait_figures(jobs)
    print_backlog_waits(figures.backlog_waits)
    figures.arrivals.update(arrival_figures(jobs, saturation_end(jobs)))
    print_arrivals(figures.arrivals)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = kit.new_parser(__doc__)
    kit.add_option(parser, "--backlog", DEFAULT_BACKLOG, "jobs at each level before the workers start")
    kit.add_option(parser, "--job-seconds", DEFAULT_JOB_SECONDS, "how long each job runs")
    kit.add_option(parser, "--tenants", DEFAULT_TENANTS, "tenants the jobs come from, in turn")
    kit.add_option(
        parser, "--concurrency", DEFAULT_CONCURRENCY, "requests in flight while submitting the backlog"
    )
    kit.add_option(parser, "--workers", kit.DEFAULT_WORKERS, "worker processes to start")
    kit.add_option(parser, "--worker-concurrency", DEFAULT_WORKER_CONCURRENCY, "jobs per worker at once")
    parser.add_argument(
        "--weights",
        default=",".join(map(str, DEFAULT_PRIORITY_WEIGHTS)),
        help="the workers' CONVEYOR_PRIORITY_WEIGHTS, p1..p5 (default %(default)s)",
    )
    kit.add_option(
        parser, "--arrival-rate", DEFAULT_ARRIVAL_RATE, "new p1 jobs per second behind the backlog"
    )
    kit.add_option(parser, "--arrival-seconds", DEFAULT_ARRIVAL_SECONDS, "how long they keep coming")
    kit.add_database_option(parser)
    kit.add_stack_options(parser, DEFAULT_WAIT_TIMEOUT_S, "seconds each wait for the jobs may take")
    parser.set_defaults(url=None, key=None)  # always a started stack: the workers start after the backlog
    args = parser.parse_args(argv)
    kit.check_at_least_one(
        parser, args, ("backlog", "tenants", "concurrency", "workers", "worker_concurrency")
    )
    try:
        Settings(priority_weights=args.weights)
    except ValueError as exc:
        parser.error(f"--weights: {exc}")
    if args.arrival_rate <= 0 or args.arrival_seconds < 0 or args.job_seconds < 0:
        parser.error("--arrival-rate must be positive; --arrival-seconds and --job-seconds not negative")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backlog": args.backlog,
        "job_seconds": args.job_seconds,
        "tenants": args.tenants,
        "workers": args.workers,
        "worker_concurrency": args.worker_concurrency,
        "weights": args.weights,
        "arrival_rate": args.arrival_rate,
        "arrival_seconds": args.arrival_seconds,
        "database": kit.database_kind(args.database_url),
        **kit.machine_settings(),
        "load_avg_start": os.getloadavg()[0],
    }


def new_figures(args: argparse.Namespace, url: str, stack: kit.EmbeddedStack | None) -> Figures:
    return Figures(settings_of(args))


def main(argv: Sequence[str] | None = None) -> int:
    """The workers start once the backlog is in place, hence a stack without them."""
    return kit.run_main(parse_args(argv), kit.stack_without_workers, new_figures, print_header, run_benchmark)


if __name__ == "__main__":
    sys.exit(main())
