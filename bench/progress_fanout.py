"""Progress fan-out benchmark: many WebSocket subscribers on one progress instance, watching jobs that report.

It prints figures and asserts nothing. Without ``--url`` it starts its own embedded stack
(``python -m conveyor run``) in a fresh temporary data folder on free ports and stops it at the end.

Method. ``--jobs`` ``demo.sleep`` jobs are submitted, each reporting progress for ``--job-seconds``:
job k makes ``job-seconds / interval + k`` reports, so the jobs' paces differ slightly and their
reports drift apart rather than all arriving at once (``--aligned``: every job every ``--interval``
seconds, all together, the worst case). ``--subscribers`` WebSocket subscribers are spread round-robin
over the jobs, all on the one progress service, from ``--clients`` client processes (asyncio, uvloop
when it is installed, and the lean WebSocket client of ``wsclient.py``: the clients share the cores
with the service they measure, so each message costs them about a microsecond of Python).

- The started stack runs with no workers at first, so the jobs stay queued while the subscribers
  connect: each gets its snapshot (``queued``) and waits. Once all are connected, the benchmark starts
  ``--workers`` worker processes itself (``python -m conveyor worker``, same data folder and broker)
  and every event of the jobs (running, each progress report, the terminal state) is measured.
  Against a running stack (``--url``) the jobs start at once, so they run ``--lead`` seconds longer
  and only the events recorded after every subscriber connected count for latency.
- Connect time: per subscriber, from opening the socket to receiving the snapshot; and the wall time
  until all N are connected.
- Memory per connection: the progress service's RSS (``VmRSS`` in ``/proc/<pid>/status``, summed over
  its processes) once all N are connected, minus its RSS just before, divided by N. Its processes are
  those under the started stack whose command line runs ``-m conveyor progress``, with all their
  descendants (a service running several processes on one port); for ``--url``, the local processes
  listening on the progress port (``/proc/net/tcp``) or ``--progress-pid``, with their descendants.
- Delivery latency, per delivered event: the client's receipt time (``time.time()`` when the message
  is read) minus the event's ``at`` (when the worker recorded it). Same machine, same clock.
- Delivered vs expected, per subscriber: it should get every ``seq`` after its snapshot's, up to the
  job's last ``seq`` (read from a fresh snapshot after the run). Gaps are reported, split by whether
  the event after the gap was marked ``coalesced_from`` (merged by the server while queued).
- ``--reconnect-storm``: ``--storm-at`` seconds into the delivery phase every client process drops all
  its open sockets at once (SO_LINGER 0, then a transport abort: a TCP RST, as when a server or a
  network path dies) and each subscriber resumes on a new socket with ``?after_seq=<the last seq it
  got>``. The accounting above spans both sockets of a subscriber; the replayed events are left out of
  the latency. See ``storm_figures`` for what "re-admitted" and "caught up" mean.
- ``--slow-clients N``: N subscribers read slowly on purpose (a 4 KiB receive buffer, reading paused
  ``--slow-pause`` seconds at a time, then on for 50 ms); coalesced events are counted for them and for
  the others apart.
- ``--events-csv PATH``: every distinct event's ``at`` and its first and last subscriber's receipt, to
  see when the slow ones happened (the ten slowest are printed anyway).

    python bench/progress_fanout.py [--subscribers 2000] [--jobs 20] [--clients 2] [--job-seconds 30]
                                    [--url URL --key KEY [--progress-url WS_URL] [--progress-pid PID]]
                                    [--reconnect-storm [--storm-at S] [--storm-concurrency N]]
                                    [--slow-clients N] [--events-csv PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import benchkit as kit
import httpx
from fanout_clients import Clients, raise_nofile_limit
from rich import box
from rich.table import Table
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conveyor.settings import DEFAULT_PROGRESS_TENANT_MAX_SOCKETS, DEFAULT_WORKER_CONCURRENCY

JOB_TYPE = "demo.sleep"
MAX_STEPS = 1000  # demo.sleep's limit
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp

# One progress process unless told otherwise: the figures are those of one process (issue 19), while the
# service's own default is one per usable CPU (`CONVEYOR_PROGRESS_PROCESSES=0`).
DEFAULT_PROGRESS_PROCESSES = 1
DEFAULT_SUBSCRIBERS = 2000
DEFAULT_JOBS = 20
DEFAULT_CLIENTS = 2
DEFAULT_JOB_SECONDS = 30.0
DEFAULT_INTERVAL_S = 0.5
DEFAULT_CONNECT_CONCURRENCY = 100
DEFAULT_LEAD_S = 60.0
DEFAULT_WAIT_TIMEOUT_S = 120.0
DEFAULT_SLOW_PAUSE_S = 8.0
WARMUP_CONNECTIONS = 10
# Seconds to let the progress service settle before reading its RSS (after the warm-up, after connecting).
RSS_SETTLE_S = 2.0
CONNECT_TIMEOUT_S = 30.0
SNAPSHOT_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
CLIENT_START_TIMEOUT_S = 60.0
CONNECT_PHASE_TIMEOUT_S = 600.0
# The connect phase's deadline grows with the subscribers, as if they connected at this rate at worst.
MIN_CONNECT_RATE = 50.0
# The started stack lets the bench's one tenant hold this many sockets per subscriber (the progress
# service's default, 5,000, is below --subscribers 10000): twice, because in a reconnect storm the
# server may still count a dropped socket when its resume arrives.
TENANT_SOCKETS_PER_SUBSCRIBER = 2
CLOSE_NORMAL = 1000
MS_PER_S = 1000
# Stack log lines worth reporting: structlog's console renderer writes `[warning  ]`, `[error    ]`...
LOG_PROBLEM = re.compile(r"\[(warning|error|critical)\s*\]|Traceback|Exception", re.IGNORECASE)
LOG_SAMPLES = 12
SLOWEST_EVENTS = 10  # listed with when they happened: where the latency tail comes from


# --- small helpers -----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float | None:
    stat = kit.proc_stat(pid)
    return None if stat is None else stat[1]


def proc_status_kib(pid: int, name: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM...), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def proc_parent(pid: int) -> int | None:
    stat = kit.proc_stat(pid)
    return None if stat is None else stat[0]


def is_progress_service(argv: Sequence[str]) -> bool:
    return any(argv[i : i + 3] == ["-m", "conveyor", "progress"] for i in range(len(argv)))


def find_progress_pids(root_pid: int) -> list[int]:
    """The progress service's processes under `root_pid`: each running `python -m conveyor progress`,
    and every descendant of one (the children of a service running several processes on one port, as
    multiprocessing spawns them, whatever their command line)."""
    parents = live_parents()
    under_root: set[int] = set()
    for pid in parents:
        ancestor: int | None = pid
        while ancestor is not None and ancestor > 1 and ancestor != root_pid:
            ancestor = parents.get(ancestor)
        if ancestor == root_pid:
            under_root.add(pid)
    marked = {pid for pid in under_root if is_progress_service(kit.proc_argv(pid))}
    return sorted(with_descendants(marked, parents))


def live_parents() -> dict[int, int]:
    """Every live process's parent pid, by pid."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := proc_parent(int(entry.name))) is not None:
            parents[int(entry.name)] = parent
    return parents


