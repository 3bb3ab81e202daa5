"""Imports: offline resolution through the registry search path, exact versions, pinned-key signature
verification and the merge of imported agents into the stack.

The import and trust mechanics run against a signed registry this file builds in tmp_path with its own
Ed25519 keys, laid out like ../shared/registry. Tests that also use the real, publicly signed mirror
are marked `requires_shared`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_REGISTRY, requires_shared, seed_stack_text
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from faramesh.engine.policy import imports as imports_mod
from faramesh.engine.policy.ast import ImportDecl, TrustKeyDecl
from faramesh.engine.policy.errors import (
    ImportFailure,
    ImportUnresolved,
    ImportVersionInvalid,
    PolicySchemaError,
    PolicySyntaxError,
    SignatureInvalid,
    SourcePos,
    TrustKeyMissing,
)
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.imports import registry_search_path, resolve_import
from faramesh.engine.policy.parser import parse_fpl
from faramesh.engine.policy.stack import CompiledStack, compile_stack

REGISTRY_ID = "registry.example.com/acme/hub"
NOW = 1_750_000_000


def public_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def pinned(key: Ed25519PrivateKey) -> str:
    return "ed25519:" + public_b64(key)


PUBLISHER_KEY = Ed25519PrivateKey.generate()
ATTACKER_KEY = Ed25519PrivateKey.generate()


def signature_doc(body: bytes, key: Ed25519PrivateKey, key_id: str = "acme-ed25519-2026") -> dict[str, str]:
    return {
        "key_id": key_id,
        "algorithm": "ed25519",
        "value_b64": base64.b64encode(key.sign(body)).decode(),
        "public_key_b64": public_b64(key),
    }


@dataclass
class Registry:
    """A signed registry on disk: catalog.json + artifacts/<kind>/…/<file> + <file>.sig."""

    root: Path
    registry_id: str = REGISTRY_ID
    key: Ed25519PrivateKey = PUBLISHER_KEY
    entries: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    def publish(self, name: str, version: str, text: str, *, kind: str = "policies", sign: bool = True) -> Path:
        """Add `<kind>/<name>@<version>`; policies are catalogued as "acme/<name>" like the real mirror."""
        if kind == "policies":
            rel = f"artifacts/policies/acme/{name}/{version}/policy.fpl"
            catalog_name = f"acme/{name}"
        else:
            rel = f"artifacts/{kind}/{name}/{version}/profile.fpl"
            catalog_name = name
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        if sign:
            self.sign(path)
        self.entries.setdefault(kind, {}).setdefault(catalog_name, {})[version] = rel
        self.write_catalog()
        return path

    def sign(self, path: Path, key: Ed25519PrivateKey | None = None) -> None:
        doc = signature_doc(path.read_bytes(), key or self.key)
        path.with_name(path.name + ".sig").write_text(json.dumps(doc))

    def write_catalog(self) -> None:
        catalog: dict[str, Any] = {"registry_id": self.registry_id, "packs": [], "policies": [], "frameworks": []}
        for kind, names in self.entries.items():
            for name, versions in names.items():
                catalog[kind].append({"name": name, "latest_version": max(versions), "versions": dict(versions)})
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "catalog.json").write_text(json.dumps(catalog, indent=2))

    def import_path(self, name: str, version: str, kind: str = "policies") -> str:
        return f"{self.registry_id}/{kind}/{name}@{version}"


def artifact_allowing(tool: str) -> str:
    return f'agent "imported-bot" {{\n  default deny\n  permit {tool}\n}}\n'


def stack_source(imports: list[str], trust: dict[str, str] | None = None, body: str = "") -> str:
    trust = {REGISTRY_ID: pinned(PUBLISHER_KEY)} if trust is None else trust
    lines = [f'import "{i}"' for i in imports]
    if trust:
        lines.append("trust {")
        lines += [f'  key "{pub}" {key}' for pub, key in trust.items()]
        lines.append("}")
    return "\n".join(lines) + "\n" + body


@pytest.fixture(autouse=True)
def hermetic_system_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the system-wide registry at an empty directory so the host's /usr/share cannot leak in."""
    system = tmp_path / "usr-share-faramesh-registry"
    monkeypatch.setattr(imports_mod, "SYSTEM_REGISTRY", system)
    return system


