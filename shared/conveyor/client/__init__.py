"""Conveyor's client: `Client` (blocking) and `AsyncClient`, on httpx and websockets.

from conveyor.client import Client

with Client("http://127.0.0.1:8000", api_key="...") as conveyor:
    job = conveyor.submit("demo.sleep", {"seconds": 2, "steps": 4})
    for event in conveyor.events(job):
        print(event.seq, event.status, event.progress.percent)
"""

from conveyor.client.asyncclient import AsyncClient
from conveyor.client.errors import (
    Conflict,
    ConveyorError,
    Forbidden,
    JobCanceled,
    JobFailed,
    NotFound,
    Problem,
    RateLimited,
    ResultNotReady,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from conveyor.client.models import (
    Event,
    Job,
    JobError,
    JobLinks,
    JobStatus,
    JobType,
    Progress,
    Stats,
    Submission,
)
from conveyor.client.retrying import NO_RETRIES, RetryPolicy
from conveyor.client.syncclient import Client

__all__ = [
    "NO_RETRIES",
    "AsyncClient",
    "Client",
    "Conflict",
    "ConveyorError",
    "Event",
    "Forbidden",
    "Job",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "JobLinks",
    "JobStatus",
    "JobType",
    "NotFound",
    "Problem",
    "Progress",
    "RateLimited",
    "ResultNotReady",
    "RetryPolicy",
    "Stats",
    "Submission",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
]
