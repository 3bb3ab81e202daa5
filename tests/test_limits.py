"""Rate limits and budgets as pure functions over a state snapshot (engine/policy/limits.py), and how
evaluate() applies them."""

from __future__ import annotations

from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.evaluate import DEFER, DENY, PERMIT, Decision, evaluate
from faramesh.engine.policy.limits import (
    DEFAULT_OUTPUT_TOKENS,
    BudgetUsage,
    RateBucket,
    StateSnapshot,
    check_budget,
    check_rate,
    estimate_cost_cents,
    period_bounds,
    spend_rate,
)
from faramesh.engine.policy.model import Budget, CompiledPolicy, RateLimit
from faramesh.engine.policy.parser import parse_fpl
from hypothesis import given
from hypothesis import strategies as st

T0 = 1767225600  # 2026-01-01T00:00:00Z (Thursday)


def ts(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp())  # type: ignore[misc]


def per_minute(n: int = 5) -> RateLimit:
    return RateLimit("refund", n, "minute", 60, "governance.fms:9")


# ---- token bucket ------------------------------------------------------------------------------


def test_a_fresh_bucket_is_full() -> None:
    r = check_rate(per_minute(), None, T0)
    assert r.allowed and r.tokens == 5.0 and r.retry_after_seconds == 0.0


def test_capacity_then_refusal_with_retry_after() -> None:
    limit = per_minute(5)  # one token every 12 s
    bucket = None
    for _ in range(5):
        assert check_rate(limit, bucket, T0).allowed
        bucket = spend_rate(limit, bucket, T0)
    assert bucket is not None and bucket.tokens == pytest.approx(0.0)
    r = check_rate(limit, bucket, T0)
    assert not r.allowed
    assert r.retry_after_seconds == pytest.approx(12.0)
    r = check_rate(limit, bucket, T0 + 6)
    assert not r.allowed
    assert r.tokens == pytest.approx(0.5)
    assert r.retry_after_seconds == pytest.approx(6.0)
    assert check_rate(limit, bucket, T0 + 12).allowed


def test_refill_is_capped_at_capacity() -> None:
    limit = per_minute(5)
    r = check_rate(limit, RateBucket(0.0, T0), T0 + 10**6)
    assert r.tokens == 5.0


def test_spend_records_the_time_and_never_goes_negative() -> None:
    limit = per_minute(5)
    b = spend_rate(limit, RateBucket(0.2, T0), T0)
    assert b.tokens == 0.0
    assert b.updated_at == T0


def test_per_second_and_per_day() -> None:
    assert RateLimit("x", 10, "second", 1, "r").refill_per_second == 10.0
    day = RateLimit("x", 2, "day", 86400, "r")
    r = check_rate(day, RateBucket(0.0, T0), T0)
    assert r.retry_after_seconds == pytest.approx(43200.0)


def test_a_clock_stepping_back_never_mints_tokens() -> None:
    limit = per_minute(5)
    bucket = RateBucket(0.0, T0)
    r = check_rate(limit, bucket, T0 - 3600)  # the clock jumped an hour back
    assert not r.allowed
    assert r.tokens == 0.0


def test_a_clock_stepping_back_then_forward_never_mints_tokens() -> None:
    # One token left at T0. The clock steps back 10 minutes, the token is spent there, and then
    # the clock returns to T0: no time has really passed, so no token may have appeared.
    limit = per_minute(5)
    bucket = spend_rate(limit, RateBucket(1.0, T0), T0 - 600)
    r = check_rate(limit, bucket, T0)
    assert r.tokens == pytest.approx(0.0)
    assert not r.allowed


@given(
    count=st.integers(1, 20),
    unit=st.sampled_from([("second", 1), ("minute", 60), ("hour", 3600)]),
    steps=st.lists(st.floats(-500, 500, allow_nan=False), min_size=1, max_size=60),
)
def test_bucket_never_allows_more_than_capacity_plus_elapsed_refill(
    count: int, unit: tuple[str, int], steps: list[float]
) -> None:
    """Whatever the clock does (forwards, backwards, standing still), the calls allowed never exceed
    capacity + refill over the furthest the clock has ever reached."""
    limit = RateLimit("x", count, unit[0], unit[1], "r")
    now = float(T0) + steps[0]
    first = high = now  # the clock as the bucket first sees it
    bucket: RateBucket | None = None
    allowed = 0
    for i, step in enumerate(steps):
        if i:
            now += step
        high = max(high, now)
        if check_rate(limit, bucket, now).allowed:
            bucket = spend_rate(limit, bucket, now)
            allowed += 1
        if bucket is not None:
            assert 0.0 <= bucket.tokens <= count
        assert allowed <= count + limit.refill_per_second * (high - first) + 1e-6


