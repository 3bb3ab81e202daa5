"""Providers as supervised children of the engine, against real backends on loopback.

Session fixtures start an OpenBao dev server (`bao server -dev`) and a moto_server (AWS KMS, Secrets
Manager, STS) on free loopback ports; the test process seeds them through hvac and boto3. The engine
side (ProviderHost) talks to them only through its provider children.

What is checked: secrets from Vault KV v2 (token, AppRole, a namespace, the seed's `kv/data/payments`
mount) and from Secrets Manager; signatures from Vault Transit (ed25519, ecdsa-p256), AWS KMS (P-256)
and the local signer, verified with `cryptography` against the fetched public key; a killed child is
restarted and calls during the outage fail typed and at once; a stopped (SIGSTOP) child makes calls
time out and is replaced; Vault stopped → DOWN with the last error; a wrong token → PROVIDER_AUTH with
the token nowhere in errors, status or logs; a sentinel secret never reaches the host's logs; secrets
never reach a child's argv or environment; the engine-side import pulls in no SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from backends import bao_server
from backends import free_port as _free_port
from backends import require as _require
from backends import stop as _stop
from backends import wait_http as _wait_http
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.model import policy_from_json
from faramesh.engine.policy.parser import parse_fpl
from faramesh.engine.providers.host import (
    Backoff,
    CheckpointSigner,
    ProviderHost,
    RemoteSigner,
    SigningUnavailable,
    child_ambient,
    child_environment,
    resolve_config,
)
from faramesh.engine.providers.protocol import (
    CREDENTIAL_UNAVAILABLE,
    MAX_FRAME,
    FailureCode,
    Health,
    ProtocolError,
    ProviderFailure,
    PublicKeyResult,
    Redactor,
    SecretRef,
    SecretResult,
    SecretValue,
    SignResult,
    encode_frame,
    hosted,
    parse_secret_ref,
    recv_frame,
)
from faramesh.engine.providers.signing import ECDSA_P256_SHA256, ED25519, fingerprint, verify, verify_checkpoint
from faramesh.engine.providers.vault import parse_kv_mount
from faramesh.engine.wal.signer import checkpoint_message, load_or_create_signer, verify_signature

VENV_BIN = Path(sys.executable).parent
SENTINEL = "SENTINEL-" + secrets.token_hex(12)  # planted in Vault: must appear only where delivered
AWS_SENTINEL = "AWS-SENTINEL-" + secrets.token_hex(12)
AWS_SECRET_KEY = "aws-secret-" + secrets.token_hex(16)  # the engine's AWS secret key: never in argv/env/logs
WAIT = 60.0  # an upper bound that keeps a broken test from hanging; no assertion depends on it


@dataclass(frozen=True)
class VaultFixture:
    addr: str
    root_token: str
    approle_role_id: str
    approle_secret_id: str
    limited_token: str


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultFixture]:
    hvac = pytest.importorskip("hvac") if os.environ.get("CI") != "true" else __import__("hvac")
    with bao_server(tmp_path_factory.mktemp("bao")) as bao:
        root = hvac.Client(url=bao.addr, token=bao.root_token)
        # The seed's shape: namespace "platform", KV v2 at "kv", secrets under "payments/".
        root.sys.create_namespace(path="platform")
        ns = hvac.Client(url=bao.addr, token=bao.root_token, namespace="platform")
        ns.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        ns.secrets.kv.v2.create_or_update_secret(
            path="payments/stripe", secret={"api_key": SENTINEL, "account": "acct_1"}, mount_point="kv"
        )
        kv = root.secrets.kv.v2
        kv.create_or_update_secret(path="approle/db", secret={"password": "approle-" + SENTINEL}, mount_point="secret")
        kv.create_or_update_secret(path="versioned", secret={"v": "one"}, mount_point="secret")
        kv.create_or_update_secret(path="versioned", secret={"v": "two"}, mount_point="secret")
        kv.create_or_update_secret(path="other/x", secret={"k": "forbidden"}, mount_point="secret")
        root.sys.create_or_update_policy(
            name="approle-read", policy='path "secret/data/approle/*" { capabilities = ["read"] }'
        )
        root.sys.create_or_update_policy(
            name="allowed-only", policy='path "secret/data/allowed/*" { capabilities = ["read"] }'
        )
        root.sys.enable_auth_method("approle")
        root.auth.approle.create_or_update_approle(
            role_name="faramesh", token_policies=["approle-read"], token_ttl="1h"
        )
        role_id = root.auth.approle.read_role_id(role_name="faramesh")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(role_name="faramesh")["data"]["secret_id"]
        limited = root.auth.token.create(policies=["allowed-only"], ttl="1h")["auth"]["client_token"]
        root.sys.enable_secrets_engine("transit", path="transit")
        root.secrets.transit.create_key(name="ckpt-ed25519", key_type="ed25519")
        root.secrets.transit.create_key(name="ckpt-p256", key_type="ecdsa-p256")
        root.secrets.transit.create_key(name="rotating", key_type="ed25519")
        yield VaultFixture(bao.addr, bao.root_token, role_id, secret_id, limited)


@dataclass(frozen=True)
class AwsFixture:
    endpoint: str
    kms_key_arn: str
    rsa_key_arn: str


def _boto(service: Literal["kms", "secretsmanager"], endpoint: str) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-west-2",
        aws_access_key_id="testing",
        aws_secret_access_key=AWS_SECRET_KEY,
    )


@pytest.fixture(scope="session")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsFixture]:
    binary = VENV_BIN / "moto_server"
    _require(binary)
    tmp = tmp_path_factory.mktemp("moto")
    port = _free_port()
    log = (tmp / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.defpath, "HOME": str(tmp), "LANG": "C.UTF-8"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", proc, "moto_server")
        sm = _boto("secretsmanager", endpoint)
        sm.create_secret(Name="prod/stripe", SecretString=json.dumps({"api_key": AWS_SENTINEL}))
        sm.create_secret(Name="plain-token", SecretString="plain-" + AWS_SENTINEL)
        kms = _boto("kms", endpoint)
        key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
        rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
        yield AwsFixture(endpoint, key, rsa)
    finally:
        _stop(proc)
        log.close()


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


def _aws_env(aws: AwsFixture) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        # The SDK must never fall back to instance metadata in a test (no packet to 169.254.169.254).
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": aws.endpoint,  # STS for `role_arn`
    }


@contextlib.contextmanager
def running(
    providers: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str], **kwargs: Any
) -> Iterator[tuple[ProviderHost, Logs]]:
    logs = Logs()
    host = ProviderHost(providers, environ, log=logs, **kwargs)
    host.start()
    try:
        assert host.wait_settled(WAIT)
        yield host, logs
    finally:
        host.close()


def _ok(result: Any, kind: type) -> Any:
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result}"
    return result


def _verify_with_cryptography(algorithm: str, der: bytes, message: bytes, signature: bytes) -> None:
    """Independent of signing.verify: raises InvalidSignature when the signature is wrong."""
    key = serialization.load_der_public_key(der)
    if algorithm == ED25519:
        assert isinstance(key, Ed25519PublicKey)
        key.verify(signature, message)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------------------------------------------
# The shared host: one child per provider type, against the session's servers


@pytest.fixture(scope="module")
def shared(vault: VaultFixture, aws: AwsFixture) -> Iterator[tuple[ProviderHost, Logs]]:
    v = {"addr": vault.addr, "token": {"$env": "VAULT_TOKEN"}}
    providers: dict[str, dict[str, Any]] = {
        "vault": {"type": "vault", **v, "mount": "kv/data/payments", "namespace": "platform"},
        "vault-root": {"type": "vault", **v},
        "vault-approle": {
            "type": "vault",
            "addr": vault.addr,
            "auth_method": "approle",
            "role_id": vault.approle_role_id,
            "secret_id": {"$env": "VAULT_SECRET_ID"},
        },
        "vault-limited": {"type": "vault", "addr": vault.addr, "token": {"$env": "VAULT_LIMITED_TOKEN"}},
        "transit-ed": {"type": "kms", "backend": "vault-transit", **v, "key_name": "ckpt-ed25519"},
        "transit-p256": {"type": "kms", "backend": "vault-transit", **v, "key_name": "ckpt-p256"},
        "aws-secrets": {"type": "aws-secrets-manager", "region": "us-west-2", "endpoint_url": aws.endpoint},
        "aws-role": {
            "type": "aws-secrets-manager",
            "region": "us-west-2",
            "endpoint_url": aws.endpoint,
            "role_arn": "arn:aws:iam::123456789012:role/faramesh-broker",
            "secret_prefix": "prod/",
        },
        "audit-kms": {"type": "kms", "backend": "aws-kms", "key_arn": aws.kms_key_arn, "endpoint_url": aws.endpoint},
        "local-kms": {"type": "kms", "backend": "local"},
    }
    environ = {
        "PATH": os.environ.get("PATH", os.defpath),
        "VAULT_TOKEN": vault.root_token,
        "VAULT_SECRET_ID": vault.approle_secret_id,
        "VAULT_LIMITED_TOKEN": vault.limited_token,
        **_aws_env(aws),
    }
    with running(providers, environ) as pair:
        yield pair


def test_every_provider_starts_healthy(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    rows = {s.name: s for s in host.status()}
    assert {n: str(s.health) for n, s in rows.items()} == {n: "HEALTHY" for n in rows}
    assert all(s.pid is not None and s.pid != os.getpid() for s in rows.values())
    assert len({s.pid for s in rows.values()}) == len(rows)  # one child each


def test_vault_kv_v2_token_in_a_namespace_with_the_seeds_mount(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    got = _ok(host.get_secret("vault", "stripe", field="api_key"), SecretResult)
    assert got.value.reveal() == SENTINEL and got.version == "1"
    whole = _ok(host.get_secret_ref(parse_secret_ref("vault:stripe")), SecretResult)
    assert whole.value.reveal() == {"api_key": SENTINEL, "account": "acct_1"}
    # Names are relative to the mount's path prefix: the same secret by its full path is not there.
    missing = _ok(host.get_secret("vault", "payments/stripe"), ProviderFailure)
    assert missing.code == FailureCode.NOT_FOUND and missing.pipeline_code == CREDENTIAL_UNAVAILABLE


def test_vault_kv_versions_and_missing_fields(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    assert _ok(host.get_secret("vault-root", "versioned", field="v"), SecretResult).value.reveal() == "two"
    old = _ok(host.get_secret("vault-root", "versioned", field="v", version="1"), SecretResult)
    assert (old.value.reveal(), old.version) == ("one", "1")
    nofield = _ok(host.get_secret("vault", "stripe", field="password"), ProviderFailure)
    assert nofield.code == FailureCode.NOT_FOUND
    assert "api_key" in nofield.message and SENTINEL not in str(nofield)  # names fields, never values
    # A request-scoped failure says nothing about the provider's health.
    assert host.status_of("vault").health == Health.HEALTHY  # type: ignore[union-attr]


def test_vault_kv_v2_approle(shared: tuple[ProviderHost, Logs], vault: VaultFixture) -> None:
    host, logs = shared
    got = _ok(host.get_secret("vault-approle", "approle/db", field="password"), SecretResult)
    assert got.value.reveal() == "approle-" + SENTINEL
    # The AppRole token may read approle/* only: anything else is denied by policy, not an auth failure.
    denied = _ok(host.get_secret("vault-approle", "versioned"), ProviderFailure)
    assert denied.code == FailureCode.DENIED
    assert vault.approle_secret_id not in logs.text() + str(denied)


def test_vault_policy_denial_is_not_an_auth_failure(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    denied = _ok(host.get_secret("vault-limited", "other/x", field="k"), ProviderFailure)
    assert denied.code == FailureCode.DENIED and denied.pipeline_code == CREDENTIAL_UNAVAILABLE
    assert "forbidden" not in denied.message  # the value of other/x
    assert host.status_of("vault-limited").health == Health.HEALTHY  # type: ignore[union-attr]


def test_secrets_manager(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    got = _ok(host.get_secret("aws-secrets", "prod/stripe", field="api_key"), SecretResult)
    assert got.value.reveal() == AWS_SENTINEL and got.version
    plain = _ok(host.get_secret("aws-secrets", "plain-token"), SecretResult)
    assert plain.value.reveal() == "plain-" + AWS_SENTINEL
    nofield = _ok(host.get_secret("aws-secrets", "plain-token", field="x"), ProviderFailure)
    assert nofield.code == FailureCode.BAD_REQUEST and AWS_SENTINEL not in str(nofield)
    missing = _ok(host.get_secret("aws-secrets", "nope"), ProviderFailure)
    assert missing.code == FailureCode.NOT_FOUND and missing.pipeline_code == CREDENTIAL_UNAVAILABLE


def test_secrets_manager_through_an_assumed_role_and_a_prefix(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    got = _ok(host.get_secret("aws-role", "stripe", field="api_key"), SecretResult)
    assert got.value.reveal() == AWS_SENTINEL


@pytest.mark.parametrize(
    ("provider", "algorithm"),
    [
        ("transit-ed", ED25519),
        ("transit-p256", ECDSA_P256_SHA256),
        ("audit-kms", ECDSA_P256_SHA256),
        ("local-kms", ED25519),
    ],
)
def test_sign_a_digest_and_verify_against_the_fetched_public_key(
    shared: tuple[ProviderHost, Logs], provider: str, algorithm: str
) -> None:
    host, _ = shared
    digest = hashlib.sha256(b"faramesh.checkpoint/v1 chain 42 head").digest()
    public = _ok(host.get_public_key(provider), PublicKeyResult)
    assert public.algorithm == algorithm
    signed = _ok(host.sign(provider, digest), SignResult)
    assert (signed.key_id, signed.algorithm) == (public.key_id, algorithm)
    _verify_with_cryptography(algorithm, public.der, digest, signed.signature)
    assert verify(algorithm, public.der, digest, signed.signature)
    # A signature covers exactly its message, under exactly its key.
    with pytest.raises(InvalidSignature):
        _verify_with_cryptography(algorithm, public.der, digest[:-1] + b"\x00", signed.signature)
    assert not verify(algorithm, public.der, digest[::-1], signed.signature)
    other = ED25519 if algorithm == ECDSA_P256_SHA256 else ECDSA_P256_SHA256
    assert not verify(other, public.der, digest, signed.signature)
    # The key can be fetched again by the id the signature names (pinning by key id).
    again = _ok(host.get_public_key(provider, signed.key_id), PublicKeyResult)
    assert again.der == public.der and again.fingerprint == fingerprint(public.der)
    assert public.fingerprint.startswith("ed25519:" if algorithm == ED25519 else "ecdsa-p256:")


def test_aws_kms_key_type_comes_from_the_der(shared: tuple[ProviderHost, Logs], aws: AwsFixture) -> None:
    host, _ = shared
    # moto's GetPublicKey omits KeySpec: the algorithm is what the DER says.
    assert "KeySpec" not in _boto("kms", aws.endpoint).get_public_key(KeyId=aws.kms_key_arn)
    public = _ok(host.get_public_key("audit-kms"), PublicKeyResult)
    assert public.key_id == f"aws-kms:{aws.kms_key_arn}" and public.algorithm == ECDSA_P256_SHA256
    wrong = _ok(host.get_public_key("audit-kms", "aws-kms:arn:aws:kms:us-west-2:1:key/other"), ProviderFailure)
    assert wrong.code == FailureCode.NOT_FOUND


def test_remote_signer_pins_the_key_and_refuses_a_rotated_one(vault: VaultFixture) -> None:
    import hvac

    with running(
        {
            "t": {
                "type": "kms",
                "backend": "vault-transit",
                "addr": vault.addr,
                "token": {"$env": "T"},
                "key_name": "rotating",
            }
        },
        {"T": vault.root_token},
    ) as (h, _logs):
        signer = RemoteSigner(h, "t")
        pinned = _ok(signer.pin(), PublicKeyResult)
        assert pinned.key_id.endswith("/rotating#1")
        first = _ok(signer.sign(b"checkpoint 1"), SignResult)
        assert verify(pinned.algorithm, pinned.der, b"checkpoint 1", first.signature)
        hvac.Client(url=vault.addr, token=vault.root_token).secrets.transit.rotate_key(name="rotating")
        mismatch = _ok(signer.sign(b"checkpoint 2"), ProviderFailure)
        assert mismatch.code == FailureCode.KEY_MISMATCH and "rotating#2" in mismatch.message
        assert signer.pinned is pinned


@pytest.mark.parametrize("provider", ["transit-ed", "transit-p256", "audit-kms", "local-kms"])
def test_checkpoint_signer_for_the_wal(shared: tuple[ProviderHost, Logs], provider: str) -> None:
    host, _ = shared
    signer = _ok(CheckpointSigner.connect(host, provider), CheckpointSigner)
    message = checkpoint_message("01JCHAIN", 1000, "ab" * 32)
    signature = signer.sign(message)
    assert verify_checkpoint(signer.fingerprint, signer.public_b64, message, signature)
    assert not verify_checkpoint(signer.fingerprint, signer.public_b64, message + b"x", signature)
    if signer.algorithm == ED25519:
        # Same stored form as a local checkpoint: the WAL's existing verifier accepts it unchanged.
        assert verify_signature(signer.public_b64, message, signature)
    # A stored key that does not match its fingerprint is refused, however good the signature.
    other = _ok(
        CheckpointSigner.connect(host, "transit-ed" if provider != "transit-ed" else "local-kms"), CheckpointSigner
    )
    assert not verify_checkpoint(signer.fingerprint, other.public_b64, message, signature)


def test_checkpoint_signer_raises_typed_when_the_kms_is_gone(tmp_path: Path) -> None:
    key_file = tmp_path / "ckpt.key"
    gate = Gate()
    with running({"k": {"type": "kms", "backend": "local", "key_file": str(key_file)}}, {}, restart_wait=gate) as (
        host,
        _,
    ):
        signer = _ok(CheckpointSigner.connect(host, "k"), CheckpointSigner)
        # The provider child holds the same key the engine's LocalSigner would load: same fingerprint.
        assert signer.fingerprint == load_or_create_signer(key_file).fingerprint
        pid = _pid(host, "k")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert host.wait_for(lambda h: h.status_of("k").health == Health.DOWN, WAIT)  # type: ignore[union-attr]
        with pytest.raises(SigningUnavailable) as raised:
            signer.sign(b"checkpoint")
        assert raised.value.failure.code == FailureCode.DOWN
        gate.open.set()
        assert host.wait_for(lambda h: h.status_of("k").health == Health.HEALTHY, WAIT)  # type: ignore[union-attr]
        assert verify_checkpoint(signer.fingerprint, signer.public_b64, b"checkpoint", signer.sign(b"checkpoint"))


def test_unsupported_kms_key_is_refused(aws: AwsFixture) -> None:
    with running(
        {"rsa": {"type": "kms", "backend": "aws-kms", "key_arn": aws.rsa_key_arn, "endpoint_url": aws.endpoint}},
        _aws_env(aws),
    ) as (host, _):
        failure = _ok(host.sign("rsa", b"m"), ProviderFailure)
        assert failure.code == FailureCode.UNSUPPORTED and "P-256" in failure.message


def test_async_call_from_an_event_loop(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                host.acall("vault", "get_secret", {"name": "stripe", "field": "account"}),
                host.acall("aws-secrets", "get_secret", {"name": "prod/stripe", "field": "api_key"}),
                host.acall("nobody", "health"),
            )
        )

    vault_result, aws_result, unknown = asyncio.run(main())
    assert _ok(vault_result, SecretResult).value.reveal() == "acct_1"
    assert _ok(aws_result, SecretResult).value.reveal() == AWS_SENTINEL
    assert _ok(unknown, ProviderFailure).code == FailureCode.CONFIG


def test_secrets_never_reach_a_childs_argv_or_environment(
    shared: tuple[ProviderHost, Logs], vault: VaultFixture
) -> None:
    host, _ = shared
    needles = [vault.root_token, vault.approle_secret_id, vault.limited_token, AWS_SECRET_KEY]
    for status in host.status():
        assert status.pid is not None
        blob = Path(f"/proc/{status.pid}/cmdline").read_bytes() + Path(f"/proc/{status.pid}/environ").read_bytes()
        assert b"faramesh.engine.providers.child" in blob  # we are looking at the right process
        for needle in needles:
            assert needle.encode() not in blob, f"{status.name}: a secret is in the child's argv or environment"


def test_compiled_stack_to_running_provider(vault: VaultFixture) -> None:
    """The seed's provider block, through the compiler, the JSON artifact and the host."""
    src = """
provider "vault" {
  type = "vault"
  addr = env("VAULT_ADDR")
  token = env("VAULT_TOKEN")
  mount = "kv/data/payments"
  namespace = "platform"
  timeout = "4s"
}
provider "splunk" {
  type = "splunk-sink"
  url = "http://127.0.0.1:9/services/collector"
  token = env("SPLUNK_HEC_TOKEN")
}
"""
    env = {"VAULT_ADDR": vault.addr, "VAULT_TOKEN": vault.root_token, "SPLUNK_HEC_TOKEN": "hec-token-xyz"}
    policy = compile_files(parse_fpl(src), {"governance.fms": hashlib.sha256(src.encode()).hexdigest()}, (), env)
    artifact = policy.to_json()
    assert vault.root_token.encode() not in artifact
    installed = policy_from_json(artifact)
    providers = hosted(installed.providers)
    assert set(providers) == {"vault"}  # sinks are not run by this host
    with running(providers, env) as (host, _):
        got = _ok(host.get_secret("vault", "stripe", field="api_key"), SecretResult)
        assert got.value.reveal() == SENTINEL


