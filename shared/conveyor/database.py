"""Engines and transactions for SQLite (embedded default) and PostgreSQL, and Alembic migrations on start.

Two ways in:

- `write(work)` and `read(work)` run a plain function over a sync `Connection` in one transaction:
  the hot paths (every job state change, hot reads). On PostgreSQL it runs through the async engine
  (`run_sync`), one round trip per statement. On SQLite a write runs on the event loop's own thread
  with the sync driver, from BEGIN to its last statement without yielding: the database's single write
  lock is then held only while this process's SQL runs, never across event-loop turns or while another
  thread of the process holds the GIL. Only the COMMIT, which waits for the disk, runs on a thread
  while the loop goes on. A writer that finds the lock taken does not sleep in SQLite's own busy
  handler (whose waits grow to 100 ms) but yields to the loop and tries again within a millisecond or
  two. Reads run on a few threads of their own: in WAL mode they never wait for a writer.
- `session()` and `reading()` are async ORM sessions, for everything that is not hot: the CLI, lists,
  pruning, migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool

from conveyor import sqlstats
from conveyor.jsoncodec import dumps_text, loads

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Several processes (gateway, workers, progress) share one SQLite file: a writer waits this long for
# the lock before it gives up (and the request it serves answers 503).
SQLITE_BUSY_TIMEOUT_MS = 15_000
# How a writer that found the lock taken waits before it tries again: from the first to the last,
# doubling. Short, since a batch holds the lock for a millisecond or two.
SQLITE_RETRY_FIRST_S = 0.0001
SQLITE_RETRY_LAST_S = 0.002
# Threads that read SQLite for `read()`: reads never wait for the writer in WAL mode.
SQLITE_READ_THREADS = 4
POSTGRES_POOL_SIZE = 10
# A write transaction PostgreSQL undid for a deadlock (40P01) or a serialization failure (40001) is run
# again, at most this many times.
RETRIED_SQLSTATES = frozenset({"40P01", "40001"})
POSTGRES_RETRIES = 3
# Switching a new SQLite file to WAL: tries, and the wait before each retry (times the attempt).
WAL_SWITCH_ATTEMPTS = 10
WAL_SWITCH_BACKOFF_S = 0.05
POSTGRES_MAX_OVERFLOW = 20


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, read_only: bool = False) -> AsyncEngine:
    """The async engine of `session()` and `reading()`."""
    if is_sqlite(url):
        _make_parent_folder(url)
        engine = create_async_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            json_serializer=dumps_text,
            json_deserializer=loads,
        )
        _tune_sqlite(engine.sync_engine, begin="BEGIN" if read_only else "BEGIN IMMEDIATE")
    else:
        # No pre-ping: it would cost a round trip per checkout. A connection found dropped is
        # invalidated (with the rest of the pool) and `write`/`read` retry once on a fresh one.
        engine = create_async_engine(
            url,
            pool_size=POSTGRES_POOL_SIZE,
            max_overflow=POSTGRES_MAX_OVERFLOW,
            json_serializer=dumps_text,
            json_deserializer=loads,
        )
    sqlstats.instrument(engine.sync_engine)
    return engine


def _make_parent_folder(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sync_sqlite_engine(url: str, *, busy_timeout_ms: int, pool_size: int, begin: str | None) -> Engine:
    sync_url = make_url(url).set(drivername="sqlite+pysqlite")
    engine = create_sync_engine(
        sync_url,
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        json_serializer=dumps_text,
        json_deserializer=loads,
    )
    _tune_sqlite(engine, begin=begin, busy_timeout_ms=busy_timeout_ms)
    sqlstats.instrument(engine)
    return engine


def _use_wal(cursor: Any) -> None:
    """Put the database in WAL mode, unless it already is.

    WAL is a property of the file, set by the first connection. Switching needs an exclusive lock, and
    SQLite answers "database is locked" at once, without its busy handler, when processes that start
    together (a gateway and its workers) contend for it; so that case is tried again a few times.
    """
    for attempt in range(1, WAL_SWITCH_ATTEMPTS + 1):
        try:
            cursor.execute("PRAGMA journal_mode")
            if cursor.fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError (sqlite3's or aiosqlite's adapter)
            if "database is locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS:
                raise
            time.sleep(WAL_SWITCH_BACKOFF_S * attempt)  # once per connection, at start-up only


def _tune_sqlite(engine: Engine, begin: str | None, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _use_wal(cursor)
        # FULL: a commit is on disk (the WAL is fsynced) before it returns, so a 202 survives a power
        # loss too. With group commit that is one fsync per batch of jobs, not per job.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if begin is None:
        return

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes can fail with SQLITE_BUSY without waiting,
        # when another process wrote in between: writers take the write lock up front (BEGIN IMMEDIATE)
        # and wait for it instead. Readers begin deferred, so in WAL mode they never wait for writers.
        connection.exec_driver_sql(begin)


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")


def _is_busy(exc: OperationalError) -> bool:
    return "locked" in str(exc.orig) or "busy" in str(exc.orig)


class Database:
    """`write()` and `read()` run a function in one transaction; `session()` is an async unit of work
    that commits on success; `reading()` an async session for reads only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        self.engine = create_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite needs a second engine whose transactions begin deferred; other databases share one.
        self.read_engine = create_engine(url, read_only=True) if self.sqlite else self.engine
        self.read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)
        self._writer: Engine | None = None
        self._writer_connection: Connection | None = None
        self._write_turn: asyncio.Lock | None = None
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self._reader: Engine | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one write transaction and commit; its result once committed. On SQLite the
        transaction is retried whole while another process holds the write lock (for up to
        SQLITE_BUSY_TIMEOUT_MS), so `work` must be safe to run again after a rollback."""
        if self.sqlite:
            return await self._write_sqlite(work)
        # One write transaction of this process at a time, on PostgreSQL too: its writers (the committer's
        # batches, lease renewals, outbox deletes) then never wait for each other's row locks, and so
        # never deadlock with each other.
        async with self._turn():
            return await self._postgres(self.engine, work, write=True)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one read-only transaction (never waits for writers)."""
        if self.sqlite:
            reader, threads = self._sqlite_reader()
            return await asyncio.get_running_loop().run_in_executor(threads, _read_sqlite, reader, work)
        return await self._postgres(self.engine, work, write=False)

    async def _postgres(self, engine: AsyncEngine, work: Callable[[Connection], T], write: bool) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                async with engine.connect() as connection:
                    result = await connection.run_sync(work)
                    if write:
                        await connection.commit()
                    return result
            except DBAPIError as exc:
                # A connection the server dropped (a restart, an idle timeout): the pool has been
                # invalidated, and one more try gets a fresh connection. Nothing was committed.
                if exc.connection_invalidated and attempt == 1:
                    continue
                # Two processes' transactions took the same rows in another order, and PostgreSQL chose
                # this one to undo: it is run again, as a whole.
                if _sqlstate(exc) in RETRIED_SQLSTATES and attempt <= POSTGRES_RETRIES:
                    log.info("database.transaction_retried", sqlstate=_sqlstate(exc), attempt=attempt)
                    continue
                raise

    def _turn(self) -> asyncio.Lock:
        if self._write_turn is None:
            self._write_turn = asyncio.Lock()
        return self._write_turn

    async def _write_sqlite(self, work: Callable[[Connection], T]) -> T:
        async with self._turn():  # one transaction at a time on the process's writer connection
            connection = self._sqlite_writer()
            await self._begin_sqlite(connection)
            try:
                result = work(connection)
            except BaseException:
                connection.rollback()
                raise
            # The COMMIT waits for the disk (fsync): on a thread, so the loop serves meanwhile. Nothing
            # else uses the connection until it is done, and a cancel waits for it: it may have committed.
            committing = asyncio.get_running_loop().run_in_executor(self._commit_thread, connection.commit)
            try:
                await asyncio.shield(committing)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await committing
                raise
            except BaseException:
                connection.rollback()
                raise
            return result

    async def _begin_sqlite(self, connection: Connection) -> None:
        """BEGIN IMMEDIATE: take the write lock, waiting for it (without blocking the loop) for at most
        SQLITE_BUSY_TIMEOUT_MS while another process holds it."""
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = SQLITE_RETRY_FIRST_S
        while True:
            try:
                # busy_timeout is 0 on this connection: a lock held by another process is reported at once.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                connection.rollback()
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(SQLITE_RETRY_LAST_S, pause * 2)

    def _sqlite_writer(self) -> Connection:
        if self._writer_connection is None:
            # No `begin` hook on this engine: `_write_sqlite` begins each transaction itself.
            self._writer = _sync_sqlite_engine(self.url, busy_timeout_ms=0, pool_size=1, begin=None)
            self._writer_connection = self._writer.connect()
        return self._writer_connection

    def _sqlite_reader(self) -> tuple[Engine, ThreadPoolExecutor]:
        with self._lock:
            if self._reader is None or self._read_threads is None:
                self._reader = _sync_sqlite_engine(
                    self.url,
                    busy_timeout_ms=SQLITE_BUSY_TIMEOUT_MS,
                    pool_size=SQLITE_READ_THREADS,
                    begin="BEGIN",
                )
                self._read_threads = ThreadPoolExecutor(
                    SQLITE_READ_THREADS, thread_name_prefix="sqlite-reader"
                )
            return self._reader, self._read_threads

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions.begin() as session:
            yield session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        async with self.read_sessions() as session:
            yield session

    async def ping(self) -> None:
        async with self.read_engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def migrate(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(_upgrade_to_head)

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
        if self._read_threads is not None:
            self._read_threads.shutdown(wait=True)
        self._commit_thread.shutdown(wait=True)
        if self._writer_connection is not None:
            self._writer_connection.close()
        for engine in (self._writer, self._reader):
            if engine is not None:
                engine.dispose()
        self._writer = self._reader = None
        self._writer_connection = None
        self._read_threads = None


def _read_sqlite(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.connect() as connection, connection.begin():
        return work(connection)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("conveyor") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Services start together in a cluster: one migrates, the others wait and then find it done.
        connection.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
    command.upgrade(_alembic_config(connection), "head")