# ---- budget periods ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("hourly", ts(2026, 1, 1, 10, 30, 15), ts(2026, 1, 1, 10), ts(2026, 1, 1, 11)),
        ("hourly", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 31, 23), ts(2027, 1, 1)),
        ("daily", ts(2026, 1, 1, 10, 30), ts(2026, 1, 1), ts(2026, 1, 2)),
        ("daily", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 31), ts(2027, 1, 1)),
        ("daily", ts(2028, 2, 28, 12), ts(2028, 2, 28), ts(2028, 2, 29)),  # leap year
        ("weekly", T0, ts(2025, 12, 29), ts(2026, 1, 5)),  # Thursday → Monday before, across the year
        ("weekly", ts(2026, 1, 5), ts(2026, 1, 5), ts(2026, 1, 12)),  # Monday 00:00 starts a week
        ("weekly", ts(2026, 1, 4, 23, 59, 59), ts(2025, 12, 29), ts(2026, 1, 5)),  # Sunday night
        ("monthly", ts(2025, 12, 15, 8), ts(2025, 12, 1), ts(2026, 1, 1)),  # December rolls the year
        ("monthly", ts(2025, 12, 31, 23, 59, 59), ts(2025, 12, 1), ts(2026, 1, 1)),
        ("monthly", ts(2026, 1, 1), ts(2026, 1, 1), ts(2026, 2, 1)),
        ("monthly", ts(2028, 2, 10), ts(2028, 2, 1), ts(2028, 3, 1)),
        ("monthly", ts(2026, 11, 30, 23), ts(2026, 11, 1), ts(2026, 12, 1)),
    ],
)
def test_period_bounds(period: str, now: int, start: int, end: int) -> None:
    assert period_bounds(period, now) == (start, end)
    assert period_bounds(period, end - 1) == (start, end)
    assert period_bounds(period, start - 1)[1] == start


@given(
    period=st.sampled_from(["hourly", "daily", "weekly", "monthly"]),
    now=st.floats(0, 4_000_000_000, allow_nan=False),
)
def test_period_contains_now_and_is_contiguous(period: str, now: float) -> None:
    start, end = period_bounds(period, now)
    assert start <= now < end
    assert period_bounds(period, end)[0] == end  # the next period starts where this one ends
    assert period_bounds(period, start) == (start, end)
    lengths = {
        "hourly": {3600},
        "daily": {86400},
        "weekly": {7 * 86400},
        "monthly": {d * 86400 for d in (28, 29, 30, 31)},
    }
    assert end - start in lengths[period]


# ---- budgets -----------------------------------------------------------------------------------


def budget(
    max_cents: int | None = 1000,
    max_calls: int | None = None,
    warn_at: float | None = None,
    on_exceed: str = "deny",
    period: str = "daily",
) -> Budget:
    return Budget("daily", period, max_cents, max_calls, warn_at, on_exceed, "governance.fms:7")


def test_budget_max_cents() -> None:
    b = budget(1000)
    usage = BudgetUsage(T0, spent_cents=900)
    ok = check_budget(b, usage, 100, T0 + 5)
    assert ok.allowed and ok.projected_cents == 1000  # reaching the maximum is allowed
    over = check_budget(b, usage, 101, T0 + 5)
    assert not over.allowed and over.projected_cents == 1001
    assert over.resets_at == T0 + 86400


def test_budget_reservations_count() -> None:
    b = budget(1000)
    assert not check_budget(b, BudgetUsage(T0, spent_cents=500, reserved_cents=450), 51, T0).allowed
    assert check_budget(b, BudgetUsage(T0, spent_cents=500, reserved_cents=450), 50, T0).allowed


def test_budget_negative_estimate_is_not_a_credit() -> None:
    b = budget(1000)
    assert not check_budget(b, BudgetUsage(T0, spent_cents=1001), -500, T0).allowed


def test_budget_max_calls() -> None:
    b = budget(None, max_calls=3)
    assert check_budget(b, None, 0, T0).allowed
    assert check_budget(b, BudgetUsage(T0, calls=2), 0, T0).allowed  # the third call
    assert not check_budget(b, BudgetUsage(T0, calls=3), 0, T0).allowed


