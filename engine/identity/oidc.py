"""`identity "x" { type = "oidc" }`: ID tokens verified against the issuer's discovery document and JWKS.

The token is the govern request's `principal_token`. Verification is a pure function of the token, the
cached key set, the configuration and `now` (`verify_token`); the verifier around it keeps the key set
fresh on a background thread:

- discovery: `<issuer>/.well-known/openid-configuration`, whose `issuer` must equal the configured one
  exactly (OpenID Connect Discovery §4.3); `jwks_url` in the block skips discovery and names the key set.
- the JWKS is cached and re-fetched in the background once older than `refresh_after`; a token whose `kid`
  is not in it triggers one re-fetch (key rotation), at most once per `min_refresh_interval`, so a flood of
  made-up `kid`s cannot turn the engine into a load generator against the issuer. A key set older than
  `max_stale` (the issuer unreachable for that long) is no longer used: calls are denied until it answers.
- algorithms: an allow-list of asymmetric ones (RS*, PS*, ES*, EdDSA), narrowed by the issuer's
  `id_token_signing_alg_values_supported`. `none` and HS* are never accepted, and a key is only ever used
  with the algorithm family of its own `kty`/`crv`, so a public key can never serve as an HMAC secret.
  Keys named by the token itself (`jku`, `x5u`, `jwk` headers) are ignored: only the issuer's JWKS counts.
- claims: `iss` equal to the issuer, `aud` containing `audience` (default: `client_id`), `azp` (when
  present) equal to `client_id`, `exp` required, `nbf`/`iat` honoured, all with `leeway` seconds of skew.
- plain `http://` is accepted only for loopback issuers (tests, a local IdP); anything else needs https.
  Redirects and proxy variables are not followed: the engine talks to the issuer it was configured with.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeGuard

import orjson
from faramesh.engine.identity.base import (
    DEFAULT_TIMEOUT,
    DEGRADED,
    DOWN,
    HEALTHY,
    IDENTITY_INVALID,
    IDENTITY_UNAVAILABLE,
    METHOD_OIDC,
    Fetch,
    FetchError,
    IdentityConfigError,
    IdentityResult,
    denied,
    resolve_field,
    safe_error,
)
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

# alg → (kty, accepted curves or None)
ALGORITHMS: Mapping[str, tuple[str, frozenset[str] | None]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", frozenset({"P-256"})),
        "ES384": ("EC", frozenset({"P-384"})),
        "ES512": ("EC", frozenset({"P-521"})),
        "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    }
)
MIN_RSA_BITS = 2048
MAX_DOCUMENT_BYTES = 512 * 1024
MAX_KEYS = 100

PublicKey = RSAKey | ECKey | OKPKey


class TokenError(Exception):
    """A token that does not verify; `reason` is a stable sub-code, the message never quotes the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class OidcConfig:
    name: str
    issuer: str
    audience: str
    client_id: str | None = None
    jwks_url: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # the longest a decision waits for a fetch
    fetch_timeout: float = 5.0  # the longest one fetch may take, in total
    leeway: float = 60.0  # clock skew tolerated on exp / nbf / iat
    min_refresh_interval: float = 30.0  # between two fetches triggered by unknown kids
    refresh_after: float = 300.0  # a key set older than this is re-fetched in the background
    max_stale: float = 3600.0  # a key set older than this is not used at all
    failure_backoff: float = 1.0  # with no usable key set, a failed fetch is retried at most this often
    algorithms: frozenset[str] = frozenset(ALGORITHMS)

    @classmethod
    def from_block(
        cls, name: str, block: Mapping[str, Any], environ: Mapping[str, str], **overrides: Any
    ) -> OidcConfig:
        what = f'identity "{name}"'
        issuer = resolve_field(block.get("issuer"), environ, f"{what} `issuer`")
        if not isinstance(issuer, str) or not issuer:
            raise IdentityConfigError(f'{what} (type "oidc") needs `issuer`, the URL the ID tokens name in `iss`')
        check_url(issuer, f"{what} `issuer`")
        client_id = resolve_field(block.get("client_id"), environ, f"{what} `client_id`")
        audience = resolve_field(block.get("audience"), environ, f"{what} `audience`") or client_id
        if not isinstance(audience, str) or not audience:
            raise IdentityConfigError(f"{what} needs `audience` (or `client_id`): the `aud` its ID tokens must carry")
        jwks_url = resolve_field(block.get("jwks_url"), environ, f"{what} `jwks_url`")
        if jwks_url is not None:
            check_url(str(jwks_url), f"{what} `jwks_url`")
        timeout = block.get("timeout")
        values: dict[str, Any] = {
            "name": name,
            "issuer": issuer,
            "audience": audience,
            "client_id": str(client_id) if client_id else None,
            "jwks_url": str(jwks_url) if jwks_url else None,
        }
        if isinstance(timeout, int | float) and timeout > 0:
            values["timeout"] = float(timeout)
        values.update(overrides)
        return cls(**values)


