"""A throwaway PostgreSQL cluster for the tests (DESIGN.md §7): `initdb` + `pg_ctl` on a free loopback
port under a temp dir, started once per session and stopped (and deleted) at its end.

Where the binaries are: `$FARAMESH_PG_BINDIR`, else the directory of an `initdb` on PATH (this machine:
/usr/local/bin, symlinks into the Debian package), else the newest /usr/lib/postgresql/<v>/bin (what the
Debian `postgresql` package installs on a fresh Debian 12). None found: the tests skip, or fail under
CI=true (DESIGN.md §7: a missing dependency fails CI).

`initdb` and `postgres` refuse to run as root. As root, the cluster runs as a dedicated system user
(`faramesh-pgtest`, created idempotently with `useradd --system`) through `setpriv`, in a temp dir that
user owns. Unprivileged, it runs as the invoking user.

The superuser has a random password and TCP connections use scram-sha-256 (only the cluster's own
Unix socket, in its private temp dir, is `trust`), so the URLs the tests hand to the store carry a real
credential, as a production `postgres_url` does.

Use from a test module: `pytest_plugins = ["pg_cluster"]`, then ask for the `pg_cluster` (session) and
`pg_schema` (per test) fixtures. Registered as a plugin, the session fixture is one for every module.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

TEST_USER = "faramesh-pgtest"
ADMIN = "faramesh_admin"
DATABASE = "faramesh_test"
BINDIR_ENV = "FARAMESH_PG_BINDIR"
_SEARCH = (Path("/usr/local/bin"), Path("/usr/bin"))


def _missing(reason: str) -> None:
    """Skip locally; under CI=true a missing dependency is a failure (DESIGN.md §7)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need {reason}")


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres."""
    wanted = ("initdb", "pg_ctl", "postgres")
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates.extend(_SEARCH)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted((p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates.extend(v / "bin" for v in versions)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in wanted):
            return directory
    return None


def ensure_test_user() -> tuple[int, int]:
    """The (uid, gid) of the cluster's owner; as root, the dedicated system user (created once)."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        done = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", TEST_USER],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode not in (0, 9):  # 9: created meanwhile by a concurrent run
            pytest.fail(f"useradd {TEST_USER} failed: {done.stderr.strip()}", pytrace=False)
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    uid: int
    gid: int
    password: str
    port: int = 0
    running: bool = False
    _admin: Any = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def url(self, dbname: str = DATABASE, *, user: str = ADMIN, password: str | None = None) -> str:
        """A TCP URL with credentials, as `runtime { postgres_url = env(…) }` would give."""
        secret = self.password if password is None else password
        return f"postgresql://{quote(user, safe='')}:{quote(secret, safe='')}@127.0.0.1:{self.port}/{dbname}"

    # ---- processes
    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        prefix: list[str] = []
        if os.geteuid() == 0:
            prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip

    def initdb(self) -> None:
        pwfile = self.root / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        os.chown(pwfile, self.uid, self.gid)
        try:
            done = self._run([
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", ADMIN, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
            ])  # fmt: skip
        finally:
            pwfile.unlink()
        if done.returncode != 0:
            pytest.fail(f"initdb failed:\n{done.stdout}\n{done.stderr}", pytrace=False)

    def start(self) -> None:
        """Start on the same port as before (a restart), or on a fresh free port the first time."""
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            port = self.port or free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={self.socket_dir} "
                "-c max_connections=60 -c shared_buffers=16MB -c fsync=on -c log_min_messages=warning"
            )
            done = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile),
                              "-o", options, "-w", "-t", "60", "start"])  # fmt: skip
            if done.returncode == 0:
                self.port = port
                self.running = True
                return
        log = self.logfile.read_text(errors="replace")[-4000:] if self.logfile.exists() else ""
        pytest.fail(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log}", pytrace=False)

    def stop(self, mode: str = "fast") -> None:
        self.close_admin()
        if not self.running:
            return
        done = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])
        if done.returncode != 0:
            self._kill_postmaster()
        self.running = False

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)

    # ---- an administrative session (autocommit), for set-up and for acting behind a store's back
    def admin(self) -> Any:
        import psycopg

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.url(), autocommit=True, connect_timeout=10)
        return self._admin

    def close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def destroy(self) -> None:
        self.stop("fast")  # waits for every backend to exit: no orphan left for init to reap
        shutil.rmtree(self.root, ignore_errors=True)


def _start_cluster() -> PgCluster:
    try:
        import psycopg
    except ImportError:
        _missing("psycopg (pip install 'psycopg[binary]', the `providers` extra)")
    bindir = find_bindir()
    if bindir is None:
        _missing(f"initdb/pg_ctl/postgres (Debian package `postgresql`, or set {BINDIR_ENV})")
        raise AssertionError("unreachable")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        _missing("setpriv (util-linux) to run the cluster as an unprivileged user")
    uid, gid = ensure_test_user()
    root = Path(tempfile.mkdtemp(prefix="fmpg", dir="/tmp"))
    os.chmod(root, 0o711)  # the test user owns everything inside; root keeps the directory entry itself
    cluster = PgCluster(bindir, root, uid, gid, password=secrets.token_urlsafe(18))
    try:
        cluster.socket_dir.mkdir(mode=0o700)
        os.chown(cluster.socket_dir, uid, gid)
        if os.geteuid() == 0:
            os.chown(root, uid, gid)
        cluster.initdb()
        cluster.start()
        import psycopg

        with psycopg.connect(cluster.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's cluster. A test that stops it must start it again (`cluster.start()`)."""
    cluster = _start_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_schema(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh schema name for one test (the store creates it); dropped afterwards."""
    name = f"t_{secrets.token_hex(6)}"
    yield name
    if not pg_cluster.running:
        pg_cluster.start()
    with contextlib.suppress(Exception):
        pg_cluster.admin().execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
