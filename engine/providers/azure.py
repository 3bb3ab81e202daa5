"""Azure Key Vault secrets and keys, through azure-keyvault-secrets, azure-keyvault-keys and
azure-identity. Imported only inside a provider child.

`provider "x" { type = "azure-key-vault"; vault_url; tenant_id; client_id; client_secret = env("…");
authority_host }`
    vault_url: `https://<vault>.vault.azure.net` (HTTPS only: the client refuses to send a bearer token
        over plain HTTP).
    tenant_id, client_id, client_secret: a Microsoft Entra ID app registration (service principal)
        with `get` on the vault's secrets (`list` too, if the health check should say more than
        "credentials accepted").
    authority_host: the Entra ID endpoint of a sovereign cloud (`https://login.chinacloudapi.cn`, …) or
        a test double; default `https://login.microsoftonline.com`.
`provider "x" { type = "kms"; backend = "azure-kv"; vault_url; key_name; key_version; tenant_id; client_id;
client_secret = env("…"); authority_host }`
    An EC P-256 key (`EC` or `EC-HSM`, curve `P-256`) that allows `sign`; the service principal needs
    keys `get` and `sign` (the "Key Vault Crypto User" role). The child sends SHA-256(message) with ES256
    and turns Key Vault's raw r||s signature into ASN.1 DER, the form every other signer uses.
    key_version: the version to sign with. Without it the child takes the key's current version when it
    first needs the key and keeps signing with that version (it is part of the key id the engine pins), so
    a rotation in Key Vault does not silently change the signer: the next engine start pins the new
    version and records the change.

A rule names a secret by its Key Vault name, optionally `#field` for a JSON value; `version` is a Key
Vault version id (default: the current version). Transport: azure-core over `requests`, which honours
REQUESTS_CA_BUNDLE (the host passes that variable to the child, and only to the child).

Key Vault tells the client which token it wants in a 401 challenge (tenant and resource). The SDK's own
check ties the challenge's resource to the vault's DNS name, which only works for `*.vault.azure.net`
style names; instead, the credential here refuses to mint a token for anything but a Key Vault
resource (or a parent domain of the vault's host, the SDK's rule), so a server at `vault_url` that is
not a Key Vault can never obtain a token usable elsewhere in the tenant.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import orjson
import requests.exceptions
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.identity import ClientSecretCredential
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from faramesh.engine.providers.signing import ECDSA_P256_SHA256

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient, KeyVaultKey
    from azure.keyvault.keys.crypto import CryptographyClient
    from azure.keyvault.secrets import SecretClient

R = TypeVar("R")

# Key Vault's naming rules: a secret name is 1-127 of [0-9A-Za-z-]; a version id is 32 hex digits (a
# little more is allowed here, never a character that could change the request path).
_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION = re.compile(r"^[0-9A-Za-z]{1,64}$")
# The resources Key Vault challenges name, per cloud (public, China, US Gov) and for Managed HSM.
KEY_VAULT_RESOURCES: Final = frozenset(
    {
        "vault.azure.net",
        "vault.azure.cn",
        "vault.usgovcloudapi.net",
        "managedhsm.azure.net",
        "managedhsm.azure.cn",
        "managedhsm.usgovcloudapi.net",
    }
)
_AADSTS = re.compile(r"AADSTS\d+:[^.\r\n]*")
# Key types and curve a checkpoint key may have (JWK `kty`, `crv`), and the JWS algorithm it signs with.
EC_KEY_TYPES: Final = frozenset({"EC", "EC-HSM"})
P256: Final = "P-256"
ES256: Final = "ES256"


def create(spec: BackendSpec) -> Backend:
    if spec.config.get("type") == "kms":
        return KeyVaultKeys(spec)
    return KeyVault(spec)


# ---------------------------------------------------------------------------------------------------
# Pure parts


def check_names(name: str, version: str | None) -> None:
    if not _NAME.match(name):
        raise ProviderError(
            FailureCode.BAD_REQUEST, f"{name!r} is not a Key Vault secret name (1-127 letters, digits or `-`)"
        )
    if version is not None and not _VERSION.match(version):
        raise ProviderError(FailureCode.BAD_REQUEST, f"{version!r} is not a Key Vault secret version id")


def check_key_names(name: str, version: str | None) -> None:
    if not _NAME.match(name):
        raise ProviderError(FailureCode.CONFIG, f"{name!r} is not a Key Vault key name (1-127 letters, digits or `-`)")
    if version is not None and not _VERSION.match(version):
        raise ProviderError(FailureCode.CONFIG, f"{version!r} is not a Key Vault key version id")


def ec_p256_spki(what: str, kty: str | None, crv: str | None, x: bytes | None, y: bytes | None) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a Key Vault JSON Web Key, which must be an EC P-256 key. The key
    type is read from the key material itself: a point that is not on P-256 is refused too."""
    if kty not in EC_KEY_TYPES:
        raise ProviderError(
            FailureCode.UNSUPPORTED, f"{what} is a {kty} key; checkpoint signing needs an EC P-256 key (ES256)"
        )
    if crv != P256:
        raise ProviderError(
            FailureCode.UNSUPPORTED, f"{what} is on curve {crv}; checkpoint signing needs {P256} (ES256)"
        )
    if not x or not y or len(x) != 32 or len(y) != 32:
        raise ProviderError(FailureCode.BACKEND, f"{what}: Key Vault returned a malformed P-256 public key")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise ProviderError(FailureCode.BACKEND, f"{what}: the public key is not a point on {P256}") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def der_signature(what: str, raw: bytes) -> bytes:
    """Key Vault's ES256 signature (JWS form: r||s, 32 bytes each) as ASN.1 DER."""
    if len(raw) != 64:
        raise ProviderError(
            FailureCode.BACKEND, f"{what}: Key Vault returned a {len(raw)}-byte ES256 signature, not 64 bytes"
        )
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def scope_allowed(scope: str, vault_host: str) -> bool:
    """May the credential mint a token for `scope` when the vault at `vault_host` asks for it?"""
    parts = urlsplit(scope)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host or parts.path not in ("/.default", "/", ""):
        return False
    return host in KEY_VAULT_RESOURCES or vault_host.lower().endswith("." + host)


