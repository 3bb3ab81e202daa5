"""The engine's host identity and the directories it owns (DESIGN.md §2), prepared by root.

A root-applied stack's engine runs as the `faramesh` system user, never as root: it parses every
byte an agent sends, so a bug there must not be a root compromise. Root (`apply`, or the supervisor
restarting the engine) does the privileged part and then starts the engine already switched:

1. `ensure_service_user`: the `faramesh` user and the `faramesh-operators` group (members may use
   operator.sock), created with the distribution's tools when missing.
2. `prepare_engine_dirs`: the state dir root:faramesh 01770 and the runtime dir and `agents/`
   root:faramesh 01771 — sticky, so the engine creates its own files (keys, WAL, sockets) but cannot
   replace or rename root's (agent specs, the supervisor's lock, state and control socket, the policy
   copy the supervisor plans from): a compromised engine cannot hand the root supervisor a spec.
   Agents need search permission on the runtime dirs to bind-mount their own socket dir (they open
   it as their own uid inside their user namespace); nothing is listable. Each agent's socket dir is
   faramesh:<agent gid> 0750, so only that agent (and root) reaches the socket the engine knows it by:
   a local user who guesses the name gets EACCES. A custom `wal_dir` is faramesh 0700.
3. `engine_environment`: the environment the engine starts with — a fixed base, the operator's
   FARAMESH_*_DIR relocations, and the secret references from the root-only environment file that
   `apply` wrote (secrets never travel in argv, and the engine does not inherit root's environment).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faramesh.engine.paths import OPERATORS_GROUP, SERVICE_USER, StackPaths, agent_dir_name


class ServiceUserError(Exception):
    code = "SERVICE_USER_UNAVAILABLE"


@dataclass(frozen=True)
class ServiceUser:
    uid: int
    gid: int
    operators_gid: int


def lookup_service_user() -> ServiceUser | None:
    try:
        pw = pwd.getpwnam(SERVICE_USER)
        operators = grp.getgrnam(OPERATORS_GROUP).gr_gid
    except KeyError:
        return None
    return ServiceUser(pw.pw_uid, pw.pw_gid, operators)


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0], path="/usr/sbin:/sbin:/usr/bin:/bin")
    if tool is None:
        raise ServiceUserError(f"cannot create the {SERVICE_USER} account: {argv[0]} is not installed")
    proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ServiceUserError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")


def ensure_service_user() -> ServiceUser:
    """The `faramesh` user (system, no login, no home of its own) and the operators group, created when
    missing (root only). The engine's user is a member of the operators group so it can give
    operator.sock that group."""
    try:
        grp.getgrnam(OPERATORS_GROUP)
    except KeyError:
        _run(["groupadd", "--system", OPERATORS_GROUP])
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", "/usr/sbin/nologin", "--comment", "Faramesh engine", SERVICE_USER])
    members = grp.getgrnam(OPERATORS_GROUP).gr_mem
    if SERVICE_USER not in members:
        _run(["usermod", "--append", "--groups", OPERATORS_GROUP, SERVICE_USER])
    user = lookup_service_user()
    if user is None or user.uid == 0:
        raise ServiceUserError(f"the {SERVICE_USER} account is missing or is uid 0")
    return user


def _own_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    """mkdir (parents 0755) and set owner and mode on a real directory, through an O_NOFOLLOW descriptor:
    a link planted (or swapped in) where the directory belongs is refused, never followed."""
    path.mkdir(parents=True, exist_ok=True, mode=mode & 0o777)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ServiceUserError(f"{path} is not a directory (or is a link): {exc.strerror}") from None
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _searchable(path: Path) -> None:
    """The engine must reach its dirs: a root-owned parent `apply` made gets search permission for
    others (0711: nothing listable). A parent someone else owns is left alone."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and (st.st_mode & 0o011) != 0o011:
            os.chmod(path, (st.st_mode & 0o7777) | 0o111)


