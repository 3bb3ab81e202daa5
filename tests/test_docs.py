"""docs/ checked against the product, so the documentation cannot drift from it.

- docs/tutorial.md is run: every shell block marked `{test …}` runs for real, in order, in a temporary
  copy of examples/support-bot with the state, runtime, log and config dirs relocated into it (never in the
  checkout: an immutable file there breaks the next clone); exit codes and key output are asserted. As root
  the `faramesh apply` part runs too, and cleanup always stops and unlocks what it applied. The block
  syntax is described at the end of the tutorial ("How this page is tested").
- docs/fpl.md names every runtime field, block, provider and identity type (with their fields), agent block,
  alert event, budget field and keyword of engine/policy/schema.py and engine/policy/grammar.lark; its
  examples marked `{check}` compile.
- docs/cli.md names every command and option `faramesh --help` shows, and every FARAMESH_* variable the code
  reads.
- Every repository path and `tests/…py::test_name` the docs cite exists, and the security model's
  guarantees each cite a test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
TUTORIAL = DOCS / "tutorial.md"
FPL = DOCS / "fpl.md"
CLI = DOCS / "cli.md"
SECURITY = DOCS / "security.md"
EXAMPLE = REPO / "examples" / "support-bot"
VENV_BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
CI = os.environ.get("CI") == "true"

BLOCK_TIMEOUT = 90.0  # one shell block (apply waits up to cold_start_deny_window + 5 s for READY)
WAIT_TIMEOUT = 30.0  # a background block's `ready`, an `until` retry loop, a `wait` directive

FENCE_OPEN = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*(?:\{(.*)\})?[ \t]*$")
DIRECTIVE = re.compile(r"^<!--\s*test:\s*(\w+)\s+(\S+)(.*?)-->\s*$")
SHELL_LANGS = ("sh", "bash", "shell", "console")


# --------------------------------------------------------------------------------------------- parsing


@dataclass
class Step:
    """A fenced block (`kind` = "block") or a `<!-- test: … -->` directive, with its attributes."""

    kind: str
    line: int
    lang: str = ""
    body: str = ""
    flags: set[str] = field(default_factory=set)
    values: dict[str, list[str]] = field(default_factory=dict)
    verb: str = ""  # directive: wait | interrupt
    target: str = ""  # directive: the background block's name

    def one(self, key: str, default: str | None = None) -> str | None:
        found = self.values.get(key)
        return found[-1] if found else default

    def where(self) -> str:
        return f"{self.kind} at docs line {self.line}"


def _attributes(text: str, where: str) -> tuple[set[str], dict[str, list[str]]]:
    flags: set[str] = set()
    values: dict[str, list[str]] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise AssertionError(f"{where}: unreadable attributes {text!r}: {exc}") from None
    for token in tokens:
        key, eq, value = token.partition("=")
        if eq:
            values.setdefault(key, []).append(value)
        else:
            flags.add(key)
    return flags, values


def parse_steps(path: Path) -> list[Step]:
    steps: list[Step] = []
    lines = path.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        opened = FENCE_OPEN.match(line)
        if opened and line.startswith("```"):
            start = i + 1
            end = start
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            assert end < len(lines), f"{path.name}:{i + 1}: fence never closed"
            flags, values = _attributes(opened.group(2) or "", f"{path.name}:{i + 1}")
            body = "\n".join(lines[start:end]) + "\n"
            steps.append(Step("block", i + 1, opened.group(1), body, flags, values))
            i = end + 1
            continue
        directive = DIRECTIVE.match(line.strip())
        if directive:
            flags, values = _attributes(directive.group(3), f"{path.name}:{i + 1}")
            steps.append(Step("directive", i + 1, flags=flags, values=values, verb=directive.group(1),
                              target=directive.group(2)))  # fmt: skip
        i += 1
    return steps


# --------------------------------------------------------------------------------------------- running


@dataclass
class Background:
    step: Step
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Session:
    base: Path
    work: Path
    env: dict[str, str]
    background: dict[str, Background] = field(default_factory=dict)
    ran: int = 0
    skipped_for_root: int = 0


def _bash() -> str:
    found = shutil.which("bash")
    assert found, "bash is required to run the tutorial's shell blocks"
    return found


def _check_output(step: Step, output: str, rc: int | None, script: str = "") -> None:
    expected_rc = int(step.one("exit", "0") or "0")
    context = f"{step.where()}\n--- script\n{script}--- exit {rc}\n--- output\n{output}"
    assert rc == expected_rc, f"expected exit {expected_rc}\n{context}"
    for pattern in step.values.get("expect", []):
        assert re.search(pattern, output, re.M), f"expected output matching {pattern!r}\n{context}"


def _matches(step: Step, output: str, rc: int) -> bool:
    if rc != int(step.one("exit", "0") or "0"):
        return False
    patterns = [*step.values.get("expect", []), *step.values.get("until", [])]
    return all(re.search(p, output, re.M) for p in patterns)


def run_block(session: Session, step: Step) -> None:
    script = step.body
    until = step.values.get("until")
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        proc = subprocess.run(
            [_bash(), "-e", "-o", "pipefail", "-c", script],
            cwd=session.work,
            env=session.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=BLOCK_TIMEOUT,
            umask=0o022,
        )
        output = proc.stdout.decode("utf-8", errors="replace")
        if not until or _matches(step, output, proc.returncode) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if until:
        for pattern in until:
            assert re.search(pattern, output, re.M), (
                f"{step.where()}: no output matching {pattern!r} within {WAIT_TIMEOUT:g}s\n--- last output\n{output}"
            )
    _check_output(step, output, proc.returncode, script)


def start_background(session: Session, step: Step) -> None:
    name = step.one("background") or ""
    assert name and name not in session.background, f"{step.where()}: background name {name!r} missing or reused"
    log = session.base / f"background-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [_bash(), "-e", "-o", "pipefail", "-c", step.body],
            cwd=session.work,
            env=session.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C (SIGINT) goes to that group only
            umask=0o022,
        )
    bg = Background(step, proc, log)
    session.background[name] = bg
    pending = list(step.values.get("ready", []))
    deadline = time.monotonic() + WAIT_TIMEOUT
    while pending:
        text = bg.output()
        for pattern in list(pending):
            found = re.search(pattern, text, re.M)
            if found:
                session.env.update({k: v for k, v in found.groupdict().items() if v is not None})
                pending.remove(pattern)
        if not pending:
            break
        assert proc.poll() is None, f"{step.where()}: exited {proc.returncode} before {pending}\n{text}"
        assert time.monotonic() < deadline, f"{step.where()}: no output matching {pending} in {WAIT_TIMEOUT:g}s\n{text}"
        time.sleep(0.05)


def run_directive(session: Session, step: Step) -> None:
    bg = session.background.get(step.target)
    assert bg is not None, f"{step.where()}: no background block named {step.target!r}"
    if step.verb == "interrupt":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bg.proc.pid, signal.SIGINT)
    else:
        assert step.verb == "wait", f"{step.where()}: unknown directive {step.verb!r} (wait, interrupt)"
    try:
        rc = bg.proc.wait(timeout=WAIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{step.where()}: {step.target!r} still runs after {WAIT_TIMEOUT:g}s\n{bg.output()}"
        ) from None
    _check_output(step, bg.output(), rc, bg.step.body)
    del session.background[step.target]


def run_step(session: Session, step: Step) -> None:
    if step.kind == "directive":
        if "root" in step.flags and not IS_ROOT:
            session.skipped_for_root += 1
            return
        run_directive(session, step)
        session.ran += 1
        return
    if "test" not in step.flags:
        return
    if "root" in step.flags and not IS_ROOT:
        session.skipped_for_root += 1
        return
    target = step.one("file")
    if target is not None:
        path = session.work / target
        assert session.work in path.resolve().parents, f"{step.where()}: {target} leaves the work directory"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(step.body, encoding="utf-8")
        path.chmod(0o644)
    elif step.lang in SHELL_LANGS and "background" in step.values:
        start_background(session, step)
    elif step.lang in SHELL_LANGS:
        run_block(session, step)
    else:
        raise AssertionError(f"{step.where()}: a `{step.lang}` block marked test needs file=PATH")
    session.ran += 1


def _clear_flags(root: Path) -> None:
    from faramesh.sandbox.immutable import clear_immutable

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(Exception):
                    clear_immutable(path)


def _processes_under(root: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in cmdline:
            found.append(int(entry))
    return found


def cleanup(session: Session) -> None:
    """Always: background blocks killed; as root every stack stopped and unlocked, flags cleared; the
    directory removed."""
    for bg in session.background.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bg.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bg.proc.wait(timeout=10)
    if IS_ROOT:
        faramesh = str(VENV_BIN / "faramesh")
        for policy in sorted(session.work.glob("*/governance.fms")):
            for args in (("apply", "--stop"), ("unlock",)):
                with contextlib.suppress(Exception):
                    subprocess.run([faramesh, *args, "--dir", str(policy.parent)], env=session.env,
                                   capture_output=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        _clear_flags(session.base)
        for pid in _processes_under(session.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(session.base, ignore_errors=True)


@contextlib.contextmanager
def tutorial_session() -> Iterator[Session]:
    # Under /tmp and 0755 (not pytest's 0700 tmp_path): the agents' own uids traverse it to their workspaces.
    base = Path(tempfile.mkdtemp(prefix="fm-docs-", dir="/tmp"))
    os.chmod(base, 0o755)
    work = base / "work"
    work.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARAMESH_") and k not in ("PYTHONPATH", "CHECKOUT")}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        CHECKOUT=str(REPO),
        LANG="C.UTF-8",
        PYTHONDONTWRITEBYTECODE="1",
        FARAMESH_STATE_DIR=str(base / "state"),
        FARAMESH_RUNTIME_DIR=str(base / "run"),
        FARAMESH_LOG_DIR=str(base / "log"),
        FARAMESH_CONFIG_DIR=str(base / "etc"),
        FARAMESH_NO_SYSTEMD="1",
    )
    session = Session(base, work, env)
    try:
        yield session
    finally:
        cleanup(session)


# --------------------------------------------------------------------------------------------- tutorial


def test_every_shell_block_of_the_tutorial_is_run_or_says_why() -> None:
    steps = parse_steps(TUTORIAL)
    shell = [s for s in steps if s.kind == "block" and s.lang in SHELL_LANGS]
    assert len(shell) >= 30, len(shell)
    for step in shell:
        assert ("test" in step.flags) != ("skip" in step.values), f"{step.where()}: mark it {{test …}} or {{skip=…}}"
    names = {s.one("background") for s in shell if "background" in s.values}
    directives = [s for s in steps if s.kind == "directive"]
    assert {d.target for d in directives} == names, "every background block is waited for or interrupted"
    for step in steps:
        if step.kind == "block" and "test" in step.flags and step.lang not in SHELL_LANGS:
            assert step.one("file"), f"{step.where()}: a non-shell test block must name file=PATH"


def test_the_tutorial_runs_for_real() -> None:
    if not (VENV_BIN / "faramesh").exists():
        pytest.fail(f"{VENV_BIN / 'faramesh'} is missing: the tutorial runs the installed console script")
    steps = parse_steps(TUTORIAL)
    with tutorial_session() as session:
        for step in steps:
            run_step(session, step)
        assert not session.background, f"background blocks never ended: {sorted(session.background)}"
    assert session.ran >= 20, session.ran
    if session.skipped_for_root:
        pytest.skip(f"ran {session.ran} steps; {session.skipped_for_root} need root (faramesh apply)")


# --------------------------------------------------------------------------------------------- FPL


def _fpl_text() -> str:
    return FPL.read_text(encoding="utf-8")


def _missing(names: list[str], text: str) -> list[str]:
    return [n for n in names if f"`{n}`" not in text]


def test_fpl_reference_names_every_schema_field_block_and_type() -> None:
    from faramesh.engine.policy import schema

    text = _fpl_text()
    wanted: dict[str, list[str]] = {
        "runtime field": list(schema.RUNTIME),
        "top-level block": list(schema.TOP_LEVEL_BLOCKS),
        "provider type": list(schema.PROVIDER_TYPES),
        "provider field": sorted(
            {f for fields in schema.PROVIDER_TYPES.values() for f in fields} | set(schema._COMMON_PROVIDER)
        ),
        "identity type": list(schema.IDENTITY_TYPES),
        "identity field": sorted({f for fields in schema.IDENTITY_TYPES.values() for f in fields}),
        "agent block": list(schema.AGENT_BLOCKS),
        "agent block field": sorted({f for fields in schema.AGENT_BLOCKS.values() for f in fields}),
        "alert event": list(schema.AGENT_BLOCKS["alert"]["on"].choices),
        "agent field": list(schema.AGENT_FIELDS),
        "budget field": list(schema.BUDGET_FIELDS),
        "budget period": list(schema.BUDGET_PERIODS),
        "rate limit unit": list(schema.RATE_UNITS),
    }
    wanted["runtime enum value"] = [c for spec in schema.RUNTIME.values() for c in spec.choices]
    wanted["provider enum value"] = [
        c for fields in schema.PROVIDER_TYPES.values() for spec in fields.values() for c in spec.choices
    ]
    problems = {kind: _missing(sorted(set(names)), text) for kind, names in wanted.items()}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"docs/fpl.md does not mention (as `name`) these schema.py names: {problems}"
    # Each provider type has its own section listing its fields (so `token` of vault is not satisfied by
    # `token` of splunk-sink alone).
    for type_name, fields in {**schema.PROVIDER_TYPES, **schema.IDENTITY_TYPES}.items():
        section = re.search(rf"^#### `{re.escape(type_name)}`\n(.*?)(?=^#|\Z)", text, re.M | re.S)
        assert section, f"docs/fpl.md has no `#### \\`{type_name}\\`` section"
        absent = _missing(sorted(fields), section.group(1))
        assert not absent, f"docs/fpl.md section {type_name}: fields not mentioned: {absent}"


def test_fpl_reference_names_every_keyword_of_the_grammar() -> None:
    grammar = (REPO / "engine" / "policy" / "grammar.lark").read_text(encoding="utf-8")
    literals = set(re.findall(r'"([a-z_]+)"', grammar))
    effects = re.search(r"^EFFECT[^:]*:\s*/\((.*?)\)", grammar, re.M)
    conds = re.search(r"^COND_KW[^:]*:\s*/\((.*?)\)", grammar, re.M)
    assert effects and conds, "grammar.lark: EFFECT and COND_KW terminals not found"
    literals |= set(effects.group(1).split("|")) | set(conds.group(1).split("|"))
    operators = set(re.findall(r'"([=!<>~]{1,2})"', grammar)) | {"=~"}
    missing = _missing(sorted(literals | operators), _fpl_text())
    assert not missing, f"docs/fpl.md does not mention these grammar.lark keywords/operators: {missing}"


def test_fpl_reference_examples_compile(tmp_path: Path) -> None:
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.stack import compile_stack

    examples = [s for s in parse_steps(FPL) if s.kind == "block" and s.lang == "fpl" and "check" in s.flags]
    assert len(examples) >= 8, len(examples)
    env = {"VAULT_ADDR": "https://vault.example.com:8200", "HOME": "/nonexistent"}
    for n, step in enumerate(examples):
        stack = tmp_path / f"example-{n}"
        stack.mkdir()
        (stack / "governance.fms").write_text(step.body, encoding="utf-8")
        expected_error = step.one("error")
        try:
            compiled = compile_stack(stack, registry=EXAMPLE / "registry", env=env)
        except FarameshError as err:
            assert expected_error is not None, f"{step.where()} does not compile: {err.code}: {err}"
            assert expected_error in (err.code, str(err.exit_code)) or re.search(expected_error, str(err)), (
                f"{step.where()}: expected {expected_error}, got {err.code}: {err}"
            )
            continue
        assert expected_error is None, f"{step.where()} compiled but the docs say it fails with {expected_error}"
        for code in step.values.get("warns", []):
            assert code in {f.code for f in compiled.findings}, f"{step.where()}: no {code} warning"


# --------------------------------------------------------------------------------------------- CLI


def _help(*args: str) -> str:
    from faramesh.launchers.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([*args, "--help"])
    assert rc == 0, (args, err.getvalue())
    return out.getvalue()


def _help_commands(text: str) -> list[str]:
    section = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return re.findall(r"^  (\S+)", section, re.M)


def _help_options(text: str) -> set[str]:
    return set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", text, re.M)) - {"--help"}


def test_cli_reference_names_every_command_and_option() -> None:
    text = CLI.read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `faramesh ([a-z][\w -]*?)` \|(.*)$", text, re.M)}
    commands: dict[str, set[str]] = {}
    for name in _help_commands(_help()):
        sub = _help_commands(_help(name))
        for full in [f"{name} {s}" for s in sub] or [name]:
            commands[full] = _help_options(_help(*full.split()))
    assert set(rows) == set(commands), f"docs/cli.md table rows {sorted(rows)} != commands {sorted(commands)}"
    for name, options in commands.items():
        named = set(re.findall(r"`(--[\w-]+)", rows[name]))
        assert named == options, f"docs/cli.md row `faramesh {name}`: {sorted(named)} != --help {sorted(options)}"
    for option in _help_options(_help()):  # the root's own options (--version)
        assert re.search(rf"`[^`]*{re.escape(option)}\b[^`]*`", text), f"docs/cli.md does not mention {option}"


def test_cli_reference_names_every_environment_variable() -> None:
    text = CLI.read_text(encoding="utf-8")
    found: set[str] = set()
    for package in ("engine", "sandbox", "supervisor", "launchers", "faramesh_pkg"):
        for path in (REPO / package).rglob("*.py"):
            found |= set(re.findall(r"\bFARAMESH_[A-Z0-9_]*", path.read_text(encoding="utf-8")))
    found -= {"FARAMESH_ERROR"}  # an error code (engine/policy/errors.py), not a variable
    missing = sorted(n for n in found if f"`{n}" not in text)
    assert not missing, f"docs/cli.md does not mention these variables the code reads or sets: {missing}"


# --------------------------------------------------------------------------------------------- references

PATH_REF = re.compile(
    r"`((?:engine|sandbox|supervisor|launchers|faramesh_pkg|tests|systemd|packaging|examples|bench|docs)/"
    r"[\w./@-]*?)(?:::(\w+))?`"
)


def test_docs_cite_real_files_and_tests() -> None:
    docs = sorted(DOCS.glob("*.md"))
    assert {p.name for p in docs} >= {"tutorial.md", "fpl.md", "cli.md", "security.md", "architecture.md",
                                      "operations.md"}  # fmt: skip
    problems = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for match in PATH_REF.finditer(text):
            rel, test_name = match.group(1).rstrip("/."), match.group(2)
            path = REPO / rel
            if "*" in rel or "<" in rel:
                continue
            if not path.exists():
                problems.append(f"{doc.name}: {rel} does not exist")
            elif test_name and not re.search(rf"^(?:async )?def {re.escape(test_name)}\b", path.read_text(), re.M):
                problems.append(f"{doc.name}: {rel} has no {test_name}")
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", text):
            path = (doc.parent / target) if target else doc
            if not path.exists():
                problems.append(f"{doc.name}: link to {target} does not resolve")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                problems.append(f"{doc.name}: {target or doc.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower-case, punctuation dropped (not - or _), spaces to hyphens."""
    found = set()
    prose = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def test_every_guarantee_of_the_security_model_cites_a_test() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    section = text.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| guarantee")]
    rows = [r for r in rows if not set(r) <= set("|-: ")]
    assert len(rows) >= 15, len(rows)
    for row in rows:
        assert re.search(r"`tests/[\w/]+\.py(::\w+)?`", row), f"a guarantee without a test: {row[:120]}"
    limits = text.split("## Limits", 1)[1] if "## Limits" in text else ""
    assert limits.count("\n- ") + limits.count("\n| ") >= 10, "the security model states its limits"
