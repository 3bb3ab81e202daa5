"""The one object the engine asks "who is this?" before it decides a `govern` call.

- No `identity` block: the socket is the identity (DESIGN.md §2) and the kernel's peer credentials
  (SO_PEERCRED) are recorded as such (`method = "peercred"`); in `faramesh dev` the stub SPIFFE ID
  `spiffe://dev.local/<agent>` is recorded alongside, marked as a stub.
- `spiffe` blocks: every one must bind the socket's agent to its SPIFFE ID (spiffe_workload.py).
- `oidc` blocks: the request's `principal_token` must be an ID token of one of them, chosen by its
  (unverified) `iss`; its claims become `principal.*` for conditions. With no `oidc` block, a
  `principal_token` is taken as a JWT-SVID by the `spiffe` blocks.

Results are combined fail-closed: the first failure (spiffe blocks first, in name order) is the answer.
A verifier that raises is a defect, and its call is denied (IDENTITY_UNAVAILABLE), never permitted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import orjson
from faramesh.engine.identity.base import (
    IDENTITY_INVALID,
    IDENTITY_MISMATCH,
    IDENTITY_UNAVAILABLE,
    METHOD_OIDC,
    METHOD_PEERCRED,
    IdentityConfigError,
    IdentityResult,
    PeerInfo,
    denied,
)


class _Block(Protocol):
    name: str

    def start(self) -> None: ...
    def close(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class _Spiffe(_Block, Protocol):
    async def verify(self, agent_id: str, token: str | None = None) -> IdentityResult: ...


class _Oidc(_Block, Protocol):
    @property
    def issuer(self) -> str: ...
    async def verify(self, token: str | None) -> IdentityResult: ...


class _HasIdentities(Protocol):
    @property
    def identities(self) -> Mapping[str, Mapping[str, Any]]: ...


def _unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims, read without verifying anything: used only to pick which verifier checks it."""
    import base64
    import binascii

    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


