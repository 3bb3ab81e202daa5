"""Local HTTP doubles of Google Cloud Secret Manager, Google Cloud KMS and Azure Key Vault (secrets and keys,
with Microsoft Entra ID's token endpoints), served over TLS on 127.0.0.1 for tests/test_providers_cloud.py
and tests/test_kms_cloud.py.

Neither service has a local server, so these stand in for them. They are strict on purpose: every request
is checked against the shape the official client libraries produce — method, path, query string, auth
header, body — and a wrong shape gets the service's own error answer (400, 401, 404 …) and a line in
`rejections` saying why. `CONTRACT` below is what the doubles expect; the tests check it against the
libraries' own request builders (captured in a subprocess), so a library that changes its requests makes
that test fail instead of silently talking past the double.

What the doubles verify beyond shape:
- GCP: the bearer token is either a self-signed service-account JWT (RS256, verified against the public
  half of the key the test generated; `kid`, `iss`/`sub`, scope, `iat`/`exp` checked) or an access
  token this double issued at its token endpoint (`token_uri` of the key file points here, so nothing
  ever goes to Google) for a correctly signed `jwt-bearer` assertion.
- Azure: the OAuth2 client-credentials request (client id, client secret, scope, grant type) against
  the registration the test made; Key Vault's 401 challenge on an unauthenticated request, as the real
  service does; a token this double issued for the Key Vault scope on every authenticated request.
- Signing (Cloud KMS asymmetricSign, Key Vault keys/sign): the double holds a real private key per key
  version (P-256 unless a test gives it another), signs the digest the client sent with it, and returns
  the signature in the service's form (Cloud KMS: ASN.1 DER with its CRC32C, after checking the digest's
  CRC32C; Key Vault: JWS r||s). The public key goes out as the service hands it out (Cloud KMS: PEM with
  its CRC32C; Key Vault: a JSON Web Key), so a test verifies a signature against a key it did not make.

Nothing here imports an SDK: the tests' own process stays as free of them as the engine.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What the doubles expect, written from the services' REST references and checked against the
# libraries' request builders by test_the_doubles_expect_what_the_libraries_build.
CONTRACT: Final[dict[str, Any]] = {
    "gcp": {
        "access": "GET /v1/projects/{project}/secrets/{secret}/versions/{version}:access",
        "list": "GET /v1/projects/{project}/secrets",
        "alt": ("$alt", "json;enum-encoding=int"),  # the REST transport asks for JSON with numeric enums
        "routing_header": ("x-goog-request-params", "name={name}"),
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "jwt_bearer_grant": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    },
    "gcp-kms": {
        "sign": "POST /v1/{name}:asymmetricSign",
        "public_key": "GET /v1/{name}/publicKey",
        "sign_body": ("digest.sha256", "digestCrc32c"),  # what the provider sends: a digest and its CRC32C
        "alt": ("$alt", "json;enum-encoding=int"),
        "routing_header": ("x-goog-request-params", "name={name}"),
        # CryptoKeyVersionAlgorithm and CryptoKeyVersionState as numbers (the REST transport's enums)
        "algorithms": {"EC_SIGN_P256_SHA256": 12, "EC_SIGN_ED25519": 40, "RSA_SIGN_PSS_2048_SHA256": 2},
        "protection_software": 1,
    },
    "azure": {
        "get": "GET /secrets/{name}/{version}",
        "list": "GET /secrets",
        "accept": "application/json",
        "scope": "https://vault.azure.net/.default",
        "resource": "https://vault.azure.net",
    },
    "azure-keys": {
        "get": "GET /keys/{name}/{version}",
        "sign": "POST /keys/{name}/{version}/sign",
        "sign_body": ("alg", "value"),
        "es256": "ES256",
        "content_type": "application/json",
        "user_agent": "azsdk-python-keyvault-keys/",
    },
}
JWT_MAX_LIFETIME: Final = 3600
_KV_NAME: Final = re.compile(r"^[0-9A-Za-z-]{1,127}$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_decode_strict(text: str) -> bytes | None:
    """Base64url without padding, as JWS and Key Vault write it; None for anything else."""
    if not isinstance(text, str) or "=" in text or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        return None
    try:
        return b64url_decode(text)
    except ValueError:
        return None


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C computed bit by bit: deliberately not the provider's table-driven code, so the two check
    each other."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# TLS: a throwaway CA and a certificate for 127.0.0.1


@dataclass(frozen=True)
class Tls:
    ca_file: Path  # what the child trusts, through REQUESTS_CA_BUNDLE
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls(directory: Path, now: datetime.datetime | None = None) -> Tls:
    now = now or datetime.datetime.now(datetime.UTC)
    before, after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=6)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "faramesh test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    tls = Tls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls.key_file.chmod(0o600)
    return tls


# ---------------------------------------------------------------------------------------------------
# A recording HTTPS server


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class Reply:
    status: int
    body: Mapping[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    request: Request
    status: int
    why: str
    shape: bool  # True: the request is not what the library should send; False: a refusal the API makes


class Double:
    """An HTTPS server on 127.0.0.1 that records every request and answers through `route`."""

    def __init__(self, tls: Tls) -> None:
        self.tls = tls
        self.requests: list[Request] = []
        self.rejections: list[Rejection] = []
        self._lock = threading.Lock()
        self._open: set[ssl.SSLSocket] = set()  # live connections, cut by stop()
        context = tls.server_context()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                split = urllib.parse.urlsplit(self.path)
                request = Request(
                    self.command,
                    urllib.parse.unquote(split.path),
                    urllib.parse.parse_qsl(split.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with double._lock:
                    double.requests.append(request)
                reply = double.route(request)
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The TLS handshake runs in the connection's own thread, with a deadline, so a client
                # that stalls or refuses our certificate never holds up the accept loop.
                request.settimeout(10)
                try:
                    tls_sock = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                with double._lock:
                    double._open.add(tls_sock)
                try:
                    Handler(tls_sock, client_address, self)
                except OSError:
                    pass  # the client went away, or stop() cut the connection
                finally:
                    with double._lock:
                        double._open.discard(tls_sock)
                    tls_sock.close()

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="cloud-double", daemon=True)
        self._stopped = False

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away as a crashed service does: new connections are refused, and the clients' kept-alive
        connections are cut."""
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                live = list(self._open)
            for sock in live:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def route(self, request: Request) -> Reply:
        raise NotImplementedError

    def reject(
        self,
        request: Request,
        status: int,
        why: str,
        body: Mapping[str, Any],
        *,
        shape: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        with self._lock:
            self.rejections.append(Rejection(request, status, why, shape))
        return Reply(status, body, dict(headers or {}))

    def seen(self, predicate: Callable[[Request], bool] = lambda r: True) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    def reasons(self) -> list[str]:
        with self._lock:
            return [r.why for r in self.rejections]

    def wrong_shapes(self) -> list[str]:
        """Why each request that did not have the libraries' shape was refused: empty after a test whose
        traffic all matched."""
        with self._lock:
            return [f"{r.request.method} {r.request.path}: {r.why}" for r in self.rejections if r.shape]


def shape_problems(
    request: Request, *, query: list[tuple[str, str]], headers: Mapping[str, Callable[[str | None], bool]]
) -> list[str]:
    problems = []
    if sorted(request.query) != sorted(query):
        problems.append(f"query {request.query} is not {query}")
    for name, ok in headers.items():
        if not ok(request.header(name)):
            problems.append(f"header {name}: {request.header(name)!r}")
    if request.method == "GET" and request.body:
        problems.append("a GET with a body")
    return problems


# ---------------------------------------------------------------------------------------------------
# Google Cloud Secret Manager


@dataclass(frozen=True)
class ServiceAccount:
    email: str
    key_id: str
    private_key: rsa.RSAPrivateKey

    @property
    def private_key_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")

    def key_file(self, project: str, token_uri: str) -> dict[str, Any]:
        """The JSON a `gcloud iam service-accounts keys create` would write, with `token_uri` pointed at
        the double so that no code path can reach Google."""
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": self.key_id,
            "private_key": self.private_key_pem,
            "client_email": self.email,
            "client_id": "1" + secrets.token_hex(8),
            "auth_uri": token_uri.rsplit("/", 1)[0] + "/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": token_uri.rsplit("/", 1)[0] + "/certs",
            "client_x509_cert_url": token_uri.rsplit("/", 1)[0] + "/certs/" + self.email,
            "universe_domain": "googleapis.com",
        }

    def sign_jwt(self, claims: Mapping[str, Any], *, key_id: str | None = None) -> str:
        """A JWT as google-auth makes one (header typ/alg/kid, RS256)."""
        header = {"typ": "JWT", "alg": "RS256", "kid": key_id or self.key_id}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(dict(claims)).encode())}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"


