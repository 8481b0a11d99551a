"""A private PostgreSQL server run from the stock binaries, for the tests and the benchmarks.

There is no Docker on our machines, but Debian's `postgresql` package ships `initdb` and `pg_ctl`
(`scripts/ensure-postgres.sh` installs it). `PostgresServer` uses them to run a cluster of its own: it
listens on 127.0.0.1 only, keeps its unix socket beside its data, and leaves Debian's system cluster
alone. The project reaches it through an ordinary SQLAlchemy URL, exactly as it would a production
PostgreSQL.

Running as root (CI, containers): PostgreSQL refuses to run as root, so initdb, pg_ctl and postgres
run as the ``postgres`` OS user (created if missing) through ``runuser``. That user must own the
cluster and be able to traverse every directory above it, and the usual callers do not allow that:
pytest's ``/tmp/pytest-of-root`` and ``/root`` are mode 0700. We do not loosen directories we do not
own: opening ``/root`` is a security regression, and pytest puts its base dir back to 0700 at every
session, which would cut a still-running server's pg_ctl off from its data. Instead, when the server
user cannot reach ``data_dir``, the cluster lives in a "shadow" directory,
``$TMPDIR/conveyor-postgres-<euid>/<random>/`` (the base is 0711 and root-owned, the shadow 0700 and
postgres-owned), and ``data_dir/pgdata`` is a symlink to it, so a later start on the same ``data_dir``
finds the same cluster. The same fallback applies when the socket path under ``data_dir`` would be
longer than the kernel allows. A shadow whose ``data_dir`` is gone (pytest prunes old tmp dirs) is
stopped and deleted the next time a shadow is made, so they do not pile up in /tmp.

Layout: the cluster is ``data_dir/pgdata`` (a directory, or that symlink); its unix socket is in it
too, and its log, ``postgres.log``, is beside it.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

PG_BIN_ENV = "CONVEYOR_PG_BIN"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
SERVER_BINARIES = ("initdb", "pg_ctl")
ENSURE_SCRIPT = "scripts/ensure-postgres.sh"

LISTEN_HOST = "127.0.0.1"
# The bootstrap superuser. It has no password, so it can only come in through the unix socket,
# which `trust`s whoever can open it: the socket sits in the 0700 data dir, i.e. the server user.
SUPERUSER = "postgres"
ADMIN_DATABASE = "postgres"
# The OS account the server runs as when we are root (Debian's package creates it).
SERVER_OS_USER = "postgres"
SERVER_OS_USER_HOME = "/var/lib/postgresql"
# Enough for tests and local development; the default (128MB) is wasteful when several run at once.
SHARED_BUFFERS = "16MB"
# Say it explicitly: before PostgreSQL 14 the default was md5, and an md5-stored password cannot
# pass the scram-sha-256 check that initdb writes into pg_hba.conf for TCP.
PASSWORD_ENCRYPTION = "scram-sha-256"

PGDATA_NAME = "pgdata"
LOG_NAME = "postgres.log"
PID_FILE = "postmaster.pid"
SERVER_PROCESS_NAME = "postgres"
SOCKET_LOCK_GLOB = ".s.PGSQL.*.lock"  # one beside each unix socket, holding the postmaster's pid
# In a shadow directory: the data_dir it serves, so orphans can be recognised and collected.
OWNER_MARKER = "owner"
SHADOW_BASE_MODE = 0o711  # others (the server user) may traverse it but not list it
CLUSTER_DIR_MODE = 0o700  # PostgreSQL refuses a data directory that others can read
# sun_path holds 108 bytes with its NUL; the socket is named like ".s.PGSQL.65535".
UNIX_SOCKET_PATH_MAX = 107
LONGEST_SOCKET_NAME = ".s.PGSQL.65535"

# Lines of postmaster.pid (1-based in the docs): pid, data dir, start time, port, socket dir, listen
# address, shared memory key, status.
PID_LINE_PID = 0
PID_LINE_PORT = 3
PID_LINE_SOCKET_DIR = 4
PID_LINE_LISTEN = 5

POLL_INTERVAL = 0.05
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 30.0
# Admin commands (psql, useradd) are quick; this only bounds a hung one.
COMMAND_TIMEOUT = 30.0
LOG_TAIL_LINES = 25
# pg_isready: 0 = accepting connections, 1 = rejecting (still starting), 2 = no response.
PG_ISREADY_ACCEPTING = 0


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be found, started, administered or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LISTEN_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def find_pg_bin_dir() -> Path:
    """The bin dir of the newest PostgreSQL server installed, or ``$CONVEYOR_PG_BIN`` if it is set."""
    override = os.environ.get(PG_BIN_ENV)
    if override:
        if _has_server_binaries(Path(override)):
            return Path(override)
        raise PostgresError(f"{PG_BIN_ENV}={override} does not contain {' and '.join(SERVER_BINARIES)}")
    for bin_dir in sorted(DEBIAN_PG_ROOT.glob("*/bin"), key=_major_version, reverse=True):
        if _has_server_binaries(bin_dir):
            return bin_dir
    raise PostgresError(
        f"no PostgreSQL server ({' and '.join(SERVER_BINARIES)}) under {DEBIAN_PG_ROOT}/*/bin: run "
        f"{ENSURE_SCRIPT} as root to install Debian's postgresql package, or set {PG_BIN_ENV} to the "
        "bin directory of an installed PostgreSQL"
    )


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in SERVER_BINARIES)


def _major_version(bin_dir: Path) -> tuple[int, ...]:
    # Debian names the directory after the major version: "15", or "9.6" before PostgreSQL 10.
    try:
        return tuple(int(part) for part in bin_dir.parent.name.split("."))
    except ValueError:
        return ()


def _sql_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only quotes need doubling.
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _async_url(user: str, password: str, port: int, database: str) -> str:
    def enc(part: str) -> str:
        return quote(part, safe="")

    return f"postgresql+asyncpg://{enc(user)}:{enc(password)}@{LISTEN_HOST}:{port}/{enc(database)}"


class _Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self._end = time.monotonic() + seconds
        self._seconds = seconds
        self._what = what

    def remaining(self) -> float:
        """Seconds left; raises once there are none, so no step starts after the deadline."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise PostgresError(f"{self._what} did not finish within {self._seconds:g}s")
        return left