@pytest.fixture
def stack_dir(tmp_path: Path) -> Path:
    d = tmp_path / "stack"
    d.mkdir()
    return d


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry-cli")
    reg.publish("payments", "1.0.0", artifact_allowing("pay/one-zero-zero"))
    reg.publish("payments", "1.1.0", artifact_allowing("pay/one-one-zero"))
    return reg


def write_stack(stack_dir: Path, text: str) -> None:
    (stack_dir / "governance.fms").write_text(text)


def compile_in(stack_dir: Path, registry: Path | None = None, env: dict[str, str] | None = None) -> CompiledStack:
    return compile_stack(stack_dir, registry=registry, env=env or {})


def decide(stack: CompiledStack, agent: str, tool: str, **args: Any) -> tuple[str, str | None]:
    d = evaluate(stack.policy, {"agent_id": agent, "tool_id": tool, "args": args, "time": NOW})
    return d.effect, d.rule_ref


# ---------------------------------------------------------------------------------------------------
# resolution and the search path


def test_resolves_through_the_registry_argument(stack_dir: Path, registry: Registry) -> None:
    imp = registry.import_path("payments", "1.0.0")
    write_stack(stack_dir, stack_source([imp]))
    stack = compile_in(stack_dir, registry=registry.root)
    artifact = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    (record,) = stack.policy.imports
    assert dict(record) == {
        "path": imp,
        "alias": None,
        "version": "1.0.0",
        "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
        "key_id": "acme-ed25519-2026",
    }
    assert decide(stack, "imported-bot", "pay/one-zero-zero") == ("PERMIT", f"{imp}:3")
    assert decide(stack, "imported-bot", "pay/one-one-zero")[0] == "DENY"


def test_exact_version_is_the_one_resolved(stack_dir: Path, registry: Registry) -> None:
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.1.0")]))
    stack = compile_in(stack_dir, registry=registry.root)
    assert decide(stack, "imported-bot", "pay/one-one-zero")[0] == "PERMIT"
    assert decide(stack, "imported-bot", "pay/one-zero-zero")[0] == "DENY"


def _three_registries(tmp_path: Path, stack_dir: Path, system: Path) -> dict[str, Registry]:
    regs = {
        "cli": Registry(tmp_path / "reg-cli"),
        "env": Registry(tmp_path / "reg-env"),
        "stack": Registry(stack_dir / "registry"),
        "system": Registry(system),
    }
    for label, reg in regs.items():
        reg.publish("payments", "1.0.0", artifact_allowing(f"from/{label}"))
    return regs


@pytest.mark.parametrize(
    ("present", "winner"),
    [
        (("cli", "env", "stack", "system"), "cli"),
        (("env", "stack", "system"), "env"),
        (("stack", "system"), "stack"),
        (("system",), "system"),
    ],
)
def test_search_order(
    tmp_path: Path, stack_dir: Path, hermetic_system_registry: Path, present: tuple[str, ...], winner: str
) -> None:
    regs = _three_registries(tmp_path, stack_dir, hermetic_system_registry)
    for label, reg in regs.items():
        if label not in present:
            shutil.rmtree(reg.root)
    write_stack(stack_dir, stack_source([regs["cli"].import_path("payments", "1.0.0")]))
    stack = compile_in(
        stack_dir,
        registry=regs["cli"].root,
        env={"FARAMESH_REGISTRY_ROOT": str(regs["env"].root)},
    )
    assert decide(stack, "imported-bot", f"from/{winner}")[0] == "PERMIT"
    for other in {"cli", "env", "stack", "system"} - {winner}:
        assert decide(stack, "imported-bot", f"from/{other}")[0] == "DENY"
    expected = regs[winner].root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    assert stack.policy.imports[0]["sha256"] == hashlib.sha256(expected.read_bytes()).hexdigest()


def test_search_path_order_and_default_system_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real default, not the hermetic one
    roots = registry_search_path(tmp_path / "cli", {"FARAMESH_REGISTRY_ROOT": str(tmp_path / "env")}, tmp_path / "s")
    assert roots == [
        tmp_path / "cli",
        tmp_path / "env",
        tmp_path / "s" / "registry",
        Path("/usr/share/faramesh/registry"),
    ]
    roots = registry_search_path(None, {"FARAMESH_REGISTRY_ROOT": ""}, tmp_path / "s")
    assert roots == [tmp_path / "s" / "registry", Path("/usr/share/faramesh/registry")]


