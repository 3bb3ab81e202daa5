"""SandboxSpec: validated before any privileged step; architecture rule of sandbox/."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from faramesh.sandbox.errors import SpecError
from faramesh.sandbox.spec import SandboxSpec

BASE: dict[str, Any] = {
    "profile": "full",
    "agent_id": "support-bot",
    "host_uid": 61001,
    "host_gid": 61001,
    "workspace": "/srv/stack/workspace",
    "stack_dir": "/srv/stack",
    "seccomp_bpf": b"\x06\0\0\0\0\0\xff\x7f",
}


def test_valid_spec_is_frozen() -> None:
    spec = SandboxSpec(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.profile = "off"  # type: ignore[misc]
    assert spec.rlimits == (("CORE", 0, 0),) and spec.inside_uid == 1000


@pytest.mark.parametrize(
    "change",
    [
        {"profile": "strict"},
        {"host_uid": 0},
        {"host_gid": 0},
        {"host_uid": 65534},
        {"agent_id": "../etc"},
        {"agent_id": ""},
        {"workspace": "relative/ws"},
        {"stack_dir": "/srv/../etc"},
        {"hidden_paths": ("/",)},
        {"rlimits": (("BOGUS", 1, 1),)},
        {"rlimits": (("NOFILE", 10, 5),)},
        {"keep_fds": (2,)},
        {"egress_port": 70000},
        {"seccomp_bpf": b""},
        {"seccomp_bpf": b"\0" * 9},
        {"inside_uid": 0},
        {"cgroup_name": ""},
        {"cgroup_name": "../x"},
        {"cgroup_name": "a//b"},
        {"cgroup_name": "stack-1/"},
        {"cgroup_name": "/abs"},
        {"cgroup_name": "a/b/c/d/e"},
        {"cgroup_name": "stack/.."},
    ],
)
def test_invalid_specs_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as e:
        SandboxSpec(**{**BASE, **change})
    assert e.value.code == "SANDBOX_SPEC_INVALID"


def test_cgroup_name_defaults_to_the_agent_id_and_round_trips() -> None:
    from faramesh.sandbox.launch import spec_from_json, spec_to_json

    plain = SandboxSpec(**BASE)
    assert plain.cgroup_name is None and plain.cgroup == "support-bot"
    qualified = SandboxSpec(**BASE, cgroup_name="stack-0123abcd/support-bot")
    assert qualified.cgroup == "stack-0123abcd/support-bot" and qualified != plain
    for spec in (plain, qualified):
        assert spec_from_json(spec_to_json(spec)) == spec
    assert dataclasses.replace(qualified, cgroup_name=None) == plain
    assert "cgroup_name" in {f.name for f in dataclasses.fields(plain)}


def test_off_profile_needs_no_bpf() -> None:
    SandboxSpec(**{**BASE, "profile": "off", "seccomp_bpf": b""})


def test_sandbox_never_imports_engine_or_supervisor() -> None:
    root = pathlib.Path(__file__).resolve().parents[2] / "sandbox"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("faramesh.engine", "faramesh.supervisor", "faramesh.launchers")), (
                    path.name, name)


def test_launch_path_imports_stay_lean() -> None:
    """The per-launch modules import only os, sys, ctypes, struct (+ builtins) — DESIGN.md §1: no
    pyseccomp, typing, re, dataclasses, socket. Run in `python -I -S` so nothing is preloaded; an
    editable install's import hook (which itself uses re, pathlib…) is installed before the snapshot."""
    code = f"""
import glob, os, sys
sys.path[:0] = {sys.path!r}
for d in list(sys.path):
    for pth in glob.glob(os.path.join(d, "__editable__*.pth")):
        for line in open(pth):
            if line.startswith("import "):
                exec(line)
import faramesh
before = set(sys.modules)
from faramesh.sandbox import caps, cgroups, credentials, landlock, mounts, namespaces, seccomp
new = sorted(m for m in set(sys.modules) - before if not m.startswith("faramesh."))
print(" ".join(new))
"""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) <= {"ctypes", "_ctypes", "ctypes._endian", "struct", "_struct"}, out.stdout
