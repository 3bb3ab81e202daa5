"""Checkpoint signing with the `kms` backends `gcp-kms` (Google Cloud KMS) and `azure-kv` (Azure Key Vault
keys), through the real ProviderHost and its children, against local HTTPS doubles.

Neither Cloud KMS nor Key Vault has a server that runs locally, so these tests do NOT talk to the real
services. The official client libraries (google-cloud-kms with its REST transport and google-auth;
azure-keyvault-keys with azure-identity) run unmodified in the provider children and talk HTTPS to the
doubles in tests/cloud_doubles.py on 127.0.0.1. The doubles check each request's path, query, auth header
and body against the shapes those libraries build — captured by `library_shapes` below from the
libraries' own request builders, in a subprocess, and compared with the doubles' contract — and answer a
wrong shape with the service's error (recorded as a "wrong shape"). Each double holds a real P-256
private key and signs the digest the client sent with it; the tests verify every signature with
`cryptography` against the public key the engine fetched and pinned, reading the key type from the key
itself (Cloud KMS hands out PEM, Key Vault a JSON Web Key). What the doubles cannot show: the services'
real authorisation models (IAM, Key Vault access policies versus RBAC), HSM behaviour, quotas, and
anything that needs Google's or Microsoft's real keys.

TLS is real: the doubles serve a certificate from a throwaway CA that only the provider children trust
(REQUESTS_CA_BUNDLE, passed through the host's `environ`; the test process never sets it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cloud_doubles import (
    CONTRACT,
    AzureDouble,
    Blackhole,
    GcpKmsDouble,
    ServiceAccount,
    Tls,
    b64url,
    b64url_decode_strict,
    crc32c_bitwise,
    make_tls,
    new_service_account,
    public_der,
    public_pem,
)
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from faramesh.engine.providers.host import CheckpointSigner, ProviderHost, SigningUnavailable
from faramesh.engine.providers.protocol import (
    FailureCode,
    Health,
    HealthResult,
    ProviderFailure,
    PublicKeyResult,
    SignResult,
    backend_module,
)
from faramesh.engine.providers.signing import verify_checkpoint
from faramesh.engine.wal.signer import checkpoint_message

WAIT = 60.0  # an upper bound that keeps a broken test from hanging; no assertion depends on it
CLIENT_SECRET = "az-kms-client-secret~" + secrets.token_urlsafe(24)
SDK_ROOTS = ("google", "azure", "msal", "grpc", "requests", "urllib3", "proto")


def _need_sdks(detail: str) -> None:
    message = f"the cloud SDKs are missing (pip install -e '.[providers]'): {detail}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------
# What the libraries build, captured in a subprocess (the test process imports no SDK)

CAPTURE = r"""
import json
from google.api_core import gapic_v1, rest_helpers
from google.cloud.kms_v1._compat import transcode_request
from google.cloud.kms_v1.services.key_management_service.transports.base import KeyManagementServiceTransport
from google.cloud.kms_v1.services.key_management_service.transports.rest_base import (
    _BaseKeyManagementServiceRestTransport as Rest,
)
from google.cloud.kms_v1.types import resources, service
from azure.keyvault.keys._generated import models as kv_models
from azure.keyvault.keys._generated._model_base import SdkJSONEncoder
from azure.keyvault.keys._generated._operations._operations import (
    build_key_vault_get_key_request,
    build_key_vault_sign_request,
)
from azure.keyvault.keys._sdk_moniker import SDK_MONIKER
from azure.keyvault.keys._shared.client_base import DEFAULT_VERSION, ApiVersion
from azure.keyvault.keys.crypto import SignatureAlgorithm


def gcp(options, message, routing):
    transcoded, body, query = transcode_request(
        options, message, required_fields_default_values={}, rest_numeric_enums=True
    )
    return {
        "method": transcoded["method"].upper(),
        "uri": transcoded["uri"],
        "body": json.loads(body) if body else None,
        "query": rest_helpers.flatten_query_params(query, strict=True),
        "routing": [list(gapic_v1.routing_header.to_grpc_metadata(routing))],
    }


def azure(request):
    return {"method": request.method, "url": request.url, "headers": dict(request.headers)}


