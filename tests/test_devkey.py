"""`conveyor run`'s development key: made once, kept in the data folder, its owner's alone from the start."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.auth import MIN_BOOTSTRAP_KEY_LENGTH, parse_bootstrap_keys
from conveyor.stack import DEV_KEY_FILE, DEV_KEY_MODE, DEV_TENANT, dev_api_key


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0: a file gets exactly the mode it is created with (normally 022 hides group and other write)."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_the_dev_key_is_created_readable_by_its_owner_only(
    tmp_path: Path, permissive_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No chmod after the fact: the mode must be the file's from its creation, with no moment between
    # in which another user could open it.
    monkeypatch.setattr(Path, "chmod", lambda *_args, **_kwargs: pytest.fail("the key file was chmod'ed"))
    monkeypatch.setattr(os, "chmod", lambda *_args, **_kwargs: pytest.fail("the key file was chmod'ed"))
    key = dev_api_key(tmp_path)
    path = tmp_path / DEV_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == DEV_KEY_MODE == 0o600
    assert path.read_text() == key + "\n"
    assert dev_api_key(tmp_path) == key  # kept across runs


def test_the_dev_key_is_a_valid_bootstrap_key(tmp_path: Path) -> None:
    key = dev_api_key(tmp_path)
    assert len(key) >= MIN_BOOTSTRAP_KEY_LENGTH
    assert parse_bootstrap_keys(f"{DEV_TENANT}:{key}")  # what `conveyor run` gives its services
