"""A SPIFFE Workload API server for tests: gRPC over a Unix socket, with the protos the `spiffe` package
ships (DESIGN.md §7), serving X.509-SVIDs, X.509 and JWT bundles, and JWT-SVIDs minted on request.

Certificates follow the shape SPIRE issues (a self-signed CA whose URI SAN is the trust domain; leaves
with exactly one SPIFFE ID URI SAN, `CA:FALSE`, digitalSignature, server+client auth), generated with
`cryptography`. Like SPIRE, the server refuses a call without the `workload.spiffe.io: true` header, so the
real client's interceptor is exercised.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jwt
from joserfc.jwk import ECKey
from spiffe._proto import workload_pb2, workload_pb2_grpc


@dataclass
class CA:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Svid:
    spiffe_id: str
    chain_der: bytes  # leaf first, concatenated DER (the Workload API's encoding)
    key_der: bytes  # PKCS#8 DER
    bundle_der: bytes  # the trust domain's CA certificates, concatenated DER


def _utc(at: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(at, dt.UTC)


def make_ca(trust_domain: str, *, now: float | None = None) -> CA:
    now = time.time() if now is None else now
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 60))
        .not_valid_after(_utc(now + 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CA(trust_domain, key, cert)


def issue_svid(
    ca: CA, spiffe_id: str, *, now: float | None = None, ttl: float = 3600, bundle: list[CA] | None = None
) -> Svid:
    """An X.509-SVID signed by `ca`; `bundle` (default: `ca`) is what the Workload API says to trust."""
    now = time.time() if now is None else now
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 60))
        .not_valid_after(_utc(now + ttl))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    trusted = bundle if bundle is not None else [ca]
    return Svid(spiffe_id, cert.public_bytes(serialization.Encoding.DER), key_der, b"".join(c.der for c in trusted))


@dataclass
class JwtAuthority:
    trust_domain: str
    key: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256", parameters={"kid": "jwt-1"}))

    def jwks(self) -> bytes:
        import json

        public = self.key.as_dict(private=False)
        public["use"] = "jwt-svid"  # what SPIRE writes in a JWT bundle
        return json.dumps({"keys": [public]}).encode()

    def mint(self, spiffe_id: str, audience: list[str], *, now: float | None = None, ttl: int = 300) -> str:
        now = time.time() if now is None else now
        claims = {"sub": spiffe_id, "aud": audience, "exp": int(now) + ttl, "iat": int(now)}
        return jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": "JWT"}, claims, self.key)


_HEADER = ("workload.spiffe.io", "true")


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, server: WorkloadApiServer) -> None:
        self.server = server

    def _check(self, context: grpc.ServicerContext) -> bool:
        self.server.calls += 1
        if _HEADER not in tuple(context.invocation_metadata()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        return True

    def _hold(self, context: grpc.ServicerContext) -> None:
        # A real Workload API keeps the stream open and pushes rotations; the client cancels when done.
        while context.is_active() and not self.server.stopping.wait(0.05):
            pass

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._check(context)
        svids = [
            workload_pb2.X509SVID(
                spiffe_id=s.spiffe_id, x509_svid=s.chain_der, x509_svid_key=s.key_der, bundle=s.bundle_der
            )
            for s in self.server.svids
        ]
        if not svids:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        yield workload_pb2.X509SVIDResponse(svids=svids, federated_bundles=self.server.federated)
        self._hold(context)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._check(context)
        bundles = {ca.trust_domain: ca.der for ca in self.server.cas}
        yield workload_pb2.X509BundlesResponse(bundles=bundles)
        self._hold(context)

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._check(context)
        bundles = {a.trust_domain: a.jwks() for a in self.server.jwt_authorities}
        if not bundles:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no JWT bundles")
        yield workload_pb2.JWTBundlesResponse(bundles=bundles)
        self._hold(context)

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        if not self.server.jwt_authorities or not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience required")
        authority = self.server.jwt_authorities[0]
        wanted = request.spiffe_id or (self.server.svids[0].spiffe_id if self.server.svids else "")
        token = authority.mint(wanted, list(request.audience))
        return workload_pb2.JWTSVIDResponse(svids=[workload_pb2.JWTSVID(spiffe_id=wanted, svid=token)])


class WorkloadApiServer:
    """Serves on `unix:<path>`; `svids`, `cas`, `federated` and `jwt_authorities` may be replaced while it runs."""

    def __init__(
        self,
        path: str,
        svids: list[Svid],
        *,
        cas: list[CA] | None = None,
        jwt_authorities: list[JwtAuthority] | None = None,
        federated: dict[str, bytes] | None = None,
    ) -> None:
        self.path = path
        self.svids = svids
        self.cas = cas or []
        self.jwt_authorities = jwt_authorities or []
        self.federated = federated or {}
        self.calls = 0
        self.stopping = threading.Event()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), self._server)  # type: ignore[no-untyped-call]
        self._server.add_insecure_port(f"unix:{path}")

    def start(self) -> WorkloadApiServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.stop(grace=None).wait(5)
