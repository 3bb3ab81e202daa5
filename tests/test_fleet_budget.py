"""Fleet budgets: `budget … { scope = "fleet" }`, one budget for every engine on a PostgreSQL database.

- compile: a fleet budget needs `runtime { backend = "postgres" }` (FPL and YAML alike; a clear error
  at the `scope` field otherwise), cannot defer; a local budget's artifact is unchanged;
- the pure pipeline (engine/pipeline.py): a permit on a fleet budget carries a claim and charges no
  local state; the database's answer turns it into a permit (DPR records the reservation), a
  BUDGET_EXCEEDED deny (its rate token given back; audit mode lets it through) or a BUDGET_UNAVAILABLE
  deny (even in audit mode);
- the SQL (engine/wal/pg_store.py `FleetBudgets`) against the real cluster (tests/pg_cluster.py): many
  sessions reserving at once never exceed the limit, several budgets are all-or-none, a TTL-expired
  reservation is settled at its estimate, a release gives everything back, a locked row is UNAVAILABLE
  within the timeout;
- two real engines (`faramesh serve`, tests/engine_harness.py `EngineProcess`), two stacks, two chains,
  one database: concurrent $10 calls from both against $100 → exactly ten permits, the rest
  BUDGET_EXCEEDED; `complete` with a lower actual (on the engine that permitted, or on the other one)
  frees the difference; a reservation whose TTL passed is settled at its estimate; a locked budget row
  or a stopped database → BUDGET_UNAVAILABLE, never a permit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from engine_harness import EngineDirs, EngineProcess, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine.pipeline import EngineState, Peer
from faramesh.engine.policy.compiler import CompileOptions, compile_files
from faramesh.engine.policy.errors import PolicySchemaError
from faramesh.engine.policy.limits import (
    EXPIRED,
    GRANTED,
    REFUSED,
    SETTLED,
    UNAVAILABLE,
    UNKNOWN,
    BudgetUsage,
    FleetClaim,
    FleetOutcome,
    FleetUsage,
    fleet_claim,
    period_bounds,
)
from faramesh.engine.policy.loaders import load_yaml
from faramesh.engine.policy.model import Budget, CompiledPolicy, policy_from_json
from faramesh.engine.policy.parser import parse_fpl

if TYPE_CHECKING:
    from pg_cluster import PgCluster

pytest_plugins = ["pg_cluster"]  # the session's cluster (fixtures)

if os.environ.get("CI") == "true":  # a missing psycopg fails CI (DESIGN.md §7)
    import faramesh.engine.wal.pg_store as pg
else:
    pg = pytest.importorskip("faramesh.engine.wal.pg_store")

URL_VAR = "FARAMESH_PG_URL"
NOW = 1_780_315_200.0  # 2026-06-01T12:00:00Z
POSTGRES_RUNTIME = f'runtime {{\n  backend = "postgres"\n  postgres_url = env("{URL_VAR}")\n}}\n'


def compile_src(src: str) -> CompiledPolicy:
    return compile_files(parse_fpl(src), {"governance.fms": hashlib.sha256(src.encode()).hexdigest()}, (), {},
                         CompileOptions())  # fmt: skip


def agent_src(budget: str, rules: str = "permit llm/*") -> str:
    return f'agent "bot" {{\n  default deny\n  rules {{\n    {rules}\n  }}\n  {budget}\n}}\n'


# ------------------------------------------------------------------------------------ compile


@pytest.mark.parametrize(
    "runtime",
    ["", 'runtime {\n  backend = "sqlite"\n}\n', 'runtime {\n  backend = "memory"\n}\n'],
    ids=["default-sqlite", "sqlite", "memory"],
)
def test_a_fleet_budget_outside_postgres_is_a_compile_error_at_its_scope_field(runtime: str) -> None:
    src = runtime + agent_src('budget daily {\n    max $100\n    scope = "fleet"\n  }')
    with pytest.raises(PolicySchemaError) as err:
        compile_src(src)
    message = str(err.value)
    backend = "memory" if "memory" in runtime else "sqlite"
    assert 'budget `daily` has scope = "fleet"' in message and 'backend = "postgres"' in message, message
    assert f'its backend is "{backend}"' in message, message
    assert err.value.pos is not None and err.value.pos.line == src.splitlines().index('    scope = "fleet"') + 1
    assert err.value.code == "POLICY_SCHEMA"


def test_yaml_says_scope_the_same_way_and_gets_the_same_error() -> None:
    text = "agents:\n  bot:\n    default: deny\n    rules: [{effect: permit, tool: 'llm/*'}]\n" \
           "    budgets: {daily: {max: 100, scope: fleet}}\n"  # fmt: skip
    with pytest.raises(PolicySchemaError, match=r'scope = "fleet".*backend = "postgres"'):
        compile_files(load_yaml(text), {}, (), {}, CompileOptions())
    pg_text = f"runtime: {{backend: postgres, postgres_url: 'env(\"{URL_VAR}\")'}}\n" + text
    policy = compile_files(load_yaml(pg_text), {}, (), {}, CompileOptions())
    assert policy.agents["bot"].budgets[0].scope == "fleet"


def test_a_fleet_budget_compiles_on_postgres_and_a_local_budget_artifact_is_unchanged() -> None:
    fleet = compile_src(POSTGRES_RUNTIME + agent_src('budget daily { max $100 scope = "fleet" }'))
    (budget,) = fleet.agents["bot"].budgets
    assert (budget.scope, budget.max_cents, budget.on_exceed) == ("fleet", 10000, "deny")
    assert policy_from_json(fleet.to_json()).agents["bot"].budgets[0].scope == "fleet"
    assert b'"scope":"fleet"' in fleet.to_json()
    local = compile_src(POSTGRES_RUNTIME + agent_src("budget daily { max $100 }"))
    explicit = compile_src(POSTGRES_RUNTIME + agent_src('budget daily { max $100 scope = "local" }'))
    assert local.agents["bot"].budgets[0].scope == "local" and b'"scope"' not in local.to_json()
    assert explicit.to_dict()["agents"] == local.to_dict()["agents"]  # `scope = "local"` is the default


def test_a_fleet_budget_cannot_defer_and_fleet_settings_need_postgres() -> None:
    with pytest.raises(PolicySchemaError, match="a fleet budget cannot defer"):
        compile_src(POSTGRES_RUNTIME + agent_src('budget daily { max $100 scope = "fleet" on_exceed = "defer" }'))
    with pytest.raises(PolicySchemaError, match="must be one of local, fleet"):
        compile_src(POSTGRES_RUNTIME + agent_src('budget daily { max $100 scope = "global" }'))
    with pytest.raises(PolicySchemaError, match=r'`fleet` is about fleet budgets.*backend = "postgres"'):
        compile_src('runtime {\n  fleet = "eu"\n}\n' + agent_src("budget daily { max $1 }"))
    with pytest.raises(PolicySchemaError, match="budget_timeout"):
        compile_src(POSTGRES_RUNTIME.replace("}", '  budget_timeout = "0s"\n}') + agent_src("budget daily { max $1 }"))


def test_fleet_budgets_compile_from_an_artifact_only_against_the_stacks_own_backend(tmp_path: Path) -> None:
    """An imported agent's fleet budget is checked against the stack's runtime, not the artifact's."""
    from faramesh.engine.policy.compiler import ResolvedImport

    imported = parse_fpl('runtime {\n  backend = "postgres"\n  postgres_url = env("X")\n}\n'
                         + agent_src('budget daily { max $5 scope = "fleet" }'), "shared.fms")  # fmt: skip
    resolved = ResolvedImport("example.com/shared@1.0.0", None, "1.0.0", "0" * 64, "k", imported)
    with pytest.raises(PolicySchemaError, match='scope = "fleet"'):
        compile_files(parse_fpl(agent_src("budget weekly { max $1 }")), {}, (resolved,), {}, CompileOptions())


