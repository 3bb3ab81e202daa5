"""Warnings `check` prints (and fails on with `--strict`): missing defaults, unreachable rules,
shadowed rules, rules that can never match, and credentials handed to an agent that could send them
out through its allowed egress. Pure: works on the compiled policy."""

from __future__ import annotations

from dataclasses import dataclass

from faramesh.engine.policy.model import CompiledPolicy, Rule
from faramesh.engine.policy.toolid import glob_covers, glob_problem


@dataclass(frozen=True)
class Finding:
    code: str
    ref: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "ref": self.ref, "message": self.message}


def _const_false(cond: object) -> bool:
    """Conditions that compare two literals and can be decided now (e.g. `1 > 2`)."""
    if not isinstance(cond, list | tuple) or not cond:
        return False
    if cond[0] == "and":
        return any(_const_false(c) for c in cond[1:])
    if cond[0] == "or":
        return all(_const_false(c) for c in cond[1:])
    if cond[0] == "cmp" and cond[2][0] == "lit" and cond[3][0] == "lit":
        from faramesh.engine.policy.conditions import compile_predicate

        return not compile_predicate(list(cond))({})
    return False


def lint(policy: CompiledPolicy) -> list[Finding]:
    findings: list[Finding] = []
    for agent_id, agent in sorted(policy.agents.items()):
        if agent.default is None:
            findings.append(
                Finding(
                    "MISSING_DEFAULT", agent.ref, f'agent "{agent_id}" has no `default`; unmatched calls are denied'
                )
            )
        earlier: list[Rule] = []
        for rule in agent.rules:
            problem = glob_problem(rule.pattern)
            if problem:
                findings.append(
                    Finding("NEVER_MATCHES", rule.ref, f"`{rule.effect} {rule.pattern}` can never match: {problem}")
                )
            elif rule.condition is not None and _const_false(rule.condition):
                findings.append(
                    Finding(
                        "NEVER_MATCHES", rule.ref, f"the condition of `{rule.effect} {rule.pattern}` is always false"
                    )
                )
            elif not rule.strict:
                blocker = next(
                    (
                        e
                        for e in earlier
                        if e.condition is None and not e.strict and glob_covers(e.pattern, rule.pattern)
                    ),
                    None,
                )
                if blocker is not None:
                    findings.append(
                        Finding(
                            "UNREACHABLE_RULE",
                            rule.ref,
                            f"`{rule.effect} {rule.pattern}` is never reached: `{blocker.effect} {blocker.pattern}` "
                            f"at {blocker.ref} matches first",
                        )
                    )
                else:
                    twin = next(
                        (
                            e
                            for e in earlier
                            if e.condition is not None
                            and e.condition == rule.condition
                            and glob_covers(e.pattern, rule.pattern)
                        ),
                        None,
                    )
                    if twin is not None:
                        findings.append(
                            Finding(
                                "SHADOWED_RULE",
                                rule.ref,
                                f"`{rule.effect} {rule.pattern}` is shadowed by the same condition at {twin.ref}",
                            )
                        )
            earlier.append(rule)
        findings.extend(_exfiltrable_credentials(agent_id, agent.rules, agent.settings.get("egress")))
    return findings


def _exfiltrable_credentials(agent_id: str, rules: tuple[Rule, ...], egress: object) -> list[Finding]:
    """A credential delivered in a permit (SDK tier) is held by the agent for its TTL: with somewhere to
    send it (a non-empty egress allow list), the policy cannot stop it leaving. Said, not refused: the
    operator may accept that, or move the secret to the proxy tier."""
    allow = egress.get("allow") if hasattr(egress, "get") else None
    if not allow:
        return []
    hosts = ", ".join(str(h) for h in list(allow)[:3]) + (" …" if len(allow) > 3 else "")
    return [
        Finding(
            "CREDENTIAL_EXFILTRABLE",
            rule.ref,
            f'`{rule.effect} {rule.pattern}` hands credential "{rule.credential}" to agent "{agent_id}" in the '
            f"permit response, and the agent may reach {hosts} through its egress allow list: it could send "
            "the secret there (SDK-tier delivery is advisory)",
        )
        for rule in rules
        if rule.credential is not None
    ]