@dataclass(frozen=True)
class _OsUser:
    """Who initdb, pg_ctl and postgres run as, and how to run a command as them."""

    uid: int
    gid: int
    command_prefix: tuple[str, ...]

    def can_traverse(self, directory: Path) -> bool:
        if not self.command_prefix:
            return os.access(directory, os.X_OK)
        # access(2) as that user checks the execute bit of every directory on the way.
        probe = [*self.command_prefix, "test", "-x", str(directory)]
        result = subprocess.run(probe, capture_output=True, check=False, timeout=COMMAND_TIMEOUT)
        return result.returncode == 0

    def give(self, path: Path) -> None:
        if self.command_prefix:
            os.chown(path, self.uid, self.gid)


def _server_os_user() -> _OsUser:
    if os.geteuid() != 0:
        return _OsUser(os.geteuid(), os.getegid(), ())
    account = _ensure_os_account(SERVER_OS_USER)
    if shutil.which("runuser") is None:
        raise PostgresError("running as root needs runuser (util-linux) to start PostgreSQL as postgres")
    return _OsUser(account.pw_uid, account.pw_gid, ("runuser", "-u", account.pw_name, "--"))


def _ensure_os_account(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = [
        "useradd", "--system", "--user-group", "--no-create-home",
        "--home-dir", SERVER_OS_USER_HOME, "--shell", "/usr/sbin/nologin", name,
    ]  # fmt: skip
    result = subprocess.run(useradd, capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT)
    try:
        # Look again rather than trust the exit code: a concurrent run may have created it first.
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresError(f"could not create the OS user {name!r}: {result.stderr.strip()}") from None


def _command_env() -> dict[str, str]:
    # PGHOST, PGPORT, PGDATA, PGUSER... in the caller's environment must not redirect our commands.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(
    command: Sequence[str], *, cwd: Path, timeout: float, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(command), cwd=cwd, input=stdin, capture_output=True, text=True,
            env=_command_env(), timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PostgresError(f"{shlex.join(command)} did not finish within {timeout:.0f}s") from None
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).replace("\n", "\n  ")
        raise PostgresError(f"{shlex.join(command)} failed with exit code {result.returncode}:\n  {output}")
    return result