def with_descendants(pids: set[int], parents: dict[int, int]) -> set[int]:
    found = set(pids)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def listening_pids(port: int) -> list[int]:
    """The processes holding a listening TCP socket on `port` (from /proc/net/tcp*, then /proc/*/fd):
    several, when they share the port with SO_REUSEPORT or inherited one socket."""
    sockets = set()
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table_path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
    return sorted(found)


def open_files_limit(pid: int) -> int | None:
    """The soft `Max open files` of a process (/proc/<pid>/limits): it caps the sockets it can hold."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def summed_kib(pids: Sequence[int], name: str) -> int | None:
    """A /proc status field summed over processes; None if none of them is alive."""
    values = [value for pid in pids if (value := proc_status_kib(pid, name)) is not None]
    return sum(values) if values else None


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of seconds, in milliseconds."""
    return kit.quantiles(values, MS_PER_S)


# --- figures -----------------------------------------------------------------------------------------


@dataclass
class Figures(kit.StackFigures):
    connect: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    closes: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    storm: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)


def connect_figures(
    subs: Sequence[dict[str, Any]], stages: Sequence[dict[str, Any] | None], requested: int
) -> dict[str, Any]:
    times = [sub["connect_s"] for sub in subs if sub["snapshot_seq"] is not None]
    errors = Counter(sub["error"] or "?" for sub in subs if sub["snapshot_seq"] is None)
    statuses = Counter(str(sub["snapshot_status"]) for sub in subs if sub["snapshot_seq"] is not None)
    known = [stage for stage in stages if stage is not None]
    wall = max(s["connected_at"] for s in known) - min(s["go_at"] for s in known) if known else None
    return {
        "requested": requested,
        "connected": len(times),
        "errors": dict(errors),
        "wall_s": kit.rounded(wall, 3),
        "rate_per_s": round(len(times) / wall, 1) if wall else None,
        "per_connection_ms": ms(times),
        "deflate_negotiated": sum(bool(sub["deflate"]) for sub in subs),
        "snapshot_statuses": dict(statuses),
    }


def delivery_figures(
    subs: Sequence[dict[str, Any]],
    final_seq: dict[str, int],
    window_start: float,
    window_end: float,
    events_csv: Path | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    progress_latencies: list[float] = []
    state_latencies: list[float] = []
    slow_latencies: list[float] = []  # of the subscribers slow on purpose: apart, they would be the tail
    before_window = 0
    first_at, last_received = math.inf, -math.inf
    # Per event (job, seq): its `at`, and the first and last receipt among its subscribers.
    per_event: dict[tuple[str, int], list[float]] = {}
    expected = delivered = duplicates = out_of_order = stale = replayed = 0
    gap_coalesced = gap_other = tail_missing = 0
    coalesced_events = {"normal": 0, "slow": 0}
    for sub in subs:
        if sub["snapshot_seq"] is None:
            continue
        job_id = sub["job_id"]
        last = sub["snapshot_seq"]
        final = max(final_seq.get(job_id, 0), max((e[0] for e in sub["events"]), default=0))
        expected += max(0, final - sub["snapshot_seq"])
        seen: set[int] = set()
        # A resumed socket first replays what the server had at the resume: late by design, not measured.
        replay_from = sub.get("drop_index")
        replay_upto = sub.get("resume_last_seq") or 0
        for n, (seq, at, received, is_state, coalesced) in enumerate(sub["events"]):
            if coalesced is not None:
                coalesced_events["slow" if sub.get("slow") else "normal"] += 1
            if seq <= sub["snapshot_seq"]:
                stale += 1
                continue
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if seq < last:
                out_of_order += 1
            elif seq > last + 1:
                if coalesced is not None:
                    gap_coalesced += seq - last - 1
                else:
                    gap_other += seq - last - 1
            last = max(last, seq)
            if replay_from is not None and n >= replay_from and seq <= replay_upto:
                replayed += 1
            elif sub.get("slow"):
                slow_latencies.append(received - at)
            elif at >= window_start:
                latencies.append(received - at)
                (state_latencies if is_state else progress_latencies).append(received - at)
                first_at = min(first_at, at)
                last_received = max(last_received, received)
                slot = per_event.setdefault((job_id, seq), [at, received, received, is_state])
                slot[1] = min(slot[1], received)
                slot[2] = max(slot[2], received)
            else:
                before_window += 1
        delivered += len(seen)
        tail_missing += max(0, final - last)
    first = [first_at - at for at, first_at, _, _ in per_event.values()]
    spread = [last_at - first_at for _, first_at, last_at, _ in per_event.values()]
    if events_csv is not None:
        write_events_csv(events_csv, per_event, window_start)
    # Where the tail comes from: the events whose last subscriber got them latest, and when.
    slowest = sorted(per_event.values(), key=lambda slot: slot[2] - slot[0], reverse=True)[:SLOWEST_EVENTS]
    span = last_received - first_at if latencies else 0.0
    return {
        "expected": expected,
        "delivered": delivered,
        "missing": expected - delivered,
        "missing_in_gaps_coalesced": gap_coalesced,
        "missing_in_gaps_other": gap_other,
        "missing_at_end": tail_missing,
        "coalesced_events": coalesced_events["normal"] + coalesced_events["slow"],
        "coalesced_events_normal": coalesced_events["normal"],
        "coalesced_events_slow": coalesced_events["slow"],
        "slow_subscribers": sum(bool(sub.get("slow")) for sub in subs),
        "replayed_after_resume": replayed,
        "slow_latency_ms": ms(slow_latencies),
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "not_newer_than_snapshot": stale,
        "measured_deliveries": len(latencies),
        "before_window": before_window,
        "distinct_events": len(per_event),
        "window_s": round(window_end - window_start, 2),
        "span_s": round(span, 2),
        "deliveries_per_s": round(len(latencies) / span, 1) if span > 0 else None,
        "latency_ms": ms(latencies),
        "progress_latency_ms": ms(progress_latencies),
        "state_latency_ms": ms(state_latencies),
        "state_deliveries": len(state_latencies),
        "first_receipt_ms": ms(first),
        "fanout_spread_ms": ms(spread),
        "slowest_events": [
            {
                "at_s": round(at - window_start, 3),
                "state": bool(is_state),
                "first_ms": round((first_at - at) * 1000, 1),
                "last_ms": round((last_at - at) * 1000, 1),
            }
            for at, first_at, last_at, is_state in slowest
        ],
    }


def write_events_csv(path: Path, per_event: dict[tuple[str, int], list[Any]], window_start: float) -> None:
    """One line per distinct event, in the order of their `at`: when it happened and when its first
    and last subscriber got it (seconds into the delivery window)."""
    lines = ["job,seq,kind,at_s,first_s,last_s"]
    for (job_id, seq), (at, first_at, last_at, is_state) in sorted(per_event.items(), key=lambda i: i[1][0]):
        kind = "state" if is_state else "progress"
        times = (f"{moment - window_start:.4f}" for moment in (at, first_at, last_at))
        lines.append(f"{job_id},{seq},{kind},{','.join(times)}")
    path.write_text("\n".join(lines) + "\n")


def seq_timelines(subs: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[int]]]:
    """Per job, its events' `at` in order and the job's highest seq at each: from every subscriber's
    events (one event has the same `at` for all), so that `seq_at` can tell the job's seq at a moment."""
    at_of: dict[str, dict[int, float]] = {}
    for sub in subs:
        seqs = at_of.setdefault(sub["job_id"], {})
        for seq, at, *_ in sub["events"]:
            seqs[seq] = at
    timelines = {}
    for job_id, seqs in at_of.items():
        ats, highest, top = [], [], 0
        for at, seq in sorted((at, seq) for seq, at in seqs.items()):
            top = max(top, seq)
            ats.append(at)
            highest.append(top)
        timelines[job_id] = (ats, highest)
    return timelines


