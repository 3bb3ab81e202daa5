"""AST → compiled policy. Pure: the environment and the resolved imports are passed in.

Merge of imports (documented in the README): an imported artifact contributes agents. An imported
agent whose id is new is added as it is. An imported agent whose id the stack also declares is
merged into the local one: local rules are tried first, then the imported rules in their own order
(`deny!` still wins wherever it sits); the local `default`, settings blocks and command win, the
imported ones fill only what the stack leaves unset; rate limits, budgets, redactions and alerts
accumulate (local first). An artifact's `runtime`, `provider`, `identity` and `trust` blocks are
validated but never applied: the stack's operator owns those.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from faramesh.engine.policy import schema
from faramesh.engine.policy.ast import (
    AgentDecl,
    Assignment,
    BareWord,
    Block,
    BudgetDecl,
    EnvRef,
    PolicyFile,
    RuleDecl,
    TrustKeyDecl,
    Value,
)
from faramesh.engine.policy.conditions import normalize
from faramesh.engine.policy.errors import (
    PolicyEnvError,
    PolicySchemaError,
    PolicySecretError,
    SourcePos,
)
from faramesh.engine.policy.model import CompiledPolicy, policy_from_dict

AGENT_ID_RE = re.compile(r"[A-Za-z0-9_.:@\-]+(?:/[A-Za-z0-9_.:@\-]+)*")
_DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_AGENT = "default"
MAX_CONDITION_DEPTH = 64  # nested lists of the JSON-shaped condition (see ast.Cond)


@dataclass(frozen=True)
class ResolvedImport:
    """An import after resolution and signature verification (done by the I/O shell, imports.py)."""

    path: str  # as written, with @version
    alias: str | None
    version: str
    sha256: str
    key_id: str
    file: PolicyFile


@dataclass(frozen=True)
class CompileOptions:
    allow_literal_secrets: bool = False


def parse_duration(text: str) -> float | None:
    m = _DURATION_RE.match(text.strip())
    if not m:
        return None
    seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return int(seconds) if float(seconds).is_integer() else seconds


class _Compiler:
    def __init__(self, env: Mapping[str, str], options: CompileOptions) -> None:
        self.env = env
        self.options = options
        self.providers: Mapping[str, Mapping[str, Any]] = {}  # the stack's, once its blocks are compiled
        self.runtime: Mapping[str, Any] = {}  # the stack's (imported agents' budgets are checked against it)
        self.literal_secrets: dict[str, str] = {}
        self._literal_owner: dict[str, str] = {}  # $env name → the field it was made for

    # ---- values
    def plain(self, value: Value, pos: SourcePos, what: str) -> Any:
        """A value with env() resolved (non-secret context) and bare words as strings."""
        if isinstance(value, EnvRef):
            resolved = self.env.get(value.name)
            if resolved is None:
                raise PolicyEnvError(f"environment variable {value.name} is not set (needed by {what})", pos=value.pos)
            return resolved
        if isinstance(value, BareWord):
            return value.word
        if isinstance(value, tuple):
            return [self.plain(v, pos, what) for v in value]
        return value

    def field(self, spec: schema.Field, a: Assignment, what: str) -> Any:
        name = f"{what}.{a.name}"
        if spec.kind in ("secret", "secret_url"):
            if isinstance(a.value, EnvRef):
                return {"$env": a.value.name}
            if isinstance(a.value, str):
                if spec.kind == "secret_url" and _is_credential_free_url(a.value):
                    return a.value
                if not self.options.allow_literal_secrets:
                    raise PolicySecretError(
                        f'`{name}` holds a secret written literally; use env("…") so it never enters '
                        "the compiled policy (or pass --allow-literal-secrets)",
                        pos=a.pos,
                    )
                # The value goes to the engine's environment file (written by `apply`), never the artifact.
                var = "FARAMESH_LITERAL_" + re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
                if self._literal_owner.setdefault(var, name) != name:
                    # `provider "v-1"` and `provider "v_1"` flatten alike: keep their references apart.
                    var += "_" + hashlib.sha256(name.encode()).hexdigest()[:8].upper()
                    self._literal_owner[var] = name
                self.literal_secrets[var] = a.value
                return {"$env": var}
            raise PolicySchemaError(f'`{name}` must be env("…") or a string', pos=a.pos)
        value = self.plain(a.value, a.pos, f"`{name}`")
        if spec.kind in ("str", "url"):
            if not isinstance(value, str):
                raise PolicySchemaError(f"`{name}` must be a string", pos=a.pos)
            if spec.kind == "url" and _url_carries_credentials(value):
                raise PolicySecretError(
                    f"`{name}` carries credentials in the URL; move them to a secret field", pos=a.pos
                )
            return value
        if spec.kind == "bool":
            if isinstance(value, str) and value in ("true", "false"):
                return value == "true"
            if not isinstance(value, bool):
                raise PolicySchemaError(f"`{name}` must be true or false", pos=a.pos)
            return value
        if spec.kind == "enum":
            if not isinstance(value, str) or value not in spec.choices:
                raise PolicySchemaError(
                    f"`{name}` must be one of {', '.join(spec.choices)} (got {value!r})"
                    + (schema.did_you_mean(value, spec.choices) if isinstance(value, str) else ""),
                    pos=a.pos,
                )
            return value
        if spec.kind == "duration":
            seconds = parse_duration(value) if isinstance(value, str) else None
            if seconds is None:
                raise PolicySchemaError(
                    f'`{name}` must be a duration such as "10s", "5m", "24h" (got {value!r})', pos=a.pos
                )
            return seconds
        if spec.kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicySchemaError(f"`{name}` must be a list of strings", pos=a.pos)
            return value
        if spec.kind == "money":
            return _to_cents(value, name, a.pos)
        if spec.kind == "int":
            if type(value) is not int or value < 0:
                raise PolicySchemaError(f"`{name}` must be a whole number ≥ 0", pos=a.pos)
            return value
        if spec.kind == "number":
            if type(value) not in (int, float):
                raise PolicySchemaError(f"`{name}` must be a number", pos=a.pos)
            return value
        raise AssertionError(spec.kind)

    def fields(
        self, assignments: tuple[Assignment, ...], specs: Mapping[str, schema.Field], what: str
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in assignments:
            spec = specs.get(a.name)
            if spec is None:
                raise PolicySchemaError(
                    f"unknown field `{a.name}` in {what}" + schema.did_you_mean(a.name, specs), pos=a.pos
                )
            if a.name in out:
                raise PolicySchemaError(f"`{a.name}` is set twice in {what}", pos=a.pos)
            out[a.name] = self.field(spec, a, what)
        for name, spec in specs.items():
            if spec.required and name not in out:
                raise PolicySchemaError(f"{what} needs `{name}`", pos=assignments[0].pos if assignments else None)
        return out

    # ---- top-level blocks
    def typed_block(self, block: Block, types: Mapping[str, Mapping[str, schema.Field]], what: str) -> dict[str, Any]:
        type_field = next((a for a in block.fields if a.name == "type"), None)
        if type_field is None:
            raise PolicySchemaError(f'{what} "{block.label}" needs `type`', pos=block.pos)
        type_name = self.plain(type_field.value, type_field.pos, f"{what}.type")
        if type_name not in types:
            raise PolicySchemaError(
                f'{what} "{block.label}" has unknown type {type_name!r}; known: {", ".join(sorted(types))}'
                + (schema.did_you_mean(str(type_name), list(types)) if isinstance(type_name, str) else ""),
                pos=type_field.pos,
            )
        specs = {**schema._COMMON_PROVIDER, **types[type_name]}
        return self.fields(block.fields, specs, f'{what} "{block.label}"')

    def file_blocks(self, pf: PolicyFile) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        runtime: dict[str, Any] | None = None
        providers: dict[str, Any] = {}
        identities: dict[str, Any] = {}
        for block in pf.blocks:
            if block.kind == "runtime" and block.label is None:
                if runtime is not None:
                    raise PolicySchemaError("`runtime` is declared twice", pos=block.pos)
                runtime = self.fields(block.fields, schema.RUNTIME, "runtime")
            elif block.kind == "provider" and block.label is not None:
                if block.label in providers:
                    raise PolicySchemaError(f'provider "{block.label}" is declared twice', pos=block.pos)
                providers[block.label] = self.typed_block(block, schema.PROVIDER_TYPES, "provider")
            elif block.kind == "identity" and block.label is not None:
                if block.label in identities:
                    raise PolicySchemaError(f'identity "{block.label}" is declared twice', pos=block.pos)
                identities[block.label] = self.typed_block(block, schema.IDENTITY_TYPES, "identity")
            else:
                shown = block.kind + (f' "{block.label}"' if block.label else "")
                raise PolicySchemaError(
                    f"unknown top-level block `{shown}`" + schema.did_you_mean(block.kind, schema.TOP_LEVEL_BLOCKS),
                    pos=block.pos,
                )
        return runtime or {}, providers, identities

    def trust(self, pf: PolicyFile) -> list[dict[str, str]]:
        return validate_trust(pf.trust)

    # ---- agents
    def rule(self, r: RuleDecl, index_ref: str, origin: str | None) -> dict[str, Any]:
        if r.condition is not None and _nesting(r.condition) > MAX_CONDITION_DEPTH:
            # Checked without recursion, so normalising, compiling and evaluating never hit the stack limit.
            raise PolicySchemaError(f"the condition is nested more than {MAX_CONDITION_DEPTH} levels deep", pos=r.pos)
        out: dict[str, Any] = {
            "effect": r.effect,
            "strict": r.strict,
            "tool": r.pattern,
            "condition": normalize(r.condition, r.pos) if r.condition is not None else None,
            "ref": index_ref,
        }
        if r.notify is not None:
            out["notify"] = r.notify
        if r.reason is not None:
            out["reason"] = r.reason
        if origin is not None:
            out["origin"] = origin
        if r.credential is not None:
            out["credential"] = self.credential(r)
            if r.credential_via is not None:
                out["credential_via"] = credential_route(r.credential_via, r)
        return out

    def credential(self, r: RuleDecl) -> str:
        """A rule's `credential "<provider>:<name>[#field]"`, checked against the stack's providers."""
        from faramesh.engine.providers.protocol import parse_secret_ref

        assert r.credential is not None
        if r.effect == "deny":
            raise PolicySchemaError(
                "only permit and defer rules can name a credential (a deny never receives one)", pos=r.pos
            )
        try:
            ref = parse_secret_ref(r.credential)
        except ValueError as exc:
            raise PolicySchemaError(str(exc), pos=r.pos) from None
        declared = self.providers.get(ref.provider)
        if declared is None:
            known = [n for n, p in self.providers.items() if p.get("type") in schema.SECRET_PROVIDER_TYPES]
            raise PolicySchemaError(
                f'credential {r.credential!r} names provider "{ref.provider}", which this stack does not declare'
                + (f" (secret providers: {', '.join(sorted(known))})" if known else "")
                + schema.did_you_mean(ref.provider, known),
                pos=r.pos,
            )
        if declared.get("type") not in schema.SECRET_PROVIDER_TYPES:
            raise PolicySchemaError(
                f'credential {r.credential!r} names provider "{ref.provider}" of type {declared.get("type")}, '
                f"which does not serve secrets (use one of type {', '.join(schema.SECRET_PROVIDER_TYPES)})",
                pos=r.pos,
            )
        return str(ref)

    def agent(self, a: AgentDecl, ref_of: Any, origin: str | None) -> dict[str, Any]:
        if not AGENT_ID_RE.fullmatch(a.agent_id) or ".." in a.agent_id.split("/"):
            raise PolicySchemaError(
                f'agent id "{a.agent_id}" must be letters, digits and _ . : @ - in segments joined by /',
                pos=a.pos,
            )
        if a.default is not None and a.default not in ("permit", "defer", "deny"):
            raise PolicySchemaError(
                f"`default {a.default}` is not allowed; use permit, defer or deny", pos=a.default_pos
            )
        rates = []
        for rl in a.rate_limits:
            unit = rl.unit[:-1] if rl.unit.endswith("s") and rl.unit[:-1] in schema.RATE_UNITS else rl.unit
            if unit not in schema.RATE_UNITS:
                raise PolicySchemaError(
                    f"rate limit unit `{rl.unit}` must be second, minute, hour or day"
                    + schema.did_you_mean(rl.unit, list(schema.RATE_UNITS)),
                    pos=rl.pos,
                )
            if rl.count <= 0:
                raise PolicySchemaError("a rate limit must allow at least one call", pos=rl.pos)
            rates.append(
                {
                    "tool": rl.pattern,
                    "count": rl.count,
                    "unit": unit,
                    "per_seconds": schema.RATE_UNITS[unit],
                    "ref": ref_of(rl.pos),
                }
            )
        budgets = []
        names: set[str] = set()
        for b in a.budgets:
            if b.name in names:
                raise PolicySchemaError(f"budget `{b.name}` is declared twice", pos=b.pos)
            names.add(b.name)
            f = self.fields(b.fields, schema.BUDGET_FIELDS, f"budget {b.name}")
            period = f.get("period") or (b.name if b.name in schema.BUDGET_PERIODS else None)
            if period is None:
                raise PolicySchemaError(
                    f"budget `{b.name}` needs `period` (one of {', '.join(schema.BUDGET_PERIODS)})", pos=b.pos
                )
            if "max" not in f and "max_calls" not in f:
                raise PolicySchemaError(f"budget `{b.name}` needs `max` or `max_calls`", pos=b.pos)
            warn = f.get("warn_at")
            if warn is not None and not 0 < warn <= 1:
                raise PolicySchemaError("`warn_at` is a fraction between 0 and 1 (0.8 = 80%)", pos=b.pos)
            compiled_budget = {
                "name": b.name,
                "period": period,
                "max_cents": f.get("max"),
                "max_calls": f.get("max_calls"),
                "warn_at": warn,
                "on_exceed": f.get("on_exceed", "deny"),
                "ref": ref_of(b.pos),
            }
            if f.get("scope", "local") == "fleet":
                self.fleet_budget(b, compiled_budget)
                compiled_budget["scope"] = "fleet"
            budgets.append(compiled_budget)
        redactions = []
        for rd in a.redactions:
            paths = self.plain(rd.paths, rd.pos, "redact")
            if not paths or not all(isinstance(p, str) and p and "" not in p.split(".") for p in paths):
                raise PolicySchemaError("redact args must be a list of dotted argument paths", pos=rd.pos)
            redactions.append({"tool": rd.pattern, "args": paths, "ref": ref_of(rd.pos)})
        settings: dict[str, Any] = {}
        alerts: list[dict[str, Any]] = []
        for block in a.blocks:
            specs = schema.AGENT_BLOCKS.get(block.kind)
            if specs is None:
                raise PolicySchemaError(
                    f'unknown block `{block.kind}` in agent "{a.agent_id}"'
                    + schema.did_you_mean(block.kind, [*schema.AGENT_BLOCKS, "rules", "budget", "redact"]),
                    pos=block.pos,
                )
            values = self.fields(block.fields, specs, block.kind)
            if block.kind in schema.REPEATABLE_AGENT_BLOCKS:
                if "on" not in values or "notify" not in values:
                    raise PolicySchemaError("an alert needs `on` and `notify`", pos=block.pos)
                alerts.append(values)
            elif block.kind in settings:
                raise PolicySchemaError(f"`{block.kind}` is declared twice in this agent", pos=block.pos)
            else:
                settings[block.kind] = values
            if block.kind == "egress":
                _check_egress(values, block.pos)
        for assignment in a.fields:
            if assignment.name not in schema.AGENT_FIELDS:
                options = [*schema.AGENT_FIELDS, *schema.AGENT_BLOCKS, "default", "rules", "framework", "budget"]
                raise PolicySchemaError(
                    f'unknown field `{assignment.name}` in agent "{a.agent_id}"'
                    + schema.did_you_mean(assignment.name, options),
                    pos=assignment.pos,
                )
        extra = self.fields(a.fields, schema.AGENT_FIELDS, f'agent "{a.agent_id}"')
        compiled_rules = [self.rule(r, ref_of(r.pos), origin) for r in a.rules]
        _unique_credential_refs(compiled_rules, a.rules)
        return {
            "agent_id": a.agent_id,
            "default": a.default,
            "default_ref": ref_of(a.default_pos) if a.default_pos else None,
            "framework": a.framework,
            "command": extra.get("command"),
            "ref": ref_of(a.pos),
            "rules": compiled_rules,
            "rate_limits": rates,
            "budgets": budgets,
            "redactions": redactions,
            "settings": settings,
            "alerts": alerts,
        }

    def fleet_budget(self, b: BudgetDecl, compiled: Mapping[str, Any]) -> None:
        """A `scope = "fleet"` budget is kept in the database the fleet's engines share: only PostgreSQL
        is such a database, and a refusal there cannot wait for an operator (no `defer`)."""
        pos = next((a.pos for a in b.fields if a.name == "scope"), b.pos)
        backend = self.runtime.get("backend", "sqlite")
        if backend != "postgres":
            raise PolicySchemaError(
                f'budget `{b.name}` has scope = "fleet": a fleet budget is shared by every engine of the fleet '
                "through the PostgreSQL database they keep their WAL in, so the stack needs runtime { backend = "
                f'"postgres"  postgres_url = env("FARAMESH_PG_URL") }} (its backend is "{backend}"); drop '
                '`scope = "fleet"` to keep the budget per engine',
                pos=pos,
            )
        if compiled["on_exceed"] == "defer":
            raise PolicySchemaError(
                f"budget `{b.name}`: a fleet budget cannot defer (the fleet-wide refusal is made in one atomic "
                'statement, with no approval to wait for); use on_exceed = "deny" or "audit"',
                pos=next((a.pos for a in b.fields if a.name == "on_exceed"), pos),
            )

    def file_agents(self, pf: PolicyFile, ref_of: Any, origin: str | None) -> dict[str, dict[str, Any]]:
        agents: dict[str, dict[str, Any]] = {}
        for a in pf.agents:
            if a.agent_id in agents:
                raise PolicySchemaError(f'agent "{a.agent_id}" is declared twice', pos=a.pos)
            agents[a.agent_id] = self.agent(a, ref_of, origin)
        if pf.flat_rules:
            # v0 files: rules at top level belong to the agent "default".
            flat = AgentDecl(agent_id=DEFAULT_AGENT, pos=pf.flat_rules[0].pos, rules=pf.flat_rules)
            compiled = self.agent(flat, ref_of, origin)
            if DEFAULT_AGENT in agents:
                agents[DEFAULT_AGENT]["rules"].extend(compiled["rules"])
            else:
                agents[DEFAULT_AGENT] = compiled
        return agents


def validate_trust(keys: tuple[TrustKeyDecl, ...]) -> list[dict[str, str]]:
    """Check the stack's pinned keys. Runs before imports resolve, since they are verified with these."""
    out = []
    seen: set[str] = set()
    for key in keys:
        algo, _, b64 = key.key.partition(":")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if algo != "ed25519" or len(raw) != 32:
            raise PolicySchemaError(
                f'trust key for "{key.publisher}" must be ed25519:<base64 of 32 bytes>', pos=key.pos
            )
        if key.publisher in seen:
            raise PolicySchemaError(f'trust key for "{key.publisher}" is given twice', pos=key.pos)
        seen.add(key.publisher)
        out.append({"publisher": key.publisher, "key": key.key})
    return out


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")


