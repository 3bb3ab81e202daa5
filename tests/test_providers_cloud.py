"""The `gcp-secret-manager` and `azure-key-vault` secret providers, through the real ProviderHost and its
children, against local HTTP doubles.

Neither Google Cloud Secret Manager nor Azure Key Vault has a server that runs locally, so these tests
do NOT talk to the real services. The official client libraries (google-cloud-secret-manager with its
REST transport and google-auth; azure-keyvault-secrets with azure-identity) run unmodified in the
provider child and talk HTTPS to the doubles in tests/cloud_doubles.py on 127.0.0.1. The doubles check
each request's path, query, auth header and body against the shapes those libraries build — captured by
`library_shapes` below from the libraries' own request builders, in a subprocess, and compared with the
doubles' contract — and answer a wrong shape with the service's error (recorded as a "wrong shape"), so a
test that gets its secret has also shown that the library sent what the real service expects. What the
doubles cannot show: the real services' authorisation models (IAM conditions, Key Vault access policies
versus RBAC), throttling, and anything that needs Google's or Microsoft's real keys.

TLS is real: the doubles serve a certificate from a throwaway CA, which only the provider children trust
(REQUESTS_CA_BUNDLE, passed through the host's `environ` to the child; the test process never sets it).

Until `protocol.backend_module` maps the two types (see `child_python`), the fixtures add the mapping in
the engine process and start children through a wrapper that adds it there too; everything else — the
host, the socketpair protocol, the child's dispatch — is the production code path.
"""

from __future__ import annotations

import contextlib
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
    GcpDouble,
    Request,
    ServiceAccount,
    Tls,
    crc32c_bitwise,
    make_tls,
    new_service_account,
)
from faramesh.engine.providers import protocol
from faramesh.engine.providers.host import ProviderHost
from faramesh.engine.providers.protocol import (
    CREDENTIAL_UNAVAILABLE,
    FailureCode,
    Health,
    HealthResult,
    ProviderFailure,
    SecretResult,
)

WAIT = 60.0  # an upper bound that keeps a broken test from hanging; no assertion depends on it
GCP_SENTINEL = "GCP-SENTINEL-" + secrets.token_hex(12)
AZURE_SENTINEL = "AZ-SENTINEL-" + secrets.token_hex(12)
CLIENT_SECRET = "az-client-secret~" + secrets.token_urlsafe(24)
GCP_MODULE = "faramesh.engine.providers.gcp"
AZURE_MODULE = "faramesh.engine.providers.azure"
CLOUD_MODULES = {"gcp-secret-manager": GCP_MODULE, "azure-key-vault": AZURE_MODULE}
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
from google.cloud.secretmanager_v1._compat import transcode_request
from google.cloud.secretmanager_v1.services.secret_manager_service.transports.base import (
    SecretManagerServiceTransport,
)
from google.cloud.secretmanager_v1.services.secret_manager_service.transports.rest_base import (
    _BaseSecretManagerServiceRestTransport as Rest,
)
from google.cloud.secretmanager_v1.types import service
from azure.keyvault.secrets._generated._operations._operations import (
    build_key_vault_get_secret_request,
    build_key_vault_get_secrets_request,
)
from azure.keyvault.secrets._shared.client_base import DEFAULT_VERSION, ApiVersion


def gcp(options, message, routing):
    transcoded, body, query = transcode_request(
        options, message, required_fields_default_values={}, rest_numeric_enums=True
    )
    return {
        "method": transcoded["method"].upper(),
        "uri": transcoded["uri"],
        "body": body,
        "query": rest_helpers.flatten_query_params(query, strict=True),
        "routing": [list(gapic_v1.routing_header.to_grpc_metadata(routing))],
    }


def azure(request):
    return {"method": request.method, "url": request.url, "headers": dict(request.headers)}


