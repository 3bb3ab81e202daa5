"""The provider protocol: one small request/response exchange over a Unix socketpair.

Each frame is a 4-byte big-endian length followed by one JSON object (orjson). Bytes travel as
base64 strings. The engine (host) sends requests, the provider child answers each one exactly once:

    → {"id": 7, "verb": "get_secret", "args": {"name": "payments/stripe", "field": "api_key"}}
    ← {"id": 7, "ok": true, "result": {"value": "…", "version": "3"}}
    ← {"id": 7, "ok": false, "code": "PROVIDER_AUTH", "message": "Vault refused the token …"}

The first request on a fresh child is always `configure` (the provider's resolved configuration, its
secrets included: they never travel through argv or the child's environment). After that the verbs
are `health`, `get_secret`, `sign`, `get_public_key` and `emit`.

This module is imported by both sides, so it stays small: stdlib, orjson, no SDKs.
"""

from __future__ import annotations

import base64
import enum
import re
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import orjson

PROTOCOL_VERSION: Final = 1
VERBS: Final = frozenset({"configure", "health", "get_secret", "sign", "get_public_key", "emit"})
# Large enough for any Secrets Manager value (64 KiB) and a batch of DPRs; small enough that a
# confused peer cannot make the other side buffer without bound.
MAX_FRAME: Final = 4 * 1024 * 1024
# KMS `Sign` takes at most 4096 bytes of RAW message; checkpoint messages are ~120 bytes.
MAX_SIGN_MESSAGE: Final = 4096
_HEADER = struct.Struct(">I")

# What the pipeline answers when any provider call behind a permit fails (DESIGN.md §4, §6).
CREDENTIAL_UNAVAILABLE: Final = "CREDENTIAL_UNAVAILABLE"


class FailureCode(enum.StrEnum):
    AUTH = "PROVIDER_AUTH"  # the backend refused our credentials (wrong token, bad AppRole secret_id …)
    DENIED = "PROVIDER_DENIED"  # our credentials work, but may not read this secret / use this key
    NOT_FOUND = "PROVIDER_NOT_FOUND"  # no such secret, field or key
    UNREACHABLE = "PROVIDER_UNREACHABLE"  # connection refused, DNS failure, TLS failure
    TIMEOUT = "PROVIDER_TIMEOUT"  # no answer within the call's timeout
    DOWN = "PROVIDER_DOWN"  # the provider process is not running (crashed, restarting, stopped)
    CONFIG = "PROVIDER_CONFIG"  # the declared configuration cannot work (missing env var, bad field)
    UNSUPPORTED = "PROVIDER_UNSUPPORTED"  # this provider type does not implement the verb
    BAD_REQUEST = "PROVIDER_BAD_REQUEST"  # the request itself is wrong (message too long, bad name)
    KEY_MISMATCH = "PROVIDER_KEY_MISMATCH"  # a signature does not verify against the pinned key
    PROTOCOL = "PROVIDER_PROTOCOL"  # a malformed frame from the other side
    BACKEND = "PROVIDER_ERROR"  # anything else the backend reported (throttling, sealed Vault, 5xx)


# Failures that say nothing about the provider's health: the request was wrong, not the provider.
REQUEST_SCOPED: Final = frozenset(
    {FailureCode.NOT_FOUND, FailureCode.DENIED, FailureCode.BAD_REQUEST, FailureCode.UNSUPPORTED}
)
# Failures that mean the provider cannot serve anyone right now.
PROVIDER_DOWN_CODES: Final = frozenset(
    {FailureCode.AUTH, FailureCode.UNREACHABLE, FailureCode.DOWN, FailureCode.CONFIG}
)
RETRYABLE: Final = frozenset(
    {FailureCode.UNREACHABLE, FailureCode.TIMEOUT, FailureCode.DOWN, FailureCode.BACKEND, FailureCode.PROTOCOL}
)


class ProviderError(Exception):
    """A typed failure raised inside a provider child; the child turns it into an error frame."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


class Health(enum.StrEnum):
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"


# ---------------------------------------------------------------------------------------------------
# Results the host hands to its callers. Every call returns one of these or a ProviderFailure, never
# raises.


class SecretValue:
    """A fetched secret. Its repr and str never show the value, so it cannot leak through a log line or
    a traceback by accident; `reveal()` is the one deliberate way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | dict[str, Any]) -> None:
        self._value = value

    def reveal(self) -> str | dict[str, Any]:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(repr(self))


@dataclass(frozen=True, slots=True)
class SecretResult:
    provider: str
    name: str
    value: SecretValue
    version: str | None


@dataclass(frozen=True, slots=True)
class SignResult:
    provider: str
    key_id: str
    algorithm: str  # ed25519 | ecdsa-p256-sha256 (see signing.py)
    signature: bytes  # raw 64 bytes for ed25519, ASN.1 DER for ECDSA


@dataclass(frozen=True, slots=True)
class PublicKeyResult:
    provider: str
    key_id: str
    algorithm: str
    der: bytes  # SubjectPublicKeyInfo, DER

    @property
    def fingerprint(self) -> str:
        from faramesh.engine.providers.signing import fingerprint

        return fingerprint(self.der)


@dataclass(frozen=True, slots=True)
class EmitResult:
    provider: str
    accepted: int


@dataclass(frozen=True, slots=True)
class HealthResult:
    provider: str
    detail: str


