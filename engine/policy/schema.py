"""What each block may contain: field kinds, enums, and which fields hold secrets.

Secret fields (tokens, passwords, key material, URLs that may carry credentials) never compile to a
value: `env("X")` there becomes `{"$env": "X"}`, resolved by the engine from its own environment at
start, so no compiled artifact or policy hash ever contains a secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any


@dataclass(frozen=True)
class Field:
    kind: str  # str | bool | int | number | duration | list | enum | secret | secret_url | url | money
    choices: tuple[str, ...] = ()
    required: bool = False


S = Field("str")
B = Field("bool")
D = Field("duration")
L = Field("list")
SECRET = Field("secret")
SECRET_URL = Field("secret_url")
URL = Field("url")


def enum(*choices: str) -> Field:
    return Field("enum", choices)


RUNTIME: dict[str, Field] = {
    "mode": enum("enforce", "audit"),
    "backend": enum("memory", "sqlite", "postgres"),
    "postgres_url": SECRET_URL,
    "wal_dir": S,
    "wal_sync": enum("full", "normal"),
    "cold_start_deny_window": D,
    "os_tier": B,
    "strip_ambient_credentials": B,
    "agent_enforce_profile": enum("full", "minimal", "off"),
    "immutable_config": B,
    "supervised_command": S,
    "socket": S,
    "timezone": S,
    "workspace": S,
    "strip_env": L,
    "env_allow": L,
    "approval_ttl": D,
    "signing_required": B,
    # How long a permit waits for the checkpoint that covers it when `signing_required = true`; past it
    # the call is denied (SIGNING_UNAVAILABLE). Default 5s.
    "signing_timeout": D,
    # `apply` refuses a `mode = "enforce"` stack whose checkpoints are signed locally (no `kms` provider,
    # or `backend = "local"`) unless this says the operator knows a host compromise could re-sign history.
    "signing_warning_acknowledged": B,
    "call_cost": Field("money"),
    # The Slack incoming-webhook URL for `alert { notify = "slack://#chan" }`: its path is the credential,
    # so it is a secret (any literal is refused; env("…") compiles to a reference the engine resolves).
    "slack_webhook_url": SECRET,
    "replay_retention": D,  # how long the redacted args of each request are kept for replay (default 7d)
    # Budgets: a permit's reservation that no `complete` settles is settled at its estimate after this
    # long (default 1h), for every budget of the engine, local or fleet.
    "reservation_ttl": D,
    # Fleet budgets (`budget … { scope = "fleet" }`, PostgreSQL only): the engines that share them
    # (default "default": every engine on the database and schema), and how long a decision waits for
    # the database before the call is denied BUDGET_UNAVAILABLE (default 2s).
    "fleet": S,
    "budget_timeout": D,
}

DEFAULT_FLEET = "default"
MAX_BUDGET_TIMEOUT = 60


def runtime_problem(runtime: Mapping[str, Any]) -> tuple[str, str] | None:
    """A rule across fields of a compiled `runtime` block: (message, the field to point at), or None.

    A PostgreSQL WAL without its URL would only fail when the engine starts, on the production host;
    said at compile time, `check`/`plan`/`apply` refuse it before anything changes."""
    if runtime.get("backend") == "postgres" and "postgres_url" not in runtime:
        return (
            'runtime backend = "postgres" needs `postgres_url`, the database to keep the WAL in; write it as '
            '`postgres_url = env("FARAMESH_PG_URL")` (its password stays in the engine\'s environment)',
            "backend",
        )
    ttl = runtime.get("reservation_ttl")
    if ttl is not None and not ttl >= 1:
        return "`reservation_ttl` must be at least 1s", "reservation_ttl"
    timeout = runtime.get("budget_timeout")
    if timeout is not None and not 0 < timeout <= MAX_BUDGET_TIMEOUT:
        return f"`budget_timeout` must be more than 0s and at most {MAX_BUDGET_TIMEOUT}s", "budget_timeout"
    fleet = runtime.get("fleet")
    if fleet is not None and not (0 < len(fleet) <= 100 and fleet.isprintable()):
        return "`fleet` names the engines that share fleet budgets: 1-100 printable characters", "fleet"
    if (fleet is not None or timeout is not None) and runtime.get("backend") != "postgres":
        name = "fleet" if fleet is not None else "budget_timeout"
        return (
            f"`{name}` is about fleet budgets, which live in the PostgreSQL database the engines share: it needs "
            'runtime backend = "postgres"',
            name,
        )
    return None


_COMMON_PROVIDER = {"type": Field("str", required=True), "timeout": D}

# Vault authentication, shared by secrets (`vault`) and signing (`kms` with backend vault-transit).
_VAULT_AUTH: dict[str, Field] = {
    "auth_method": enum("token", "approle"),
    "role_id": S,
    "secret_id": SECRET,
    "approle_mount": S,
}
# How long a credential handed to an agent in a permit is valid for (`expires_at` in the reply). The
# agent holds it for that long: delivery in the permit response is advisory (README, "Credentials").
_CREDENTIAL_TTL: dict[str, Field] = {"credential_ttl": D}

# Provider types that serve secrets, i.e. that a rule's `credential "<provider>:<name>"` may name.
SECRET_PROVIDER_TYPES = ("vault", "aws-secrets-manager", "gcp-secret-manager", "azure-key-vault")

PROVIDER_TYPES: dict[str, dict[str, Field]] = {
    "vault": {
        "addr": URL,
        "token": SECRET,
        "mount": S,
        "namespace": S,
        "role": S,
        **_VAULT_AUTH,
        **_CREDENTIAL_TTL,
    },
    "aws-secrets-manager": {"region": S, "endpoint_url": URL, "role_arn": S, "secret_prefix": S, **_CREDENTIAL_TTL},
    "gcp-secret-manager": {"project": S, "credentials_file": S, "endpoint_url": URL, **_CREDENTIAL_TTL},
    "azure-key-vault": {
        "vault_url": URL,
        "tenant_id": S,
        "client_id": S,
        "client_secret": SECRET,
        "authority_host": URL,
        **_CREDENTIAL_TTL,
    },
    "kms": {
        "backend": enum("aws-kms", "gcp-kms", "vault-transit", "azure-kv", "local"),
        "key_arn": S,
        "key_id": S,
        "key_name": S,
        "region": S,
        "endpoint_url": URL,
        "role_arn": S,
        "addr": URL,
        "token": SECRET,
        "mount": S,
        "namespace": S,
        **_VAULT_AUTH,
        "key_file": S,  # backend "local": where the child keeps its Ed25519 key (default: the state dir)
        # backends "gcp-kms" (a service-account key file) and "azure-kv" (an Entra ID app): engine/providers/
        "credentials_file": S,
        "key_version": S,
        "vault_url": URL,
        "tenant_id": S,
        "client_id": S,
        "client_secret": SECRET,
        "authority_host": URL,
    },
    "splunk-sink": {"url": SECRET_URL, "token": SECRET, "index": S, "source": S, "sourcetype": S, "verify_tls": B},
    "datadog-sink": {"api_key": SECRET, "site": S, "service": S, "tags": L, "url": URL},
    "s3-sink": {"bucket": S, "prefix": S, "region": S, "endpoint_url": URL},
    "webhook-sink": {"url": SECRET_URL, "secret": SECRET, "verify_tls": B},
    "cost": {"url": SECRET_URL, "token": SECRET},
}

IDENTITY_TYPES: dict[str, dict[str, Field]] = {
    "spiffe": {"socket": S, "trust_domain": S, "id_template": S, "audience": S},
    "oidc": {"issuer": URL, "client_id": S, "client_secret": SECRET, "audience": S, "jwks_url": URL},
}

AGENT_BLOCKS: dict[str, dict[str, Field]] = {
    "egress": {"allow": L, "deny": L},
    "model_policy": {"allow": L, "deny": L},
    "session": {"max_duration": D, "idle_timeout": D},
    "alert": {
        "on": enum(
            "deny",
            "defer",
            "permit",
            "any",
            "rate_exceeded",
            "budget_warning",
            "budget_exceeded",
            "approved",
            "egress_denied",
            "sandbox_violation",
        ),
        "notify": S,
    },
}
REPEATABLE_AGENT_BLOCKS = frozenset({"alert"})

AGENT_FIELDS: dict[str, Field] = {"command": S, "description": S}

BUDGET_FIELDS: dict[str, Field] = {
    "max": Field("money"),
    "max_calls": Field("int"),
    "warn_at": Field("number"),
    "on_exceed": enum("deny", "defer", "audit"),
    "period": enum("hourly", "daily", "weekly", "monthly"),
    # "fleet": one budget for every engine of the fleet (runtime `fleet`), enforced in PostgreSQL.
    "scope": enum("local", "fleet"),
}
BUDGET_PERIODS = ("hourly", "daily", "weekly", "monthly")

RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

TOP_LEVEL_BLOCKS = ("runtime", "provider", "identity", "trust", "agent", "import")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