# ---------------------------------------------------------------------------------------------------
# Failure: crash, hang, backend down, bad credentials, bad configuration


class Gate:
    """restart_wait for tests: the restart happens when the test says so, not after a delay."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.delays: list[float] = []

    def __call__(self, name: str, delay: float, stop: threading.Event) -> None:
        self.delays.append(delay)
        while not (self.open.is_set() or stop.is_set()):
            self.open.wait(0.05)


def _pid(host: ProviderHost, name: str) -> int | None:
    status = host.status_of(name)
    assert status is not None
    return status.pid


def test_killed_child_is_restarted_and_calls_meanwhile_fail_typed(vault: VaultFixture) -> None:
    gate = Gate()
    providers = {
        "vault": {
            "type": "vault",
            "addr": vault.addr,
            "token": {"$env": "T"},
            "namespace": "platform",
            "mount": "kv/data/payments",
        }
    }
    with running(providers, {"T": vault.root_token}, restart_wait=gate) as (host, logs):
        assert _ok(host.get_secret("vault", "stripe", field="api_key"), SecretResult).value.reveal() == SENTINEL
        first = _pid(host, "vault")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert host.wait_for(lambda h: h.status_of("vault").health == Health.DOWN, WAIT)  # type: ignore[union-attr]
        # The outage: the restart waits for the gate, so every call now must fail, typed, at once.
        during = _ok(host.get_secret("vault", "stripe", field="api_key", timeout=30), ProviderFailure)
        assert during.code == FailureCode.DOWN and during.pipeline_code == CREDENTIAL_UNAVAILABLE
        assert "SIGKILL" in during.message
        status = host.status_of("vault")
        assert status is not None and status.pid is None and "restart 1" in (status.last_error or "")
        gate.open.set()
        assert host.wait_for(lambda h: h.status_of("vault").health == Health.HEALTHY, WAIT)  # type: ignore[union-attr]
        after = _ok(host.get_secret("vault", "stripe", field="api_key"), SecretResult)
        assert after.value.reveal() == SENTINEL
        second = _pid(host, "vault")
        assert second not in (None, first) and host.status_of("vault").restarts == 1  # type: ignore[union-attr]
        assert gate.delays == [Backoff().initial]
        assert "killed by SIGKILL" in logs.text() and SENTINEL not in logs.text()


def test_hung_child_times_out_then_is_replaced(tmp_path: Path) -> None:
    providers = {"k": {"type": "kms", "backend": "local", "key_file": str(tmp_path / "k.key"), "timeout": 1}}
    with running(providers, {}, health_interval=0.2, backoff=Backoff(initial=0.05)) as (host, logs):
        before = _ok(host.get_public_key("k"), PublicKeyResult)
        stuck = _pid(host, "k")
        assert stuck is not None
        os.kill(stuck, signal.SIGSTOP)
        try:
            late = _ok(host.sign("k", b"m", timeout=0.3), ProviderFailure)
            assert late.code == FailureCode.TIMEOUT and late.retryable
            # Three missed health checks: the host kills the stopped child and starts another.
            assert host.wait_for(lambda h: _pid(h, "k") not in (None, stuck), WAIT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)
        assert 'provider "k": DEGRADED (PROVIDER_TIMEOUT: no answer within 0.3 s)' in logs.text()
        assert "missed 3 health checks" in logs.text()
        after = _ok(host.get_public_key("k"), PublicKeyResult)
        assert after.der == before.der  # the key file outlived the child
        signed = _ok(host.sign("k", b"m"), SignResult)
        _verify_with_cryptography(ED25519, after.der, b"m", signed.signature)


def test_backend_that_never_answers_times_out() -> None:
    """A loopback listener that accepts (through its backlog) and never replies: calls end in
    PROVIDER_TIMEOUT, from the child's own SDK timeout or the host's deadline, never a hang."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        addr = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        providers = {"vault": {"type": "vault", "addr": addr, "token": {"$env": "T"}, "timeout": 1}}
        with running(providers, {"T": "t-" + secrets.token_hex(8)}) as (host, _):
            failure = _ok(host.get_secret("vault", "s"), ProviderFailure)
            assert failure.code == FailureCode.TIMEOUT and failure.retryable
            assert failure.pipeline_code == CREDENTIAL_UNAVAILABLE
            status = host.status_of("vault")
            assert status is not None and status.health != Health.HEALTHY
            assert (status.last_error or "").startswith(FailureCode.TIMEOUT)


