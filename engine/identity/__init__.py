"""Agent identity: who is on the other end of a `govern` call (DESIGN.md §2, issue 6 "Identity").

`IdentityVerifier.from_policy(policy, environ)` builds the verifiers the policy's `identity` blocks
declare; `await verifier.verify(agent_id, peer, principal_token)` answers with an `IdentityResult`.
Importing this package loads neither gRPC, the spiffe library nor joserfc: each loads when its identity
type is declared.
"""

from faramesh.engine.identity.base import (
    DEGRADED,
    DOWN,
    HEALTHY,
    IDENTITY_INVALID,
    IDENTITY_MISMATCH,
    IDENTITY_UNAVAILABLE,
    IdentityConfigError,
    IdentityResult,
    PeerInfo,
)
from faramesh.engine.identity.verifier import IdentityVerifier

__all__ = [
    "DEGRADED",
    "DOWN",
    "HEALTHY",
    "IDENTITY_INVALID",
    "IDENTITY_MISMATCH",
    "IDENTITY_UNAVAILABLE",
    "IdentityConfigError",
    "IdentityResult",
    "IdentityVerifier",
    "PeerInfo",
]
