"""The two benchmark workloads and their request streams, built deterministically.

Each workload is described once, as data (`BenchRule`), and rendered both to FPL (for Faramesh) and,
in cedar_policies.py, to Cedar. The seed workload is the exception: its FPL and Cedar texts are written
out by hand, because they are what a reader compares side by side, and the bench's correctness check
is what proves the two agree.

Request streams hold one fresh request per timed call (the args dict is never reused), so nothing in
either engine can key a cache on args. Tool ids are drawn from a small pre-generated pool that mixes
hits on literal rules, hits on glob rules and misses, as an agent's traffic would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

AGENT = "support-bot"
# A fixed receive time: the rate-limit and budget checks read it, and a constant keeps runs identical.
REQUEST_TIME = 1_700_000_000.0

SEED_FPL = """\
agent "support-bot" {
  default deny
  rules {
    permit knowledgebase/search
    permit ticket/read
    permit refund if amount < $25
    defer refund if amount < $500
    deny refund
  }
  rate_limit "refund": 5 per minute
  budget daily { max $1000 on_exceed defer }
}
"""

# Seed traffic: mostly refunds (the interesting rules), some reads, some tools no rule names.
_SEED_TOOLS: tuple[tuple[str, float], ...] = (
    ("refund", 0.60),
    ("ticket/read", 0.15),
    ("knowledgebase/search", 0.10),
    ("ticket/write", 0.10),
    ("admin/delete-user", 0.05),
)

# ---- the generated 1,000-rule policy -------------------------------------------------------------

# One condition atom: (arg name, operator, literal). A rule's condition is a conjunction of atoms,
# which is all the generator emits; `in` takes a tuple of strings.
Atom = tuple[str, str, int | str | tuple[str, ...]]

REGIONS = ("eu", "us", "apac", "cn")
TIERS = ("free", "silver", "gold")
LITERAL_SERVICES = 100  # svc0..svc99 carry literal rules (and conditional globs)
RESTRICTED_SERVICES = range(100, 120)  # svc100..svc119: blanket `deny svcN/*` rules live here
MISS_SERVICES = range(120, 160)  # no rule names these: pure misses
OPS = 30


@dataclass(frozen=True, slots=True)
class BenchRule:
    effect: str  # permit | defer | deny
    strict: bool  # deny!
    pattern: str  # a literal tool id, or a glob with exactly one trailing `*`
    cond: tuple[Atom, ...]  # conjunction; () = unconditional

    @property
    def is_glob(self) -> bool:
        return self.pattern.endswith("*")

    @property
    def prefix(self) -> str:
        return self.pattern[:-1] if self.is_glob else self.pattern

    def matches(self, tool: str) -> bool:
        return tool.startswith(self.prefix) if self.is_glob else tool == self.pattern


def _fpl_literal(value: int | str | tuple[str, ...]) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def fpl_condition(cond: tuple[Atom, ...]) -> str:
    return " and ".join(f"{name} {op} {_fpl_literal(value)}" for name, op, value in cond)


def render_fpl(rules: list[BenchRule]) -> str:
    lines = [f'agent "{AGENT}" {{', "  default deny", "  rules {"]
    for r in rules:
        effect = "deny!" if r.strict else r.effect
        tail = f" if {fpl_condition(r.cond)}" if r.cond else ""
        lines.append(f"    {effect} {r.pattern}{tail}")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _random_cond(rng: random.Random, atoms: int) -> tuple[Atom, ...]:
    """`atoms` distinct-field atoms: numbers (<, >), string equality and `in` lists."""
    out: list[Atom] = []
    fields = rng.sample(("amount", "region", "tier"), atoms)
    for name in fields:
        if name == "amount":
            out.append(("amount", rng.choice(("<", "<", ">")), rng.randrange(50, 2000, 50)))
        elif name == "region":
            if rng.random() < 0.5:
                out.append(("region", "==", rng.choice(REGIONS)))
            else:
                out.append(("region", "in", tuple(sorted(rng.sample(REGIONS, 2)))))
        else:
            if rng.random() < 0.5:
                out.append(("tier", "==", rng.choice(TIERS)))
            else:
                out.append(("tier", "in", tuple(sorted(rng.sample(TIERS, 2)))))
    return tuple(out)


def generate_rules(n: int = 1000, seed: int = 1729) -> list[BenchRule]:
    """A deterministic mix: ~75% literal ids, ~20% prefix globs, ~5% `deny!`; most rules conditional."""
    rng = random.Random(seed)
    rules: list[BenchRule] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            # deny! overrides any permit, wherever it sits: a literal or a glob, always conditional.
            svc = rng.randrange(LITERAL_SERVICES)
            pattern = f"svc{svc}/op{rng.randrange(OPS)}" if rng.random() < 0.5 else f"svc{svc}/*"
            rules.append(BenchRule("deny", True, pattern, _random_cond(rng, 1)))
        elif r < 0.25:
            if rng.random() < 0.3:
                # Blanket service denies only on the restricted services, so they do not shadow
                # (and so make dead) most of the literal rules below them.
                svc = rng.choice(RESTRICTED_SERVICES)
                rules.append(BenchRule("deny", False, f"svc{svc}/*", ()))
            else:
                svc = rng.randrange(LITERAL_SERVICES)
                pattern = f"svc{svc}/*" if rng.random() < 0.5 else f"svc{svc}/op{rng.randrange(1, 10)}*"
                effect = rng.choices(("permit", "defer", "deny"), (0.45, 0.30, 0.25))[0]
                rules.append(BenchRule(effect, False, pattern, _random_cond(rng, rng.choice((1, 1, 2)))))
        else:
            pattern = f"svc{rng.randrange(LITERAL_SERVICES)}/op{rng.randrange(OPS)}"
            effect = rng.choices(("permit", "defer", "deny"), (0.55, 0.20, 0.25))[0]
            atoms = rng.choices((0, 1, 2), (0.3, 0.5, 0.2))[0]
            rules.append(BenchRule(effect, False, pattern, _random_cond(rng, atoms) if atoms else ()))
    return rules


# ---- request streams -----------------------------------------------------------------------------


def _request(tool: str, args: dict[str, Any]) -> dict[str, Any]:
    # The shape the wire decoder yields, with the engine's receive time stamped.
    return {"agent_id": AGENT, "tool_id": tool, "args": args, "time": REQUEST_TIME}


def seed_requests(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tools = [t for t, _ in _SEED_TOOLS]
    weights = [w for _, w in _SEED_TOOLS]
    # Amounts straddle both thresholds ($25, $500) so every outcome is exercised.
    amounts = [rng.randrange(0, 1200) for _ in range(count)]
    picks = rng.choices(tools, weights, k=count)
    return [_request(tool, {"amount": amount}) for tool, amount in zip(picks, amounts, strict=True)]


def tool_pool(rules: list[BenchRule], size: int, rng: random.Random) -> list[str]:
    """~40% ids named by literal rules, ~30% ids only globs match, ~30% ids no rule matches."""
    literals = sorted({r.pattern for r in rules if not r.is_glob})
    globs = sorted({r.prefix for r in rules if r.is_glob})
    pool: list[str] = []
    for _ in range(size):
        r = rng.random()
        if r < 0.4:
            pool.append(rng.choice(literals))
        elif r < 0.7:
            # A suffix is always appended: a bare prefix such as `svc7/` is not a canonical id.
            pool.append(rng.choice(globs) + rng.choice(("0", "7/sub", "x-report", "op99")))
        else:
            svc = rng.choice(MISS_SERVICES)
            pool.append(f"svc{svc}/op{rng.randrange(OPS)}" if rng.random() < 0.8 else f"mail{svc}/send")
    return pool


def _large_args(rng: random.Random) -> dict[str, Any]:
    return {"amount": rng.randrange(0, 2000), "region": rng.choice(REGIONS), "tier": rng.choice(TIERS)}


def large_requests(rules: list[BenchRule], count: int, seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool = tool_pool(rules, 512, rng)
    return [_request(rng.choice(pool), _large_args(rng)) for _ in range(count)]


def large_requests_unique_tools(rules: list[BenchRule], count: int, seed: int = 13) -> list[dict[str, Any]]:
    """Every glob hit and miss carries a tool id never seen before, so the engine's candidate cache
    (keyed on tool id, bounded) cannot serve it: the index lookup runs on every such call. Literal
    hits necessarily repeat ids and may still be served from the cache."""
    rng = random.Random(seed)
    base = tool_pool(rules, 512, rng)
    literals = {r.pattern for r in rules if not r.is_glob}
    out: list[dict[str, Any]] = []
    for i in range(count):
        tool = rng.choice(base)
        if tool not in literals:
            tool = f"{tool}-u{i}"  # still a glob hit (globs end in `*`) or still a miss
        out.append(_request(tool, _large_args(rng)))
    return out
