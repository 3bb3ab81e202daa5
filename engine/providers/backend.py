"""What a provider module implements. Runs only inside a provider child process.

A module exposes `create(spec: BackendSpec) -> Backend`. A backend implements the verbs it supports
and raises ProviderError for every failure it understands; anything else it raises goes through its
`classify`, and what that cannot place becomes a generic PROVIDER_ERROR with a redacted message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from faramesh.engine.providers.protocol import FailureCode, ProviderError, Redactor

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class BackendSpec:
    name: str  # the provider block's label
    config: Mapping[str, Any]  # the block, `$env` references resolved
    ambient: Mapping[str, str]  # credentials from the engine's environment the SDK's default chain would read
    redact: Redactor = field(default_factory=Redactor)

    @property
    def timeout(self) -> float:
        """The budget for one backend round trip, a little under the host's per-call timeout so that the
        child reports why (refused, timed out) before the host gives up on it."""
        raw = self.config.get("timeout")
        total = float(raw) if isinstance(raw, int | float) and raw > 0 else DEFAULT_TIMEOUT
        return max(0.2, total * 0.8)

    def str_field(self, key: str, default: str | None = None) -> str | None:
        value = self.config.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ProviderError(FailureCode.CONFIG, f'provider "{self.name}": `{key}` must be a string')
        return value

    def required(self, key: str) -> str:
        value = self.str_field(key)
        if not value:
            raise ProviderError(FailureCode.CONFIG, f'provider "{self.name}" needs `{key}`')
        return value


class Backend:
    """Defaults: every verb is unsupported until a subclass says otherwise."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec

    def _unsupported(self, verb: str) -> ProviderError:
        kind = self.spec.config.get("type")
        return ProviderError(FailureCode.UNSUPPORTED, f'provider "{self.spec.name}" (type {kind}) does not {verb}')

    def health(self) -> str:
        """Check the backend end to end (reachable, our credentials accepted); return a short detail.
        The default only vouches for the process: a module with a backend to reach must override it."""
        return "process running (this provider type has no backend check)"

    def get_secret(self, name: str, field: str | None, version: str | None) -> tuple[str | dict[str, Any], str | None]:
        raise self._unsupported("serve secrets")

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        """(key_id, algorithm, signature)."""
        raise self._unsupported("sign")

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        """(key_id, algorithm, SPKI DER) of `key_id`, or of the current key when None."""
        raise self._unsupported("hold signing keys")

    def emit(self, records: list[dict[str, Any]]) -> int:
        raise self._unsupported("accept records")

    def classify(self, exc: Exception) -> ProviderError | None:
        """Map an SDK exception to a typed failure; None when this backend does not recognise it."""
        return None


def select_field(name: str, data: Mapping[str, Any], field: str | None) -> str | dict[str, Any]:
    """The whole secret, or one string field of it. Error messages name fields, never values."""
    if field is None:
        return dict(data)
    if field not in data:
        known = ", ".join(sorted(str(k) for k in data)) or "none"
        raise ProviderError(FailureCode.NOT_FOUND, f"secret {name!r} has no field {field!r} (fields: {known})")
    value = data[field]
    if not isinstance(value, str):
        raise ProviderError(FailureCode.BAD_REQUEST, f"field {field!r} of secret {name!r} is not a string")
    return value
