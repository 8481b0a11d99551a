"""The autoscaler of `conveyor run`: applies the policy (`conveyor.autoscaling`) to the supervisor's
worker processes.

Every SAMPLE_INTERVAL_S it reads the workers' consumer lag (`conveyor.lag`: two small Kafka requests,
nothing on the database, nothing per job) and asks the policy how many workers that calls for. More:
it starts them at once. Fewer: it retires one worker, the highest-numbered, and retires no other until that
one has exited. A retired worker gets SIGTERM and drains (`services.worker.middleware.drain`): its
running jobs finish within the drain grace or are handed back, and it is killed only past its
worst-case shutdown. A worker that dies meanwhile is restarted by the supervisor, as always.

Each decision that changes the count or its reason is logged (`autoscaler.decision`) with the value
of `conveyor_autoscaler_desired_workers`, a gauge in prometheus-client's default registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from prometheus_client import Gauge

from conveyor.autoscaling import Decision, Policy, State, decide
from conveyor.broker import BrokerUnavailable
from conveyor.lag import GroupLag
from conveyor.supervisor import ServiceSpec, Supervisor

log = structlog.get_logger(__name__)

# How often the lag is read. The policy's windows are several samples long.
SAMPLE_INTERVAL_S = 2.0
# A lag read that takes longer is given up (Kafka is slow or away): no decision this round.
LAG_TIMEOUT_S = 10.0
# While Kafka cannot be reached at start, try again this often.
CONNECT_RETRY_S = 5.0

DESIRED_WORKERS = Gauge(
    "conveyor_autoscaler_desired_workers", "Worker processes the autoscaler of `conveyor run` wants."
)

# A worker's spec by its number: `worker-<n>`.
WorkerSpecs = Callable[[int], ServiceSpec]


def worker_name(number: int) -> str:
    return f"worker-{number}"


class Autoscaler:
    """Keeps `supervisor`'s workers `worker-1`… at the count the policy wants. The supervisor must
    start with workers 1 to `policy.minimum` already in it (or whatever count: it is brought into
    the bounds)."""

    def __init__(
        self,
        supervisor: Supervisor,
        policy: Policy,
        lag: GroupLag,
        new_worker: WorkerSpecs,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self._supervisor = supervisor
        self._policy = policy
        self._lag = lag
        self._new_worker = new_worker
        self._interval_s = interval_s
        self._retiring: dict[str, asyncio.Task[int | None]] = {}
        self._last: tuple[int, str] | None = None

    def workers(self) -> list[int]:
        """The numbers of the workers that are not being retired, in order."""
        numbers = []
        for name in self._supervisor.names():
            prefix, _, number = name.rpartition("-")
            if prefix == "worker" and number.isdigit() and name not in self._retiring:
                numbers.append(int(number))
        return sorted(numbers)

    async def run(self) -> None:
        """Sample and apply, until cancelled (then it stops waiting for a retired worker, whom the
        supervisor's own stop then covers)."""
        DESIRED_WORKERS.set(len(self.workers()))
        await self._connect()
        loop = asyncio.get_running_loop()
        state = State()
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                try:
                    state = await self._round(state, loop.time())
                except Exception:  # a bug must not end the autoscaling for good: the next round tries again
                    log.exception("autoscaler.round_failed")
        finally:
            for task in self._retiring.values():
                task.cancel()
            await asyncio.gather(*self._retiring.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._lag.stop()

    async def _round(self, state: State, now: float) -> State:
        outstanding = await self._outstanding()
        if outstanding is None:
            return state
        current = len(self.workers())
        decision = decide(self._policy, state, current, outstanding, now)
        if decision.desired < current and self._retiring:
            # One at a time: the next waits until the worker being retired has exited.
            decision = Decision(current, "draining", state)
        self._record(decision, current, outstanding)
        self._apply(decision.desired, current)
        return decision.state

    async def _connect(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._lag.start(), LAG_TIMEOUT_S)
                return
            except (BrokerUnavailable, TimeoutError) as exc:
                log.warning("autoscaler.lag_unavailable", error=str(exc), retry_in_s=CONNECT_RETRY_S)
                await asyncio.sleep(CONNECT_RETRY_S)

    async def _outstanding(self) -> int | None:
        try:
            return await asyncio.wait_for(self._lag.total(), LAG_TIMEOUT_S)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("autoscaler.lag_unavailable", error=str(exc))
            return None

    def _record(self, decision: Decision, current: int, outstanding: int) -> None:
        DESIRED_WORKERS.set(decision.desired)
        if (decision.desired, decision.reason) != self._last:
            self._last = (decision.desired, decision.reason)
            log.info(
                "autoscaler.decision",
                desired_workers=decision.desired,
                current_workers=current,
                outstanding_jobs=outstanding,
                reason=decision.reason,
            )

    def _apply(self, desired: int, current: int) -> None:
        numbers = self.workers()
        if desired > current:
            taken = set(numbers) | {int(name.rpartition("-")[2]) for name in self._retiring}
            free = (n for n in range(1, len(taken) + desired + 1) if n not in taken)
            for number in [next(free) for _ in range(desired - current)]:
                self._supervisor.add(self._new_worker(number))
                log.info("autoscaler.worker_added", service=worker_name(number))
        elif desired < current:
            name = worker_name(numbers[-1])  # the highest number: the rest stay worker-1…N
            self._retiring[name] = asyncio.create_task(self._retire(name), name=f"retire-{name}")

    async def _retire(self, name: str) -> int | None:
        try:
            code = await self._supervisor.retire(name)
            log.info("autoscaler.worker_removed", service=name, code=code)
            return code
        finally:
            self._retiring.pop(name, None)
