"""Assemble and run an engine for `faramesh dev` and `faramesh serve`.

dev: compile the stack, in-memory WAL, ephemeral signing key, one socket serving agent and operator
roles, pretty DPRs on stderr, stub credentials. serve: the installed compiled policy (never
governance.fms), the SQLite WAL (or PostgreSQL: `runtime { backend = "postgres" }`), the persisted keys,
`operator.sock` plus one socket directory per declared agent, the declared secret and `kms` providers as
supervised children (their `$env` references resolved from this environment); one engine per stack,
held by flock.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from faramesh.engine.alerts import AlertConfig, AlertDispatcher, MissingEnvironment, resolve_env_refs
from faramesh.engine.identity import IdentityVerifier
from faramesh.engine.paths import StackPaths, stack_paths
from faramesh.engine.pipeline import EngineState
from faramesh.engine.policy.model import CompiledPolicy, policy_from_json
from faramesh.engine.policy.schema import SECRET_PROVIDER_TYPES
from faramesh.engine.providers.host import ProviderHost
from faramesh.engine.server import EngineServer, ServerConfig, SigningSetup, SocketSpec, ensure_private_dir
from faramesh.engine.sinks import SinkDispatcher
from faramesh.engine.wal.log import Wal, new_ulid
from faramesh.engine.wal.signer import PINS_FILE, ephemeral_signer, load_or_create_signer
from faramesh.engine.wal.store import DEFAULT_REPLAY_RETENTION, MemoryStore, SqliteStore, StoreError

if TYPE_CHECKING:  # never at run time: psycopg is loaded only when the policy selects PostgreSQL
    from faramesh.engine.wal.pg_store import FleetBudgets, PgStore


class EngineStartError(Exception):
    code = "ENGINE_START"
    exit_code = 4


def _read_private_key(path: Path, size: int) -> bytes:
    """The engine HMAC key: created 0600 on first start, never followed through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        key = os.urandom(size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
    try:
        key = os.read(fd, size + 1)
    finally:
        os.close(fd)
    if len(key) != size:
        raise EngineStartError(f"{path} is corrupt")
    return key


def acquire_engine_lock(paths: StackPaths) -> IO[str]:
    ensure_private_dir(paths.state_dir, 0o700)
    handle = open(paths.lock_file, "a+")  # noqa: SIM115 - held for the engine's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EngineStartError(f"another engine already runs for this stack (lock {paths.lock_file})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _log(message: str) -> None:
    sys.stderr.write(f"faramesh engine: {message}\n")
    sys.stderr.flush()


def _alerts(policy: CompiledPolicy, *, dev: bool) -> AlertDispatcher:
    """The alert dispatcher, with the secrets it uses resolved from this process's environment.
    serve: an unset variable refuses the start (exit 4). dev: it falls back to the stub (alerts are
    printed on stderr), as dev stubs every provider it is not given."""
    try:
        config = AlertConfig.from_policy(policy, os.environ, dev=dev)
    except MissingEnvironment as exc:
        if not dev:
            raise EngineStartError(str(exc)) from None
        _log(f"{exc}; dev prints Slack alerts on stderr instead")
        config = AlertConfig(None, dev=True)
    return AlertDispatcher(config, log=_log)


def _retention(policy: CompiledPolicy) -> float:
    return float(policy.runtime.get("replay_retention", DEFAULT_REPLAY_RETENTION))


def dev_server(policy: CompiledPolicy, stack_dir: Path, paths: StackPaths) -> EngineServer:
    socket_path = Path(str(policy.runtime.get("socket") or paths.dev_socket))
    memory = MemoryStore()
    memory.retention_seconds = _retention(policy)
    wal = Wal(memory, ephemeral_signer(), clock=__import__("time").time)
    state = EngineState(policy, hmac_key=os.urandom(32), dev=True)
    config = ServerConfig(
        sockets=[SocketSpec(socket_path, "dev", None, 0o600)],
        dev=True,
        cold_start_deny_window=float(policy.runtime.get("cold_start_deny_window", 30)),
        pretty_dprs=True,
        wal_description={"backend": "memory", "path": None, "sync": None},
        stack_dir=str(stack_dir),
    )
    return EngineServer(policy, wal, state, config, alerts=_alerts(policy, dev=True))


def load_installed_policy(path: Path, expected_version: str | None = None) -> CompiledPolicy:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EngineStartError(f"no installed policy at {path} ({exc.strerror}); run `faramesh apply`") from None
    if expected_version is not None and hashlib.sha256(raw).hexdigest() != expected_version:
        raise EngineStartError(f"{path} is not policy version {expected_version}")
    return policy_from_json(raw)


def _postgres_store(
    runtime: Mapping[str, Any],
    paths: StackPaths,
    sync: str,
    environ: Mapping[str, str],
    clock: Callable[[], float],
) -> tuple[PgStore, dict[str, Any], FleetBudgets]:
    """The PostgreSQL WAL store for `runtime { backend = "postgres" }`, its description for status, and
    the fleet budgets kept in the same database (it connects on first use, or at start when the policy
    has a `scope = "fleet"` budget).

    psycopg is imported here and only here, so a SQLite or memory engine never loads it. The URL is a
    secret reference resolved from the engine's environment; it (and its password) never reaches an
    error message, a log line or the status reply: those name the host, database and chain."""
    reference = runtime.get("postgres_url")
    if reference is None:
        raise EngineStartError('runtime backend = "postgres" needs `postgres_url = env("…")`')
    try:
        url = resolve_env_refs(reference, environ, "runtime.postgres_url")
    except MissingEnvironment as exc:
        raise EngineStartError(str(exc)) from None
    if not isinstance(url, str) or not url.strip():
        raise EngineStartError("runtime.postgres_url is empty: it must be a PostgreSQL URL or connection string")
    try:
        from faramesh.engine.wal import pg_store
    except ImportError as exc:
        raise EngineStartError(
            f'runtime backend = "postgres" needs psycopg ({exc.name or exc}): pip install "faramesh[providers]"'
        ) from None
    try:
        chain_id = pg_store.load_or_create_chain_id(paths.state_dir / "chain_id", lambda: new_ulid(clock()))
        store = pg_store.PgStore(url, chain_id, sync)
        timeout = float(runtime.get("budget_timeout", pg_store.DEFAULT_BUDGET_TIMEOUT))
        fleet = pg_store.FleetBudgets(url, chain_id, timeout=timeout, log=_log)
    except (StoreError, OSError) as exc:  # neither carries the URL: PgStore masks it, OSError names the file
        raise EngineStartError(f"cannot set up the PostgreSQL WAL: {exc}") from None
    # Named as `faramesh audit` names it (host, port, database, schema, chain): no credential in it.
    wal_info = {"backend": "postgres", "path": f"{store.db.where} chain {chain_id}", "sync": sync, "chain_id": chain_id}
    return store, wal_info, fleet


LOCAL_KMS_KEY = "kms-local.key"  # `kms` backend "local" without `key_file`: the child's key, in the state dir


def engine_providers(policy: CompiledPolicy, paths: StackPaths) -> dict[str, dict[str, Any]]:
    """The provider blocks the engine runs as children: secret providers and the `kms` signer (sinks and
    identities are run elsewhere). A type this build cannot run is included all the same: the host
    reports it DOWN ("not available in this build") instead of it vanishing from `status`."""
    from faramesh.engine.policy.model import thaw

    out: dict[str, dict[str, Any]] = {}
    for name, block in policy.providers.items():
        config = thaw(block)
        kind = config.get("type")
        if kind not in SECRET_PROVIDER_TYPES and kind != "kms":
            continue
        if kind == "kms" and config.get("backend") == "local" and not config.get("key_file"):
            # A local signing key that died with its child would pin a new key at every restart.
            config["key_file"] = str(paths.state_dir / LOCAL_KMS_KEY)
        out[name] = config
    return out


def serve_server(stack_dir: Path, paths: StackPaths, policy_file: Path | None = None) -> EngineServer:
    import time

    source = policy_file or paths.policy_copy
    policy = load_installed_policy(source)
    runtime = policy.runtime
    backend = runtime.get("backend", "sqlite")
    sync = str(runtime.get("wal_sync", "full"))
    ensure_private_dir(paths.state_dir, 0o700)  # keys, and the PostgreSQL chain id, live there
    store: MemoryStore | SqliteStore | PgStore
    fleet: FleetBudgets | None = None
    if backend == "memory":
        store = MemoryStore()
        wal_info: dict[str, Any] = {"backend": "memory", "path": None, "sync": None}
    elif backend == "postgres":
        store, wal_info, fleet = _postgres_store(runtime, paths, sync, os.environ, time.time)
    else:
        wal_path = paths.wal_path(runtime.get("wal_dir"))
        store = SqliteStore(wal_path, sync)
        wal_info = {"backend": "sqlite", "path": str(wal_path), "sync": sync}
    store.retention_seconds = _retention(policy)
    alerts = _alerts(policy, dev=False)
    sinks = _sinks(policy, paths)
    identity = _identity(policy, dev=False)
    signer = load_or_create_signer(paths.signing_key)
    blocks = engine_providers(policy, paths)
    host = ProviderHost(blocks, os.environ, log=_log) if blocks else None
    kms = next((name for name, block in blocks.items() if block.get("type") == "kms"), None)
    signing = SigningSetup(
        local=signer,
        provider=kms,
        provider_config=blocks[kms] if kms is not None else None,
        pins_file=paths.state_dir / PINS_FILE,
    )
    wal = Wal(
        store,
        signer if kms is None else None,  # a KMS signer is pinned during start-up (server._settle_signer)
        clock=time.time,
        signing_required=bool(runtime.get("signing_required", False)),
        # Inline only where a commit is a few microseconds (memory, SQLite without fdatasync). A PostgreSQL
        # commit is a network round trip, and may wait out a reconnect: never on the event loop.
        commit_inline=backend == "memory" or (backend == "sqlite" and sync != "full"),
        on_commit=sinks.offer_committed if sinks is not None else None,
    )
    state = EngineState(policy, hmac_key=_read_private_key(paths.hmac_key, 32), dev=False)
    # operator.sock is faramesh-operators' (DESIGN.md §2) when that group exists: its members run the CLI.
    sockets = [SocketSpec(Path(str(runtime.get("socket") or paths.operator_socket)), "operator", None, 0o660,
                          _operators_gid())]  # fmt: skip
    for agent_id in sorted(policy.agents):
        sockets.append(SocketSpec(paths.agent_socket(agent_id), "agent", agent_id, 0o666))
    config = ServerConfig(
        sockets=sockets,
        dev=False,
        cold_start_deny_window=float(runtime.get("cold_start_deny_window", 30)),
        wal_description=wal_info,
        logs={"engine": str(paths.log_dir / "engine.log")},
        stack_dir=str(stack_dir),
        egress_intake=paths.runtime_dir / "egress.sock",
    )

    def loader(version: str) -> CompiledPolicy:
        return load_installed_policy(source, version)

    return EngineServer(
        policy,
        wal,
        state,
        config,
        policy_loader=loader,
        alerts=alerts,
        providers=host,
        signing=signing,
        sinks=sinks,
        identity=identity,
        fleet=fleet,
    )


def _operators_gid() -> int | None:
    """The operators group, when it exists and this process may give a file that group (root, or a member:
    the engine's service user is one)."""
    import grp

    from faramesh.engine.paths import OPERATORS_GROUP

    try:
        gid = grp.getgrnam(OPERATORS_GROUP).gr_gid
    except KeyError:
        return None
    return gid if os.geteuid() == 0 or gid in os.getgroups() else None


def _sinks(policy: CompiledPolicy, paths: StackPaths) -> SinkDispatcher | None:
    """The policy's audit sinks (None when it declares none): a bad block or spool refuses the start."""
    from faramesh.engine.sinks.errors import SinkConfigError, SinkSpoolError

    try:
        sinks = SinkDispatcher.from_policy(policy, os.environ, paths.state_dir / "spool", log=_log)
    except (SinkConfigError, SinkSpoolError) as exc:
        raise EngineStartError(str(exc)) from None
    return sinks if sinks.status() else None


def _identity(policy: CompiledPolicy, *, dev: bool) -> IdentityVerifier:
    """The policy's identity verifiers: a block the engine cannot use refuses the start."""
    from faramesh.engine.identity.base import IdentityConfigError

    try:
        return IdentityVerifier.from_policy(policy, os.environ, dev=dev)
    except IdentityConfigError as exc:
        raise EngineStartError(str(exc)) from None


def announce(server: EngineServer, out: IO[str] = sys.stderr) -> None:
    cfg = server.config
    lines = [f"faramesh {'dev' if cfg.dev else 'serve'}: policy {server.policy.version[:16]}"]
    for spec in cfg.sockets:
        who = {"dev": "agents and operator (dev: one socket serves both roles)", "operator": "operator"}.get(
            spec.role, f'agent "{spec.agent_id}"'
        )
        lines.append(f"  socket   {spec.path}  — {who}")
    wal = cfg.wal_description
    lines.append(f"  wal      {wal.get('backend')} {wal.get('path') or '(in memory: lost on exit)'}")
    if server.providers is not None:
        names = ", ".join(f"{s.name} ({s.type})" for s in server.providers.status())
        lines.append(f"  provider {names}: each a supervised child process")
    elif cfg.dev and server.policy.providers:
        lines.append(f"  provider {', '.join(sorted(server.policy.providers))}: stubbed (dev: STUB-<id> secrets)")
    if server.signing is not None:
        signer = f'the kms provider "{server.signing.provider}"' if server.signing.provider else "the local key"
        lines.append(f"  signing  checkpoints signed by {signer}")
    if cfg.dev:
        lines.append("  keys     ephemeral signing key for this session; DPRs are tagged dev and printed here")
        lines.append(f"  agents   export FARAMESH_SOCKET={cfg.sockets[0].path}")
    out.write("\n".join(lines) + "\n")
    out.flush()


def run(server: EngineServer) -> int:
    announce(server)
    return asyncio.run(server.run())


__all__ = ["EngineStartError", "acquire_engine_lock", "dev_server", "run", "serve_server", "stack_paths"]
