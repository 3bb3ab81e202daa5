"""`identity "x" { type = "spiffe"; socket; trust_domain }`: agents bound to SPIFFE IDs via the Workload API.

Imported only when a spiffe identity is declared: it pulls in `spiffe` and gRPC.

The model. SPIRE registers one entry per agent whose selectors match the engine's workload, so the
Workload API hands the engine an X.509-SVID for every agent it may govern, plus the trust bundle. Each
SVID is verified here (not merely trusted because the socket said so): its SPIFFE ID must be in the
configured trust domain, and its chain must verify against *that* trust domain's bundle at the current
time (`cryptography`'s X.509 path validation). The agent on socket `a` is then bound to the SPIFFE ID
`spiffe://<trust_domain>/agent/a` (the block's `id_template` changes the path): the call is permitted to
proceed only when a verified, unexpired SVID for exactly that ID is held. No SVID for it → the agent is
not who the socket says SPIRE knows (IDENTITY_MISMATCH); an SVID for it that does not verify →
IDENTITY_INVALID; no answer from the Workload API → IDENTITY_UNAVAILABLE.

A request may also carry a JWT-SVID in `principal_token` (an agent that holds one, e.g. fetched before
it was sandboxed): it is validated by the `spiffe` library against the trust domain's JWT bundle from the
Workload API, for the audience `faramesh` (the block's `audience` changes it), and its subject must be
the agent's SPIFFE ID.

The snapshot (SVIDs verified, JWT bundle) is re-fetched in the background once older than
`refresh_after`, and not used once older than `max_stale`: a Workload API that has gone away leads to
denials after that, never to decisions on identities nobody vouches for any more.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography.x509 import verification
from faramesh.engine.identity.base import (
    DEFAULT_TIMEOUT,
    DEGRADED,
    DOWN,
    HEALTHY,
    IDENTITY_INVALID,
    IDENTITY_MISMATCH,
    IDENTITY_UNAVAILABLE,
    METHOD_SPIFFE,
    Fetch,
    FetchError,
    IdentityConfigError,
    IdentityResult,
    denied,
    resolve_field,
    safe_error,
)
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient
from spiffe.bundle.jwt_bundle.errors import AuthorityNotFoundError
from spiffe.errors import PySpiffeError
from spiffe.svid.errors import InvalidAlgorithmError
from spiffe.workloadapi.x509_context import X509Context

DEFAULT_ID_TEMPLATE = "spiffe://{trust_domain}/agent/{agent_id}"
DEFAULT_AUDIENCE = "faramesh"


@dataclass(frozen=True, slots=True)
class SpiffeConfig:
    name: str
    socket: str  # `unix:/path` as the gRPC target
    trust_domain: str
    id_template: str = DEFAULT_ID_TEMPLATE
    audience: str = DEFAULT_AUDIENCE
    timeout: float = DEFAULT_TIMEOUT  # the longest a decision waits for the Workload API
    fetch_timeout: float = 5.0  # the deadline of one Workload API call
    refresh_after: float = 15.0
    max_stale: float = 60.0
    failure_backoff: float = 1.0  # with no usable snapshot, a failed fetch is retried at most this often

    @classmethod
    def from_block(
        cls, name: str, block: Mapping[str, Any], environ: Mapping[str, str], **overrides: Any
    ) -> SpiffeConfig:
        what = f'identity "{name}"'
        socket = resolve_field(block.get("socket"), environ, f"{what} `socket`")
        if not isinstance(socket, str) or not socket:
            raise IdentityConfigError(f'{what} (type "spiffe") needs `socket`, the Workload API socket (SPIRE agent)')
        path = socket.removeprefix("unix://").removeprefix("unix:")
        if not path.startswith("/"):
            raise IdentityConfigError(f"{what} `socket` must be an absolute path to a Unix socket, got {socket!r}")
        trust_domain = resolve_field(block.get("trust_domain"), environ, f"{what} `trust_domain`")
        try:
            td = TrustDomain(str(trust_domain or ""))
        except PySpiffeError as exc:
            raise IdentityConfigError(f"{what} `trust_domain` {trust_domain!r} is not a trust domain: {exc}") from None
        values: dict[str, Any] = {"name": name, "socket": "unix:" + path, "trust_domain": td.name}
        for key in ("id_template", "audience"):
            if isinstance(block.get(key), str) and block[key]:
                values[key] = block[key]
        if "{agent_id}" not in values.get("id_template", DEFAULT_ID_TEMPLATE):
            raise IdentityConfigError(f"{what} `id_template` must contain {{agent_id}}")
        timeout = block.get("timeout")
        if isinstance(timeout, int | float) and timeout > 0:
            values["timeout"] = float(timeout)
        values.update(overrides)
        return cls(**values)

    def expected_id(self, agent_id: str) -> str:
        return self.id_template.format(trust_domain=self.trust_domain, agent_id=agent_id)


@dataclass(frozen=True, slots=True)
class SvidInfo:
    spiffe_id: str
    serial: str
    not_before: float
    not_after: float  # the earliest expiry along the chain


@dataclass(frozen=True, slots=True)
class Snapshot:
    fetched_at: float
    verified: Mapping[str, SvidInfo]
    rejected: Mapping[str, str] = field(default_factory=dict)  # SPIFFE ID → why it did not verify
    jwt_bundle: JwtBundle | None = None
    jwt_error: str | None = None


def verify_context(context: X509Context, trust_domain: str, now: float) -> tuple[dict[str, SvidInfo], dict[str, str]]:
    """Each X.509-SVID of a Workload API answer checked against the configured trust domain's bundle."""
    verified: dict[str, SvidInfo] = {}
    rejected: dict[str, str] = {}
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    authorities = list(bundle.x509_authorities) if bundle is not None else []
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    for svid in context.x509_svids:
        spiffe_id = str(svid.spiffe_id)
        if svid.spiffe_id.trust_domain.name != trust_domain:
            rejected[spiffe_id] = "trust_domain"
            continue
        if not authorities:
            rejected[spiffe_id] = "no_bundle"
            continue
        verifier = verification.PolicyBuilder().store(verification.Store(authorities)).time(at).build_client_verifier()
        try:
            result = verifier.verify(svid.leaf, svid.cert_chain[1:])
        except verification.VerificationError:
            rejected[spiffe_id] = "untrusted"
            continue
        if not any(getattr(name, "value", None) == spiffe_id for name in result.subjects or ()):
            rejected[spiffe_id] = "untrusted"
            continue
        chain = result.chain
        verified[spiffe_id] = SvidInfo(
            spiffe_id,
            format(svid.leaf.serial_number, "x"),
            max(c.not_valid_before_utc.timestamp() for c in chain),
            min(c.not_valid_after_utc.timestamp() for c in chain),
        )
    return verified, rejected


