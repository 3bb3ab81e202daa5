"""Resolve `import "<host>/<path>@<version>"` offline and verify each artifact's signature.

Search order (the first registry holding the import's publisher answers; the error lists them all):
`--registry DIR`, `$FARAMESH_REGISTRY_ROOT`, `<stack>/registry/`, `/usr/share/faramesh/registry/`.
A registry directory holds `catalog.json` (`registry_id`, kind → entries with `versions`), either at
its root or under `<root>/<registry_id>/`. The `.sig` beside an artifact is verified with the key
pinned in the stack's `trust` block whose publisher is the longest prefix of the import path — never
with the key carried inside the `.sig`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faramesh.engine.policy.ast import ImportDecl, TrustKeyDecl
from faramesh.engine.policy.compiler import ResolvedImport
from faramesh.engine.policy.errors import (
    ImportUnresolved,
    ImportVersionInvalid,
    PolicySyntaxError,
    SignatureInvalid,
    TrustKeyMissing,
)
from faramesh.engine.policy.parser import parse_fpl

SYSTEM_REGISTRY = Path("/usr/share/faramesh/registry")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_KINDS = ("policies", "frameworks", "packs")


@dataclass(frozen=True)
class ImportTarget:
    registry_id: str
    kind: str
    name: str
    version: str


def registry_search_path(cli_registry: Path | None, env: dict[str, str] | Any, stack_dir: Path) -> list[Path]:
    roots: list[Path] = []
    if cli_registry is not None:
        roots.append(cli_registry)
    if env.get("FARAMESH_REGISTRY_ROOT"):
        roots.append(Path(env["FARAMESH_REGISTRY_ROOT"]))
    roots.append(stack_dir / "registry")
    roots.append(SYSTEM_REGISTRY)
    return roots


def parse_import_path(decl: ImportDecl) -> tuple[str, str]:
    """Split `<path>@<version>`; only exact semantic versions are accepted."""
    path, sep, version = decl.path.rpartition("@")
    if not sep or not path:
        raise ImportVersionInvalid(f'import "{decl.path}" has no version; pin one exactly, e.g. @1.0.0', pos=decl.pos)
    if version == "latest" or not _SEMVER.match(version):
        raise ImportVersionInvalid(
            f'import "{decl.path}": `@{version}` is not an exact version; pin one such as @1.0.0 '
            "(ranges and @latest would let the registry change your policy)",
            pos=decl.pos,
        )
    return path, version


def _load_catalog(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Catalogs found at a registry root: `<root>/catalog.json` and `<root>/**/catalog.json` one level per id."""
    found = []
    candidates = [root / "catalog.json", *sorted(root.glob("*/catalog.json")), *sorted(root.glob("*/*/*/catalog.json"))]
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("registry_id"), str):
            found.append((path.parent, data))
    return found


def _find_entry(catalog: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    entries = catalog.get(kind)
    if not isinstance(entries, list):
        return None
    exact = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
    if exact:
        return exact[0]
    # Catalog names may carry the publisher ("faramesh/stripe") where import paths do not.
    tail = [e for e in entries if isinstance(e, dict) and str(e.get("name", "")).split("/")[-1] == name]
    return tail[0] if len(tail) == 1 else None


def _trust_key_for(path: str, trust: tuple[TrustKeyDecl, ...]) -> TrustKeyDecl | None:
    best: TrustKeyDecl | None = None
    for key in trust:
        pub = key.publisher.rstrip("/")
        if (path == pub or path.startswith(pub + "/")) and (best is None or len(pub) > len(best.publisher)):
            best = key
    return best


def resolve_import(decl: ImportDecl, roots: list[Path], trust: tuple[TrustKeyDecl, ...]) -> ResolvedImport:
    path, version = parse_import_path(decl)
    looked: list[str] = []
    for root in roots:
        catalogs = _load_catalog(root) if root.is_dir() else []
        if not catalogs:
            looked.append(f"{root} (no registry here)")
            continue
        for cat_dir, catalog in catalogs:
            registry_id = catalog["registry_id"].rstrip("/")
            if not path.startswith(registry_id + "/"):
                looked.append(f"{cat_dir} (registry {registry_id}, not this publisher)")
                continue
            rest = path[len(registry_id) + 1 :]
            kind, _, name = rest.partition("/")
            entry = _find_entry(catalog, kind, name) if kind in _KINDS and name else None
            if entry is None:
                looked.append(f"{cat_dir} (no {rest} in its catalog)")
                continue
            versions = entry.get("versions") or {}
            if version not in versions:
                known = ", ".join(sorted(versions)) or "none"
                raise ImportUnresolved(
                    f'import "{decl.path}": version {version} of {rest} is not in the registry at {cat_dir} '
                    f"(it has: {known}); pin one of those or mirror the version you need",
                    pos=decl.pos,
                )
            artifact = (cat_dir / str(versions[version])).resolve()
            if not artifact.is_relative_to(cat_dir.resolve()):
                raise ImportUnresolved(f'import "{decl.path}": catalog points outside the registry', pos=decl.pos)
            return _verified(decl, path, version, artifact, trust)
    raise ImportUnresolved(
        f'import "{decl.path}" could not be resolved; looked in:\n  ' + "\n  ".join(looked), pos=decl.pos
    )


def _verified(
    decl: ImportDecl, path: str, version: str, artifact: Path, trust: tuple[TrustKeyDecl, ...]
) -> ResolvedImport:
    try:
        body = artifact.read_bytes()
    except OSError as exc:
        raise ImportUnresolved(
            f'import "{decl.path}": artifact {artifact} is missing ({exc.strerror})', pos=decl.pos
        ) from None
    key = _trust_key_for(path, trust)
    if key is None:
        raise TrustKeyMissing(
            f'import "{decl.path}": no `trust {{ key "<publisher>" ed25519:… }}` entry covers this publisher; '
            "add the publisher's key to the stack's trust block",
            pos=decl.pos,
        )
    sig_path = artifact.with_name(artifact.name + ".sig")
    try:
        sig = json.loads(sig_path.read_text(encoding="utf-8"))
        signature = base64.b64decode(sig["value_b64"], validate=True)
        algorithm = sig.get("algorithm", "ed25519")
        key_id = str(sig.get("key_id", ""))
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        raise SignatureInvalid(
            f'import "{decl.path}": signature file {sig_path} is missing or unreadable', pos=decl.pos
        ) from None
    # Imported here: `check` on a stack without imports does not pay for cryptography.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if algorithm != "ed25519":
        raise SignatureInvalid(f'import "{decl.path}": signature algorithm {algorithm!r} is not ed25519', pos=decl.pos)
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key.key.partition(":")[2]))
    try:
        public.verify(signature, body)
    except InvalidSignature:
        raise SignatureInvalid(
            f'import "{decl.path}": the signature of {artifact.name} does not verify with the key pinned for '
            f'"{key.publisher}" ({key.pos}); the artifact was altered or signed by someone else',
            pos=decl.pos,
        ) from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ImportUnresolved(f'import "{decl.path}": artifact is not UTF-8 text', pos=decl.pos) from None
    try:
        parsed = parse_fpl(text, f"{path}@{version}")
    except PolicySyntaxError as exc:
        raise PolicySyntaxError(f'in imported artifact "{decl.path}": {exc.message}', pos=exc.pos) from None
    return ResolvedImport(
        path=decl.path,
        alias=decl.alias,
        version=version,
        sha256=hashlib.sha256(body).hexdigest(),
        key_id=key_id,
        file=parsed,
    )