def test_budget_both_limits() -> None:
    b = budget(1000, max_calls=10)
    assert not check_budget(b, BudgetUsage(T0, spent_cents=10, calls=10), 1, T0).allowed
    assert not check_budget(b, BudgetUsage(T0, spent_cents=1000, calls=0), 1, T0).allowed
    assert check_budget(b, BudgetUsage(T0, spent_cents=999, calls=9), 1, T0).allowed


def test_budget_warn_at() -> None:
    b = budget(1000, warn_at=0.8)
    assert not check_budget(b, BudgetUsage(T0, spent_cents=700), 99, T0).warn
    r = check_budget(b, BudgetUsage(T0, spent_cents=700), 100, T0)
    assert r.warn and r.allowed
    calls = budget(None, max_calls=10, warn_at=0.5)
    assert not check_budget(calls, BudgetUsage(T0, calls=3), 0, T0).warn
    assert check_budget(calls, BudgetUsage(T0, calls=4), 0, T0).warn  # the 5th call reaches 50%


def test_budget_resets_in_a_new_period() -> None:
    b = budget(1000)
    yesterday = BudgetUsage(T0 - 86400, spent_cents=1000, reserved_cents=5, calls=99)
    r = check_budget(b, yesterday, 10, T0 + 60)
    assert r.allowed and r.projected_cents == 10
    assert r.resets_at == T0 + 86400
    monthly = budget(1000, period="monthly")
    december = BudgetUsage(ts(2025, 12, 1), spent_cents=1000)
    assert not check_budget(monthly, december, 1, ts(2025, 12, 31, 23, 59, 59)).allowed
    r = check_budget(monthly, december, 1, ts(2026, 1, 1))
    assert r.allowed and r.resets_at == ts(2026, 2, 1)


# ---- cost estimates ----------------------------------------------------------------------------


def test_estimate_flat_for_non_model_calls() -> None:
    assert estimate_cost_cents({}, 7) == 7
    assert estimate_cost_cents({"model": "no-such-model"}, 7) == 7
    assert estimate_cost_cents({"model": 5}, 3) == 3
    assert estimate_cost_cents([], 2) == 2  # type: ignore[arg-type]


