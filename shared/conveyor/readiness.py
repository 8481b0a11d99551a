"""Readiness: the database answers, Kafka answers, and the project's topics exist."""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import SQLAlchemyError

from conveyor.broker import BrokerUnavailable, missing_topics
from conveyor.database import Database

CHECK_TIMEOUT_S = 5.0


async def check_readiness(db: Database, bootstrap: str, prefix: str) -> dict[str, str]:
    """A map of component -> "ok" or what is wrong; ready when every value is "ok"."""
    return {
        "database": await _check_database(db),
        "kafka": await _check_kafka(bootstrap, prefix),
    }


async def _check_database(db: Database) -> str:
    try:
        await asyncio.wait_for(db.ping(), CHECK_TIMEOUT_S)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


async def _check_kafka(bootstrap: str, prefix: str) -> str:
    try:
        missing = await asyncio.wait_for(missing_topics(bootstrap, prefix), CHECK_TIMEOUT_S)
    except (BrokerUnavailable, OSError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"
    if missing:
        return "missing topics: " + ", ".join(missing)
    return "ok"
