"""AWS Secrets Manager and KMS, through boto3. Imported only inside a provider child.

`provider "x" { type = "aws-secrets-manager"; region; endpoint_url; role_arn; secret_prefix }`
`provider "x" { type = "kms"; backend = "aws-kms"; key_arn | key_id; region; endpoint_url }`

Credentials: the engine's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN arrive over the
socket (`ambient`); without them boto3's default chain applies (profile, web identity, container or
instance role). `role_arn` is assumed through STS and refreshed before it expires.

KMS keys must be ECC_NIST_P256 (SIGN_VERIFY); the message is sent RAW (a checkpoint message is ~120
bytes, the limit is 4096) with ECDSA_SHA_256. The key type is read from the public key's DER, never
from `KeySpec` (moto's GetPublicKey omits it).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import orjson
from faramesh.engine.providers.backend import Backend, BackendSpec, select_field
from faramesh.engine.providers.protocol import FailureCode, ProviderError
from faramesh.engine.providers.signing import ECDSA_P256_SHA256, UnsupportedKey, algorithm_of

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient
    from mypy_boto3_secretsmanager.client import SecretsManagerClient

R = TypeVar("R")

_NOT_FOUND = {"ResourceNotFoundException", "NotFoundException"}
_AUTH = {
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "ExpiredToken",
    "InvalidClientTokenId",
    "IncompleteSignature",
    "MissingAuthenticationToken",
}
_DENIED = {"AccessDeniedException", "AccessDenied"}
_KEY_UNUSABLE = {"DisabledException", "KMSInvalidStateException", "KeyUnavailableException"}
_BAD_REQUEST = {
    "InvalidParameterException",
    "InvalidParameterValueException",
    "InvalidRequestException",
    "ValidationException",
    "InvalidKeyUsageException",
    "IncorrectKeyException",
    "InvalidArnException",
}


def create(spec: BackendSpec) -> Backend:
    if spec.config.get("type") == "aws-secrets-manager":
        return SecretsManager(spec)
    return Kms(spec)


def region_of_arn(arn: str | None) -> str | None:
    """`arn:aws:kms:us-west-2:123:key/…` → us-west-2."""
    if not arn or not arn.startswith("arn:"):
        return None
    parts = arn.split(":")
    if len(parts) < 6:
        return None
    return parts[3] or None


class _Aws:
    def __init__(self, spec: BackendSpec, service: Literal["kms", "secretsmanager"], region: str | None) -> None:
        self.spec = spec
        self.service = service
        self.region = region
        self.endpoint_url = spec.str_field("endpoint_url") or None
        self.role_arn = spec.str_field("role_arn") or None
        # Two attempts of (connect + read) fit in the child's budget, so the child reports why a call
        # failed before the host's deadline does.
        self.config = botocore.config.Config(
            connect_timeout=max(0.1, spec.timeout / 4),
            read_timeout=max(0.1, spec.timeout / 4),
            retries={"max_attempts": 2, "mode": "standard"},
            user_agent_extra="faramesh-provider",
        )
        ambient = spec.ambient
        self.base = boto3.session.Session(
            aws_access_key_id=ambient.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=ambient.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=ambient.get("AWS_SESSION_TOKEN"),
            region_name=region,
        )
        self._lock = threading.Lock()
        self._client: Any = None
        self._expires = float("inf")

    def client(self) -> Any:
        with self._lock:
            if self._client is None or time.time() >= self._expires:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        if self.role_arn is None:
            return self.base.client(self.service, endpoint_url=self.endpoint_url, config=self.config)
        sts = self.base.client("sts", config=self.config)
        creds = sts.assume_role(RoleArn=self.role_arn, RoleSessionName=f"faramesh-{self.spec.name}"[:64])["Credentials"]
        # Refresh five minutes before the role's credentials expire.
        self._expires = creds["Expiration"].timestamp() - 300
        session = boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            region_name=self.region or self.base.region_name,
        )
        for value in (creds["SecretAccessKey"], creds["SessionToken"]):
            self.spec.redact.add(value)
        return session.client(self.service, endpoint_url=self.endpoint_url, config=self.config)

    def run(self, what: str, fn: Callable[[Any], R]) -> R:
        try:
            return fn(self.client())
        except ProviderError:
            raise
        except Exception as exc:
            typed = self.classify(exc, what)
            if typed is None:
                raise
            raise typed from None

    def classify(self, exc: Exception, what: str) -> ProviderError | None:
        where = self.endpoint_url or f"AWS {self.service} ({self.region or 'default region'})"
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            text = str(error.get("Message", "")).strip() or code
            if code in _NOT_FOUND:
                return ProviderError(FailureCode.NOT_FOUND, f"{where} has no {what}")
            if code in _AUTH:
                return ProviderError(FailureCode.AUTH, f"{where} refused our AWS credentials ({code})")
            if code in _DENIED:
                return ProviderError(FailureCode.DENIED, f"the AWS credentials may not use {what} ({code})")
            if code in _KEY_UNUSABLE:
                return ProviderError(FailureCode.CONFIG, f"{what} cannot be used: {text}")
            if code in _BAD_REQUEST:
                return ProviderError(FailureCode.BAD_REQUEST, f"{where} rejected the request for {what}: {text}")
            return ProviderError(FailureCode.BACKEND, f"{where} failed on {what}: {code}: {text}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return ProviderError(FailureCode.AUTH, "no usable AWS credentials in the engine's environment")
        if isinstance(exc, botocore.exceptions.NoRegionError):
            return ProviderError(FailureCode.CONFIG, f'provider "{self.spec.name}" needs `region`')
        if isinstance(exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
            return ProviderError(FailureCode.TIMEOUT, f"{where} did not answer within {self.spec.timeout:g} s")
        if isinstance(exc, botocore.exceptions.SSLError):
            return ProviderError(FailureCode.UNREACHABLE, f"TLS with {where} failed")
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionClosedError):
            return ProviderError(FailureCode.UNREACHABLE, f"cannot reach {where}")
        if isinstance(exc, botocore.exceptions.HTTPClientError):
            return ProviderError(FailureCode.UNREACHABLE, f"the connection to {where} failed")
        return None


class SecretsManager(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.aws = _Aws(spec, "secretsmanager", spec.str_field("region") or None)
        self.prefix = spec.str_field("secret_prefix") or ""

    def health(self) -> str:
        def probe(client: SecretsManagerClient) -> str:
            try:
                client.list_secrets(MaxResults=1)
            except botocore.exceptions.ClientError as exc:
                # Reaching "not allowed to list" proves the endpoint answers and accepts our credentials.
                if exc.response.get("Error", {}).get("Code") in _DENIED:
                    return "Secrets Manager reachable, credentials accepted (ListSecrets not permitted)"
                raise
            return "Secrets Manager reachable, credentials accepted"

        return self.aws.run("the secret list", probe)

    def get_secret(self, name: str, field: str | None, version: str | None) -> tuple[str | dict[str, Any], str | None]:
        secret_id = self.prefix + name
        kwargs: dict[str, Any] = {"SecretId": secret_id}
        if version is not None:
            # A stage is upper-case (AWSCURRENT, AWSPREVIOUS, custom labels); anything else is a VersionId.
            kwargs["VersionStage" if version.isupper() else "VersionId"] = version
        reply = self.aws.run(f"secret {secret_id!r}", lambda c: c.get_secret_value(**kwargs))
        version_id = reply.get("VersionId")
        if "SecretString" in reply:
            text = reply["SecretString"]
            if field is None:
                return text, version_id
            try:
                data = orjson.loads(text)
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict):
                raise ProviderError(
                    FailureCode.BAD_REQUEST, f"secret {name!r} is not a JSON object, so it has no field {field!r}"
                )
            return select_field(name, data, field), version_id
        if field is not None:
            raise ProviderError(FailureCode.BAD_REQUEST, f"secret {name!r} is binary, so it has no field {field!r}")
        return base64.b64encode(reply["SecretBinary"]).decode("ascii"), version_id

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.aws.classify(exc, "the request")


class Kms(Backend):
    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        key = spec.str_field("key_arn") or spec.str_field("key_id")
        if not key:
            raise ProviderError(FailureCode.CONFIG, f'provider "{spec.name}" needs `key_arn` (or `key_id`)')
        self.key: str = key
        self.aws = _Aws(spec, "kms", spec.str_field("region") or region_of_arn(self.key))
        self.key_id = f"aws-kms:{self.key}"
        self.what = f"KMS key {self.key}"
        self._public: tuple[str, bytes] | None = None

    def _public_key(self) -> tuple[str, bytes]:
        if self._public is None:
            reply = self.aws.run(self.what, lambda c: c.get_public_key(KeyId=self.key))
            der = reply["PublicKey"]
            try:
                algorithm = algorithm_of(der)
            except UnsupportedKey as exc:
                raise ProviderError(FailureCode.UNSUPPORTED, f"{self.what}: {exc}") from None
            if algorithm != ECDSA_P256_SHA256:
                raise ProviderError(FailureCode.UNSUPPORTED, f"{self.what} is {algorithm}; AWS KMS signing needs P-256")
            self._public = (algorithm, der)
        return self._public

    def health(self) -> str:
        def probe(client: KMSClient) -> str:
            meta = client.describe_key(KeyId=self.key)["KeyMetadata"]
            if meta.get("KeyState") != "Enabled":
                raise ProviderError(FailureCode.CONFIG, f"{self.what} is {meta.get('KeyState')}, not Enabled")
            if meta.get("KeyUsage") != "SIGN_VERIFY":
                raise ProviderError(FailureCode.CONFIG, f"{self.what} is not a SIGN_VERIFY key")
            return f"{self.what} enabled"

        detail = self.aws.run(self.what, probe)
        self._public_key()
        return detail

    def get_public_key(self, key_id: str | None) -> tuple[str, str, bytes]:
        if key_id is not None and key_id != self.key_id:
            raise ProviderError(FailureCode.NOT_FOUND, f"this provider holds {self.key_id}, not {key_id}")
        algorithm, der = self._public_key()
        return self.key_id, algorithm, der

    def sign(self, message: bytes) -> tuple[str, str, bytes]:
        algorithm, _ = self._public_key()
        reply = self.aws.run(
            self.what,
            lambda c: c.sign(KeyId=self.key, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"),
        )
        return self.key_id, algorithm, reply["Signature"]

    def classify(self, exc: Exception) -> ProviderError | None:
        return self.aws.classify(exc, self.what)