def _process_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:  # gone, a zombie, or not ours to inspect
        return None


def _is_postgres_process(pid: int) -> bool:
    # Backends are forked, never exec'd: they retitle their command line but keep the comm name.
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == SERVER_PROCESS_NAME
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if Path("/proc").is_dir():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        # A zombie has exited; in containers nobody may ever reap it. The state follows "(comm)".
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as someone else's process
    return True


class _Cluster:
    """One data directory, and the commands that act on it (all run as the server's OS user)."""

    def __init__(self, bin_dir: Path, pgdata: Path, os_user: _OsUser) -> None:
        self.bin_dir = bin_dir
        # Resolved: it is compared with the postmaster's cwd and with what postmaster.pid records.
        self.pgdata = pgdata.resolve()
        self.os_user = os_user

    @property
    def log_file(self) -> Path:
        return self.pgdata.parent / LOG_NAME

    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def run(
        self, tool: str, *args: str, timeout: float, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [*self.os_user.command_prefix, str(self.bin_dir / tool), *args]
        # The cwd must be somewhere the server user may be; the cluster dir always is.
        return _run(command, cwd=self.pgdata, timeout=timeout, stdin=stdin, check=check)

    def initdb(self, timeout: float) -> None:
        self.run(
            "initdb", "--pgdata", str(self.pgdata), "--username", SUPERUSER,
            # Passwords over TCP; the socket is only reachable by the server user (0700 data dir).
            "--auth-local=trust", f"--auth-host={PASSWORD_ENCRYPTION}",
            # Fixed rather than inherited from whatever locale the caller's shell has.
            "--encoding=UTF8", "--locale=C",
            timeout=timeout,
        )  # fmt: skip

    def pid_file_lines(self) -> list[str]:
        try:
            return (self.pgdata / PID_FILE).read_text().splitlines()
        except OSError:
            return []

    def postmaster_pid(self) -> int | None:
        """The pid of the postmaster running on this data dir, if one is."""
        lines = self.pid_file_lines()
        if not lines or not lines[PID_LINE_PID].strip().lstrip("-").isdigit():
            return None
        pid = abs(int(lines[PID_LINE_PID]))  # a standalone backend writes its pid negated
        if not _pid_alive(pid):
            return None
        if Path("/proc").is_dir():
            # The pid may have been reused by an unrelated process since a crash; the postmaster
            # chdirs into its data dir, so its cwd tells it apart.
            return pid if _process_cwd(pid) == self.pgdata else None
        return pid

    def processes(self) -> set[int]:
        """Live server processes of this data dir (the postmaster and its children chdir into it)."""
        proc = Path("/proc")
        if not proc.is_dir():
            return set()
        pids = (int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
        return {pid for pid in pids if _process_cwd(pid) == self.pgdata and _is_postgres_process(pid)}

    def wait_for_orphans(self, deadline: _Deadline) -> None:
        # Children of a postmaster that was killed exit as soon as they notice; until then they still
        # hold its shared memory, and a new postmaster would refuse to start.
        while self.processes():
            deadline.remaining()
            time.sleep(POLL_INTERVAL)

    def remove_stale_lock_files(self) -> None:
        """Delete the lock files of a postmaster that is gone (call only once sure of that).

        The server refuses to start while a lock file names a pid that can still be signalled: after a
        crash that pid may belong to another process by now, or be a zombie that nobody reaps (PID 1
        in a container often does not), which signals just like a live process.
        """
        (self.pgdata / PID_FILE).unlink(missing_ok=True)
        for socket_lock in self.pgdata.glob(SOCKET_LOCK_GLOB):
            socket_lock.unlink(missing_ok=True)

    def running_config(self) -> tuple[str, str, str] | None:
        lines = self.pid_file_lines()
        if len(lines) <= PID_LINE_LISTEN:
            return None
        fields = [line.strip() for line in lines]
        return fields[PID_LINE_PORT], fields[PID_LINE_SOCKET_DIR], fields[PID_LINE_LISTEN]

    def start(self, port: int, deadline: _Deadline) -> None:
        options = {
            "listen_addresses": LISTEN_HOST,
            "port": str(port),
            "unix_socket_directories": str(self.pgdata),
            "shared_buffers": SHARED_BUFFERS,
            "password_encryption": PASSWORD_ENCRYPTION,
        }
        # pg_ctl hands --options to a shell, hence the quoting.
        server_args = shlex.join(arg for name, value in options.items() for arg in ("-c", f"{name}={value}"))
        result = self.run(
            "pg_ctl", "start", "--pgdata", str(self.pgdata), "--log", str(self.log_file),
            "--options", server_args, "--wait", "--timeout", str(math.ceil(deadline.remaining())),
            timeout=deadline.remaining() + 1, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(
                f"PostgreSQL on port {port} did not start: {result.stdout.strip()} {result.stderr.strip()}\n"
                f"last lines of {self.log_file}:\n{self.log_tail()}"
            )

    def wait_until_accepting(self, port: int, deadline: _Deadline) -> None:
        # pg_ctl --wait already waited for the "ready" status; this is the same question asked the way
        # clients will: over TCP on the port.
        while True:
            probe = self.run(
                "pg_isready", "--quiet", "--host", LISTEN_HOST, "--port", str(port),
                "--dbname", ADMIN_DATABASE, "--timeout", "1",
                timeout=max(deadline.remaining(), 1.0), check=False,
            )  # fmt: skip
            if probe.returncode == PG_ISREADY_ACCEPTING:
                return
            if self.postmaster_pid() is None:
                # Fail now, not at the deadline: a dead server will not start accepting.
                raise PostgresError(
                    f"PostgreSQL on {self.pgdata} exited before accepting connections on port {port}\n"
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            deadline.remaining()
            time.sleep(POLL_INTERVAL)

    def psql(self, sql: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """Run a script as the superuser, through the unix socket; stops at the first error."""
        config = self.running_config()
        if config is None or self.postmaster_pid() is None:
            raise PostgresError(f"no PostgreSQL is running on {self.pgdata}: call start() first")
        port, _, _ = config
        self.run(
            "psql", "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1", "--host", str(self.pgdata),
            "--port", port, "--username", SUPERUSER, "--dbname", ADMIN_DATABASE, "--file", "-",
            timeout=timeout, stdin=sql,
        )  # fmt: skip

    def stop(self, timeout: float) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        deadline = _Deadline(timeout, f"stopping PostgreSQL on {self.pgdata}")
        # "fast" rolls back open transactions and disconnects clients; "immediate" (no shutdown
        # checkpoint, crash recovery on the next start) is the fallback if that hangs.
        for mode in ("fast", "immediate"):
            result = self.run(
                "pg_ctl", "stop", "--pgdata", str(self.pgdata), "--mode", mode, "--wait",
                "--timeout", str(math.ceil(deadline.remaining() / 2)),
                timeout=deadline.remaining(), check=False,
            )  # fmt: skip
            if result.returncode == 0:
                break
        else:
            raise PostgresError(
                f"could not stop PostgreSQL on {self.pgdata} (pid {pid}): {result.stderr.strip()}\n"
                f"last lines of {self.log_file}:\n{self.log_tail()}"
            )
        # pg_ctl returns once postmaster.pid is gone (the postmaster removes it after its children
        # have exited); the postmaster itself is then a moment from gone.
        while _pid_alive(pid):
            deadline.remaining()
            time.sleep(POLL_INTERVAL)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        except OSError as exc:
            return f"(no log: {exc})"


def _shadow_base() -> Path:
    base = Path(tempfile.gettempdir()) / f"conveyor-postgres-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=SHADOW_BASE_MODE)
    info = base.lstat()
    # /tmp is shared: refuse a base that someone else planted (or a symlink to elsewhere).
    if base.is_symlink() or not base.is_dir() or info.st_uid != os.geteuid():
        raise PostgresError(f"{base} is not a directory owned by uid {os.geteuid()}; remove it")
    base.chmod(SHADOW_BASE_MODE)
    return base


def _collect_orphan_shadows(base: Path, bin_dir: Path, os_user: _OsUser) -> None:
    """Stop and delete shadow clusters whose data_dir no longer links to them."""
    for shadow in base.iterdir():
        try:
            owner = Path((shadow / OWNER_MARKER).read_text().strip())
        except OSError:
            continue  # being created right now (the marker comes last), or not ours
        link = owner / PGDATA_NAME
        if link.is_symlink() and link.resolve() == (shadow / PGDATA_NAME).resolve():
            continue
        try:
            _Cluster(bin_dir, shadow / PGDATA_NAME, os_user).stop(DEFAULT_STOP_TIMEOUT)
        except PostgresError:
            continue  # leave it for a later run rather than delete a live cluster's files
        shutil.rmtree(shadow, ignore_errors=True)


class PostgresServer:
    """A PostgreSQL cluster in ``data_dir`` serving ``database`` to ``user`` on 127.0.0.1:``port``.

    ``start()`` creates the cluster on first use and reuses it afterwards; the server runs in the
    background, independently of this object, until ``stop()``. Use it as a context manager to stop it
    on the way out.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        database: str = "conveyor",
        user: str = "conveyor",
        password: str = "conveyor",
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.database = database
        self.user = user
        self.password = password
        self._cluster_cache: _Cluster | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of ``database``."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy async URL of another database on this server, as ``user``."""
        return _async_url(self.user, self.password, self.port, database)

    @property
    def pgdata(self) -> Path:
        """The cluster's real data directory (``data_dir/pgdata``, or the shadow it links to)."""
        return (self.data_dir / PGDATA_NAME).resolve()

    @property
    def log_file(self) -> Path:
        return self.pgdata.parent / LOG_NAME

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Create the cluster if needed, start it (or reuse it if already running), wait until it accepts
        connections, and make sure ``user`` and ``database`` exist."""
        deadline = _Deadline(timeout, f"starting PostgreSQL in {self.data_dir}")
        cluster = self._cluster()
        if not cluster.is_initialized():
            cluster.initdb(deadline.remaining())
        if not self._reuse_running(cluster, deadline):
            cluster.start(self.port, deadline)
        cluster.wait_until_accepting(self.port, deadline)
        cluster.psql(self._ensure_role_and_database_sql(), timeout=deadline.remaining())

    def create_database(self, name: str) -> str:
        """Create another database owned by ``user`` (e.g. one per test) and return its async URL."""
        cluster = self._existing_cluster()
        if cluster is None:
            raise PostgresError(f"no PostgreSQL cluster in {self.data_dir}: call start() first")
        cluster.psql(f"CREATE DATABASE {_sql_identifier(name)} OWNER {_sql_identifier(self.user)};")
        return self.url_for(name)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the server running on ``data_dir``, if any (even one started by another process)."""
        cluster = self._existing_cluster()
        if cluster is not None:
            cluster.stop(timeout)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # __exit__ will not run: do not leave a half-started server behind.
            with contextlib.suppress(PostgresError):
                self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresServer(data_dir={str(self.data_dir)!r}, port={self.port})"

    def _existing_cluster(self) -> _Cluster | None:
        """The cluster in data_dir, if one was made there (by this object or another)."""
        link = self.data_dir / PGDATA_NAME
        if link.is_symlink() and not link.exists():
            # Its shadow is gone (a reboot cleared /tmp) and the data went with it: begin afresh.
            link.unlink()
            self._cluster_cache = None
        if self._cluster_cache is None and link.exists():
            self._cluster_cache = _Cluster(find_pg_bin_dir(), link, _server_os_user())
        return self._cluster_cache

    def _cluster(self) -> _Cluster:
        """The cluster in data_dir, making its (still empty) directory first if there is none."""
        existing = self._existing_cluster()
        if existing is not None:
            return existing
        bin_dir, os_user = find_pg_bin_dir(), _server_os_user()
        self._cluster_cache = _Cluster(bin_dir, self._make_cluster_dir(bin_dir, os_user), os_user)
        return self._cluster_cache

    def _make_cluster_dir(self, bin_dir: Path, os_user: _OsUser) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        link = self.data_dir / PGDATA_NAME
        if self._fits_in_place(link, os_user):
            home = self.data_dir
        else:
            base = _shadow_base()
            _collect_orphan_shadows(base, bin_dir, os_user)
            home = Path(tempfile.mkdtemp(prefix="", dir=base))
            os_user.give(home)
        pgdata = home / PGDATA_NAME
        pgdata.mkdir(mode=CLUSTER_DIR_MODE)
        os_user.give(pgdata)
        # pg_ctl's shell opens the log as the server user, who may not write to data_dir itself.
        (home / LOG_NAME).touch()
        os_user.give(home / LOG_NAME)
        if home != self.data_dir:
            link.symlink_to(pgdata, target_is_directory=True)
            # Written last: a shadow without its marker is never collected, so no half-made one is.
            (home / OWNER_MARKER).write_text(f"{self.data_dir}\n")
        return pgdata

    @staticmethod
    def _fits_in_place(pgdata: Path, os_user: _OsUser) -> bool:
        socket_path = pgdata / LONGEST_SOCKET_NAME
        return len(os.fsencode(socket_path)) <= UNIX_SOCKET_PATH_MAX and os_user.can_traverse(pgdata.parent)

    def _reuse_running(self, cluster: _Cluster, deadline: _Deadline) -> bool:
        """Whether a server is already running on this cluster as we would start it (e.g. left behind
        by a crashed run); one running with other settings is stopped so that we can start ours."""
        if cluster.postmaster_pid() is None:
            cluster.wait_for_orphans(deadline)
            cluster.remove_stale_lock_files()
            return False
        if cluster.running_config() == (str(self.port), str(cluster.pgdata), LISTEN_HOST):
            return True
        cluster.stop(deadline.remaining())
        return False

    def _ensure_role_and_database_sql(self) -> str:
        user, database = _sql_literal(self.user), _sql_literal(self.database)
        # \gexec runs each row as a statement: CREATE ... only when missing (CREATE DATABASE cannot
        # run inside a DO block). The password is (re)set every time so that `url` always works.
        return (
            f"SELECT format('CREATE ROLE %I', {user}) "
            f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user})\\gexec\n"
            f"ALTER ROLE {_sql_identifier(self.user)} WITH LOGIN CREATEDB "
            f"PASSWORD {_sql_literal(self.password)};\n"
            f"SELECT format('CREATE DATABASE %I OWNER %I', {database}, {user}) "
            f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {database})\\gexec\n"
        )
