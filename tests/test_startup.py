"""CLI start-up cost: `faramesh --help` and `check` must not import what they do not use.

Each case runs the CLI in a fresh interpreter under `-X importtime` and asserts that heavy modules are
absent. Wall times (a second, plain run) are printed for the record (`pytest -s`); no timing is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "support-bot"
_IMPORT_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+(\d+)\s+\|( *)(\S+)\s*$")

HEAVY_FOR_HELP = ("lark", "re2", "yaml", "cryptography", "faramesh.engine.policy.compiler")
HEAVY_FOR_FPL_CHECK = ("yaml", "cryptography")

FPL_STACK = """\
agent "helper" {
  default deny
  rules {
    permit docs/search
    defer email/send if recipients > 10
    deny shell/*
  }
}
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FARAMESH_REGISTRY_ROOT", "PYTHONPROFILEIMPORTTIME")}
    env["FARAMESH_LOG_DIR"] = str(tmp_path / "crash-logs")
    return env


def imported_modules(args: list[str], tmp_path: Path) -> tuple[dict[str, int], subprocess.CompletedProcess[str]]:
    """Module name → cumulative import µs, for `python -X importtime -m faramesh.launchers.cli ARGS`.
    The key "" holds the total of the outermost imports (one space of indent in the report)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "faramesh.launchers.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    modules, total = {}, 0
    for line in proc.stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            modules[m.group(3)] = int(m.group(1))
            if len(m.group(2)) == 1:
                total += int(m.group(1))
    assert modules, proc.stderr  # the importtime report was parsed
    modules[""] = total
    return modules, proc


def loaded(modules: dict[str, int], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def wall_time(args: list[str], tmp_path: Path, runs: int = 3) -> float:
    """Best of `runs` wall-clock times of the console entry point, in milliseconds."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "faramesh.launchers.cli", *args],
            capture_output=True,
            timeout=60,
            env=_env(tmp_path),
            cwd=tmp_path,
        )
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
    return best * 1000


def report(label: str, args: list[str], modules: dict[str, int], tmp_path: Path) -> None:
    ms = {name: modules.get(name, 0) / 1000 for name in ("", "typer", "typer._adapters", "lark", "re2", "cryptography")}
    print(
        f"\n[start-up] {label}: wall {wall_time(args, tmp_path):.0f} ms (best of 3); under -X importtime: "
        f"imports {ms['']:.0f} ms of which typer {ms['typer']:.0f} + typer._adapters/pydantic "
        f"{ms['typer._adapters']:.0f}, lark {ms['lark']:.0f}, re2 {ms['re2']:.0f}, "
        f"cryptography {ms['cryptography']:.0f}; {len(modules) - 1} modules"
    )


@pytest.fixture()
def fpl_stack(tmp_path: Path) -> Path:
    stack = tmp_path / "fpl-stack"
    stack.mkdir()
    (stack / "governance.fms").write_text(FPL_STACK, encoding="utf-8")
    return stack


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["check", "--help"]])
def test_help_imports_no_policy_machinery(tmp_path: Path, args: list[str]) -> None:
    modules, proc = imported_modules(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for heavy in HEAVY_FOR_HELP:
        assert not loaded(modules, heavy), f"`faramesh {' '.join(args)}` imported {loaded(modules, heavy)}"
    report(f"faramesh {' '.join(args)}", args, modules, tmp_path)


def test_check_of_an_fpl_stack_without_imports_skips_yaml_and_cryptography(fpl_stack: Path, tmp_path: Path) -> None:
    args = ["check", "--dir", str(fpl_stack)]
    modules, proc = imported_modules(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
    for heavy in HEAVY_FOR_FPL_CHECK:
        assert not loaded(modules, heavy), f"`check` of an FPL stack without imports imported {loaded(modules, heavy)}"
    assert loaded(modules, "lark"), "the FPL parser was not imported: is the importtime report being read?"
    report("faramesh check (FPL, no imports)", args, modules, tmp_path)


def test_check_of_the_support_bot_example_skips_yaml(tmp_path: Path) -> None:
    args = ["check", "--dir", str(EXAMPLE)]
    modules, proc = imported_modules(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not loaded(modules, "yaml"), loaded(modules, "yaml")
    assert loaded(modules, "cryptography"), "two signed imports were verified without cryptography?"
    report("faramesh check --dir examples/support-bot (2 signed imports)", args, modules, tmp_path)


def test_check_of_a_yaml_stack_does_import_yaml(tmp_path: Path) -> None:
    """Positive control: the detector sees a module that is genuinely needed."""
    stack = tmp_path / "yaml-stack"
    stack.mkdir()
    (stack / "governance.fms.yaml").write_text("agents:\n  helper:\n    default: deny\n", encoding="utf-8")
    modules, proc = imported_modules(["check", "--dir", str(stack)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert loaded(modules, "yaml")
    assert not loaded(modules, "cryptography")