def test_vault_stopped_is_down_with_the_last_error(tmp_path: Path) -> None:
    import hvac

    with bao_server(tmp_path) as bao:
        hvac.Client(url=bao.addr, token=bao.root_token).secrets.kv.v2.create_or_update_secret(
            path="s", secret={"k": "v"}, mount_point="secret"
        )
        providers = {"vault": {"type": "vault", "addr": bao.addr, "token": {"$env": "T"}, "timeout": 2}}
        with running(providers, {"T": bao.root_token}) as (host, logs):
            assert host.status_of("vault").health == Health.HEALTHY  # type: ignore[union-attr]
            _stop(bao.proc)
            status = host.probe("vault")
            assert status is not None and status.health == Health.DOWN
            assert status.last_error is not None and status.last_error.startswith(FailureCode.UNREACHABLE)
            assert f"cannot reach Vault at {bao.addr}" in status.last_error
            failed = _ok(host.get_secret("vault", "s", field="k"), ProviderFailure)
            assert failed.code == FailureCode.UNREACHABLE and failed.pipeline_code == CREDENTIAL_UNAVAILABLE
            assert "DOWN" in logs.text() and bao.root_token not in logs.text() + status.last_error


def test_wrong_token_is_an_auth_failure_that_never_shows_the_token(vault: VaultFixture) -> None:
    wrong = "hvs." + secrets.token_urlsafe(24)
    providers = {
        "vault": {"type": "vault", "addr": vault.addr, "token": {"$env": "WRONG"}},
        "transit": {
            "type": "kms",
            "backend": "vault-transit",
            "addr": vault.addr,
            "token": {"$env": "WRONG"},
            "key_name": "ckpt-p256",
        },
        "approle": {
            "type": "vault",
            "addr": vault.addr,
            "role_id": vault.approle_role_id,
            "secret_id": {"$env": "BAD_SECRET_ID"},
        },
    }
    bad_secret_id = "bad-secret-id-" + secrets.token_hex(8)
    with running(providers, {"WRONG": wrong, "BAD_SECRET_ID": bad_secret_id}) as (host, logs):
        failures = [
            _ok(host.get_secret("vault", "anything"), ProviderFailure),
            _ok(host.sign("transit", b"m"), ProviderFailure),
            _ok(host.get_secret("approle", "approle/db"), ProviderFailure),
        ]
        assert [f.code for f in failures] == [FailureCode.AUTH] * 3
        assert all(f.pipeline_code == CREDENTIAL_UNAVAILABLE and not f.retryable for f in failures)
        statuses = host.status()
        assert all(s.health == Health.DOWN and (s.last_error or "").startswith(FailureCode.AUTH) for s in statuses)
        seen = logs.text() + "".join(str(f) for f in failures) + json.dumps([s.to_dict() for s in statuses])
        assert "refused the token" in seen and "AppRole" in seen  # the errors are there …
        assert wrong not in seen and bad_secret_id not in seen  # … the credentials are not


