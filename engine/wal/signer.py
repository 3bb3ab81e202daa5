"""Checkpoint signers: the local Ed25519 key (persisted 0600 in the state dir for `serve`, never
followed through a symlink; ephemeral for `dev`) and, behind the same interface, a KMS reached through a
provider child (engine/providers/host.py CheckpointSigner), whose private key the engine never holds.

Every checkpoint names its key by fingerprint and carries the public key (Ed25519: the raw 32 bytes;
P-256: SubjectPublicKeyInfo DER; base64 either way), so `audit verify` checks signatures offline
against pinned public keys. Pins (`SignerPin`) record a key with its key id: in the WAL meta (which
key signs this chain now) and in `<state dir>/checkpoint-keys.json` (every KMS key this engine pinned,
read by `audit verify` as the stack's own signing key is)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PINS_FILE = "checkpoint-keys.json"


def fingerprint(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:32]


class SigningFailed(Exception):
    """A signer could not sign now (its KMS is down, timed out, or answered with another key): the WAL
    keeps the checkpoint queued and tries again. The message is safe to log and show in `status`."""


class CheckpointKey(Protocol):
    """What the WAL signs checkpoints with."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def public_b64(self) -> str: ...

    @property
    def key_id(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def remote(self) -> bool:
        """True: `sign` is a network round trip that may raise SigningFailed; never call it on the event
        loop. False: a local key, a few microseconds, never fails."""
        ...

    def sign(self, message: bytes) -> str: ...


@dataclass(frozen=True)
class LocalSigner:
    key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return f"local:{self.fingerprint}"

    @property
    def algorithm(self) -> str:
        return "ed25519"

    @property
    def remote(self) -> bool:
        return False

    @property
    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_raw)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.key.sign(message)).decode()


def ephemeral_signer() -> LocalSigner:
    return LocalSigner(Ed25519PrivateKey.generate())


