"""Checkpoint signing with a local Ed25519 key: persisted (0600, never followed through a symlink)
in the state dir for `serve`, ephemeral for `dev`. The fingerprint goes into every checkpoint so
`audit verify` can check signatures offline against pinned public keys. KMS signers come later
behind the same two methods."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def fingerprint(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class LocalSigner:
    key: Ed25519PrivateKey

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