def test_sentinel_never_reaches_the_hosts_logs_or_errors(vault: VaultFixture) -> None:
    gate = Gate()
    gate.open.set()
    providers = {
        "vault": {
            "type": "vault",
            "addr": vault.addr,
            "token": {"$env": "T"},
            "namespace": "platform",
            "mount": "kv/data/payments",
        }
    }
    with running(providers, {"T": vault.root_token}, restart_wait=gate) as (host, logs):
        texts: list[str] = []
        got = _ok(host.get_secret("vault", "stripe", field="api_key"), SecretResult)
        assert got.value.reveal() == SENTINEL  # it was delivered …
        texts += [repr(got), str(got.value)]
        whole = _ok(host.get_secret("vault", "stripe"), SecretResult)
        texts.append(repr(whole))
        for outcome in (
            host.get_secret("vault", "stripe", field="nope"),
            host.get_secret("vault", "stripe", version="99"),
            host.get_secret("vault", "stripe", version="x"),
            host.get_secret("vault", "../stripe"),
            host.sign("vault", b"m"),
        ):
            texts.append(str(_ok(outcome, ProviderFailure)))
        pid = _pid(host, "vault")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert host.wait_for(lambda h: _pid(h, "vault") not in (None, pid), WAIT)
        texts.append(json.dumps([s.to_dict() for s in host.status()]))
        assert len(logs.lines) >= 3  # the sink did capture the host's lines …
        everything = logs.text() + "\n".join(texts)
        assert SENTINEL not in everything and vault.root_token not in everything  # … and no secret