class IdentityVerifier:
    def __init__(self, spiffe: list[_Spiffe] | None = None, oidc: list[_Oidc] | None = None, *, dev: bool = False):
        self.spiffe: list[_Spiffe] = list(spiffe or [])
        self.oidc: list[_Oidc] = list(oidc or [])
        self.dev = dev

    @classmethod
    def from_policy(
        cls,
        policy: _HasIdentities,
        environ: Mapping[str, str],
        *,
        dev: bool = False,
        clock: Callable[[], float] = time.time,
        oidc_options: Mapping[str, Any] | None = None,
        spiffe_options: Mapping[str, Any] | None = None,
    ) -> IdentityVerifier:
        """Build (no I/O) the verifiers the policy declares. A block the engine cannot use raises
        IdentityConfigError (a ValueError), so the engine refuses to start. `*_options` override
        OidcConfig/SpiffeConfig fields (tests shorten timeouts; there is no such knob in the policy)."""
        spiffe: list[_Spiffe] = []
        oidc: list[_Oidc] = []
        for name, block in sorted(policy.identities.items()):
            kind = block.get("type")
            if kind == "spiffe":
                # gRPC and the spiffe library load only here, when a spiffe identity is declared.
                from faramesh.engine.identity.spiffe_workload import SpiffeConfig, SpiffeVerifier

                config = SpiffeConfig.from_block(name, block, environ, **dict(spiffe_options or {}))
                spiffe.append(SpiffeVerifier(config, clock=clock))
            elif kind == "oidc":
                from faramesh.engine.identity.oidc import OidcConfig, OidcVerifier

                oidc.append(
                    OidcVerifier(OidcConfig.from_block(name, block, environ, **dict(oidc_options or {})), clock=clock)
                )
            else:
                raise IdentityConfigError(f'identity "{name}" has a type this engine cannot verify: {kind!r}')
        return cls(spiffe, oidc, dev=dev)

    def _blocks(self) -> list[_Block]:
        return [*self.spiffe, *self.oidc]

    @property
    def declared(self) -> bool:
        return bool(self.spiffe or self.oidc)

    def start(self) -> None:
        """Begin fetching key material in the background, so the first calls find it warm."""
        for v in self._blocks():
            v.start()

    def close(self) -> None:
        for v in self._blocks():
            v.close()

    def status(self) -> list[dict[str, Any]]:
        """One entry per declared block: name, type, health (HEALTHY | DEGRADED | DOWN), last_error, …;
        without any, the peer-credential method (always healthy: the kernel answers it)."""
        if not self.declared:
            return [{"name": None, "type": METHOD_PEERCRED, "health": "HEALTHY", "last_error": None, "dev": self.dev}]
        return [v.status() for v in self._blocks()]

    def peercred(self, agent_id: str | None, peer: PeerInfo) -> IdentityResult:
        method = METHOD_PEERCRED if peer.uid is not None else "socket"
        subject = f"uid:{peer.uid}" if peer.uid is not None else None
        record: dict[str, Any] = {"method": method, "subject": subject}
        claims: dict[str, Any] = {"uid": peer.uid} if peer.uid is not None else {}
        if self.dev and agent_id is not None:
            record["stub_spiffe_id"] = f"spiffe://dev.local/{agent_id}"  # faramesh dev: a stub, and it says so
            claims["spiffe_id"] = record["stub_spiffe_id"]
        return IdentityResult(
            ok=True, method=method, subject=subject, claims=MappingProxyType(claims), record=MappingProxyType(record)
        )

    async def verify(self, agent_id: str | None, peer: PeerInfo, principal_token: str | None) -> IdentityResult:
        """Who is calling: never raises; waits on the network at most the blocks' `timeout`."""
        if not self.declared:
            return self.peercred(agent_id, peer)
        if agent_id is None:
            return denied("identity", IDENTITY_MISMATCH, "agent_id", "no agent id to bind an identity to")
        try:
            return await self._verify(agent_id, principal_token)
        except Exception as exc:  # a defect in a verifier: fail closed for this call, keep serving
            return denied(
                "identity",
                IDENTITY_UNAVAILABLE,
                "verifier_error",
                f"identity verification failed ({type(exc).__name__})",
            )

    async def _verify(self, agent_id: str, token: str | None) -> IdentityResult:
        oidc: _Oidc | None = None
        if self.oidc:
            if token:
                iss = _unverified_issuer(token)
                oidc = next((v for v in self.oidc if v.issuer == iss), None)
                if oidc is None and len(self.oidc) > 1:
                    return denied(
                        METHOD_OIDC,
                        IDENTITY_INVALID,
                        "issuer",
                        "the ID token names an issuer no identity block accepts",
                    )
            oidc = oidc or self.oidc[0]  # one block: let it say exactly what is wrong with the token
        spiffe_token = token if not self.oidc else None
        checks = [v.verify(agent_id, spiffe_token) for v in self.spiffe]
        if oidc is not None:
            checks.append(oidc.verify(token))
        results = [await checks[0]] if len(checks) == 1 else await asyncio.gather(*checks)
        for result in results:
            if not result.ok:
                return result
        if len(results) == 1:
            return results[0]
        return _combine(results)


def _combine(results: list[IdentityResult]) -> IdentityResult:
    methods = sorted({r.method for r in results}, key=lambda m: (m != "spiffe", m))
    spiffe = next((r for r in results if r.method == "spiffe"), None)
    subject = spiffe.subject if spiffe is not None else results[0].subject
    claims: dict[str, Any] = {}
    record: dict[str, Any] = {"method": "+".join(methods), "subject": subject}
    # OIDC claims first, then SPIFFE's: a token cannot claim a `spiffe_id` the Workload API did not vouch for.
    for r in sorted(results, key=lambda r: r.method == "spiffe"):
        claims.update(r.claims)
        record.update({k: v for k, v in r.record.items() if k not in ("method", "subject")})
    return IdentityResult(
        ok=True,
        method=record["method"],
        subject=subject,
        claims=MappingProxyType(claims),
        record=MappingProxyType(record),
    )
