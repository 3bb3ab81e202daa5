"""Azure Key Vault secrets, through azure-keyvault-secrets and azure-identity. Imported only inside a
provider child.

`provider "x" { type = "azure-key-vault"; vault_url; tenant_id; client_id; client_secret = env("…");
authority_host }`
    vault_url: `https://<vault>.vault.azure.net` (HTTPS only: the client refuses to send a bearer token
        over plain HTTP).
    tenant_id, client_id, client_secret: a Microsoft Entra ID app registration (service principal)
        with `get` on the vault's secrets (`list` too, if the health check should say more than
        "credentials accepted").
    authority_host: the Entra ID endpoint of a sovereign cloud (`https://login.chinacloudapi.cn`, …) or
        a test double; default `https://login.microsoftonline.com`.

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

import logging
import re
import ssl
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Final, TypeVar
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
from azure.keyvault.secrets import SecretClient
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError

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


def create(spec: BackendSpec) -> Backend:
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


class KeyVault(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
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
        transport: dict[str, Any] = {
            "retry_total": 1,
            "connection_timeout": max(0.1, spec.timeout / 4),
            "read_timeout": max(0.1, spec.timeout / 4),
        }
        credential = ClientSecretCredential(
            tenant_id,
            self.client_id,
            client_secret,
            authority=authority,
            # Instance discovery asks login.microsoftonline.com about an authority it does not know: an
            # explicitly configured authority is trusted as it is, and never leads to a public address.
            disable_instance_discovery=authority is not None,
            **transport,
        )
        self.client = SecretClient(
            vault_url,
            KeyVaultOnlyCredential(credential, parts.hostname),
            verify_challenge_resource=False,  # KeyVaultOnlyCredential enforces it instead
            **transport,
        )

    def _run(self, what: str, fn: Callable[[], R]) -> R:
        try:
            return fn()
        except ProviderError:
            raise
        except Exception as exc:
            typed = self._classify(exc, what)
            if typed is None:
                raise
            raise typed from None

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
        return self._classify(exc, "the request")

    def _classify(self, exc: Exception, what: str) -> ProviderError | None:
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
            return ProviderError(FailureCode.DENIED, f"client {self.client_id} may not read {what} ({exc.status_code})")
        if isinstance(exc, ResourceNotFoundError):
            return ProviderError(FailureCode.NOT_FOUND, f"{self.where} has no {what}")
        if isinstance(exc, HttpResponseError):
            status = exc.status_code
            code = exc.error.code if exc.error is not None else None
            label = f"{status} {code}" if code else str(status)
            if status == 403:
                return ProviderError(FailureCode.DENIED, f"client {self.client_id} may not read {what} ({label})")
            if status == 400:
                return ProviderError(FailureCode.BAD_REQUEST, f"{self.where} rejected the request for {what} ({label})")
            return ProviderError(FailureCode.BACKEND, f"{self.where} failed on {what} ({label})")
        return None
