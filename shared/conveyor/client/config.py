"""Where the client finds the API and its key when the caller does not say."""

from __future__ import annotations

import os

URL_ENV = "CONVEYOR_URL"
KEY_ENV = "CONVEYOR_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def default_key() -> str | None:
    return os.environ.get(KEY_ENV) or None