name = "projects/P-MARK/locations/L-MARK/keyRings/R-MARK/cryptoKeys/K-MARK/cryptoKeyVersions/7"
digest = bytes(range(32))
version = DEFAULT_VERSION.value
Algorithm = resources.CryptoKeyVersion.CryptoKeyVersionAlgorithm
# Serialised as CryptographyClient.sign serialises it (the generated client's `sign` operation).
sign_body = json.dumps(
    kv_models.KeySignParameters(algorithm=SignatureAlgorithm.es256, value=digest),
    cls=SdkJSONEncoder,
    exclude_readonly=True,
)
print(json.dumps({
    "gcp": {
        "sign": gcp(
            Rest._BaseAsymmetricSign._get_http_options(),
            service.AsymmetricSignRequest(name=name, digest={"sha256": digest}, digest_crc32c=1234),
            (("name", name),),
        ),
        "public_key": gcp(
            Rest._BaseGetPublicKey._get_http_options(), service.GetPublicKeyRequest(name=name), (("name", name),)
        ),
        "scopes": list(KeyManagementServiceTransport.AUTH_SCOPES),
        "algorithms": {a.name: int(a) for a in Algorithm},
        "software": int(resources.ProtectionLevel.SOFTWARE),
    },
    "azure": {
        "get": azure(build_key_vault_get_key_request("N-MARK", "V-MARK", api_version=version)),
        "current": azure(build_key_vault_get_key_request("N-MARK", "", api_version=version)),
        "sign": azure(
            build_key_vault_sign_request("N-MARK", "V-MARK", api_version=version, content_type="application/json")
        ),
        "sign_body": json.loads(sign_body),
        "es256": SignatureAlgorithm.es256.value,
        "moniker": SDK_MONIKER,
        "default_api_version": version,
        "api_versions": [v.value for v in ApiVersion],
    },
}))
"""


@pytest.fixture(scope="module")
def library_shapes() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CAPTURE], capture_output=True, text=True, timeout=WAIT)
    if proc.returncode != 0:
        if "ModuleNotFoundError" in proc.stderr:
            _need_sdks(proc.stderr.strip().splitlines()[-1])
        raise AssertionError(f"capturing the libraries' request shapes failed:\n{proc.stderr}")
    shapes: dict[str, Any] = json.loads(proc.stdout)
    return shapes


# ---------------------------------------------------------------------------------------------------
# Running hosts


class Logs:
    """The host's log sink: every line it would write to the engine log."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


@contextlib.contextmanager
def running(
    providers: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str]
) -> Iterator[tuple[ProviderHost, Logs]]:
    logs = Logs()
    host = ProviderHost(providers, environ, log=logs)
    host.start()
    try:
        assert host.wait_settled(WAIT)
        yield host, logs
    finally:
        host.close()


def _environ(tls: Tls | None, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "AZURE_CLIENT_SECRET": CLIENT_SECRET, **extra}
    if tls is not None:
        env["REQUESTS_CA_BUNDLE"] = str(tls.ca_file)  # reaches the children only
    return env


def _ok(result: Any, kind: type) -> Any:
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result}"
    return result


def _connect(host: ProviderHost, name: str) -> CheckpointSigner:
    signer = CheckpointSigner.connect(host, name)
    assert isinstance(signer, CheckpointSigner), f"{name}: {signer}"
    return signer


def _message(seq: int = 42) -> bytes:
    return checkpoint_message("chain-" + uuid.uuid4().hex[:8], seq, hashlib.sha256(os.urandom(16)).hexdigest())