def test_estimate_model_calls_round_up() -> None:
    # gpt-4o: 250 / 1000 cents per million input / output tokens.
    assert estimate_cost_cents({"model": "gpt-4o", "input_tokens": 1000, "max_tokens": 1000}, 0) == 2  # 1.25 → 2
    assert estimate_cost_cents({"model": "gpt-4o", "input_tokens": 0, "max_tokens": 1_000_000}, 0) == 1000
    # Missing max_tokens: the default output allowance is reserved.
    assert estimate_cost_cents({"model": "gpt-4o-mini"}, 0) == -(-DEFAULT_OUTPUT_TOKENS * 60 // 1_000_000)
    # Wrong types are ignored, never trusted: bools, negatives, strings.
    expected = estimate_cost_cents({"model": "gpt-4o"}, 0)
    for bad in (True, -5, "100", 1.5, None):
        assert estimate_cost_cents({"model": "gpt-4o", "input_tokens": bad, "max_tokens": bad}, 0) == expected
    assert estimate_cost_cents({"model": "m", "max_tokens": 2_000_000}, 0, prices={"m": (0, 100)}) == 200


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_estimate_never_undercounts(inp: int, out: int) -> None:
    cents = estimate_cost_cents({"model": "claude-sonnet-4", "input_tokens": inp, "max_tokens": out}, 0)
    assert cents * 1_000_000 >= inp * 300 + out * 1500
    assert (cents - 1) * 1_000_000 < inp * 300 + out * 1500 or cents == 0


# ---- through evaluate() ------------------------------------------------------------------------

LIMITED = """\
agent "a" {
  default deny
  permit refund
  defer payout
  deny shell/*
  permit stripe/*
  permit other
  rate_limit "refund": 5 per minute
  rate_limit "stripe/*": 2 per second
  budget daily { max $10 on_exceed defer }
}
"""


def compile_text(text: str) -> CompiledPolicy:
    return compile_files(parse_fpl(text, "governance.fms"), {"governance.fms": "x"}, env={})


def run(
    policy: CompiledPolicy, tool: str, state: StateSnapshot | None = None, args: Any = None, time: Any = T0
) -> Decision:
    return evaluate(policy, {"agent_id": "a", "tool_id": tool, "args": args or {}, "time": time}, state)


def snapshot(
    rate: dict[tuple[str, str], RateBucket] | None = None,
    budgets: dict[tuple[str, str], BudgetUsage] | None = None,
) -> StateSnapshot:
    return StateSnapshot(MappingProxyType(rate or {}), MappingProxyType(budgets or {}))


def test_empty_bucket_denies_with_retry_after() -> None:
    policy = compile_text(LIMITED)
    state = snapshot({("a", "refund"): RateBucket(0.0, T0)})
    d = run(policy, "refund", state)
    assert (d.effect, d.code, d.rule_ref) == (DENY, "RATE_EXCEEDED", "governance.fms:8")
    assert d.retry_after_seconds == pytest.approx(12.0)
    d = run(policy, "refund", snapshot({("a", "refund"): RateBucket(0.5, T0)}))
    assert d.retry_after_seconds == pytest.approx(6.0)
    assert run(policy, "refund", state, time=T0 + 12).effect == PERMIT


def test_rate_limit_applies_to_its_own_pattern_and_agent_only() -> None:
    policy = compile_text(LIMITED)
    state = snapshot({("a", "refund"): RateBucket(0.0, T0), ("b", "stripe/*"): RateBucket(0.0, T0)})
    assert run(policy, "other", state).effect == PERMIT
    assert run(policy, "stripe/charge", state).effect == PERMIT
    state = snapshot({("a", "stripe/*"): RateBucket(0.0, T0)})
    d = run(policy, "Stripe/Charge", state)
    assert (d.code, d.rule_ref) == ("RATE_EXCEEDED", "governance.fms:9")
    assert d.retry_after_seconds == pytest.approx(0.5)
    assert run(policy, "refund", state).effect == PERMIT


def test_rate_limit_turns_a_defer_into_a_deny() -> None:
    policy = compile_text(LIMITED.replace('"refund": 5 per minute', '"payout": 1 per hour'))
    d = run(policy, "payout", snapshot({("a", "payout"): RateBucket(0.0, T0)}))
    assert (d.effect, d.code) == (DENY, "RATE_EXCEEDED")
    assert d.retry_after_seconds == pytest.approx(3600.0)
    assert run(policy, "payout").effect == DEFER  # a fresh bucket


def test_budget_over_max_defers_until_next_utc_midnight() -> None:
    policy = compile_text(LIMITED)
    state = snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=1001)})
    now = T0 + 13 * 3600 + 5
    d = run(policy, "other", state, time=now)
    assert (d.effect, d.code, d.rule_ref) == (DEFER, "BUDGET_EXCEEDED", "governance.fms:10")
    assert d.resets_at == T0 + 86400
    assert d.budget == "daily"
    # Spent yesterday: a new period, allowed again.
    assert run(policy, "other", state, time=T0 + 86400).effect == PERMIT


def test_budget_on_exceed_deny() -> None:
    policy = compile_text(LIMITED.replace("on_exceed defer", "on_exceed deny"))
    state = snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=1001)})
    d = run(policy, "refund", state, time=T0 + 1)
    assert (d.effect, d.code, d.budget) == (DENY, "BUDGET_EXCEEDED", "daily")
    assert d.resets_at == T0 + 86400


def test_budget_on_exceed_deny_is_the_default() -> None:
    policy = compile_text(LIMITED.replace(" on_exceed defer", ""))
    state = snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=1001)})
    assert run(policy, "refund", state).code == "BUDGET_EXCEEDED"
    assert run(policy, "refund", state).effect == DENY


def test_budget_on_exceed_audit_lets_the_decision_through_flagged() -> None:
    policy = compile_text(LIMITED.replace("on_exceed defer", "on_exceed audit"))
    state = snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=5000)})
    d = run(policy, "refund", state)
    assert (d.effect, d.code, d.rule_ref) == (PERMIT, "POLICY_PERMIT", "governance.fms:3")
    assert d.budget_warn and d.budget == "daily"
    d = run(policy, "payout", state)
    assert (d.effect, d.code, d.rule_ref) == (DEFER, "POLICY_DEFER", "governance.fms:4")
    assert d.budget_warn


def test_budget_warn_at_flags_a_permit() -> None:
    policy = compile_text(LIMITED.replace("on_exceed defer", "warn_at 0.8 on_exceed defer"))
    assert not run(policy, "refund", snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=100)})).budget_warn
    d = run(policy, "refund", snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=800)}))
    assert (d.effect, d.budget_warn, d.budget) == (PERMIT, True, "daily")


