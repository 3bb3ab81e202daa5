"""A local Ed25519 signer behind the provider protocol (`type = "kms"; backend = "local"`), for dev and
tests: the same path as a real KMS, with the key in the child process instead of a KMS.

`key_file`: where the key lives (created 0600 when absent, never followed through a symlink); without
it the key is ephemeral and dies with the child, so every restart pins a new key. Not for production:
a host compromise reads the key (the seed's reason to use a KMS).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from faramesh.engine.providers.backend import Backend, BackendSpec
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from faramesh.engine.providers.signing import ED25519, fingerprint
from faramesh.engine.wal.signer import LocalSigner, ephemeral_signer, load_or_create_signer


def create(spec: BackendSpec) -> Backend:
    return LocalKms(spec)


class LocalKms(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        key_file = spec.str_field("key_file")
        try:
            self.signer: LocalSigner = load_or_create_signer(Path(key_file)) if key_file else ephemeral_signer()
        except (OSError, ValueError) as exc:
            raise ProviderError(FailureCode.CONFIG, f"cannot use the key file {key_file}: {exc}") from None
        self.der = self.signer.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = f"local:{fingerprint(self.der)}"

    def health(self) -> str:
        return f"local Ed25519 key {self.key_id} (development signing)"

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        if key_id is not None and key_id != self.key_id:
            raise ProviderError(FailureCode.NOT_FOUND, f"this provider holds {self.key_id}, not {key_id}")
        return self.key_id, ED25519, self.der

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        return self.key_id, ED25519, self.signer.key.sign(message)