def seq_at(timeline: tuple[list[float], list[int]] | None, moment: float) -> int:
    """The job's highest seq recorded (`at`) at or before `moment`; 0 if none."""
    if timeline is None:
        return 0
    ats, highest = timeline
    n = bisect.bisect_right(ats, moment)
    return highest[n - 1] if n else 0


def storm_figures(subs: Sequence[dict[str, Any]], storms: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The reconnect storm, over the subscribers whose socket was dropped.

    Re-admitted: the new socket's first message (`resumed`) was received. Caught up: the subscriber has
    every event its job had recorded (`at`) before the drop; the time is that of the receipt of the first
    event at or past that seq on the new socket, or of `resumed` when it had them all before the drop.
    Repeats and gaps across the drop: events on the new socket at or below the last seq it had, and seqs
    skipped between that seq and the first event on the new socket. The times leave out the subscribers
    slow on purpose (they catch up late by design); their repeats and gaps count."""
    timelines = seq_timelines(subs)
    admitted: list[float] = []
    caught_up: list[float] = []
    errors: Counter[str] = Counter()
    dropped = pruned = retried = never_caught_up = repeats = gaps = replayed = slow = 0
    for sub in subs:
        drop_at, index = sub.get("drop_at"), sub.get("drop_index")
        if drop_at is None or index is None:
            continue
        dropped += 1
        retried += sub["resume_attempts"] > 1
        pruned += bool(sub["pruned"])
        admitted_at = sub["resumed_at"] if sub["resumed_at"] is not None else None
        if admitted_at is None and sub["resume_s"] is not None:
            admitted_at = drop_at + sub["resume_s"]
        if admitted_at is None:
            errors[sub["resume_error"] or "?"] += 1
            continue
        had = sub["seq_at_drop"]
        after = sub["events"][index:]
        repeats += sum(seq <= had for seq, *_ in after)
        if after and after[0][0] > had + 1 and after[0][4] is None:
            gaps += after[0][0] - had - 1
        upto = sub["resume_last_seq"] or 0
        replayed += sum(seq <= upto for seq, *_ in after)
        if sub.get("slow"):  # late by design: kept out of the times
            slow += 1
            continue
        admitted.append(admitted_at - drop_at)
        target = max(had, seq_at(timelines.get(sub["job_id"]), drop_at))
        if had >= target:
            caught_up.append(admitted_at - drop_at)
            continue
        reached = next((received for seq, _, received, *_ in after if seq >= target), None)
        if reached is None:
            never_caught_up += 1
        else:
            caught_up.append(reached - drop_at)
    drops = [storm["drop_at"] for storm in storms if storm]
    all_admitted = max(admitted) if admitted else None
    return {
        "dropped": dropped,
        "drop": "abrupt: SO_LINGER 0 then transport abort (a TCP RST, no closing handshake)",
        "drop_spread_ms": kit.rounded((max(drops) - min(drops)) * MS_PER_S) if drops else None,
        "abort_ms": kit.rounded(max((storm["abort_s"] for storm in storms if storm), default=0.0) * MS_PER_S),
        "readmitted": len(admitted) + slow,
        "slow_left_out": slow,
        "not_readmitted": dict(errors),
        "retried": retried,
        "history_pruned": pruned,
        "all_readmitted_s": kit.rounded(all_admitted, 3),
        "reconnect_rate_per_s": round((len(admitted) + slow) / all_admitted, 1) if all_admitted else None,
        "readmit_ms": ms(admitted),
        "caught_up": len(caught_up),
        "never_caught_up": never_caught_up,
        "all_caught_up_s": kit.rounded(max(caught_up), 3) if caught_up else None,
        "caught_up_ms": ms(caught_up),
        "replayed": replayed,
        "repeats_across_drop": repeats,
        "gaps_across_drop": gaps,
    }


def close_figures(subs: Sequence[dict[str, Any]], lost: int) -> dict[str, Any]:
    """How each subscription ended; `lost`: subscribers of client processes that died (no results)."""
    outcomes: Counter[str] = Counter()
    if lost:
        outcomes["lost with their client process"] = lost
    reasons: Counter[str] = Counter()
    other: Counter[str] = Counter()
    read_errors: Counter[str] = Counter()
    for sub in subs:
        other.update(sub["other"])
        if sub["snapshot_seq"] is None:
            outcomes["never connected"] += 1
            continue
        if sub["error"] is not None:
            read_errors[sub["error"]] += 1
        if sub["open_at_stop"]:
            outcomes["still open at the deadline"] += 1
        elif sub.get("drop_at") is not None and sub["resume_s"] is None:
            outcomes["dropped by the storm, never resumed"] += 1
        elif sub["terminal"] and sub["close_code"] == CLOSE_NORMAL:
            outcomes["terminal event, then 1000"] += 1
        elif sub["terminal"]:
            outcomes[f"terminal event, then {sub['close_code']}"] += 1
        else:
            outcomes[f"closed {sub['close_code']} before the terminal event"] += 1
            reasons[f"{sub['close_code']} {sub['close_reason']}".strip()] += 1
    return {
        "outcomes": dict(outcomes),
        "early_close_reasons": dict(reasons),
        "read_errors": dict(read_errors),
        "other_messages": dict(other),
    }


def memory_figures(
    pids: Sequence[int],
    how: str,
    before_kib: int | None,
    after_kib: int | None,
    closed_kib: int | None,
    peak_kib: int | None,
    connected: int,
    pids_after: Sequence[int],
) -> dict[str, Any]:
    """RSS figures summed over the progress service's processes (`pids`, found before connecting)."""
    delta = after_kib - before_kib if after_kib is not None and before_kib is not None else None
    limits = [limit for pid in pids if (limit := open_files_limit(pid)) is not None]
    return {
        "pids": list(pids),
        "processes": len(pids),
        "found_by": how,
        "open_files_limit": min(limits) if limits else None,
        "rss_before_kib": before_kib,
        "rss_connected_kib": after_kib,
        "rss_delta_kib": delta,
        "per_connection_kib": round(delta / connected, 1) if delta is not None and connected else None,
        "rss_after_close_kib": closed_kib,
        "peak_rss_kib": peak_kib,
        "restarted": bool(pids) and not set(pids) <= set(pids_after),
        "processes_after": len(pids_after),
    }


def cpu_snapshot(
    stack_pid: int | None, progress_pids: Sequence[int], workers: Sequence[int], clients: Sequence[int]
) -> dict[str, float]:
    """CPU seconds so far per component: the started stack's (its progress service with all of its
    processes), or for --url the progress service's processes, and the benchmark's own processes."""
    totals = kit.stack_cpu(stack_pid) if stack_pid else {}
    totals.pop("run", None)  # the supervisor idles
    if not stack_pid and progress_pids:
        totals["progress"] = sum(cpu for pid in progress_pids if (cpu := proc_cpu_s(pid)) is not None)
    for name, pids in (("workers (with start-up)", workers), ("bench clients", clients)):
        used = [proc_cpu_s(pid) for pid in pids]
        if pids:
            totals[name] = totals.get(name, 0.0) + sum(value for value in used if value is not None)
    return totals


def cpu_phase(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    return {
        "wall_s": round(wall_s, 2),
        "cpu_s": {name: round(after[name] - before.get(name, 0.0), 2) for name in sorted(after)},
    }


def scan_log(path: Path, offset: int) -> dict[str, Any]:
    """Warnings, errors and tracebacks the stack logged from `offset` on."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return {}
    problems = [line for line in text.splitlines() if LOG_PROBLEM.search(line)]
    return {"lines": len(problems), "samples": problems[:LOG_SAMPLES]}


# --- output ------------------------------------------------------------------------------------------


def kib(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def print_header(s: dict[str, Any]) -> None:
    rows = [
        ("gateway", str(s["gateway"]), str(s["origin"])),
        ("progress", str(s["progress"]), "one service (its processes: see Memory)"),
        ("subscribers", kit.fmt(s["subscribers"]), f"{s['subscribers_per_job']} per job"),
        ("jobs", kit.fmt(s["jobs"]), f"{JOB_TYPE}: {s['job_seconds']:g} s, {s['steps_note']}"),
        (
            "client processes",
            str(s["clients"]),
            f"{s['client_loop']}, lean WebSocket client, deflate {'offered' if s['deflate'] else 'off'}",
        ),
        ("connect concurrency", str(s["connect_concurrency"]), "handshakes in flight"),
        *(
            [
                (
                    "reconnect storm",
                    f"{s['reconnect_storm']:g} s",
                    f"into the delivery, every socket dropped; {s['storm_concurrency']} resumes in flight",
                )
            ]
            if s["reconnect_storm"] is not None
            else []
        ),
        *(
            [("slow subscribers", kit.fmt(s["slow_clients"]), "read slowly on purpose")]
            if s["slow_clients"]
            else []
        ),
        *(
            [
                (
                    "tenant socket limit",
                    kit.fmt(s["tenant_max_sockets"]),
                    "CONVEYOR_PROGRESS_TENANT_MAX_SOCKETS",
                )
            ]
            if s["tenant_max_sockets"]
            else []
        ),
        ("workers", str(s["workers"]), str(s["workers_note"])),
        ("database", str(s["database"]), ""),
        kit.machine_row(s, f", open files {s['nofile']}"),
    ]
    kit.print_header_table("Progress fan-out benchmark", rows, s)


def print_connect(fig: dict[str, Any]) -> None:
    per = fig["per_connection_ms"]
    rows = [
        ("connected", kit.fmt(fig["connected"]), f"of {fig['requested']:,}"),
        ("wall time", kit.fmt(fig["wall_s"], 2), "s until all had their snapshot"),
        ("connect rate", kit.fmt(fig["rate_per_s"]), "connections/s"),
        *kit.quantile_rows("per connection", per, "ms", "open -> snapshot received"),
        ("permessage-deflate", kit.fmt(fig["deflate_negotiated"]), "connections negotiated it"),
    ]
    for status, n in sorted(fig["snapshot_statuses"].items()):
        rows.append(("snapshot said", kit.fmt(n), status))
    for kind, n in sorted(fig["errors"].items()):
        rows.append(("connect error", kit.fmt(n), kind))
    kit.console.print(kit.table("Connect", rows))


def print_memory(fig: dict[str, Any]) -> None:
    if not fig.get("pids"):
        kit.console.print(
            f"[yellow]Memory: progress service process not found ({fig.get('found_by')}).[/yellow]"
        )
        return
    pids = fig["pids"]
    shown = ", ".join(str(pid) for pid in pids[:4]) + (", ..." if len(pids) > 4 else "")
    summed = " summed over its processes" if len(pids) > 1 else ""
    rows = [
        ("progress processes", str(fig["processes"]), f"pid {shown}; {fig['found_by']}"),
        ("open files limit", kit.fmt(fig["open_files_limit"]), "soft RLIMIT_NOFILE of the progress service"),
        ("RSS before", kib(fig["rss_before_kib"]), f"MiB (after a warm-up){summed}"),
        ("RSS all connected", kib(fig["rss_connected_kib"]), "MiB"),
        ("per connection", kit.fmt(fig["per_connection_kib"]), "KiB ((connected - before) / connected)"),
        ("RSS after all closed", kib(fig["rss_after_close_kib"]), "MiB"),
        ("peak RSS", kib(fig["peak_rss_kib"]), f"MiB (VmHWM, since the process started){summed}"),
    ]
    if fig["restarted"]:
        rows.append(("[red]restarted[/red]", "yes", "a process exited or restarted during the run"))
    kit.console.print(kit.table("Memory of the progress service", rows))


def print_delivery(fig: dict[str, Any]) -> None:
    lat, first, spread = fig["latency_ms"], fig["first_receipt_ms"], fig["fanout_spread_ms"]
    rows = [
        (
            "delivered",
            kit.fmt(fig["delivered"]),
            f"of {fig['expected']:,} expected events (every seq after the snapshot)",
        ),
        ("missing", kit.fmt(fig["missing"]), ""),
        (
            "  in gaps, coalesced",
            kit.fmt(fig["missing_in_gaps_coalesced"]),
            "(next event had coalesced_from)",
        ),
        ("  in gaps, unexplained", kit.fmt(fig["missing_in_gaps_other"]), ""),
        ("  at the end", kit.fmt(fig["missing_at_end"]), "(never got there: closed early or deadline)"),
        ("coalesced events", kit.fmt(fig["coalesced_events"]), "carried coalesced_from"),
        *(
            [
                ("  to normal subscribers", kit.fmt(fig["coalesced_events_normal"]), ""),
                (
                    "  to slow subscribers",
                    kit.fmt(fig["coalesced_events_slow"]),
                    f"({fig['slow_subscribers']:,} made slow on purpose: --slow-clients)",
                ),
                (
                    "  slow subscribers' latency p50 / p99",
                    f"{kit.fmt(fig['slow_latency_ms']['p50'])} / {kit.fmt(fig['slow_latency_ms']['p99'])}",
                    "ms (left out of the latency figures below)",
                ),
            ]
            if fig["slow_subscribers"]
            else []
        ),
        ("duplicates / out of order", f"{fig['duplicates']} / {fig['out_of_order']}", ""),
        (
            "measured deliveries",
            kit.fmt(fig["measured_deliveries"]),
            f"{fig['distinct_events']:,} distinct events",
        ),
        (
            "delivery rate",
            kit.fmt(fig["deliveries_per_s"]),
            f"deliveries/s over {fig['span_s']:.1f} s (first `at` -> last receipt)",
        ),
        *kit.quantile_rows("latency", lat, "ms", "worker's `at` -> client receipt"),
        (
            "  progress events p50 / p99",
            f"{kit.fmt(fig['progress_latency_ms']['p50'])} / {kit.fmt(fig['progress_latency_ms']['p99'])}",
            "ms",
        ),
        (
            "  state events p50 / p99",
            f"{kit.fmt(fig['state_latency_ms']['p50'])} / {kit.fmt(fig['state_latency_ms']['p99'])}",
            f"ms ({fig['state_deliveries']:,} deliveries: running, succeeded...)",
        ),
        (
            "first receipt p50 / p99",
            f"{kit.fmt(first['p50'])} / {kit.fmt(first['p99'])}",
            "ms (the first subscriber of each event)",
        ),
        (
            "fan-out spread p50 / p99",
            f"{kit.fmt(spread['p50'])} / {kit.fmt(spread['p99'])}",
            "ms (first to last subscriber of an event)",
        ),
    ]
    if fig["before_window"]:
        rows.append(
            (
                "before the window",
                kit.fmt(fig["before_window"]),
                "deliveries not measured (recorded while connecting)",
            )
        )
    if fig["not_newer_than_snapshot"]:
        rows.append(("not newer than snapshot", kit.fmt(fig["not_newer_than_snapshot"]), "events"))
    if fig["replayed_after_resume"]:
        rows.append(
            (
                "replayed after a resume",
                kit.fmt(fig["replayed_after_resume"]),
                "deliveries not measured for latency (see Reconnect storm)",
            )
        )
    kit.console.print(kit.table("Delivery", rows))
    slowest = [
        (
            f"{event['at_s']:.2f}",
            "state" if event["state"] else "progress",
            f"{kit.fmt(event['first_ms'])} / {kit.fmt(event['last_ms'])}",
        )
        for event in fig["slowest_events"]
    ]
    kit.console.print(
        kit.table("Slowest events (s into the window; kind; first / last subscriber's latency, ms)", slowest)
    )


def print_storm(fig: dict[str, Any]) -> None:
    rows = [
        ("dropped", kit.fmt(fig["dropped"]), f"sockets, {fig['drop']}"),
        (
            "drop spread",
            kit.fmt(fig["drop_spread_ms"]),
            f"ms between the client processes' drops; aborting took {kit.fmt(fig['abort_ms'])} ms",
        ),
        ("re-admitted", kit.fmt(fig["readmitted"]), "got `resumed` on a new socket with ?after_seq="),
        ("all re-admitted", kit.fmt(fig["all_readmitted_s"], 2), "s after the drop"),
        ("reconnect rate", kit.fmt(fig["reconnect_rate_per_s"]), "resumes/s"),
        *kit.quantile_rows("re-admitted", fig["readmit_ms"], "ms", "drop -> `resumed` received"),
        ("caught up", kit.fmt(fig["caught_up"]), "had every event recorded before the drop"),
        ("all caught up", kit.fmt(fig["all_caught_up_s"], 2), "s after the drop"),
        *kit.quantile_rows("caught up", fig["caught_up_ms"], "ms", "drop -> last missed event received"),
        ("replayed", kit.fmt(fig["replayed"]), "events sent after `resumed` from the history"),
        (
            "repeats / gaps across the drop",
            f"{fig['repeats_across_drop']} / {fig['gaps_across_drop']}",
            "events",
        ),
        ("resumes retried", kit.fmt(fig["retried"]), "needed more than one attempt"),
    ]
    if fig["slow_left_out"]:
        rows.append(("slow subscribers", kit.fmt(fig["slow_left_out"]), "re-admitted, left out of the times"))
    if fig["never_caught_up"]:
        rows.append(("[red]never caught up[/red]", kit.fmt(fig["never_caught_up"]), "subscribers"))
    if fig["history_pruned"]:
        rows.append(("[red]history pruned[/red]", kit.fmt(fig["history_pruned"]), "got a snapshot instead"))
    for kind, n in sorted(fig["not_readmitted"].items()):
        rows.append(("[red]not re-admitted[/red]", kit.fmt(n), kind))
    kit.console.print(kit.table("Reconnect storm", rows))


def print_closes(fig: dict[str, Any]) -> None:
    rows = [("subscriptions", kit.fmt(n), outcome) for outcome, n in sorted(fig["outcomes"].items())]
    rows += [("early close", kit.fmt(n), reason) for reason, n in sorted(fig["early_close_reasons"].items())]
    rows += [("read error", kit.fmt(n), kind) for kind, n in sorted(fig["read_errors"].items())]
    rows += [("other message", kit.fmt(n), kind) for kind, n in sorted(fig["other_messages"].items())]
    kit.console.print(kit.table("How the subscriptions ended", rows))


def print_jobs(fig: dict[str, Any]) -> None:
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(fig["statuses"].items()))
    rows = [
        ("jobs", kit.fmt(fig["count"]), statuses),
        ("attempts > 1", kit.fmt(fig["retried"]), ""),
        ("start spread", kit.fmt(fig["start_spread_s"], 2), "s (first to last started_at)"),
        ("run time p50", kit.fmt(fig["run_s_p50"], 2), "s (started_at -> finished_at)"),
    ]
    if (fig["start_spread_s"] or 0) > 1:
        rows.append(("[yellow]note[/yellow]", "", "the jobs did not all run at once (too few worker slots?)"))
    kit.console.print(kit.table("Jobs", rows))


def print_cpu(fig: dict[str, Any]) -> None:
    """One column per phase (connecting, delivery; with a storm, delivery before it and from it on)."""
    phases = list(fig.items())
    out = Table(title="CPU seconds (share of one core)", title_justify="left", box=box.SIMPLE, pad_edge=False)
    out.add_column("")
    for name, phase in phases:
        title = "connecting" if name == "connect" else "delivery window" if name == "delivery" else name
        out.add_column(f"{title} ({phase.get('wall_s', 0):.1f} s)", justify="right")
    for component in sorted({name for _, phase in phases for name in phase.get("cpu_s", {})}):
        cells = []
        for _, phase in phases:
            used = phase.get("cpu_s", {}).get(component)
            wall = phase.get("wall_s") or 0
            share = f" ({used / wall:.0%})" if used is not None and wall else ""
            cells.append("-" if used is None else f"{used:.2f}{share}")
        out.add_row(component, *cells)
    kit.console.print(out)


def print_logs(fig: dict[str, Any]) -> None:
    for name, found in fig.items():
        if not found:
            continue
        if not found["lines"]:
            kit.console.print(f"{name}: no warnings, errors or tracebacks during the run.")
            continue
        kit.console.print(
            f"[yellow]{name}: {found['lines']} warning/error lines in the run; the first:[/yellow]"
        )
        for line in found["samples"]:
            kit.console.print("  " + line[:300], markup=False)


# --- the run -----------------------------------------------------------------------------------------


async def submit_jobs(
    client: httpx.AsyncClient, count: int, seconds: float, steps: int, aligned: bool
) -> list[dict[str, Any]]:
    """Job k makes `steps + k` reports in `seconds` (just `steps` when aligned)."""
    bodies = [
        {"type": JOB_TYPE, "payload": {"seconds": seconds, "steps": steps + (0 if aligned else k)}}
        for k in range(count)
    ]
    responses = await asyncio.gather(*(client.post("/v1/jobs", json=body) for body in bodies))
    jobs = []
    for response in responses:
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {response.status_code}: {response.text[:300]}")
        jobs.append(response.json())
    return jobs


async def snapshot_seq(progress_url: str, key: str, job_id: str) -> int | None:
    """The job's `seq` now, from a fresh snapshot (the subscriber closes once it has it)."""
    try:
        async with connect(
            f"{progress_url}/v1/jobs/{job_id}/events",
            additional_headers={"Authorization": f"Bearer {key}"},
            proxy=None,
            open_timeout=CONNECT_TIMEOUT_S,
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_S,
        ) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), SNAPSHOT_TIMEOUT_S))
    except (OSError, TimeoutError, ConnectionClosed, InvalidStatus, ValueError):
        return None
    return int(first["seq"]) if first.get("type") == "snapshot" else None