# ------------------------------------------------------------------------------------ the pure pipeline

PIPELINE_SRC = (
    POSTGRES_RUNTIME.replace("}", "  call_cost = $10\n}")
    + 'agent "bot" {\n  default deny\n  rules {\n    permit llm/*\n  }\n  rate_limit "llm/*": 100 per minute\n'
    '  budget local_day { period = "daily" max $1000 }\n'
    '  budget fleet_month { period = "monthly" max $100 warn_at 0.5 scope = "fleet" }\n}\n'
)


def govern_pure(state: EngineState, n: int = 0) -> Any:
    ids = iter(f"01TESTACTION{n:04d}{i}" for i in range(10))
    return state.govern({"call_id": f"c{n}", "tool_id": "llm/chat", "args": {}}, Peer("agent", "bot"), now=NOW,
                        new_id=lambda: next(ids), timestamp="2026-06-01T12:00:00.000Z", started_ns=0,
                        clock_ns=lambda: 0)  # fmt: skip


def test_a_permit_on_a_fleet_budget_claims_it_and_charges_only_the_local_budgets() -> None:
    state = EngineState(compile_src(PIPELINE_SRC), hmac_key=b"k" * 32, dev=False)
    verdict = govern_pure(state)
    claim = verdict.fleet
    assert claim is not None and verdict.reply["effect"] == "PERMIT"
    start, end = period_bounds("monthly", NOW)
    assert (claim.fleet, claim.agent_id, claim.cents, claim.reservation_id) == ("default", "bot", 1000,
                                                                               verdict.record["id"])  # fmt: skip
    assert [(p.name, p.period_start, p.period_end, p.max_cents, p.guarded) for p in claim.parts] == [
        ("fleet_month", start, end, 10000, True)
    ]
    assert claim.expires_ms == int(NOW * 1000) + 3600 * 1000  # reservation_ttl unset: one hour
    assert set(state.budgets) == {("bot", "local_day")}  # the fleet budget lives in the database only
    reservation = state.reservations[verdict.record["id"]]
    assert reservation.budgets == ("local_day",) and reservation.fleet == ("fleet_month",)

    granted = state.fleet_outcome(verdict, FleetOutcome(GRANTED, (FleetUsage("fleet_month", 4000, 2000, 7),)), 2.0)
    assert granted is verdict and granted.reply["effect"] == "PERMIT" and granted.decision is not None
    assert granted.decision.budget_warn and granted.decision.budget == "fleet_month"  # 6000 ≥ 0.5 × 10000
    note = granted.record["fleet_budget"]
    assert note["status"] == "granted" and note["reserved_cents"] == 1000
    assert note["usage"] == [{"name": "fleet_month", "spent_cents": 4000, "reserved_cents": 2000, "calls": 7}]
    assert orjson.dumps(granted.record)  # integers only: a DPR holds no floats