def credential_route(text: str, r: RuleDecl) -> str:
    """`via "POST http://api.example.com/v1/refunds [Header]"` → the canonical route the engine hands the
    egress proxy: `METHOD http://host:port/path Header` (Header defaults to Authorization). Plain HTTP only:
    the proxy cannot put anything into a TLS stream without intercepting it, which it does not do."""
    parts = text.split()
    if len(parts) not in (2, 3) or parts[0].upper() not in _METHODS:
        raise PolicySchemaError(
            f'via {text!r}: write "METHOD http://host[:port]/path [Header]" (e.g. "POST http://api.example.com/v1/x")',
            pos=r.pos,
        )
    method, url = parts[0].upper(), urlsplit(parts[1])
    header = parts[2] if len(parts) == 3 else "Authorization"
    if url.scheme == "https":
        raise PolicySchemaError(
            f"via {text!r}: the proxy injects credentials into plain-HTTP requests only (HTTPS would need TLS "
            "interception); use SDK delivery (no `via`) for an https API",
            pos=r.pos,
        )
    if url.scheme != "http" or not url.hostname or url.query or url.fragment or url.username or url.password:
        raise PolicySchemaError(f"via {text!r}: an http:// URL with a host and a path, no query", pos=r.pos)
    if not _HEADER_NAME.fullmatch(header):
        raise PolicySchemaError(f"via {text!r}: {header!r} is not a header name", pos=r.pos)
    try:
        port = url.port or 80
    except ValueError:
        raise PolicySchemaError(f"via {text!r}: bad port", pos=r.pos) from None
    return f"{method} http://{url.hostname.lower()}:{port}{url.path or '/'} {header}"