@dataclass(frozen=True, slots=True)
class ProviderFailure:
    """Why a provider call did not succeed. The message has been redacted of every secret the host knows;
    the pipeline answers the agent with `pipeline_code`, never with this message verbatim."""

    provider: str
    verb: str
    code: FailureCode
    message: str

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @property
    def pipeline_code(self) -> str:
        return CREDENTIAL_UNAVAILABLE

    def __str__(self) -> str:
        return f'{self.code}: provider "{self.provider}" {self.verb}: {self.message}'


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """One row of `faramesh status`: no secret, ever."""

    name: str
    type: str
    health: Health
    last_error: str | None
    since: float  # wall-clock time of the last health change
    restarts: int
    pid: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "health": str(self.health),
            "last_error": self.last_error,
            "since": self.since,
            "restarts": self.restarts,
            "pid": self.pid,
        }


# ---------------------------------------------------------------------------------------------------
# Which secret a rule asks for


@dataclass(frozen=True, slots=True)
class SecretRef:
    """`<provider>:<name>[#<field>]`, e.g. `vault:stripe#api_key` or `aws-secrets:prod/db#password`.

    `name` is relative to the provider's own scope (the Vault KV mount and path prefix, the Secrets
    Manager `secret_prefix`), so a rule names a secret without knowing where the backend keeps it."""

    provider: str
    name: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.provider}:{self.name}" + (f"#{self.field}" if self.field else "")


_REF_RE = re.compile(r"^(?P<provider>[A-Za-z0-9_.-]+):(?P<name>[A-Za-z0-9_./@+=-]+)(?:#(?P<field>[A-Za-z0-9_.-]+))?$")


def parse_secret_ref(text: str) -> SecretRef:
    """Parse a rule's secret reference; ValueError (saying what is wrong) when it is malformed."""
    m = _REF_RE.match(text)
    if not m:
        raise ValueError(f"secret reference {text!r} must look like `<provider>:<name>` or `<provider>:<name>#<field>`")
    name = m.group("name")
    if name.startswith("/") or name.endswith("/") or "//" in name or ".." in name.split("/"):
        raise ValueError(f"secret reference {text!r} has an empty or `..` path segment")
    return SecretRef(m.group("provider"), name, m.group("field"))


# ---------------------------------------------------------------------------------------------------
# Which module implements a declared provider


_MODULES: Final[Mapping[tuple[str, str | None], str]] = {
    ("vault", None): "faramesh.engine.providers.vault",
    ("aws-secrets-manager", None): "faramesh.engine.providers.aws",
    ("kms", "aws-kms"): "faramesh.engine.providers.aws",
    ("kms", "vault-transit"): "faramesh.engine.providers.vault",
    ("kms", "gcp-kms"): "faramesh.engine.providers.gcp",
    ("kms", "azure-kv"): "faramesh.engine.providers.azure",
    ("kms", "local"): "faramesh.engine.providers.local",
    ("gcp-secret-manager", None): "faramesh.engine.providers.gcp",
    ("azure-key-vault", None): "faramesh.engine.providers.azure",
}


def backend_module(config: Mapping[str, Any]) -> str | None:
    """The module that implements this provider block, or None when this build has none."""
    kind = config.get("type")
    if not isinstance(kind, str):
        return None
    if kind == "kms":
        backend = config.get("backend")
        return _MODULES.get((kind, backend if isinstance(backend, str) else ""))
    return _MODULES.get((kind, None))


def hosted(providers: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The declared providers this build runs as children (sinks and identities live elsewhere)."""
    return {name: cfg for name, cfg in providers.items() if backend_module(cfg) is not None}


# ---------------------------------------------------------------------------------------------------
# Redaction


_REDACTED: Final = "[REDACTED]"
# Token shapes worth scrubbing even when we were never told the value (a header echoed in an error).
_TOKEN_SHAPES = re.compile(
    r"(?i)(x-vault-token|authorization|x-amz-security-token)(\s*[:=]\s*)\S+"
    r"|\b(?:hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}\b"
)
MIN_SECRET_LEN: Final = 4  # shorter "secrets" would shred every message; schema fields are longer


class Redactor:
    """Removes known secret values (and their URL/JSON-escaped forms) from text bound for logs and
    errors. Values shorter than MIN_SECRET_LEN are not matched: they cannot be told from ordinary
    words, and no real token is that short."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._needles: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for s in secrets:
            self.add(s)

    def add(self, secret: str) -> None:
        if len(secret.strip()) < MIN_SECRET_LEN:
            return
        # A token read from a file often carries a newline: error texts show it stripped or repr()'d.
        forms = {
            secret,
            secret.strip(),
            quote(secret, safe=""),
            orjson.dumps(secret).decode()[1:-1],
            repr(secret)[1:-1],
        }
        new = {f for f in forms if f not in self._needles}
        if new:
            self._needles |= new
            # Longest first, so a secret that contains another is removed whole.
            ordered = sorted(self._needles, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(n) for n in ordered))

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(_REDACTED, text)
        return _TOKEN_SHAPES.sub(lambda m: f"{m.group(1)}{m.group(2)}{_REDACTED}" if m.group(1) else _REDACTED, text)


# ---------------------------------------------------------------------------------------------------
# Framing


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not valid base64") from None


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = orjson.dumps(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(encode_frame(message))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError(f"connection closed in the middle of a frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None at a clean end of stream."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"peer announced a {length}-byte frame (limit {MAX_FRAME})")
    body = _recv_exact(sock, length) if length else b""
    if body is None:
        raise ProtocolError("connection closed after a frame header")
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("frame is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def ok_frame(request_id: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": dict(result)}


def error_frame(request_id: int, code: FailureCode, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "code": str(code), "message": message}


def failure_code(text: Any) -> FailureCode:
    """A code from the wire; an unknown one (a newer child) is still a failure, never a success."""
    try:
        return FailureCode(text)
    except ValueError:
        return FailureCode.BACKEND
