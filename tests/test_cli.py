"""The `faramesh` CLI: check / test / plan / compile / init, exit codes (DESIGN.md §4), JSON schemas and
the README's CLI reference.

Most cases call `main([...])` in process (fast, capsys); a few run the real console script so the exit
status, stream separation and "never a traceback" hold for the installed entry point too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from faramesh.launchers import cli
from faramesh.launchers.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "support-bot"
README = REPO / "README.md"
CONSOLE_SCRIPT = Path(sys.executable).with_name("faramesh")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash logs go under tmp_path (never /var/log when the suite runs as root); no ambient registry."""
    monkeypatch.setenv("FARAMESH_LOG_DIR", str(tmp_path / "crash-logs"))
    monkeypatch.delenv("FARAMESH_REGISTRY_ROOT", raising=False)


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(*args: str | Path, cwd: Path | None = None, log_dir: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "FARAMESH_REGISTRY_ROOT"}
    env["FARAMESH_LOG_DIR"] = str(log_dir)
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def no_traceback(*streams: str) -> None:
    for s in streams:
        assert "Traceback" not in s, s
        assert 'File "' not in s, s


def write_stack(directory: Path, text: str, name: str = "governance.fms") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture()
def stack(tmp_path: Path) -> Path:
    """A private copy of examples/support-bot (policy, vendored signed registry, fixtures)."""
    dest = tmp_path / "support-bot"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(".faramesh", "__pycache__"))
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root (dotfiles included) with its type, size, mtime and content hash."""
    snap: dict[str, tuple[Any, ...]] = {".": ("dir", root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_dir():
            snap[str(p.relative_to(root))] = ("dir", st.st_mtime_ns)
        else:
            snap[str(p.relative_to(root))] = (
                "file",
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return snap


SIMPLE = """\
agent "helper" {
  default deny
  rules {
    permit docs/search
    deny shell/*
  }
}
"""

# --- a tiny signed registry of our own (own Ed25519 key), for the import and trust mechanics

REGISTRY_ID = "example.org/acme"
IMPORT_PATH = f"{REGISTRY_ID}/policies/guard"
ARTIFACT = b"""\
agent "guard-bot" {
  default deny
  rules {
    permit guard/scan
  }
}
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def public_b64(key: Ed25519PrivateKey) -> str:
    return b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def make_registry(root: Path, signer: Ed25519PrivateKey, body: bytes = ARTIFACT) -> Path:
    """`catalog.json` + one policy artifact and its `.sig`, signed by `signer` (whose public key the .sig
    also carries, as real registries do: the verifier must ignore it)."""
    rel = "artifacts/policies/acme/guard/1.0.0/policy.fpl"
    artifact = root / rel
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(body)
    sig = {
        "key_id": "acme-test-2026",
        "algorithm": "ed25519",
        "value_b64": b64(signer.sign(body)),
        "public_key_b64": public_b64(signer),
    }
    artifact.with_name("policy.fpl.sig").write_text(json.dumps(sig), encoding="utf-8")
    catalog = {
        "registry_id": REGISTRY_ID,
        "packs": [],
        "frameworks": [],
        "policies": [{"name": "acme/guard", "latest_version": "1.0.0", "versions": {"1.0.0": rel}}],
    }
    (root / "catalog.json").write_text(json.dumps(catalog), encoding="utf-8")
    return artifact


def importing_stack(directory: Path, trusted: Ed25519PrivateKey | None, version: str = "@1.0.0") -> Path:
    trust = f'trust {{\n  key "{REGISTRY_ID}" ed25519:{public_b64(trusted)}\n}}\n\n' if trusted else ""
    return write_stack(
        directory,
        f'import "{IMPORT_PATH}{version}" as guard\n\n{trust}'
        'agent "support" {\n  default deny\n  rules {\n    permit ticket/read\n  }\n}\n',
    )


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    """A stack importing from its vendored `registry/`, trusting the key that signed the artifact."""
    key = Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "signed", key)
    make_registry(directory / "registry", key)
    return directory, key


def compiled_version(directory: Path) -> str:
    from faramesh.engine.policy.stack import compile_stack

    return compile_stack(directory, env={}).policy.version


# ----------------------------------------------------------------------------------------------- check


def test_check_valid_stack_exits_0_and_prints_the_policy_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "check", "--dir", EXAMPLE)
    assert rc == 0, err
    version = compiled_version(EXAMPLE)
    assert version[:16] in out
    assert "3 agent(s)" in out and "9 rule(s)" in out and "2 verified import(s)" in out
    assert "error" not in err


SYNTAX_CASES = [
    # (source, the character the caret must sit under, message fragment)
    ('agent "a" {\n  default deny\n  rules {\n    permit refund if amount < %\n  }\n}\n', "%", "unexpected character"),
    ('agent "a" {\n  default deny\n  rules {\n    permit refund if amount < )\n  }\n}\n', ")", "unexpected ')'"),
    ('agent "a" {\n  default deny\n  rules {\n    permt refund\n  }\n}\n', "permt", "unexpected 'permt'"),
]


@pytest.mark.parametrize(("source", "marker", "message"), SYNTAX_CASES)
def test_check_syntax_error_points_at_line_and_column_with_source_and_caret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, marker: str, message: str
) -> None:
    write_stack(tmp_path, source)
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    lines = err.splitlines()
    bad_line = next(i for i, text in enumerate(source.splitlines(), 1) if marker in text)
    source_text = source.splitlines()[bad_line - 1]
    column = source_text.index(marker) + 1
    assert lines[0].startswith(f"governance.fms:{bad_line}:{column}: error: "), err
    assert message in lines[0]
    assert lines[1] == "  " + source_text
    assert lines[2] == "  " + " " * (column - 1) + "^"
    no_traceback(out, err)


def test_check_caret_keeps_tabs_so_it_lines_up_in_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_stack(tmp_path, 'agent "a" {\n\tdefault deny\n\trules {\n\t\tpermit x if amount < %\n\t}\n}\n')
    rc, _, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    lines = err.splitlines()
    assert lines[1] == "  \t\tpermit x if amount < %"
    assert lines[2].expandtabs(8).index("^") == lines[1].expandtabs(8).index("%")


def test_check_shows_the_right_source_line_when_a_comment_holds_a_unicode_line_separator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The parser counts "\n" only; \u2028, \x0c or a lone \r must not shift the line that is shown.
    write_stack(tmp_path, '# a\u2028b\x0cc\rd\nagent "a" {\n  default deny\n  rules { permit x if amount < % }\n}\n')
    rc, _, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    lines = err.splitlines()
    assert lines[0].startswith("governance.fms:4:"), err
    assert lines[1] == "    rules { permit x if amount < % }"


def test_check_source_line_never_echoes_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An escape sequence inside a string, a NUL in a comment, a syntax error on each line.
    for source in ('agent "a\x1b[2J" { % }\n', '# \x00\x1b[31m\nagent "a" { % }\n', "\x1b[2J agent x\n"):
        write_stack(tmp_path, source)
        rc, out, err = run(capsys, "check", "--dir", tmp_path)
        assert rc == 1
        assert re.match(r"governance\.fms:\d+:\d+: error: ", err), err
        assert "\x1b" not in err and "\x00" not in err, repr(err)
        no_traceback(out, err)


@pytest.mark.parametrize(
    ("source", "suggestion"),
    [
        ('runtime {\n  mdoe = "enforce"\n}\n', "`mode`"),
        ('agent "a" {\n  default deny\n  budget daily { maxx $3 }\n}\n', "`max`"),
        ('agent "a" {\n  default deny\n  egres { allow = ["x"] }\n}\n', "`egress`"),
        ('agnet "a" {\n}\n', "`agent`"),
    ],
)
def test_check_unknown_field_says_did_you_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, suggestion: str
) -> None:
    write_stack(tmp_path, source)
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert "did you mean" in err and suggestion in err, err
    assert re.match(r"governance\.fms:\d+:\d+: error: ", err)
    no_traceback(out, err)


@pytest.mark.parametrize(
    ("source", "suggestion"),
    [
        ('agent "a" {\n  defualt deny\n}\n', "`default`"),
        ('agent "a" {\n  defualt = deny\n}\n', "`default`"),
        ('agent "a" {\n  default deny\n  rulez {\n    permit foo\n  }\n}\n', "`rules`"),
    ],
)
def test_check_misspelt_agent_keyword_says_did_you_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, suggestion: str
) -> None:
    write_stack(tmp_path, source)
    rc, _, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert "did you mean" in err and suggestion in err, err


@pytest.mark.parametrize("version", ["", "@latest", "@^1.0", "@1.0"])
def test_check_import_without_an_exact_version_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    key = Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "s", key, version=version)
    make_registry(directory / "registry", key)
    rc, out, err = run(capsys, "check", "--dir", directory)
    assert rc == 2
    assert "exact" in err or "no version" in err, err
    assert err.startswith("governance.fms:1:")
    no_traceback(out, err)


def test_check_own_signed_registry_verifies_and_reports_the_import(
    signed: tuple[Path, Ed25519PrivateKey], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = signed
    rc, out, err = run(capsys, "check", "--dir", directory, "--format", "json")
    assert rc == 0, out + err
    data = json.loads(out)
    assert data["ok"] is True
    assert sorted(data["agents"]) == ["guard-bot", "support"]
    (imp,) = data["imports"]
    assert imp == {
        "path": f"{IMPORT_PATH}@1.0.0",
        "alias": "guard",
        "version": "1.0.0",
        "sha256": hashlib.sha256(ARTIFACT).hexdigest(),
        "key_id": "acme-test-2026",
    }


def test_check_altered_artifact_exits_2_with_signature_error(
    signed: tuple[Path, Ed25519PrivateKey], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = signed
    artifact = next((directory / "registry").rglob("policy.fpl"))
    artifact.write_bytes(ARTIFACT.replace(b"permit guard/scan", b"permit guard/*   "))
    rc, out, err = run(capsys, "check", "--dir", directory)
    assert rc == 2
    assert "signature" in err and "does not verify" in err, err
    no_traceback(out, err)
    rc, out, _ = run(capsys, "check", "--dir", directory, "--format", "json")
    assert rc == 2
    assert json.loads(out)["error"]["code"] == "SIGNATURE_INVALID"


def test_check_never_trusts_the_key_carried_in_the_sig(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An attacker re-signs a changed artifact with their own key and ships their public key in the .sig."""
    pinned, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "s", pinned)
    make_registry(directory / "registry", attacker, body=ARTIFACT.replace(b"default deny", b"default permit"))
    rc, out, err = run(capsys, "check", "--dir", directory)
    assert rc == 2
    assert "does not verify" in err
    no_traceback(out, err)


def test_check_missing_trust_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = importing_stack(tmp_path / "s", None)
    make_registry(directory / "registry", Ed25519PrivateKey.generate())
    rc, out, _ = run(capsys, "check", "--dir", directory, "--format", "json")
    assert rc == 2
    assert json.loads(out)["error"]["code"] == "TRUST_KEY_MISSING"


def test_check_unknown_version_exits_2_and_names_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "s", key, version="@9.9.9")
    make_registry(directory / "registry", key)
    rc, _, err = run(capsys, "check", "--dir", directory)
    assert rc == 2
    assert "9.9.9" in err and "1.0.0" in err


def test_check_registry_option_and_the_places_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "s", key)
    make_registry(tmp_path / "elsewhere", key)
    rc, _, err = run(capsys, "check", "--dir", directory)
    assert rc == 2
    assert "looked in" in err and str(directory / "registry") in err
    rc, out, err = run(capsys, "check", "--dir", directory, "--registry", tmp_path / "elsewhere")
    assert rc == 0, err
    assert "1 verified import(s)" in out


def test_check_flipped_byte_in_the_vendored_support_bot_registry_exits_2(
    stack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = stack / "registry/artifacts/policies/faramesh/stripe/1.0.0/policy.fpl"
    body = bytearray(artifact.read_bytes())
    body[body.index(b"2000")] ^= 0x01  # "2000" -> "3000"
    artifact.write_bytes(bytes(body))
    rc, out, err = run(capsys, "check", "--dir", stack)
    assert rc == 2
    assert "stripe@1.0.0" in err and "signature" in err
    no_traceback(out, err)


def test_check_malformed_trust_key_is_a_clear_error_not_an_internal_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    directory = importing_stack(tmp_path / "s", key)
    make_registry(directory / "registry", key)
    edit(directory / "governance.fms", f"ed25519:{public_b64(key)}", "ed25519:AAAA")
    rc, out, err = run(capsys, "check", "--dir", directory)
    assert rc in (1, 2), err
    assert "key" in err
    no_traceback(out, err)


MISSING_DEFAULT_AND_UNREACHABLE = """\
agent "a" {
  rules {
    permit foo
    deny foo
  }
}
"""


def test_check_warnings_exit_3_only_under_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, MISSING_DEFAULT_AND_UNREACHABLE)
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 0
    assert "valid" in out
    assert "governance.fms:1: warning:" in err and "[MISSING_DEFAULT]" in err
    assert "governance.fms:4: warning:" in err and "[UNREACHABLE_RULE]" in err
    rc, _, err = run(capsys, "check", "--dir", tmp_path, "--strict")
    assert rc == 3
    assert "--strict" in err


def test_check_strict_without_warnings_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, SIMPLE)
    rc, _, err = run(capsys, "check", "--dir", tmp_path, "--strict")
    assert rc == 0
    assert "warning" not in err


def test_check_json_schema_on_success_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "check", "--dir", EXAMPLE, "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert set(data) == {"ok", "file", "policy_version", "agents", "rules", "imports", "warnings"}
    assert data["ok"] is True and data["file"] == "governance.fms"
    assert data["policy_version"] == compiled_version(EXAMPLE)
    assert data["agents"] == ["default", "payment-bot", "support-bot"]
    assert data["rules"] == 9 and data["warnings"] == []
    assert [i["alias"] for i in data["imports"]] == [None, "stripe"]
    for imp in data["imports"]:
        assert set(imp) == {"path", "alias", "version", "sha256", "key_id"}
        assert SHA256_HEX.match(imp["sha256"])

    write_stack(tmp_path, MISSING_DEFAULT_AND_UNREACHABLE)
    rc, out, _ = run(capsys, "check", "--dir", tmp_path, "--format", "json", "--strict")
    assert rc == 3
    data = json.loads(out)
    assert data["ok"] is False
    assert [w["code"] for w in data["warnings"]] == ["MISSING_DEFAULT", "UNREACHABLE_RULE"]
    assert all(set(w) == {"code", "ref", "message"} for w in data["warnings"])
    assert [w["ref"] for w in data["warnings"]] == ["governance.fms:1", "governance.fms:4"]
    rc, out, _ = run(capsys, "check", "--dir", tmp_path, "--format", "json")
    assert rc == 0 and json.loads(out)["ok"] is True


def test_check_json_error_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, SYNTAX_CASES[0][0])
    rc, out, err = run(capsys, "check", "--dir", tmp_path, "--format", "json")
    assert rc == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert set(data["error"]) == {"code", "message", "file", "line", "column"}
    assert data["error"]["code"] == "POLICY_SYNTAX"
    assert (data["error"]["file"], data["error"]["line"], data["error"]["column"]) == ("governance.fms", 4, 31)
    assert err == ""


def test_check_empty_file_is_a_valid_policy_with_no_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, "")
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 0
    assert "0 agent(s), 0 rule(s)" in out
    no_traceback(out, err)


def test_check_binary_garbage_exits_1_without_traceback(tmp_path: Path) -> None:
    garbage = bytes(range(256)) * 3 + b"\x00\xff\xfe agent {{{"
    (tmp_path / "governance.fms").write_bytes(garbage)
    proc = run_process("check", "--dir", tmp_path, log_dir=tmp_path / "logs")
    assert proc.returncode == 1, proc.stderr
    assert "error" in proc.stderr
    no_traceback(proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    "raw",
    [
        b'agent "caf\xe9" {\n  default deny\n}\n',  # latin-1
        b"\xff\xfea\x00g\x00",  # UTF-16 with BOM
        b'agent "a" {\n  default deny\n}\n\x80',
    ],
)
def test_check_non_utf8_exits_1_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    (tmp_path / "governance.fms").write_bytes(raw)
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert "not UTF-8" in err
    first_non_ascii = next(i for i, b in enumerate(raw) if b >= 0x80)
    assert f"byte {first_non_ascii}" in err
    no_traceback(out, err)


@pytest.mark.parametrize(
    "raw",
    [b"\x00\x00", b'agent "a" {\n  default deny\n}\n\x00', "\u202eagent".encode(), b'agent "a" {' * 2000],
)
def test_check_odd_bytes_are_errors_not_crashes(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes) -> None:
    (tmp_path / "governance.fms").write_bytes(raw)
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert re.match(r"governance\.fms:\d+:\d+: error: ", err), err
    no_traceback(out, err)


def test_check_two_formats_in_one_stack_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, SIMPLE)
    write_stack(tmp_path, "agents: {}\n", "governance.fms.yaml")
    rc, out, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert "governance.fms and governance.fms.yaml" in err and "one policy format" in err
    no_traceback(out, err)


def test_check_dir_without_a_policy_exits_1_naming_the_files_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "check", "--dir", tmp_path)
    assert rc == 1
    assert "no policy" in err and "governance.fms" in err and "faramesh init" in err
    rc, _, err = run(capsys, "check", "--dir", tmp_path / "does-not-exist")
    assert rc == 1
    assert "not a directory" in err


def test_check_with_no_policy_anywhere_above_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if any((p / "governance.fms").exists() for p in (tmp_path, *tmp_path.parents)):
        pytest.skip("a governance.fms exists above the temporary directory")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "check")
    assert rc == 64
    assert "no governance.fms here or in any parent directory" in err and "--dir" in err
    assert out == ""


def test_check_defaults_to_the_nearest_parent_holding_a_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack(tmp_path, SIMPLE.replace('"helper"', '"outer"'))
    inner = write_stack(tmp_path / "inner", SIMPLE.replace('"helper"', '"inner"'))
    deep = inner / "src" / "pkg"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    rc, out, _ = run(capsys, "check", "--format", "json")
    assert rc == 0
    assert json.loads(out)["agents"] == ["inner"]
    monkeypatch.chdir(inner)
    rc, out, _ = run(capsys, "check", "--format", "json")
    assert json.loads(out)["agents"] == ["inner"]
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    rc, out, _ = run(capsys, "check", "--format", "json")
    assert rc == 0 and json.loads(out)["agents"] == ["outer"]


def test_check_finds_a_yaml_stack_from_a_subdirectory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack(tmp_path, "agents:\n  yaml-bot:\n    default: deny\n", "governance.fms.yaml")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rc, out, _ = run(capsys, "check", "--format", "json")
    assert rc == 0
    data = json.loads(out)
    assert data["file"] == "governance.fms.yaml" and data["agents"] == ["yaml-bot"]


# ----------------------------------------------------------------- commands that read never write the stack


def test_check_test_plan_never_write_into_the_stack(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(stack)
    for args in (
        ["check"],
        ["check", "--strict", "--format", "json"],
        ["test"],
        ["test", "--format", "json"],
        ["plan"],
        ["plan", "--format", "json"],
    ):
        rc, out, err = run(capsys, *args, "--dir", stack)
        assert rc == 0, (args, out, err)
    assert snapshot(stack) == before

    # Also with an applied policy present, and on the failure paths.
    (stack / ".faramesh").mkdir()
    assert run(capsys, "compile", "--dir", stack, "--out", stack / ".faramesh" / "policy.json")[0] == 0
    edit(stack / "governance.fms", "    deny refund\n", "    deny refund\n    permit ticket/close\n")
    before = snapshot(stack)
    for args in (["check"], ["test"], ["plan"], ["plan", "--format", "json"]):
        assert run(capsys, *args, "--dir", stack)[0] == 0
    assert snapshot(stack) == before
    edit(stack / "governance.fms", "default deny", "default deny %")
    before = snapshot(stack)
    for args in (["check"], ["test"], ["plan"]):
        assert run(capsys, *args, "--dir", stack)[0] == 1
    assert snapshot(stack) == before


def test_check_test_plan_as_processes_leave_the_stack_alone(stack: Path, tmp_path: Path) -> None:
    before = snapshot(stack)
    for cmd in ("check", "test", "plan"):
        proc = run_process(cmd, cwd=stack, log_dir=tmp_path / "logs")
        assert proc.returncode == 0, proc.stderr
    assert snapshot(stack) == before


# -------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["check", "--bogus"],
        ["check", "--format", "xml"],
        ["plan", "--format", "yaml"],
        ["test", "--format", "JSON!"],
        ["check", "--dir"],
        ["test", "--fixture"],
        ["compile", "--out"],
        ["check", "unexpected-argument"],
        ["check", "--strict=yes"],
        [],
    ],
)
def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, out, err = run(capsys, *args)
    assert rc == 64, (out, err)
    assert "Usage:" in err or "Error:" in err or "Usage:" in out
    no_traceback(out, err)


def test_usage_error_from_the_console_script_is_64(tmp_path: Path) -> None:
    proc = run_process("check", "--format", "xml", log_dir=tmp_path)
    assert proc.returncode == 64
    assert "'xml' is not one of" in proc.stderr
    proc = run_process("frobnicate", log_dir=tmp_path)
    assert proc.returncode == 64
    assert "No such command" in proc.stderr
    no_traceback(proc.stdout, proc.stderr)


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for cmd in ("check", "test", "plan", "compile", "init"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), out
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and re.fullmatch(r"faramesh \d+\.\d+\.\d+\S*\n", out)
    for cmd in ("check", "test", "plan", "compile", "init"):
        rc, out, _ = run(capsys, cmd, "-h")
        assert rc == 0 and out.startswith(f"Usage: faramesh {cmd} ")


# ------------------------------------------------------------------------------------------------- test


def test_test_support_bot_fixtures_pass(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "test", "--dir", EXAMPLE)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[-1] == "9 passed, 0 failed"
    assert sum(line.startswith("PASS support-bot.fmtest.json :: ") for line in lines) == 9
    assert "PASS support-bot.fmtest.json :: a $100 refund waits for a human → DEFER" in lines


def test_test_a_failing_fixture_exits_1_showing_expected_and_got(
    stack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = {
        "agent_id": "support-bot",
        "cases": [
            {
                "name": "big refund (wrong expectation)",
                "tool": "refund",
                "args": {"amount": 1000},
                "expect": {"effect": "permit", "rule_ref": "governance.fms:23"},
            },
            {"name": "small refund", "tool": "refund", "args": {"amount": 5}, "expect": {"effect": "PERMIT"}},
        ],
    }
    (stack / "tests" / "extra.fmtest.json").write_text(json.dumps(fixture), encoding="utf-8")
    rc, out, _ = run(capsys, "test", "--dir", stack)
    assert rc == 1
    lines = out.splitlines()
    assert lines[-1] == "10 passed, 1 failed"
    (fail,) = [line for line in lines if line.startswith("FAIL")]
    assert fail.startswith("FAIL extra.fmtest.json :: big refund (wrong expectation): expected ")
    expected, got = fail.split("expected ", 1)[1].split(", got ")
    assert "'PERMIT'" in expected and "governance.fms:23" in expected  # upper-cased expectation
    assert "'DENY'" in got and "'POLICY_DENY'" in got and "governance.fms:25" in got
    assert "PASS extra.fmtest.json :: small refund → PERMIT" in lines


def test_test_fixture_option_runs_only_the_given_files(
    stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = tmp_path / "one.fmtest.json"
    one.write_text(
        json.dumps(
            {
                "agent_id": "support-bot",
                "cases": [
                    {
                        "name": "refund 100",
                        "tool": "refund",
                        "args": {"amount": 100},
                        "expect": {"effect": "DEFER", "code": "POLICY_DEFER"},
                    },
                ],
            }
        ),
        encoding="utf-8",
    )
    two = tmp_path / "two.json"
    two.write_text(
        json.dumps(
            {
                "agent_id": "payment-bot",
                "cases": [
                    {
                        "name": "imported charge",
                        "tool": "stripe/charge",
                        "args": {"amount": 3000},
                        "expect": {"effect": "DEFER"},
                    },
                    {
                        "name": "per-case agent",
                        "agent_id": "support-bot",
                        "tool": "refund",
                        "args": {"amount": 1},
                        "expect": {"effect": "PERMIT"},
                    },
                ],
            }
        ),
        encoding="utf-8",
    )
    rc, out, _ = run(capsys, "test", "--dir", stack, "--fixture", one)
    assert rc == 0
    assert out.splitlines() == ["PASS one.fmtest.json :: refund 100 → DEFER", "1 passed, 0 failed"]
    rc, out, _ = run(capsys, "test", "--dir", stack, "--fixture", one, "--fixture", two)
    assert rc == 0
    assert out.splitlines()[-1] == "3 passed, 0 failed"


def test_test_json_output(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (stack / "tests" / "z.fmtest.json").write_text(
        json.dumps(
            {
                "agent_id": "support-bot",
                "cases": [{"name": "wrong", "tool": "ticket/read", "expect": {"effect": "DENY"}}],
            }
        ),
        encoding="utf-8",
    )
    rc, out, _ = run(capsys, "test", "--dir", stack, "--format", "json")
    assert rc == 1
    data = json.loads(out)
    assert set(data) == {"passed", "failed", "cases"}
    assert (data["passed"], data["failed"]) == (9, 1)
    assert len(data["cases"]) == 10
    for case in data["cases"]:
        assert set(case) == {"fixture", "name", "passed", "expected", "got"}
        assert set(case["got"]) == {"effect", "code", "rule_ref"}
    wrong = data["cases"][-1]
    assert wrong["fixture"] == "z.fmtest.json" and wrong["passed"] is False
    assert wrong["expected"] == {"effect": "DENY"}
    assert wrong["got"] == {"effect": "PERMIT", "code": "POLICY_PERMIT", "rule_ref": "governance.fms:22"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", '"cases" list'),
        ('{"agent_id": "support-bot", "cases": {}}', '"cases" list'),
        ('{"agent_id": "support-bot", "cases": [{"tool": "refund"}]}', '"expect" object'),
        ('{"agent_id": "support-bot", "cases": [{"tool": "refund", "expect": {"efect": "DENY"}}]}', "'efect'"),
        ('{"agent_id": "support-bot", "cases": [{"tool": "refund", "expect": {}}]}', "expect is empty"),
        ('{"agent_id": "support-bot", "cases": [{"expect": {"effect": "DENY"}}]}', '"tool"'),
        (
            '{"agent_id": "support-bot", "cases": [{"tool": "refund", "args": [1], "expect": {"effect": "DENY"}}]}',
            '"args"',
        ),
        ('{"cases": [{"tool": "refund", "expect": {"effect": "DENY"}}]}', '"agent_id"'),
        (
            '{"agent_id": "support-bot", "time": "noon", "cases": [{"tool": "refund", "expect": {"effect": "DENY"}}]}',
            '"time"',
        ),
    ],
)
def test_test_malformed_fixture_is_an_error_with_a_message(
    stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.fmtest.json"
    bad.write_text(content, encoding="utf-8")
    rc, out, err = run(capsys, "test", "--dir", stack, "--fixture", bad)
    assert rc == 1
    assert "bad.fmtest.json" in err and message in err, err
    assert "passed" not in out
    no_traceback(out, err)


def test_test_missing_fixture_file_and_no_fixtures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, SIMPLE)
    rc, _, err = run(capsys, "test", "--dir", tmp_path, "--fixture", tmp_path / "nope.json")
    assert rc == 1
    assert "cannot read fixture" in err
    rc, _, err = run(capsys, "test", "--dir", tmp_path)
    assert rc == 64
    assert "no fixtures" in err


def test_test_compile_errors_exit_1_or_2(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = stack / "governance.fms"
    original = policy.read_text(encoding="utf-8")
    edit(policy, "deny refund\n", "deny refund if\n")
    rc, out, err = run(capsys, "test", "--dir", stack)
    assert rc == 1
    assert re.match(r"governance\.fms:\d+:\d+: error: ", err) and "passed" not in out
    policy.write_text(original, encoding="utf-8")
    sig = stack / "registry/artifacts/frameworks/langgraph/1.0.0/profile.fpl.sig"
    data = json.loads(sig.read_text(encoding="utf-8"))
    data["value_b64"] = b64(bytes(64))
    sig.write_text(json.dumps(data), encoding="utf-8")
    rc, out, err = run(capsys, "test", "--dir", stack)
    assert rc == 2
    assert "langgraph@1.0.0" in err and "passed" not in out
    rc, out, _ = run(capsys, "test", "--dir", stack, "--format", "json")
    assert rc == 2 and json.loads(out)["error"]["code"] == "SIGNATURE_INVALID"


# ------------------------------------------------------------------------------------------------- plan


def apply_with_compile(stack: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    (stack / ".faramesh").mkdir(exist_ok=True)
    out_file = stack / ".faramesh" / "policy.json"
    rc, _, err = run(capsys, "compile", "--dir", stack, "--out", out_file)
    assert rc == 0, err
    return out_file


def plan_json(stack: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc, out, err = run(capsys, "plan", "--dir", stack, "--format", "json")
    assert rc == 0, err
    data: dict[str, Any] = json.loads(out)
    assert set(data) == {"compared_with", "base_version", "new_version", "changes"}
    for c in data["changes"]:
        assert set(c) == {"op", "kind", "key", "agent", "before", "after"}
        assert c["op"] in ("+", "-", "~")
    return data


def test_plan_without_an_applied_policy_compares_with_nothing(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "plan", "--dir", stack)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("comparing with nothing")
    assert '+ agent "support-bot"' in lines
    assert '+ agent "support-bot" rule permit refund if amount < 25 (governance.fms:23)' in lines
    assert '+ agent "support-bot" rule deny refund (governance.fms:25)' in lines
    assert "+ runtime mode = enforce" in lines
    assert any(line.startswith('+ agent "support-bot" budget daily = ') for line in lines)
    assert not any(line.startswith(("- ", "~ ")) for line in lines)
    assert re.fullmatch(r"(\d+) added, 0 removed, 0 changed", lines[-1])
    data = plan_json(stack, capsys)
    assert data["compared_with"] == "none" and data["base_version"] is None
    assert data["new_version"] == compiled_version(stack)
    assert {c["op"] for c in data["changes"]} == {"+"}
    assert int(lines[-1].split()[0]) == len(data["changes"])


def test_plan_unchanged_says_no_changes(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    applied = apply_with_compile(stack, capsys)
    rc, out, _ = run(capsys, "plan", "--dir", stack)
    assert rc == 0
    version = hashlib.sha256(applied.read_bytes()).hexdigest()
    assert out.splitlines() == [
        f"comparing with the last applied policy (.faramesh/policy.json, version {version[:16]})",
        "no changes",
    ]
    data = plan_json(stack, capsys)
    assert data["compared_with"] == "applied"
    assert data["base_version"] == data["new_version"] == version
    assert data["changes"] == []


def test_plan_shows_changed_added_and_removed_items(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    apply_with_compile(stack, capsys)
    policy = stack / "governance.fms"
    edit(policy, "permit refund if amount < $25", "permit refund if amount < $50")  # ~ rule
    edit(
        policy, "    permit ticket/read\n", '    permit ticket/read\n    permit ticket/close if args.tool == "x"\n'
    )  # + rule
    edit(policy, "  budget daily { max $1000 on_exceed defer }\n", "")  # - budget
    edit(policy, 'mode = "enforce"', 'mode = "audit"')  # ~ runtime
    rc, out, _ = run(capsys, "plan", "--dir", stack)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("comparing with the last applied policy (.faramesh/policy.json, version ")
    assert "~ runtime mode: enforce → audit" in lines
    assert (
        '~ agent "support-bot" rule permit refund: permit refund if amount < 25 → permit refund if amount < 50' in lines
    )
    assert '+ agent "support-bot" rule permit ticket/close if args.tool == "x" (governance.fms:23)' in lines
    assert any(line.startswith('- agent "support-bot" budget daily = ') and "100000" in line for line in lines)
    assert lines[-1] == "1 added, 1 removed, 2 changed"

    changes = plan_json(stack, capsys)["changes"]
    by_kind = {(c["op"], c["kind"], c["key"]): c for c in changes}
    assert set(by_kind) == {
        ("~", "runtime", "mode"),
        ("~", "rule", "permit refund"),
        ("+", "rule", "permit ticket/close"),
        ("-", "budget", "daily"),
    }
    rule = by_kind[("~", "rule", "permit refund")]
    assert rule["agent"] == "support-bot"
    assert rule["before"]["condition"] == ["cmp", "<", ["path", "args", "amount"], ["lit", 25]]
    assert rule["after"]["condition"] == ["cmp", "<", ["path", "args", "amount"], ["lit", 50]]
    added = by_kind[("+", "rule", "permit ticket/close")]
    assert added["before"] is None and added["after"]["tool"] == "ticket/close"
    budget = by_kind[("-", "budget", "daily")]
    assert budget["after"] is None and budget["before"]["max_cents"] == 100000
    assert by_kind[("~", "runtime", "mode")]["before"] == "enforce"
    assert by_kind[("~", "runtime", "mode")]["after"] == "audit"


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        # first match wins: moving `deny refund` to the top changes every refund decision
        (
            "    permit refund if amount < $25\n    defer refund if amount < $500\n    deny refund\n",
            "    deny refund\n    permit refund if amount < $25\n    defer refund if amount < $500\n",
            "rule_order",
        ),
        ('notify = "slack://#sec-alerts"', 'notify = "slack://#other"', "alert"),
        ("    deny refund\n", '    deny refund reason "too large"\n', "rule"),
        ('rate_limit "refund": 5 per minute', 'rate_limit "refund": 50 per minute', "rate_limit"),
        ('egress { allow = ["api.example.com"] }', 'egress { allow = ["evil.example.com"] }', "setting"),
        (
            "  default deny\n  rules {\n    permit knowledgebase",
            "  default permit\n  rules {\n    permit knowledgebase",
            "default",
        ),
    ],
)
def test_plan_reports_every_change_that_alters_the_policy(
    stack: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, kind: str
) -> None:
    """A plan that says "no changes" while the policy's behaviour changed would mislead a reviewer."""
    apply_with_compile(stack, capsys)
    edit(stack / "governance.fms", old, new)
    data = plan_json(stack, capsys)
    assert data["base_version"] != data["new_version"]
    assert [c["kind"] for c in data["changes"]] == [kind], data["changes"]
    assert data["changes"][0]["op"] == "~" and data["changes"][0]["agent"] == "support-bot"
    rc, out, _ = run(capsys, "plan", "--dir", stack)
    assert rc == 0 and "no changes" not in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("~ ")]
    assert line.startswith(f'~ agent "support-bot" {kind}')
    before, after = line.split(": ", 1)[1].split(" → ")
    assert before != after, line


def test_plan_against_a_corrupt_applied_policy_is_an_error_not_a_crash(
    stack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (stack / ".faramesh").mkdir()
    applied = stack / ".faramesh" / "policy.json"
    for content in (
        "garbage",
        "[1]",
        '{"agents": {}}',
        '{"format": "faramesh.policy/v1", "runtime": [1]}',
        '{"format": "faramesh.policy/v1", "trust": [1]}',
        '{"format": "faramesh.policy/v1", "agents": {"x": {"rules": [{"tool": 1}]}}}',
    ):
        applied.write_text(content, encoding="utf-8")
        rc, out, err = run(capsys, "plan", "--dir", stack)
        assert rc == 1, (content, err)
        assert "policy.json" in err and "faramesh apply" in err
        no_traceback(out, err)


def test_plan_compile_error_exits_1_with_json_error(stack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(stack / "governance.fms", "permit ticket/read", "permit ticket/read if")
    rc, out, _ = run(capsys, "plan", "--dir", stack, "--format", "json")
    assert rc == 1
    assert json.loads(out)["error"]["code"] == "POLICY_SYNTAX"


# ---------------------------------------------------------------------------------------------- compile


def test_compile_out_writes_bytes_whose_sha256_is_the_printed_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "policy.json"
    rc, out, err = run(capsys, "compile", "--dir", EXAMPLE, "--out", out_file)
    assert rc == 0
    assert out == ""
    raw = out_file.read_bytes()
    assert err == f"policy version {hashlib.sha256(raw).hexdigest()}\n"
    data = json.loads(raw)
    assert data["format"] == "faramesh.policy/v1"
    assert data["agents"]["support-bot"]["rules"][2]["ref"] == "governance.fms:23"
    assert not (tmp_path / "policy.json.tmp").exists()


def test_compile_to_stdout_and_determinism(stack: Path, tmp_path: Path) -> None:
    first = subprocess.run(
        [str(CONSOLE_SCRIPT), "compile", "--dir", str(EXAMPLE)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "FARAMESH_LOG_DIR": str(tmp_path)},
    )
    assert first.returncode == 0, first.stderr
    version = first.stderr.decode().removeprefix("policy version ").strip()
    assert SHA256_HEX.match(version)
    assert hashlib.sha256(first.stdout).hexdigest() == version
    # Same source elsewhere on disk, compiled again: the same bytes.
    proc = run_process("compile", "--dir", stack, "--out", tmp_path / "again.json", log_dir=tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "again.json").read_bytes() == first.stdout
    assert proc.stderr == f"policy version {version}\n"


def test_compile_twice_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a.json", "b.json"):
        assert run(capsys, "compile", "--dir", EXAMPLE, "--out", tmp_path / name)[0] == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_compile_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stack(tmp_path, SIMPLE)
    rc, _, err = run(capsys, "compile", "--dir", tmp_path, "--out", tmp_path / "missing-dir" / "p.json")
    assert rc == 1
    assert "cannot write" in err
    write_stack(tmp_path, SYNTAX_CASES[0][0])
    rc, out, err = run(capsys, "compile", "--dir", tmp_path, "--out", tmp_path / "p.json")
    assert rc == 1 and out == ""
    assert err.startswith("governance.fms:4:") and not (tmp_path / "p.json").exists()


# -------------------------------------------------------------------------------------------------- init


def test_init_writes_a_starter_that_checks_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "new-stack"
    rc, out, _ = run(capsys, "init", "--dir", target)
    assert rc == 0
    assert str(target / "governance.fms") in out
    rc, _, err = run(capsys, "check", "--dir", target, "--strict")
    assert rc == 0, err

    from faramesh.engine.policy.stack import compile_stack

    policy = compile_stack(target, env={}).policy
    (agent,) = policy.agents.values()
    assert agent.default == "deny"
    assert {r.effect for r in agent.rules} == {"permit", "defer", "deny"}
    assert re.search(r"^\s*default deny\s*$", (target / "governance.fms").read_text(encoding="utf-8"), re.M)

    # And it decides as its comments say.
    fixture = tmp_path / "starter.fmtest.json"
    fixture.write_text(
        json.dumps(
            {
                "agent_id": agent.agent_id,
                "cases": [
                    {"name": "search", "tool": "docs/search", "expect": {"effect": "PERMIT"}},
                    {
                        "name": "mass mail",
                        "tool": "email/send",
                        "args": {"recipients": 50},
                        "expect": {"effect": "DEFER"},
                    },
                    {
                        "name": "one mail",
                        "tool": "email/send",
                        "args": {"recipients": 1},
                        "expect": {"effect": "PERMIT"},
                    },
                    {"name": "shell", "tool": "shell/exec", "expect": {"effect": "DENY", "code": "POLICY_DENY"}},
                    {"name": "anything else", "tool": "db/drop", "expect": {"effect": "DENY"}},
                ],
            }
        ),
        encoding="utf-8",
    )
    rc, out, _ = run(capsys, "test", "--dir", target, "--fixture", fixture)
    assert rc == 0, out
    assert out.splitlines()[-1] == "5 passed, 0 failed"


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "init", "--dir", tmp_path)[0] == 0
    policy = tmp_path / "governance.fms"
    policy.write_text("# mine\n", encoding="utf-8")
    before = snapshot(tmp_path)
    rc, _, err = run(capsys, "init", "--dir", tmp_path)
    assert rc == 1
    assert "already exists" in err
    assert snapshot(tmp_path) == before
    assert policy.read_text(encoding="utf-8") == "# mine\n"


def test_init_refuses_when_another_format_exists_and_defaults_to_cwd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack(tmp_path / "y", "agents: {}\n", "governance.fms.yaml")
    rc, _, err = run(capsys, "init", "--dir", tmp_path / "y")
    assert rc == 1 and "governance.fms.yaml" in err
    assert not (tmp_path / "y" / "governance.fms").exists()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run(capsys, "init")[0] == 0
    assert (tmp_path / "here" / "governance.fms").is_file()


# -------------------------------------------------------------------------------------------- internal error


def _boom(*_a: object, **_k: object) -> None:
    raise RuntimeError("boom: an injected bug")


def test_internal_error_exits_70_with_log_path_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("faramesh.engine.policy.stack.compile_stack", _boom)
    log_dir = tmp_path / "crash-logs"
    rc, out, err = run(capsys, "check", "--dir", EXAMPLE)
    assert rc == 70
    log = log_dir / "cli-crash.log"
    assert err == f"faramesh: internal error (RuntimeError); this is a bug, details in {log}\n"
    no_traceback(out, err)
    assert "boom" not in err
    text = log.read_text(encoding="utf-8")
    assert "Traceback" in text and "RuntimeError: boom: an injected bug" in text


def test_internal_error_log_defaults_to_xdg_state_for_non_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FARAMESH_LOG_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr("faramesh.engine.policy.fixtures.run_fixture", _boom)
    rc, _, err = run(capsys, "test", "--dir", EXAMPLE)
    assert rc == 70
    log = tmp_path / "state" / "faramesh" / "log" / "cli-crash.log"
    assert str(log) in err and log.is_file()


def test_internal_error_when_the_log_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    monkeypatch.setenv("FARAMESH_LOG_DIR", str(tmp_path / "a-file" / "sub"))
    monkeypatch.setattr("faramesh.engine.policy.diff.diff_policies", _boom)
    rc, out, err = run(capsys, "plan", "--dir", EXAMPLE)
    assert rc == 70
    assert "internal error" in err and "could not be written" in err
    no_traceback(out, err)


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("faramesh.engine.policy.stack.compile_stack", interrupt)
    rc, out, err = run(capsys, "check", "--dir", EXAMPLE)
    assert rc == 130
    no_traceback(out, err)


# ----------------------------------------------------------------------------------- README CLI reference


def _readme_sections() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## CLI reference")
    end = text.find("\n## ", start + 1)
    reference = text[start : end if end != -1 else len(text)]
    parts = re.split(r"^### faramesh (\S+(?: [a-z]\S*)?)[ \t]*$", reference, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _commands() -> dict[str, Any]:
    import typer.main

    group = typer.main.get_command(cli.app)
    flat: dict[str, Any] = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        if sub:  # a group such as `approvals`: each subcommand has its own section
            flat.update({f"{name} {child}": c for child, c in sub.items()})
        else:
            flat[name] = command
    return flat


def test_readme_has_a_section_for_every_command_and_only_real_commands() -> None:
    sections, commands = _readme_sections(), _commands()
    assert {"check", "test", "plan", "compile", "init", "dev", "serve", "status"} <= set(commands)
    assert set(sections) == set(commands), (sorted(sections), sorted(commands))


def test_readme_sections_name_every_option_and_choice() -> None:
    sections = _readme_sections()
    for name, command in _commands().items():
        section = sections[name]
        usage = section.strip().splitlines()[0]
        assert usage.startswith(f"`faramesh {name}"), usage
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--"):
                    assert re.search(rf"{re.escape(opt)}(?![\w-])", usage), f"{opt} of `{name}` missing from {usage}"
            annotation = param.type_descriptor.annotation
            if isinstance(annotation, type) and issubclass(annotation, Enum):
                choices = "|".join(str(e.value) for e in annotation)
                assert choices in usage, f"{name} {param.opts}: {choices} not in {usage}"
        for opt in re.findall(r"\[(--[\w-]+)", usage):
            assert any(opt in p.opts for p in command.params), f"README names {opt} but `{name}` has no such option"


def test_readme_options_match_help_output(capsys: pytest.CaptureFixture[str]) -> None:
    sections = _readme_sections()
    for name in _commands():
        rc, out, _ = run(capsys, *name.split(), "--help")
        assert rc == 0
        shown = set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", out, re.M)) - {"--help"}
        assert shown, out
        usage = sections[name].strip().splitlines()[0]
        named = set(re.findall(r"\[(--[\w-]+)", usage))
        assert shown == named, (name, shown, named)


def test_preflight_reports_the_host_and_exits_by_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "preflight", "--profile", "full", "--format", "json")
    data = json.loads(out)
    assert rc == (0 if data["can_deliver"] else 4), (data["problems"], err)
    assert data["profile"] == "full"
    assert {"landlock_abi", "user_namespaces", "seccomp", "cgroup_version", "fresh_proc"} <= set(data)
    if not data["can_deliver"]:
        assert data["problems"]
    rc_off, out_off, _ = run(capsys, "preflight", "--profile", "off")
    assert rc_off == 0 and "credential stripping only" in out_off


def test_preflight_unknown_profile_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = run(capsys, "preflight", "--profile", "bogus")
    assert rc == 64
