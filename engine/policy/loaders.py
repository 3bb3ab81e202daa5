"""`governance.fms.yaml` / `governance.fms.json` → the same `PolicyFile` the FPL parser produces.

Shape (documented in the README):

    imports: ["github.com/…/policies/stripe@1.0.0", {path: "…@1.0.0", as: stripe}]
    runtime: {mode: enforce, …}
    providers: {vault: {type: vault, addr: 'env("VAULT_ADDR")', …}}
    identities: {prod: {type: spiffe, …}}
    trust: [{publisher: "github.com/faramesh/faramesh-registry", key: "ed25519:…"}]
    rules: [...]                     # v0 flat rules (agent "default")
    agents:
      support-bot:
        default: deny
        framework: langgraph
        command: "python agent.py"
        rules: [{effect: permit, tool: refund, condition: "amount < $25", notify: "#x", reason: "…",
                 credential: "vault:stripe#api_key"}]
        rate_limits: [{tool: refund, limit: 5, per: minute}]
        budgets: {daily: {max: 1000, on_exceed: defer}}
        redactions: [{tool: refund, args: [card.number]}]
        egress: {allow: […]}  model_policy: {…}  session: {…}  alerts: [{on: deny, notify: …}]

A string value written exactly `env("NAME")` is an environment reference, as in FPL.
`effect: "deny!"` is a strict deny. Both formats give line numbers (the line where a mapping starts).
"""

from __future__ import annotations

import bisect
import json
import json.scanner
import re
from typing import Any

import yaml
from faramesh.engine.policy.ast import (
    AgentDecl,
    Assignment,
    Block,
    BudgetDecl,
    EnvRef,
    ImportDecl,
    PolicyFile,
    RateLimitDecl,
    RedactDecl,
    RuleDecl,
    TrustKeyDecl,
    Value,
)
from faramesh.engine.policy.errors import PolicySchemaError, PolicySyntaxError, SourcePos
from faramesh.engine.policy.parser import parse_condition
from faramesh.engine.policy.schema import AGENT_BLOCKS, did_you_mean

_ENV_RE = re.compile(r'^env\("([^"\\]+)"\)$')
_YAML_BOOL = "tag:yaml.org,2002:bool"
_YAML_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_TOP_KEYS = ("imports", "runtime", "providers", "identities", "trust", "agents", "rules")
_AGENT_KEYS = (
    "default",
    "framework",
    "command",
    "description",
    "rules",
    "rate_limits",
    "budgets",
    "redactions",
    "alerts",
    # `alert` repeats, so YAML/JSON spell it `alerts: [...]`; a singular `alert:` key is unknown
    # (and gets "did you mean `alerts`") rather than silently dropped.
    *(kind for kind in AGENT_BLOCKS if kind != "alert"),
)