def test_unresolved_import_lists_every_place_looked(
    tmp_path: Path, stack_dir: Path, hermetic_system_registry: Path
) -> None:
    other = Registry(tmp_path / "other-publisher", registry_id="other.example.com/hub")
    other.publish("payments", "1.0.0", artifact_allowing("x"))
    same = Registry(stack_dir / "registry")
    same.publish("shell", "1.0.0", artifact_allowing("x"))
    imp = f"{REGISTRY_ID}/policies/payments@1.0.0"
    write_stack(stack_dir, stack_source([imp]))
    missing_cli = tmp_path / "no-such-dir"
    with pytest.raises(ImportUnresolved) as exc:
        compile_in(stack_dir, registry=missing_cli, env={"FARAMESH_REGISTRY_ROOT": str(other.root)})
    err = exc.value
    assert err.exit_code == 2 and isinstance(err, ImportFailure)
    msg = err.message
    assert imp in msg
    for place in (missing_cli, other.root, stack_dir / "registry", hermetic_system_registry):
        assert str(place) in msg, place
    assert "not this publisher" in msg
    assert "no policies/payments in its catalog" in msg
    order = [msg.index(str(p)) for p in (missing_cli, other.root, stack_dir / "registry", hermetic_system_registry)]
    assert order == sorted(order)
    assert err.pos is not None and err.pos.line == 1


def test_registry_without_the_entry_falls_through_to_the_next(tmp_path: Path, stack_dir: Path) -> None:
    first = Registry(tmp_path / "first")
    first.publish("shell", "1.0.0", artifact_allowing("from/first"))
    second = Registry(tmp_path / "second")
    second.publish("payments", "1.0.0", artifact_allowing("from/second"))
    write_stack(stack_dir, stack_source([first.import_path("payments", "1.0.0")]))
    stack = compile_in(stack_dir, registry=first.root, env={"FARAMESH_REGISTRY_ROOT": str(second.root)})
    assert decide(stack, "imported-bot", "from/second")[0] == "PERMIT"


def test_catalogs_nested_under_their_registry_id(tmp_path: Path, stack_dir: Path) -> None:
    root = tmp_path / "mirror"
    acme = Registry(root / REGISTRY_ID)
    acme.publish("payments", "1.0.0", artifact_allowing("from/acme"))
    other = Registry(root / "other.example.com/x/hub", registry_id="other.example.com/x/hub", key=ATTACKER_KEY)
    other.publish("payments", "1.0.0", artifact_allowing("from/other"))
    write_stack(stack_dir, stack_source([acme.import_path("payments", "1.0.0")]))
    stack = compile_in(stack_dir, registry=root)
    assert decide(stack, "imported-bot", "from/acme")[0] == "PERMIT"


def test_unknown_version_is_unresolved_and_lists_versions(stack_dir: Path, registry: Registry) -> None:
    imp = registry.import_path("payments", "1.3.0")
    write_stack(stack_dir, stack_source([imp]))
    with pytest.raises(ImportUnresolved) as exc:
        compile_in(stack_dir, registry=registry.root)
    err = exc.value
    assert err.exit_code == 2 and err.code == "IMPORT_UNRESOLVED"
    assert "1.3.0" in err.message and "1.0.0, 1.1.0" in err.message
    assert err.pos is not None and err.pos.line == 1


def test_unknown_version_does_not_fall_back_to_a_later_registry(
    tmp_path: Path, stack_dir: Path, registry: Registry
) -> None:
    newer = Registry(tmp_path / "newer")
    newer.publish("payments", "1.3.0", artifact_allowing("x"))
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.3.0")]))
    with pytest.raises(ImportUnresolved, match=r"1\.0\.0, 1\.1\.0"):
        compile_in(stack_dir, registry=registry.root, env={"FARAMESH_REGISTRY_ROOT": str(newer.root)})


@pytest.mark.parametrize(
    "suffix", ["@latest", "@^1.0", "@~1.0.0", "@1.0", "@1", "@>=1.0.0", "@1.0.x", "@v1.0.0", "@01.0.0", "@", ""]
)
def test_version_must_be_exact(stack_dir: Path, registry: Registry, suffix: str) -> None:
    imp = f"{REGISTRY_ID}/policies/payments{suffix}"
    write_stack(stack_dir, stack_source([imp]))
    with pytest.raises(ImportVersionInvalid) as exc:
        compile_in(stack_dir, registry=registry.root)
    assert exc.value.exit_code == 2 and exc.value.code == "IMPORT_VERSION_INVALID"
    assert "1.0.0" in exc.value.message  # says what an exact pin looks like


