"""The `conveyor` command: run the embedded stack, a single service, Kafka, migrations, API keys; and,
as a client of a running stack, the commands of `conveyor.client.commands` (submit, watch, ls, top...)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from conveyor.client import commands as client_commands
from conveyor.clock import skew_process_clock
from conveyor.logs import configure_logging
from conveyor.settings import Settings, load_settings
from conveyor.stopping import StopRequested, ignore_stop_signals, raise_on_stop_signals, wait_for_stop

app = typer.Typer(no_args_is_help=True, help="Conveyor: jobs behind a 202 API, on Kafka.")
kafka_app = typer.Typer(
    no_args_is_help=True, help="The project's own Apache Kafka (KRaft) from Maven Central."
)
keys_app = typer.Typer(no_args_is_help=True, help="API keys stored (hashed) in the database.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(keys_app, name="keys")
client_commands.register(app)
console = Console(stderr=True)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    skew_process_clock(settings.clock_skew_s)
    return settings


def _require_valid_keys(settings: Settings) -> None:
    """Refuse to start a service on malformed or short bootstrap keys; the message never shows a key."""
    from conveyor.auth import InvalidBootstrapKeys, parse_bootstrap_keys

    try:
        parse_bootstrap_keys(settings.api_keys)
    except InvalidBootstrapKeys as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


def _require_bootstrap(settings: Settings) -> None:
    if not settings.kafka_bootstrap:
        console.print(
            "[red]CONVEYOR_KAFKA_BOOTSTRAP is not set[/red] (use `conveyor run` for the embedded stack)"
        )
        raise typer.Exit(2)


@app.command()
def run() -> None:
    """Set up and run the whole embedded stack in the foreground: Kafka, gateway, workers, progress."""
    from conveyor.stack import run_stack

    settings = _settings()
    _require_valid_keys(settings)
    sys.exit(run_stack(settings))


@app.command()
def gateway() -> None:
    """Run the gateway (HTTP API) alone."""
    from services.gateway.main import serve

    settings = _settings()
    _require_bootstrap(settings)
    _require_valid_keys(settings)
    serve(settings)


@app.command()
def worker() -> None:
    """Run one worker alone."""
    from services.worker.main import serve

    settings = _settings()
    _require_bootstrap(settings)
    serve(settings)


@app.command()
def progress(
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="Serve as a child of this process, on the shared port.")
    ] = None,
) -> None:
    """Run the progress service (WebSockets) alone: CONVEYOR_PROGRESS_PROCESSES processes on its port."""
    from services.progress.main import serve

    settings = _settings()
    _require_bootstrap(settings)
    _require_valid_keys(settings)
    serve(settings, parent_pid)


@app.command()
def migrate() -> None:
    """Apply the database migrations (services also do this when they start)."""
    from conveyor.database import Database

    async def upgrade(url: str) -> None:
        db = Database(url)
        try:
            await db.migrate()
        finally:
            await db.close()

    settings = _settings()
    asyncio.run(upgrade(settings.resolved_database_url))
    console.print(f"migrated {settings.resolved_database_url}")


@app.command("topics")
def create_topics() -> None:
    """Create the project's topics (idempotent)."""
    from conveyor.topics_setup import ensure_deployment_topics

    s = _settings()
    _require_bootstrap(s)
    created = asyncio.run(ensure_deployment_topics(s))
    console.print(f"created: {', '.join(created) or 'nothing, all topics exist'}")


@kafka_app.command("fetch")
def kafka_fetch() -> None:
    """Download the broker's jars from Maven Central into the cache (once)."""
    from conveyor.embedded.kafka_jars import fetch_broker_jars

    settings = _settings()
    console.print(str(fetch_broker_jars(settings.cache_dir, settings.kafka_version)))


@kafka_app.command("start")
def kafka_start(
    nodes: Annotated[int, typer.Option(min=1, max=3, help="1, or 3 for a cluster on loopback")] = 1,
    data_dir: Annotated[Path | None, typer.Option(help="Default: <data dir>/kafka")] = None,
) -> None:
    """Run Kafka in the foreground until Ctrl-C or SIGTERM."""
    from conveyor.embedded.kafka import KafkaCluster

    settings = _settings()
    cluster = KafkaCluster(
        data_dir or settings.data_dir / "kafka",
        nodes=nodes,
        base_port=settings.kafka_port,
        cache_dir=settings.cache_dir,
        version=settings.kafka_version,
    )
    raise_on_stop_signals()  # before the start: a stop while Kafka starts must stop it too
    try:
        cluster.start()
        console.print(f"Kafka is up: [bold]{cluster.bootstrap_servers}[/bold] (Ctrl-C stops it)")
        wait_for_stop()
    except StopRequested:
        pass
    finally:
        ignore_stop_signals()
        cluster.stop()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: submit,read,cancel")] = "submit,read,cancel",
    name: Annotated[str, typer.Option(help="A label for the key")] = "",
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from conveyor.auth import create_api_key

    wanted = frozenset(s.strip() for s in scopes.split(","))
    try:
        key = _in_database(lambda session: create_api_key(session, tenant, wanted, name))
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print(key.secret)  # alone on stdout: scripts read it
    console.print(f"key id {key.id}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int | None, typer.Argument(help="The key's id (see `conveyor keys list`)")] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="The key itself, instead of its id (e.g. a leaked key)")
    ] = None,
) -> None:
    """Revoke an API key: it is refused (401) from the next request on. Revoking it again changes nothing."""
    from conveyor.auth import UnknownApiKey, revoke_api_key

    if (key_id is None) == (key is None):
        console.print("[red]name the key by its id or by --key (exactly one)[/red]")
        raise typer.Exit(2)
    try:
        revocation = _in_database(lambda session: revoke_api_key(session, key_id=key_id, secret=key))
    except UnknownApiKey as exc:
        hint = " (keys from CONVEYOR_API_KEYS are revoked by removing them there)" if key else ""
        console.print(f"[red]{exc}[/red]{hint}")
        raise typer.Exit(2) from None
    row = revocation.key
    what = f"key id {row.id} (tenant {escape(row.tenant)})"
    if revocation.already_revoked:
        console.print(f"{what} was already revoked at {_when(row.revoked_at)} UTC")
    else:
        console.print(f"revoked {what} at {_when(row.revoked_at)} UTC")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None,
) -> None:
    """List the stored API keys, revoked ones included; never their secrets."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from conveyor.auth import list_api_keys

    rows = _in_database(lambda session: list_api_keys(session, tenant))
    if not rows:
        console.print("no API keys" + (f" for tenant {escape(tenant)}" if tenant else ""))
        return
    table = Table(box=box.SIMPLE_HEAD, caption="times in UTC")
    for header in ("id", "tenant", "name", "scopes", "created_at", "revoked_at"):
        # Fold rather than cut: a narrow terminal (or a pipe, 80 columns) must not hide a tenant or a scope.
        table.add_column(header, overflow="fold")
    for row in rows:
        cells = (row.tenant, row.name, row.scopes.replace(",", ", "))
        # Text, not markup: a tenant or a name with [brackets] is shown as it is.
        table.add_row(str(row.id), *map(Text, cells), _when(row.created_at), _when(row.revoked_at))
    Console().print(table)


def _in_database(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction on the configured database, migrated first."""
    from conveyor.database import Database

    async def run(url: str) -> T:
        db = Database(url)
        try:
            await db.migrate()
            async with db.session() as session:
                return await work(session)
        finally:
            await db.close()

    return asyncio.run(run(_settings().resolved_database_url))


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""
