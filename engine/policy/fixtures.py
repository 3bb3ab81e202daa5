"""`faramesh test` fixtures: `tests/*.fmtest.json` in the stack, each

    {"agent_id": "support-bot",
     "time": 1767225600,                      # optional epoch seconds, per fixture or per case
     "cases": [{"name": "small refund", "tool": "refund", "args": {"amount": 10},
                "principal": {...}, "expect": {"effect": "PERMIT", "code": "POLICY_PERMIT",
                                               "rule_ref": "governance.fms:45"}}]}

Only the `expect` keys given are compared; effects are upper-case.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faramesh.engine.policy.errors import FarameshError
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.model import CompiledPolicy

DEFAULT_TIME = 1767225600  # 2026-01-01T00:00:00Z: fixtures are deterministic unless they set a time
_EXPECT_KEYS = ("effect", "code", "rule_ref")


class FixtureError(FarameshError):
    code = "FIXTURE_INVALID"


@dataclass(frozen=True)
class CaseResult:
    fixture: str
    name: str
    passed: bool
    expected: dict[str, Any]
    got: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fixture": self.fixture,
            "name": self.name,
            "passed": self.passed,
            "expected": self.expected,
            "got": self.got,
        }


def find_fixtures(stack_dir: Path) -> list[Path]:
    return sorted((stack_dir / "tests").glob("*.fmtest.json"))


def load_fixture(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FixtureError(f"cannot read fixture {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise FixtureError(f"fixture {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise FixtureError(f'fixture {path} must be an object with "agent_id" and a "cases" list')
    return data


def _check_case(path: Path, i: int, case: Any, data: dict[str, Any]) -> None:
    """A malformed case is an error, never a silent pass (a typo in `expect` would assert nothing)."""
    if not isinstance(case, dict) or not isinstance(case.get("expect"), dict):
        raise FixtureError(f'{path}: case {i} needs an "expect" object')
    where = f"{path}: case {i} ({case.get('name', 'unnamed')})"
    expect = case["expect"]
    unknown = sorted(set(expect) - set(_EXPECT_KEYS))
    if unknown:
        raise FixtureError(f"{where}: unknown expect key {unknown[0]!r}; expect takes {', '.join(_EXPECT_KEYS)}")
    if not expect:
        raise FixtureError(f"{where}: expect is empty; give at least one of {', '.join(_EXPECT_KEYS)}")
    if not isinstance(case.get("tool"), str):
        raise FixtureError(f'{where}: "tool" must be a string')
    if not isinstance(case.get("agent_id", data.get("agent_id")), str):
        raise FixtureError(f'{where}: "agent_id" must be a string (per fixture or per case)')
    for key in ("args", "principal"):
        if key in case and not isinstance(case[key], dict):
            raise FixtureError(f'{where}: "{key}" must be an object')
    when = case.get("time", data.get("time", DEFAULT_TIME))
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        raise FixtureError(f'{where}: "time" must be a number of epoch seconds')


def run_fixture(policy: CompiledPolicy, path: Path, data: dict[str, Any]) -> list[CaseResult]:
    results = []
    for i, case in enumerate(data["cases"]):
        _check_case(path, i, case, data)
        name = str(case.get("name", f"case {i}"))
        agent_id = case.get("agent_id", data.get("agent_id"))
        request = {
            "agent_id": agent_id,
            "tool_id": case.get("tool"),
            "args": case.get("args", {}),
            "principal": case.get("principal", {}),
            "time": case.get("time", data.get("time", DEFAULT_TIME)),
        }
        decision = evaluate(policy, request)
        got = {"effect": decision.effect, "code": decision.code, "rule_ref": decision.rule_ref}
        expected = {k: case["expect"][k] for k in _EXPECT_KEYS if k in case["expect"]}
        if "effect" in expected and isinstance(expected["effect"], str):
            expected["effect"] = expected["effect"].upper()
        passed = all(got[k] == v for k, v in expected.items())
        results.append(CaseResult(path.name, name, passed, expected, got))
    return results