async def wait_progress_ready(progress_url: str, timeout_s: float) -> None:
    """Poll the progress service's GET /readyz (the gateway's answering does not mean it does)."""
    base = progress_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as client:
        while True:
            try:
                response = await client.get("/readyz")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the progress service was not ready in {timeout_s:.0f} s (last: {last})")
            await asyncio.sleep(kit.READY_POLL_S)


def job_figures(bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    started = [ts(b["started_at"]) for b in bodies if b.get("started_at")]
    runs = [
        ts(b["finished_at"]) - ts(b["started_at"])
        for b in bodies
        if b.get("started_at") and b.get("finished_at")
    ]
    return {
        "count": len(bodies),
        "statuses": dict(Counter(b["status"] for b in bodies)),
        "retried": sum(b.get("attempts", 0) > 1 for b in bodies),
        "start_spread_s": kit.rounded(max(started) - min(started), 3) if started else None,
        "run_s_p50": kit.rounded(kit.percentile(runs, 50), 3),
    }


def client_plans(
    args: argparse.Namespace, job_ids: Sequence[str], progress_url: str, key: str
) -> list[dict[str, Any]]:
    """Subscribers round-robin over the jobs, then over the client processes. The slow ones
    (`--slow-clients N`) are the first N, so they too are spread over the jobs and the processes."""
    assignments = [job_ids[n % len(job_ids)] for n in range(args.subscribers)]
    slow = set(range(args.slow_clients))
    clients = client_count(args)
    per_client = max(1, math.ceil(args.connect_concurrency / clients))
    storm = args.storm_concurrency or args.connect_concurrency
    return [
        {
            "job_ids": assignments[n::clients],
            "slow": [k for k, index in enumerate(range(n, args.subscribers, clients)) if index in slow],
            "progress_url": progress_url,
            "key": key,
            "deflate": not args.no_deflate,
            "connect_concurrency": per_client,
            "storm_concurrency": max(1, math.ceil(storm / clients)),
            "slow_pause_s": args.slow_pause,
        }
        for n in range(clients)
    ]


def client_count(args: argparse.Namespace) -> int:
    clients: int = min(args.clients, args.subscribers)
    return clients


def connect_phase_timeout(subscribers: int) -> float:
    """How long connecting may take in all: generous, and longer for more subscribers (at 50/s at least)."""
    return max(CONNECT_PHASE_TIMEOUT_S, subscribers / MIN_CONNECT_RATE)


def storm_at(args: argparse.Namespace) -> float:
    """Seconds into the delivery phase at which the storm drops every socket (default: mid-run)."""
    if args.storm_at is not None:
        return float(args.storm_at)
    return float(args.job_seconds / 2)


async def run_benchmark(
    args: argparse.Namespace, figures: Figures, url: str, key: str, stack: kit.EmbeddedStack | None
) -> None:
    s = figures.settings
    progress_url = progress_url_of(args, stack)
    stack_pid = stack.process.pid if stack is not None and stack.process is not None else None
    lead = 0.0 if stack is not None else args.lead
    workers: kit.Workers | None = None
    clients: Clients | None = None
    log_offset = stack.log_path.stat().st_size if stack is not None and stack.log_path.exists() else 0
    cpu_storm: dict[str, float] | None = None
    wall_storm = 0.0
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=kit.REQUEST_TIMEOUT_S
    ) as http:
        try:
            kit.console.print(f"Submitting {args.jobs} {JOB_TYPE} jobs...")
            jobs = await submit_jobs(
                http, args.jobs, lead + args.job_seconds, s["steps"] + s["lead_steps"], args.aligned
            )
            job_ids = [job["id"] for job in jobs]
            if progress_url is None:
                progress_url = jobs[0]["links"]["events"].rsplit("/v1/jobs/", 1)[0]
                s["progress"] = progress_url
            await wait_progress_ready(progress_url, args.startup_timeout)
            progress_pids, pid_how = locate_progress(args, stack, progress_url)
            kit.console.print(
                f"Progress service: {progress_url}, {len(progress_pids)} processes; "
                f"warm-up: {WARMUP_CONNECTIONS} connections"
            )
            warm = [await snapshot_seq(progress_url, key, job_ids[0]) for _ in range(WARMUP_CONNECTIONS)]
            if None in warm:
                raise RuntimeError(f"{warm.count(None)} of {WARMUP_CONNECTIONS} warm-up connections failed")
            await asyncio.sleep(RSS_SETTLE_S)
            rss_before = summed_kib(progress_pids, "VmRSS")

            plans = client_plans(args, job_ids, progress_url, key)
            clients = Clients(plans)
            if None in await clients.gather("ready", CLIENT_START_TIMEOUT_S):
                raise RuntimeError("a client process did not start")
            kit.console.print(
                f"Connecting {args.subscribers:,} subscribers from {len(plans)} client processes..."
            )
            cpu_go = cpu_snapshot(stack_pid, progress_pids, [], clients.pids)
            wall_go = time.perf_counter()
            clients.broadcast("go")
            connect_timeout = connect_phase_timeout(args.subscribers)
            stages = await clients.gather("connected", connect_timeout)
            if None in stages:
                raise RuntimeError(f"a client process died, or took over {connect_timeout:.0f} s to connect")
            cpu_connected = cpu_snapshot(stack_pid, progress_pids, [], clients.pids)
            wall_connected = time.perf_counter()
            kit.console.print(
                f"Every subscriber connected or failed after {wall_connected - wall_go:.1f} s; "
                f"reading the progress service's RSS in {RSS_SETTLE_S:.0f} s"
            )
            await asyncio.sleep(RSS_SETTLE_S)
            rss_connected = summed_kib(progress_pids, "VmRSS")

            window_start = time.time()
            wall_window = time.perf_counter()
            cpu_window = cpu_snapshot(stack_pid, progress_pids, [], clients.pids)
            if stack is not None:
                workers = kit.Workers(stack, args.workers, max(DEFAULT_WORKER_CONCURRENCY, args.jobs))
                workers.start()
                kit.console.print(
                    f"Started {args.workers} workers; the jobs run now, for about {args.job_seconds:g} s..."
                )
            else:
                kit.console.print(f"Measuring; the jobs end in about {args.job_seconds:g} s...")
            deadline_s = lead + args.job_seconds + args.wait_timeout
            if args.reconnect_storm:
                await asyncio.sleep(storm_at(args))
                cpu_storm = cpu_snapshot(
                    stack_pid, progress_pids, workers.pids if workers else [], clients.pids
                )
                wall_storm = time.perf_counter()
                kit.console.print(
                    f"Reconnect storm: every client drops all its sockets now ({storm_at(args):g} s in)"
                )
                clients.broadcast("storm")
                # Resuming may outlast the jobs: as long as connecting everyone may take, on top.
                deadline_s += connect_phase_timeout(args.subscribers) - storm_at(args)
            results = await clients.gather("done", deadline_s)
            if None in results:
                kit.console.print(
                    f"[yellow]Deadline ({deadline_s:.0f} s) hit: stopping the subscribers still open[/yellow]"
                )
                clients.broadcast("stop")
                late = await clients.gather("done", CLIENT_START_TIMEOUT_S)
                results = [
                    mine if mine is not None else again for mine, again in zip(results, late, strict=True)
                ]
            window_end = max((r["done_at"] for r in results if r is not None), default=time.time())
            cpu_end = cpu_snapshot(stack_pid, progress_pids, workers.pids if workers else [], clients.pids)
            wall_end = time.perf_counter()
            await asyncio.sleep(RSS_SETTLE_S)
            rss_closed = summed_kib(progress_pids, "VmRSS")
            peak = summed_kib(progress_pids, "VmHWM")
            if stack_pid:
                pids_after = find_progress_pids(stack_pid)
            else:  # still alive, or gone
                pids_after = [pid for pid in progress_pids if proc_status_kib(pid, "VmRSS") is not None]

            subs = [sub for result in results if result is not None for sub in result["subscribers"]]
            storms = [result["storm"] for result in results if result is not None]
            final_seq = {
                job_id: seq
                for job_id in job_ids
                if (seq := await snapshot_seq(progress_url, key, job_id)) is not None
            }
            bodies = [(await http.get(f"/v1/jobs/{job_id}")).json() for job_id in job_ids]
        finally:
            if clients is not None:
                clients.stop()
            if workers is not None:
                kit.console.print("Stopping the workers...", style="dim")
                workers.stop()

    figures.connect = connect_figures(subs, stages, args.subscribers)
    print_connect(figures.connect)
    figures.memory = memory_figures(
        progress_pids,
        pid_how,
        rss_before,
        rss_connected,
        rss_closed,
        peak,
        figures.connect["connected"],
        pids_after,
    )
    print_memory(figures.memory)
    figures.delivery = delivery_figures(subs, final_seq, window_start, window_end, args.events_csv)
    print_delivery(figures.delivery)
    if args.reconnect_storm:
        figures.storm = storm_figures(subs, storms)
        print_storm(figures.storm)
    lost = sum(len(plan["job_ids"]) for plan, result in zip(plans, results, strict=True) if result is None)
    figures.closes = close_figures(subs, lost)
    print_closes(figures.closes)
    figures.jobs = job_figures(bodies)
    print_jobs(figures.jobs)
    figures.cpu = {"connect": cpu_phase(cpu_go, cpu_connected, wall_connected - wall_go)}
    if cpu_storm is not None:
        figures.cpu["delivery before the storm"] = cpu_phase(cpu_window, cpu_storm, wall_storm - wall_window)
        figures.cpu["storm to the end"] = cpu_phase(cpu_storm, cpu_end, wall_end - wall_storm)
    else:
        figures.cpu["delivery"] = cpu_phase(cpu_window, cpu_end, wall_end - wall_window)
    print_cpu(figures.cpu)
    if stack is not None:
        figures.logs = {"stack.log": scan_log(stack.log_path, log_offset)}
        if workers is not None:
            figures.logs["workers.log"] = scan_log(workers.log_path, 0)
        print_logs(figures.logs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = kit.new_parser(__doc__)
    kit.add_url_option(parser)
    parser.add_argument(
        "--progress-url", help="ws://host:port of the progress service (default: the jobs' links)"
    )
    kit.add_key_option(parser)
    parser.add_argument(
        "--progress-pid", type=int, help="pid of the progress service for --url (memory figures)"
    )
    kit.add_option(parser, "--subscribers", DEFAULT_SUBSCRIBERS, "WebSocket subscribers")
    kit.add_option(parser, "--jobs", DEFAULT_JOBS, "jobs they watch")
    kit.add_option(parser, "--clients", DEFAULT_CLIENTS, "client processes")
    kit.add_option(
        parser, "--job-seconds", DEFAULT_JOB_SECONDS, "how long each job runs and reports progress"
    )
    kit.add_option(
        parser, "--interval", DEFAULT_INTERVAL_S, "seconds between the progress reports of the slowest job"
    )
    kit.add_option(parser, "--workers", kit.DEFAULT_WORKERS, "worker processes to start")
    kit.add_option(
        parser,
        "--connect-concurrency",
        DEFAULT_CONNECT_CONCURRENCY,
        "handshakes in flight, over all client processes",
    )
    kit.add_option(
        parser,
        "--lead",
        DEFAULT_LEAD_S,
        "with --url: seconds the jobs run before the measured part, to cover connecting",
    )
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="every job reports at the same pace, so all their reports arrive together (the worst case)",
    )
    parser.add_argument("--no-deflate", action="store_true", help="do not offer permessage-deflate")
    parser.add_argument(
        "--reconnect-storm",
        action="store_true",
        help="drop every socket at once mid-run (a TCP RST) and resume each with ?after_seq=",
    )
    parser.add_argument(
        "--storm-at",
        type=float,
        help="with --reconnect-storm: seconds into the delivery phase (default: half of --job-seconds)",
    )
    kit.add_option(
        parser,
        "--storm-concurrency",
        0,
        "with --reconnect-storm: resumes in flight, over all client processes (0: --connect-concurrency)",
    )
    kit.add_option(parser, "--slow-clients", 0, "subscribers that read slowly on purpose")
    kit.add_option(parser, "--progress-processes", DEFAULT_PROGRESS_PROCESSES, "started progress processes")
    kit.add_option(
        parser, "--slow-pause", DEFAULT_SLOW_PAUSE_S, "seconds a slow subscriber stops reading, each time"
    )
    parser.add_argument(
        "--events-csv",
        type=Path,
        help="write each event's time and its first and last subscriber's receipt to this CSV file",
    )
    kit.add_database_option(parser)
    kit.add_stack_options(
        parser,
        DEFAULT_WAIT_TIMEOUT_S,
        "seconds to wait for the terminal events after the jobs' nominal end",
    )
    args = parser.parse_args(argv)
    kit.check_at_least_one(parser, args, ("subscribers", "jobs", "clients", "workers", "connect_concurrency"))
    if args.interval <= 0 or args.job_seconds < args.interval:
        parser.error("--interval must be positive and at most --job-seconds")
    kit.check_target(parser, args)
    if (args.progress_url or args.progress_pid) and not args.url:
        parser.error("--progress-url and --progress-pid go with --url")
    if (args.storm_at is not None or args.storm_concurrency) and not args.reconnect_storm:
        parser.error("--storm-at and --storm-concurrency go with --reconnect-storm")
    if args.storm_at is not None and not 0 <= args.storm_at < args.job_seconds + (
        args.lead if args.url else 0
    ):
        parser.error("--storm-at must fall within the jobs' run")
    if args.slow_pause <= 0:
        parser.error("--slow-pause must be positive")
    if args.storm_concurrency < 0 or not 0 <= args.slow_clients <= args.subscribers:
        parser.error("--storm-concurrency must be at least 0, --slow-clients between 0 and --subscribers")
    steps = round(args.job_seconds / args.interval) + (round(args.lead / args.interval) if args.url else 0)
    steps += 0 if args.aligned else args.jobs - 1
    if steps > MAX_STEPS:
        parser.error(f"{steps} progress reports per job; {JOB_TYPE} allows {MAX_STEPS}: raise --interval")
    return args