class SpiffeVerifier:
    type = METHOD_SPIFFE

    def __init__(
        self,
        config: SpiffeConfig,
        *,
        clock: Callable[[], float] = time.time,
        client_factory: Callable[[str, float], WorkloadApiClient] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._clock = clock
        self._client_factory = client_factory or (lambda socket, timeout: WorkloadApiClient(socket, timeout))
        self._snapshot: Snapshot | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self.fetches = 0
        self._fetch: Fetch[Snapshot] = Fetch(f"spiffe-{config.name}", self._do_fetch, self._fetched)

    # ---- the Workload API, on the fetch thread
    def _do_fetch(self) -> Snapshot:
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            client = self._client_factory(self.config.socket, self.config.fetch_timeout)
        except PySpiffeError as exc:
            raise FetchError(f"the Workload API at {self.config.socket} is not there: {exc}") from None
        try:
            try:
                context = client.fetch_x509_context()
            except PySpiffeError as exc:
                raise FetchError(f"the Workload API at {self.config.socket} did not hand out SVIDs: {exc}") from None
            now = self._clock()
            verified, rejected = verify_context(context, self.config.trust_domain, now)
            jwt_bundle: JwtBundle | None = None
            jwt_error: str | None = None
            try:
                bundles = client.fetch_jwt_bundles()
                jwt_bundle = bundles.get_bundle_for_trust_domain(TrustDomain(self.config.trust_domain))
                if jwt_bundle is None:
                    jwt_error = f"no JWT bundle for {self.config.trust_domain}"
            except PySpiffeError as exc:  # JWT-SVIDs are optional; X.509 binding works without them
                jwt_error = safe_error(exc)
            return Snapshot(now, MappingProxyType(verified), MappingProxyType(rejected), jwt_bundle, jwt_error)
        finally:
            client.close()

    def _fetched(self, snapshot: Snapshot | None, exc: BaseException | None) -> None:
        if snapshot is not None:
            self._snapshot = snapshot
            self._last_error = None
        else:
            self._last_error = safe_error(exc) if exc is not None else "no answer"

    def start(self) -> None:
        self._fetch.trigger()

    def close(self) -> None:
        """Nothing to release: each fetch opens and closes its own channel."""

    async def refresh(self) -> bool:
        """Fetch now (tests, `faramesh status --refresh`); False when it did not finish within the timeout."""
        return await self._fetch.wait(self.config.timeout) and self._last_error is None

    # ---- decisions, on the event loop
    def _usable(self, now: float) -> Snapshot | None:
        snap = self._snapshot
        if snap is None or now - snap.fetched_at > self.config.max_stale:
            return None
        return snap

    async def _current(self) -> Snapshot | None:
        now = self._clock()
        snap = self._usable(now)
        if snap is None:
            last = self._last_attempt
            failed_recently = (
                self._last_error is not None and last is not None and now - last < self.config.failure_backoff
            )
            if failed_recently and not self._fetch.running:
                return None  # deny at once rather than dial a dead Workload API on every call
            await self._fetch.wait(self.config.timeout)
            return self._usable(self._clock())
        last = self._last_attempt
        stale = now - snap.fetched_at > self.config.refresh_after
        if stale and not self._fetch.running and (last is None or now - last >= self.config.refresh_after / 2):
            self._fetch.trigger()  # refresh ahead (rotations); this call goes on with what it has
        return snap

    def _fail(self, code: str, reason: str, message: str, expected: str | None) -> IdentityResult:
        extra: dict[str, Any] = {"verifier": self.name}
        if expected is not None:
            extra["expected_spiffe_id"] = expected
        return denied(METHOD_SPIFFE, code, reason, f'identity "{self.name}": {message}', **extra)

    async def verify(self, agent_id: str, token: str | None = None) -> IdentityResult:
        try:
            expected = str(SpiffeId(self.config.expected_id(agent_id)))
        except PySpiffeError:
            return self._fail(
                IDENTITY_MISMATCH, "agent_id", f"agent id {agent_id[:64]!r} cannot be part of a SPIFFE ID", None
            )
        snap = await self._current()
        if snap is None:
            why = self._last_error or f"no answer within {self.config.timeout:g}s"
            # The agent reads this message: it names no socket path or gRPC detail (those go to the DPR
            # and the engine's status, where the operator looks).
            result = self._fail(IDENTITY_UNAVAILABLE, "workload_api_unavailable", "the Workload API did not answer",
                                expected)  # fmt: skip
            return dataclasses.replace(result, record={**result.record, "error": why[:300]})
        now = self._clock()
        info = snap.verified.get(expected)
        if info is None:
            rejected = snap.rejected.get(expected)
            if rejected is not None:
                return self._fail(
                    IDENTITY_INVALID,
                    rejected,
                    f"the SVID for {expected} does not verify against the {self.config.trust_domain} trust bundle",
                    expected,
                )
            return self._fail(
                IDENTITY_MISMATCH,
                "no_svid",
                f"the Workload API holds no SVID for {expected}: this agent is not the workload SPIRE registered",
                expected,
            )
        if not info.not_before <= now <= info.not_after:
            return self._fail(IDENTITY_INVALID, "expired", f"the SVID for {expected} is outside its validity", expected)
        details: dict[str, Any] = {
            "verifier": self.name,
            "svid": "x509",
            "serial": info.serial,
            "not_after": int(info.not_after),
        }
        claims: dict[str, Any] = {"spiffe_id": expected, "trust_domain": self.config.trust_domain}
        if token:
            failure = self._check_jwt_svid(token, snap, expected, claims, details)
            if failure is not None:
                return failure
        return IdentityResult(
            ok=True,
            method=METHOD_SPIFFE,
            subject=expected,
            claims=MappingProxyType(claims),
            record=MappingProxyType({"method": METHOD_SPIFFE, "subject": expected, "spiffe": details}),
        )

    def _check_jwt_svid(
        self, token: str, snap: Snapshot, expected: str, claims: dict[str, Any], details: dict[str, Any]
    ) -> IdentityResult | None:
        if snap.jwt_bundle is None:
            return self._fail(
                IDENTITY_UNAVAILABLE,
                "no_jwt_bundle",
                f"cannot validate the JWT-SVID: {snap.jwt_error or 'no JWT bundle'}",
                expected,
            )
        try:
            svid = JwtSvid.parse_and_validate(token, snap.jwt_bundle, {self.config.audience})
        except (PySpiffeError, KeyError, ValueError, TypeError) as exc:
            return self._fail(IDENTITY_INVALID, _jwt_reason(exc), "the JWT-SVID was refused", expected)
        if str(svid.spiffe_id) != expected:
            return self._fail(
                IDENTITY_MISMATCH, "jwt_subject", f"the JWT-SVID names another workload than {expected}", expected
            )
        details["svid"] = "x509+jwt"
        details["jwt_exp"] = int(svid.expiry)
        claims["jwt_audience"] = sorted(svid.audience)
        return None

    def status(self) -> dict[str, Any]:
        now = self._clock()
        snap = self._snapshot
        usable = self._usable(now)
        health = HEALTHY if usable is not None and self._last_error is None else DEGRADED if usable else DOWN
        return {
            "name": self.name,
            "type": METHOD_SPIFFE,
            "health": health,
            "socket": self.config.socket,
            "trust_domain": self.config.trust_domain,
            "svids": sorted(snap.verified) if snap else [],
            "rejected": dict(snap.rejected) if snap else {},
            "age_seconds": int(now - snap.fetched_at) if snap else None,
            "last_error": self._last_error,
        }


def _jwt_reason(exc: BaseException) -> str:
    if isinstance(exc, AuthorityNotFoundError):
        return "unknown_kid"
    if isinstance(exc, InvalidAlgorithmError):
        return "algorithm"
    text = str(exc).lower()
    for needle, reason in (("expired", "expired"), ("audience", "audience"), ("signature", "signature")):
        if needle in text:
            return reason
    return "invalid"
