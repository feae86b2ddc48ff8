"""Find or start the real Redis and PostgreSQL servers that tests need.

The backends are tested against real servers, not fakes, so every test run needs one. Each
helper follows the same order: an explicit URL from the environment, else the server on its
usual local port, else a throwaway server started from the binaries on ``PATH`` in a temporary
directory on a free port. Only when none of that works does a helper raise
:class:`ServiceUnavailable`, whose ``reason`` a test fixture can print when it skips.

Nothing here imports pytest, so the helpers also serve scripts and other test runners. Every
process is started by a context manager that stops it and removes its files on the way out,
including when the body raises.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServiceUnavailable",
    "find_free_port",
    "postgres_url_for_tests",
    "redis_cluster",
    "redis_url_for_tests",
    "throwaway_postgres",
    "throwaway_redis",
]

LOCALHOST = "127.0.0.1"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL_ENV = "REDIS_URL"
POSTGRES_URL_ENV = "TENANTWARE_TEST_POSTGRES_URL"

# Where distributions put PostgreSQL when its binaries are not on PATH (Debian, RHEL, source).
_POSTGRES_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
# Redis Cluster talks to peers on port + 10000; both ports must be free, so draw below the
# usual ephemeral range (32768+) where free pairs are plentiful.
_CLUSTER_PORT_RANGE = (20000, 30000)
_CLUSTER_SLOTS = 16384
_START_ATTEMPTS = 3


class ServiceUnavailable(RuntimeError):
    """No server could be found or started; ``reason`` says what was tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StartFailed(ServiceUnavailable):
    """A server process exited or never answered; the caller may retry on another port."""


def find_free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that nothing is bound to on ``host`` right now.

    The kernel picks it, so two callers never race for the same number; another process may
    still take it before it is used, which is why the starters retry on a fresh port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    """Bind without SO_REUSEADDR so that a lingering socket also counts as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Send a raw RESP PING; a server that wants AUTH answers an error and is not usable."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _redis_server_pid(host: str, port: int, timeout: float = 0.2) -> int | None:
    """The ``process_id`` of the Redis answering on ``host:port``, or None if none answers.

    Readiness checks compare it with the child's pid: a bare PING would also be answered by
    some other server that grabbed the port while ours failed to bind.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while not (b"\r\n" in data and len(data) >= _bulk_end(data)):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except (OSError, ValueError):
        return None
    match = re.search(rb"\r\nprocess_id:(\d+)", data)
    return int(match[1]) if match else None


def _bulk_end(data: bytes) -> int:
    """Total length of a RESP bulk string reply whose header is in ``data``."""
    header, _, _ = data.partition(b"\r\n")
    if not header.startswith(b"$"):
        raise ValueError(f"not a bulk reply: {header[:80]!r}")
    return len(header) + 2 + int(header[1:]) + 2


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Ask ``proc`` to exit with ``sig``, then SIGKILL; always reap it (no zombie, no warning)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process cannot handle sig
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _spawn(
    argv: Sequence[str], log: Path, *, cwd: Path, user: pwd.struct_passwd | None = None
) -> subprocess.Popen[bytes]:
    """Start a server with its output appended to ``log`` (read back when it fails)."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the server
            **kwargs,
        )


# --------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """One ``redis-server`` process on a fixed loopback port that can be stopped and restarted.

    Tests stop it mid-test to prove fail-open / fail-closed behaviour and start it again on the
    same port (so clients keep their URL) to prove recovery; ``pause`` freezes it so that
    clients see timeouts instead of refused connections. No persistence: a restart is empty.
    """

    def __init__(
        self,
        executable: str,
        port: int,
        workdir: Path,
        *,
        host: str = LOCALHOST,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.executable = executable
        self.host = host
        self.port = port
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (no-op if running) and return once it answers PING."""
        if self.running:
            return
        self.stop()  # reap a process that died on its own
        argv = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            *self._extra_args,
        ]  # fmt: skip
        proc = _spawn(argv, self.log_path, cwd=self.workdir)
        self._proc = proc
        deadline = time.monotonic() + timeout
        while _redis_server_pid(self.host, self.port) != proc.pid:
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise _StartFailed(
                    f"redis-server on port {self.port} did not start: {_log_tail(self.log_path)}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL) and wait for it; idempotent.

        When this returns the listening socket is closed, so new connections are refused.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), like a crash."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGKILL, 5.0)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connects still succeed, but nothing is answered."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGCONT)

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, running={self.running})"


def _redis_executable() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceUnavailable("redis-server is not on PATH")
    return exe


