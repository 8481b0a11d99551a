"""The messages a client may send on a progress WebSocket, and the error it gets for anything else."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from conveyor.problems import field_errors
from services.progress.channel import Request, Subscribe, SubscribeAll, Unsubscribe, UnsubscribeAll
from services.progress.streams import MAX_SUBSCRIPTIONS, error_message

MAX_JOB_ID_LENGTH = 64
# Ids one subscribe may name: each one new to the socket costs a database read.
MAX_IDS_PER_MESSAGE = 100
SEQ = re.compile(r"[0-9]{1,18}")
JobId = Annotated[str, Field(min_length=1, max_length=MAX_JOB_ID_LENGTH)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthMessage(_Message):
    """For browsers, which cannot set headers on a WebSocket: the API key as the first message."""

    op: Literal["auth"]
    token: str = Field(min_length=1, max_length=512)


class PingMessage(_Message):
    """An application-level heartbeat, for clients that cannot see protocol pings: answered by a pong."""

    op: Literal["ping"]


class SubscribeMessage(_Message):
    op: Literal["subscribe"]
    job_ids: list[JobId] = Field(default_factory=list, max_length=MAX_IDS_PER_MESSAGE)
    all: bool = Field(default=False, description="Every job of the tenant, present and future.")
    after_seq: dict[JobId, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="Resume these jobs after the given seq instead of a snapshot."
    )

    @model_validator(mode="after")
    def _names_something(self) -> SubscribeMessage:
        if not self.job_ids and not self.all:
            raise ValueError("give `job_ids` or `all: true`")
        unknown = set(self.after_seq) - set(self.job_ids)
        if unknown:
            raise ValueError(f"after_seq names jobs not in job_ids: {sorted(unknown)}")
        return self


class UnsubscribeMessage(_Message):
    op: Literal["unsubscribe"]
    job_ids: list[JobId] = Field(default_factory=list, max_length=MAX_SUBSCRIPTIONS)
    all: bool = False

    @model_validator(mode="after")
    def _names_something(self) -> UnsubscribeMessage:
        if not self.job_ids and not self.all:
            raise ValueError("give `job_ids` or `all: true`")
        return self


ClientMessage = Annotated[
    AuthMessage | PingMessage | SubscribeMessage | UnsubscribeMessage, Field(discriminator="op")
]
_client_message: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)

PONG: dict[str, Any] = {"type": "pong"}


class BadMessage(Exception):
    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(message["detail"])
        self.message = message


def parse_client_message(text: str) -> ClientMessage:
    try:
        return _client_message.validate_json(text)
    except ValidationError as exc:
        errors = field_errors(exc.errors(include_url=False, include_input=False))
        fields = ", ".join(error["field"] for error in errors)
        raise BadMessage(error_message("bad_message", f"invalid message: {fields}", errors=errors)) from None


def parse_seq(text: str) -> int | None:
    """A seq given as text (`?after_seq=`, `Last-Event-ID`); None if it is not one."""
    return int(text) if SEQ.fullmatch(text) else None


def requests_for(message: SubscribeMessage | UnsubscribeMessage) -> list[Request]:
    """The channel requests a (un)subscribe message stands for."""
    requests: list[Request] = []
    if isinstance(message, SubscribeMessage):
        if message.job_ids:
            requests.append(Subscribe(tuple(dict.fromkeys(message.job_ids)), dict(message.after_seq)))
        if message.all:
            requests.append(SubscribeAll())
    else:
        if message.job_ids:
            requests.append(Unsubscribe(tuple(dict.fromkeys(message.job_ids))))
        if message.all:
            requests.append(UnsubscribeAll())
    return requests