def test_prerelease_versions_are_exact(stack_dir: Path, registry: Registry) -> None:
    registry.publish("payments", "2.0.0-rc.1", artifact_allowing("from/rc"))
    write_stack(stack_dir, stack_source([registry.import_path("payments", "2.0.0-rc.1")]))
    stack = compile_in(stack_dir, registry=registry.root)
    assert decide(stack, "imported-bot", "from/rc")[0] == "PERMIT"


def test_missing_artifact_file_is_unresolved(stack_dir: Path, registry: Registry) -> None:
    (registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl").unlink()
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(ImportUnresolved, match="missing"):
        compile_in(stack_dir, registry=registry.root)


def test_catalog_pointing_outside_the_registry_is_refused(tmp_path: Path, stack_dir: Path, registry: Registry) -> None:
    outside = tmp_path / "outside.fpl"
    outside.write_text(artifact_allowing("evil"))
    registry.sign(outside)
    registry.entries["policies"]["acme/payments"]["1.0.0"] = "../outside.fpl"
    registry.write_catalog()
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(ImportUnresolved, match="outside"):
        compile_in(stack_dir, registry=registry.root)


# ---------------------------------------------------------------------------------------------------
# trust and signatures


def test_missing_trust_block_is_trust_key_missing(stack_dir: Path, registry: Registry) -> None:
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")], trust={}))
    with pytest.raises(TrustKeyMissing) as exc:
        compile_in(stack_dir, registry=registry.root)
    assert exc.value.exit_code == 2 and exc.value.code == "TRUST_KEY_MISSING"
    assert "trust" in exc.value.message


@pytest.mark.parametrize("publisher", ["other.example.com/hub", "registry.example.com/ac", f"{REGISTRY_ID}/policies/x"])
def test_trust_key_for_another_publisher_is_trust_key_missing(
    stack_dir: Path, registry: Registry, publisher: str
) -> None:
    write_stack(
        stack_dir, stack_source([registry.import_path("payments", "1.0.0")], trust={publisher: pinned(PUBLISHER_KEY)})
    )
    with pytest.raises(TrustKeyMissing):
        compile_in(stack_dir, registry=registry.root)


def test_tampered_artifact_fails_signature(stack_dir: Path, registry: Registry) -> None:
    artifact = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    body = bytearray(artifact.read_bytes())
    body[body.index(b"default deny") + len("default ")] = ord("D")  # one byte: "deny" -> "Deny"
    artifact.write_bytes(bytes(body))
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid) as exc:
        compile_in(stack_dir, registry=registry.root)
    assert exc.value.exit_code == 2 and exc.value.code == "SIGNATURE_INVALID"
    assert REGISTRY_ID in exc.value.message  # names the pinned publisher


def test_single_appended_byte_fails_signature(stack_dir: Path, registry: Registry) -> None:
    artifact = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    artifact.write_bytes(artifact.read_bytes() + b"\n")  # still valid FPL, same meaning
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid):
        compile_in(stack_dir, registry=registry.root)


def test_sig_carrying_the_attackers_own_key_still_fails(stack_dir: Path, registry: Registry) -> None:
    """The .sig's embedded public key is the attacker's and matches its signature: verification must
    use only the key pinned in the stack's trust block."""
    artifact = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    artifact.write_text('agent "imported-bot" {\n  default permit\n  permit *\n}\n')
    registry.sign(artifact, key=ATTACKER_KEY)
    sig = json.loads(artifact.with_name("policy.fpl.sig").read_text())
    assert sig["public_key_b64"] == public_b64(ATTACKER_KEY)  # self-consistent forgery
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid):
        compile_in(stack_dir, registry=registry.root)


def test_untampered_artifact_resigned_by_another_key_fails(stack_dir: Path, registry: Registry) -> None:
    artifact = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl"
    registry.sign(artifact, key=ATTACKER_KEY)
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid):
        compile_in(stack_dir, registry=registry.root)


