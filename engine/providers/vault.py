"""Vault and OpenBao, through hvac. Imported only inside a provider child.

`provider "x" { type = "vault" … }`: KV v2 secrets.
    addr, token | (auth_method = "approle", role_id, secret_id [, approle_mount]), namespace,
    mount: the KV v2 mount, optionally with a path prefix: "secret", or "kv/data/payments" (mount `kv`,
    every secret name is under `payments/`), as the seed writes it.
`provider "x" { type = "kms"; backend = "vault-transit" … }`: Transit signing keys.
    addr, token | AppRole as above, namespace, mount (default "transit"), key_name.
    Ed25519 keys sign the message itself; ecdsa-p256 keys sign SHA-256(message) (ASN.1 DER).
"""

from __future__ import annotations

import base64
import re
import threading
import time
from typing import Any

import hvac
import hvac.exceptions
import requests.exceptions
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from faramesh.engine.providers.signing import ECDSA_P256_SHA256, ED25519, spki_from_ed25519_raw, spki_from_pem

_TRANSIT_TYPES = {"ed25519": ED25519, "ecdsa-p256": ECDSA_P256_SHA256}
_SIGNATURE_RE = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/=]+)$")
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def create(spec: BackendSpec) -> Backend:
    if spec.config.get("type") == "vault":
        return VaultKv(spec)
    return VaultTransit(spec)


def parse_kv_mount(mount: str | None) -> tuple[str, str]:
    """("kv", "payments") from "kv/data/payments"; ("secret", "") from None."""
    text = (mount or "secret").strip("/")
    if "/data/" in text:
        mount_point, prefix = text.split("/data/", 1)
        return mount_point, prefix.strip("/")
    return text.removesuffix("/data") or "secret", ""


def _reason(exc: BaseException) -> str:
    """`connection refused` out of requests' nested exception text (which may carry a URL, no secret)."""
    found = _ERRNO_RE.findall(str(exc))
    return found[-1].strip().lower() if found else type(exc).__name__


