"""A small application on Conveyor: it submits a handful of renders and shows each one's progress
live, then prints what they came to.

    make run                                  # in another terminal: the whole stack
    CONVEYOR_API_KEY=$(cat data/dev-api-key) .venv/bin/python examples/progress_app.py

`demo.sleep` stands in for real work: it reports its progress after each step.
"""

from __future__ import annotations

import asyncio
import sys

from conveyor.client import AsyncClient, ConveyorError, Job, JobStatus

SCENES = {"intro": 2.0, "chase": 4.0, "credits": 1.0}
STEPS = 4


async def follow(client: AsyncClient, name: str, job: Job) -> Job:
    """Print the job's progress as it comes, until it finishes; the finished job."""
    async for event in client.events(job):
        percent = f"{event.progress.percent:3.0f}%" if event.progress.percent is not None else "   …"
        print(f"{name:>8} {percent} {event.status.value:<9} {event.progress.message or ''}")
    return await client.get(job.id)


async def main() -> int:
    async with AsyncClient() as client:  # CONVEYOR_URL and CONVEYOR_API_KEY
        jobs = await client.submit_many(
            [
                {
                    "type": "demo.sleep",
                    "payload": {"seconds": seconds, "steps": STEPS},
                    "labels": {"scene": name},
                }
                for name, seconds in SCENES.items()
            ]
        )
        finished = await asyncio.gather(
            *(follow(client, name, job) for name, job in zip(SCENES, jobs, strict=True))
        )
    for name, job in zip(SCENES, finished, strict=True):
        outcome = job.result if job.status is JobStatus.SUCCEEDED else job.error
        print(f"{name}: {job.status.value} {outcome}")
    return 0 if all(job.status is JobStatus.SUCCEEDED for job in finished) else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        sys.exit(1)
