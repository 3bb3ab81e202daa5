"""The decision pipeline around the pure evaluator, and the engine state it owns.

identity → rule match → conditions → rate limit → budget → egress (SDK tier: host arguments, for permits
and defers of an agent with an `egress` block) → (approvals for defers) → redaction → decision → DPR
draft. The result is a `Verdict`: the reply to send, the record to append and the
approval writes to commit with it. Nothing here does I/O; the server appends the record to the WAL
and sends the reply only once it has committed. Time, randomness and the engine key are passed in.

Step 9, the credential broker, sits between the decision and the DPR append: the server asks
`credential_for` which secret a permit needs, fetches it from the provider (I/O, in the server), and
settles the verdict with `grant_credential` (the DPR records the reference, version, delivery tier and
expiry — never the value) or `deny_credential` (the permit becomes DENY CREDENTIAL_UNAVAILABLE and its
state changes are undone: a failing provider never leads to a permit).

Fleet budgets (`scope = "fleet"`) are the budget step's I/O: a permit on one carries a `FleetClaim`
(`Verdict.fleet`); the server asks the fleet's database (engine/wal/pg_store.py `FleetBudgets`) before
anything else happens to the permit, and `fleet_outcome` reads the answer — the permit stands, or
becomes BUDGET_EXCEEDED or BUDGET_UNAVAILABLE with its state changes undone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Any

from faramesh.engine.egress import EgressConfigError, EgressPolicy, check_args, compile_egress, without_ports
from faramesh.engine.identity.base import IdentityResult
from faramesh.engine.policy.evaluate import DEFER, DENY, PERMIT, Decision, evaluate
from faramesh.engine.policy.limits import (
    FLEET,
    GRANTED,
    REFUSED,
    BudgetUsage,
    FleetClaim,
    FleetOutcome,
    FleetUsage,
    RateBucket,
    StateSnapshot,
    estimate_cost_cents,
    fleet_claim,
    fleet_flag,
    period_bounds,
    spend_rate,
)
from faramesh.engine.policy.model import Agent, CompiledPolicy
from faramesh.engine.policy.schema import DEFAULT_FLEET
from faramesh.engine.policy.toolid import glob_matches
from faramesh.engine.wal.dpr import REDACTED, NonCanonicalArgs, canonical_bytes, digest_of, hmac_hex, redact

DEFAULT_APPROVAL_TTL = 86400
RESERVATION_TTL = 3600  # runtime.reservation_ttl unset


def reservation_ttl(policy: CompiledPolicy) -> float:
    return float(policy.runtime.get("reservation_ttl", RESERVATION_TTL))


def fleet_name(policy: CompiledPolicy) -> str:
    return str(policy.runtime.get("fleet", DEFAULT_FLEET))


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end: fixed by the socket reached, never by what the peer says."""

    role: str  # agent | operator | dev
    agent_id: str | None  # the socket's agent (role agent); None where any agent may be named
    uid: int | None = None
    pid: int | None = None
    socket: str = ""


@dataclass
class Approval:
    id: str
    status: str  # PENDING | APPROVED | DENIED | EXPIRED | USED
    agent_id: str
    tool: str
    args_hmac: str
    created_at: str
    expires_at: int
    args_digest: str
    resolved_at: str | None = None
    approver: str | None = None
    reason: str | None = None
    action_id: str | None = None
    used_by: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def public(self, now: float) -> dict[str, Any]:
        row = self.to_row()
        row.pop("args_hmac")
        row["status"] = self.effective_status(now)
        return row

    def effective_status(self, now: float) -> str:
        if self.status in ("PENDING", "APPROVED", "DENIED") and now >= self.expires_at:
            return "EXPIRED"
        return self.status


@dataclass
class Verdict:
    reply: dict[str, Any]
    record: dict[str, Any]
    args_bytes: bytes | None
    approval_writes: list[dict[str, Any]] = field(default_factory=list)
    decision: Decision | None = None
    # State changes to revert, newest last, when the record cannot be committed (WAL-first: a decision
    # that is not on disk was never made).
    undo: list[Callable[[], None]] = field(default_factory=list)
    # A permit on fleet budgets: the reservation the server must obtain from the database before the
    # permit stands (`EngineState.fleet_outcome` reads the answer).
    fleet: FleetClaim | None = None
    # The same call finished with another decision (a fleet budget refused it): a fresh Verdict.
    refinish: Callable[[Decision, dict[str, Any]], Verdict] | None = field(default=None, repr=False)