def _check_egress(block: Mapping[str, Any], pos: Any) -> None:
    """Every egress entry must read the same way for the proxy (ports) and the SDK tier: caught by `check`
    rather than by an engine that refuses to start on the production host."""
    from faramesh.engine.egress import EgressConfigError, compile_egress, without_ports

    try:
        compile_egress(without_ports(block))
    except EgressConfigError as exc:
        raise PolicySchemaError(f"egress: {exc}", pos=pos) from None


def _unique_credential_refs(rules: list[dict[str, Any]], decls: tuple[RuleDecl, ...]) -> None:
    """The engine finds a permit's credential by the deciding rule's ref (`file:line`): a rule naming
    a credential must not share its line with another rule."""
    seen: dict[str, int] = {}
    for rule in rules:
        seen[rule["ref"]] = seen.get(rule["ref"], 0) + 1
    for rule, decl in zip(rules, decls, strict=True):
        if "credential" in rule and seen[rule["ref"]] > 1:
            raise PolicySchemaError("a rule that names a credential must be on a line of its own", pos=decl.pos)


def _check_signers(providers: Mapping[str, Mapping[str, Any]], main: PolicyFile) -> None:
    """Checkpoints have one signer: at most one `kms` provider per stack."""
    kms = [name for name, p in providers.items() if p.get("type") == "kms"]
    if len(kms) > 1:
        pos = next((b.pos for b in main.blocks if b.kind == "provider" and b.label == kms[1]), None)
        raise PolicySchemaError(
            f"checkpoints are signed by one key: declare one `kms` provider, not {len(kms)} ({', '.join(kms)})",
            pos=pos,
        )


