"""Google Cloud Secret Manager and Cloud KMS, through google-cloud-secret-manager and google-cloud-kms.
Imported only inside a provider child.

`provider "x" { type = "gcp-secret-manager"; project; credentials_file; endpoint_url }`
    credentials_file: a service-account key file (JSON, `"type": "service_account"`). Required: this
        build never falls back to Application Default Credentials, whose last resort is the metadata
        server, so a misconfigured engine cannot silently pick up the host's identity.
    project: the project id or number the secrets live in (default: the key file's `project_id`).
    endpoint_url: another Secret Manager endpoint (a Private Service Connect address, a test double);
        default `https://secretmanager.googleapis.com`.
`provider "x" { type = "kms"; backend = "gcp-kms"; key_name; key_version; credentials_file; endpoint_url }`
    key_name: the full resource name of an asymmetric signing key version,
        `projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/V`, or of its key
        (`…/cryptoKeys/K`) with `key_version = "V"`. Asymmetric keys have no primary version, so the
        version is always explicit: rotating means pinning a new version (a signer change).
    The key must be EC_SIGN_P256_SHA256: the child sends SHA-256(message) as the digest, Cloud KMS returns
    an ASN.1 DER ECDSA signature. The service account needs `cloudkms.cryptoKeyVersions.viewPublicKey` and
    `useToSign` (roles/cloudkms.signerVerifier); the health check only fetches the public key, so it
    needs nothing more. endpoint_url: default `https://cloudkms.googleapis.com`.

A rule names a secret by its id, optionally `#field` for a JSON payload; `version` is a number, an alias
or `latest` (the default). The clients use the REST transport: one HTTP/1.1 request per call through
`requests` (which honours REQUESTS_CA_BUNDLE), no gRPC channel or its threads in the child. With a
service-account key, google-auth signs its own short-lived JWT for each call's Authorization header (no
round trip to the token endpoint), so a wrong key shows up as the API's 401.

Everything that comes with a CRC32C is checked against it, as Google asks clients to: secret payloads,
public key PEMs, signatures, and Cloud KMS's confirmation that it received the digest we sent. A value
corrupted on the way is refused rather than handed to an agent or written into a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import google.api_core.exceptions as api_exceptions
import google.auth.exceptions
import requests.exceptions
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from faramesh.engine.providers.signing import ECDSA_P256_SHA256, UnsupportedKey, algorithm_of, spki_from_pem
from google.oauth2 import service_account

if TYPE_CHECKING:
    from google.cloud import kms, secretmanager

R = TypeVar("R")

CLOUD_PLATFORM: Final = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_ENDPOINT: Final = "secretmanager.googleapis.com"
KMS_ENDPOINT: Final = "cloudkms.googleapis.com"
# The one Cloud KMS algorithm checkpoints are signed with (CryptoKeyVersionAlgorithm's name).
KMS_ALGORITHM: Final = "EC_SIGN_P256_SHA256"
# Secret Manager's own rules: a secret id is 1-255 of [A-Za-z0-9_-]; a version is `latest`, a positive
# number or an alias (a letter, then letters, digits, `_` or `-`).
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_VERSION = re.compile(r"^(?:latest|[1-9][0-9]{0,18}|[A-Za-z][A-Za-z0-9_-]{0,62})$")
# A project id (6-30 of [a-z0-9-]), a project number, or a legacy domain-scoped id (`example.com:proj`).
_PROJECT = re.compile(r"^[a-z0-9][a-z0-9.:-]{0,99}$")
# Cloud KMS resource ids: a location, key ring and key are 1-63 of [A-Za-z0-9_-]; a version is a number.
_KMS_ID = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_KMS_VERSION = re.compile(r"^[1-9][0-9]{0,18}$")


def create(spec: BackendSpec) -> Backend:
    if spec.config.get("type") == "kms":
        return CloudKms(spec)
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


def key_version_name(key_name: str, key_version: str | None) -> str:
    """The key version `key_name` (and `key_version`) designate; ValueError saying what is wrong. Every
    segment is checked, so nothing that could change the request path reaches the URL."""
    parts = key_name.split("/")
    if len(parts) == 10:
        if parts[8] != "cryptoKeyVersions":
            raise ValueError(f"{key_name!r} is not a Cloud KMS key version resource name")
        if key_version is not None and key_version != parts[9]:
            raise ValueError(f"`key_name` names version {parts[9]}, `key_version` says {key_version}")
        parts, key_version = parts[:8], parts[9]
    elif len(parts) != 8:
        raise ValueError(
            "`key_name` must be projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/V (or the key, "
            "with `key_version`)"
        )
    labels = parts[0::2]
    if labels != ["projects", "locations", "keyRings", "cryptoKeys"]:
        raise ValueError(f"{key_name!r} is not a Cloud KMS key resource name (projects/…/cryptoKeys/…)")
    project, location, ring, key = parts[1::2]
    if not _PROJECT.match(project):
        raise ValueError(f"{project!r} is not a project id")
    for what, value in (("location", location), ("key ring", ring), ("key", key)):
        if not _KMS_ID.match(value):
            raise ValueError(f"{value!r} is not a Cloud KMS {what} id")
    if key_version is None:
        raise ValueError("asymmetric keys have no primary version: name one with `key_version` or in `key_name`")
    if not _KMS_VERSION.match(key_version):
        raise ValueError(f"{key_version!r} is not a key version number")
    return f"projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}/cryptoKeyVersions/{key_version}"


def check_public_key(name: str, reply_name: str, pem: str, checksum: int | None, algorithm: str) -> bytes:
    """The SPKI DER of a GetPublicKey reply for key version `name`, after Google's integrity checks. The
    key type is read from the PEM itself; the reply's `algorithm` must agree with it."""
    if reply_name and reply_name != name:
        raise ProviderError(FailureCode.BACKEND, f"Cloud KMS answered for {reply_name}, not for {name}")
    if checksum is not None and crc32c(pem.encode("utf-8")) != checksum:
        raise ProviderError(
            FailureCode.BACKEND, f"the public key of {name} does not match its CRC32C: corrupted on the way"
        )
    try:
        der = spki_from_pem(pem)
        kind = algorithm_of(der)
    except UnsupportedKey as exc:
        raise ProviderError(FailureCode.UNSUPPORTED, f"key version {name}: {exc}") from None
    if kind != ECDSA_P256_SHA256 or algorithm != KMS_ALGORITHM:
        raise ProviderError(
            FailureCode.UNSUPPORTED,
            f"key version {name} is {algorithm} ({kind}); checkpoint signing needs {KMS_ALGORITHM}",
        )
    return der