def new_service_account(project: str, name: str = "faramesh-broker") -> ServiceAccount:
    return ServiceAccount(
        f"{name}@{project}.iam.gserviceaccount.com",
        secrets.token_hex(20),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def verify_jwt(token: str, account: ServiceAccount, now: float) -> tuple[dict[str, Any] | None, str]:
    """(claims, "") when `token` is a JWT `account` signed and that is valid now; (None, why) otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        return None, "not a JWT"
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except ValueError:
        return None, "a JWT that does not decode"
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None, "a JWT whose parts are not objects"
    if header.get("alg") != "RS256":
        return None, f"JWT alg {header.get('alg')!r}"
    if header.get("kid") != account.key_id:
        return None, "JWT signed with an unknown key id"
    try:
        account.private_key.public_key().verify(
            signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return None, "JWT signature does not verify against the service account's key"
    if claims.get("iss") != account.email or claims.get("sub", account.email) != account.email:
        return None, f"JWT issuer {claims.get('iss')!r} is not {account.email}"
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or not isinstance(exp, int):
        return None, "JWT without integer iat/exp"
    if iat > now + 60 or exp <= now or exp - iat > JWT_MAX_LIFETIME:
        return None, "JWT outside its validity"
    return claims, ""


class GcpDouble(Double):
    """Secret Manager's REST API for one project, and an OAuth2 token endpoint at `/token`."""

    api_audience = "https://secretmanager.googleapis.com/"  # a self-signed JWT's `aud` without scopes

    def __init__(self, tls: Tls, project: str, account: ServiceAccount, *, clock: Callable[[], float] = time.time):
        super().__init__(tls)
        self.project = project
        self.project_number = str(100000000000 + secrets.randbelow(10**11))
        self.account = account
        self.clock = clock
        self.versions: dict[str, list[bytes]] = {}  # secret id → payloads of versions 1, 2, …
        self.denied: set[str] = set()  # secret ids the account may not access
        self.corrupt: set[str] = set()  # secret ids whose CRC32C is sent wrong
        self.disabled: set[str] = set()  # secret ids whose versions are all disabled
        self.may_list = False
        self.issued: set[str] = set()
        self.auth_kinds: list[str] = []  # "self-signed-jwt" | "oauth-token", per authenticated API call

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    def key_file(self) -> dict[str, Any]:
        return self.account.key_file(self.project, self.token_uri)

    # ---- errors in Google's shape (google.rpc.Status as JSON)
    def _error(self, request: Request, status: int, code: str, message: str, why: str, *, shape: bool = False) -> Reply:
        body = {"error": {"code": status, "message": message, "status": code}}
        return self.reject(request, status, why, body, shape=shape)

    def route(self, request: Request) -> Reply:
        if request.path == "/token":
            return self._token(request)
        if request.path.startswith("/v1/"):
            return self._api(request)
        return self._error(
            request, 404, "NOT_FOUND", "The requested URL was not found on this server.", "unknown path", shape=True
        )

    def _token(self, request: Request) -> Reply:
        form = request.form()
        if request.method != "POST" or request.header("content-type") != "application/x-www-form-urlencoded":
            return self.reject(request, 400, "token request shape", {"error": "invalid_request"}, shape=True)
        if form.get("grant_type") != [CONTRACT["gcp"]["jwt_bearer_grant"]] or len(form.get("assertion", [])) != 1:
            return self.reject(request, 400, "token grant", {"error": "unsupported_grant_type"}, shape=True)
        claims, why = verify_jwt(form["assertion"][0], self.account, self.clock())
        if (
            claims is None
            or claims.get("aud") != self.token_uri
            or CONTRACT["gcp"]["scope"] not in str(claims.get("scope", "")).split()
        ):
            reason = why or "assertion audience or scope"
            return self.reject(
                request, 400, reason, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            )
        token = "ya29.double-" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued.add(token)
        return Reply(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _authenticate(self, request: Request) -> str | None:
        """None when the Authorization header is good, else why not."""
        value = request.header("authorization") or ""
        if not value.startswith("Bearer "):
            return "no bearer token"
        token = value[len("Bearer ") :]
        with self._lock:
            if token in self.issued:
                self.auth_kinds.append("oauth-token")
                return None
        claims, why = verify_jwt(token, self.account, self.clock())
        if claims is None:
            return why
        # A self-signed JWT carries the scope (or the API's audience) instead of going to the token endpoint.
        scopes = str(claims.get("scope", "")).split()
        if CONTRACT["gcp"]["scope"] not in scopes and claims.get("aud") != self.api_audience:
            return "self-signed JWT without the cloud-platform scope"
        with self._lock:
            self.auth_kinds.append("self-signed-jwt")
        return None

    def _api(self, request: Request) -> Reply:
        segments = request.path.split("/")
        access = (
            request.method == "GET"
            and len(segments) == 8
            and segments[1:3] == ["v1", "projects"]
            and segments[4] == "secrets"
            and segments[6] == "versions"
            and segments[7].endswith(":access")
        )
        listing = request.method == "GET" and len(segments) == 5 and segments[1:3] == ["v1", "projects"]
        listing = listing and segments[4] == "secrets"
        if not access and not listing:
            return self._error(
                request, 404, "NOT_FOUND", "The requested URL was not found on this server.", "path", shape=True
            )
        why = self._authenticate(request)
        if why is not None:
            return self._error(
                request,
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
                why,
            )
        project = segments[3]
        if access:
            secret, version = segments[5], segments[7].removesuffix(":access")
            name = f"projects/{project}/secrets/{secret}/versions/{version}"
            routing = (CONTRACT["gcp"]["routing_header"][0], CONTRACT["gcp"]["routing_header"][1].format(name=name))
            expected_query = [CONTRACT["gcp"]["alt"]]
        else:
            name = f"projects/{project}"
            routing = (CONTRACT["gcp"]["routing_header"][0], f"parent={name}")
            expected_query = [CONTRACT["gcp"]["alt"], ("pageSize", "1")]
        problems = shape_problems(
            request,
            query=expected_query,
            headers={
                routing[0]: lambda v: v == routing[1],
                "x-goog-api-client": lambda v: v is not None and "gapic/" in v and "gl-python/" in v,
                "content-type": lambda v: v == "application/json",
            },
        )
        if problems:
            return self._error(request, 400, "INVALID_ARGUMENT", "Invalid request.", "; ".join(problems), shape=True)
        if project not in (self.project, self.project_number):
            permission = "secretmanager.versions.access" if access else "secretmanager.secrets.list"
            return self._error(
                request,
                403,
                "PERMISSION_DENIED",
                f"Permission '{permission}' denied for resource '{name}' (or it may not exist).",
                "another project",
            )
        if listing:
            if not self.may_list:
                return self._error(
                    request,
                    403,
                    "PERMISSION_DENIED",
                    f"Permission 'secretmanager.secrets.list' denied for resource 'projects/{project}'.",
                    "listing not permitted",
                )
            first = sorted(self.versions)[:1]
            return Reply(200, {"secrets": [{"name": f"projects/{self.project_number}/secrets/{s}"} for s in first]})
        return self._access(request, secret, version)

    def _access(self, request: Request, secret: str, version: str) -> Reply:
        full = f"projects/{self.project_number}/secrets/{secret}"
        if secret in self.denied:
            return self._error(
                request,
                403,
                "PERMISSION_DENIED",
                f"Permission 'secretmanager.versions.access' denied for resource '{full}/versions/{version}' "
                "(or it may not exist).",
                "denied secret",
            )
        payloads = self.versions.get(secret)
        if not payloads:
            return self._error(
                request, 404, "NOT_FOUND", f"Secret [{full}] not found or has no versions.", "unknown secret"
            )
        number = len(payloads) if version == "latest" else int(version) if version.isdigit() else 0
        if not 1 <= number <= len(payloads):
            return self._error(
                request, 404, "NOT_FOUND", f"Secret Version [{full}/versions/{version}] not found.", "unknown version"
            )
        if secret in self.disabled:
            return self._error(
                request,
                400,
                "FAILED_PRECONDITION",
                f"Secret Version [{full}/versions/{number}] is in DISABLED state.",
                "disabled version",
            )
        data = payloads[number - 1]
        checksum = crc32c_bitwise(data) ^ (1 if secret in self.corrupt else 0)
        return Reply(
            200,
            {
                "name": f"{full}/versions/{number}",
                # int64 travels as a JSON string (proto3 JSON mapping)
                "payload": {"data": base64.b64encode(data).decode("ascii"), "dataCrc32c": str(checksum)},
            },
        )


# ---------------------------------------------------------------------------------------------------
# Keys the signing doubles hold


SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def public_der(key: SigningKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: SigningKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def is_p256(key: SigningKey) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


def sign_digest_p256(key: SigningKey, digest: bytes) -> bytes:
    """ECDSA over an already computed SHA-256 digest, as a KMS does: ASN.1 DER."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# ---------------------------------------------------------------------------------------------------
# Google Cloud KMS

_KMS_PATH: Final = re.compile(
    r"^/v1/(?P<name>projects/(?P<project>[^/]+)/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+"
    r"/cryptoKeyVersions/[^/:]+)(?P<op>:asymmetricSign|/publicKey)$"
)


@dataclass
class KmsKeyVersion:
    private_key: SigningKey
    algorithm: str = "EC_SIGN_P256_SHA256"  # a CryptoKeyVersionAlgorithm name (CONTRACT["gcp-kms"]["algorithms"])
    state: str = "ENABLED"


class GcpKmsDouble(GcpDouble):
    """Cloud KMS's REST API (getPublicKey, asymmetricSign) for the key versions of one project, with the same
    OAuth2 token endpoint and bearer-token checks as the Secret Manager double."""

    api_audience = "https://cloudkms.googleapis.com/"

    def __init__(
        self,
        tls: Tls,
        project: str,
        account: ServiceAccount,
        *,
        location: str = "global",
        key_ring: str = "faramesh",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(tls, project, account, clock=clock)
        self.location = location
        self.key_ring = key_ring
        self.keys: dict[str, KmsKeyVersion] = {}  # key version resource name → its key
        self.denied_keys: set[str] = set()  # key version names the account may not use
        self.corrupt_signatures: set[str] = set()  # key version names whose signature CRC32C is sent wrong
        self.signed: list[tuple[str, bytes]] = []  # (key version, digest) of every signature made

    def key_name(self, key: str, version: int = 1) -> str:
        return (
            f"projects/{self.project}/locations/{self.location}/keyRings/{self.key_ring}/cryptoKeys/{key}"
            f"/cryptoKeyVersions/{version}"
        )

    def add_key(
        self, key: str, version: int = 1, private_key: SigningKey | None = None, algorithm: str = "EC_SIGN_P256_SHA256"
    ) -> str:
        name = self.key_name(key, version)
        with self._lock:
            self.keys[name] = KmsKeyVersion(private_key or ec.generate_private_key(ec.SECP256R1()), algorithm)
        return name

    def route(self, request: Request) -> Reply:
        if request.path == "/token":
            return self._token(request)
        m = _KMS_PATH.match(request.path)
        sign = m is not None and m.group("op") == ":asymmetricSign"
        if m is None or request.method != ("POST" if sign else "GET"):
            return self._error(
                request, 404, "NOT_FOUND", "The requested URL was not found on this server.", "path", shape=True
            )
        why = self._authenticate(request)
        if why is not None:
            return self._error(
                request,
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
                why,
            )
        name, project = m.group("name"), m.group("project")
        routing = CONTRACT["gcp-kms"]["routing_header"]
        problems = shape_problems(
            request,
            query=[CONTRACT["gcp-kms"]["alt"]],
            headers={
                routing[0]: lambda v: v == routing[1].format(name=name),
                "x-goog-api-client": lambda v: v is not None and "gapic/" in v and "gl-python/" in v,
                "content-type": lambda v: v == "application/json",
            },
        )
        digest = None
        if sign:
            digest, problem = self._sign_body(request)
            problems += [problem] if problem else []
        if problems:
            return self._error(request, 400, "INVALID_ARGUMENT", "Invalid request.", "; ".join(problems), shape=True)
        permission = "useToSign" if sign else "viewPublicKey"
        with self._lock:
            key = self.keys.get(name)
            denied = name in self.denied_keys
        if project not in (self.project, self.project_number) or denied:
            return self._error(
                request,
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudkms.cryptoKeyVersions.{permission}' denied on resource '{name}' (or it may not "
                "exist).",
                "key denied",
            )
        if key is None:
            return self._error(request, 404, "NOT_FOUND", f"{name} not found.", "unknown key version")
        if key.state != "ENABLED":
            return self._error(
                request,
                400,
                "FAILED_PRECONDITION",
                f"{name} is not enabled, current state is: {key.state}.",
                "key version not enabled",
            )
        if digest is None:
            pem = public_pem(key.private_key)
            return Reply(
                200,
                {
                    "pem": pem,
                    "algorithm": CONTRACT["gcp-kms"]["algorithms"][key.algorithm],
                    "pemCrc32c": str(crc32c_bitwise(pem.encode())),
                    "name": name,
                    "protectionLevel": CONTRACT["gcp-kms"]["protection_software"],
                },
            )
        if not is_p256(key.private_key) or key.algorithm != "EC_SIGN_P256_SHA256":
            return self._error(
                request, 400, "INVALID_ARGUMENT", f"Digest type SHA256 is not valid for {key.algorithm}.", "algorithm"
            )
        signature = sign_digest_p256(key.private_key, digest)
        with self._lock:
            self.signed.append((name, digest))
            corrupt = name in self.corrupt_signatures
        return Reply(
            200,
            {
                "signature": base64.b64encode(signature).decode("ascii"),
                "signatureCrc32c": str(crc32c_bitwise(signature) ^ (1 if corrupt else 0)),
                "verifiedDigestCrc32c": True,
                "name": name,
                "protectionLevel": CONTRACT["gcp-kms"]["protection_software"],
            },
        )

    @staticmethod
    def _sign_body(request: Request) -> tuple[bytes | None, str | None]:
        """(the digest, None) for the body the provider's requests carry; (None, why) otherwise."""
        try:
            body = json.loads(request.body)
        except ValueError:
            return None, "the body is not JSON"
        if not isinstance(body, dict) or set(body) != {"digest", "digestCrc32c"}:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            return None, f"body fields {keys} are not a digest and its CRC32C"
        digest_field, checksum = body["digest"], body["digestCrc32c"]
        if not isinstance(digest_field, dict) or set(digest_field) != {"sha256"}:
            return None, "the digest is not a SHA-256 digest"
        try:
            digest = base64.b64decode(digest_field["sha256"], validate=True)
        except (ValueError, TypeError):
            return None, "the digest is not base64"
        if len(digest) != 32:
            return None, f"a {len(digest)}-byte SHA-256 digest"
        # int64 travels as a JSON string (proto3 JSON mapping)
        if not isinstance(checksum, str) or not checksum.isdigit() or int(checksum) != crc32c_bitwise(digest):
            return None, "digestCrc32c does not match the digest"
        return digest, None


# ---------------------------------------------------------------------------------------------------
# Azure Key Vault and Microsoft Entra ID


@dataclass
class AzureSecret:
    versions: list[tuple[str, str, str | None]]  # (version id, value, content type), oldest first


@dataclass
class AzureKey:
    versions: list[tuple[str, SigningKey]]  # (version id, private key), oldest first
    enabled: bool = True
    ops: tuple[str, ...] = ("sign", "verify")


class AzureDouble(Double):
    """One Key Vault at `/` and one Entra ID tenant at `/<tenant>/…` (the OpenID configuration and the v2.0
    token endpoint), knowing one app registration."""

    def __init__(
        self,
        tls: Tls,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        api_versions: set[str],
        key_api_versions: set[str] | None = None,
    ):
        super().__init__(tls)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.api_versions = api_versions
        self.key_api_versions = key_api_versions if key_api_versions is not None else api_versions
        self.secrets: dict[str, AzureSecret] = {}
        self.keys: dict[str, AzureKey] = {}
        self.forbidden_keys: set[str] = set()
        self.signed: list[tuple[str, str, bytes]] = []  # (key name, version, digest) of every signature made
        self.forbidden: set[str] = set()
        self.may_list = False
        self.issued: dict[str, str] = {}  # access token → scope
        self.challenges = 0  # unauthenticated requests answered with Key Vault's 401 challenge
        self.challenge_resource: str = CONTRACT["azure"]["resource"]  # a test may make the vault ask for more

    def add(self, name: str, value: str, content_type: str | None = None) -> str:
        version = secrets.token_hex(16)
        self.secrets.setdefault(name, AzureSecret([])).versions.append((version, value, content_type))
        return version

    def add_key(self, name: str, private_key: SigningKey | None = None) -> str:
        """A new version of key `name` (P-256 unless given another key); its version id."""
        version = secrets.token_hex(16)
        with self._lock:
            entry = self.keys.setdefault(name, AzureKey([]))
            entry.versions.append((version, private_key or ec.generate_private_key(ec.SECP256R1())))
        return version

    def key_of(self, name: str, version: str) -> SigningKey:
        with self._lock:
            return next(k for v, k in self.keys[name].versions if v == version)

    @property
    def challenge(self) -> str:
        # The shape Key Vault sends; the client takes the tenant from `authorization` and the token scope
        # from `resource`. (The real one names login.microsoftonline.com: this one names the double.)
        return f'Bearer authorization="{self.url}/{self.tenant_id}", resource="{self.challenge_resource}"'

    def route(self, request: Request) -> Reply:
        path = request.path
        if path == "/secrets" or path.startswith("/secrets/"):
            return self._vault(request)
        if path.startswith("/keys/"):
            return self._keys(request)
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return self._discovery(request, parts[0])
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            return self._token(request, parts[0])
        return self.reject(request, 404, "unknown path", {"error": "not_found"}, shape=True)

    # ---- Entra ID
    def _aad_error(
        self, request: Request, status: int, error: str, code: int, text: str, why: str, *, shape: bool = False
    ) -> Reply:
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {secrets.token_hex(8)}",
            "error_codes": [code],
        }
        return self.reject(request, status, why, body, shape=shape)

    def _discovery(self, request: Request, tenant: str) -> Reply:
        if request.method != "GET" or request.query or request.body:
            return self.reject(request, 400, "discovery request shape", {"error": "invalid_request"}, shape=True)
        if tenant != self.tenant_id:
            return self._aad_error(request, 400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.", "tenant")
        base = f"{self.url}/{tenant}"
        return Reply(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": "EU",
            },
        )

    def _token(self, request: Request, tenant: str) -> Reply:
        if request.method != "POST" or request.header("content-type") != "application/x-www-form-urlencoded":
            return self.reject(request, 400, "token request shape", {"error": "invalid_request"}, shape=True)
        if tenant != self.tenant_id:
            return self._aad_error(request, 400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.", "tenant")
        form = request.form()
        if form.get("grant_type") != ["client_credentials"]:
            return self._aad_error(
                request, 400, "unsupported_grant_type", 70003, "Unsupported grant type.", "grant", shape=True
            )
        if form.get("client_id") != [self.client_id]:
            return self._aad_error(
                request,
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory.",
                "unknown client",
            )
        if form.get("client_secret") != [self.client_secret]:
            return self._aad_error(
                request,
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                f"value, not the client secret ID, for a secret added to app '{self.client_id}'.",
                "wrong client secret",
            )
        if form.get("scope") != [CONTRACT["azure"]["scope"]]:
            return self._aad_error(
                request,
                400,
                "invalid_scope",
                70011,
                f"The provided value for scope {form.get('scope')} is not valid.",
                "scope",
                shape=True,
            )
        token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.double." + secrets.token_urlsafe(32)
        with self._lock:
            self.issued[token] = form["scope"][0]
        return Reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})

    # ---- Key Vault
    def _kv_error(
        self,
        request: Request,
        status: int,
        code: str,
        message: str,
        why: str,
        *,
        shape: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        body = {"error": {"code": code, "message": message}}
        return self.reject(request, status, why, body, shape=shape, headers=headers)

    def _vault(self, request: Request) -> Reply:
        parts = request.path.split("/")
        get = request.method == "GET" and len(parts) == 4  # "", "secrets", name, version ("" for the current)
        listing = request.method == "GET" and request.path == "/secrets"
        if not get and not listing:
            return self._kv_error(request, 404, "NotFound", "The requested resource was not found.", "path", shape=True)
        if get and not _KV_NAME.match(parts[2]):
            return self._kv_error(request, 400, "BadParameter", "Invalid secret name.", "secret name", shape=True)
        api_version = [v for k, v in request.query if k == "api-version"]
        if len(api_version) != 1 or api_version[0] not in self.api_versions:
            return self._kv_error(
                request,
                400,
                "BadParameter",
                f"The specified version ({','.join(api_version) or 'none'}) is not recognized. Consider using the "
                "latest supported version.",
                "api-version",
                shape=True,
            )
        expected = [("api-version", api_version[0])] + ([("maxresults", "1")] if listing else [])
        problems = shape_problems(
            request,
            query=expected,
            headers={
                "accept": lambda v: v == CONTRACT["azure"]["accept"],
                "user-agent": lambda v: v is not None and v.startswith("azsdk-python-keyvault-secrets/"),
            },
        )
        if problems:
            return self._kv_error(request, 400, "BadParameter", "Invalid request.", "; ".join(problems), shape=True)
        refused = self._kv_authorize(request)
        if refused is not None:
            return refused
        if listing:
            if not self.may_list:
                return self._forbidden(request, "list")
            return Reply(200, {"value": [self._item(n) for n in sorted(self.secrets)[:1]], "nextLink": None})
        name, version = parts[2], parts[3]
        if name in self.forbidden:
            return self._forbidden(request, "get")
        secret = self.secrets.get(name)
        found = None
        if secret is not None:
            found = (
                secret.versions[-1] if version == "" else next((v for v in secret.versions if v[0] == version), None)
            )
        if found is None:
            return self._kv_error(
                request,
                404,
                "SecretNotFound",
                f"A secret with (name/id) {name}{'/' + version if version else ''} was not found in this key vault.",
                "unknown secret",
            )
        body: dict[str, Any] = {
            "value": found[1],
            "id": f"{self.url}/secrets/{name}/{found[0]}",
            "attributes": {
                "enabled": True,
                "created": 1700000000,
                "updated": 1700000000,
                "recoveryLevel": "Recoverable",
            },
        }
        if found[2] is not None:
            body["contentType"] = found[2]
        return Reply(200, body)

    def _kv_authorize(self, request: Request) -> Reply | None:
        """None when the request carries a token this double issued for Key Vault, else the answer."""
        authorization = request.header("authorization")
        if authorization is None:
            # The first request of a client that has not seen this vault: no token, no body; Key Vault
            # answers with the challenge that says which tenant and resource the token must be for. Part
            # of the protocol, so counted, not rejected.
            with self._lock:
                self.challenges += 1
            missing = {
                "error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}
            }
            return Reply(401, missing, {"WWW-Authenticate": self.challenge})
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        with self._lock:
            scope = self.issued.get(token or "")
        if scope != CONTRACT["azure"]["scope"]:
            return self._kv_error(
                request,
                401,
                "Unauthorized",
                "AKV10022: Invalid audience.",
                "token not issued by this double for Key Vault",
                headers={"WWW-Authenticate": self.challenge},
            )
        return None

    def _keys(self, request: Request) -> Reply:
        parts = request.path.split("/")  # "", "keys", name, version ("" for the current)[, "sign"]
        get = request.method == "GET" and len(parts) == 4
        sign = request.method == "POST" and len(parts) == 5 and parts[4] == "sign"
        if not get and not sign:
            return self._kv_error(request, 404, "NotFound", "The requested resource was not found.", "path", shape=True)
        name, version = parts[2], parts[3]
        if not _KV_NAME.match(name):
            return self._kv_error(request, 400, "BadParameter", "Invalid key name.", "key name", shape=True)
        api_version = [v for k, v in request.query if k == "api-version"]
        if len(api_version) != 1 or api_version[0] not in self.key_api_versions:
            return self._kv_error(
                request,
                400,
                "BadParameter",
                f"The specified version ({','.join(api_version) or 'none'}) is not recognized.",
                "api-version",
                shape=True,
            )
        contract = CONTRACT["azure-keys"]
        checks: dict[str, Callable[[str | None], bool]] = {
            "accept": lambda v: v == CONTRACT["azure"]["accept"],
            "user-agent": lambda v: v is not None and v.startswith(contract["user_agent"]),
        }
        if sign and request.body:  # the challenge request goes out without its body (and content type)
            checks["content-type"] = lambda v: v == contract["content_type"]
        problems = shape_problems(request, query=[("api-version", api_version[0])], headers=checks)
        if problems:
            return self._kv_error(request, 400, "BadParameter", "Invalid request.", "; ".join(problems), shape=True)
        refused = self._kv_authorize(request)
        if refused is not None:
            return refused
        digest = None
        if sign:
            digest, problem = self._sign_body(request)
            if digest is None:
                return self._kv_error(request, 400, "BadParameter", "Invalid sign request.", problem, shape=True)
        with self._lock:
            entry = self.keys.get(name)
            forbidden = name in self.forbidden_keys
        if forbidden:
            return self.reject(
                request,
                403,
                f"keys {'sign' if sign else 'get'} forbidden",
                {
                    "error": {
                        "code": "Forbidden",
                        "message": f"The user, group or application 'appid={self.client_id}' does not have keys "
                        f"{'sign' if sign else 'get'} permission on key vault.",
                        "innererror": {"code": "AccessDenied"},
                    }
                },
            )
        found = None
        if entry is not None:
            found = entry.versions[-1] if version == "" else next((v for v in entry.versions if v[0] == version), None)
        if entry is None or found is None:
            return self._kv_error(
                request,
                404,
                "KeyNotFound",
                f"A key with (name/id) {name}{'/' + version if version else ''} was not found in this key vault.",
                "unknown key",
            )
        kid = f"{self.url}/keys/{name}/{found[0]}"
        if digest is None:
            return Reply(200, self._key_bundle(kid, found[1], entry))
        if not entry.enabled:
            return self.reject(
                request,
                403,
                "disabled key",
                {
                    "error": {
                        "code": "Forbidden",
                        "message": "Operation sign is not allowed on a disabled key.",
                        "innererror": {"code": "KeyDisabled"},
                    }
                },
            )
        if not is_p256(found[1]):
            return self._kv_error(
                request, 400, "BadParameter", "Key and signing algorithm are incompatible.", "algorithm"
            )
        r, s_ = decode_dss_signature(sign_digest_p256(found[1], digest))
        with self._lock:
            self.signed.append((name, found[0], digest))
        return Reply(200, {"kid": kid, "value": b64url(r.to_bytes(32, "big") + s_.to_bytes(32, "big"))})

    @staticmethod
    def _sign_body(request: Request) -> tuple[bytes | None, str]:
        try:
            body = json.loads(request.body)
        except ValueError:
            return None, "the body is not JSON"
        if not isinstance(body, dict) or set(body) != set(CONTRACT["azure-keys"]["sign_body"]):
            return None, "the body is not {alg, value}"
        if body["alg"] != CONTRACT["azure-keys"]["es256"]:
            return None, f"algorithm {body['alg']!r}"
        digest = b64url_decode_strict(body["value"])
        if digest is None or len(digest) != 32:
            return None, "the value is not a base64url SHA-256 digest"
        return digest, ""

    @staticmethod
    def _key_bundle(kid: str, key: SigningKey, entry: AzureKey) -> dict[str, Any]:
        """A KeyBundle as Key Vault returns it: the public half as a JSON Web Key, and the attributes."""
        jwk: dict[str, Any] = {"kid": kid, "key_ops": list(entry.ops)}
        public = key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            numbers = public.public_numbers()
            size = (public.curve.key_size + 7) // 8
            jwk.update(
                kty="EC",
                crv={"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public.curve.name],
                x=b64url(numbers.x.to_bytes(size, "big")),
                y=b64url(numbers.y.to_bytes(size, "big")),
            )
        elif isinstance(public, rsa.RSAPublicKey):
            rsa_numbers = public.public_numbers()
            jwk.update(
                kty="RSA",
                n=b64url(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
                e=b64url(rsa_numbers.e.to_bytes(3, "big")),
            )
        else:
            raise AssertionError("Key Vault holds EC and RSA keys only")
        attributes = {
            "enabled": entry.enabled,
            "created": 1700000000,
            "updated": 1700000000,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
        }
        return {"key": jwk, "attributes": attributes}

    def _item(self, name: str) -> dict[str, Any]:
        return {"id": f"{self.url}/secrets/{name}", "attributes": {"enabled": True}}

    def _forbidden(self, request: Request, permission: str) -> Reply:
        return self.reject(
            request,
            403,
            f"secrets {permission} forbidden",
            {
                "error": {
                    "code": "Forbidden",
                    "message": f"The user, group or application 'appid={self.client_id}' does not have secrets "
                    f"{permission} permission on key vault.",
                    "innererror": {"code": "AccessDenied"},
                }
            },
        )


# ---------------------------------------------------------------------------------------------------
# A port that accepts connections and never answers


class Blackhole:
    """A listening socket nobody accepts from: connections complete (the kernel's backlog), the TLS
    handshake never does."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()