def _own_tree(path: Path, uid: int, gid: int) -> None:
    """Hand the engine what a previous (perhaps root) engine left. os.fwalk works on directory fds and
    skips a directory swapped for a link between listing and opening it, so a tree the engine's user
    can rearrange while root walks it never leads root's chown outside it."""
    st = os.lstat(path)
    os.chown(path, uid, gid, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return
    for _root, dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


# Entries of the state and runtime dirs that stay root's: what the supervisor reads and acts on as root
# (agent specs, its lock and state, the compiled policy it plans agents from). The dirs are root-owned
# and sticky with group faramesh, so the engine creates its own files there but can neither replace
# nor rename these — a compromised engine must not be able to feed the root supervisor a spec.
ROOT_STATE = frozenset({"agents", "supervisor.lock", "policy.json"})
ROOT_RUNTIME = frozenset({"supervisor.sock", "supervisor.json", "supervisor.pid", "agents"})
STICKY_GROUP_DIR = 0o1770  # root:faramesh: the engine writes its own entries, root's stay root's
STICKY_TRAVERSABLE_DIR = 0o1771  # the same, plus search (no listing) for agents binding their socket dir


def _share_policy_copy(path: Path, gid: int) -> None:
    """root:faramesh 0640 on the policy copy `apply` wrote — only on that file: a root-owned regular file
    with one link (a link or a hard link the engine's user planted in its place is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return
    try:
        st = os.fstat(fd)
        if st.st_uid == 0 and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o640)  # the engine reads it; only `apply` (root) writes it
    finally:
        os.close(fd)


def prepare_engine_dirs(
    paths: StackPaths, user: ServiceUser, agent_gids: Mapping[str, int], wal_dir: str | None = None
) -> None:
    """Owners and modes for an engine that runs as `user` (root, before it starts; no engine runs)."""
    _searchable(paths.state_dir.parent)
    _searchable(paths.runtime_dir.parent)
    _own_dir(paths.state_dir, 0, user.gid, STICKY_GROUP_DIR)
    for entry in os.listdir(paths.state_dir):
        if entry not in ROOT_STATE:  # keys, WAL, approvals a previous (perhaps root) engine left
            _own_tree(paths.state_dir / entry, user.uid, user.gid)
    _share_policy_copy(paths.policy_copy, user.gid)
    if wal_dir:
        _own_dir(Path(wal_dir), user.uid, user.gid, 0o700)
        for wal_file in Path(wal_dir).glob(f"{paths.stack_id}.sqlite*"):
            os.chown(wal_file, user.uid, user.gid, follow_symlinks=False)
    _own_dir(paths.runtime_dir, 0, user.gid, STICKY_TRAVERSABLE_DIR)
    agents = paths.runtime_dir / "agents"
    _own_dir(agents, 0, user.gid, STICKY_TRAVERSABLE_DIR)
    # Sockets a previous engine left are root's or faramesh's: gone before the engine binds anew.
    for sock in (paths.runtime_dir / "operator.sock", paths.runtime_dir / "egress.sock"):
        if sock.is_socket():
            sock.unlink()
    for sub in agents.iterdir():  # each agent dir is the engine's: remove through an O_NOFOLLOW dir fd
        with contextlib.suppress(OSError):
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if stat.S_ISSOCK(os.lstat("agent.sock", dir_fd=dfd).st_mode):
                    os.unlink("agent.sock", dir_fd=dfd)
            finally:
                os.close(dfd)
    for agent_id, gid in agent_gids.items():
        _own_dir(agents / agent_dir_name(agent_id), user.uid, gid, 0o750)


# Variables the engine gets from its starter, besides the environment file: nothing of root's own.
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_RELOCATIONS = ("FARAMESH_STATE_DIR", "FARAMESH_RUNTIME_DIR", "FARAMESH_LOG_DIR", "FARAMESH_CONFIG_DIR",
                "FARAMESH_REGISTRY_ROOT", "TZ")


def engine_environment(paths: StackPaths, environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(_BASE_ENV)
    env.update({k: environ[k] for k in _RELOCATIONS if environ.get(k)})
    env.update(read_env_file(paths.env_file(environ)))
    return env


# --- the environment file --------------------------------------------------------------------------------

def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        out, i, body = [], 0, text[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i])
            i += 1
        return "".join(out)
    return text


def render_env_file(values: Mapping[str, str]) -> str:
    """KEY="value" lines that systemd's EnvironmentFile= reads the same way (double quotes, backslash
    escapes). Values with a newline or NUL are refused: neither format carries them safely."""
    lines = ["# Written by `faramesh apply`: the engine's secret references. root 0600; never commit."]
    for key in sorted(values):
        value = values[key]
        if "\n" in value or "\0" in value or "\r" in value:
            raise ValueError(f"${key} holds a newline or NUL; it cannot go into an environment file")
        lines.append(f"{key}={_quote(value)}")
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        values[key.strip()] = _unquote(raw.strip())
    return values


def secret_references(policy_json: object) -> list[str]:
    """Every variable a compiled policy references as {"$env": NAME} (secret fields, DESIGN.md §4)."""
    found: set[str] = set()
    stack: list[object] = [policy_json]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$env")
            if len(node) == 1 and isinstance(ref, str):
                found.add(ref)
            else:
                stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(found)


# Ambient credentials the AWS SDK reads from the environment (engine/providers/host.py passes them to the
# AWS children over their socket). Carried into the env file when the policy uses AWS and `apply` has
# them — optional, since an instance role is legitimate — so an applied engine has what the operator had.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
           "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE")  # fmt: skip
_AWS_TYPES = frozenset({"aws-secrets-manager", "s3-sink", "s3"})


def uses_aws(providers: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(
        p.get("type") in _AWS_TYPES or (p.get("type") == "kms" and p.get("backend") == "aws-kms")
        for p in providers.values()
    )


def optional_env_values(
    names: Iterable[str], environ: Mapping[str, str], previous: Mapping[str, str]
) -> dict[str, str]:
    """Like env_file_values, but a name set nowhere is simply left out."""
    return {n: environ.get(n) or previous[n] for n in names if environ.get(n) or previous.get(n)}


def env_file_values(names: Iterable[str], environ: Mapping[str, str], previous: Mapping[str, str]) -> tuple[
    dict[str, str], list[str]
]:
    """(what the file should hold, names set nowhere): the invoking environment wins, then what the
    file held before (so a later `apply` without the variable keeps the secret)."""
    values, missing = {}, []
    for name in names:
        if environ.get(name):
            values[name] = environ[name]
        elif previous.get(name):
            values[name] = previous[name]
        else:
            missing.append(name)
    return values, missing
