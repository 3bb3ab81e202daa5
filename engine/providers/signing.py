"""Public keys and signatures of checkpoint signers: pure functions over bytes, `cryptography` only.

Every signer, local or KMS, is described by the same two facts: its SubjectPublicKeyInfo (DER) and an
algorithm name derived from that DER (never from what a backend says about itself: moto's KMS
`GetPublicKey` omits `KeySpec`, and a pinned key must not depend on metadata anyway).

    ed25519             signature = 64 raw bytes over the message
    ecdsa-p256-sha256   signature = ASN.1 DER ECDSA over SHA-256(message), NIST P-256

Fingerprints: `ed25519:<sha256(raw 32-byte key)[:32]>` (identical to faramesh.engine.wal.signer's, so a
local key keeps its fingerprint whether the engine or a provider child holds it) and
`ecdsa-p256:<sha256(SPKI DER)[:32]>`.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

ED25519: Final = "ed25519"
ECDSA_P256_SHA256: Final = "ecdsa-p256-sha256"
ALGORITHMS: Final = (ED25519, ECDSA_P256_SHA256)


class UnsupportedKey(ValueError):
    """A key this build cannot verify (RSA, another curve, garbage)."""


def _load(der: bytes) -> PublicKeyTypes:
    try:
        return serialization.load_der_public_key(der)
    except ValueError:
        raise UnsupportedKey("the public key is not a valid DER SubjectPublicKeyInfo") from None


def algorithm_of(der: bytes) -> str:
    key = _load(der)
    if isinstance(key, Ed25519PublicKey):
        return ED25519
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return ECDSA_P256_SHA256
        raise UnsupportedKey(f"elliptic curve {key.curve.name} is not supported (use NIST P-256)")
    raise UnsupportedKey(f"{type(key).__name__.removeprefix('_')} keys are not supported (use Ed25519 or NIST P-256)")


def spki_from_pem(pem: str) -> bytes:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError:
        raise UnsupportedKey("the public key is not valid PEM") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_from_ed25519_raw(raw: bytes) -> bytes:
    try:
        key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise UnsupportedKey("an Ed25519 public key is 32 bytes") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def ed25519_raw(der: bytes) -> bytes:
    key = _load(der)
    if not isinstance(key, Ed25519PublicKey):
        raise UnsupportedKey("not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(der: bytes) -> str:
    algorithm = algorithm_of(der)
    if algorithm == ED25519:
        return "ed25519:" + hashlib.sha256(ed25519_raw(der)).hexdigest()[:32]
    return "ecdsa-p256:" + hashlib.sha256(der).hexdigest()[:32]


def verify(algorithm: str, der: bytes, message: bytes, signature: bytes) -> bool:
    """True only when `signature` is `algorithm`'s signature of `message` under the key `der`, and the
    key really is of that algorithm (a signature never verifies under a key of another type)."""
    try:
        if algorithm_of(der) != algorithm:
            return False
        key = _load(der)
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, message)
            return True
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, UnsupportedKey, ValueError):
        return False
    return False


def checkpoint_public_b64(algorithm: str, der: bytes) -> str:
    """How a checkpoint row stores a public key: Ed25519 as its raw 32 bytes (the form local checkpoints
    already use), P-256 as SPKI DER; base64 either way. The fingerprint's prefix says which."""
    import base64

    return base64.b64encode(ed25519_raw(der) if algorithm == ED25519 else der).decode("ascii")


def verify_checkpoint(key_fingerprint: str, public_b64: str, message: bytes, signature_b64: str) -> bool:
    """Verify a stored checkpoint signature offline, whatever signed it (local key, Vault Transit, KMS),
    and check that the stored key really has the stored fingerprint."""
    import base64
    import binascii

    try:
        public = base64.b64decode(public_b64, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
        prefix = key_fingerprint.split(":", 1)[0]
        if prefix == "ed25519":
            der = spki_from_ed25519_raw(public)
            algorithm = ED25519
        elif prefix == "ecdsa-p256":
            der, algorithm = public, ECDSA_P256_SHA256
        else:
            return False
        return fingerprint(der) == key_fingerprint and verify(algorithm, der, message, signature)
    except (binascii.Error, ValueError):
        return False
