"""Exposure scores of the Faramesh service units: `systemd-analyze security --offline=true` (issue 7).

    .venv/bin/python bench/systemd_security.py

Each template in systemd/ is scored as an instance for an example stack directory (a template alone would
be scored with the placeholder instance "i", which turns every `%f` path into a relative one that systemd
ignores, so the score would not be the score of a real stack). The score is systemd's own exposure level,
0.0 (locked down) to 10.0 (unprotected): deterministic for a given unit file and systemd version, so it is
a requirement, not a timing — goals ≤ 2.0 for the engine, ≤ 4.5 for the supervisor.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
EXAMPLE_STACK = "/srv/support-bot"
# (template, goal): the exposure level each must not exceed.
GOALS: tuple[tuple[str, float], ...] = (
    ("faramesh-engine@.service", 2.0),
    ("faramesh-supervisor@.service", 4.5),
)

_OVERALL = re.compile(r"Overall exposure level for \S.*?:\s+(\d+(?:\.\d+)?)\b")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class SecurityScoreError(Exception):
    """systemd-analyze could not score a unit. `code` is stable; the message says what to do."""

    code = "SYSTEMD_ANALYZE_FAILED"


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def parse_overall(output: str) -> float:
    """The overall exposure level from `systemd-analyze security` text output."""
    found = _OVERALL.search(output)
    if found is None:
        raise SecurityScoreError(f"no 'Overall exposure level' line in systemd-analyze output: {output[-300:]!r}")
    return float(found.group(1))


def instance_name(template: str, escaped_instance: str) -> str:
    """faramesh-engine@.service + srv-support\\x2dbot → faramesh-engine@srv-support\\x2dbot.service"""
    prefix, sep, suffix = template.partition("@")
    if not sep or not suffix.startswith("."):
        raise ValueError(f"{template} is not a template unit name")
    return f"{prefix}@{escaped_instance}{suffix}"


def escape_path(path: str, run: Runner = _run) -> str:
    """`systemd-escape --path PATH`: the instance string systemd expects for a path."""
    done = run(["systemd-escape", "--path", path])
    if done.returncode != 0:
        raise SecurityScoreError(f"systemd-escape --path {path} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def instance_links(directory: Path, unit_dir: Path, escaped_instance: str, templates: Sequence[str]) -> list[Path]:
    """Symlinks named like instances of `templates` in `directory`, pointing at the templates in `unit_dir`:
    what systemd-analyze loads when it is handed an instance file."""
    links = []
    for template in templates:
        link = directory / instance_name(template, escaped_instance)
        link.symlink_to(unit_dir / template)
        links.append(link)
    return links


def score(unit_file: Path, run: Runner = _run) -> float:
    done = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_file)])
    if done.returncode != 0:
        raise SecurityScoreError(
            f"systemd-analyze security {unit_file.name} exited {done.returncode}: {done.stderr.strip()[-300:]}"
        )
    if done.stderr.strip():
        # A warning means systemd ignored part of the unit ("… ignoring"): the score would be that of
        # another unit than the one written.
        raise SecurityScoreError(f"systemd-analyze warned about {unit_file.name}: {done.stderr.strip()[-300:]}")
    return parse_overall(done.stdout)


def security_rows(
    unit_dir: Path = UNIT_DIR,
    stack_dir: str = EXAMPLE_STACK,
    run: Runner = _run,
    goals: Sequence[tuple[str, float]] = GOALS,
) -> list[tuple[str, float, float]]:
    """(unit, exposure, goal) for each Faramesh service, scored as an instance for `stack_dir`."""
    if shutil.which("systemd-analyze") is None or shutil.which("systemd-escape") is None:
        raise SecurityScoreError("systemd-analyze/systemd-escape not found: install the `systemd` package")
    escaped = escape_path(stack_dir, run)
    rows = []
    with tempfile.TemporaryDirectory(prefix="faramesh-units-") as tmp:
        templates = [template for template, _ in goals]
        for (template, goal), link in zip(goals, instance_links(Path(tmp), unit_dir, escaped, templates), strict=True):
            rows.append((template, score(link, run), goal))
    return rows


def render(rows: Sequence[tuple[str, float, float]], stack_dir: str = EXAMPLE_STACK) -> str:
    lines = [
        f"systemd-analyze security --offline=true (exposure 0-10, lower is tighter; instance {stack_dir})",
        f"  {'unit':<30} {'exposure':>8}  {'goal':>6}",
    ]
    for unit, exposure, goal in rows:
        verdict = "ok" if exposure <= goal else "MISSED"
        lines.append(f"  {unit:<30} {exposure:>8.1f}  ≤{goal:>5.1f}  {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit 1 when a unit misses its goal (or cannot be scored)."""
    del argv  # no options
    try:
        rows = security_rows()
    except SecurityScoreError as exc:
        sys.stderr.write(f"systemd_security: {exc.code}: {exc}\n")
        return 1
    print(render(rows))
    return 0 if all(exposure <= goal for _, exposure, goal in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