def check_url(url: str, what: str) -> None:
    """https everywhere; http only to a loopback host. No credentials in the URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        raise IdentityConfigError(f"{what} must not carry credentials")
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise IdentityConfigError(f"{what} must be an https:// URL (plain http is accepted only on loopback): {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- pure core --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Jwk:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own `alg`, when it names one: the token must use exactly that
    key: PublicKey


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[Jwk, ...]
    algorithms: frozenset[str]
    fetched_at: float
    skipped: int = 0  # keys in the document that can never verify an ID token here (oct, enc, weak, unknown)
    by_kid: Mapping[str, Jwk] = field(default_factory=dict)

    @classmethod
    def of(cls, keys: list[Jwk], algorithms: frozenset[str], fetched_at: float, skipped: int) -> KeySet:
        by_kid = {k.kid: k for k in keys if k.kid is not None}
        return cls(tuple(keys), algorithms, fetched_at, skipped, MappingProxyType(by_kid))


def parse_jwks(document: Any, algorithms: frozenset[str], fetched_at: float) -> KeySet:
    """The usable signature keys of a JWKS. Symmetric (`oct`) keys are dropped: an ID token's key is public."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError("the JWKS is not a JSON object with a `keys` list")
    keys: list[Jwk] = []
    skipped = 0
    for entry in document["keys"][:MAX_KEYS]:
        jwk = _parse_jwk(entry, algorithms)
        if jwk is None:
            skipped += 1
        else:
            keys.append(jwk)
    skipped += max(0, len(document["keys"]) - MAX_KEYS)
    return KeySet.of(keys, algorithms, fetched_at, skipped)


def _parse_jwk(entry: Any, algorithms: frozenset[str]) -> Jwk | None:
    if not isinstance(entry, dict):
        return None
    kty, kid, alg, crv = entry.get("kty"), entry.get("kid"), entry.get("alg"), entry.get("crv")
    if kty not in ("RSA", "EC", "OKP") or (kid is not None and not isinstance(kid, str)):
        return None
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if alg is not None and (alg not in algorithms or ALGORITHMS[alg][0] != kty):
        return None
    if kty == "RSA" and _rsa_bits(entry.get("n")) < MIN_RSA_BITS:
        return None  # checked before import: joserfc would only warn
    public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth", "k")}
    try:
        key = import_key(public)
    except (JoseError, ValueError, TypeError):
        return None
    if not isinstance(key, RSAKey | ECKey | OKPKey):
        return None
    return Jwk(kid, str(kty), crv if isinstance(crv, str) else None, alg, key)


def _rsa_bits(modulus: Any) -> int:
    if not isinstance(modulus, str):
        return 0
    try:
        return int.from_bytes(base64.urlsafe_b64decode(modulus + "=" * (-len(modulus) % 4)), "big").bit_length()
    except (binascii.Error, ValueError):
        return 0