def load_or_create_signer(path: Path) -> LocalSigner:
    """Open the key without following symlinks; create it 0600 (O_EXCL) when absent."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        return LocalSigner(key)
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(raw) != 32:
        raise ValueError(f"signing key {path} is corrupt ({len(raw)} bytes)")
    return LocalSigner(Ed25519PrivateKey.from_private_bytes(raw))


def verify_signature(public_b64: str, message: bytes, signature_b64: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64)).verify(
            base64.b64decode(signature_b64), message
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def checkpoint_message(chain_id: str, seq: int, head_hash: str) -> bytes:
    return f"faramesh.checkpoint/v1\x00{chain_id}\x00{seq}\x00{head_hash}".encode()


# ------------------------------------------------------------------------- any key type (Ed25519, P-256)


def key_fingerprint(public_b64: str) -> str | None:
    """The fingerprint of a checkpoint's stored public key (raw Ed25519 or P-256 SPKI), None when it is
    not a key this build can verify."""
    try:
        raw = base64.b64decode(public_b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 32:
        return fingerprint(raw)
    from faramesh.engine.providers.signing import UnsupportedKey, algorithm_of, ed25519_raw
    from faramesh.engine.providers.signing import fingerprint as der_fingerprint

    try:
        if algorithm_of(raw) == "ed25519":  # an SPKI Ed25519 key: checkpoints store it raw
            return fingerprint(ed25519_raw(raw))
        return der_fingerprint(raw)
    except UnsupportedKey:
        return None


def normalise_public_b64(public_b64: str) -> str | None:
    """The stored form of a public key: Ed25519 raw, P-256 SPKI DER (base64). None: not a usable key."""
    try:
        raw = base64.b64decode(public_b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 32:
        return public_b64
    from faramesh.engine.providers.signing import UnsupportedKey, algorithm_of, checkpoint_public_b64

    try:
        return checkpoint_public_b64(algorithm_of(raw), raw)
    except UnsupportedKey:
        return None


@lru_cache(maxsize=256)
def _trusted(key_fp: str, public_b64: str) -> bool:
    return key_fingerprint(public_b64) == key_fp


def verify_checkpoint_signature(key_fp: str, public_b64: str, message: bytes, signature_b64: str) -> bool:
    """A checkpoint signature, whatever signed it, against a stored public key that must have `key_fp`.
    Ed25519 keeps its fast path (the local signer's checkpoints: one per second of traffic)."""
    if key_fp.startswith("ed25519:"):
        return _trusted(key_fp, public_b64) and verify_signature(public_b64, message, signature_b64)
    from faramesh.engine.providers.signing import verify_checkpoint

    return verify_checkpoint(key_fp, public_b64, message, signature_b64)


# ------------------------------------------------------------------------------------------------ pins


@dataclass(frozen=True)
class SignerPin:
    """A checkpoint key as pinned: its id (`local:…`, `aws-kms:<arn>`, `vault-transit:…#3`), fingerprint,
    algorithm and stored public key; for a KMS key, the provider block it was reached through (compiled:
    secrets are `$env` references, never values), so an engine can reach the old key again to sign the
    hand-over when the signer changes."""

    key_id: str
    fingerprint: str
    algorithm: str
    public_key: str
    provider: str | None = None
    config: Mapping[str, Any] | None = field(default=None, compare=False)
    pinned_at: str | None = field(default=None, compare=False)

    @classmethod
    def of(cls, key: CheckpointKey, provider: str | None = None, config: Mapping[str, Any] | None = None,
           pinned_at: str | None = None) -> SignerPin:  # fmt: skip
        return cls(key.key_id, key.fingerprint, key.algorithm, key.public_b64, provider, config, pinned_at)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key_id": self.key_id,
            "fingerprint": self.fingerprint,
            "algorithm": self.algorithm,
            "public_key": self.public_key,
            "provider": self.provider,
        }
        if self.config is not None:
            out["config"] = _plain(self.config)
        if self.pinned_at is not None:
            out["pinned_at"] = self.pinned_at
        return out

    def public(self) -> dict[str, Any]:
        """What a DPR says about the key (no provider configuration)."""
        return {"key_id": self.key_id, "fingerprint": self.fingerprint, "algorithm": self.algorithm,
                "provider": self.provider}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> SignerPin | None:
        if not isinstance(data, dict):
            return None
        try:
            pin = cls(
                key_id=str(data["key_id"]),
                fingerprint=str(data["fingerprint"]),
                algorithm=str(data.get("algorithm") or ""),
                public_key=str(data["public_key"]),
                provider=data.get("provider") if isinstance(data.get("provider"), str) else None,
                config=data.get("config") if isinstance(data.get("config"), dict) else None,
                pinned_at=data.get("pinned_at") if isinstance(data.get("pinned_at"), str) else None,
            )
        except KeyError:
            return None
        # A pin whose key does not have its fingerprint is no pin at all.
        return pin if key_fingerprint(pin.public_key) == pin.fingerprint else None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SignerPin | None:
        if not text:
            return None
        try:
            return cls.from_dict(json.loads(text))
        except ValueError:
            return None


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def read_pins(path: Path) -> list[SignerPin]:
    """The pins file (`<state dir>/checkpoint-keys.json`): [] when absent; unreadable entries are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        return []
    try:
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read(4 * 1024 * 1024) or b"[]")
    except (OSError, ValueError):
        return []
    pins = [SignerPin.from_dict(d) for d in data] if isinstance(data, list) else []
    return [p for p in pins if p is not None]


def add_pin(path: Path, pin: SignerPin) -> None:
    """Add `pin` to the pins file (0600, replaced atomically, never through a symlink); a key already
    there keeps its first entry."""
    pins = read_pins(path)
    if any(p.fingerprint == pin.fingerprint for p in pins):
        return
    pins.append(pin)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump([p.to_dict() for p in pins], fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
