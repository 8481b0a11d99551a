"""Counts of SQL transactions and statements per process, for the benchmarks (`bench/throughput.py`).

Off unless `CONVEYOR_SQL_STATS_DIR` names a folder. Then every engine a process creates counts, with
SQLAlchemy's own events, the transactions it commits (those that wrote anything, and the rest) and
the statements it executes (by verb; an executemany counts once, and its parameter sets as rows;
SELECTs also by the first table they read, as `selects.from.<table>`). A thread writes the totals
to `<dir>/<command>-<pid>.json` twice a second and at exit. A benchmark reads the files before and
after a phase and divides the difference by the jobs it ran.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

STATS_DIR_ENV = "CONVEYOR_SQL_STATS_DIR"
WRITE_INTERVAL_S = 0.5
WRITE_VERBS = frozenset({"insert", "update", "delete", "replace"})
# What counts as a statement in the total: not BEGIN, PRAGMA or the like.
SQL_VERBS = frozenset({"select", "with", *WRITE_VERBS})

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_started = False


def enabled() -> bool:
    return bool(os.environ.get(STATS_DIR_ENV))


def instrument(engine: Engine) -> None:
    """Count what `engine` does, if counting is on."""
    if not enabled():
        return
    _start_writer()

    @event.listens_for(engine, "before_cursor_execute")
    def on_statement(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        verb = _verb(statement)
        table = _first_table(statement) if verb == "select" else None
        with _lock:
            _counts[f"statements.{verb}"] += 1
            if verb in SQL_VERBS:
                _counts["statements"] += 1
            if table:
                _counts[f"selects.from.{table}"] += 1
        if verb in WRITE_VERBS:
            conn.info["conveyor_wrote"] = True

    @event.listens_for(engine, "after_execute")
    def on_execute(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any, result: Any) -> None:
        # Once per `execute()`: the rows it was given (an executemany of many parameter sets may be
        # sent as one statement, or as several).
        verb = _verb(str(clause)) if isinstance(clause, str) else _clause_verb(clause)
        if verb in SQL_VERBS:
            with _lock:
                _counts[f"rows.{verb}"] += len(multiparams) if multiparams else 1

    @event.listens_for(engine, "commit")
    def on_commit(conn: Any) -> None:
        wrote = conn.info.pop("conveyor_wrote", False)
        with _lock:
            _counts["transactions.write" if wrote else "transactions.read"] += 1

    @event.listens_for(engine, "rollback")
    def on_rollback(conn: Any) -> None:
        wrote = conn.info.pop("conveyor_wrote", False)
        with _lock:
            _counts["transactions.rolled_back_write" if wrote else "transactions.read"] += 1


def _verb(statement: str) -> str:
    return statement.lstrip().split(None, 1)[0].lower() if statement.strip() else "other"


# The first table a SELECT names after FROM, quoted or not: enough to tell one query's kind from
# another's when a test counts the queries of one feature (the API keys', say) on a busy process.
_FIRST_TABLE = re.compile(r'\bFROM\s+"?(\w+)', re.IGNORECASE)


def _first_table(statement: str) -> str | None:
    found = _FIRST_TABLE.search(statement)
    return found.group(1) if found else None


def _clause_verb(clause: Any) -> str:
    """The verb of a Core statement, from its visit name (`select`, `insert`, `update`, `delete`)."""
    name = str(getattr(clause, "__visit_name__", "other"))
    if name == "textclause":
        return _verb(str(clause))
    return "select" if name == "compound_select" else name


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def _path() -> Path:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), Path(sys.argv[0]).stem)
    return Path(os.environ[STATS_DIR_ENV]) / f"{command}-{os.getpid()}.json"


def _write() -> None:
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), "argv": sys.argv, "counts": snapshot()}))
    temporary.replace(path)


def _start_writer() -> None:
    global _started
    with _lock:
        if _started:
            return
        _started = True
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(WRITE_INTERVAL_S):
            _write()

    threading.Thread(target=loop, name="sqlstats", daemon=True).start()
    atexit.register(_write)