def check_signature(name: str, reply_name: str, signature: bytes, checksum: int | None, digest_verified: bool) -> bytes:
    """The signature of an AsymmetricSign reply, after Google's integrity checks: KMS confirms it got the
    digest we sent (we always send its CRC32C), answers for our key version, and the signature arrives
    as sent."""
    if not digest_verified:
        raise ProviderError(
            FailureCode.BACKEND, f"Cloud KMS did not confirm the digest's CRC32C for {name}: corrupted on the way"
        )
    if reply_name and reply_name != name:
        raise ProviderError(FailureCode.BACKEND, f"Cloud KMS signed with {reply_name}, not with {name}")
    if checksum is None or crc32c(signature) != checksum:
        raise ProviderError(
            FailureCode.BACKEND, f"the signature from {name} does not match its CRC32C: corrupted on the way"
        )
    return signature


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


class _Google:
    """A service-account identity calling one Google API, and its failures typed."""

    def __init__(self, spec: BackendSpec, service: str, default_endpoint: str) -> None:
        path = spec.str_field("credentials_file")
        if not path:
            raise ProviderError(
                FailureCode.CONFIG,
                f'provider "{spec.name}" needs `credentials_file` (a service-account key file); this build does '
                "not use ambient Google credentials",
            )
        self.credentials, self.file_project = _load_key(spec, path)
        self.email = str(getattr(self.credentials, "service_account_email", "?"))
        self.endpoint = spec.str_field("endpoint_url") or None
        self.where = f"{service} at {self.endpoint or default_endpoint}"
        # requests applies a float timeout to the connect and to the read separately: half the budget
        # each keeps one attempt inside it. No retries: the host's caller owns that decision.
        self.timeout = spec.timeout / 2

    @property
    def client_options(self) -> dict[str, str] | None:
        return {"api_endpoint": self.endpoint} if self.endpoint else None

    def run(self, what: str, fn: Callable[[], R], *, use: str = "read", precondition: FailureCode) -> R:
        """fn(), its failures typed. `use` says what the credentials were refused (read a secret, sign
        with a key); `precondition` is the code for FAILED_PRECONDITION (a disabled version)."""
        try:
            return fn()
        except ProviderError:
            raise
        except Exception as exc:
            typed = self.classify(exc, what, use=use, precondition=precondition)
            if typed is None:
                raise
            raise typed from None

    def _classify_api(
        self, exc: api_exceptions.GoogleAPICallError, what: str, use: str, precondition: FailureCode
    ) -> ProviderError:
        status, message = _rpc_error(exc)
        # Over REST, api-core picks the exception class by HTTP status (Unauthorized, Forbidden …); the
        # gRPC-named subclasses (Unauthenticated, PermissionDenied) only appear over gRPC: both match here.
        if isinstance(exc, api_exceptions.Unauthorized):
            return ProviderError(FailureCode.AUTH, f"{self.where} refused the credentials of {self.email} (401)")
        if isinstance(exc, api_exceptions.Forbidden):
            return ProviderError(FailureCode.DENIED, f"{self.email} may not {use} {what} (403)")
        if isinstance(exc, api_exceptions.NotFound):
            return ProviderError(FailureCode.NOT_FOUND, f"{self.where} has no {what}")
        if isinstance(exc, api_exceptions.FailedPrecondition) or status == "FAILED_PRECONDITION":
            return ProviderError(precondition, f"{what} cannot be used: {message}")
        if isinstance(exc, api_exceptions.BadRequest):
            return ProviderError(FailureCode.BAD_REQUEST, f"{self.where} rejected the request for {what}: {message}")
        return ProviderError(FailureCode.BACKEND, f"{self.where} failed on {what}: {exc.code} {status or ''} {message}")

    def classify(
        self, exc: Exception, what: str, *, use: str = "read", precondition: FailureCode = FailureCode.BACKEND
    ) -> ProviderError | None:
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
            return self._classify_api(exc, what, use, precondition)
        if isinstance(exc, google.auth.exceptions.RefreshError):
            return ProviderError(
                FailureCode.AUTH, f"no access token for {self.email}: {str(exc).splitlines()[0][:200]}"
            )
        if isinstance(exc, google.auth.exceptions.TransportError):
            return ProviderError(FailureCode.UNREACHABLE, f"cannot reach the token endpoint of {self.email}")
        if isinstance(exc, requests.exceptions.RequestException):
            return ProviderError(FailureCode.UNREACHABLE, f"the request to {self.where} failed ({type(exc).__name__})")
        return None