def test_missing_sig_fails(stack_dir: Path, registry: Registry) -> None:
    (registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl.sig").unlink()
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid, match="missing or unreadable"):
        compile_in(stack_dir, registry=registry.root)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda sig: "not json",
        lambda sig: json.dumps({k: v for k, v in sig.items() if k != "value_b64"}),
        lambda sig: json.dumps({**sig, "value_b64": "!!!not base64!!!"}),
        lambda sig: json.dumps({**sig, "value_b64": base64.b64encode(b"short").decode()}),
        lambda sig: json.dumps({**sig, "algorithm": "rsa-pss"}),
        lambda sig: json.dumps([sig]),
    ],
    ids=["not-json", "no-value", "bad-base64", "short-signature", "other-algorithm", "wrong-shape"],
)
def test_malformed_sig_fails(stack_dir: Path, registry: Registry, mutate: Any) -> None:
    sig_path = registry.root / "artifacts/policies/acme/payments/1.0.0/policy.fpl.sig"
    sig_path.write_text(mutate(json.loads(sig_path.read_text())))
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    with pytest.raises(SignatureInvalid):
        compile_in(stack_dir, registry=registry.root)


def test_longest_publisher_prefix_wins(stack_dir: Path, registry: Registry) -> None:
    imp = registry.import_path("payments", "1.0.0")
    # The longer, more specific entry holds the right key; its position in the block does not matter.
    for trust in (
        {"registry.example.com": pinned(ATTACKER_KEY), REGISTRY_ID: pinned(PUBLISHER_KEY)},
        {REGISTRY_ID: pinned(PUBLISHER_KEY), "registry.example.com": pinned(ATTACKER_KEY)},
        {"registry.example.com/acme": pinned(ATTACKER_KEY), f"{REGISTRY_ID}/policies": pinned(PUBLISHER_KEY)},
    ):
        write_stack(stack_dir, stack_source([imp], trust=trust))
        assert compile_in(stack_dir, registry=registry.root).policy.imports[0]["version"] == "1.0.0"
    # The longer entry holds a wrong key: a shorter entry with the right key must not rescue it.
    for trust in (
        {"registry.example.com": pinned(PUBLISHER_KEY), REGISTRY_ID: pinned(ATTACKER_KEY)},
        {REGISTRY_ID: pinned(ATTACKER_KEY), "registry.example.com/acme": pinned(PUBLISHER_KEY)},
    ):
        write_stack(stack_dir, stack_source([imp], trust=trust))
        with pytest.raises(SignatureInvalid) as exc:
            compile_in(stack_dir, registry=registry.root)
        assert f'"{REGISTRY_ID}"' in exc.value.message