FAKE_CHILD = """
import json, socket, sys
from faramesh.engine.providers.protocol import encode_frame, recv_frame
fd = int(sys.argv[sys.argv.index("--fd") + 1])
sock = socket.socket(fileno=fd)
frame = recv_frame(sock)
print("configure frame:", json.dumps(frame), file=sys.stderr, flush=True)
token = frame["args"]["config"]["token"]
sock.sendall(encode_frame({"id": 1, "ok": False, "code": "PROVIDER_ERROR", "message": "cannot use " + token}))
sys.exit(3)
"""


def test_a_child_that_spills_its_secrets_is_redacted_by_the_host(tmp_path: Path) -> None:
    """A provider module that prints its configuration and echoes its token in an error: the host's
    logs and status carry neither, though both lines do arrive."""
    script = tmp_path / "leaky-python"
    script.write_text(f"#!{sys.executable}\n{FAKE_CHILD}")
    script.chmod(0o755)
    token = "hvs." + secrets.token_urlsafe(24) + "\n"  # as read from a file
    gate = Gate()
    providers = {"vault": {"type": "vault", "addr": "http://127.0.0.1:9", "token": {"$env": "T"}}}
    with running(providers, {"T": token}, python=str(script), restart_wait=gate) as (host, logs):
        assert host.wait_for(lambda h: "configure frame" in logs.text() and bool(gate.delays), WAIT)
        status = host.status_of("vault")
        assert status is not None and status.health == Health.DOWN
        assert "cannot use [REDACTED]" in (status.last_error or "")
        everything = logs.text() + json.dumps(status.to_dict())
        assert '"token": "[REDACTED]"' in everything  # the stderr line was relayed, redacted
        assert token.strip() not in everything