def steps_note(args: argparse.Namespace) -> str:
    steps = round((args.job_seconds + (args.lead if args.url else 0.0)) / args.interval)
    if args.aligned or args.jobs == 1:
        return f"{steps} steps each (every {args.interval:g} s; aligned: the jobs report together)"
    last = steps + args.jobs - 1
    fastest = args.interval * steps / last
    return f"{steps}-{last} steps (every {args.interval:g} to {fastest:.3g} s: they drift apart)"


def settings_of(args: argparse.Namespace, url: str, progress_url: str | None, nofile: int) -> dict[str, Any]:
    external = bool(args.url)
    try:
        import uvloop  # noqa: F401

        client_loop = "uvloop"
    except ImportError:
        client_loop = "asyncio"
    return {
        "gateway": url,
        "origin": "external" if external else "started by the benchmark",
        "progress": progress_url or "(from the jobs' links)",
        "subscribers": args.subscribers,
        "subscribers_per_job": f"{args.subscribers / args.jobs:g}",
        "jobs": args.jobs,
        "job_seconds": args.job_seconds + (args.lead if external else 0.0),
        "steps": round(args.job_seconds / args.interval),
        "lead_steps": round(args.lead / args.interval) if external else 0,
        "aligned": args.aligned,
        "steps_note": steps_note(args),
        "interval_s": args.interval,
        "lead_s": args.lead if external else 0.0,
        "clients": client_count(args),
        "client_loop": client_loop,
        "client_websocket": "wsclient.py (frames parsed by the bench, each distinct payload parsed once)",
        "reconnect_storm": storm_at(args) if args.reconnect_storm else None,
        "storm_concurrency": (args.storm_concurrency or args.connect_concurrency)
        if args.reconnect_storm
        else None,
        "slow_clients": args.slow_clients,
        "slow_pause_s": args.slow_pause,
        "tenant_max_sockets": None if external else tenant_max_sockets(args.subscribers),
        "progress_processes": None if external else args.progress_processes,
        "deflate": not args.no_deflate,
        "connect_concurrency": args.connect_concurrency,
        "workers": "unknown" if external else args.workers,
        "workers_note": (
            f"jobs start at once; {args.lead:g} s lead before the measured part"
            if external
            else "started by the benchmark once all subscribers are connected"
        ),
        "database": kit.database_kind(args.database_url) if args.database_url or not external else "unknown",
        **kit.machine_settings(),
        "nofile": nofile,
        "load_avg_start": os.getloadavg()[0],
    }


