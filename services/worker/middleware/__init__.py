"""The executor's policies, one module each, in the manner of Dramatiq's middleware: the executor runs
an attempt and calls every policy's hooks at the named points; each policy holds its defaults as named
constants in its own module.

- `retries`: a failure becomes a failed attempt, retried after its type's backoff or dead-lettered.
- `time_limit`: an attempt that runs past its time limit is stopped and fails `timed_out`.
- `cancellation`: a canceled job's handler gets its grace period, then is interrupted.
- `leases`: renewal, giving a stale lease up, the reaper; a lost lease stops the attempt.
- `drain`: a stopping worker hands back the attempts that do not finish in its grace period.
- `metrics`: attempts started and ended, by ending, and how long they ran.

The hooks, in the order an attempt meets them:

1. `before_start(execution)`: the attempt is registered, its handler not started yet.
2. `stop(execution, handler)`: called only on the policy whose `ending` is how the wait for the handler
   ended (a handler that returned is the executor's own case): stop the handler, and return the change
   that records the attempt, or None if nothing is to be recorded.
3. `on_failure(execution, exc)`: the handler raised (or could not start); policies are asked in order,
   and the first change returned records the attempt.
4. `after_attempt(execution, ending)`: the handler has ended and its slot is free (ending None: it never
   started); its outcome, if any, is recorded next.

Policies are parts of the executor and run in the attempt's own task, so they may act on the
`Execution` they are handed; nothing outside the executor does.
"""

from __future__ import annotations

from typing import ClassVar

from conveyor.changes import Change
from services.worker.attempt import Ending, Execution, HandlerTask


class Middleware:
    """A policy: every hook does nothing unless the policy overrides it."""

    # The ending whose `stop` this policy decides, if any; one policy per ending.
    ending: ClassVar[Ending | None] = None

    def before_start(self, execution: Execution) -> None:
        """The attempt is about to start its handler."""

    async def stop(self, execution: Execution, handler: HandlerTask) -> Change | None:
        """The wait ended in `self.ending`: stop the handler; the change that records the attempt."""
        return None

    def on_failure(self, execution: Execution, exc: BaseException) -> Change | None:
        """The attempt failed with `exc`: the change that records it, or None to leave it to the next."""
        return None

    def after_attempt(self, execution: Execution, ending: Ending | None) -> None:
        """The handler has ended (`ending` None: it never started, its type or payload was refused)."""