def test_missing_environment_variable_fails_closed_without_a_child() -> None:
    with running(
        {"vault": {"type": "vault", "addr": "http://127.0.0.1:9", "token": {"$env": "FARAMESH_TEST_UNSET"}}}, {}
    ) as (host, _):
        status = host.status_of("vault")
        assert status is not None and status.health == Health.DOWN and status.pid is None
        assert "FARAMESH_TEST_UNSET" in (status.last_error or "")
        failure = _ok(host.get_secret("vault", "x"), ProviderFailure)
        assert failure.code == FailureCode.CONFIG and failure.pipeline_code == CREDENTIAL_UNAVAILABLE


def test_bad_configuration_is_not_restarted_in_a_loop() -> None:
    providers = {
        "approle": {"type": "vault", "addr": "http://127.0.0.1:9", "auth_method": "approle", "role_id": "r"},
        "gcp": {"type": "gcp-secret-manager", "project": "p"},
        "kms": {"type": "kms", "backend": "azure-kv"},  # no key_name or vault_url: refused at configure
    }
    with running(providers, {}) as (host, _):
        rows = {s.name: s for s in host.status()}
        assert all(s.health == Health.DOWN and s.restarts == 0 for s in rows.values())
        assert "needs `role_id` and `secret_id`" in (rows["approle"].last_error or "")
        # gcp has a backend now: a block without its key file is a configuration error, not a restart loop
        assert (rows["gcp"].last_error or "").startswith(FailureCode.CONFIG), rows["gcp"].last_error
        assert "credentials_file" in (rows["gcp"].last_error or "")
        assert _ok(host.get_secret("approle", "x"), ProviderFailure).code == FailureCode.CONFIG
        assert "needs `key_name`" in (rows["kms"].last_error or "")
        assert _ok(host.sign("kms", b"m"), ProviderFailure).code == FailureCode.CONFIG