def test_dev_keeps_a_fleet_budget_in_memory_like_a_local_one() -> None:
    """`faramesh dev` has no fleet database: the budget is enforced in the session, never left unchecked."""
    state = EngineState(compile_src(PIPELINE_SRC), hmac_key=b"k" * 32, dev=True)
    verdicts = [govern_pure(state, n) for n in range(11)]
    assert all(v.fleet is None for v in verdicts)
    assert [v.reply["effect"] for v in verdicts] == ["PERMIT"] * 10 + ["DENY"]
    assert verdicts[-1].reply["structured_denial"]["code"] == "BUDGET_EXCEEDED"
    assert state.budgets[("bot", "fleet_month")].reserved_cents == 10000


def test_a_refused_fleet_reservation_is_a_budget_deny_that_gives_everything_back() -> None:
    state = EngineState(compile_src(PIPELINE_SRC), hmac_key=b"k" * 32, dev=False)
    verdict = govern_pure(state)
    tokens_after_permit = state.rate[("bot", "llm/*")].tokens
    refused = FleetOutcome(REFUSED, (FleetUsage("fleet_month", 9500, 0, 3),), "fleet_month")
    denied = state.fleet_outcome(verdict, refused, 2.0)
    assert denied.reply["effect"] == "DENY" and denied.reply["structured_denial"]["code"] == "BUDGET_EXCEEDED"
    resolution = denied.reply["structured_denial"]["resolution"]
    assert resolution == {"type": "budget_reset", "resets_at": period_bounds("monthly", NOW)[1]}
    assert denied.record["cost_cents"] == 0 and denied.record["policy_code"] == "BUDGET_EXCEEDED"
    assert denied.record["fleet_budget"]["status"] == "refused" and denied.record["fleet_budget"]["refused_by"]
    assert denied.fleet is None and denied.undo == []
    assert state.reservations == {} and state.budgets[("bot", "local_day")].reserved_cents == 0
    assert state.rate[("bot", "llm/*")].tokens == tokens_after_permit + 1  # a deny spends no rate token


def test_no_answer_from_the_database_denies_even_in_audit_mode_but_a_refusal_there_goes_ahead() -> None:
    audit = compile_src(PIPELINE_SRC.replace("call_cost = $10", 'call_cost = $10\n  mode = "audit"'))
    state = EngineState(audit, hmac_key=b"k" * 32, dev=False)
    denied = state.fleet_outcome(govern_pure(state, 1), FleetOutcome(UNAVAILABLE, error="timeout"), 1.5)
    assert denied.reply["effect"] == "DENY" and denied.record["effect"] == "DENY"
    denial = denied.reply["structured_denial"]
    assert denial["code"] == denied.record["code"] == "BUDGET_UNAVAILABLE"
    assert denial["resolution"] == {"type": "retry_after"} and "within 1.5s" in denial["human_message"]
    assert "timeout" not in orjson.dumps(denied.record).decode()  # the database's error goes to the log only
    assert denied.record["policy_effect"] == "PERMIT"  # what the policy decided, as for CREDENTIAL_UNAVAILABLE
    assert state.reservations == {}

    refused = FleetOutcome(REFUSED, (FleetUsage("fleet_month", 10000, 0, 10),), "fleet_month")
    through = state.fleet_outcome(govern_pure(state, 2), refused, 1.5)
    assert through.reply["effect"] == "PERMIT" and through.record["code"] == "AUDIT_MODE_PERMIT"
    assert through.record["policy_code"] == "BUDGET_EXCEEDED" and through.record["cost_cents"] == 0