def test_resolve_import_unit(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r")
    reg.publish("payments", "1.0.0", artifact_allowing("x"))
    decl = ImportDecl(reg.import_path("payments", "1.0.0"), "pay", SourcePos("governance.fms", 7, 1))
    good = (TrustKeyDecl(REGISTRY_ID, pinned(PUBLISHER_KEY), SourcePos("governance.fms", 9, 3)),)
    resolved = resolve_import(decl, [reg.root], good)
    assert (resolved.alias, resolved.version, resolved.key_id) == ("pay", "1.0.0", "acme-ed25519-2026")
    assert [a.agent_id for a in resolved.file.agents] == ["imported-bot"]
    bad = (TrustKeyDecl(REGISTRY_ID, pinned(ATTACKER_KEY), SourcePos("governance.fms", 9, 3)),)
    with pytest.raises(SignatureInvalid) as exc:
        resolve_import(decl, [reg.root], bad)
    assert exc.value.pos == decl.pos
    assert "governance.fms:9" in exc.value.message  # where the pinned key is


def test_signed_artifact_with_a_syntax_error_names_the_import(stack_dir: Path, registry: Registry) -> None:
    registry.publish("broken", "1.0.0", 'agent "x" {\n  permit\n}\n')
    write_stack(stack_dir, stack_source([registry.import_path("broken", "1.0.0")]))
    with pytest.raises(PolicySyntaxError) as exc:
        compile_in(stack_dir, registry=registry.root)
    assert "broken@1.0.0" in exc.value.message
    assert exc.value.pos is not None and exc.value.pos.line == 3


def test_artifact_with_imports_of_its_own_is_refused(stack_dir: Path, registry: Registry) -> None:
    registry.publish("nested", "1.0.0", f'import "{registry.import_path("payments", "1.0.0")}"\n')
    write_stack(stack_dir, stack_source([registry.import_path("nested", "1.0.0")]))
    with pytest.raises(PolicySchemaError, match="imports of its own"):
        compile_in(stack_dir, registry=registry.root)


def test_check_never_writes_into_the_stack(stack_dir: Path, registry: Registry) -> None:
    write_stack(stack_dir, stack_source([registry.import_path("payments", "1.0.0")]))
    before = sorted(p.relative_to(stack_dir) for p in stack_dir.rglob("*"))
    compile_in(stack_dir, registry=registry.root)
    assert sorted(p.relative_to(stack_dir) for p in stack_dir.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------
# merge semantics

MERGE_ARTIFACT = """\
runtime {
  backend = "memory"
  mode = "audit"
}
provider "theirs" {
  type = "s3-sink"
  bucket = "their-bucket"
}
agent "support-bot" {
  framework "langgraph"
  default permit
  permit refund
  permit stripe/charge when amount <= 2000
  deny! ticket/delete
  rate_limit "stripe/*": 10 per minute
  egress { allow = ["evil.example.com"] }
  alert { on = "deny" notify = "#theirs" }
}
agent "payment-bot" {
  default deny
  permit stripe/refund when amount <= 500
}
"""


@pytest.fixture
def merged(stack_dir: Path, registry: Registry) -> Iterator[tuple[CompiledStack, str]]:
    registry.publish("merge", "1.0.0", MERGE_ARTIFACT)
    imp = registry.import_path("merge", "1.0.0")
    body = (
        'runtime {\n  backend = "sqlite"\n}\n'
        'agent "support-bot" {\n'
        "  default deny\n"
        "  permit ticket/*\n"
        "  deny refund\n"
        '  rate_limit "refund": 5 per minute\n'
        '  egress { allow = ["api.example.com"] }\n'
        "}\n"
    )
    src = stack_source([imp], body=body).replace(f'import "{imp}"', f'import "{imp}" as merged')
    write_stack(stack_dir, src)
    lines = src.splitlines()
    assert lines[8].strip() == "default deny" and lines[10].strip() == "deny refund"
    yield compile_in(stack_dir, registry=registry.root), imp


def test_local_rules_are_tried_first(merged: tuple[CompiledStack, str]) -> None:
    stack, _imp = merged
    # local `deny refund` (line 11) beats the imported `permit refund`
    assert decide(stack, "support-bot", "refund") == ("DENY", "governance.fms:11")
    assert decide(stack, "support-bot", "ticket/read") == ("PERMIT", "governance.fms:10")


def test_imported_rules_follow_the_local_ones(merged: tuple[CompiledStack, str]) -> None:
    stack, imp = merged
    assert decide(stack, "support-bot", "stripe/charge", amount=100) == ("PERMIT", f"{imp}:13")
    rules = stack.policy.agents["support-bot"].rules
    assert [r.ref for r in rules] == [
        "governance.fms:10",
        "governance.fms:11",
        f"{imp}:12",
        f"{imp}:13",
        f"{imp}:14",
    ]
    assert [r.origin for r in rules] == [None, None, "merged", "merged", "merged"]


def test_imported_strict_deny_wins_over_a_local_permit(merged: tuple[CompiledStack, str]) -> None:
    stack, imp = merged
    assert decide(stack, "support-bot", "ticket/delete") == ("DENY", f"{imp}:14")


def test_local_default_wins(merged: tuple[CompiledStack, str]) -> None:
    stack, _imp = merged
    agent = stack.policy.agents["support-bot"]
    assert (agent.default, agent.default_ref) == ("deny", "governance.fms:9")
    assert decide(stack, "support-bot", "unlisted/tool") == ("DENY", "governance.fms:9")
    assert decide(stack, "support-bot", "stripe/charge", amount=5000) == ("DENY", "governance.fms:9")


def test_imported_agent_with_a_new_id_is_added(merged: tuple[CompiledStack, str]) -> None:
    stack, imp = merged
    assert sorted(stack.policy.agents) == ["payment-bot", "support-bot"]
    assert decide(stack, "payment-bot", "stripe/refund", amount=100) == ("PERMIT", f"{imp}:21")
    assert decide(stack, "payment-bot", "stripe/refund", amount=1000) == ("DENY", f"{imp}:20")


def test_imported_runtime_providers_and_settings_do_not_override_the_stack(merged: tuple[CompiledStack, str]) -> None:
    stack, _imp = merged
    assert dict(stack.policy.runtime) == {"backend": "sqlite"}
    assert "theirs" not in stack.policy.providers
    agent = stack.policy.agents["support-bot"]
    assert tuple(agent.settings["egress"]["allow"]) == ("api.example.com",)
    # framework is unset locally, so the import fills it; limits and alerts accumulate, local first
    assert agent.framework == "langgraph"
    assert [r.pattern for r in agent.rate_limits] == ["refund", "stripe/*"]
    assert [dict(a) for a in agent.alerts] == [{"on": "deny", "notify": "#theirs"}]


def test_import_record_carries_alias_and_digest(merged: tuple[CompiledStack, str], registry: Registry) -> None:
    stack, imp = merged
    body = (registry.root / "artifacts/policies/acme/merge/1.0.0/policy.fpl").read_bytes()
    assert [dict(r) for r in stack.policy.imports] == [
        {
            "path": imp,
            "alias": "merged",
            "version": "1.0.0",
            "sha256": hashlib.sha256(body).hexdigest(),
            "key_id": "acme-ed25519-2026",
        }
    ]


def test_imported_default_fills_a_local_agent_without_one(stack_dir: Path, registry: Registry) -> None:
    registry.publish("merge", "1.0.0", MERGE_ARTIFACT)
    imp = registry.import_path("merge", "1.0.0")
    write_stack(stack_dir, stack_source([imp], body='agent "support-bot" {\n  deny refund\n}\n'))
    stack = compile_in(stack_dir, registry=registry.root)
    assert stack.policy.agents["support-bot"].default == "permit"
    assert decide(stack, "support-bot", "unlisted/tool") == ("PERMIT", f"{imp}:11")


def test_two_imports_merge_in_import_order(stack_dir: Path, registry: Registry) -> None:
    registry.publish("first", "1.0.0", 'agent "bot" {\n  permit a\n}\n')
    registry.publish("second", "1.0.0", 'agent "bot" {\n  deny a\n  permit b\n}\n')
    first, second = registry.import_path("first", "1.0.0"), registry.import_path("second", "1.0.0")
    write_stack(stack_dir, stack_source([first, second]))
    stack = compile_in(stack_dir, registry=registry.root)
    assert decide(stack, "bot", "a") == ("PERMIT", f"{first}:2")
    assert decide(stack, "bot", "b") == ("PERMIT", f"{second}:3")


def test_framework_kind_imports_resolve(stack_dir: Path, registry: Registry) -> None:
    registry.publish(
        "langgraph",
        "1.0.0",
        'runtime {\n  mode = "enforce"\n}\n\n'
        'agent "default" {\n  framework "langgraph"\n  default deny\n  rules { permit * }\n}\n',
        kind="frameworks",
    )
    imp = registry.import_path("langgraph", "1.0.0", kind="frameworks")
    write_stack(stack_dir, stack_source([imp]))
    stack = compile_in(stack_dir, registry=registry.root)
    assert stack.policy.agents["default"].framework == "langgraph"
    assert decide(stack, "default", "any/tool") == ("PERMIT", f"{imp}:8")


# ---------------------------------------------------------------------------------------------------
# the seed stack against the real, publicly signed mirror

SEED_ENV = {
    "VAULT_ADDR": "https://vault.corp.example.com:8200",
    "FARAMESH_KMS_KEY_ARN": "arn:aws:kms:eu-west-1:111122223333:key/abcd",
}


def _seed_stack(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "seed-stack"
    d.mkdir()
    (d / "governance.fms").write_text(text)
    return d


@requires_shared
def test_seed_stack_pinning_stripe_1_3_0_is_unresolved(tmp_path: Path) -> None:
    d = _seed_stack(tmp_path, seed_stack_text())
    with pytest.raises(ImportUnresolved) as exc:
        compile_stack(d, env={**SEED_ENV, "FARAMESH_REGISTRY_ROOT": str(SHARED_REGISTRY)})
    err = exc.value
    assert err.exit_code == 2
    assert "stripe@1.3.0" in err.message and "1.0.0" in err.message
    assert err.pos is not None and err.pos.line == 2


@requires_shared
def test_seed_stack_pinning_stripe_1_0_0_compiles_and_verifies(tmp_path: Path) -> None:
    text = seed_stack_text().replace("policies/stripe@1.3.0", "policies/stripe@1.0.0")
    d = _seed_stack(tmp_path, text)
    stack = compile_stack(d, env={**SEED_ENV, "FARAMESH_REGISTRY_ROOT": str(SHARED_REGISTRY)})
    policy = stack.policy
    assert [(r["path"].rsplit("/", 1)[1], r["alias"], r["key_id"]) for r in policy.imports] == [
        ("langgraph@1.0.0", None, "faramesh-ed25519-2026"),
        ("stripe@1.0.0", "stripe", "faramesh-ed25519-2026"),
    ]
    stripe_body = (SHARED_REGISTRY / "artifacts/policies/faramesh/stripe/1.0.0/policy.fpl").read_bytes()
    assert policy.imports[1]["sha256"] == hashlib.sha256(stripe_body).hexdigest()
    assert sorted(policy.agents) == ["default", "payment-bot", "support-bot"]
    assert dict(policy.runtime["postgres_url"]) == {"$env": "FARAMESH_PG_URL"}
    assert dict(policy.providers["vault"]["token"]) == {"$env": "VAULT_TOKEN"}
    assert policy.providers["vault"]["addr"] == SEED_ENV["VAULT_ADDR"]
    assert dict(policy.providers["splunk"]["url"]) == {"$env": "SPLUNK_URL"}
    assert policy.runtime["mode"] == "enforce" and policy.runtime["backend"] == "postgres"
    req = {"agent_id": "support-bot", "time": NOW}
    for tool, args, effect in (
        ("knowledgebase/search", {}, "PERMIT"),
        ("ticket/read", {}, "PERMIT"),
        ("refund", {"amount": 10}, "PERMIT"),
        ("refund", {"amount": 100}, "DEFER"),
        ("refund", {"amount": 1000}, "DENY"),
        ("unknown/tool", {}, "DENY"),
    ):
        assert evaluate(policy, {**req, "tool_id": tool, "args": args}).effect == effect, (tool, args)
    d2 = evaluate(policy, {"agent_id": "payment-bot", "tool_id": "stripe/charge", "args": {"amount": 5000}})
    assert (d2.effect, d2.notify) == ("DEFER", "#payments")


@requires_shared
def test_every_registry_artifact_verifies_with_the_seeds_pinned_key() -> None:
    seed = parse_fpl(seed_stack_text())
    catalog = json.loads((SHARED_REGISTRY / "catalog.json").read_text())
    registry_id = catalog["registry_id"]
    checked = 0
    for kind in ("policies", "frameworks"):
        for entry in catalog[kind]:
            short = entry["name"].split("/")[-1]
            for version, rel in entry["versions"].items():
                decl = ImportDecl(f"{registry_id}/{kind}/{short}@{version}", None, SourcePos("governance.fms", 1))
                resolved = resolve_import(decl, [SHARED_REGISTRY], seed.trust)
                body = (SHARED_REGISTRY / rel).read_bytes()
                assert resolved.sha256 == hashlib.sha256(body).hexdigest()
                assert resolved.key_id == "faramesh-ed25519-2026"
                assert resolved.file.agents
                checked += 1
    assert checked == 14


@requires_shared
def test_tampered_copy_of_a_real_artifact_fails_with_the_real_pinned_key(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_REGISTRY, mirror)
    stripe = mirror / "artifacts/policies/faramesh/stripe/1.0.0/policy.fpl"
    stripe.write_bytes(stripe.read_bytes().replace(b"amount <= 500", b"amount <= 900"))
    seed = parse_fpl(seed_stack_text())
    decl = ImportDecl(
        "github.com/faramesh/faramesh-registry/policies/stripe@1.0.0", "stripe", SourcePos("governance.fms", 2)
    )
    with pytest.raises(SignatureInvalid):
        resolve_import(decl, [mirror], seed.trust)
    # Re-signing it with another key and embedding that key in the .sig does not help either.
    sig = mirror / "artifacts/policies/faramesh/stripe/1.0.0/policy.fpl.sig"
    sig.write_text(json.dumps(signature_doc(stripe.read_bytes(), ATTACKER_KEY, "faramesh-ed25519-2026")))
    with pytest.raises(SignatureInvalid):
        resolve_import(decl, [mirror], seed.trust)
