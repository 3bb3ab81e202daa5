"""A small OpenID Connect issuer for tests (DESIGN.md §7): discovery + JWKS over HTTP on 127.0.0.1, ID
tokens signed with joserfc (RS256 and ES256 keys), key rotation, and the forged tokens an attacker
would try (alg none, HS256 keyed with the public key, tampered payloads). Counts the requests it serves,
so tests can tell whether the engine re-fetched keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    alg: str
    key: RSAKey | ECKey

    def public_jwk(self) -> dict[str, Any]:
        jwk = dict(self.key.as_dict(private=False))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def new_key(kid: str, alg: str) -> SigningKey:
    if alg == "RS256":
        return SigningKey(kid, alg, RSAKey.generate_key(2048))
    if alg == "ES256":
        return SigningKey(kid, alg, ECKey.generate_key("P-256"))
    raise ValueError(alg)


class Issuer:
    """`http://127.0.0.1:<port>`; `keys` is what the JWKS publishes (replace it to rotate)."""

    def __init__(self, audience: str = "faramesh-agents", client_id: str = "agent-client") -> None:
        self.audience = audience
        self.client_id = client_id
        self.keys = [new_key("rsa-1", "RS256"), new_key("ec-1", "ES256")]
        self.hits: Counter[str] = Counter()
        self.discovery_issuer: str | None = None  # set to publish a discovery document naming someone else
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.hits[self.path] += 1
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.discovery_issuer or issuer.url,
                        "jwks_uri": issuer.url + "/jwks",
                        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                    }
                elif self.path == "/jwks":
                    body = {"keys": [k.public_jwk() for k in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Issuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def jwks_hits(self) -> int:
        return self.hits["/jwks"]

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    def claims(self, now: float | None = None, **overrides: Any) -> dict[str, Any]:
        now = time.time() if now is None else now
        claims: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "azp": self.client_id,
            "sub": "user-42",
            "iat": int(now),
            "exp": int(now) + 300,
            "groups": ["support", "admins"],
            "email": "ops@example.com",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self, kid: str = "rsa-1", *, key: SigningKey | None = None, now: float | None = None, **claims: Any
    ) -> str:
        signer = key or self.key(kid)
        return jwt.encode({"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}, self.claims(now, **claims), signer.key)

    def mint_alg_none(self, now: float | None = None) -> str:
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        return f"{header}.{b64url(json.dumps(self.claims(now)).encode())}."

    def mint_hs256_with_public_key(self, kid: str = "rsa-1", now: float | None = None) -> str:
        """The classic confusion attack: HMAC keyed with the RSA public key's PEM, which anyone can download."""
        public_pem = self.key(kid).key.as_pem(private=False)
        header = b64url(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
        payload = b64url(json.dumps(self.claims(now)).encode())
        signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64url(signature)}"


def tamper(token: str, **changes: Any) -> str:
    """The same signature over a different payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


class Blackhole:
    """A TCP listener on 127.0.0.1 that never answers: connects succeed (the backlog takes them), reads hang."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()


def closed_port_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