@dataclass
class Reservation:
    agent_id: str
    cents: int
    budgets: tuple[str, ...]  # the local budgets charged (in `EngineState.budgets`)
    expires_at: float
    fleet: tuple[str, ...] = ()  # the fleet budgets reserved on in the database (settled there)


class EngineState:
    """Mutable engine state: rate buckets, budget usage and reservations, approvals."""

    def __init__(self, policy: CompiledPolicy, *, hmac_key: bytes, dev: bool, mode_override: str | None = None) -> None:
        self.policy = policy
        self.hmac_key = hmac_key
        self.dev = dev
        self.mode_override = mode_override
        self.rate: dict[tuple[str, str], RateBucket] = {}
        self.budgets: dict[tuple[str, str], BudgetUsage] = {}
        self.reservations: dict[str, Reservation] = {}
        # Fleet budgets as the database last reported them to this engine (for `status` only: the
        # database, not this copy, decides).
        self.fleet_seen: dict[tuple[str, str], dict[str, Any]] = {}
        # `faramesh dev` has no fleet database: it keeps fleet budgets here, as local ones (a dev session is
        # one engine, so the budget means the same).
        self.fleet_local = dev
        self.approvals: dict[str, Approval] = {}
        self._approval_index: dict[tuple[str, str, str], str] = {}
        self._snapshot = StateSnapshot(MappingProxyType(self.rate), MappingProxyType(self.budgets))
        self._egress: dict[str, tuple[Agent, EgressPolicy | EgressConfigError]] = {}

    @property
    def mode(self) -> str:
        return self.mode_override or str(self.policy.runtime.get("mode", "enforce"))

    # ---- approvals
    def add_approval(self, approval: Approval) -> None:
        self.approvals[approval.id] = approval
        self._approval_index[(approval.agent_id, approval.tool, approval.args_hmac)] = approval.id

    def matching_approval(self, agent_id: str, tool: str, hmac_hex: str) -> Approval | None:
        aid = self._approval_index.get((agent_id, tool, hmac_hex))
        return self.approvals.get(aid) if aid else None

    def _unuse_approval(self, approval: Approval) -> None:
        if approval.status == "USED":
            approval.status, approval.used_by = "APPROVED", None

    def _drop_approval(self, approval: Approval) -> None:
        self.approvals.pop(approval.id, None)
        key = (approval.agent_id, approval.tool, approval.args_hmac)
        if self._approval_index.get(key) == approval.id:
            del self._approval_index[key]

    def pending_approvals(self, now: float) -> list[Approval]:
        return [a for a in self.approvals.values() if a.effective_status(now) == "PENDING"]

    # ---- rate and budget bookkeeping
    def spend(self, agent_id: str, tool: str, now: float) -> None:
        agent = self.policy.agents.get(agent_id)
        if agent is None:
            return
        for limit in agent.rate_limits:
            if glob_matches(limit.pattern, tool):
                key = (agent_id, limit.pattern)
                self.rate[key] = spend_rate(limit, self.rate.get(key), now)

    def charge(self, agent_id: str, cents: int, now: float, *, reserved: bool) -> tuple[str, ...]:
        """Add a call to each budget: reserved (pending settlement) or spent."""
        agent = self.policy.agents.get(agent_id)
        names = []
        if agent is None:
            return ()
        for budget in agent.budgets:
            if budget.scope == FLEET and not self.fleet_local:  # kept in the fleet's database, never here
                continue
            start, _ = period_bounds(budget.period, now)
            key = (agent_id, budget.name)
            usage = self.budgets.get(key)
            if usage is None or usage.period_start != start:
                usage = BudgetUsage(start)
            self.budgets[key] = BudgetUsage(
                start,
                usage.spent_cents + (0 if reserved else cents),
                usage.reserved_cents + (cents if reserved else 0),
                usage.calls + 1,
            )
            names.append(budget.name)
        return tuple(names)

    def settle(self, action_id: str, actual_cents: int, now: float) -> bool:
        """Replace a reservation by the actual cost (or by the estimate when it expires)."""
        res = self.reservations.pop(action_id, None)
        if res is None:
            return False
        self.settle_reservation(res, actual_cents, now)
        return True

    def settle_reservation(self, res: Reservation, actual_cents: int, now: float) -> None:
        agent = self.policy.agents.get(res.agent_id)
        if agent is None:
            return
        for budget in agent.budgets:
            if budget.name not in res.budgets:
                continue
            key = (res.agent_id, budget.name)
            usage = self.budgets.get(key)
            start, _ = period_bounds(budget.period, now)
            if usage is None or usage.period_start != start:
                continue  # the period rolled over: the new period owes nothing for it
            self.budgets[key] = BudgetUsage(
                usage.period_start,
                usage.spent_cents + max(0, actual_cents),
                max(0, usage.reserved_cents - res.cents),
                usage.calls,
            )

    def _unreserve(self, action_id: str) -> None:
        """Undo a permit's reservation that was never recorded."""
        res = self.reservations.pop(action_id, None)
        if res is None:
            return
        for name in res.budgets:
            usage = self.budgets.get((res.agent_id, name))
            if usage is not None:
                self.budgets[(res.agent_id, name)] = BudgetUsage(
                    usage.period_start,
                    usage.spent_cents,
                    max(0, usage.reserved_cents - res.cents),
                    max(0, usage.calls - 1),
                )

    def _unspend(self, agent_id: str, tool: str) -> None:
        """Give back the rate tokens a never-recorded decision spent."""
        agent = self.policy.agents.get(agent_id)
        if agent is None:
            return
        for limit in agent.rate_limits:
            key = (agent_id, limit.pattern)
            bucket = self.rate.get(key)
            if bucket is not None and glob_matches(limit.pattern, tool):
                self.rate[key] = RateBucket(min(float(limit.count), bucket.tokens + 1.0), bucket.updated_at)

    def expire_reservations(self, now: float) -> None:
        """Settle expired reservations at their estimate. The TTL is constant, so the dict's insertion
        order is expiry order: only the front is looked at, never the whole table (O(expired))."""
        reservations = self.reservations
        while reservations:
            action_id = next(iter(reservations))
            if now < reservations[action_id].expires_at:
                break
            self.settle(action_id, reservations[action_id].cents, now)
            reservations.pop(action_id, None)  # settle pops it; make sure a miss cannot loop forever

    # ---- the pipeline
    def govern(
        self,
        fields: dict[str, Any],
        peer: Peer,
        *,
        now: float,
        new_id: Callable[[], str],
        timestamp: str,
        started_ns: int,
        clock_ns: Callable[[], int],
        identity: IdentityResult | None = None,
    ) -> Verdict:
        """`identity`: what the engine's verifier (engine/identity/) made of this call; its claims are
        the only source of `principal.*` — an agent's own `principal` field is never trusted (dev takes
        it, marked unverified, so principal conditions can be tried without an identity provider)."""
        call_id = fields.get("call_id")
        claimed = fields.get("agent_id")
        raw_tool = fields["tool_id"]
        raw_args = fields.get("args") or {}
        action_id = new_id()
        agent_id = peer.agent_id if peer.role == "agent" else claimed
        base = {
            "id": action_id,
            "time": timestamp,
            "action_type": "tool_call",
            "agent_id": agent_id if isinstance(agent_id, str) else None,
            "identity": {
                "method": "socket",
                "role": peer.role,
                "socket": peer.socket,
                "peer_uid": peer.uid,
                "peer_pid": peer.pid,
                "claimed_agent_id": claimed,
            },
            "tier": "sdk",
            "session_id": fields.get("session_id"),
            "call_id": call_id,
            "tool": raw_tool,
            "policy_version": self.policy.version,
            "mode": self.mode,
            "credential_ref": None,
            "cost_cents": 0,
            "approval_id": None,
            "approver": None,
            "dev": self.dev,
        }

        if identity is not None:
            base["identity"].update(identity.record)
            base["identity"]["method"] = identity.method
            if identity.subject is not None:
                base["identity"]["subject"] = identity.subject
        principal: dict[str, Any] = dict(identity.claims) if identity is not None and identity.ok else {}
        verified = identity is not None and identity.ok and identity.method not in ("peercred", "socket")
        if self.dev and not verified and isinstance(fields.get("principal"), dict):
            # dev only: no identity provider runs, so the request's own claims stand in — marked as such.
            principal = {**principal, **fields["principal"]}
            base["identity"]["principal"] = "unverified (dev: taken from the request)"

        def finish(
            decision: Decision, *, digest: str | None, args_bytes: bytes | None, extra: dict[str, Any] | None = None
        ) -> Verdict:
            effect, code = decision.effect, decision.code
            enforced = {"effect": effect, "code": code}
            if self.mode == "audit" and effect != PERMIT:
                # audit mode: everything goes ahead; the record says what enforce would have done
                enforced = {"effect": PERMIT, "code": "AUDIT_MODE_PERMIT"}
            record = dict(base)
            record.update(
                {
                    "effect": enforced["effect"],
                    "code": enforced["code"],
                    "policy_effect": effect,
                    "policy_code": code,
                    "rule_ref": decision.rule_ref,
                    "args_digest": digest,
                    "latency_us": (clock_ns() - started_ns) // 1000,
                }
            )
            if extra:
                record.update(extra)
            reply: dict[str, Any] = {
                "call_id": call_id,
                "effect": enforced["effect"],
                "action_id": action_id,
                "latency_us": record["latency_us"],
            }
            if enforced["effect"] == PERMIT and record.get("approval_id"):
                # a permit that an operator's approval granted says so, and who approved it
                reply["approval_id"] = record["approval_id"]
                reply["approver"] = record.get("approver")
            if enforced["effect"] != PERMIT:
                reply["structured_denial"] = _structured_denial(
                    decision, record.get("approval_id"), record.get("approval_reason")
                )
                if enforced["effect"] == DEFER and record.get("approval_id"):
                    reply["defer_token"] = record["approval_id"]
            return Verdict(reply, record, args_bytes, decision=decision)

        if peer.role == "agent" and claimed is not None and claimed != peer.agent_id:
            return finish(
                Decision(DENY, "IDENTITY_MISMATCH", None, "agent_id does not match the socket's agent"),
                digest=None,
                args_bytes=None,
            )
        if not isinstance(agent_id, str):
            return finish(
                Decision(DENY, "INVALID_REQUEST", None, "agent_id is required on this socket"),
                digest=None,
                args_bytes=None,
            )
        if identity is not None and not identity.ok:  # the verifier could not vouch for the caller: fail closed
            return finish(
                Decision(
                    DENY, identity.code or "IDENTITY_UNAVAILABLE", None, identity.message or "identity not verified"
                ),
                digest=None,
                args_bytes=None,
            )
        try:
            raw_bytes = canonical_bytes(raw_args)  # once: HMAC, digest and replay copy all derive from it
            raw_hmac = hmac_hex(self.hmac_key, raw_bytes)
        except NonCanonicalArgs:
            return finish(
                Decision(DENY, "ARGS_NOT_CANONICAL", None, "args cannot be canonicalised (RFC 8785)"),
                digest=None,
                args_bytes=None,
            )
        request = {
            "agent_id": agent_id,
            "tool_id": raw_tool,
            "args": raw_args,
            "principal": principal,
            "time": now,
        }
        decision = evaluate(self.policy, request, self._snapshot)
        tool = decision.tool or raw_tool
        agent = self.policy.agents.get(agent_id)
        paths: tuple[str, ...] = ()
        if agent is not None and decision.tool is not None:
            paths = tuple(p for r in agent.redactions if glob_matches(r.pattern, decision.tool) for p in r.paths)
        # Args are digested and kept for replay only when the policy identified the agent and the tool,
        # so its redactions applied. A call it could not identify gets neither: storing or hashing its
        # raw args would put fields a redaction exists to protect (a card number) on disk, or a hash of
        # them that a low-entropy value cannot survive.
        identified = agent is not None and decision.tool is not None
        redacted_bytes = (canonical_bytes(redact(raw_args, paths)) if paths else raw_bytes) if identified else None
        digest = digest_of(redacted_bytes) if redacted_bytes is not None else None
        extra: dict[str, Any] = {"tool": tool}
        approval_writes: list[dict[str, Any]] = []
        undo: list[Callable[[], None]] = []
        if decision.effect in (PERMIT, DEFER) and agent is not None and decision.tool is not None:
            # Egress (SDK tier) after rate limit and budget, before any approval is created or used: a
            # call that names a host the agent may not reach is denied, whatever the rules said.
            egress = self._egress_refusal(agent, raw_args, raw_bytes, paths, decision.tool)
            if egress is not None:
                decision, extra["egress"] = egress
        if decision.effect == DEFER and decision.tool is not None and digest is not None:
            decision, approval, created = self._resolve_defer(
                decision, agent_id, decision.tool, raw_hmac, digest, now, timestamp, new_id
            )
            if approval is not None:
                extra["approval_id"] = approval.id
                if approval.status == "USED":
                    extra["approver"] = approval.approver
                    approval.used_by = action_id
                    approval_writes.append(approval.to_row())
                    undo.append(partial(self._unuse_approval, approval))
                if approval.status == "DENIED":
                    extra["approval_reason"] = approval.reason
                if created:
                    approval.action_id = action_id
                    approval_writes.append(approval.to_row())
                    undo.append(partial(self._drop_approval, approval))
        if decision.effect in (PERMIT, DEFER) and decision.tool is not None:
            self.spend(agent_id, decision.tool, now)
            undo.append(partial(self._unspend, agent_id, decision.tool))
        claim: FleetClaim | None = None
        if decision.effect == PERMIT and agent is not None and agent.budgets:
            cents = estimate_cost_cents(raw_args, int(self.policy.runtime.get("call_cost", 0)))
            names = self.charge(agent_id, cents, now, reserved=True)
            ttl = reservation_ttl(self.policy)
            if not self.fleet_local:
                claim = fleet_claim(agent.budgets, reservation_id=action_id, fleet=fleet_name(self.policy),
                                    agent_id=agent_id, cents=cents, now=now, ttl=ttl)  # fmt: skip
            fleet = tuple(p.name for p in claim.parts) if claim is not None else ()
            self.reservations[action_id] = Reservation(agent_id, cents, names, now + ttl, fleet)
            undo.append(partial(self._unreserve, action_id))
            extra["cost_cents"] = cents
        verdict = finish(decision, digest=digest, args_bytes=redacted_bytes, extra=extra)
        verdict.approval_writes = approval_writes
        verdict.undo = undo
        if claim is not None:
            verdict.fleet = claim

            def refinish(other: Decision, changes: dict[str, Any]) -> Verdict:
                return finish(other, digest=digest, args_bytes=redacted_bytes, extra={**extra, **changes})

            verdict.refinish = refinish
        if decision.retry_after_seconds is not None:
            verdict.reply["structured_denial"]["resolution"]["retry_after_seconds"] = decision.retry_after_seconds
        return verdict

    def fleet_outcome(self, verdict: Verdict, outcome: FleetOutcome, timeout: float) -> Verdict:
        """Settle a permit on fleet budgets with the database's answer. Granted: the permit stands and its
        DPR records the reservation. Refused: the policy's BUDGET_EXCEEDED (audit mode lets it through, as
        for a local budget). Unavailable: DENY BUDGET_UNAVAILABLE whatever the mode — a budget that could
        not be checked never leads to a permit. Either way the permit's state changes are undone."""
        claim = verdict.fleet
        if claim is None or verdict.refinish is None or verdict.decision is None:
            return verdict
        verdict.fleet = None
        note: dict[str, Any] = {
            "fleet": claim.fleet,
            "reserved_cents": claim.cents,
            "expires_ms": claim.expires_ms,
            "budgets": [
                {
                    "name": p.name,
                    "period": p.period,
                    "period_start": p.period_start,
                    "max_cents": p.max_cents,
                    "max_calls": p.max_calls,
                }
                for p in claim.parts
            ],
        }
        self._saw_fleet(claim, outcome)
        if outcome.status == GRANTED:
            note["status"] = GRANTED
            note["usage"] = [_usage_row(u) for u in outcome.usage]
            verdict.record["fleet_budget"] = note
            flagged = fleet_flag(claim, outcome)
            if flagged is not None and not verdict.decision.budget_warn:
                verdict.decision = replace(verdict.decision, budget=flagged, budget_warn=True)
            return verdict
        for undo in reversed(verdict.undo):
            undo()
        tool = verdict.decision.tool
        if outcome.status == REFUSED:
            part = next((p for p in claim.parts if p.name == outcome.refused_by), claim.parts[0])
            note.update({"status": REFUSED, "refused_by": part.name, "reserved_cents": 0})
            note["usage"] = [_usage_row(u) for u in outcome.usage]
            decision = Decision(DENY, "BUDGET_EXCEEDED", part.ref, f"fleet budget {part.name} would be exceeded",
                                tool, resets_at=part.period_end, budget=part.name)  # fmt: skip
            return verdict.refinish(decision, {"cost_cents": 0, "approver": None, "fleet_budget": note})
        part = claim.parts[0]
        note.update({"status": "unavailable", "reserved_cents": 0})
        message = (
            f"the fleet budget {part.name} could not be checked (its database did not answer within {timeout:g}s), "
            "so the call is denied"
        )
        # As CREDENTIAL_UNAVAILABLE: the record keeps what the policy decided (`policy_effect`), the call is
        # denied by the engine, in audit mode too.
        decision = Decision(DENY, "BUDGET_UNAVAILABLE", part.ref, message, tool, budget=part.name)
        verdict.undo, verdict.approval_writes, verdict.decision = [], [], decision
        verdict.record.update(
            {"effect": DENY, "code": "BUDGET_UNAVAILABLE", "cost_cents": 0, "approver": None, "fleet_budget": note}
        )
        verdict.reply = {
            "call_id": verdict.reply.get("call_id"),
            "effect": DENY,
            "action_id": verdict.reply.get("action_id"),
            "latency_us": verdict.reply.get("latency_us"),
            "structured_denial": _structured_denial(decision, None, None),
        }
        return verdict

    def _saw_fleet(self, claim: FleetClaim, outcome: FleetOutcome) -> None:
        for usage in outcome.usage:
            part = next((p for p in claim.parts if p.name == usage.name), None)
            if part is not None:
                self.fleet_seen[(claim.agent_id, usage.name)] = {
                    "period_start": part.period_start,
                    **_usage_row(usage),
                    "max_cents": part.max_cents,
                    "max_calls": part.max_calls,
                    "as_of_ms": claim.at_ms,
                }

    def egress_policy(self, agent: Agent) -> EgressPolicy | EgressConfigError | None:
        """The agent's compiled `egress` block (cached per policy object), the error that makes it unusable,
        or None when the agent has none."""
        block = agent.settings.get("egress")
        if block is None:
            return None
        cached = self._egress.get(agent.agent_id)
        if cached is not None and cached[0] is agent:
            return cached[1]
        compiled: EgressPolicy | EgressConfigError
        try:
            compiled = compile_egress(without_ports(block))
        except EgressConfigError as exc:
            compiled = exc
        self._egress[agent.agent_id] = (agent, compiled)
        return compiled

    def _egress_refusal(
        self, agent: Agent, raw_args: Any, raw_bytes: bytes, redacted_paths: tuple[str, ...], tool: str
    ) -> tuple[Decision, dict[str, Any]] | None:
        policy = self.egress_policy(agent)
        if policy is None:
            return None
        ref = agent.ref or None
        if isinstance(policy, EgressConfigError):  # never served (start and reload refuse it); fail closed
            reason = f"the egress block is invalid: {policy}"
            note: dict[str, Any] = {"tier": "sdk", "arg": None, "host": None, "reason": reason}
            return Decision(DENY, "EGRESS_DENIED", ref, reason, tool), note
        refusal = check_args(policy, raw_args, raw_bytes)
        if refusal is None:
            return None
        # The DPR names the refused host, unless it came from an argument the policy redacts.
        hidden = any(refusal.arg == p or refusal.arg.startswith(p + ".") for p in redacted_paths)
        host = REDACTED if hidden and refusal.host is not None else refusal.host
        arg = refusal.arg[:256]
        note = {"tier": "sdk", "arg": arg, "host": host, "reason": refusal.reason}
        shown = f"egress to {host}" if host is not None else "egress"
        message = f"{shown} (argument `{arg}`) refused: {refusal.reason}"
        return Decision(DENY, "EGRESS_DENIED", ref, message, tool), note

    def _resolve_defer(
        self,
        decision: Decision,
        agent_id: str,
        tool: str,
        raw_hmac: str,
        digest: str,
        now: float,
        timestamp: str,
        new_id: Callable[[], str],
    ) -> tuple[Decision, Approval | None, bool]:
        existing = self.matching_approval(agent_id, tool, raw_hmac)
        if existing is not None:
            status = existing.effective_status(now)
            if status == "APPROVED":
                existing.status = "USED"
                return (
                    Decision(PERMIT, "APPROVED", decision.rule_ref, f"approved by {existing.approver}", tool),
                    existing,
                    False,
                )
            if status == "DENIED":
                return (
                    Decision(DENY, "POLICY_DENY", decision.rule_ref, existing.reason or "denied by an operator", tool),
                    existing,
                    False,
                )
            if status == "PENDING":
                return decision, existing, False
        ttl = int(self.policy.runtime.get("approval_ttl", DEFAULT_APPROVAL_TTL))
        approval = Approval(
            id="apr-" + new_id(),
            status="PENDING",
            agent_id=agent_id,
            tool=tool,
            args_hmac=raw_hmac,
            created_at=timestamp,
            expires_at=int(now) + ttl,
            args_digest=digest,
        )
        self.add_approval(approval)
        return decision, approval, True

    def resolve_approval(
        self, approval_id: str, approve: bool, approver: str, reason: str | None, now: float, timestamp: str
    ) -> Approval:
        approval = self.approvals.get(approval_id)
        if approval is None:
            raise KeyError(approval_id)
        status = approval.effective_status(now)
        if status != "PENDING":
            raise ValueError(f"approval {approval_id} is {status}, not PENDING")
        approval.status = "APPROVED" if approve else "DENIED"
        approval.approver = approver
        approval.reason = reason
        approval.resolved_at = timestamp
        return approval

    # ---- replay at start-up
    def replay(self, records: Iterable[dict[str, Any]], approvals: Iterable[dict[str, Any]], now: float) -> None:
        """Rebuild rate buckets and budget usage from recorded decisions, approvals from their table."""
        for body in records:
            if body.get("action_type") != "tool_call":
                # A withdrawn permit (signing_required, no checkpoint in time) gives its estimate back.
                if body.get("action_type") in ("settlement", "permit_withdrawn"):
                    self._replay_settlement(body)
                continue
            agent_id, tool, effect = body.get("agent_id"), body.get("tool"), body.get("effect")
            when = body.get("epoch_ms")
            if not isinstance(agent_id, str) or not isinstance(tool, str) or not isinstance(when, int):
                continue
            t = when / 1000
            # What the policy decided spends tokens (audit mode records an enforced PERMIT for a policy deny).
            decided = body.get("policy_effect", effect)
            if decided in (PERMIT, DEFER) and now - t < 86400 * 2:
                self.spend(agent_id, tool.lower(), t)
            if effect == PERMIT and isinstance(body.get("cost_cents"), int):
                self.charge(agent_id, body["cost_cents"], t, reserved=False)
        # Oldest first, so the index keeps the newest approval for each (agent, tool, args).
        for row in sorted(approvals, key=lambda r: str(r.get("created_at") or "")):
            self.add_approval(Approval(**{k: row.get(k) for k in Approval.__dataclass_fields__}))  # type: ignore[arg-type]

    def _replay_settlement(self, body: dict[str, Any]) -> None:
        agent_id, delta, when = body.get("agent_id"), body.get("cost_delta_cents"), body.get("epoch_ms")
        if not isinstance(agent_id, str) or not isinstance(delta, int) or not isinstance(when, int):
            return
        agent = self.policy.agents.get(agent_id)
        if agent is None:
            return
        for budget in agent.budgets:
            if budget.scope == FLEET and not self.fleet_local:  # settled in the fleet's database when it happened
                continue
            key = (agent_id, budget.name)
            usage = self.budgets.get(key)
            start, _ = period_bounds(budget.period, when / 1000)
            if usage is not None and usage.period_start == start:
                self.budgets[key] = BudgetUsage(
                    start, max(0, usage.spent_cents + delta), usage.reserved_cents, usage.calls
                )