def test_a_recorded_fleet_decision_re_evaluates_to_itself_from_its_dpr() -> None:
    """`explain` has no fleet database: the usage the DPR recorded rebuilds the state the decision saw."""
    from types import MappingProxyType

    from faramesh.engine.policy.evaluate import evaluate
    from faramesh.engine.policy.limits import StateSnapshot, recorded_fleet_usage

    policy = compile_src(PIPELINE_SRC)
    request = {"agent_id": "bot", "tool_id": "llm/chat", "args": {}, "time": NOW}
    state = EngineState(policy, hmac_key=b"k" * 32, dev=False)
    refused = state.fleet_outcome(
        govern_pure(state, 1), FleetOutcome(REFUSED, (FleetUsage("fleet_month", 9500, 0, 3),), "fleet_month"), 2.0
    )
    granted = state.fleet_outcome(
        govern_pure(state, 2), FleetOutcome(GRANTED, (FleetUsage("fleet_month", 9000, 1000, 4),)), 2.0
    )
    start = period_bounds("monthly", NOW)[0]
    assert recorded_fleet_usage(granted.record) == {("bot", "fleet_month"): BudgetUsage(start, 9000, 0, 3)}
    for verdict, effect in ((refused, "DENY"), (granted, "PERMIT")):
        snapshot = StateSnapshot(budgets=MappingProxyType(recorded_fleet_usage(verdict.record)))
        decision = evaluate(policy, request, snapshot)
        assert (decision.effect, decision.rule_ref) == (effect, verdict.record["rule_ref"]), verdict.record
    assert recorded_fleet_usage({"agent_id": "bot"}) == {}


# ------------------------------------------------------------------------------------ the SQL


def fleet_budget(name: str = "spend", *, max_cents: int | None = 10000, max_calls: int | None = None,
                 on_exceed: str = "deny", period: str = "monthly") -> Budget:  # fmt: skip
    return Budget(name, period, max_cents, max_calls, None, on_exceed, f"governance.fms:{len(name)}", "fleet")


def claim_of(budgets: tuple[Budget, ...], *, cents: int = 1000, now: float = NOW, ttl: float = 3600,
             agent: str = "bot", fleet: str = "f") -> FleetClaim:  # fmt: skip
    claim = fleet_claim(budgets, reservation_id="01R" + secrets.token_hex(8), fleet=fleet, agent_id=agent,
                        cents=cents, now=now, ttl=ttl)  # fmt: skip
    assert claim is not None
    return claim


@pytest.fixture
def fleets(pg_cluster: PgCluster, pg_schema: str) -> Iterator[list[Any]]:
    """FleetBudgets sessions a test opens, closed at its end."""
    opened: list[Any] = []
    yield opened
    for fleet in opened:
        fleet.close()


def open_fleet(cluster: PgCluster, schema: str, opened: list[Any], chain: str = "chain-a", **kw: Any) -> Any:
    fleet = pg.FleetBudgets(cluster.url(), chain, schema=schema, **kw)
    opened.append(fleet)
    fleet.open()
    return fleet