def _merge_agent(local: dict[str, Any], imported: dict[str, Any]) -> None:
    local["rules"].extend(imported["rules"])
    for key in ("rate_limits", "budgets", "redactions", "alerts"):
        local[key].extend(imported[key])
    for key in ("default", "default_ref", "framework", "command"):
        if local.get(key) is None:
            local[key] = imported.get(key)
    for kind, values in imported["settings"].items():
        local["settings"].setdefault(kind, values)


def _nesting(cond: Any) -> int:
    deepest, stack = 0, [(cond, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_CONDITION_DEPTH:
            break
        stack.extend((child, depth + 1) for child in node if isinstance(child, list))
    return deepest


def _is_credential_free_url(value: str) -> bool:
    """A literal a secret URL field may keep: `scheme://host/path`, no user info, query or fragment.

    Anything else (a libpq `host=… password=…` string, a bare token) is treated as a secret.
    """
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc or any(ch.isspace() for ch in value):
        return False
    return not (_url_carries_credentials(value) or parts.fragment)


def _url_carries_credentials(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    return bool(parts.username or parts.password or parts.query)


def _to_cents(value: Any, name: str, pos: SourcePos) -> int:
    if type(value) not in (int, float) or value < 0:
        raise PolicySchemaError(f"`{name}` must be an amount such as $25 or $10.50", pos=pos)
    cents = round(value * 100)
    if abs(cents - value * 100) > 1e-6:
        raise PolicySchemaError(f"`{name}` has fractions of a cent", pos=pos)
    return int(cents)


def compile_files(
    main: PolicyFile,
    source_digests: Mapping[str, str],
    imports: tuple[ResolvedImport, ...] = (),
    env: Mapping[str, str] | None = None,
    options: CompileOptions | None = None,
    literal_secrets_out: dict[str, str] | None = None,
) -> CompiledPolicy:
    """Compile a parsed stack file plus its resolved imports into an immutable policy.

    Secrets written literally (allowed only with `allow_literal_secrets`) compile to `$env`
    references; their values are handed back through `literal_secrets_out`, never stored.
    """
    c = _Compiler(env or {}, options or CompileOptions())
    runtime, providers, identities = c.file_blocks(main)
    _check_signers(providers, main)
    c.providers = providers
    c.runtime = runtime
    problem = schema.runtime_problem(runtime)
    if problem is not None:
        message, field_name = problem
        where = next(
            (a.pos for b in main.blocks if b.kind == "runtime" for a in b.fields if a.name == field_name), None
        )
        raise PolicySchemaError(message, pos=where)
    if "timezone" in runtime:
        _check_timezone(runtime["timezone"], main)
    trust = c.trust(main)

    def local_ref(pos: SourcePos) -> str:
        return pos.ref()

    agents = c.file_agents(main, local_ref, None)
    import_records = []
    for imp in imports:
        # Validated, never applied (see module docstring); a separate compiler so that literal
        # secrets in an artifact can never land in (or overwrite) the stack's own references. Its
        # rules' credentials name the stack's providers (c.providers): the operator owns those.
        _Compiler(c.env, c.options).file_blocks(imp.file)
        if imp.file.imports:
            raise PolicySchemaError(
                f"imported artifact {imp.path} has imports of its own, which are not supported",
                pos=imp.file.imports[0].pos,
            )

        def import_ref(pos: SourcePos, _path: str = imp.path) -> str:
            return f"{_path}:{pos.line}"

        for agent_id, compiled in c.file_agents(imp.file, import_ref, imp.alias or imp.path).items():
            if agent_id in agents:
                _merge_agent(agents[agent_id], compiled)
            else:
                agents[agent_id] = compiled
        import_records.append(
            {"path": imp.path, "alias": imp.alias, "version": imp.version, "sha256": imp.sha256, "key_id": imp.key_id}
        )
    if runtime.get("supervised_command") and len(agents) > 1:
        raise PolicySchemaError(
            "`runtime.supervised_command` belongs to a stack with a single agent; this stack has "
            f'{len(agents)} ({", ".join(sorted(agents))}): give each agent its own `command = "…"`',
            pos=next((b.pos for b in main.blocks if b.kind == "runtime"), None),
        )
    data = {
        "sources": dict(source_digests),
        "imports": import_records,
        "trust": trust,
        "runtime": runtime,
        "providers": providers,
        "identities": identities,
        "agents": agents,
    }
    if literal_secrets_out is not None:
        literal_secrets_out.update(c.literal_secrets)
    return policy_from_dict(data)


def _check_timezone(name: Any, main: PolicyFile) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    pos = next((a.pos for b in main.blocks if b.kind == "runtime" for a in b.fields if a.name == "timezone"), None)
    try:
        ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise PolicySchemaError(f"unknown timezone {name!r} (use an IANA name such as Europe/Paris)", pos=pos) from None