DEFAULT_CREDENTIAL_TTL = 300  # seconds a credential in a permit response is valid for (provider `credential_ttl`)


def credential_for(policy: CompiledPolicy, verdict: Verdict) -> str | None:
    """The secret reference (`vault:stripe#api_key`) a permit must carry, or None. Only a permit the
    policy granted (directly, or through an operator's approval of a defer) receives one."""
    decision = verdict.decision
    if decision is None or decision.effect != PERMIT or verdict.reply.get("effect") != PERMIT:
        return None
    if decision.rule_ref is None:
        return None
    agent = policy.agents.get(str(verdict.record.get("agent_id")))
    return agent.credentials.get(decision.rule_ref) if agent is not None else None


def credential_route(policy: CompiledPolicy, verdict: Verdict) -> str | None:
    """The proxy-tier route ("METHOD http://host:port/path Header") of the permit's credential, if its
    rule delivers through the egress proxy; None for SDK delivery (or no credential)."""
    decision = verdict.decision
    if decision is None or decision.rule_ref is None:
        return None
    agent = policy.agents.get(str(verdict.record.get("agent_id")))
    return agent.credential_routes.get(decision.rule_ref) if agent is not None else None


def credential_ttl(policy: CompiledPolicy, provider: str) -> int:
    raw = (policy.providers.get(provider) or {}).get("credential_ttl")
    return int(raw) if isinstance(raw, int | float) and raw > 0 else DEFAULT_CREDENTIAL_TTL