def budget_row(cluster: PgCluster, schema: str, name: str = "spend") -> tuple[int, int, int]:
    row = (
        cluster.admin()
        .execute(f"SELECT spent_cents, reserved_cents, calls FROM {schema}.fleet_budgets WHERE budget = %s", (name,))
        .fetchone()
    )
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_many_sessions_reserving_at_once_never_exceed_the_limit(
    pg_cluster: PgCluster, pg_schema: str, fleets: list[Any]
) -> None:
    sessions = [open_fleet(pg_cluster, pg_schema, fleets, f"chain-{i}", timeout=10.0) for i in range(4)]
    budgets = (fleet_budget(max_cents=10000),)
    outcomes: list[FleetOutcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(sessions))

    def host(fleet: Any) -> None:
        async def burst() -> list[FleetOutcome]:
            return list(await asyncio.gather(*(fleet.reserve(claim_of(budgets, cents=700)) for _ in range(12))))

        barrier.wait()
        got = asyncio.run(burst())
        with lock:
            outcomes.extend(got)

    threads = [threading.Thread(target=host, args=(f,)) for f in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [o.status for o in outcomes]
    assert len(statuses) == 48 and statuses.count(GRANTED) == 14 and statuses.count(REFUSED) == 34, statuses
    assert budget_row(pg_cluster, pg_schema) == (0, 9800, 14)  # 14 × $7 ≤ $100 < 15 × $7
    held = (
        pg_cluster.admin()
        .execute(f"SELECT count(*), count(DISTINCT chain_id) FROM {pg_schema}.fleet_reservations")
        .fetchone()
    )
    assert held is not None and held[0] == 14
    refused = next(o for o in outcomes if o.status == REFUSED)
    assert refused.refused_by == "spend" and refused.usage and refused.usage[0].spent_cents == 0


def test_several_budgets_are_all_or_none_and_an_audit_budget_goes_past_its_limit(
    pg_cluster: PgCluster, pg_schema: str, fleets: list[Any]
) -> None:
    fleet = open_fleet(pg_cluster, pg_schema, fleets)
    money, calls = fleet_budget("money", max_cents=100000), fleet_budget("calls", max_cents=None, max_calls=2)
    outcomes = [asyncio.run(fleet.reserve(claim_of((money, calls)))) for _ in range(3)]
    assert [o.status for o in outcomes] == [GRANTED, GRANTED, REFUSED] and outcomes[2].refused_by == "calls"
    assert budget_row(pg_cluster, pg_schema, "money") == (0, 2000, 2)  # the refusal rolled back both rows
    assert budget_row(pg_cluster, pg_schema, "calls") == (0, 2000, 2)

    audit = fleet_budget("watch", max_cents=1500, on_exceed="audit")
    taken = [asyncio.run(fleet.reserve(claim_of((audit,)))) for _ in range(2)]
    assert [o.status for o in taken] == [GRANTED, GRANTED]
    assert taken[1].usage == (FleetUsage("watch", 0, 2000, 2),)  # past its $15: taken, and flagged by the engine


def test_settle_lower_frees_the_difference_release_gives_back_and_ttl_settles_at_the_estimate(
    pg_cluster: PgCluster, pg_schema: str, fleets: list[Any]
) -> None:
    fleet = open_fleet(pg_cluster, pg_schema, fleets)
    budgets = (fleet_budget(max_cents=3000),)
    now = time.time()
    a, b, c = (claim_of(budgets, now=now) for _ in range(3))
    assert [asyncio.run(fleet.reserve(x)).status for x in (a, b, c)] == [GRANTED] * 3
    assert asyncio.run(fleet.reserve(claim_of(budgets, now=now))).status == REFUSED  # $30 all reserved

    settled = asyncio.run(fleet.settle(a.reservation_id, "bot", 250, now))
    assert (settled.status, settled.agent_id, settled.reserved_cents, settled.settled_cents) == (SETTLED, "bot",
                                                                                               1000, 250)  # fmt: skip
    assert asyncio.run(fleet.settle(a.reservation_id, "bot", 250, now)).status == UNKNOWN  # once only
    assert asyncio.run(fleet.settle(b.reservation_id, "someone-else", 0, now)).status == UNKNOWN  # not theirs
    assert budget_row(pg_cluster, pg_schema) == (250, 2000, 3)
    fleet.release_soon(b.reservation_id, "bot")  # a permit never delivered
    deadline = time.monotonic() + 10
    while budget_row(pg_cluster, pg_schema)[1] != 1000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert budget_row(pg_cluster, pg_schema) == (250, 1000, 2)  # nothing spent, the call uncounted
    assert asyncio.run(fleet.reserve(claim_of(budgets, now=now))).status == GRANTED  # the $17.50 freed

    # the TTLs pass (the clock is passed in): the next reservation settles them at their estimate first
    later = now + 3601
    assert asyncio.run(fleet.reserve(claim_of(budgets, now=later, cents=500))).status == GRANTED
    assert budget_row(pg_cluster, pg_schema) == (250 + 1000 + 1000, 500, 4)  # c and the $10 after it: expired
    assert asyncio.run(fleet.settle(c.reservation_id, "bot", 1, later)).status == UNKNOWN
    # settling after the TTL but before any sweep: at the estimate all the same, and said so
    d = claim_of(budgets, now=later, cents=200, ttl=10)
    assert asyncio.run(fleet.reserve(d)).status == GRANTED
    expired = asyncio.run(fleet.settle(d.reservation_id, "bot", 1, later + 11))
    assert (expired.status, expired.settled_cents) == (EXPIRED, 200)


def test_a_budget_row_held_past_the_timeout_is_unavailable_and_the_late_grant_never_lands(
    pg_cluster: PgCluster, pg_schema: str, fleets: list[Any]
) -> None:
    fleet = open_fleet(pg_cluster, pg_schema, fleets, timeout=0.5)
    budgets = (fleet_budget(max_cents=5000),)
    assert asyncio.run(fleet.reserve(claim_of(budgets))).status == GRANTED
    import psycopg

    with psycopg.connect(pg_cluster.url(), autocommit=False) as blocker:
        blocker.execute(f"SELECT * FROM {pg_schema}.fleet_budgets FOR UPDATE").fetchall()
        outcome = asyncio.run(fleet.reserve(claim_of(budgets)))
        blocker.rollback()
    assert outcome.status == UNAVAILABLE and outcome.error is not None and "0.5s" in outcome.error
    assert pg_cluster.password not in outcome.error
    assert fleet.status()["unavailable"] == 1 and fleet.status()["granted"] == 1
    assert asyncio.run(fleet.reserve(claim_of(budgets))).status == GRANTED  # and it recovers
    assert budget_row(pg_cluster, pg_schema) == (0, 2000, 2)


# ------------------------------------------------------------------------------------ one engine, in process


def test_the_engine_gives_back_a_reservation_it_could_not_record_and_settles_by_its_clock(
    pg_cluster: PgCluster, pg_schema: str, fleets: list[Any]
) -> None:
    """The server's wiring, with an injectable clock and WAL: a permit whose DPR cannot be committed is
    denied WAL_WRITE_FAILURE and its reservation given back; `complete` prices a model call; a
    reservation past reservation_ttl (the engine's clock) is settled at its estimate."""
    from engine_harness import FakeClock, InProcessEngine
    from faramesh.engine.wal.store import MemoryStore

    src = POSTGRES_RUNTIME.replace("}", '  call_cost = $10\n  reservation_ttl = "1m"\n}') + agent_src(
        'budget spend { period = "monthly" max $100 scope = "fleet" }', "permit llm/*"
    )
    clock = FakeClock()
    store = MemoryStore()
    runtime = short_tmpdir("ffi")
    engine = InProcessEngine(compile_src(src), runtime, store=store, clock=clock)
    fleet = pg.FleetBudgets(pg_cluster.url(), "in-process", schema=pg_schema, timeout=5.0)
    fleets.append(fleet)
    engine.server.fleet = fleet
    try:
        engine.start()
        with engine.conn("bot") as bot:
            kept = bot.call(govern("llm/chat"))
            assert kept["effect"] == "PERMIT", kept
            store.fail_next_commit = True
            try:
                lost = bot.call(govern("llm/chat"))
            finally:
                store.fail_next_commit = False
            assert code_of(lost) == "WAL_WRITE_FAILURE" and lost["action_id"] is None, lost
            deadline = time.monotonic() + 10
            while budget_row(pg_cluster, pg_schema) != (0, 1000, 1) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert budget_row(pg_cluster, pg_schema) == (0, 1000, 1)  # the unrecorded permit's $10 given back

            model = bot.call(govern("llm/chat", {"model": "gpt-4o", "input_tokens": 1000, "max_tokens": 1000}))
            assert model["effect"] == "PERMIT", model  # estimate: 2 cents (1.25, rounded up)
            usage = {"model": "gpt-4o", "input_tokens": 400_000, "output_tokens": 100_000}
            done = bot.call({"type": "complete", "action_id": model["action_id"], "usage": usage})
            assert done == {"action_id": model["action_id"], "settled_cents": 200}, done  # 100 + 100 cents
            assert budget_row(pg_cluster, pg_schema) == (200, 1000, 2)

            clock.advance(61)  # past reservation_ttl for `kept`
            late = bot.call({"type": "complete", "action_id": kept["action_id"], "usage": {"cost_cents": 0}})
            assert late["error"]["code"] == "INVALID_REQUEST", late
            assert budget_row(pg_cluster, pg_schema) == (1200, 0, 2)  # its $10 estimate, not the $0 reported
    finally:
        engine.stop()
        shutil.rmtree(runtime, ignore_errors=True)
    settlements = [orjson.loads(r.body) for r in store._records if b'"settlement"' in r.body]
    assert [(b["settles"], b["fleet_budget"]["settled_cents"]) for b in settlements] == [(model["action_id"], 200)]


# ------------------------------------------------------------------------------------ two real engines

ENGINE_POLICY = """\
runtime {
  backend = "postgres"
  postgres_url = env("%(var)s")
  wal_sync = "normal"
  cold_start_deny_window = "20s"
  call_cost = $10
  fleet = "support-prod"
%(extra)s}

agent "bot" {
  default deny
  rules {
    permit llm/*
  }
  budget spend { period = "monthly" max $100 scope = "fleet" }
}
"""


@dataclass
class Fleet:
    cluster: PgCluster
    root: Path
    url: str
    dbname: str
    engines: list[EngineProcess]

    def db(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def usage(self) -> tuple[int, int, int]:
        with self.db() as conn:
            row = conn.execute("SELECT spent_cents, reserved_cents, calls FROM faramesh.fleet_budgets").fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def records(self) -> list[dict[str, Any]]:
        with self.db() as conn:
            rows = conn.execute("SELECT chain_id, body FROM faramesh.records ORDER BY chain_id, seq").fetchall()
        return [{**orjson.loads(bytes(body)), "chain": chain} for chain, body in rows]


@contextlib.contextmanager
def fleet_of(cluster: PgCluster, hosts: int, extra: str = '  budget_timeout = "5s"\n') -> Iterator[Fleet]:
    """`hosts` engines, each its own stack dir, state dir and chain, on one fresh database."""
    dbname = f"ff_{secrets.token_hex(5)}"
    cluster.admin().execute(f"CREATE DATABASE {dbname}")
    root = short_tmpdir("ffb")
    fleet = Fleet(cluster, root, cluster.url(dbname), dbname, [])
    dirs_made: list[EngineDirs] = []
    try:
        for i in range(hosts):
            stack = make_stack(root / f"host{i}", ENGINE_POLICY % {"var": URL_VAR, "extra": extra})
            (stack / ".faramesh").mkdir()
            _, policy_file = compile_policy(stack, stack / ".faramesh" / "policy.json")
            assert policy_file is not None
            dirs = EngineDirs.fresh()
            dirs_made.append(dirs)
            engine = EngineProcess(stack, policy_file, dirs)
            engine.env[URL_VAR] = fleet.url
            fleet.engines.append(engine)
        for engine in fleet.engines:
            engine.start(wait_ready=False)
        for engine in fleet.engines:
            engine.wait_ready(40)
        yield fleet
    finally:
        for engine in fleet.engines:
            engine.ensure_stopped()
        for dirs in dirs_made:
            dirs.cleanup()
        shutil.rmtree(root, ignore_errors=True)
        if not cluster.running:
            cluster.start()
        with contextlib.suppress(Exception):
            cluster.admin().execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def code_of(reply: dict[str, Any]) -> str:
    return str(reply["structured_denial"]["code"]) if reply.get("effect") != "PERMIT" else "PERMIT"


def test_two_engines_share_one_fleet_budget_and_together_never_exceed_it(pg_cluster: PgCluster) -> None:
    with fleet_of(pg_cluster, 2) as fleet:
        a, b = fleet.engines
        chains = [(e.paths.state_dir / "chain_id").read_text().strip() for e in fleet.engines]
        assert chains[0] != chains[1]
        replies: list[tuple[int, dict[str, Any]]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def agent(host: int) -> None:
            with fleet.engines[host].agent("bot") as conn:
                barrier.wait()
                for n in range(8):
                    reply = conn.call(govern("llm/chat", {"n": n}))
                    with lock:
                        replies.append((host, reply))

        threads = [threading.Thread(target=agent, args=(i % 2,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = [code_of(r) for _, r in replies]
        assert len(codes) == 64 and codes.count("PERMIT") == 10, codes  # $100 / $10: ten, from both hosts
        assert codes.count("BUDGET_EXCEEDED") == 54, codes
        assert fleet.usage() == (0, 10000, 10)
        permits = [(host, r["action_id"]) for host, r in replies if r["effect"] == "PERMIT"]

        # `complete` for less than the estimate frees the rest: $2 + $2 of $20 → $16 free → one more $10
        first, second = permits[0], permits[1]
        with fleet.engines[first[0]].agent("bot") as conn:
            done = conn.call({"type": "complete", "action_id": first[1], "usage": {"cost_cents": 200}})
            assert done == {"action_id": first[1], "settled_cents": 200}, done
            again = conn.call({"type": "complete", "action_id": first[1], "usage": {"cost_cents": 200}})
            assert again["error"]["code"] == "INVALID_REQUEST", again
        other = 1 - second[0]  # the other engine: it finds the reservation in the shared database
        with fleet.engines[other].agent("bot") as conn:
            done = conn.call({"type": "complete", "action_id": second[1], "usage": {"cost_cents": 200}})
            assert done == {"action_id": second[1], "settled_cents": 200}, done
        assert fleet.usage() == (400, 8000, 10)
        with a.agent("bot") as conn:
            assert code_of(conn.call(govern("llm/chat"))) == "PERMIT"
        with b.agent("bot") as conn:
            assert code_of(conn.call(govern("llm/chat"))) == "BUDGET_EXCEEDED"  # $94 + $10 > $100
        assert fleet.usage() == (400, 9000, 11)

        status = a.status()
        assert status is not None
        stats = status["fleet_budgets"]
        assert stats["granted"] >= 1 and stats["unavailable"] == 0 and stats["reservation_p50_us"] > 0
        seen = next(row for row in status["budgets"] if row.get("scope") == "fleet")
        assert seen["name"] == "spend" and seen["max_cents"] == 10000
        print(f"\nfleet reservation latency (engine a): p50 {stats['reservation_p50_us']} µs, "
              f"p99 {stats['reservation_p99_us']} µs over {stats['granted'] + stats['refused']} decisions")  # fmt: skip

        records = [r for r in fleet.records() if r.get("action_type") in ("tool_call", "settlement")]
        granted = [r for r in records if r.get("effect") == "PERMIT"]
        assert len(granted) == 11 and {r["chain"] for r in granted} == set(chains)
        assert all(r["fleet_budget"]["status"] == "granted" and r["fleet_budget"]["fleet"] == "support-prod"
                   and r["cost_cents"] == 1000 for r in granted)  # fmt: skip
        refused = [r for r in records if r.get("code") == "BUDGET_EXCEEDED"]
        assert len(refused) == 55 and all(r["fleet_budget"]["status"] == "refused" for r in refused)
        assert all(r["fleet_budget"]["refused_by"] == "spend" and r["cost_cents"] == 0 for r in refused)
        settlements = [r for r in records if r["action_type"] == "settlement"]
        assert sorted((r["settles"], r["fleet_budget"]["settled_cents"], r["fleet_budget"]["reserved_cents"])
                      for r in settlements) == sorted([(first[1], 200, 1000), (second[1], 200, 1000)])  # fmt: skip


def test_ttl_settles_at_the_estimate_and_no_database_answer_is_budget_unavailable(pg_cluster: PgCluster) -> None:
    with fleet_of(pg_cluster, 1, '  reservation_ttl = "1s"\n  budget_timeout = "1s"\n') as fleet:
        (engine,) = fleet.engines
        with engine.agent("bot") as conn:
            first = conn.call(govern("llm/chat"))
            assert first["effect"] == "PERMIT", first
            time.sleep(1.3)  # past reservation_ttl
            late = conn.call({"type": "complete", "action_id": first["action_id"], "usage": {"cost_cents": 1}})
            assert late["error"]["code"] == "INVALID_REQUEST" and "settled at its estimate" in late["error"]["message"]
            assert fleet.usage() == (1000, 0, 1)  # $10 spent: the estimate, not the late $0.01

            second = conn.call(govern("llm/chat"))
            time.sleep(1.3)
            third = conn.call(govern("llm/chat"))  # its reservation sweeps the expired second one
            assert (second["effect"], third["effect"]) == ("PERMIT", "PERMIT")
            assert fleet.usage() == (2000, 1000, 3)
            gone = conn.call({"type": "complete", "action_id": second["action_id"], "usage": {"cost_cents": 1}})
            assert gone["error"]["code"] == "INVALID_REQUEST", gone

            # the budget row held by someone else past budget_timeout: denied, and the deny is on record
            import psycopg

            with psycopg.connect(fleet.url, autocommit=False) as blocker:
                blocker.execute("SELECT * FROM faramesh.fleet_budgets FOR UPDATE").fetchall()
                blocked = conn.call(govern("llm/chat"))
                blocker.rollback()
            assert code_of(blocked) == "BUDGET_UNAVAILABLE" and blocked["action_id"], blocked
            assert blocked["structured_denial"]["resolution"] == {"type": "retry_after"}
            daemon = (engine.status() or {})["daemon"]
            assert daemon["degraded"] is True and "fleet budgets" in daemon["last_error"], daemon
            assert code_of(conn.call(govern("llm/chat"))) == "PERMIT"  # the row is free again
            assert (engine.status() or {})["daemon"]["degraded"] is False

            # the database stopped: denied, never permitted, and the engine answers
            pg_cluster.stop("fast")
            try:
                down = conn.call(govern("llm/chat"))
            finally:
                pg_cluster.start()
            assert down["effect"] == "DENY" and code_of(down) == "BUDGET_UNAVAILABLE", down
            deadline = time.monotonic() + 20
            back = conn.call(govern("llm/chat"))
            while back["effect"] != "PERMIT" and time.monotonic() < deadline:  # the engine reconnects
                time.sleep(0.2)
                back = conn.call(govern("llm/chat"))
            assert back["effect"] == "PERMIT", back
        status = engine.status()
        assert status is not None and status["fleet_budgets"]["unavailable"] >= 2
        assert pg_cluster.password not in engine.log()
        recorded = [r for r in fleet.records() if r.get("code") == "BUDGET_UNAVAILABLE"]
        assert [r["id"] for r in recorded][:1] == [blocked["action_id"]]
        assert recorded[0]["policy_effect"] == "PERMIT" and recorded[0]["fleet_budget"]["status"] == "unavailable"


def test_a_fleet_stack_compiled_by_the_cli_for_sqlite_is_refused(tmp_path: Path) -> None:
    """What an operator sees: `faramesh check` on a SQLite stack with a fleet budget fails (exit 1)."""
    import subprocess

    from engine_harness import REPO

    stack = make_stack(tmp_path, agent_src('budget daily {\n    max $100\n    scope = "fleet"\n  }'))
    done = subprocess.run([str(REPO / ".venv" / "bin" / "faramesh"), "check", "--dir", str(stack)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'scope = "fleet"' in done.stderr and "governance.fms:8" in done.stderr, done.stderr