def test_crash_loop_backs_off_exponentially() -> None:
    """A child that dies at once (here: /bin/false as the interpreter) is restarted with growing delays."""
    delays: list[float] = []

    def record(name: str, delay: float, stop: threading.Event) -> None:
        delays.append(delay)
        if len(delays) >= 6:
            stop.wait()  # enough: wait for close()

    backoff = Backoff(initial=0.1, factor=2.0, maximum=1.0, crash_loop=4)
    host = ProviderHost(
        {"k": {"type": "kms", "backend": "local"}},
        {},
        python="/bin/false",
        backoff=backoff,
        restart_wait=record,
        log=Logs(),
    )
    host.start()
    try:
        assert host.wait_for(lambda h: len(delays) >= 6, WAIT)
        assert delays[:6] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        status = host.status_of("k")
        assert status is not None and status.health == Health.DOWN and "crash loop" in (status.last_error or "")
        assert _ok(host.sign("k", b"m"), ProviderFailure).code == FailureCode.DOWN
    finally:
        host.close()
    assert _ok(host.sign("k", b"m"), ProviderFailure).code == FailureCode.DOWN  # closed: still typed, no raise


def test_oversized_sign_request_is_refused_before_it_is_sent() -> None:
    with running({"k": {"type": "kms", "backend": "local"}}, {}) as (host, _):
        assert _ok(host.sign("k", b"x" * 5000), ProviderFailure).code == FailureCode.BAD_REQUEST
        assert _ok(host.get_secret("k", "x"), ProviderFailure).code == FailureCode.UNSUPPORTED
        assert _ok(host.emit("k", [{"id": "d1"}]), ProviderFailure).code == FailureCode.UNSUPPORTED
        unsendable = _ok(host.submit("k", "emit", {"records": [{"blob": b"\x00"}]}).result(), ProviderFailure)
        assert unsendable.code == FailureCode.BAD_REQUEST
        assert host.status_of("k").health == Health.HEALTHY  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------
