"""Rate limits and budgets as pure functions over a state snapshot. The engine daemon owns the state.

Rate limit `N per <unit>`: a token bucket of capacity N refilled at N/unit, per agent per pattern;
permits and defers spend a token, denies do not. Budgets: money in integer cents; a period starts
at UTC midnight (daily), the top of the hour, Monday 00:00 (weekly) or the 1st (monthly).

Fleet budgets (`scope = "fleet"`) are not in the snapshot: their usage lives in the PostgreSQL
database the fleet shares, and a permit's reservation is granted or refused there
(engine/wal/pg_store.py, `FleetBudgets`). This module describes what is asked (`FleetClaim`) and
what came back (`FleetOutcome`, `FleetSettlement`) as plain data, and reads an outcome (`fleet_flag`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from faramesh.engine.policy.model import Budget, RateLimit


@dataclass(frozen=True, slots=True)
class RateBucket:
    tokens: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    period_start: int
    spent_cents: int = 0
    reserved_cents: int = 0
    calls: int = 0


@dataclass(frozen=True)
class StateSnapshot:
    """Keys: (agent_id, rate-limit pattern) and (agent_id, budget name)."""

    rate: Mapping[tuple[str, str], RateBucket] = field(default_factory=lambda: MappingProxyType({}))
    budgets: Mapping[tuple[str, str], BudgetUsage] = field(default_factory=lambda: MappingProxyType({}))


EMPTY_STATE = StateSnapshot()


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    tokens: float  # after refill, before spending
    retry_after_seconds: float


def check_rate(limit: RateLimit, bucket: RateBucket | None, now: float) -> RateResult:
    capacity = float(limit.count)
    rate = limit.refill_per_second
    if bucket is None:
        tokens = capacity
    else:
        elapsed = max(0.0, now - bucket.updated_at)  # a clock that steps back never mints tokens
        tokens = min(capacity, bucket.tokens + elapsed * rate)
    if tokens >= 1.0:
        return RateResult(True, tokens, 0.0)
    return RateResult(False, tokens, (1.0 - tokens) / rate)


def spend_rate(limit: RateLimit, bucket: RateBucket | None, now: float) -> RateBucket:
    result = check_rate(limit, bucket, now)
    # Keep the latest time seen: a clock that steps back and then forward must not refill twice.
    updated = now if bucket is None else max(bucket.updated_at, now)
    return RateBucket(max(0.0, result.tokens - 1.0), updated)


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """[start, end) of the budget period containing `now`, in UTC epoch seconds."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "hourly":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "daily":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "weekly":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=7)
    else:  # monthly
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


@dataclass(frozen=True, slots=True)
class BudgetResult:
    allowed: bool
    warn: bool
    resets_at: int
    projected_cents: int


def check_budget(budget: Budget, usage: BudgetUsage | None, estimate_cents: int, now: float) -> BudgetResult:
    start, end = period_bounds(budget.period, now)
    if usage is None or usage.period_start != start:
        usage = BudgetUsage(start)
    projected = usage.spent_cents + usage.reserved_cents + max(0, estimate_cents)
    allowed = True
    if budget.max_cents is not None and projected > budget.max_cents:
        allowed = False
    if budget.max_calls is not None and usage.calls + 1 > budget.max_calls:
        allowed = False
    warn = False
    if budget.warn_at is not None:
        if budget.max_cents is not None and projected >= budget.warn_at * budget.max_cents:
            warn = True
        if budget.max_calls is not None and usage.calls + 1 >= budget.warn_at * budget.max_calls:
            warn = True
    return BudgetResult(allowed, warn, end, projected)


# Per-model prices in cents per million tokens (input, output): a built-in default table; the
# engine may be given another one. Tools that are not model calls cost `runtime.call_cost`.
PRICE_TABLE_CENTS_PER_MTOK: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "gpt-4o": (250, 1000),
        "gpt-4o-mini": (15, 60),
        "gpt-4.1": (200, 800),
        "o3": (200, 800),
        "claude-sonnet-4": (300, 1500),
        "claude-opus-4": (1500, 7500),
        "claude-haiku-3.5": (80, 400),
        "gemini-2.5-pro": (125, 1000),
    }
)
DEFAULT_OUTPUT_TOKENS = 1000