class SecretManager(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.google = _Google(spec, "Secret Manager", DEFAULT_ENDPOINT)
        self.credentials = self.google.credentials
        project = spec.str_field("project") or self.google.file_project
        if not project:
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}" needs `project` (the key file names none)')
        if not _PROJECT.match(project):
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": {project!r} is not a project id')
        self.project = project
        self.where = self.google.where
        self.timeout = self.google.timeout
        # Imported here so that a KMS child loads only the KMS client, and this one only Secret Manager's.
        from google.cloud import secretmanager

        self.client: secretmanager.SecretManagerServiceClient = secretmanager.SecretManagerServiceClient(
            credentials=self.credentials, transport="rest", client_options=self.google.client_options
        )

    def _run(self, what: str, fn: Callable[[], R]) -> R:
        # A disabled or destroyed version (FAILED_PRECONDITION): this secret cannot be served, the
        # provider is fine.
        return self.google.run(what, fn, precondition=FailureCode.NOT_FOUND)

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
        return self.google.classify(exc, "the request", precondition=FailureCode.NOT_FOUND)


class CloudKms(Backend):
    """Checkpoint signing with a Cloud KMS EC_SIGN_P256_SHA256 key version; the private key never leaves
    Cloud KMS."""

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        try:
            self.name = key_version_name(spec.required("key_name"), spec.str_field("key_version") or None)
        except ValueError as exc:
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}": {exc}') from None
        self.google = _Google(spec, "Cloud KMS", KMS_ENDPOINT)
        self.key_id = f"gcp-kms:{self.name}"
        self.what = f"key version {self.name}"
        self._public: bytes | None = None
        from google.cloud import kms

        self.client: kms.KeyManagementServiceClient = kms.KeyManagementServiceClient(
            credentials=self.google.credentials, transport="rest", client_options=self.google.client_options
        )

    def _run(self, fn: Callable[[], R], use: str) -> R:
        # A disabled or destroyed version (FAILED_PRECONDITION) is this provider's only key: it cannot
        # sign at all, which is a configuration problem, not a request-scoped one.
        return self.google.run(self.what, fn, use=use, precondition=FailureCode.CONFIG)

    def _fetch_public_key(self) -> bytes:
        reply: kms.PublicKey = self._run(
            lambda: self.client.get_public_key(name=self.name, retry=None, timeout=self.google.timeout),
            "view the public key of",
        )
        checksum = int(reply.pem_crc32c) if "pem_crc32c" in reply else None
        algorithm = getattr(reply.algorithm, "name", str(reply.algorithm))
        der = check_public_key(self.name, str(reply.name), str(reply.pem), checksum, algorithm)
        if self._public is None:
            self._public = der
        elif der != self._public:
            # Cannot happen with Cloud KMS (a version's key never changes): something else answers.
            raise ProviderError(
                FailureCode.KEY_MISMATCH, f"{self.google.where} now returns another public key for {self.name}"
            )
        return der

    def health(self) -> str:
        self._fetch_public_key()
        return f"{self.google.where}: {self.what} enabled ({KMS_ALGORITHM})"

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        if key_id is not None and key_id != self.key_id:
            raise ProviderError(FailureCode.NOT_FOUND, f"this provider holds {self.key_id}, not {key_id}")
        der = self._public if self._public is not None else self._fetch_public_key()
        return self.key_id, ECDSA_P256_SHA256, der

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        if self._public is None:
            self._fetch_public_key()  # refuses a key of the wrong type before anything is signed
        digest = hashlib.sha256(message).digest()
        request = {"name": self.name, "digest": {"sha256": digest}, "digest_crc32c": crc32c(digest)}
        reply: kms.AsymmetricSignResponse = self._run(
            lambda: self.client.asymmetric_sign(request=request, retry=None, timeout=self.google.timeout),
            "sign with",
        )
        checksum = int(reply.signature_crc32c) if "signature_crc32c" in reply else None
        signature = check_signature(
            self.name, str(reply.name), bytes(reply.signature), checksum, bool(reply.verified_digest_crc32c)
        )
        return self.key_id, ECDSA_P256_SHA256, signature

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.google.classify(exc, self.what, use="sign with", precondition=FailureCode.CONFIG)