def locate_progress(
    args: argparse.Namespace, stack: kit.EmbeddedStack | None, progress_url: str
) -> tuple[list[int], str]:
    """The progress service's processes, and how they were found."""
    if args.progress_pid:
        return sorted(
            with_descendants({args.progress_pid}, live_parents())
        ), "--progress-pid and its children"
    if stack is not None and stack.process is not None:
        pids = find_progress_pids(stack.process.pid)
        if pids:
            return pids, "`conveyor progress` under the started stack, with its children"
        return [], "no `conveyor progress` under the started stack"
    parsed = urlsplit(progress_url)
    if parsed.hostname not in LOCAL_HOSTS or parsed.port is None:
        return [], "not on this machine; give --progress-pid"
    listening = listening_pids(parsed.port)
    if not listening:
        return [], f"no process here listens on port {parsed.port}; give --progress-pid"
    return sorted(with_descendants(set(listening), live_parents())), f"listen on port {parsed.port}"


def progress_url_of(args: argparse.Namespace, stack: kit.EmbeddedStack | None) -> str | None:
    """The started stack's progress service, or --progress-url (None: read it from the jobs' links)."""
    if stack is not None:
        return f"ws://{kit.LOCALHOST}:{stack.progress_port}"
    return args.progress_url.rstrip("/") if args.progress_url else None