def _start_on_free_port(server: RedisServer | PostgresServer, *, fixed: bool) -> None:
    """Start ``server``; unless its port was asked for, retry on another free port when the
    one picked was taken meanwhile (another process may grab it between pick and bind)."""
    attempts = 1 if fixed else _START_ATTEMPTS
    for attempt in range(attempts):
        if attempt:
            server.port = find_free_port()
        try:
            server.start()
            return
        except _StartFailed as exc:
            if attempt == attempts - 1:
                raise ServiceUnavailable(str(exc)) from exc


@contextlib.contextmanager
def throwaway_redis(
    port: int | None = None, *, extra_args: Sequence[str] = ()
) -> Iterator[RedisServer]:
    """Run a private ``redis-server`` on ``port`` (a free one by default) in a temp dir.

    Raises :class:`ServiceUnavailable` if ``redis-server`` is missing or will not start.
    """
    exe = _redis_executable()
    with tempfile.TemporaryDirectory(prefix="tenantware-redis-") as tmp:
        server = RedisServer(exe, port or find_free_port(), Path(tmp), extra_args=extra_args)
        try:
            _start_on_free_port(server, fixed=port is not None)
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def redis_url_for_tests(
    *, env_var: str = REDIS_URL_ENV, local_url: str = LOCAL_REDIS_URL
) -> Iterator[str]:
    """Yield a Redis URL: ``$REDIS_URL``, else the local server, else a throwaway one.

    An explicit ``$REDIS_URL`` is used as given, unchecked: if it is wrong the tests should
    fail loudly, not skip. The local server must answer PING within half a second.
    """
    explicit = os.environ.get(env_var)
    if explicit:
        yield explicit
        return
    host, port = _host_port(local_url, default_port=6379)
    if _redis_ping(host, port):
        yield local_url
        return
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_redis())
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(
                f"${env_var} is not set, nothing answers PING at {host}:{port}, "
                f"and no throwaway server: {exc.reason}"
            ) from exc
        yield server.url


def _host_port(url: str, *, default_port: int) -> tuple[str, int]:
    match = re.match(r"^[a-z]+://(?:[^@/]*@)?([^:/?]+)(?::(\d+))?", url)
    if match is None:
        raise ValueError(f"cannot read host and port from {url!r}")
    return match[1], int(match[2] or default_port)


def _cluster_port(host: str) -> int:
    rng = random.SystemRandom()  # immune to tests seeding the global random module
    for _ in range(500):
        port = rng.randrange(*_CLUSTER_PORT_RANGE)
        if _port_is_free(host, port) and _port_is_free(host, port + 10000):
            return port
    raise ServiceUnavailable("no free port pair (port, port + 10000) for a Redis Cluster node")


def _start_cluster_node(exe: str, root: Path, host: str) -> RedisServer:
    for attempt in range(_START_ATTEMPTS):
        port = _cluster_port(host)
        workdir = root / str(port)
        workdir.mkdir()
        node = RedisServer(
            exe,
            port,
            workdir,
            host=host,
            extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
            ],
        )  # fmt: skip
        try:
            node.start()
            return node
        except _StartFailed as exc:
            if attempt == _START_ATTEMPTS - 1:
                raise ServiceUnavailable(str(exc)) from exc
    raise AssertionError("unreachable")


def _form_cluster(nodes: Sequence[RedisServer], timeout: float) -> None:
    """Split the slots evenly, introduce the nodes and wait until every node reports ok.

    Done with plain commands instead of ``redis-cli --cluster create``, which sleeps a second
    per step and is not always installed next to the server.
    """
    import redis  # the package depends on it; imported here to keep module import cheap

    # execute_command is untyped in redis-py, hence Any.
    clients: list[Any] = [redis.Redis(host=n.host, port=n.port, socket_timeout=5.0) for n in nodes]
    try:
        per_node, extra = divmod(_CLUSTER_SLOTS, len(nodes))
        first = 0
        for index, client in enumerate(clients):
            count = per_node + (1 if index < extra else 0)
            client.execute_command("CLUSTER", "ADDSLOTS", *range(first, first + count))
            # Distinct epochs up front so the nodes need no collision round to agree.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            first += count
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", node.host, node.port)
        deadline = time.monotonic() + timeout
        while True:
            infos = [_cluster_info(client) for client in clients]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_known_nodes") == str(len(nodes))
                and info.get("cluster_slots_ok") == str(_CLUSTER_SLOTS)
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"Redis Cluster did not converge: {infos}")
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()


