"""Typed policy errors: each carries a stable code, an exit code and, where known, a source position."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourcePos:
    file: str
    line: int
    column: int = 0

    def ref(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.column else f"{self.file}:{self.line}"


class FarameshError(Exception):
    """Base of every error a user can cause. `exit_code` follows DESIGN.md §4."""

    code = "FARAMESH_ERROR"
    exit_code = 1

    def __init__(self, message: str, *, pos: SourcePos | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.pos}: " if self.pos else ""
        return f"{where}{self.message}"


class PolicySyntaxError(FarameshError):
    code = "POLICY_SYNTAX"


class PolicySchemaError(FarameshError):
    code = "POLICY_SCHEMA"


class PolicyEnvError(FarameshError):
    code = "POLICY_ENV_UNSET"


class PolicySecretError(FarameshError):
    code = "POLICY_LITERAL_SECRET"


class PolicyLoadError(FarameshError):
    """The stack directory itself is unusable (no policy file, two formats, unreadable)."""

    code = "POLICY_LOAD"


class ImportFailure(FarameshError):
    """Import or trust failure: exit 2 for check, plan and apply."""

    code = "IMPORT_FAILED"
    exit_code = 2


class ImportUnresolved(ImportFailure):
    code = "IMPORT_UNRESOLVED"


class ImportVersionInvalid(ImportFailure):
    code = "IMPORT_VERSION_INVALID"


class TrustKeyMissing(ImportFailure):
    code = "TRUST_KEY_MISSING"


class SignatureInvalid(ImportFailure):
    code = "SIGNATURE_INVALID"


class CompiledPolicyError(FarameshError):
    """A compiled artifact that is not one this compiler wrote (corrupt, newer format)."""

    code = "COMPILED_POLICY_INVALID"