def estimate_cost_cents(
    args: Mapping[str, Any],
    flat_call_cents: int,
    prices: Mapping[str, tuple[int, int]] = PRICE_TABLE_CENTS_PER_MTOK,
) -> int:
    """An upper estimate reserved by a permit; settled later by the engine from reported usage."""
    model = args.get("model") if isinstance(args, dict) else None
    if isinstance(model, str) and model in prices:
        in_price, out_price = prices[model]
        in_tokens = args.get("input_tokens")
        out_tokens = args.get("max_tokens")
        in_tokens = in_tokens if type(in_tokens) is int and in_tokens >= 0 else 0
        out_tokens = out_tokens if type(out_tokens) is int and out_tokens >= 0 else DEFAULT_OUTPUT_TOKENS
        micro = in_tokens * in_price + out_tokens * out_price
        return -(-micro // 1_000_000)  # round up: a reservation must not undercount
    return flat_call_cents


# ------------------------------------------------------------------------------------ fleet budgets

FLEET = "fleet"
GRANTED, REFUSED, UNAVAILABLE = "granted", "refused", "unavailable"
SETTLED, EXPIRED, UNKNOWN = "settled", "expired", "unknown"


@dataclass(frozen=True, slots=True)
class FleetPart:
    """One fleet budget a reservation draws on, in the period window that contains the call."""

    name: str
    period: str
    period_start: int
    period_end: int
    max_cents: int | None
    max_calls: int | None
    guarded: bool  # on_exceed "deny": refused past the limit; "audit": taken anyway, and flagged
    warn_at: float | None
    ref: str


@dataclass(frozen=True, slots=True)
class FleetClaim:
    """A permit's reservation against its agent's fleet budgets: all granted, or none."""

    reservation_id: str  # the permit's action id (a ULID: unique across the fleet)
    fleet: str
    agent_id: str
    cents: int
    at_ms: int  # the decision time: reservations that expired by then are settled at their estimate first
    expires_ms: int
    parts: tuple[FleetPart, ...]


@dataclass(frozen=True, slots=True)
class FleetUsage:
    name: str
    spent_cents: int
    reserved_cents: int
    calls: int


@dataclass(frozen=True, slots=True)
class FleetOutcome:
    """GRANTED (usage after the reservation), REFUSED (`refused_by`; usage as found) or UNAVAILABLE
    (the database did not answer in time or failed: `error` is for the engine log, never the reply)."""

    status: str
    usage: tuple[FleetUsage, ...] = ()
    refused_by: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetSettlement:
    """What `complete` (or a release) did in the database: SETTLED, EXPIRED (its reservation_ttl had
    passed: settled at the estimate instead), UNKNOWN (no such live reservation) or UNAVAILABLE."""

    status: str
    agent_id: str | None = None
    reserved_cents: int = 0
    settled_cents: int = 0
    budgets: tuple[str, ...] = ()
    error: str | None = None


def fleet_claim(
    budgets: tuple[Budget, ...],
    *,
    reservation_id: str,
    fleet: str,
    agent_id: str,
    cents: int,
    now: float,
    ttl: float,
) -> FleetClaim | None:
    """The claim a permit makes on the fleet budgets among `budgets` (None: it has none)."""
    parts: list[FleetPart] = []
    for budget in budgets:
        if budget.scope != FLEET or any(p.name == budget.name for p in parts):
            # A name an import merge repeats: the first (the stack's own) wins, as budgets are keyed by name.
            continue
        start, end = period_bounds(budget.period, now)
        parts.append(
            FleetPart(
                budget.name,
                budget.period,
                start,
                end,
                budget.max_cents,
                budget.max_calls,
                budget.on_exceed != "audit",
                budget.warn_at,
                budget.ref,
            )
        )
    if not parts:
        return None
    at_ms = int(now * 1000)
    return FleetClaim(reservation_id, fleet, agent_id, max(0, cents), at_ms, at_ms + int(ttl * 1000), tuple(parts))


def fleet_flag(claim: FleetClaim, outcome: FleetOutcome) -> str | None:
    """The budget a granted reservation is flagged for (as a local `warn_at`, or an `audit` budget taken
    past its limit), or None."""
    usage = {u.name: u for u in outcome.usage}
    for part in claim.parts:
        u = usage.get(part.name)
        if u is None:
            continue
        committed = u.spent_cents + u.reserved_cents
        if part.max_cents is not None and (
            committed > part.max_cents or (part.warn_at is not None and committed >= part.warn_at * part.max_cents)
        ):
            return part.name
        if part.max_calls is not None and (
            u.calls > part.max_calls or (part.warn_at is not None and u.calls >= part.warn_at * part.max_calls)
        ):
            return part.name
    return None


def recorded_fleet_usage(record: Mapping[str, Any]) -> dict[tuple[str, str], BudgetUsage]:
    """The fleet budgets' usage just before a recorded decision, from its DPR's `fleet_budget` note (what
    the database answered), keyed as `StateSnapshot.budgets`: re-evaluating the call against it gives the
    recorded outcome (`faramesh explain`), though no engine holds that usage locally. A granted
    reservation is taken back out of the usage reported after it."""
    note = record.get("fleet_budget")
    agent_id = record.get("agent_id")
    if not isinstance(note, Mapping) or not isinstance(agent_id, str) or note.get("status") not in (GRANTED, REFUSED):
        return {}
    granted = note.get("status") == GRANTED
    mine = int(note.get("reserved_cents") or 0) if granted else 0
    starts = {b.get("name"): b.get("period_start") for b in note.get("budgets") or () if isinstance(b, Mapping)}
    out: dict[tuple[str, str], BudgetUsage] = {}
    for row in note.get("usage") or ():
        if not isinstance(row, Mapping):
            continue
        name, start = row.get("name"), starts.get(row.get("name"))
        if not isinstance(name, str) or type(start) is not int:
            continue
        out[(agent_id, name)] = BudgetUsage(
            start,
            int(row.get("spent_cents") or 0),
            max(0, int(row.get("reserved_cents") or 0) - mine),
            max(0, int(row.get("calls") or 0) - (1 if granted else 0)),
        )
    return out