def _cluster_info(client: Any) -> dict[str, str]:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@contextlib.contextmanager
def redis_cluster(masters: int = 3, *, timeout: float = 20.0) -> Iterator[list[str]]:
    """Run a Redis Cluster of ``masters`` loopback nodes (no replicas); yield their URLs.

    Raises :class:`ServiceUnavailable` if ``redis-server`` is missing or the cluster does not
    reach ``cluster_state:ok`` within ``timeout`` seconds.
    """
    if masters < 1:
        raise ValueError("a cluster needs at least one master")
    exe = _redis_executable()
    with tempfile.TemporaryDirectory(prefix="tenantware-cluster-") as tmp:
        nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                nodes.append(_start_cluster_node(exe, Path(tmp), LOCALHOST))
            _form_cluster(nodes, timeout)
            yield [node.url for node in nodes]
        finally:
            for node in nodes:
                node.stop()


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_bindir() -> Path:
    """Find a directory holding both ``initdb`` and ``postgres``: PATH first, newest second."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if (bindir / "postgres").exists():
            return bindir
    candidates = [Path(p) for pattern in _POSTGRES_BIN_GLOBS for p in glob.glob(pattern)]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", str(path)))

    for bindir in sorted(candidates, key=version, reverse=True):
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise ServiceUnavailable("initdb/postgres not on PATH nor in " + ", ".join(_POSTGRES_BIN_GLOBS))


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as; None when we are not root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceUnavailable("running as root and neither user 'postgres' nor 'nobody' exists")


def _temp_parent(user: pwd.struct_passwd | None) -> str | None:
    """A temp parent the server's user can traverse (root's TMPDIR may be private)."""
    parent = tempfile.gettempdir()
    if user is not None and not os.stat(parent).st_mode & 0o001:
        return "/tmp"
    return parent


def _pg_ready(url: str) -> bool:
    return _pg_data_directory(url) is not None


def _pg_data_directory(url: str) -> str | None:
    """The data directory of the server at ``url``, or None if it does not answer a query.

    Readiness checks compare it with ours, in case another server took the port.
    """
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return None
    return str(row[0]) if row else None


class PostgresServer:
    """One throwaway PostgreSQL cluster (fsync off, trust auth, user ``postgres``).

    Like :class:`RedisServer` it can be stopped and started again on the same port; the data
    survives a restart. The unix socket lives in the temp dir, never in /var/run.
    """

    def __init__(self, bindir: Path, port: int, root: Path, user: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.host = LOCALHOST
        self.port = port
        self.root = root
        self.datadir = root / "data"
        self.log_path = root / "postgres.log"
        self._user = user
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def initdb(self) -> None:
        """Create the data directory; separate from start so a restart keeps the data."""
        argv = [
            str(self.bindir / "initdb"),
            "--pgdata", str(self.datadir),
            "--username", "postgres",
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ]  # fmt: skip
        proc = _spawn(argv, self.log_path, cwd=self.root, user=self._user)
        if proc.wait(120) != 0:
            raise ServiceUnavailable(f"initdb failed: {_log_tail(self.log_path)}")

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (no-op if running) and return once it answers a query."""
        if self.running:
            return
        self.stop()
        argv = [
            str(self.bindir / "postgres"),
            "-D", str(self.datadir),
            "-p", str(self.port),
            "-k", str(self.root),
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip
        proc = _spawn(argv, self.log_path, cwd=self.root, user=self._user)
        self._proc = proc
        deadline = time.monotonic() + timeout
        ours = os.path.realpath(self.datadir)
        while os.path.realpath(_pg_data_directory(self.url) or "/nonexistent") != ours:
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise _StartFailed(
                    f"postgres on port {self.port} did not start: {_log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: roll back sessions, exit), then SIGKILL; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGINT, timeout)

    def __repr__(self) -> str:
        return f"PostgresServer(url={self.url!r}, running={self.running})"


@contextlib.contextmanager
def throwaway_postgres(port: int | None = None) -> Iterator[PostgresServer]:
    """Run a private PostgreSQL cluster in a temp dir on ``port`` (a free one by default).

    As root the server runs as user ``postgres`` (else ``nobody``) because PostgreSQL refuses
    to run as root. Raises :class:`ServiceUnavailable` if that cannot be done here.
    """
    bindir = _postgres_bindir()
    user = _unprivileged_user()
    with tempfile.TemporaryDirectory(prefix="tenantware-pg-", dir=_temp_parent(user)) as tmp:
        root = Path(tmp)
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        server = PostgresServer(bindir, port or find_free_port(), root, user)
        try:
            server.initdb()
            _start_on_free_port(server, fixed=port is not None)
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def postgres_url_for_tests(
    *, env_var: str = POSTGRES_URL_ENV, local_url: str = LOCAL_POSTGRES_URL
) -> Iterator[str]:
    """Yield a PostgreSQL URL: the env var, else the local ``test`` database, else a throwaway.

    An explicit URL is used as given, unchecked, so that a wrong one fails loudly.
    """
    explicit = os.environ.get(env_var)
    if explicit:
        yield explicit
        return
    if _pg_ready(local_url):
        yield local_url
        return
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_postgres())
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(
                f"${env_var} is not set, {local_url} does not answer, "
                f"and no throwaway server: {exc.reason}"
            ) from exc
        yield server.url
