"""supervisor/layout.py plans: what `apply` derives from the policy for each agent's sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faramesh.engine.paths import stack_paths
from faramesh.engine.policy.stack import compile_stack
from faramesh.supervisor.layout import build_spec_json, plan_agents


def _plans(tmp_path: Path, text: str) -> list:  # type: ignore[type-arg]
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "governance.fms").write_text(text)
    policy = compile_stack(stack, env={}).policy
    paths = stack_paths(stack, env={"FARAMESH_STATE_DIR": str(tmp_path / "state"),
                                    "FARAMESH_RUNTIME_DIR": str(tmp_path / "run")})  # fmt: skip
    return plan_agents(stack, policy, paths)


def test_runtime_env_settings_reach_the_sandbox_spec(tmp_path: Path) -> None:
    plans = _plans(
        tmp_path,
        'runtime {\n  env_allow = ["MY_TOOL_*"]\n  strip_env = ["MY_TOOL_TOKEN"]\n}\n'
        'agent "bot" {\n  command = "/bin/true"\n  default deny\n}\n',
    )
    spec = json.loads(build_spec_json(plans[0], tmp_path / "stack"))
    assert spec["env_allow"] == ["MY_TOOL_*"] and spec["env_deny_globs"] == ["MY_TOOL_TOKEN"]


def test_an_agent_id_the_sandbox_cannot_carry_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be launched in a sandbox"):
        _plans(tmp_path, 'agent "ops/deployer" {\n  command = "/bin/true"\n  default deny\n}\n')