def _verify_p256(der: bytes, message: bytes, signature: bytes) -> None:
    """Verify with `cryptography` alone, reading the key type from the key: raises unless `signature` is a
    P-256 ECDSA/SHA-256 signature of `message` under `der`."""
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1), type(key)
    key.verify(signature, message, ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------------------------------------------
# Doubles


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _write_key(path: Path, info: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


@dataclass
class Gcp:
    double: GcpKmsDouble
    key_file: Path
    audit: str  # the key version the shared provider signs with

    def config(self, key_name: str | None = None, **override: Any) -> dict[str, Any]:
        cfg = {
            "type": "kms",
            "backend": "gcp-kms",
            "key_name": key_name or self.audit,
            "credentials_file": str(self.key_file),
            "endpoint_url": self.double.url,
            **override,
        }
        return {k: v for k, v in cfg.items() if v is not None}


def _start_gcp(tls: Tls, tmp: Path) -> Gcp:
    double = GcpKmsDouble(tls, "faramesh-prod", new_service_account("faramesh-prod", "faramesh-signer")).start()
    audit = double.add_key("audit-checkpoints")
    return Gcp(double, _write_key(tmp / "gcp-key.json", double.key_file()), audit)


@pytest.fixture(scope="module")
def gcp(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gcp]:
    g = _start_gcp(tls, tmp_path_factory.mktemp("gcp"))
    yield g
    g.double.stop()


@dataclass
class Azure:
    double: AzureDouble

    def config(self, key_name: str = "audit", **override: Any) -> dict[str, Any]:
        cfg = {
            "type": "kms",
            "backend": "azure-kv",
            "vault_url": self.double.url,
            "key_name": key_name,
            "tenant_id": self.double.tenant_id,
            "client_id": self.double.client_id,
            "client_secret": {"$env": "AZURE_CLIENT_SECRET"},
            "authority_host": self.double.url,
            **override,
        }
        return {k: v for k, v in cfg.items() if v is not None}

    def key_id(self, name: str, version: str) -> str:
        return f"azure-kv:{self.double.url}/keys/{name}/{version}"


def _start_azure(tls: Tls, shapes: dict[str, Any]) -> Azure:
    double = AzureDouble(
        tls,
        tenant_id=str(uuid.uuid4()),
        client_id=str(uuid.uuid4()),
        client_secret=CLIENT_SECRET,
        api_versions=set(),  # this vault serves keys only
        key_api_versions=set(shapes["azure"]["api_versions"]),
    ).start()
    double.add_key("audit")
    double.add_key("rotating")
    return Azure(double)


@pytest.fixture(scope="module")
def azure(tls: Tls, library_shapes: dict[str, Any]) -> Iterator[Azure]:
    a = _start_azure(tls, library_shapes)
    yield a
    a.double.stop()


@pytest.fixture(scope="module")
def shared(gcp: Gcp, azure: Azure, tls: Tls) -> Iterator[tuple[ProviderHost, Logs]]:
    providers = {"gcp": gcp.config(), "azure": azure.config(), "azure-rotating": azure.config("rotating")}
    with running(providers, _environ(tls)) as pair:
        yield pair


# ---------------------------------------------------------------------------------------------------
# The doubles' contract is what the libraries build


def test_the_doubles_expect_what_the_libraries_build(library_shapes: dict[str, Any]) -> None:
    g, a = library_shapes["gcp"], library_shapes["azure"]
    kms, keys = CONTRACT["gcp-kms"], CONTRACT["azure-keys"]
    name = "projects/P-MARK/locations/L-MARK/keyRings/R-MARK/cryptoKeys/K-MARK/cryptoKeyVersions/7"
    header, value = kms["routing_header"]
    for op in ("sign", "public_key"):
        method, path = kms[op].split(" ")
        assert (g[op]["method"], g[op]["uri"]) == (method, path.format(name=name)), op
        assert [tuple(q) for q in g[op]["query"]] == [kms["alt"]], op
        assert [tuple(h) for h in g[op]["routing"]] == [(header, value.format(name=name))], op
    assert g["public_key"]["body"] is None
    body = g["sign"]["body"]  # the name travels in the path only; the digest as standard base64
    fields = {f"{k}.{sub}" for k, v in body.items() if isinstance(v, dict) for sub in v}
    assert fields | {k for k, v in body.items() if not isinstance(v, dict)} == set(kms["sign_body"])
    assert base64.b64decode(body["digest"]["sha256"]) == bytes(range(32)) and body["digestCrc32c"] == "1234"
    assert CONTRACT["gcp"]["scope"] in g["scopes"]
    assert {k: g["algorithms"][k] for k in kms["algorithms"]} == kms["algorithms"]
    assert g["software"] == kms["protection_software"]

    version = a["default_api_version"]
    assert version in a["api_versions"]
    for op, key_version in (("get", "V-MARK"), ("current", "")):
        method, path = keys["get"].split(" ")
        assert (a[op]["method"], a[op]["url"]) == (
            method,
            path.format(name="N-MARK", version=key_version) + f"?api-version={version}",
        )
    method, path = keys["sign"].split(" ")
    assert (a["sign"]["method"], a["sign"]["url"]) == (
        method,
        path.format(name="N-MARK", version="V-MARK") + f"?api-version={version}",
    )
    assert {r["headers"]["Accept"] for r in (a["get"], a["current"], a["sign"])} == {CONTRACT["azure"]["accept"]}
    assert a["sign"]["headers"]["Content-Type"] == keys["content_type"]
    assert set(a["sign_body"]) == set(keys["sign_body"]) and a["sign_body"]["alg"] == a["es256"] == keys["es256"]
    assert b64url_decode_strict(a["sign_body"]["value"]) == bytes(range(32))  # base64url, unpadded
    # azure-core's UserAgentPolicy prefixes the moniker with `azsdk-python-`.
    assert "azsdk-python-" + a["moniker"].split("/")[0] + "/" == keys["user_agent"]


def test_both_backends_are_mapped_to_their_modules() -> None:
    assert backend_module({"type": "kms", "backend": "gcp-kms"}) == "faramesh.engine.providers.gcp"
    assert backend_module({"type": "kms", "backend": "azure-kv"}) == "faramesh.engine.providers.azure"


# ---------------------------------------------------------------------------------------------------
# Signing through the real host and children


def test_a_checkpoint_is_signed_in_the_kms_and_verifies_against_the_pinned_key(
    shared: tuple[ProviderHost, Logs], gcp: Gcp, azure: Azure
) -> None:
    host, _ = shared
    rows = {s.name: s for s in host.status()}
    assert {n: s.health for n, s in rows.items()} == dict.fromkeys(rows, Health.HEALTHY), rows
    pids = {s.pid for s in rows.values()}
    assert None not in pids and os.getpid() not in pids and len(pids) == len(rows)
    audit_version = azure.double.keys["audit"].versions[0][0]
    expected = {
        "gcp": (f"gcp-kms:{gcp.audit}", public_der(gcp.double.keys[gcp.audit].private_key)),
        "azure": (azure.key_id("audit", audit_version), public_der(azure.double.key_of("audit", audit_version))),
    }
    for name, (key_id, double_der) in expected.items():
        signer = _connect(host, name)
        assert (signer.key_id, signer.algorithm, signer.remote) == (key_id, "ecdsa-p256-sha256", True)
        assert signer.fingerprint.startswith("ecdsa-p256:")
        pinned = base64.b64decode(signer.public_b64)  # P-256 keys are pinned as SPKI DER
        assert pinned == double_der  # the key the KMS holds, as it handed it out (PEM / JWK)
        message = _message()
        signature_b64 = signer.sign(message)
        signature = base64.b64decode(signature_b64)
        _verify_p256(pinned, message, signature)
        with pytest.raises(InvalidSignature):
            _verify_p256(pinned, message + b"x", signature)
        assert verify_checkpoint(signer.fingerprint, signer.public_b64, message, signature_b64)
        assert not verify_checkpoint(signer.fingerprint, signer.public_b64, _message(), signature_b64)

    # Only the digest travelled: each KMS signed SHA-256 of exactly the checkpoint messages above.
    assert gcp.double.signed and all(n == gcp.audit and len(d) == 32 for n, d in gcp.double.signed)
    assert azure.double.signed and all(len(d) == 32 for _, _, d in azure.double.signed)
    # google-auth signed its own JWT per call; Key Vault's tokens came from the double's Entra ID.
    assert set(gcp.double.auth_kinds) == {"self-signed-jwt"} and not gcp.double.seen(lambda r: r.path == "/token")
    tokens = azure.double.seen(lambda r: r.path.endswith("/oauth2/v2.0/token"))
    assert tokens and all(t.form()["client_secret"] == [CLIENT_SECRET] for t in tokens)
    signs = azure.double.seen(lambda r: r.path.endswith("/sign") and r.header("authorization") is not None)
    assert signs and all((r.header("authorization") or "")[7:] in azure.double.issued for r in signs)
    assert gcp.double.wrong_shapes() == [] and azure.double.wrong_shapes() == []
    for name in ("gcp", "azure"):
        detail = _ok(host.submit(name, "health").result(WAIT), HealthResult).detail
        assert "enabled" in detail


def test_each_signature_is_the_kms_own_and_a_swapped_key_is_caught(
    shared: tuple[ProviderHost, Logs], gcp: Gcp, azure: Azure
) -> None:
    """The engine checks every signature against its pin: one from another key never becomes a
    checkpoint (PROVIDER_KEY_MISMATCH, queued), even when the KMS answers."""
    host, _ = shared
    signer = _connect(host, "gcp")
    message = _message()
    before = len(gcp.double.signed)
    signer.sign(message)
    assert gcp.double.signed[before:] == [(gcp.audit, hashlib.sha256(message).digest())]
    original = gcp.double.keys[gcp.audit].private_key
    gcp.double.keys[gcp.audit].private_key = ec.generate_private_key(ec.SECP256R1())
    try:
        with pytest.raises(SigningUnavailable) as raised:
            signer.sign(message)
        assert raised.value.failure.code == FailureCode.KEY_MISMATCH
    finally:
        gcp.double.keys[gcp.audit].private_key = original
    signer.sign(message)  # and the same key signs again


def test_azure_signs_with_the_version_it_pinned_across_a_rotation(
    shared: tuple[ProviderHost, Logs], azure: Azure, tls: Tls
) -> None:
    host, _ = shared
    first = azure.double.keys["rotating"].versions[0][0]
    signer = _connect(host, "azure-rotating")
    assert signer.key_id == azure.key_id("rotating", first)
    rotated = azure.double.add_key("rotating")  # a new current version in the vault
    message = _message()
    signature = base64.b64decode(signer.sign(message))
    _verify_p256(public_der(azure.double.key_of("rotating", first)), message, signature)
    assert azure.double.signed[-1] == ("rotating", first, hashlib.sha256(message).digest())
    status = host.probe("azure-rotating")
    assert status is not None and status.health == Health.HEALTHY, status
    # Any version's key can be fetched by its id (to verify history), without changing the signer.
    new_key = _ok(host.get_public_key("azure-rotating", azure.key_id("rotating", rotated)), PublicKeyResult)
    assert new_key.der == public_der(azure.double.key_of("rotating", rotated))
    assert _ok(host.sign("azure-rotating", message), SignResult).key_id == signer.key_id
    other = _ok(host.get_public_key("azure-rotating", azure.key_id("audit", first)), ProviderFailure)
    assert other.code == FailureCode.NOT_FOUND
    # A new engine pins the current version, unless the block names one.
    cfgs = {"latest": azure.config("rotating"), "pinned": azure.config("rotating", key_version=first)}
    with running(cfgs, _environ(tls)) as (fresh, _):
        assert _connect(fresh, "latest").key_id == azure.key_id("rotating", rotated)
        assert _connect(fresh, "pinned").key_id == azure.key_id("rotating", first)


# ---------------------------------------------------------------------------------------------------
# Key problems: typed, and the provider's health says so


def test_key_problems_are_typed(gcp: Gcp, azure: Azure, tls: Tls) -> None:
    g, a = gcp.double, azure.double
    denied = g.add_key("denied")
    g.denied_keys.add(denied)
    disabled = g.add_key("disabled")
    g.keys[disabled].state = "DISABLED"
    rsa_key = g.add_key("rsa", private_key=rsa.generate_private_key(65537, 2048), algorithm="RSA_SIGN_PSS_2048_SHA256")
    corrupt = g.add_key("corrupt")
    g.corrupt_signatures.add(corrupt)
    a.add_key("forbidden")
    a.forbidden_keys.add("forbidden")
    a.add_key("disabled")
    a.keys["disabled"].enabled = False
    a.add_key("disabled-later")
    a.add_key("rsa", private_key=rsa.generate_private_key(65537, 2048))
    a.add_key("verify-only")
    a.keys["verify-only"].ops = ("verify",)
    providers = {
        "gcp-denied": gcp.config(denied),
        "gcp-disabled": gcp.config(disabled),
        "gcp-missing": gcp.config(g.key_name("audit-checkpoints", 9)),
        "gcp-rsa": gcp.config(rsa_key),
        "gcp-corrupt": gcp.config(corrupt),
        "gcp-bad-name": gcp.config("projects/p/locations/global/keyRings/r/cryptoKeys/k"),  # no version
        "azure-forbidden": azure.config("forbidden"),
        "azure-disabled": azure.config("disabled"),
        "azure-disabled-later": azure.config("disabled-later"),
        "azure-missing": azure.config("nope"),
        "azure-rsa": azure.config("rsa"),
        "azure-verify-only": azure.config("verify-only"),
        "azure-bad-name": azure.config("under_score"),
        "azure-http": azure.config(vault_url="http://127.0.0.1:9"),
    }
    expected = {
        "gcp-denied": (FailureCode.DENIED, "may not view the public key of"),
        "gcp-disabled": (FailureCode.CONFIG, "is not enabled, current state is: DISABLED"),
        "gcp-missing": (FailureCode.NOT_FOUND, "has no key version"),
        "gcp-rsa": (FailureCode.UNSUPPORTED, "RSA"),
        "gcp-bad-name": (FailureCode.CONFIG, "no primary version"),
        "azure-forbidden": (FailureCode.DENIED, "may not read key forbidden"),
        "azure-disabled": (FailureCode.CONFIG, "is disabled"),
        "azure-missing": (FailureCode.NOT_FOUND, "has no key nope"),
        "azure-rsa": (FailureCode.UNSUPPORTED, "is a RSA key"),
        "azure-verify-only": (FailureCode.CONFIG, "does not allow `sign`"),
        "azure-bad-name": (FailureCode.CONFIG, "is not a Key Vault key name"),
        "azure-http": (FailureCode.CONFIG, "vault_url must be an https:// URL"),
    }
    with running(providers, _environ(tls)) as (host, logs):
        for name, (code, text) in expected.items():
            failure = _ok(host.get_public_key(name), ProviderFailure)
            assert failure.code == code and text in failure.message, (name, failure)
            assert _ok(host.sign(name, _message()), ProviderFailure).code == code, name
            assert isinstance(CheckpointSigner.connect(host, name), ProviderFailure)
        rows = {s.name: s for s in host.status()}
        for name in ("gcp-disabled", "gcp-bad-name", "azure-disabled", "azure-http", "azure-bad-name"):
            assert rows[name].health == Health.DOWN and (rows[name].last_error or "").startswith(FailureCode.CONFIG)
        for name in ("gcp-bad-name", "azure-bad-name", "azure-http"):
            assert rows[name].restarts == 0 and rows[name].pid is None  # refused at configure, not restarted
        # A signature whose CRC32C does not match is never handed out.
        signer = _connect(host, "gcp-corrupt")
        with pytest.raises(SigningUnavailable) as raised:
            signer.sign(_message())
        assert raised.value.failure.code == FailureCode.BACKEND and "CRC32C" in raised.value.failure.message
        # A key disabled after it was pinned: Key Vault refuses to sign (KeyDisabled), the provider is DOWN.
        later = _connect(host, "azure-disabled-later")
        a.keys["disabled-later"].enabled = False
        with pytest.raises(SigningUnavailable) as raised:
            later.sign(_message())
        assert raised.value.failure.code == FailureCode.CONFIG and "KeyDisabled" in raised.value.failure.message
        status = host.probe("azure-disabled-later")
        assert status is not None and status.health == Health.DOWN and "disabled" in (status.last_error or "")
        assert CLIENT_SECRET not in logs.text()
    assert g.wrong_shapes() == [] and a.wrong_shapes() == []


# ---------------------------------------------------------------------------------------------------
# Wrong credentials, a KMS that goes away, a KMS that stalls


def test_wrong_credentials_are_auth_failures_that_never_show_them(
    gcp: Gcp, azure: Azure, tls: Tls, tmp_path: Path
) -> None:
    # The key file names the right account and key id, but holds another private key.
    account = gcp.double.account
    impostor = ServiceAccount(account.email, account.key_id, new_service_account("x").private_key)
    wrong_key = _write_key(tmp_path / "wrong-key.json", impostor.key_file(gcp.double.project, gcp.double.token_uri))
    wrong_secret = "wrong-kms-client-secret~" + secrets.token_urlsafe(24)
    providers = {
        "gcp": gcp.config(credentials_file=str(wrong_key)),
        "azure": azure.config(client_secret={"$env": "WRONG_SECRET"}),
    }
    with running(providers, _environ(tls, WRONG_SECRET=wrong_secret)) as (host, logs):
        failures = []
        for name in providers:
            pinned = _ok(CheckpointSigner.connect(host, name), ProviderFailure)
            signed = _ok(host.sign(name, _message()), ProviderFailure)
            failures += [pinned, signed]
        assert [f.code for f in failures] == [FailureCode.AUTH] * 4
        assert not any(f.retryable for f in failures)
        statuses = host.status()
        assert all(s.health == Health.DOWN and (s.last_error or "").startswith(FailureCode.AUTH) for s in statuses)
        seen = logs.text() + "\n".join(str(f) for f in failures) + json.dumps([s.to_dict() for s in statuses])
    # Each error says who was refused (and, for Entra ID, why) …
    assert account.email in seen and "AADSTS7000215" in seen and azure.double.client_id in seen
    # … and no credential: not the client secrets, not a line of either private key.
    for secret in (wrong_secret, CLIENT_SECRET):
        assert secret not in seen
    for key in (impostor.private_key_pem, account.private_key_pem):
        assert not [line for line in key.splitlines()[1:-1] if line in seen]
    assert "JWT signature does not verify against the service account's key" in gcp.double.reasons()
    assert "wrong client secret" in azure.double.reasons()


def test_a_kms_that_goes_away_is_unreachable_and_a_stalled_one_times_out(
    tls: Tls, tmp_path: Path, library_shapes: dict[str, Any]
) -> None:
    g = _start_gcp(tls, tmp_path)
    a = _start_azure(tls, library_shapes)
    stalled = Blackhole()
    providers = {
        "gcp": g.config(timeout=2),
        "azure": a.config(timeout=2),
        "gcp-stalled": g.config(endpoint_url=stalled.url, timeout=2),
        "azure-stalled": a.config(vault_url=stalled.url, authority_host=stalled.url, timeout=2),
    }
    try:
        with running(providers, _environ(tls)) as (host, logs):
            signers = {name: _connect(host, name) for name in ("gcp", "azure")}
            for signer in signers.values():
                signer.sign(_message())
            for name in ("gcp-stalled", "azure-stalled"):
                failure = _ok(host.get_public_key(name), ProviderFailure)
                assert failure.code == FailureCode.TIMEOUT and failure.retryable, failure
                assert host.status_of(name).health != Health.HEALTHY  # type: ignore[union-attr]
            g.double.stop()
            a.double.stop()
            for name, signer in signers.items():
                # The engine keeps its pin and queues the checkpoint: the failure is typed and retryable.
                with pytest.raises(SigningUnavailable) as raised:
                    signer.sign(_message())
                failure = raised.value.failure
                assert failure.code == FailureCode.UNREACHABLE and failure.retryable, failure
                assert "cannot reach" in failure.message
                status = host.probe(name)
                assert status is not None and status.health == Health.DOWN
                assert (status.last_error or "").startswith(FailureCode.UNREACHABLE)
            assert CLIENT_SECRET not in logs.text()
    finally:
        stalled.close()
        g.double.stop()
        a.double.stop()


ENGINE = r"""
import base64, json, sys
from faramesh.engine.providers.host import CheckpointSigner, ProviderHost
from faramesh.engine.providers.signing import verify_checkpoint
from faramesh.engine.wal.signer import checkpoint_message
job = json.load(sys.stdin)
host = ProviderHost(job["providers"], job["environ"], log=lambda line: None)
host.start()
verified = {}
try:
    for name in job["providers"]:
        signer = CheckpointSigner.connect(host, name)
        message = checkpoint_message("chain", 1, "00" * 32)
        verified[name] = verify_checkpoint(signer.fingerprint, signer.public_b64, message, signer.sign(message))
finally:
    host.close()
roots = set(job["roots"])
print(json.dumps({"verified": verified, "sdk": sorted(m for m in sys.modules if m.split(".")[0] in roots)}))
"""


def test_the_engine_process_never_imports_the_sdks(gcp: Gcp, azure: Azure, tls: Tls) -> None:
    job = {
        "providers": {"gcp": gcp.config(), "azure": azure.config()},
        "environ": _environ(tls),
        "roots": SDK_ROOTS,
    }
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE], input=json.dumps(job), capture_output=True, text=True, timeout=WAIT * 2
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verified"] == {"gcp": True, "azure": True}  # the SDKs ran — in the children
    assert out["sdk"] == []


# ---------------------------------------------------------------------------------------------------
# The doubles refuse what the libraries would not send


def _call(
    tls: Tls, url: str, *, method: str = "GET", headers: Mapping[str, str], body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, context=tls.client_context(), timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_kms_doubles_refuse_wrong_shapes(tls: Tls, tmp_path: Path, library_shapes: dict[str, Any]) -> None:
    g, a = _start_gcp(tls, tmp_path), _start_azure(tls, library_shapes)
    try:
        double, account = g.double, g.double.account
        now = int(time.time())
        jwt = account.sign_jwt(
            {
                "iss": account.email,
                "sub": account.email,
                "iat": now,
                "exp": now + 600,
                "scope": CONTRACT["gcp"]["scope"],
            }
        )
        headers = {
            "Authorization": f"Bearer {jwt}",
            "x-goog-request-params": f"name={g.audit}",
            "x-goog-api-client": "gl-python/3.11 gapic/3.18.0",
            "Content-Type": "application/json",
        }
        url = f"{double.url}/v1/{g.audit}:asymmetricSign?%24alt=json%3Benum-encoding%3Dint"
        digest = hashlib.sha256(b"checkpoint").digest()
        b64_digest = base64.b64encode(digest).decode()
        good: dict[str, Any] = {"digest": {"sha256": b64_digest}, "digestCrc32c": str(crc32c_bitwise(digest))}
        status, body = _call(tls, url, method="POST", headers=headers, body=json.dumps(good).encode())
        assert status == 200 and body["verifiedDigestCrc32c"] is True
        _verify_p256(public_der(double.keys[g.audit].private_key), b"checkpoint", base64.b64decode(body["signature"]))
        assert double.wrong_shapes() == []
        wrong = [
            {**good, "digestCrc32c": str(crc32c_bitwise(digest) ^ 1)},  # a digest damaged on the way
            {"digest": good["digest"]},  # no CRC32C
            {"data": base64.b64encode(b"checkpoint").decode(), "digestCrc32c": good["digestCrc32c"]},
            {**good, "digest": {"sha512": b64_digest}},
        ]
        for payload in wrong:
            status, body = _call(tls, url, method="POST", headers=headers, body=json.dumps(payload).encode())
            assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT"), payload
        status, _ = _call(tls, url, method="POST", headers={**headers, "x-goog-request-params": "name=x"}, body=b"{}")
        assert status == 400
        status, body = _call(tls, url, method="POST", headers={**headers, "Authorization": "Bearer forged"}, body=b"{}")
        assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED")
        assert len(double.wrong_shapes()) == len(wrong) + 1
        pem_url = f"{double.url}/v1/{g.audit}/publicKey?%24alt=json%3Benum-encoding%3Dint"
        status, body = _call(tls, pem_url, headers=headers)
        assert status == 200 and body["pem"] == public_pem(double.keys[g.audit].private_key)
        assert body["pemCrc32c"] == str(crc32c_bitwise(body["pem"].encode()))

        # Key Vault: a token from the double's Entra ID, then the sign request the SDK builds.
        form = urllib.parse.urlencode(
            {
                "client_id": a.double.client_id,
                "client_secret": CLIENT_SECRET,
                "grant_type": "client_credentials",
                "scope": CONTRACT["azure"]["scope"],
            }
        ).encode()
        status, body = _call(
            tls,
            f"{a.double.url}/{a.double.tenant_id}/oauth2/v2.0/token",
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body=form,
        )
        assert status == 200
        version = a.double.keys["audit"].versions[0][0]
        kv = {
            "Authorization": f"Bearer {body['access_token']}",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": "azsdk-python-keyvault-keys/4.11.3 Python/3.11",
        }
        api = library_shapes["azure"]["default_api_version"]
        sign_url = f"{a.double.url}/keys/audit/{version}/sign?api-version={api}"
        ok = {"alg": "ES256", "value": b64url(digest)}
        status, body = _call(tls, sign_url, method="POST", headers=kv, body=json.dumps(ok).encode())
        assert status == 200
        raw = b64url_decode_strict(body["value"])
        assert raw is not None and len(raw) == 64
        assert a.double.wrong_shapes() == []
        bad: list[tuple[str, dict[str, str], dict[str, str]]] = [
            (sign_url, kv, {"alg": "ES384", "value": b64url(digest)}),
            (sign_url, kv, {"alg": "ES256", "value": base64.urlsafe_b64encode(digest).decode()}),  # padded
            (sign_url, kv, {"alg": "ES256", "value": b64url(b"checkpoint")}),  # not a digest
            (sign_url, {k: v for k, v in kv.items() if k != "User-Agent"}, ok),
            (sign_url.replace(api, "1999-01-01"), kv, ok),
        ]
        for target, hdrs, payload in bad:
            status, body = _call(tls, target, method="POST", headers=hdrs, body=json.dumps(payload).encode())
            assert (status, body["error"]["code"]) == (400, "BadParameter"), payload
        assert len(a.double.wrong_shapes()) == len(bad)
    finally:
        g.double.stop()
        a.double.stop()


# ---------------------------------------------------------------------------------------------------
# Pure parts of the provider modules (these import the SDKs into the test process, which is fine here)


def test_pure_parts_of_the_modules(library_shapes: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from faramesh.engine.providers import azure as az
    from faramesh.engine.providers import gcp as gc
    from faramesh.engine.providers.protocol import ProviderError

    key = "projects/p-1/locations/europe-west1/keyRings/audit/cryptoKeys/checkpoints"
    assert gc.key_version_name(f"{key}/cryptoKeyVersions/3", None) == f"{key}/cryptoKeyVersions/3"
    assert gc.key_version_name(key, "3") == f"{key}/cryptoKeyVersions/3"
    assert gc.key_version_name(f"{key}/cryptoKeyVersions/3", "3") == f"{key}/cryptoKeyVersions/3"
    for name, version in (
        (key, None),  # asymmetric keys have no primary version
        (f"{key}/cryptoKeyVersions/3", "4"),
        (f"{key}/cryptoKeyVersions/0", None),
        (f"{key}/cryptoKeyVersions/../1", None),
        (key.replace("keyRings", "rings"), "1"),
        (key.replace("audit", "a b"), "1"),
        (f"/{key}", "1"),
        (key + "/x", "1"),
        ("checkpoints", "1"),
    ):
        with pytest.raises(ValueError):
            gc.key_version_name(name, version)

    p256 = ec.generate_private_key(ec.SECP256R1())
    pem = public_pem(p256)
    name = f"{key}/cryptoKeyVersions/1"
    assert gc.check_public_key(name, name, pem, gc.crc32c(pem.encode()), "EC_SIGN_P256_SHA256") == public_der(p256)
    problems: list[tuple[Any, ...]] = [
        (name + "0", pem, gc.crc32c(pem.encode()), "EC_SIGN_P256_SHA256", FailureCode.BACKEND),
        (name, pem, gc.crc32c(pem.encode()) ^ 1, "EC_SIGN_P256_SHA256", FailureCode.BACKEND),
        (name, pem, None, "EC_SIGN_P384_SHA384", FailureCode.UNSUPPORTED),
        (
            name,
            public_pem(ec.generate_private_key(ec.SECP384R1())),
            None,
            "EC_SIGN_P256_SHA256",
            FailureCode.UNSUPPORTED,
        ),
        (name, public_pem(rsa.generate_private_key(65537, 2048)), None, "EC_SIGN_P256_SHA256", FailureCode.UNSUPPORTED),
        (name, "not a pem", None, "EC_SIGN_P256_SHA256", FailureCode.UNSUPPORTED),
    ]
    for reply_name, text, checksum, algorithm, code in problems:
        with pytest.raises(ProviderError) as raised:
            gc.check_public_key(name, reply_name, text, checksum, algorithm)
        assert raised.value.code == code, (reply_name, algorithm)
    signature = b"\x30\x44" + os.urandom(68)
    assert gc.check_signature(name, name, signature, gc.crc32c(signature), True) == signature
    for args in (
        (name, signature, gc.crc32c(signature), False),  # KMS did not confirm the digest
        (name + "0", signature, gc.crc32c(signature), True),
        (name, signature, gc.crc32c(signature) ^ 1, True),
        (name, signature, None, True),
    ):
        with pytest.raises(ProviderError) as raised:
            gc.check_signature(name, *args)
        assert raised.value.code == FailureCode.BACKEND

    numbers = p256.public_key().public_numbers()
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    assert (
        az.ec_p256_spki("k", "EC", "P-256", x, y) == az.ec_p256_spki("k", "EC-HSM", "P-256", x, y) == public_der(p256)
    )
    for kty, crv, px, py, code in (
        ("RSA", None, None, None, FailureCode.UNSUPPORTED),
        ("EC", "P-384", x, y, FailureCode.UNSUPPORTED),
        ("EC", "P-256K", x, y, FailureCode.UNSUPPORTED),
        ("EC", "P-256", x[:31], y, FailureCode.BACKEND),
        ("EC", "P-256", x, bytes(32), FailureCode.BACKEND),  # not a point on the curve
    ):
        with pytest.raises(ProviderError) as raised:
            az.ec_p256_spki("k", kty, crv, px, py)
        assert raised.value.code == code, (kty, crv)
    der = p256.sign(b"m", ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    assert az.der_signature("k", r.to_bytes(32, "big") + s.to_bytes(32, "big")) == der
    _verify_p256(public_der(p256), b"m", az.der_signature("k", r.to_bytes(32, "big") + s.to_bytes(32, "big")))
    with pytest.raises(ProviderError):
        az.der_signature("k", der)  # DER is not what Key Vault returns
    az.check_key_names("audit-key", "0" * 32)
    for key_name, key_version in (("a_b", None), ("a/b", None), ("ok", "a/b"), ("ok", "..")):
        with pytest.raises(ProviderError) as raised:
            az.check_key_names(key_name, key_version)
        assert raised.value.code == FailureCode.CONFIG
