"""The I/O shell around the pure compiler: find the stack's policy file, read it, resolve imports.

A stack directory holds exactly one of `governance.fms`, `governance.fms.yaml`, `governance.fms.json`.
Nothing here writes: `check`, `test` and `plan` never touch the stack directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from faramesh.engine.policy.ast import PolicyFile
from faramesh.engine.policy.compiler import CompileOptions, compile_files, validate_trust
from faramesh.engine.policy.errors import PolicyLoadError
from faramesh.engine.policy.imports import registry_search_path, resolve_import
from faramesh.engine.policy.lint import Finding, lint
from faramesh.engine.policy.model import CompiledPolicy
from faramesh.engine.policy.parser import parse_fpl

POLICY_FILES = ("governance.fms", "governance.fms.yaml", "governance.fms.json")
MAX_POLICY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class StackSource:
    directory: Path
    path: Path
    text: str
    digest: str


@dataclass(frozen=True)
class CompiledStack:
    source: StackSource
    policy: CompiledPolicy
    findings: tuple[Finding, ...]
    literal_secrets: Mapping[str, str]


def find_stack_dir(start: Path) -> Path | None:
    """The nearest directory at or above `start` holding a policy file."""
    here = start.resolve()
    for candidate in (here, *here.parents):
        if any((candidate / name).is_file() for name in POLICY_FILES):
            return candidate
    return None


def read_stack(directory: Path) -> StackSource:
    if not directory.is_dir():
        raise PolicyLoadError(f"{directory} is not a directory")
    present = [name for name in POLICY_FILES if (directory / name).exists()]
    if not present:
        raise PolicyLoadError(
            f"no policy in {directory}: expected one of {', '.join(POLICY_FILES)} (`faramesh init` writes a starter)"
        )
    if len(present) > 1:
        raise PolicyLoadError(
            f"{directory} holds {' and '.join(present)}: a stack has one policy format; remove all but one"
        )
    path = directory / present[0]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyLoadError(f"{path} is larger than {MAX_POLICY_BYTES // (1024 * 1024)} MiB")
    try:
        text = raw.decode("utf-8")
        text = text.removeprefix("\ufeff")  # editors on some platforms write a BOM
    except UnicodeDecodeError as exc:
        raise PolicyLoadError(f"{path} is not UTF-8 (byte {exc.start})") from None
    return StackSource(directory, path, text, hashlib.sha256(raw).hexdigest())


def parse_source(source: StackSource) -> PolicyFile:
    name = source.path.name
    if not name.endswith((".yaml", ".json")):
        return parse_fpl(source.text, name)
    # Imported here: PyYAML costs start-up time that a `governance.fms` stack never needs.
    from faramesh.engine.policy.loaders import load_json, load_yaml

    return load_yaml(source.text, name) if name.endswith(".yaml") else load_json(source.text, name)


def compile_stack(
    directory: Path,
    *,
    registry: Path | None = None,
    env: Mapping[str, str] | None = None,
    allow_literal_secrets: bool = False,
) -> CompiledStack:
    """Read, parse, resolve imports, compile and lint. Raises FarameshError subclasses only."""
    env = dict(os.environ) if env is None else env
    source = read_stack(directory)
    parsed = parse_source(source)
    validate_trust(parsed.trust)  # imports are verified with these keys: check them first
    roots = registry_search_path(registry, env, directory)
    resolved = tuple(resolve_import(decl, roots, parsed.trust) for decl in parsed.imports)
    secrets: dict[str, str] = {}
    policy = compile_files(
        parsed,
        {source.path.name: source.digest},
        resolved,
        env,
        CompileOptions(allow_literal_secrets=allow_literal_secrets),
        literal_secrets_out=secrets,
    )
    return CompiledStack(source, policy, tuple(lint(policy)), secrets)