def grant_credential(
    verdict: Verdict,
    ref: str,
    provider: str,
    version: str | None,
    *,
    expires_at: str,
    ttl_seconds: int,
    stub: bool = False,
    route: str | None = None,
    placeholder: str | None = None,
) -> dict[str, Any]:
    """Record a credential issued for this permit; returns the reply's `credential` object without its
    value (the server adds the value after the commit, so it exists only in the reply)."""
    note: dict[str, Any] = {
        "ref": ref,
        "provider": provider,
        "version": version,
        "delivery": "sdk",
        # The agent holds the value until it expires and can send it anywhere its egress allows: the
        # policy cannot take it back. DESIGN.md §2: only the proxy tier withholds the capability.
        "advisory": True,
        "ttl_seconds": ttl_seconds,
        "expires_at": expires_at,
    }
    if stub:
        note["stub"] = True
    if route is not None:
        # Proxy tier: the agent gets a placeholder; the egress proxy swaps it for the value in the one
        # request the route names (engine/proxy.py grants), so the agent never holds the secret.
        note.update({"delivery": "proxy", "advisory": False, "route": route, "placeholder": placeholder})
    verdict.record["credential_ref"] = note
    keys = ("ref", "version", "delivery", "advisory", "ttl_seconds", "expires_at", "route", "placeholder")
    reply = {k: note[k] for k in keys if k in note}
    if stub:
        reply["stub"] = True
    return reply