class _Vault:
    """An hvac client with token or AppRole auth; AppRole logs in lazily and again when the token expires
    or Vault starts refusing it."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.addr = spec.required("addr")
        self.namespace = spec.str_field("namespace") or None
        role_id = spec.str_field("role_id") or spec.str_field("role")
        method = spec.str_field("auth_method") or ("approle" if role_id else "token")
        if method not in ("token", "approle"):
            raise ProviderError(
                FailureCode.CONFIG, f'provider "{spec.name}": auth_method must be "token" or "approle", not {method!r}'
            )
        self.method = method
        self.role_id = role_id
        secret_id = spec.str_field("secret_id")
        self.secret_id = secret_id.strip() if secret_id else None
        self.approle_mount = spec.str_field("approle_mount") or "approle"
        token = ""
        if method == "token":
            # Tokens never contain whitespace; one read from a file often ends in a newline, which
            # requests would refuse to put in a header.
            token = spec.required("token").strip()
        elif not role_id or not self.secret_id:
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": AppRole needs `role_id` and `secret_id`')
        # An explicit token (even "") keeps hvac from falling back to VAULT_TOKEN or ~/.vault-token.
        # (connect, read): requests applies each separately, so together they stay within the budget.
        timeout = (spec.timeout / 2, spec.timeout / 2)
        self.client = hvac.Client(url=self.addr, token=token, namespace=self.namespace, timeout=timeout)
        self._lock = threading.Lock()
        self._token_expires = 0.0

    def ensure_auth(self, *, force: bool = False) -> None:
        if self.method != "approle":
            return
        with self._lock:
            if not force and self.client.token and time.monotonic() < self._token_expires:
                return
            try:
                reply = self.client.auth.approle.login(
                    role_id=self.role_id, secret_id=self.secret_id, mount_point=self.approle_mount
                )
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                raise ProviderError(
                    FailureCode.AUTH, f"Vault at {self.addr} refused the AppRole login (invalid role_id or secret_id)"
                ) from None
            lease = float(reply.get("auth", {}).get("lease_duration") or 0)
            # Log in again at 80% of the lease; a lease of 0 means the token does not expire.
            self._token_expires = time.monotonic() + (lease * 0.8 if lease > 0 else 10**9)

    def run(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """Call fn, failures typed (naming `what`); with AppRole, one re-login and retry when Vault starts
        refusing the token."""
        try:
            self.ensure_auth()
            try:
                return fn(**kwargs)
            except hvac.exceptions.Forbidden:
                if self.method != "approle":
                    raise
            self.ensure_auth(force=True)
            return fn(**kwargs)
        except ProviderError:
            raise
        except Exception as exc:
            typed = self.classify(exc, what)
            if typed is None:
                raise
            raise typed from None

    def token_valid(self) -> bool:
        """Tell a bad token from a token a policy does not let read this path: both are a 403."""
        try:
            self.client.auth.token.lookup_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            return False
        return True

    def classify(self, exc: Exception, what: str) -> ProviderError | None:
        if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            if self.token_valid():
                return ProviderError(FailureCode.DENIED, f"Vault's policies do not allow {what}")
            return ProviderError(FailureCode.AUTH, f"Vault at {self.addr} refused the token (permission denied)")
        if isinstance(exc, hvac.exceptions.InvalidPath):
            return ProviderError(FailureCode.NOT_FOUND, f"Vault has nothing at {what}")
        if isinstance(exc, hvac.exceptions.VaultDown | hvac.exceptions.VaultNotInitialized):
            return ProviderError(FailureCode.UNREACHABLE, f"Vault at {self.addr} is sealed or not initialised")
        if isinstance(exc, hvac.exceptions.RateLimitExceeded):
            return ProviderError(FailureCode.BACKEND, f"Vault at {self.addr} is rate-limiting us")
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            return ProviderError(FailureCode.BAD_REQUEST, f"Vault rejected the request for {what}: {exc.args[0]}")
        if isinstance(exc, hvac.exceptions.VaultError):
            return ProviderError(FailureCode.BACKEND, f"Vault failed {what}: {type(exc).__name__}: {exc.args[0]}")
        if isinstance(exc, requests.exceptions.Timeout):
            return ProviderError(
                FailureCode.TIMEOUT, f"Vault at {self.addr} did not answer within {self.spec.timeout:g} s"
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return ProviderError(FailureCode.UNREACHABLE, f"TLS with Vault at {self.addr} failed")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return ProviderError(FailureCode.UNREACHABLE, f"cannot reach Vault at {self.addr} ({_reason(exc)})")
        if isinstance(exc, requests.exceptions.RequestException):
            return ProviderError(FailureCode.UNREACHABLE, f"request to Vault at {self.addr} failed ({_reason(exc)})")
        return None

    def health(self) -> str:
        try:
            self.ensure_auth()
            info = self.client.auth.token.lookup_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise ProviderError(
                FailureCode.AUTH, f"Vault at {self.addr} refused the token (permission denied)"
            ) from None
        except ProviderError:
            raise
        except Exception as exc:
            typed = self.classify(exc, "the token lookup")
            if typed is None:
                raise
            raise typed from None
        ttl = info.get("data", {}).get("ttl")
        return f"Vault at {self.addr}: token accepted" + (f" (ttl {ttl} s)" if ttl else "")


class VaultKv(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.vault = _Vault(spec)
        self.mount, self.prefix = parse_kv_mount(spec.str_field("mount"))

    def health(self) -> str:
        return self.vault.health()

    def get_secret(self, name: str, field: str | None, version: str | None) -> tuple[str | dict[str, Any], str | None]:
        path = f"{self.prefix}/{name}" if self.prefix else name
        what = f"{self.mount}/{path}"
        kwargs: dict[str, Any] = {"path": path, "mount_point": self.mount, "raise_on_deleted_version": True}
        if version is not None:
            if not version.isdigit():
                raise ProviderError(FailureCode.BAD_REQUEST, "a KV v2 version is a whole number")
            kwargs["version"] = int(version)
        reply = self.vault.run(what, self.vault.client.secrets.kv.v2.read_secret_version, **kwargs)
        body = reply.get("data") or {}
        data = body.get("data")
        if not isinstance(data, dict):
            raise ProviderError(FailureCode.NOT_FOUND, f"Vault has no KV v2 data at {what}")
        meta_version = (body.get("metadata") or {}).get("version")
        return select_field(name, data, field), None if meta_version is None else str(meta_version)

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.vault.classify(exc, f"KV mount {self.mount}")


class VaultTransit(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.vault = _Vault(spec)
        self.mount = (spec.str_field("mount") or "transit").strip("/")
        self.key = spec.str_field("key_name") or spec.required("key_id")
        scope = f"{self.vault.namespace}/" if self.vault.namespace else ""
        self.key_prefix = f"vault-transit:{scope}{self.mount}/{self.key}"
        self.what = f"Transit key {self.mount}/{self.key}"
        self._algorithm: str | None = None
        self._public: dict[int, bytes] = {}

    def _key_id(self, version: int) -> str:
        return f"{self.key_prefix}#{version}"

    def _read_key(self) -> tuple[str, int]:
        reply = self.vault.run(
            self.what, self.vault.client.secrets.transit.read_key, name=self.key, mount_point=self.mount
        )
        data = reply.get("data") or {}
        kind = data.get("type")
        if kind not in _TRANSIT_TYPES:
            raise ProviderError(
                FailureCode.UNSUPPORTED,
                f"Transit key {self.mount}/{self.key} is {kind}; checkpoint signing needs ed25519 or ecdsa-p256",
            )
        self._algorithm = _TRANSIT_TYPES[kind]
        for raw_version, entry in (data.get("keys") or {}).items():
            public = entry.get("public_key") if isinstance(entry, dict) else None
            if isinstance(public, str) and public:
                version = int(raw_version)
                if kind == "ed25519":
                    self._public[version] = spki_from_ed25519_raw(base64.b64decode(public))
                else:
                    self._public[version] = spki_from_pem(public)
        return self._algorithm, int(data.get("latest_version") or max(self._public, default=1))

    def health(self) -> str:
        detail = self.vault.health()
        algorithm, latest = self._read_key()
        return f"{detail}; Transit key {self.mount}/{self.key} v{latest} ({algorithm})"

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        if key_id is None:
            algorithm, version = self._read_key()
        else:
            head, _, raw_version = key_id.rpartition("#")
            if head != self.key_prefix or not raw_version.isdigit():
                raise ProviderError(FailureCode.NOT_FOUND, f"this provider holds {self.key_prefix}, not {key_id}")
            version = int(raw_version)
            if version not in self._public or self._algorithm is None:
                self._read_key()
            algorithm = self._algorithm or ED25519
        der = self._public.get(version)
        if der is None:
            raise ProviderError(FailureCode.NOT_FOUND, f"Transit key {self.mount}/{self.key} has no version {version}")
        return self._key_id(version), algorithm, der

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        algorithm = self._algorithm or self._read_key()[0]
        kwargs: dict[str, Any] = {
            "name": self.key,
            "hash_input": base64.b64encode(message).decode("ascii"),
            "mount_point": self.mount,
        }
        if algorithm == ECDSA_P256_SHA256:
            kwargs.update(hash_algorithm="sha2-256", marshaling_algorithm="asn1")
        reply = self.vault.run(self.what, self.vault.client.secrets.transit.sign_data, **kwargs)
        m = _SIGNATURE_RE.match(str((reply.get("data") or {}).get("signature", "")))
        if not m:
            raise ProviderError(FailureCode.BACKEND, "Vault returned a signature in an unknown format")
        return self._key_id(int(m.group(1))), algorithm, base64.b64decode(m.group(2))

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.vault.classify(exc, self.what)