def test_budget_max_calls_through_fpl() -> None:
    policy = compile_text('agent "a" {\n  permit *\n  budget hourly { max_calls 3 on_exceed deny }\n}\n')
    assert run(policy, "x", snapshot(budgets={("a", "hourly"): BudgetUsage(T0, calls=2)})).effect == PERMIT
    d = run(policy, "x", snapshot(budgets={("a", "hourly"): BudgetUsage(T0, calls=3)}), time=T0 + 1800)
    assert (d.effect, d.code, d.resets_at) == (DENY, "BUDGET_EXCEEDED", T0 + 3600)


def test_call_cost_and_model_estimates_feed_the_budget() -> None:
    policy = compile_text(
        'runtime { call_cost = $0.05 }\nagent "a" {\n  permit *\n  budget daily { max $10 on_exceed deny }\n}\n'
    )
    assert run(policy, "x", snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=995)})).effect == PERMIT
    assert run(policy, "x", snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=996)})).effect == DENY
    # A model call is estimated from the price table instead: 1M output tokens of gpt-4o = $10.
    args = {"model": "gpt-4o", "max_tokens": 1_000_000}
    assert run(policy, "llm/chat", args=args).effect == PERMIT
    d = run(policy, "llm/chat", snapshot(budgets={("a", "daily"): BudgetUsage(T0, spent_cents=1)}), args=args)
    assert (d.effect, d.code) == (DENY, "BUDGET_EXCEEDED")


def test_rate_is_checked_before_budget() -> None:
    policy = compile_text(LIMITED)
    state = snapshot({("a", "refund"): RateBucket(0.0, T0)}, {("a", "daily"): BudgetUsage(T0, spent_cents=10**6)})
    assert run(policy, "refund", state).code == "RATE_EXCEEDED"


def test_the_first_exceeded_budget_decides() -> None:
    policy = compile_text(
        'agent "a" {\n  permit *\n  budget hourly { max $1 on_exceed audit }\n'
        "  budget daily { max $5 on_exceed defer }\n  budget weekly { max $9 on_exceed deny }\n}\n"
    )
    full = {
        ("a", "hourly"): BudgetUsage(T0, spent_cents=100),
        ("a", "daily"): BudgetUsage(T0, spent_cents=500),
        ("a", "weekly"): BudgetUsage(period_bounds("weekly", T0)[0], spent_cents=900),
    }
    d = run(policy, "x", snapshot(budgets=full), args={"model": "gpt-4o"})
    assert (d.effect, d.code, d.budget, d.rule_ref) == (DEFER, "BUDGET_EXCEEDED", "daily", "governance.fms:4")
    del full[("a", "daily")]
    d = run(policy, "x", snapshot(budgets=full), args={"model": "gpt-4o"})
    assert (d.effect, d.budget, d.rule_ref) == (DENY, "weekly", "governance.fms:5")


def test_denies_never_consult_limits() -> None:
    policy = compile_text(LIMITED.replace("on_exceed defer", "on_exceed deny").replace('"refund"', '"*"'))
    exhausted = snapshot({("a", "*"): RateBucket(0.0, T0)}, {("a", "daily"): BudgetUsage(T0, spent_cents=10**6)})
    d = run(policy, "shell/exec", exhausted)
    assert (d.effect, d.code, d.rule_ref) == (DENY, "POLICY_DENY", "governance.fms:5")
    d = run(policy, "unmatched", exhausted)  # the default deny
    assert (d.effect, d.code, d.rule_ref) == (DENY, "POLICY_DENY", "governance.fms:2")
    # Nor do they need the request time.
    d = run(policy, "shell/exec", None, time=None)
    assert (d.effect, d.code) == (DENY, "POLICY_DENY")
    # A permit under the same state is limited.
    assert run(policy, "refund", exhausted).code == "RATE_EXCEEDED"


@pytest.mark.parametrize(
    "when", [None, "1767225600", True, [T0], float("nan"), float("inf"), -float("inf"), 10**30, 1e300, -(10**15)]
)
def test_limits_need_a_valid_request_time(when: Any) -> None:
    policy = compile_text(LIMITED)
    d = run(policy, "refund", time=when)
    assert (d.effect, d.code) == (DENY, "INVALID_REQUEST")


def test_no_limits_no_time_needed() -> None:
    policy = compile_text('agent "a" {\n  permit *\n}\n')
    assert run(policy, "x", time=None).effect == PERMIT


def test_snapshot_is_read_not_written() -> None:
    policy = compile_text(LIMITED)
    bucket = RateBucket(3.0, T0)
    state = snapshot({("a", "refund"): bucket})
    for _ in range(10):
        assert run(policy, "refund", state).effect == PERMIT  # evaluate is pure: it spends nothing
    assert state.rate[("a", "refund")] is bucket