class _Lines:
    """Source positions for nodes of the document: YAML marks, or JSON pointers for JSON."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.by_id: dict[int, int] = {}

    def pos(self, node: Any, fallback: SourcePos | None = None) -> SourcePos:
        line = self.by_id.get(id(node))
        if line is not None:
            return SourcePos(self.file, line)
        return fallback or SourcePos(self.file, 1)


def _load_yaml(text: str, lines: _Lines) -> Any:
    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            # Anchors/aliases let a few lines expand into gigabytes ("billion laughs"); a policy
            # never needs them, so they are refused outright.
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise PolicySyntaxError(
                    "YAML aliases (*name) are not allowed in a policy",
                    pos=SourcePos(lines.file, event.start_mark.line + 1, event.start_mark.column + 1),
                )
            return super().compose_node(parent, index)

    # YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans, which turns `alerts: [{on: deny}]` into
    # `{True: "deny"}`. Only true/false are booleans here (as in YAML 1.2 and FPL).
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _YAML_BOOL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(_YAML_BOOL, _YAML_BOOL_RE, list("tTfF"))

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise PolicySyntaxError(
                    f"key {key!r} appears twice", pos=SourcePos(lines.file, key_node.start_mark.line + 1)
                )
            seen.add(key)
        mapping = loader.construct_mapping(node, deep=True)
        lines.by_id[id(mapping)] = node.start_mark.line + 1
        return mapping

    def construct_sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> list[Any]:
        seq = loader.construct_sequence(node, deep=True)
        lines.by_id[id(seq)] = node.start_mark.line + 1
        return seq

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, construct_sequence)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        pos = SourcePos(lines.file, mark.line + 1, mark.column + 1) if mark else None
        raise PolicySyntaxError(f"invalid YAML: {exc.problem}", pos=pos) from None
    except yaml.YAMLError as exc:
        raise PolicySyntaxError(f"invalid YAML: {exc}", pos=SourcePos(lines.file, 1)) from None
    except RecursionError:
        raise PolicySyntaxError("invalid YAML: nested too deeply", pos=SourcePos(lines.file, 1)) from None


def _load_json(text: str, lines: _Lines) -> Any:
    file = lines.file

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise PolicySyntaxError(f"key {k!r} appears twice")  # the position is added below
            out[k] = v
        return out

    # The stdlib decoder keeps no positions; wrap its object/array parsers (pure-Python scanner) so
    # every mapping and list remembers the line it starts on, as YAML nodes do.
    decoder: Any = json.JSONDecoder(object_pairs_hook=no_dupes)  # its parser hooks are untyped
    parse_object, parse_array = decoder.parse_object, decoder.parse_array

    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_at(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    def tracked_object(s_and_end: tuple[str, int], *rest: Any) -> tuple[Any, int]:
        start = s_and_end[1] - 1
        try:
            value, end = parse_object(s_and_end, *rest)
        except PolicySyntaxError as exc:
            if exc.pos is not None:
                raise
            raise PolicySyntaxError(exc.message, pos=SourcePos(file, line_at(start))) from None
        lines.by_id[id(value)] = line_at(start)
        return value, end

    def tracked_array(s_and_end: tuple[str, int], *rest: Any) -> tuple[Any, int]:
        value, end = parse_array(s_and_end, *rest)
        lines.by_id[id(value)] = line_at(s_and_end[1] - 1)
        return value, end

    decoder.parse_object = tracked_object
    decoder.parse_array = tracked_array
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise PolicySyntaxError(f"invalid JSON: {exc.msg}", pos=SourcePos(file, exc.lineno, exc.colno)) from None
    except RecursionError:
        raise PolicySyntaxError("invalid JSON: nested too deeply", pos=SourcePos(file, 1)) from None


class _Builder:
    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.file = lines.file

    def value(self, v: Any, pos: SourcePos) -> Value:
        if isinstance(v, str):
            m = _ENV_RE.match(v.strip())
            return EnvRef(m.group(1), pos) if m else v
        if isinstance(v, bool | int | float):
            return v
        if isinstance(v, list):
            return tuple(self.value(x, pos) for x in v)
        raise PolicySchemaError(f"unsupported value {v!r}", pos=pos)

    def mapping(self, node: Any, what: str, pos: SourcePos) -> dict[str, Any]:
        if not isinstance(node, dict):
            raise PolicySchemaError(f"{what} must be a mapping", pos=pos)
        return node

    def seq(self, node: Any, what: str, pos: SourcePos) -> list[Any]:
        if not isinstance(node, list):
            raise PolicySchemaError(f"{what} must be a list", pos=pos)
        return node

    def assignments(self, node: dict[str, Any], pos: SourcePos) -> tuple[Assignment, ...]:
        return tuple(Assignment(str(k), self.value(v, pos), pos) for k, v in node.items())

    def rule(self, node: Any, ptr: str, parent: SourcePos) -> RuleDecl:
        pos = self.lines.pos(node, parent)
        r = self.mapping(node, f"rule {ptr}", pos)
        known = ["effect", "tool", "condition", "notify", "reason", "credential", "credential_via"]
        unknown = set(r) - set(known)
        if unknown:
            bad = sorted(unknown)[0]
            raise PolicySchemaError(f"unknown rule field `{bad}`" + did_you_mean(bad, known), pos=pos)
        effect = r.get("effect")
        if effect not in ("permit", "defer", "deny", "deny!"):
            raise PolicySchemaError(f"rule effect must be permit, defer, deny or deny! (got {effect!r})", pos=pos)
        tool = r.get("tool")
        if not isinstance(tool, str):
            raise PolicySchemaError("rule `tool` must be a string", pos=pos)
        cond = r.get("condition")
        parsed = None
        if cond is not None:
            if not isinstance(cond, str):
                raise PolicySchemaError("rule `condition` must be a string in FPL expression syntax", pos=pos)
            parsed = parse_condition(cond, self.file, pos)
        if "credential_via" in r and "credential" not in r:
            raise PolicySchemaError("rule `credential_via` needs a `credential`", pos=pos)
        for key in ("notify", "reason", "credential", "credential_via"):
            if key in r and not isinstance(r[key], str):
                raise PolicySchemaError(f"rule `{key}` must be a string", pos=pos)
        return RuleDecl(
            "deny" if effect == "deny!" else effect,
            effect == "deny!",
            tool,
            parsed,
            r.get("notify"),
            r.get("reason"),
            pos,
            r.get("credential"),
            r.get("credential_via"),
        )

    def agent(self, agent_id: str, node: Any, parent: SourcePos) -> AgentDecl:
        pos = self.lines.pos(node, parent)
        a = self.mapping(node, f'agent "{agent_id}"', pos)
        for key in a:
            if key not in _AGENT_KEYS:
                raise PolicySchemaError(
                    f'unknown field `{key}` in agent "{agent_id}"' + did_you_mean(key, _AGENT_KEYS), pos=pos
                )
        rules = tuple(
            self.rule(r, f"{agent_id}/rules/{i}", pos) for i, r in enumerate(self.seq(a.get("rules", []), "rules", pos))
        )
        rates = []
        for rl in self.seq(a.get("rate_limits", []), "rate_limits", pos):
            rpos = self.lines.pos(rl, pos)
            rl = self.mapping(rl, "rate limit", rpos)
            if (
                not isinstance(rl.get("tool"), str)
                or type(rl.get("limit")) not in (int, float)
                or not isinstance(rl.get("per"), str)
            ):
                raise PolicySchemaError(
                    "a rate limit is {tool: <glob>, limit: <number>, per: second|minute|hour|day}", pos=rpos
                )
            rates.append(RateLimitDecl(rl["tool"], rl["limit"], rl["per"], rpos))
        budgets = []
        for name, b in self.mapping(a.get("budgets", {}), "budgets", pos).items():
            bpos = self.lines.pos(b, pos)
            budgets.append(BudgetDecl(str(name), self.assignments(self.mapping(b, f"budget {name}", bpos), bpos), bpos))
        redactions = []
        for rd in self.seq(a.get("redactions", []), "redactions", pos):
            rpos = self.lines.pos(rd, pos)
            rd = self.mapping(rd, "redaction", rpos)
            if not isinstance(rd.get("tool"), str) or not isinstance(rd.get("args"), list):
                raise PolicySchemaError("a redaction is {tool: <glob>, args: [<dotted paths>]}", pos=rpos)
            redactions.append(RedactDecl(rd["tool"], tuple(self.value(x, rpos) for x in rd["args"]), rpos))
        blocks = []
        for kind in AGENT_BLOCKS:
            if kind in a and kind != "alert":
                bpos = self.lines.pos(a[kind], pos)
                blocks.append(Block(kind, None, self.assignments(self.mapping(a[kind], kind, bpos), bpos), bpos))
        for al in self.seq(a.get("alerts", []), "alerts", pos):
            apos = self.lines.pos(al, pos)
            blocks.append(Block("alert", None, self.assignments(self.mapping(al, "alert", apos), apos), apos))
        fields = tuple(Assignment(k, self.value(a[k], pos), pos) for k in ("command", "description") if k in a)
        default = a.get("default")
        if default is not None and not isinstance(default, str):
            raise PolicySchemaError("`default` must be permit, defer or deny", pos=pos)
        framework = a.get("framework")
        return AgentDecl(
            agent_id=agent_id,
            pos=pos,
            default=default,
            default_pos=pos if default is not None else None,
            framework=framework if isinstance(framework, str) else None,
            rules=rules,
            rate_limits=tuple(rates),
            budgets=tuple(budgets),
            redactions=tuple(redactions),
            blocks=tuple(blocks),
            fields=fields,
        )

    def document(self, doc: Any) -> PolicyFile:
        top = SourcePos(self.file, 1)
        if doc is None:
            doc = {}
        d = self.mapping(doc, "the document", top)
        for key in d:
            if key not in _TOP_KEYS:
                raise PolicySchemaError(
                    f"unknown top-level key `{key}`" + did_you_mean(str(key), _TOP_KEYS), pos=self.lines.pos(d, top)
                )
        imports = []
        for imp in self.seq(d.get("imports", []), "imports", top):
            ipos = self.lines.pos(imp, top)
            if isinstance(imp, str):
                imports.append(ImportDecl(imp, None, ipos))
            elif isinstance(imp, dict) and isinstance(imp.get("path"), str):
                alias = imp.get("as")
                imports.append(ImportDecl(imp["path"], alias if isinstance(alias, str) else None, ipos))
            else:
                raise PolicySchemaError('an import is "<path>@<version>" or {path: …, as: …}', pos=ipos)
        blocks = []
        if "runtime" in d:
            rpos = self.lines.pos(d["runtime"], top)
            blocks.append(
                Block("runtime", None, self.assignments(self.mapping(d["runtime"], "runtime", rpos), rpos), rpos)
            )
        for key, kind in (("providers", "provider"), ("identities", "identity")):
            section = self.mapping(d.get(key, {}), key, top)
            for label, body in section.items():
                bpos = self.lines.pos(body, top)
                blocks.append(
                    Block(kind, str(label), self.assignments(self.mapping(body, f"{kind} {label}", bpos), bpos), bpos)
                )
        trust = []
        for t in self.seq(d.get("trust", []), "trust", top):
            tpos = self.lines.pos(t, top)
            if not isinstance(t, dict) or not isinstance(t.get("publisher"), str) or not isinstance(t.get("key"), str):
                raise PolicySchemaError('a trust entry is {publisher: "…", key: "ed25519:…"}', pos=tpos)
            trust.append(TrustKeyDecl(t["publisher"], t["key"], tpos))
        agents = tuple(
            self.agent(str(aid), body, top) for aid, body in self.mapping(d.get("agents", {}), "agents", top).items()
        )
        flat = tuple(self.rule(r, f"rules/{i}", top) for i, r in enumerate(self.seq(d.get("rules", []), "rules", top)))
        return PolicyFile(self.file, tuple(imports), tuple(blocks), tuple(trust), agents, flat)


def load_yaml(text: str, file: str = "governance.fms.yaml") -> PolicyFile:
    lines = _Lines(file)
    return _Builder(lines).document(_load_yaml(text, lines))


def load_json(text: str, file: str = "governance.fms.json") -> PolicyFile:
    lines = _Lines(file)
    return _Builder(lines).document(_load_json(text, lines))