def _b64json(segment: str, what: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise TokenError("malformed", f"the token's {what} is not base64url-encoded JSON") from None


def parse_header(token: str) -> tuple[str, str | None]:
    """(alg, kid) of a compact JWS, before any key is looked at."""
    parts = token.split(".")
    if len(parts) == 5:
        raise TokenError("malformed", "encrypted tokens (JWE) are not accepted; send the signed ID token")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError("malformed", "the token is not a compact JWS (header.payload.signature)")
    header = _b64json(parts[0], "header")
    if not isinstance(header, dict):
        raise TokenError("malformed", "the token's header is not a JSON object")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise TokenError("algorithm", "the token names no signature algorithm")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("malformed", "the token's `kid` is not a string")
    return alg, kid


def select_key(keys: KeySet, alg: str, kid: str | None) -> Jwk | None:
    """The key to check a token with, or None when the key set has none for it (an unknown kid)."""
    if kid is not None:
        return keys.by_kid.get(kid)
    kty, curves = ALGORITHMS[alg]
    fits = [k for k in keys.keys if k.kty == kty and (curves is None or k.crv in curves)]
    return fits[0] if len(fits) == 1 else None


def _number(value: Any) -> TypeGuard[int | float]:
    # not bool (an int to isinstance), and never NaN/inf, which would compare as "not expired"
    return type(value) is int or (type(value) is float and math.isfinite(value))


def check_claims(claims: Mapping[str, Any], config: OidcConfig, now: float) -> None:
    if claims.get("iss") != config.issuer:
        raise TokenError("issuer", f"the token was not issued by {config.issuer}")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if config.audience not in audiences:
        raise TokenError("audience", f"the token is not meant for audience {config.audience!r}")
    azp = claims.get("azp")
    if azp is not None and config.client_id is not None and azp != config.client_id:
        raise TokenError("authorized_party", "the token was issued to another client (`azp`)")
    exp = claims.get("exp")
    if not _number(exp):
        raise TokenError("expired", "the token has no expiry (`exp`)")
    if now > exp + config.leeway:
        raise TokenError("expired", "the token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _number(nbf) or now + config.leeway < nbf):
        raise TokenError("not_yet_valid", "the token is not valid yet (`nbf`)")
    iat = claims.get("iat")
    if iat is not None and (not _number(iat) or now + config.leeway < iat):
        raise TokenError("not_yet_valid", "the token was issued in the future (`iat`)")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenError("subject", "the token names no subject (`sub`)")


def verify_signature(token: str, key: Jwk, alg: str) -> dict[str, Any]:
    kty, curves = ALGORITHMS[alg]
    if key.kty != kty or (curves is not None and key.crv not in curves) or (key.alg is not None and key.alg != alg):
        raise TokenError("algorithm", f"the token's algorithm {alg} does not fit the issuer's key {key.kid!r}")
    try:
        signed = jws.deserialize_compact(token, key.key, algorithms=[alg])
    except JoseError:
        raise TokenError("signature", "the token's signature does not verify against the issuer's key") from None
    try:
        claims = orjson.loads(signed.payload)
    except orjson.JSONDecodeError:
        raise TokenError("malformed", "the token's payload is not JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed", "the token's payload is not a JSON object")
    return claims


def verify_token(token: str, keys: KeySet, config: OidcConfig, now: float) -> tuple[dict[str, Any], Jwk]:
    """Verify a compact ID token against a key set; raises TokenError (reason `unknown_kid` when the set
    has no key for it, which the caller may answer with one re-fetch)."""
    alg, kid = parse_header(token)
    if alg not in keys.algorithms:
        raise TokenError("algorithm", f"the token's algorithm {alg[:16]!r} is not accepted")
    key = select_key(keys, alg, kid)
    if key is None:
        raise TokenError("unknown_kid", "the token is signed with a key the issuer does not publish")
    claims = verify_signature(token, key, alg)
    check_claims(claims, config, now)
    return claims, key


# ---- I/O edge ---------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx becomes an HTTPError: the engine reads keys only from the URL it was given


def http_get_json(url: str, timeout: float, *, clock: Callable[[], float] = time.monotonic) -> Any:
    """GET a JSON document with a total deadline and a size bound, no redirects, no proxy variables."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _NoRedirect(),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
    )
    deadline = clock() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "faramesh-engine"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = bytearray()
            while chunk := response.read(65536):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"{url} answered with more than {MAX_DOCUMENT_BYTES} bytes")
                if clock() > deadline:
                    raise FetchError(f"{url} did not answer within {timeout:g}s")
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise FetchError(f"cannot reach {url}: {reason}") from None
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError:
        raise FetchError(f"{url} did not answer with JSON") from None


def fetch_key_set(config: OidcConfig, now: float, get: Callable[[str, float], Any] = http_get_json) -> KeySet:
    algorithms = config.algorithms
    jwks_url = config.jwks_url
    if jwks_url is None:
        discovery_url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = get(discovery_url, config.fetch_timeout)
        if not isinstance(doc, dict):
            raise FetchError("the discovery document is not a JSON object")
        if doc.get("issuer") != config.issuer:
            raise FetchError(f"the discovery document names another issuer than {config.issuer}")
        jwks_url = doc.get("jwks_uri")
        if not isinstance(jwks_url, str):
            raise FetchError("the discovery document has no `jwks_uri`")
        try:
            check_url(jwks_url, "the discovery document's `jwks_uri`")
        except IdentityConfigError as exc:
            raise FetchError(str(exc)) from None
        supported = doc.get("id_token_signing_alg_values_supported")
        if isinstance(supported, list):
            algorithms = algorithms & frozenset(a for a in supported if isinstance(a, str))
            if not algorithms:
                raise FetchError("the issuer signs ID tokens only with algorithms the engine does not accept")
    return parse_jwks(get(jwks_url, config.fetch_timeout), algorithms, now)


class OidcVerifier:
    """One `identity` block of type oidc. `verify` is called on the engine's event loop; fetches are not."""

    type = METHOD_OIDC

    def __init__(
        self,
        config: OidcConfig,
        *,
        clock: Callable[[], float] = time.time,
        get: Callable[[str, float], Any] = http_get_json,
    ) -> None:
        self.config = config
        self.name = config.name
        self._clock = clock
        self._get = get
        self._keys: KeySet | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self.fetches = 0
        self._fetch: Fetch[KeySet] = Fetch(f"oidc-{config.name}", self._do_fetch, self._fetched)

    @property
    def issuer(self) -> str:
        return self.config.issuer

    def _do_fetch(self) -> KeySet:
        self._last_attempt = self._clock()
        self.fetches += 1
        return fetch_key_set(self.config, self._clock(), self._get)

    def _fetched(self, keys: KeySet | None, exc: BaseException | None) -> None:
        if keys is not None:
            self._keys = keys  # one reference swap: the loop sees the old set or the new one, never half
            self._last_error = None
        else:
            self._last_error = safe_error(exc) if exc is not None else "no key set"

    def start(self) -> None:
        self._fetch.trigger()

    def close(self) -> None:
        """Nothing to release: a running fetch is a daemon thread bounded by `fetch_timeout`."""

    def _usable(self, now: float) -> KeySet | None:
        keys = self._keys
        if keys is None or now - keys.fetched_at > self.config.max_stale:
            return None
        return keys

    def _backing_off(self, now: float) -> bool:
        """The last fetch failed moments ago: deny at once rather than dial the issuer on every call."""
        last = self._last_attempt
        return (
            self._last_error is not None
            and not self._fetch.running
            and last is not None
            and now - last < self.config.failure_backoff
        )

    def _may_fetch(self, now: float) -> bool:
        last = self._last_attempt
        return last is None or now - last >= self.config.min_refresh_interval

    def _unavailable(self) -> IdentityResult:
        why = self._last_error or f"no key set within {self.config.timeout:g}s"
        return denied(
            METHOD_OIDC,
            IDENTITY_UNAVAILABLE,
            "issuer_unavailable",
            f'identity "{self.name}": cannot verify ID tokens: the issuer\'s keys are unavailable ({why})',
            verifier=self.name,
        )

    async def verify(self, token: str | None) -> IdentityResult:
        if not token:
            return denied(
                METHOD_OIDC,
                IDENTITY_INVALID,
                "missing_token",
                f'identity "{self.name}" requires an ID token in `principal_token`',
                verifier=self.name,
            )
        now = self._clock()
        keys = self._usable(now)
        if keys is None:
            if self._backing_off(now) or not await self._fetch.wait(self.config.timeout):
                return self._unavailable()
            now = self._clock()
            keys = self._usable(now)
            if keys is None:
                return self._unavailable()
        elif now - keys.fetched_at > self.config.refresh_after and not self._fetch.running and self._may_fetch(now):
            self._fetch.trigger()  # refresh ahead; this call goes on with the set it has
        try:
            claims, key = verify_token(token, keys, self.config, now)
        except TokenError as exc:
            if exc.reason != "unknown_kid":
                return self._invalid(exc)
            if not self._fetch.running and not self._may_fetch(now):
                return self._invalid(exc)  # rate-limited: the last fetch was moments ago
            if not await self._fetch.wait(self.config.timeout) or self._last_error is not None:
                return self._unavailable()
            now = self._clock()
            keys = self._usable(now)
            if keys is None:
                return self._unavailable()
            try:
                claims, key = verify_token(token, keys, self.config, now)
            except TokenError as again:
                return self._invalid(again)
        subject = str(claims["sub"])
        record: dict[str, Any] = {"verifier": self.name, "issuer": self.config.issuer, "kid": key.kid}
        exp = claims.get("exp")
        if _number(exp) and 0 <= exp < 2**53:  # DPR integers stay within JSON's exact range
            record["exp"] = int(exp)
        return IdentityResult(
            ok=True,
            method=METHOD_OIDC,
            subject=subject,
            claims=MappingProxyType(claims),
            record=MappingProxyType({"method": METHOD_OIDC, "subject": subject, "oidc": record}),
        )

    def _invalid(self, exc: TokenError) -> IdentityResult:
        return denied(
            METHOD_OIDC,
            IDENTITY_INVALID,
            exc.reason,
            f'identity "{self.name}": the ID token was refused: {exc.message}',
            verifier=self.name,
        )

    def status(self) -> dict[str, Any]:
        now = self._clock()
        keys = self._keys
        usable = self._usable(now)
        health = HEALTHY if usable is not None and self._last_error is None else DEGRADED if usable else DOWN
        return {
            "name": self.name,
            "type": METHOD_OIDC,
            "health": health,
            "issuer": self.config.issuer,
            "keys": len(keys.keys) if keys else 0,
            "keys_skipped": keys.skipped if keys else 0,
            "keys_age_seconds": int(now - keys.fetched_at) if keys else None,
            "last_error": self._last_error,
        }