name = "projects/P-MARK/secrets/S-MARK/versions/V-MARK"
version = DEFAULT_VERSION.value
print(json.dumps({
    "gcp": {
        "access": gcp(
            Rest._BaseAccessSecretVersion._get_http_options(),
            service.AccessSecretVersionRequest(name=name),
            (("name", name),),
        ),
        "list": gcp(
            Rest._BaseListSecrets._get_http_options(),
            service.ListSecretsRequest(parent="projects/P-MARK", page_size=1),
            (("parent", "projects/P-MARK"),),
        ),
        "scopes": list(SecretManagerServiceTransport.AUTH_SCOPES),
    },
    "azure": {
        "get": azure(build_key_vault_get_secret_request("N-MARK", "V-MARK", api_version=version)),
        "current": azure(build_key_vault_get_secret_request("N-MARK", "", api_version=version)),
        "list": azure(build_key_vault_get_secrets_request(maxresults=1, api_version=version)),
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
# The type → module mapping, and running hosts

WRAPPER = """#!{python} -I
# The host runs `<python> -I -m faramesh.engine.providers.child --fd N --parent P`: add the provider
# types protocol.py does not map yet, then run that child unchanged.
import sys
from faramesh.engine.providers import protocol
protocol._MODULES.update({modules!r})
from faramesh.engine.providers.child import main
args = sys.argv[1:]
sys.exit(main(args[args.index("-m") + 2 :]))
"""


def _missing_mappings() -> dict[tuple[str, None], str]:
    return {
        (kind, None): module
        for kind, module in CLOUD_MODULES.items()
        if protocol.backend_module({"type": kind}) != module
    }


@pytest.fixture(scope="module")
def cloud_mappings(library_shapes: dict[str, Any]) -> Iterator[dict[tuple[str, None], str]]:
    """The type → module entries protocol._MODULES lacks (none, once the one-line integration is in),
    added to the engine process for this module's duration."""
    missing = _missing_mappings()
    with pytest.MonkeyPatch.context() as mp:
        for key, module in missing.items():
            mp.setitem(protocol._MODULES, key, module)
        yield missing


@pytest.fixture(scope="module")
def child_python(tmp_path_factory: pytest.TempPathFactory, cloud_mappings: dict[tuple[str, None], str]) -> str:
    """The interpreter children start with: this one when protocol.py maps both types, else a wrapper
    that adds the missing entries in the child before running it."""
    if not cloud_mappings:
        return sys.executable
    wrapper = tmp_path_factory.mktemp("python") / "python-with-cloud-providers"
    wrapper.write_text(WRAPPER.format(python=sys.executable, modules=cloud_mappings))
    wrapper.chmod(0o755)
    return str(wrapper)


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
    providers: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str], python: str
) -> Iterator[tuple[ProviderHost, Logs]]:
    logs = Logs()
    host = ProviderHost(providers, environ, log=logs, python=python)
    host.start()
    try:
        assert host.wait_settled(WAIT)
        yield host, logs
    finally:
        host.close()


def _gcp_access(request: Request) -> bool:
    # Secret reads only: the host's periodic health checks (a listing) may land in between.
    return request.path.endswith(":access")


def _kv_get(request: Request) -> bool:
    return request.path.startswith("/secrets/")


def _ok(result: Any, kind: type) -> Any:
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result}"
    return result


def _environ(tls: Tls | None, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "AZURE_CLIENT_SECRET": CLIENT_SECRET, **extra}
    if tls is not None:
        env["REQUESTS_CA_BUNDLE"] = str(tls.ca_file)  # reaches the children only
    return env


# ---------------------------------------------------------------------------------------------------
# Doubles


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@dataclass
class Gcp:
    double: GcpDouble
    key_file: Path

    def config(self, **override: Any) -> dict[str, Any]:
        return {
            "type": "gcp-secret-manager",
            "project": self.double.project,
            "credentials_file": str(self.key_file),
            "endpoint_url": self.double.url,
            **override,
        }


def _write_key(path: Path, info: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


def _start_gcp(tls: Tls, tmp: Path) -> Gcp:
    double = GcpDouble(tls, "faramesh-prod", new_service_account("faramesh-prod")).start()
    double.versions = {
        "stripe": [json.dumps({"api_key": "old-key"}).encode(), json.dumps({"api_key": GCP_SENTINEL}).encode()],
        "plain": [("plain-" + GCP_SENTINEL).encode()],
        "binary": [b"\xff\xfe\x00binary"],
        "denied-one": [b"not for us"],
        "corrupt": [("corrupt-" + GCP_SENTINEL).encode()],
        "disabled-one": [b"switched off"],
    }
    double.denied = {"denied-one"}
    double.corrupt = {"corrupt"}
    double.disabled = {"disabled-one"}
    return Gcp(double, _write_key(tmp / "gcp-key.json", double.key_file()))


@pytest.fixture(scope="module")
def gcp(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gcp]:
    g = _start_gcp(tls, tmp_path_factory.mktemp("gcp"))
    yield g
    g.double.stop()


@dataclass
class Azure:
    double: AzureDouble
    versions: dict[str, str]

    def config(self, **override: Any) -> dict[str, Any]:
        return {
            "type": "azure-key-vault",
            "vault_url": self.double.url,
            "tenant_id": self.double.tenant_id,
            "client_id": self.double.client_id,
            "client_secret": {"$env": "AZURE_CLIENT_SECRET"},
            "authority_host": self.double.url,
            **override,
        }


def _start_azure(tls: Tls, api_versions: set[str]) -> Azure:
    double = AzureDouble(
        tls,
        tenant_id=str(uuid.uuid4()),
        client_id=str(uuid.uuid4()),
        client_secret=CLIENT_SECRET,
        api_versions=api_versions,
    ).start()
    versions = {
        "stripe": double.add("stripe", json.dumps({"api_key": AZURE_SENTINEL}), "application/json"),
        "db-old": double.add("db-password", "old-value"),
        "db": double.add("db-password", "plain-" + AZURE_SENTINEL),
    }
    double.add("forbidden-one", "not for us")
    double.forbidden = {"forbidden-one"}
    return Azure(double, versions)


@pytest.fixture(scope="module")
def azure(tls: Tls, library_shapes: dict[str, Any]) -> Iterator[Azure]:
    a = _start_azure(tls, set(library_shapes["azure"]["api_versions"]))
    yield a
    a.double.stop()


@pytest.fixture(scope="module")
def shared(gcp: Gcp, azure: Azure, tls: Tls, child_python: str) -> Iterator[tuple[ProviderHost, Logs]]:
    with running({"gcp": gcp.config(), "azure": azure.config()}, _environ(tls), child_python) as pair:
        yield pair


# ---------------------------------------------------------------------------------------------------
# The doubles' contract is what the libraries build


def test_the_doubles_expect_what_the_libraries_build(library_shapes: dict[str, Any]) -> None:
    g, a = library_shapes["gcp"], library_shapes["azure"]
    method, path = CONTRACT["gcp"]["access"].split(" ")
    assert (g["access"]["method"], g["access"]["uri"]) == (
        method,
        path.format(project="P-MARK", secret="S-MARK", version="V-MARK"),
    )
    assert g["access"]["body"] is None and [tuple(q) for q in g["access"]["query"]] == [CONTRACT["gcp"]["alt"]]
    header, value = CONTRACT["gcp"]["routing_header"]
    assert [tuple(h) for h in g["access"]["routing"]] == [
        (header, value.format(name="projects/P-MARK/secrets/S-MARK/versions/V-MARK"))
    ]
    method, path = CONTRACT["gcp"]["list"].split(" ")
    assert (g["list"]["method"], g["list"]["uri"]) == (method, path.format(project="P-MARK"))
    assert sorted(tuple(q) for q in g["list"]["query"]) == sorted([CONTRACT["gcp"]["alt"], ("pageSize", "1")])
    assert [tuple(h) for h in g["list"]["routing"]] == [(header, "parent=projects/P-MARK")]
    assert g["scopes"] == [CONTRACT["gcp"]["scope"]]

    version = a["default_api_version"]
    method, path = CONTRACT["azure"]["get"].split(" ")
    assert (a["get"]["method"], a["get"]["url"]) == (
        method,
        path.format(name="N-MARK", version="V-MARK") + f"?api-version={version}",
    )
    assert a["current"]["url"] == path.format(name="N-MARK", version="") + f"?api-version={version}"
    method, path = CONTRACT["azure"]["list"].split(" ")
    assert (a["list"]["method"], a["list"]["url"]) == (method, f"{path}?api-version={version}&maxresults=1")
    assert {r["headers"]["Accept"] for r in (a["get"], a["current"], a["list"])} == {CONTRACT["azure"]["accept"]}
    assert version in a["api_versions"]


# ---------------------------------------------------------------------------------------------------
# Secrets through the real host and children


def test_both_providers_start_healthy_in_their_own_children(shared: tuple[ProviderHost, Logs]) -> None:
    host, _ = shared
    rows = {s.name: s for s in host.status()}
    assert {n: s.health for n, s in rows.items()} == {"gcp": Health.HEALTHY, "azure": Health.HEALTHY}
    pids = {s.pid for s in rows.values()}
    assert None not in pids and os.getpid() not in pids and len(pids) == 2
    for name in ("gcp", "azure"):
        detail = _ok(host.submit(name, "health").result(WAIT), HealthResult).detail
        # The service accounts may not list secrets: a 403 there still proves the credentials work.
        assert "credentials accepted (listing secrets not permitted)" in detail


def test_gcp_secret_through_the_child(shared: tuple[ProviderHost, Logs], gcp: Gcp) -> None:
    host, _ = shared
    double, project = gcp.double, gcp.double.project
    start = len(double.seen(_gcp_access))
    got = _ok(host.get_secret("gcp", "stripe", field="api_key"), SecretResult)
    assert (got.value.reveal(), got.version) == (GCP_SENTINEL, "2")
    old = _ok(host.get_secret("gcp", "stripe", field="api_key", version="1"), SecretResult)
    assert (old.value.reveal(), old.version) == ("old-key", "1")
    plain = _ok(host.get_secret("gcp", "plain"), SecretResult)
    assert plain.value.reveal() == "plain-" + GCP_SENTINEL

    sent = double.seen(_gcp_access)[start:]
    assert [(r.method, r.path) for r in sent] == [
        ("GET", f"/v1/projects/{project}/secrets/stripe/versions/latest:access"),
        ("GET", f"/v1/projects/{project}/secrets/stripe/versions/1:access"),
        ("GET", f"/v1/projects/{project}/secrets/plain/versions/latest:access"),
    ]
    assert all((r.header("authorization") or "").startswith("Bearer ey") for r in sent)
    assert all("gapic/" in (r.header("x-goog-api-client") or "") for r in sent)
    # google-auth signs its own JWT for a service-account key: the token endpoint is never used.
    assert set(double.auth_kinds) == {"self-signed-jwt"} and not double.seen(lambda r: r.path == "/token")
    assert double.wrong_shapes() == []


def test_gcp_failures_are_typed_and_request_scoped(shared: tuple[ProviderHost, Logs], gcp: Gcp) -> None:
    host, _ = shared
    health = host.status_of("gcp").health  # type: ignore[union-attr]
    cases = {
        ("nope", None, None): FailureCode.NOT_FOUND,
        ("stripe", None, "9"): FailureCode.NOT_FOUND,
        ("denied-one", None, None): FailureCode.DENIED,
        ("disabled-one", None, None): FailureCode.NOT_FOUND,  # FAILED_PRECONDITION: that version, not the provider
        ("stripe", "password", None): FailureCode.NOT_FOUND,
        ("plain", "x", None): FailureCode.BAD_REQUEST,
        ("binary", None, None): FailureCode.BAD_REQUEST,
    }
    for (name, field, version), code in cases.items():
        failure = _ok(host.get_secret("gcp", name, field=field, version=version), ProviderFailure)
        assert failure.code == code, (name, failure)
        assert failure.pipeline_code == CREDENTIAL_UNAVAILABLE and GCP_SENTINEL not in str(failure)
    nofield = _ok(host.get_secret("gcp", "stripe", field="password"), ProviderFailure)
    assert "api_key" in nofield.message  # names the fields, never their values
    disabled = _ok(host.get_secret("gcp", "disabled-one"), ProviderFailure)
    assert "is in DISABLED state" in disabled.message and "https://" not in disabled.message
    # Names that could change the request path are refused in the child, before any request.
    start = len(gcp.double.seen(_gcp_access))
    for name, version in (("a/b", None), ("x", "../1"), ("x", "1:access")):
        bad = _ok(host.get_secret("gcp", name, version=version), ProviderFailure)
        assert bad.code == FailureCode.BAD_REQUEST
    assert len(gcp.double.seen(_gcp_access)) == start
    assert host.status_of("gcp").health == health  # type: ignore[union-attr]


def test_gcp_payload_that_fails_its_crc32c_is_refused(shared: tuple[ProviderHost, Logs]) -> None:
    host, logs = shared
    failure = _ok(host.get_secret("gcp", "corrupt"), ProviderFailure)
    assert failure.code == FailureCode.BACKEND and "CRC32C" in failure.message
    assert GCP_SENTINEL not in str(failure) + logs.text()
    _ok(host.get_secret("gcp", "plain"), SecretResult)  # and the provider is healthy again


def test_azure_secret_through_the_child(
    shared: tuple[ProviderHost, Logs], azure: Azure, library_shapes: dict[str, Any]
) -> None:
    host, _ = shared
    double = azure.double
    start = len(double.seen(_kv_get))
    got = _ok(host.get_secret("azure", "stripe", field="api_key"), SecretResult)
    assert (got.value.reveal(), got.version) == (AZURE_SENTINEL, azure.versions["stripe"])
    old = _ok(host.get_secret("azure", "db-password", version=azure.versions["db-old"]), SecretResult)
    assert (old.value.reveal(), old.version) == ("old-value", azure.versions["db-old"])
    current = _ok(host.get_secret("azure", "db-password"), SecretResult)
    assert (current.value.reveal(), current.version) == ("plain-" + AZURE_SENTINEL, azure.versions["db"])

    api_version = library_shapes["azure"]["default_api_version"]
    sent = double.seen(_kv_get)[start:]
    assert [(r.method, r.path, r.query) for r in sent] == [
        ("GET", "/secrets/stripe/", [("api-version", api_version)]),
        ("GET", f"/secrets/db-password/{azure.versions['db-old']}", [("api-version", api_version)]),
        ("GET", "/secrets/db-password/", [("api-version", api_version)]),
    ]
    # The whole conversation since the child started: one challenge (its first request, the health
    # check's), one OpenID discovery, one client-credentials token request, reused for every call.
    tokens = double.seen(lambda r: r.path.endswith("/oauth2/v2.0/token"))
    assert double.challenges == 1 and len(tokens) == 1
    assert len(double.seen(lambda r: r.path.endswith("/.well-known/openid-configuration"))) == 1
    form = tokens[0].form()
    assert form["grant_type"] == ["client_credentials"] and form["scope"] == [CONTRACT["azure"]["scope"]]
    assert form["client_id"] == [double.client_id] and form["client_secret"] == [CLIENT_SECRET]
    issued = set(double.issued)
    assert all((r.header("authorization") or "").removeprefix("Bearer ") in issued for r in sent)
    assert all((r.header("user-agent") or "").startswith("azsdk-python-keyvault-secrets/") for r in sent)
    assert double.wrong_shapes() == []


def test_azure_failures_are_typed_and_request_scoped(shared: tuple[ProviderHost, Logs], azure: Azure) -> None:
    host, _ = shared
    health = host.status_of("azure").health  # type: ignore[union-attr]
    cases = {
        ("nope", None, None): FailureCode.NOT_FOUND,
        ("db-password", None, "0" * 32): FailureCode.NOT_FOUND,
        ("forbidden-one", None, None): FailureCode.DENIED,
        ("stripe", "password", None): FailureCode.NOT_FOUND,
        ("db-password", "x", None): FailureCode.BAD_REQUEST,
    }
    for (name, field, version), code in cases.items():
        failure = _ok(host.get_secret("azure", name, field=field, version=version), ProviderFailure)
        assert failure.code == code, (name, failure)
        assert failure.pipeline_code == CREDENTIAL_UNAVAILABLE and AZURE_SENTINEL not in str(failure)
    start = len(azure.double.seen(_kv_get))
    for name, version in (("a/b", None), ("under_score", None), ("x", "../1"), ("x", "v?x=1")):
        bad = _ok(host.get_secret("azure", name, version=version), ProviderFailure)
        assert bad.code == FailureCode.BAD_REQUEST
    assert len(azure.double.seen(_kv_get)) == start
    assert host.status_of("azure").health == health  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------
# Wrong credentials, unreachable and stalled services, TLS


def test_wrong_credentials_are_auth_failures_that_never_show_them(
    gcp: Gcp, azure: Azure, tls: Tls, child_python: str, tmp_path: Path
) -> None:
    # The key file names the right account and key id, but holds another private key.
    impostor = ServiceAccount(gcp.double.account.email, gcp.double.account.key_id, new_service_account("x").private_key)
    wrong_key = _write_key(tmp_path / "wrong-key.json", impostor.key_file(gcp.double.project, gcp.double.token_uri))
    wrong_secret = "wrong-client-secret~" + secrets.token_urlsafe(24)
    providers = {
        "gcp": gcp.config(credentials_file=str(wrong_key)),
        "azure": azure.config(client_secret={"$env": "WRONG_SECRET"}),
        # Right secret, but the vault's challenge names its own tenant, which this credential may not use.
        "azure-tenant": azure.config(tenant_id=str(uuid.uuid4())),
    }
    tokens_before = len(azure.double.seen(lambda r: r.path.endswith("/token")))
    with running(providers, _environ(tls, WRONG_SECRET=wrong_secret), child_python) as (host, logs):
        failures = [
            _ok(host.get_secret(name, "stripe", field="api_key"), ProviderFailure)
            for name in ("gcp", "azure", "azure-tenant")
        ]
        assert [f.code for f in failures] == [FailureCode.AUTH] * 3
        assert all(f.pipeline_code == CREDENTIAL_UNAVAILABLE and not f.retryable for f in failures)
        statuses = host.status()
        assert all(s.health == Health.DOWN and (s.last_error or "").startswith(FailureCode.AUTH) for s in statuses)
        seen = logs.text() + "\n".join(str(f) for f in failures) + json.dumps([s.to_dict() for s in statuses])
    # Each error says who was refused and (for Entra ID) why …
    assert gcp.double.account.email in seen and "AADSTS7000215" in seen and azure.double.client_id in seen
    assert f"not configured to acquire tokens for tenant {azure.double.tenant_id}" in failures[2].message
    # … and no credential, no secret: not the client secrets, not a line of either private key.
    for secret in (wrong_secret, CLIENT_SECRET, GCP_SENTINEL, AZURE_SENTINEL):
        assert secret not in seen
    for key in (impostor.private_key_pem, gcp.double.account.private_key_pem):
        assert not [line for line in key.splitlines()[1:-1] if line in seen]
    assert "JWT signature does not verify against the service account's key" in gcp.double.reasons()
    assert "wrong client secret" in azure.double.reasons()
    # Only the wrong secret was sent: the other-tenant credential refused before asking anyone.
    sent = azure.double.seen(lambda r: r.path.endswith("/token"))[tokens_before:]
    assert sent and {r.form()["client_secret"][0] for r in sent} == {wrong_secret}


def test_a_service_that_goes_away_is_unreachable_and_a_stalled_one_times_out(
    tls: Tls, child_python: str, tmp_path: Path, library_shapes: dict[str, Any]
) -> None:
    g = _start_gcp(tls, tmp_path)
    a = _start_azure(tls, set(library_shapes["azure"]["api_versions"]))
    stalled = Blackhole()
    providers = {
        "gcp": g.config(timeout=2),
        "azure": a.config(timeout=2),
        "gcp-stalled": g.config(endpoint_url=stalled.url, timeout=2),
        "azure-stalled": a.config(vault_url=stalled.url, authority_host=stalled.url, timeout=2),
    }
    try:
        with running(providers, _environ(tls), child_python) as (host, logs):
            for name in ("gcp", "azure"):
                _ok(host.get_secret(name, "stripe", field="api_key"), SecretResult)
            for name in ("gcp-stalled", "azure-stalled"):
                failure = _ok(host.get_secret(name, "stripe"), ProviderFailure)
                assert failure.code == FailureCode.TIMEOUT and failure.retryable, failure
                assert host.status_of(name).health != Health.HEALTHY  # type: ignore[union-attr]
            g.double.stop()
            a.double.stop()
            for name in ("gcp", "azure"):
                failure = _ok(host.get_secret(name, "stripe", field="api_key"), ProviderFailure)
                assert failure.code == FailureCode.UNREACHABLE and failure.retryable, failure
                assert failure.pipeline_code == CREDENTIAL_UNAVAILABLE
                status = host.probe(name)
                assert status is not None and status.health == Health.DOWN
                assert (status.last_error or "").startswith(FailureCode.UNREACHABLE)
                assert "cannot reach" in (status.last_error or "")
            assert CLIENT_SECRET not in logs.text()
    finally:
        stalled.close()
        g.double.stop()
        a.double.stop()


def test_tls_is_verified_against_the_ca_given_to_the_child_only(gcp: Gcp, azure: Azure, child_python: str) -> None:
    """Without REQUESTS_CA_BUNDLE in the engine's environment the children do not trust the doubles'
    CA: the libraries verify certificates, and nothing in the test process made that CA trusted."""
    with running({"gcp": gcp.config(), "azure": azure.config()}, _environ(None), child_python) as (host, _):
        for name in ("gcp", "azure"):
            failure = _ok(host.get_secret(name, "stripe"), ProviderFailure)
            assert failure.code == FailureCode.UNREACHABLE and "TLS" in failure.message, failure


def test_a_vault_asking_for_a_token_for_another_resource_gets_none(
    tls: Tls, child_python: str, library_shapes: dict[str, Any]
) -> None:
    a = _start_azure(tls, set(library_shapes["azure"]["api_versions"]))
    a.double.challenge_resource = "https://management.azure.com"
    try:
        with running({"azure": a.config()}, _environ(tls), child_python) as (host, _):
            failure = _ok(host.get_secret("azure", "stripe"), ProviderFailure)
            assert failure.code == FailureCode.CONFIG and "not a Key Vault resource" in failure.message
        assert a.double.challenges >= 1 and not a.double.seen(lambda r: "/oauth2/" in r.path)
    finally:
        a.double.stop()


def test_configuration_errors_fail_closed_without_restarts(
    tmp_path: Path, gcp: Gcp, azure: Azure, tls: Tls, child_python: str
) -> None:
    fragment = "TUlJQ2RnSUJBREFOQmdrcWhraUc5dzBCQVFFRkFBU0NBbUF3Z2dKY0FnRUFBb0dCQU1f"  # one line of a PEM body
    not_a_key = dict(
        gcp.double.key_file(), private_key=f"-----BEGIN PRIVATE KEY-----\n{fragment}\n-----END PRIVATE KEY-----\n"
    )
    user_creds = {"type": "authorized_user", "client_id": "x", "client_secret": "y", "refresh_token": "z"}
    providers = {
        "no-key": gcp.config(credentials_file=None),
        "missing-key": gcp.config(credentials_file=str(tmp_path / "absent.json")),
        "user-key": gcp.config(credentials_file=str(_write_key(tmp_path / "user.json", user_creds))),
        "bad-key": gcp.config(credentials_file=str(_write_key(tmp_path / "bad.json", not_a_key))),
        "http-vault": azure.config(vault_url="http://127.0.0.1:9"),
        "no-tenant": azure.config(tenant_id=None),
    }
    providers = {n: {k: v for k, v in cfg.items() if v is not None} for n, cfg in providers.items()}
    with running(providers, _environ(tls), child_python) as (host, logs):
        rows = {s.name: s for s in host.status()}
        assert all(s.health == Health.DOWN and s.restarts == 0 for s in rows.values()), rows
        assert all((s.last_error or "").startswith(FailureCode.CONFIG) for s in rows.values()), rows
        expected = {
            "no-key": "needs `credentials_file`",
            "missing-key": "cannot read credentials_file",
            "user-key": "holds 'authorized_user' credentials",
            "bad-key": "is not a usable service-account key",
            "http-vault": "vault_url must be an https:// URL",
            "no-tenant": "needs `tenant_id`",
        }
        for name, text in expected.items():
            assert text in (rows[name].last_error or ""), rows[name]
        assert _ok(host.get_secret("bad-key", "x"), ProviderFailure).code == FailureCode.CONFIG
        assert fragment not in logs.text() + json.dumps([s.to_dict() for s in rows.values()])


ENGINE = r"""
import json, sys
from faramesh.engine.providers import protocol
from faramesh.engine.providers.host import ProviderHost
from faramesh.engine.providers.protocol import SecretResult
job = json.load(sys.stdin)
for kind, module in job["modules"]:
    protocol._MODULES[(kind, None)] = module
host = ProviderHost(job["providers"], job["environ"], python=job["python"], log=lambda line: None)
host.start()
try:
    got = {name: host.get_secret(name, "stripe", field="api_key") for name in job["providers"]}
    values = {name: r.value.reveal() if isinstance(r, SecretResult) else str(r) for name, r in got.items()}
finally:
    host.close()
roots = set(job["roots"])
print(json.dumps({"values": values, "sdk": sorted(m for m in sys.modules if m.split(".")[0] in roots)}))
"""


def test_the_engine_process_never_imports_the_sdks(
    gcp: Gcp, azure: Azure, tls: Tls, child_python: str, cloud_mappings: dict[tuple[str, None], str]
) -> None:
    job = {
        "modules": [[kind, module] for (kind, _), module in cloud_mappings.items()],
        "python": child_python,
        "providers": {"gcp": gcp.config(), "azure": azure.config()},
        "environ": _environ(tls),
        "roots": SDK_ROOTS,
    }
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE], input=json.dumps(job), capture_output=True, text=True, timeout=WAIT * 2
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["values"] == {"gcp": GCP_SENTINEL, "azure": AZURE_SENTINEL}  # the SDKs ran — in the children
    assert out["sdk"] == []


# ---------------------------------------------------------------------------------------------------
# The doubles refuse what the libraries would not send


def _call(
    tls: Tls, url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None, form: str | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    data = form.encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if form is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, context=tls.client_context(), timeout=10) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_the_gcp_double_refuses_wrong_shapes(tls: Tls, tmp_path: Path) -> None:
    g = _start_gcp(tls, tmp_path)
    double, account = g.double, g.double.account
    try:
        now = int(time.time())
        name = f"projects/{double.project}/secrets/plain/versions/latest"
        url = f"{double.url}/v1/{name}:access?%24alt=json%3Benum-encoding%3Dint"
        claims = {"iss": account.email, "sub": account.email, "iat": now, "exp": now + 3600}
        good_jwt = account.sign_jwt({**claims, "scope": CONTRACT["gcp"]["scope"]})
        shape = {
            "x-goog-request-params": f"name={name}",
            "x-goog-api-client": "gl-python/3.11 gapic/2.32.0",
            "Content-Type": "application/json",
        }
        assert _call(tls, url, headers={**shape, "Authorization": f"Bearer {good_jwt}"})[0] == 200
        assert double.wrong_shapes() == []
        refused = {
            "no token": {**shape},
            "another key": {**shape, "Authorization": "Bearer " + new_service_account("p").sign_jwt(claims)},
            "expired": {**shape, "Authorization": "Bearer " + account.sign_jwt({**claims, "exp": now - 10})},
            "no scope": {**shape, "Authorization": "Bearer " + account.sign_jwt(claims)},
            "other issuer": {**shape, "Authorization": "Bearer " + account.sign_jwt({**claims, "iss": "x@y"})},
        }
        for why, headers in refused.items():
            status, body, _ = _call(tls, url, headers=headers)
            assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED"), why
        auth = {"Authorization": f"Bearer {good_jwt}"}
        wrong = [
            (url, {**auth}),  # no routing header, no client header
            (url, {**shape, **auth, "x-goog-request-params": "name=projects/other/secrets/x/versions/1"}),
            (url.split("?")[0], {**shape, **auth}),  # no $alt
        ]
        for target, headers in wrong:
            status, body, _ = _call(tls, target, headers=headers)
            assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT")
        assert _call(tls, f"{double.url}/v1/{name}", headers={**shape, **auth})[0] == 404  # no `:access`
        assert len(double.wrong_shapes()) == len(wrong) + 1
        # The token endpoint: a jwt-bearer grant signed by the key, for the token_uri audience, is
        # exchanged for an access token the API then accepts.
        assertion = account.sign_jwt({**claims, "aud": double.token_uri, "scope": CONTRACT["gcp"]["scope"]})
        grant = f"grant_type={urllib.parse.quote(CONTRACT['gcp']['jwt_bearer_grant'])}&assertion={assertion}"
        status, body, _ = _call(tls, double.token_uri, method="POST", form=grant)
        assert status == 200 and body["token_type"] == "Bearer"
        assert _call(tls, url, headers={**shape, "Authorization": f"Bearer {body['access_token']}"})[0] == 200
        assert double.auth_kinds[-1] == "oauth-token" and set(double.auth_kinds[:-1]) == {"self-signed-jwt"}
        forged = new_service_account("p").sign_jwt({**claims, "aud": double.token_uri}, key_id=account.key_id)
        assert _call(tls, double.token_uri, method="POST", form=grant.replace(assertion, forged))[0] == 400
    finally:
        double.stop()


def test_the_azure_double_refuses_wrong_shapes(tls: Tls, library_shapes: dict[str, Any]) -> None:
    a = _start_azure(tls, set(library_shapes["azure"]["api_versions"]))
    double = a.double
    version = library_shapes["azure"]["default_api_version"]
    try:
        token_url = f"{double.url}/{double.tenant_id}/oauth2/v2.0/token"
        form = urllib.parse.urlencode(
            {
                "client_id": double.client_id,
                "client_secret": CLIENT_SECRET,
                "grant_type": "client_credentials",
                "scope": CONTRACT["azure"]["scope"],
            }
        )
        status, body, _ = _call(tls, token_url, method="POST", form=form)
        assert status == 200
        auth = {"Authorization": f"Bearer {body['access_token']}", "Accept": "application/json"}
        auth["User-Agent"] = "azsdk-python-keyvault-secrets/4.12.0 Python/3.11"
        url = f"{double.url}/secrets/db-password/?api-version={version}"
        status, body, _ = _call(tls, url, headers=auth)
        assert (status, body["value"]) == (200, "plain-" + AZURE_SENTINEL)
        assert double.wrong_shapes() == []
        # No token: Key Vault's challenge, naming the tenant and the resource.
        status, body, headers = _call(tls, url, headers={k: v for k, v in auth.items() if k != "Authorization"})
        assert status == 401 and headers["WWW-Authenticate"] == double.challenge
        assert f"/{double.tenant_id}" in double.challenge and 'resource="https://vault.azure.net"' in double.challenge
        status, body, _ = _call(tls, url, headers={**auth, "Authorization": "Bearer forged"})
        assert (status, body["error"]["code"]) == (401, "Unauthorized")
        wrong = [
            url.replace(f"api-version={version}", "api-version=1999-01-01"),
            url.split("?")[0],
            url + "&extra=1",
            f"{double.url}/secrets/bad_name/?api-version={version}",
        ]
        for target in wrong:
            status, body, _ = _call(tls, target, headers=auth)
            assert (status, body["error"]["code"]) == (400, "BadParameter"), target
        status, _, _ = _call(tls, url, headers={**auth, "Accept": "text/html"})
        assert status == 400
        for field, value in (("scope", "https://graph.microsoft.com/.default"), ("grant_type", "password")):
            bad = form.replace(
                urllib.parse.urlencode({field: dict(urllib.parse.parse_qsl(form))[field]}),
                urllib.parse.urlencode({field: value}),
            )
            status, body, _ = _call(tls, token_url, method="POST", form=bad)
            assert status == 400 and body["error"] in ("invalid_scope", "unsupported_grant_type")
        assert len(double.wrong_shapes()) == len(wrong) + 3
        status, body, _ = _call(tls, token_url, method="POST", form=form.replace("client_secret=", "client_secret=x"))
        assert (status, body["error"], body["error_codes"]) == (401, "invalid_client", [7000215])
    finally:
        double.stop()


# ---------------------------------------------------------------------------------------------------
# Pure parts of the provider modules (these import the SDKs into the test process, which is fine here)


def test_pure_parts_of_the_modules(library_shapes: dict[str, Any]) -> None:
    from faramesh.engine.providers import azure as az
    from faramesh.engine.providers import gcp as gc
    from faramesh.engine.providers.protocol import ProviderError

    assert gc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = secrets.token_bytes(4096)
    assert gc.crc32c(data) == crc32c_bitwise(data)
    assert gc.version_name("p-1", "stripe", None) == "projects/p-1/secrets/stripe/versions/latest"
    assert gc.version_name("p-1", "stripe", "7").endswith("/versions/7")
    for secret, version in (("a/b", None), ("", None), ("ok", "1/2"), ("ok", "-1"), ("ok", "a" * 64)):
        with pytest.raises(ProviderError) as raised:
            gc.version_name("p", secret, version)
        assert raised.value.code == FailureCode.BAD_REQUEST
    assert gc.decode_payload("s", b'{"k": "v"}', gc.crc32c(b'{"k": "v"}'), "k") == "v"
    with pytest.raises(ProviderError) as raised:
        gc.decode_payload("s", b"value", gc.crc32c(b"value") ^ 1, None)
    assert raised.value.code == FailureCode.BACKEND and "value" not in raised.value.message.replace("values", "")

    assert az.scope_allowed("https://vault.azure.net/.default", "127.0.0.1")
    assert az.scope_allowed("https://vault.azure.net/.default", "myvault.vault.azure.net")
    assert az.scope_allowed("https://vault.example.local/.default", "kv.vault.example.local")  # Azure Stack
    for scope, host in (
        ("https://management.azure.com/.default", "myvault.vault.azure.net"),
        ("https://graph.microsoft.com/.default", "127.0.0.1"),
        ("http://vault.azure.net/.default", "myvault.vault.azure.net"),
        ("https://vault.azure.net/user_impersonation/x", "myvault.vault.azure.net"),
        ("https://evil-vault.azure.net/.default", "myvault.vault.azure.net"),
    ):
        assert not az.scope_allowed(scope, host), scope
    az.check_names("db-password", "0" * 32)
    for name, version in (("a_b", None), ("a/b", None), ("x" * 128, None), ("ok", "a/b"), ("ok", "..")):
        with pytest.raises(ProviderError):
            az.check_names(name, version)