def deny_credential(verdict: Verdict, ref: str, provider: str, failure_code: str, latency_us: int) -> None:
    """The provider failed or timed out: the permit becomes DENY CREDENTIAL_UNAVAILABLE. Its state changes
    (rate tokens, budget reservation, the approval it used) are undone, as for a deny. The agent learns
    the code only; the provider's message goes to the engine log, never into the reply or the DPR."""
    for undo in reversed(verdict.undo):
        undo()
    verdict.undo = []
    verdict.approval_writes = []
    record = verdict.record
    record.update(
        {
            "effect": DENY,
            "code": "CREDENTIAL_UNAVAILABLE",
            "cost_cents": 0,
            "approver": None,
            "latency_us": latency_us,
            "credential_ref": {"ref": ref, "provider": provider, "delivery": "sdk", "error": failure_code},
        }
    )
    verdict.reply = {
        "call_id": verdict.reply.get("call_id"),
        "effect": DENY,
        "action_id": verdict.reply.get("action_id"),
        "latency_us": latency_us,
        "structured_denial": {
            "code": "CREDENTIAL_UNAVAILABLE",
            "rule_ref": record.get("rule_ref"),
            "human_message": "the credential this call needs is unavailable right now, so the call is denied",
            "resolution": {"type": "retry_after"},
        },
    }


def _structured_denial(decision: Decision, approval_id: str | None, operator_reason: str | None) -> dict[str, Any]:
    if decision.code in ("RATE_EXCEEDED", "IDENTITY_UNAVAILABLE", "BUDGET_UNAVAILABLE"):
        resolution: dict[str, Any] = {"type": "retry_after"}
    elif decision.code == "BUDGET_EXCEEDED":
        resolution = {"type": "budget_reset", "resets_at": decision.resets_at}
    elif decision.effect == DEFER:
        resolution = {"type": "pending_approval", "approval_id": approval_id}
    else:
        resolution = {"type": "rule_block"}
    message = operator_reason or decision.reason
    return {"code": decision.code, "rule_ref": decision.rule_ref, "human_message": message, "resolution": resolution}


def _usage_row(usage: FleetUsage) -> dict[str, Any]:
    return {
        "name": usage.name,
        "spent_cents": usage.spent_cents,
        "reserved_cents": usage.reserved_cents,
        "calls": usage.calls,
    }
