"""Google Cloud Secret Manager, through google-cloud-secret-manager. Imported only inside a provider child.

`provider "x" { type = "gcp-secret-manager"; project; credentials_file; endpoint_url }`
    credentials_file: a service-account key file (JSON, `"type": "service_account"`). Required: this
        build never falls back to Application Default Credentials, whose last resort is the metadata
        server, so a misconfigured engine cannot silently pick up the host's identity.
    project: the project id or number the secrets live in (default: the key file's `project_id`).
    endpoint_url: another Secret Manager endpoint (a Private Service Connect address, a test double);
        default `https://secretmanager.googleapis.com`.

A rule names a secret by its id, optionally `#field` for a JSON payload; `version` is a number, an alias
or `latest` (the default). The client uses the REST transport: one HTTP/1.1 request per call through
`requests` (which honours REQUESTS_CA_BUNDLE), no gRPC channel or its threads in the child. With a
service-account key, google-auth signs its own short-lived JWT for each call's Authorization header (no
round trip to the token endpoint), so a wrong key shows up as the API's 401.

Payloads are checked against the CRC32C Secret Manager returns with them, so a value corrupted on the
way is refused rather than handed to an agent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

import google.api_core.exceptions as api_exceptions
import google.auth.exceptions
import requests.exceptions
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from google.cloud import secretmanager
from google.oauth2 import service_account

R = TypeVar("R")

CLOUD_PLATFORM: Final = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_ENDPOINT: Final = "secretmanager.googleapis.com"
# Secret Manager's own rules: a secret id is 1-255 of [A-Za-z0-9_-]; a version is `latest`, a positive
# number or an alias (a letter, then letters, digits, `_` or `-`).
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_VERSION = re.compile(r"^(?:latest|[1-9][0-9]{0,18}|[A-Za-z][A-Za-z0-9_-]{0,62})$")
# A project id (6-30 of [a-z0-9-]), a project number, or a legacy domain-scoped id (`example.com:proj`).
_PROJECT = re.compile(r"^[a-z0-9][a-z0-9.:-]{0,99}$")


def create(spec: BackendSpec) -> Backend:
    return SecretManager(spec)


# ---------------------------------------------------------------------------------------------------
# Pure parts


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum Secret Manager sends as `dataCrc32c`. Payloads are at most
    64 KiB, so a table in Python is fast enough and needs no extra package."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def version_name(project: str, secret: str, version: str | None) -> str:
    """`projects/P/secrets/S/versions/V`; ProviderError(BAD_REQUEST) for a name Secret Manager would not
    accept, so nothing that could change the request path reaches the URL."""
    if not _SECRET_ID.match(secret):
        raise ProviderError(
            FailureCode.BAD_REQUEST,
            f"{secret!r} is not a Secret Manager secret id (1-255 letters, digits, `_` or `-`)",
        )
    if version is not None and not _VERSION.match(version):
        raise ProviderError(
            FailureCode.BAD_REQUEST, f"{version!r} is not a Secret Manager version (a number, an alias or `latest`)"
        )
    return f"projects/{project}/secrets/{secret}/versions/{version or 'latest'}"


def decode_payload(name: str, data: bytes, checksum: int | None, field: str | None) -> str | dict[str, Any]:
    """The value handed back for a payload: its text, or one field of its JSON object. Error messages
    name fields, never values."""
    if checksum is not None and crc32c(data) != checksum:
        raise ProviderError(
            FailureCode.BACKEND, f"the payload of secret {name!r} does not match its CRC32C: corrupted on the way"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProviderError(
            FailureCode.BAD_REQUEST, f"secret {name!r} is binary, not UTF-8 text; this build serves text secrets"
        ) from None
    if field is None:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ProviderError(
            FailureCode.BAD_REQUEST, f"secret {name!r} is not a JSON object, so it has no field {field!r}"
        )
    return select_field(name, parsed, field)


def _rpc_error(exc: api_exceptions.GoogleAPICallError) -> tuple[str | None, str]:
    """(google.rpc status name, the service's message) from a REST error body. api-core maps the HTTP
    status only (so FAILED_PRECONDITION arrives as a plain BadRequest), and its own message starts with
    the request's method and URL."""
    response = exc.response
    error: Any = None
    if isinstance(response, requests.Response):
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, str(exc.message)
    status, message = error.get("status"), error.get("message")
    return (
        status if isinstance(status, str) else None,
        message[:300] if isinstance(message, str) and message else str(exc.message),
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# ---------------------------------------------------------------------------------------------------
# The backend


def _load_key(spec: BackendSpec, path: str) -> tuple[service_account.Credentials, str | None]:
    """The service-account credentials in `path`. The private key is registered with the redactor before
    anything can fail, line by line too, so not even a fragment of it can reach an error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ProviderError(
            FailureCode.CONFIG, f'provider "{spec.name}": cannot read credentials_file {path}: {exc.strerror or exc}'
        ) from None
    try:
        info = json.loads(text)
    except ValueError:
        raise ProviderError(
            FailureCode.CONFIG, f'provider "{spec.name}": credentials_file {path} is not JSON'
        ) from None
    if not isinstance(info, dict):
        raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": credentials_file {path} is not a JSON object')
    key = info.get("private_key")
    if isinstance(key, str):
        spec.redact.add(key)
        for line in key.splitlines():
            if line and not line.startswith("-----"):
                spec.redact.add(line)
    kind = info.get("type")
    if kind != "service_account":
        raise ProviderError(
            FailureCode.CONFIG,
            f'provider "{spec.name}": credentials_file {path} holds {kind!r} credentials; this build needs a '
            'service-account key ("type": "service_account")',
        )
    try:
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[CLOUD_PLATFORM]
        )
    except (ValueError, KeyError, google.auth.exceptions.GoogleAuthError) as exc:
        # Which field is missing or malformed, never the field's content.
        detail = type(exc).__name__
        if isinstance(exc, KeyError | google.auth.exceptions.MalformedError):
            detail = str(exc).splitlines()[0][:200] if str(exc) else detail
        raise ProviderError(
            FailureCode.CONFIG,
            f'provider "{spec.name}": credentials_file {path} is not a usable service-account key ({detail})',
        ) from None
    project = info.get("project_id")
    return credentials, project if isinstance(project, str) and project else None


class SecretManager(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        path = spec.str_field("credentials_file")
        if not path:
            raise ProviderError(
                FailureCode.CONFIG,
                f'provider "{spec.name}" needs `credentials_file` (a service-account key file); this build does '
                "not use ambient Google credentials",
            )
        self.credentials, file_project = _load_key(spec, path)
        project = spec.str_field("project") or file_project
        if not project:
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}" needs `project` (the key file names none)')
        if not _PROJECT.match(project):
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": {project!r} is not a project id')
        self.project = project
        endpoint = spec.str_field("endpoint_url") or None
        self.where = f"Secret Manager at {endpoint or DEFAULT_ENDPOINT}"
        # requests applies a float timeout to the connect and to the read separately: half the budget
        # each keeps one attempt inside it. No retries: the host's caller owns that decision.
        self.timeout = spec.timeout / 2
        self.client = secretmanager.SecretManagerServiceClient(
            credentials=self.credentials,
            transport="rest",
            client_options={"api_endpoint": endpoint} if endpoint else None,
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
        parent = f"projects/{self.project}"

        def probe() -> str:
            try:
                # The pager fetches its first page here; one secret is enough to prove the round trip.
                self.client.list_secrets(request={"parent": parent, "page_size": 1}, retry=None, timeout=self.timeout)
            except api_exceptions.Forbidden:
                # Authentication comes before authorisation: a 403 proves the key was accepted.
                return f"{self.where} reachable, credentials accepted (listing secrets not permitted)"
            return f"{self.where} reachable, credentials accepted"

        return self._run(f"the secrets of {parent}", probe)

    def get_secret(self, name: str, field: str | None, version: str | None) -> tuple[str | dict[str, Any], str | None]:
        resource = version_name(self.project, name, version)
        reply = self._run(
            f"secret version {resource}",
            lambda: self.client.access_secret_version(name=resource, retry=None, timeout=self.timeout),
        )
        payload = reply.payload
        checksum = int(payload.data_crc32c) if "data_crc32c" in payload else None
        value = decode_payload(name, bytes(payload.data), checksum, field)
        resolved = str(reply.name).rsplit("/", 1)[-1] if reply.name else None
        return value, resolved

    def classify(self, exc: Exception) -> ProviderError | None:
        return self._classify(exc, "the request")

    def _classify_api(self, exc: api_exceptions.GoogleAPICallError, what: str, email: str) -> ProviderError:
        status, message = _rpc_error(exc)
        # Over REST, api-core picks the exception class by HTTP status (Unauthorized, Forbidden …); the
        # gRPC-named subclasses (Unauthenticated, PermissionDenied) only appear over gRPC: both match here.
        if isinstance(exc, api_exceptions.Unauthorized):
            return ProviderError(FailureCode.AUTH, f"{self.where} refused the credentials of {email} (401)")
        if isinstance(exc, api_exceptions.Forbidden):
            return ProviderError(FailureCode.DENIED, f"{email} may not read {what} (403)")
        if isinstance(exc, api_exceptions.NotFound):
            return ProviderError(FailureCode.NOT_FOUND, f"{self.where} has no {what}")
        if isinstance(exc, api_exceptions.FailedPrecondition) or status == "FAILED_PRECONDITION":
            # A disabled or destroyed version: this secret cannot be served, the provider is fine.
            return ProviderError(FailureCode.NOT_FOUND, f"{what} cannot be read: {message}")
        if isinstance(exc, api_exceptions.BadRequest):
            return ProviderError(FailureCode.BAD_REQUEST, f"{self.where} rejected the request for {what}: {message}")
        return ProviderError(FailureCode.BACKEND, f"{self.where} failed on {what}: {exc.code} {status or ''} {message}")

    def _classify(self, exc: Exception, what: str) -> ProviderError | None:
        email = getattr(self.credentials, "service_account_email", "?")
        for link in _chain(exc):
            if isinstance(link, requests.exceptions.Timeout):
                return ProviderError(FailureCode.TIMEOUT, f"{self.where} did not answer within {self.timeout:g} s")
            if isinstance(link, requests.exceptions.SSLError):
                return ProviderError(
                    FailureCode.UNREACHABLE, f"TLS with {self.where} failed (is its CA in REQUESTS_CA_BUNDLE?)"
                )
            if isinstance(link, requests.exceptions.ConnectionError):
                return ProviderError(FailureCode.UNREACHABLE, f"cannot reach {self.where}")
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            return self._classify_api(exc, what, email)
        if isinstance(exc, google.auth.exceptions.RefreshError):
            return ProviderError(FailureCode.AUTH, f"no access token for {email}: {str(exc).splitlines()[0][:200]}")
        if isinstance(exc, google.auth.exceptions.TransportError):
            return ProviderError(FailureCode.UNREACHABLE, f"cannot reach the token endpoint of {email}")
        if isinstance(exc, requests.exceptions.RequestException):
            return ProviderError(FailureCode.UNREACHABLE, f"the request to {self.where} failed ({type(exc).__name__})")
        return None
