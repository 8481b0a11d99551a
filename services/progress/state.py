"""What the progress service's endpoints share: settings, database, hub and bootstrap keys."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.auth import Principal
from conveyor.database import Database
from conveyor.settings import Settings
from services.progress.hub import EventHub


@dataclass
class ProgressState:
    settings: Settings
    db: Database
    hub: EventHub
    bootstrap_keys: dict[str, Principal]