# Pure parts


def test_engine_side_import_pulls_in_no_sdk() -> None:
    code = (
        "import sys, json, faramesh.engine.providers.host, faramesh.engine.providers.protocol;"
        "print(json.dumps(sorted(m for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = set(json.loads(out))
    assert "faramesh.engine.providers.host" in modules
    heavy = {m for m in modules if m.split(".")[0] in ("boto3", "botocore", "hvac", "requests", "urllib3")}
    assert heavy == set()


def test_frames_round_trip_and_malformed_frames_are_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame({"id": 3, "verb": "health", "args": {"x": [1, "é"]}}))
        assert recv_frame(b) == {"id": 3, "verb": "health", "args": {"x": [1, "é"]}}
        a.sendall((MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(ProtocolError, match="limit"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall((2).to_bytes(4, "big") + b"[]")
        with pytest.raises(ProtocolError, match="not a JSON object"):
            recv_frame(b)
        a.sendall((5).to_bytes(4, "big") + b"{")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="closed in the middle"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert recv_frame(b) is None
    with pytest.raises(ProtocolError):
        encode_frame({"v": "x" * (MAX_FRAME + 1)})


def test_redactor_removes_secrets_in_every_form() -> None:
    secret = 'p@ss/"w0rd"+' + secrets.token_hex(4)
    redact = Redactor([secret, "abc"])
    text = f"raw {secret} url {urllib.parse.quote(secret, safe='')} json {json.dumps(secret)[1:-1]} abc"
    cleaned = redact(text)
    assert secret not in cleaned and urllib.parse.quote(secret, safe="") not in cleaned
    assert json.dumps(secret)[1:-1] not in cleaned
    assert cleaned.count("[REDACTED]") == 3 and cleaned.endswith(" abc")  # 3-char values are not secrets
    assert Redactor()("header X-Vault-Token: hvs.CAESIabcdefghijklmnopqrstuvwxyz") == "header X-Vault-Token: [REDACTED]"
    assert "s.abcdefghijklmnopqrstuv" not in Redactor()("token s.abcdefghijklmnopqrstuv was refused")


def test_secret_refs() -> None:
    assert parse_secret_ref("vault:payments/stripe#api_key") == SecretRef("vault", "payments/stripe", "api_key")
    assert str(parse_secret_ref("aws-secrets:prod/db")) == "aws-secrets:prod/db"
    for bad in ("vault", "vault:", "vault:/abs", "vault:a/../b", "vault:a//b", "vault:a#", "va ult:x"):
        with pytest.raises(ValueError):
            parse_secret_ref(bad)


def test_config_resolution_and_child_environment() -> None:
    environ = {
        "TOK": "t-" + "x" * 10,
        "PATH": "/usr/bin",
        "HOME": "/root",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_REGION": "eu-west-1",
        "UNRELATED": "1",
    }
    resolved = resolve_config("v", {"type": "vault", "token": {"$env": "TOK"}, "tags": ("a",)}, environ)
    assert resolved.config == {"type": "vault", "token": environ["TOK"], "tags": ["a"]} and resolved.error is None
    assert resolved.secret_fields == ("token",)
    missing = resolve_config("v", {"token": {"$env": "NOPE"}, "other": {"$env": "TOK"}}, environ)
    assert missing.error is not None and "NOPE" in missing.error and environ["TOK"] not in missing.error
    aws_env = child_environment("faramesh.engine.providers.aws", environ)
    assert aws_env["AWS_REGION"] == "eu-west-1" and "UNRELATED" not in aws_env
    assert AWS_SECRET_KEY not in json.dumps(aws_env) and "AWS_ACCESS_KEY_ID" not in aws_env
    assert child_ambient("faramesh.engine.providers.aws", environ) == {
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        "AWS_ACCESS_KEY_ID": "AKIA",
    }
    assert child_ambient("faramesh.engine.providers.vault", environ) == {}
    assert "AWS_REGION" not in child_environment("faramesh.engine.providers.vault", environ)


def test_kv_mount_parsing_and_secret_value_masking() -> None:
    assert parse_kv_mount("kv/data/payments") == ("kv", "payments")
    assert parse_kv_mount("secret") == ("secret", "")
    assert parse_kv_mount(None) == ("secret", "")
    assert parse_kv_mount("/kv/data/") == ("kv", "")
    value = SecretValue(SENTINEL)
    assert SENTINEL not in repr(value) + str(value) + repr(SecretResult("p", "n", value, "1"))
    assert value.reveal() == SENTINEL


def test_backoff_schedule() -> None:
    b = Backoff(initial=0.2, factor=2.0, maximum=5.0)
    assert [b.delay(n) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