def select_value(name: str, value: str, field: str | None) -> str | dict[str, Any]:
    if field is None:
        return value
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ProviderError(
            FailureCode.BAD_REQUEST, f"secret {name!r} is not a JSON object, so it has no field {field!r}"
        )
    return select_field(name, parsed, field)


def _auth_reason(text: str) -> str:
    """Entra ID's reason code and sentence (`AADSTS7000215: Invalid client secret provided`), or the first
    sentence of azure-identity's own explanation (a tenant it may not use …). Neither carries a secret."""
    found = _AADSTS.search(text)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.removeprefix("Authentication failed: ").split(". ")[0]
    return first[:200]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it. azure-core raises its own errors outside the `except` that
    caught the transport's, so the cause is in `inner_exception`, not in `__cause__`."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for nxt in (current.__cause__, current.__context__, getattr(current, "inner_exception", None)):
            if isinstance(nxt, BaseException):
                pending.append(nxt)


# ---------------------------------------------------------------------------------------------------
# The backend


class KeyVaultOnlyCredential:
    """A TokenCredential that hands out tokens for Key Vault resources only (see the module docstring)."""

    def __init__(self, inner: ClientSecretCredential, vault_host: str) -> None:
        self.inner = inner
        self.vault_host = vault_host

    def _check(self, scopes: tuple[str, ...]) -> None:
        refused = [s for s in scopes if not scope_allowed(s, self.vault_host)]
        if refused or not scopes:
            raise ProviderError(
                FailureCode.CONFIG,
                f"the server at {self.vault_host} asked for a token for {', '.join(refused) or 'no scope'}, which "
                "is not a Key Vault resource: refused (is `vault_url` a Key Vault?)",
            )

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self._check(scopes)
        return self.inner.get_token(*scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        self._check(scopes)
        return self.inner.get_token_info(*scopes, options=options)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> KeyVaultOnlyCredential:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Azure:
    """The vault, the service principal's credential, the transport settings and the typed failures shared
    by Key Vault's secret and key clients."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        vault_url = spec.required("vault_url").rstrip("/")
        parts = urlsplit(vault_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ProviderError(
                FailureCode.CONFIG, f'provider "{spec.name}": vault_url must be an https:// URL, not {vault_url!r}'
            )
        tenant_id = spec.required("tenant_id")
        self.client_id = spec.required("client_id")
        # A secret read from a file often ends in a newline that Entra ID would take as part of it.
        client_secret = spec.required("client_secret").strip()
        authority = spec.str_field("authority_host") or None
        if authority is not None and urlsplit(authority).scheme != "https":
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": authority_host must be an https:// URL')
        self.vault_url = vault_url
        self.tenant_id = tenant_id
        self.authority = authority or "https://login.microsoftonline.com"
        self.where = f"Key Vault at {vault_url}"
        # azure-identity logs each failed token request as a warning on stderr; the typed error says the
        # same, and the host keeps only the first lines a child writes.
        for logger in ("azure", "msal"):
            logging.getLogger(logger).setLevel(logging.ERROR)
        # Two attempts of (connect + read) fit in the budget, as for AWS. A first call makes several
        # requests (challenge, token, secret); a stalled server stalls the first and fails it.
        self.transport: dict[str, Any] = {
            "retry_total": 1,
            "connection_timeout": max(0.1, spec.timeout / 4),
            "read_timeout": max(0.1, spec.timeout / 4),
        }
        inner = ClientSecretCredential(
            tenant_id,
            self.client_id,
            client_secret,
            authority=authority,
            # Instance discovery asks login.microsoftonline.com about an authority it does not know: an
            # explicitly configured authority is trusted as it is, and never leads to a public address.
            disable_instance_discovery=authority is not None,
            **self.transport,
        )
        self.credential = KeyVaultOnlyCredential(inner, parts.hostname)

    def client_kwargs(self) -> dict[str, Any]:
        # KeyVaultOnlyCredential enforces the challenge's resource instead of the SDK (module docstring).
        return {"verify_challenge_resource": False, **self.transport}

    def run(self, what: str, fn: Callable[[], R], use: str) -> R:
        try:
            return fn()
        except ProviderError:
            raise
        except Exception as exc:
            typed = self.classify(exc, what, use)
            if typed is None:
                raise
            raise typed from None

    def classify(self, exc: Exception, what: str, use: str) -> ProviderError | None:
        """`use` says what the credentials were refused: "read" a secret, "sign with" a key …"""
        links = list(_chain(exc))
        token = isinstance(exc, ClientAuthenticationError) and exc.status_code is None
        where = f"Entra ID at {self.authority}" if token else self.where
        if any(isinstance(x, ServiceRequestTimeoutError | ServiceResponseTimeoutError) for x in links) or any(
            isinstance(x, requests.exceptions.Timeout) for x in links
        ):
            return ProviderError(FailureCode.TIMEOUT, f"{where} did not answer within {self.spec.timeout:g} s")
        if any(isinstance(x, ssl.SSLError | requests.exceptions.SSLError) for x in links):
            return ProviderError(FailureCode.UNREACHABLE, f"TLS with {where} failed (is its CA in REQUESTS_CA_BUNDLE?)")
        if any(isinstance(x, ServiceRequestError | ServiceResponseError) for x in links):
            return ProviderError(FailureCode.UNREACHABLE, f"cannot reach {where}")
        if isinstance(exc, ClientAuthenticationError):
            if exc.status_code is None or exc.status_code == 401:
                # Entra ID's reason (AADSTS7000215: Invalid client secret provided …) names no secret.
                reason = f" ({_auth_reason(str(exc))})" if _auth_reason(str(exc)) else ""
                return ProviderError(
                    FailureCode.AUTH,
                    f"{where} refused the credentials of client {self.client_id} in tenant {self.tenant_id}{reason}",
                )
            return ProviderError(
                FailureCode.DENIED, f"client {self.client_id} may not {use} {what} ({exc.status_code})"
            )
        if isinstance(exc, ResourceNotFoundError):
            return ProviderError(FailureCode.NOT_FOUND, f"{self.where} has no {what}")
        if isinstance(exc, HttpResponseError):
            status = exc.status_code
            code = exc.error.code if exc.error is not None else None
            inner = _inner_code(exc)
            label = f"{status} {code}" if code else str(status)
            if inner in ("KeyDisabled", "SecretDisabled"):
                # The vault holds it but refuses every operation on it: for a signing key, the provider's
                # only key, that is a configuration problem until someone enables it.
                return ProviderError(FailureCode.CONFIG, f"{what} is disabled in {self.where} ({label} {inner})")
            if status == 403:
                return ProviderError(FailureCode.DENIED, f"client {self.client_id} may not {use} {what} ({label})")
            if status == 400:
                return ProviderError(FailureCode.BAD_REQUEST, f"{self.where} rejected the request for {what} ({label})")
            return ProviderError(FailureCode.BACKEND, f"{self.where} failed on {what} ({label})")
        return None


def _inner_code(exc: HttpResponseError) -> str | None:
    """Key Vault's `innererror.code` (KeyDisabled, AccessDenied …), which says more than the HTTP status."""
    inner = getattr(exc.error, "innererror", None) if exc.error is not None else None
    code = inner.get("code") if isinstance(inner, dict) else None
    return code if isinstance(code, str) else None


class KeyVault(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.azure = _Azure(spec)
        self.client_id = self.azure.client_id
        self.where = self.azure.where
        # Imported here so that a signing child loads only the keys client, and this one only secrets'.
        from azure.keyvault.secrets import SecretClient

        self.client: SecretClient = SecretClient(
            self.azure.vault_url, self.azure.credential, **self.azure.client_kwargs()
        )

    def _run(self, what: str, fn: Callable[[], R]) -> R:
        return self.azure.run(what, fn, "read")

    def health(self) -> str:
        def probe() -> str:
            try:
                # The pager fetches lazily: taking one item makes one request for one secret's properties.
                next(iter(self.client.list_properties_of_secrets(max_page_size=1)), None)
            except HttpResponseError as exc:
                # A 403 comes after Entra ID issued a token and Key Vault accepted it.
                if exc.status_code == 403 and not isinstance(exc, ClientAuthenticationError):
                    return f"{self.where} reachable, credentials accepted (listing secrets not permitted)"
                raise
            return f"{self.where} reachable, credentials accepted"

        return self._run("the secret list", probe)

    def get_secret(self, name: str, field: str | None, version: str | None) -> tuple[str | dict[str, Any], str | None]:
        check_names(name, version)
        what = f"secret {name!r}" + (f" version {version}" if version else "")
        secret = self._run(what, lambda: self.client.get_secret(name, version))
        if secret.value is None:
            raise ProviderError(FailureCode.NOT_FOUND, f"{self.where} returned no value for {what}")
        return select_value(name, secret.value, field), secret.properties.version

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.azure.classify(exc, "the request", "read")


@dataclass(frozen=True)
class _SigningKey:
    version: str
    key_id: str
    der: bytes
    crypto: CryptographyClient


class KeyVaultKeys(Backend):
    """Checkpoint signing with a Key Vault EC P-256 key (ES256); the private key never leaves the vault."""

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.name = spec.required("key_name")
        self.version = spec.str_field("key_version") or None
        check_key_names(self.name, self.version)
        self.azure = _Azure(spec)
        self.key_prefix = f"azure-kv:{self.azure.vault_url}/keys/{self.name}/"
        self.what = f"key {self.name}" + (f" version {self.version}" if self.version else "")
        self._signing: _SigningKey | None = None
        from azure.keyvault.keys import KeyClient

        self.client: KeyClient = KeyClient(self.azure.vault_url, self.azure.credential, **self.azure.client_kwargs())

    def _fetch(self, version: str | None, *, to_sign: bool) -> tuple[str, bytes]:
        """(version, SPKI DER) of `version` (None: the current one). A key to sign with must be enabled
        and allow `sign`; an older version fetched for its public key need not be."""
        what = f"key {self.name}" + (f" version {version}" if version else "")
        key: KeyVaultKey = self.azure.run(what, lambda: self.client.get_key(self.name, version), "read")
        resolved = key.properties.version
        if not resolved or not _VERSION.match(resolved) or (version is not None and resolved != version):
            raise ProviderError(FailureCode.BACKEND, f"{self.azure.where} answered for {what} with version {resolved}")
        # JsonWebKey sets its fields from the service's JSON at run time; the stubs do not declare them.
        jwk = key.key
        x, y = getattr(jwk, "x", None), getattr(jwk, "y", None)
        der = ec_p256_spki(
            what,
            _text(getattr(jwk, "kty", None)),
            _text(getattr(jwk, "crv", None)),
            x if isinstance(x, bytes) else None,
            y if isinstance(y, bytes) else None,
        )
        if to_sign:
            if key.properties.enabled is False:
                raise ProviderError(FailureCode.CONFIG, f"key {self.name} version {resolved} is disabled in Key Vault")
            ops = [_text(op) for op in (key.key_operations or [])]
            if ops and "sign" not in ops:
                raise ProviderError(
                    FailureCode.CONFIG, f"key {self.name} version {resolved} does not allow `sign` (it allows {ops})"
                )
        return resolved, der

    def _current(self) -> _SigningKey:
        if self._signing is None:
            version, der = self._fetch(self.version, to_sign=True)
            crypto = self.client.get_cryptography_client(self.name, key_version=version)
            self._signing = _SigningKey(version, self.key_prefix + version, der, crypto)
        return self._signing

    def health(self) -> str:
        if self._signing is None:
            current = self._current()
        else:
            # The version this child signs with, not the vault's current one: a rotation in the vault
            # must not make a child that keeps signing with its pinned version look broken.
            current = self._signing
            _, der = self._fetch(current.version, to_sign=True)
            if der != current.der:
                raise ProviderError(
                    FailureCode.KEY_MISMATCH, f"{self.azure.where} now returns another public key for {current.key_id}"
                )
        return f"{self.azure.where}: key {self.name} version {current.version} enabled ({ES256}, {P256})"

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        current = self._current()
        if key_id is None or key_id == current.key_id:
            return current.key_id, ECDSA_P256_SHA256, current.der
        version = key_id.removeprefix(self.key_prefix)
        if not key_id.startswith(self.key_prefix) or not _VERSION.match(version):
            raise ProviderError(FailureCode.NOT_FOUND, f"this provider holds {self.key_prefix}…, not {key_id}")
        _, der = self._fetch(version, to_sign=False)
        return key_id, ECDSA_P256_SHA256, der

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        current = self._current()
        digest = hashlib.sha256(message).digest()
        result = self.azure.run(
            f"key {self.name} version {current.version}",
            lambda: current.crypto.sign(SignatureAlgorithm.es256, digest),
            "sign with",
        )
        return current.key_id, ECDSA_P256_SHA256, der_signature(current.key_id, bytes(result.signature))

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.azure.classify(exc, self.what, "sign with")


def _text(value: Any) -> str | None:
    """A JWK field as its string (the SDK hands out str-valued enums, or plain strings)."""
    if value is None:
        return None
    return str(getattr(value, "value", value))