def new_figures(args: argparse.Namespace, url: str, stack: kit.EmbeddedStack | None) -> Figures:
    nofile = raise_nofile_limit()  # before the stack starts: its processes inherit it
    return Figures(settings_of(args, url, progress_url_of(args, stack), nofile))


def tenant_max_sockets(subscribers: int) -> int:
    return max(DEFAULT_PROGRESS_TENANT_MAX_SOCKETS, TENANT_SOCKETS_PER_SUBSCRIBER * subscribers)


def new_stack(args: argparse.Namespace) -> kit.EmbeddedStack:
    """The workers start once every subscriber is connected, hence a stack without them; its one tenant
    may hold every subscriber's socket (settings in the environment, `CONVEYOR_...`, reach it too)."""
    limit = str(tenant_max_sockets(args.subscribers))
    settings = {
        "CONVEYOR_PROGRESS_TENANT_MAX_SOCKETS": limit,
        "CONVEYOR_PROGRESS_PROCESSES": str(args.progress_processes),
    }
    return kit.EmbeddedStack(0, args.database_url, None, settings=settings)


def main(argv: Sequence[str] | None = None) -> int:
    return kit.run_main(parse_args(argv), new_stack, new_figures, print_header, run_benchmark)


if __name__ == "__main__":
    sys.exit(main())
