"""Agent identity (issue 6, "Identity"): OIDC ID tokens against a real local issuer (discovery + JWKS over
HTTP on 127.0.0.1), SPIFFE SVIDs from a real gRPC Workload API server on a Unix socket read by the real
`spiffe` client, and the peer-credential fallback. Every failure is a denial with a typed code.

Time is a controllable clock handed to the verifiers (token expiry, cache age, refresh rate limits), so no
test sleeps for it or asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from faramesh.engine.identity import (
    DEGRADED,
    DOWN,
    HEALTHY,
    IDENTITY_INVALID,
    IDENTITY_MISMATCH,
    IDENTITY_UNAVAILABLE,
    IdentityConfigError,
    IdentityResult,
    IdentityVerifier,
)
from faramesh.engine.identity.oidc import KeySet, OidcConfig, OidcVerifier, check_url, parse_jwks
from faramesh.engine.identity.spiffe_workload import SpiffeConfig, SpiffeVerifier
from faramesh.engine.policy.compiler import compile_files
from faramesh.engine.policy.evaluate import evaluate
from faramesh.engine.policy.parser import parse_fpl
from joserfc.jwk import OctKey, RSAKey
from oidc_issuer import Blackhole, Issuer, closed_port_url, new_key, tamper
from spiffe import WorkloadApiClient
from spiffe_server import JwtAuthority, WorkloadApiServer, issue_svid, make_ca

REPO = Path(__file__).resolve().parent.parent
TD = "example.org"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class FakePeer:
    role: str = "agent"
    agent_id: str | None = "bot"
    uid: int | None = 1000
    pid: int | None = 4242
    socket: str = "/run/faramesh/x/agents/bot/agent.sock"


def run(coro: Any) -> IdentityResult:
    result: IdentityResult = asyncio.run(coro)
    return result


# ---- OIDC -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    server = Issuer().start()
    yield server
    server.stop()


def oidc_verifier(issuer_url: str, clock: Clock, **options: Any) -> OidcVerifier:
    block = {"type": "oidc", "issuer": issuer_url, "client_id": "agent-client", "audience": "faramesh-agents"}
    settings = {"timeout": 2.0, "fetch_timeout": 2.0, **options}
    return OidcVerifier(OidcConfig.from_block("prod", block, {}, **settings), clock=clock)


def test_valid_rs256_and_es256_tokens_verify_and_expose_claims(issuer: Issuer) -> None:
    clock = Clock()
    v = oidc_verifier(issuer.url, clock)
    for kid in ("rsa-1", "ec-1"):
        token = issuer.mint(kid, now=clock())
        result = run(v.verify(token))
        assert result.ok, result.message
        assert result.code is None and result.method == "oidc" and result.subject == "user-42"
        assert result.claims["groups"] == ["support", "admins"]
        assert result.record["oidc"]["kid"] == kid and result.record["oidc"]["issuer"] == issuer.url
        assert token not in repr(result)  # a bearer token never reaches a DPR
    assert v.status()["health"] == HEALTHY and v.status()["keys"] == 2


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp_offset": -120}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"aud": ["someone-else", "another"]}, "audience"),
        ({"iss": "http://127.0.0.1:1/evil"}, "issuer"),
        ({"azp": "another-client"}, "authorized_party"),
        ({"nbf_offset": 600}, "not_yet_valid"),
        ({"iat_offset": 600}, "not_yet_valid"),
        ({"exp": None}, "expired"),
        ({"sub": None}, "subject"),
    ],
)
def test_claims_that_do_not_hold_are_refused(issuer: Issuer, claims: dict[str, Any], reason: str) -> None:
    clock = Clock()
    v = oidc_verifier(issuer.url, clock)
    now = int(clock())
    overrides = dict(claims)
    if "exp_offset" in overrides:
        overrides["exp"] = now + overrides.pop("exp_offset")
    if "nbf_offset" in overrides:
        overrides["nbf"] = now + overrides.pop("nbf_offset")
    if "iat_offset" in overrides:
        overrides["iat"] = now + overrides.pop("iat_offset")
    result = run(v.verify(issuer.mint("ec-1", now=now, **overrides)))
    assert not result.ok
    assert (result.code, result.reason) == (IDENTITY_INVALID, reason)
    assert result.claims == {}


def test_small_clock_skew_is_tolerated(issuer: Issuer) -> None:
    clock = Clock()
    v = oidc_verifier(issuer.url, clock)
    now = int(clock())
    assert run(v.verify(issuer.mint(now=now, exp=now - 30))).ok  # 30 s late: within the 60 s leeway
    assert run(v.verify(issuer.mint(now=now, nbf=now + 30))).ok
    assert run(v.verify(issuer.mint(now=now, exp=now - 61))).reason == "expired"


def test_forged_tokens_are_refused_without_touching_the_issuer(issuer: Issuer) -> None:
    clock = Clock()
    v = oidc_verifier(issuer.url, clock)
    assert run(v.verify(issuer.mint(now=clock()))).ok  # warm
    fetched = issuer.jwks_hits
    none = run(v.verify(issuer.mint_alg_none(now=clock())))
    assert (none.code, none.reason) == (IDENTITY_INVALID, "algorithm")
    hs = run(v.verify(issuer.mint_hs256_with_public_key("rsa-1", now=clock())))
    assert (hs.code, hs.reason) == (IDENTITY_INVALID, "algorithm")
    good = issuer.mint("rsa-1", now=clock(), groups=["support"])
    forged = tamper(good, groups=["support", "admins"])
    assert run(v.verify(good)).ok
    t = run(v.verify(forged))
    assert (t.code, t.reason) == (IDENTITY_INVALID, "signature")
    # An RS256 header naming the EC key's kid: a key is only ever used with its own algorithm family.
    attacker = new_key("ec-1", "RS256")
    confused = run(v.verify(issuer.mint(key=attacker, now=clock())))
    assert (confused.code, confused.reason) == (IDENTITY_INVALID, "algorithm")
    for junk in ("", "a.b", "not-a-token", "x.y.z", "a.b.c.d.e"):
        r = run(v.verify(junk))
        assert not r.ok and r.code == IDENTITY_INVALID
    assert issuer.jwks_hits == fetched  # none of these made the engine fetch anything


def test_key_rotation_unknown_kid_refreshes_once_and_is_rate_limited() -> None:
    server = Issuer().start()
    try:
        clock = Clock()
        v = oidc_verifier(server.url, clock, min_refresh_interval=30.0)
        assert run(v.verify(server.mint("rsa-1", now=clock()))).ok
        assert server.jwks_hits == 1
        clock.advance(31)
        rotated = new_key("rsa-2", "RS256")
        server.keys = [rotated, server.key("ec-1")]  # rsa-1 retired, rsa-2 published
        result = run(v.verify(server.mint(key=rotated, now=clock())))
        assert result.ok, result.message
        assert server.jwks_hits == 2  # the unknown kid triggered exactly one re-fetch
        # The retired key is gone from the cache: its tokens no longer verify.
        retired = run(v.verify(server.mint(key=new_key("rsa-1", "RS256"), now=clock())))
        assert (retired.code, retired.reason) == (IDENTITY_INVALID, "unknown_kid")
        # A flood of made-up kids right after a fetch: refused from the cache, no request to the issuer.
        for i in range(20):
            r = run(v.verify(server.mint(key=new_key(f"made-up-{i}", "ES256"), now=clock())))
            assert (r.code, r.reason) == (IDENTITY_INVALID, "unknown_kid")
        assert server.jwks_hits == 2
        clock.advance(31)
        run(v.verify(server.mint(key=new_key("made-up-late", "ES256"), now=clock())))
        assert server.jwks_hits == 3  # once the interval has passed, one more fetch
    finally:
        server.stop()


def test_issuer_down_with_a_cold_cache_fails_closed_within_the_timeout() -> None:
    clock = Clock()
    hole = Blackhole()  # accepts the connection, never answers
    try:
        v = oidc_verifier(hole.url, clock, timeout=0.3, fetch_timeout=1.0)
        result = run(v.verify("e30.e30.sig"))
        assert (result.code, result.reason) == (IDENTITY_UNAVAILABLE, "issuer_unavailable")
        assert not result.ok and result.claims == {}
    finally:
        hole.close()
    refused = oidc_verifier(closed_port_url(), clock, timeout=5.0, fetch_timeout=1.0)
    result = run(refused.verify("e30.e30.sig"))
    assert (result.code, result.reason) == (IDENTITY_UNAVAILABLE, "issuer_unavailable")
    assert "cannot reach" in result.message
    assert refused.status()["health"] == DOWN
    # While down, calls are denied from memory: at most one attempt per failure_backoff, not one per call.
    for _ in range(10):
        assert run(refused.verify("e30.e30.sig")).code == IDENTITY_UNAVAILABLE
    assert refused.fetches == 1
    clock.advance(2)
    run(refused.verify("e30.e30.sig"))
    assert refused.fetches == 2


def test_issuer_down_with_a_warm_cache_degrades_then_fails_closed() -> None:
    server = Issuer().start()
    clock = Clock()
    v = oidc_verifier(server.url, clock, refresh_after=60.0, max_stale=600.0, min_refresh_interval=10.0)
    assert run(v.verify(server.mint(now=clock()))).ok
    token_minter = server
    server.stop()
    clock.advance(120)  # past refresh_after: a background re-fetch starts and fails
    assert run(v.verify(token_minter.mint(now=clock()))).ok  # the cached keys still serve
    for _ in range(200):  # the failed re-fetch runs on its own thread; wait for it to report
        if v.status()["last_error"]:
            break
        time.sleep(0.05)
    assert v.status()["health"] == DEGRADED
    clock.advance(600)  # past max_stale: the cached keys are no longer trusted
    r = run(v.verify(token_minter.mint(now=clock())))
    assert (r.code, r.reason) == (IDENTITY_UNAVAILABLE, "issuer_unavailable")
    assert v.status()["health"] == DOWN


def test_discovery_naming_another_issuer_is_not_trusted() -> None:
    server = Issuer().start()
    try:
        server.discovery_issuer = "https://accounts.example.com"
        v = oidc_verifier(server.url, Clock())
        r = run(v.verify(server.mint()))
        assert r.code == IDENTITY_UNAVAILABLE and "another issuer" in r.message
        assert server.jwks_hits == 0
    finally:
        server.stop()


def test_jwks_url_skips_discovery(issuer: Issuer) -> None:
    block = {"type": "oidc", "issuer": issuer.url, "audience": "faramesh-agents", "jwks_url": issuer.url + "/jwks"}
    v = OidcVerifier(OidcConfig.from_block("prod", block, {}), clock=Clock())
    before = issuer.hits["/.well-known/openid-configuration"]
    assert run(v.verify(issuer.mint())).ok
    assert issuer.hits["/.well-known/openid-configuration"] == before


def test_missing_token_is_refused(issuer: Issuer) -> None:
    r = run(oidc_verifier(issuer.url, Clock()).verify(None))
    assert (r.code, r.reason) == (IDENTITY_INVALID, "missing_token")


def test_jwks_parsing_drops_keys_that_could_never_verify_an_id_token() -> None:
    strong = RSAKey.generate_key(2048).as_dict(private=False) | {"kid": "ok"}
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc warns about the weak key this test builds on purpose
        weak = RSAKey.import_key(small).as_dict(private=False) | {"kid": "weak"}
    oct_key = OctKey.generate_key(256).as_dict() | {"kid": "hmac"}
    enc = RSAKey.generate_key(2048).as_dict(private=False) | {"kid": "enc", "use": "enc"}
    wrong_alg = RSAKey.generate_key(2048).as_dict(private=False) | {"kid": "hs", "alg": "HS256"}
    keys = parse_jwks({"keys": [strong, weak, oct_key, enc, wrong_alg, "junk"]}, frozenset({"RS256"}), 0.0)
    assert isinstance(keys, KeySet)
    assert [k.kid for k in keys.keys] == ["ok"] and keys.skipped == 5


def test_issuer_urls_need_https_except_on_loopback() -> None:
    check_url("https://accounts.example.com", "issuer")
    check_url("http://127.0.0.1:8080", "issuer")
    check_url("http://localhost/realms/x", "issuer")
    for bad in ("http://accounts.example.com", "ftp://127.0.0.1/", "https://user:pw@idp.example.com", "nonsense"):
        with pytest.raises(IdentityConfigError):
            check_url(bad, "issuer")
    with pytest.raises(IdentityConfigError, match="issuer"):
        OidcConfig.from_block("prod", {"type": "oidc", "audience": "x"}, {})
    with pytest.raises(IdentityConfigError, match="OIDC_AUD"):
        OidcConfig.from_block("p", {"issuer": "https://idp.example.com", "audience": {"$env": "OIDC_AUD"}}, {})
    config = OidcConfig.from_block(
        "p", {"issuer": "https://idp.example.com", "client_id": {"$env": "CID"}}, {"CID": "client-7"}
    )
    assert (config.audience, config.client_id) == ("client-7", "client-7")  # audience defaults to client_id


def test_claims_reach_conditions_as_principal(issuer: Issuer) -> None:
    """What the pipeline will do with a verified result: `principal.*` in a rule's condition."""
    policy = compile_files(
        parse_fpl(
            'agent "bot" {\n  default deny\n  rules {\n'
            '    permit admin/reset if principal.groups contains "admins" and principal.email == "ops@example.com"\n'
            "  }\n}\n"
        ),
        {},
    )
    v = oidc_verifier(issuer.url, Clock())
    admin = run(v.verify(issuer.mint()))
    support = run(v.verify(issuer.mint(groups=["support"])))
    request = {"agent_id": "bot", "tool_id": "admin/reset", "args": {}}
    assert evaluate(policy, {**request, "principal": dict(admin.claims)}).effect == "PERMIT"
    assert evaluate(policy, {**request, "principal": dict(support.claims)}).effect == "DENY"


# ---- SPIFFE -----------------------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="spf", dir="/tmp") as d:  # short: sun_path holds 107 bytes
        yield d


def spiffe_verifier(path: str, clock: Clock, **options: Any) -> SpiffeVerifier:
    block = {"type": "spiffe", "socket": path, "trust_domain": TD}
    settings = {"timeout": 3.0, "fetch_timeout": 2.0, **options}
    return SpiffeVerifier(SpiffeConfig.from_block("wl", block, {}, **settings), clock=clock)


def test_agent_bound_to_its_spiffe_id_verifies(sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/bot")]).start()
    try:
        v = spiffe_verifier(path, Clock())
        result = run(v.verify("bot"))
        assert result.ok, result.message
        assert result.subject == f"spiffe://{TD}/agent/bot" and result.method == "spiffe"
        assert result.claims["spiffe_id"] == f"spiffe://{TD}/agent/bot"
        assert result.record["spiffe"]["svid"] == "x509" and result.record["spiffe"]["serial"]
        assert v.status()["health"] == HEALTHY and v.status()["svids"] == [f"spiffe://{TD}/agent/bot"]
        assert server.calls >= 1  # the real spiffe client talked to the server (security header included)
    finally:
        server.stop()


def test_another_spiffe_id_is_an_identity_mismatch(sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/other")]).start()
    try:
        v = spiffe_verifier(path, Clock())
        r = run(v.verify("bot"))
        assert (r.code, r.reason) == (IDENTITY_MISMATCH, "no_svid")
        assert r.record["expected_spiffe_id"] == f"spiffe://{TD}/agent/bot"
        assert run(v.verify("other")).ok
    finally:
        server.stop()


def test_bundles_of_another_trust_domain_do_not_vouch(sock_dir: str) -> None:
    ca, foreign = make_ca(TD), make_ca("other.org")
    path = os.path.join(sock_dir, "api.sock")
    # The SVID for our agent comes with other.org's CA as its bundle: its chain cannot verify.
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/bot", bundle=[foreign])]).start()
    try:
        r = run(spiffe_verifier(path, Clock()).verify("bot"))
        assert (r.code, r.reason) == (IDENTITY_INVALID, "untrusted")
        # An SVID of another trust domain, with its own (valid) bundle, is not ours either.
        server.svids = [issue_svid(foreign, "spiffe://other.org/agent/bot")]
        v = spiffe_verifier(path, Clock())
        r = run(v.verify("bot"))
        assert (r.code, r.reason) == (IDENTITY_MISMATCH, "no_svid")
        assert v.status()["rejected"] == {"spiffe://other.org/agent/bot": "trust_domain"}
    finally:
        server.stop()


def test_an_svid_past_its_validity_is_refused(sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    clock = Clock()
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/bot", now=clock(), ttl=30)]).start()
    try:
        v = spiffe_verifier(path, clock, refresh_after=600.0, max_stale=900.0)
        assert run(v.verify("bot")).ok
        clock.advance(60)
        r = run(v.verify("bot"))
        assert (r.code, r.reason) == (IDENTITY_INVALID, "expired")
    finally:
        server.stop()


def test_workload_api_gone_fails_closed(sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    clock = Clock()
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/bot")]).start()
    v = spiffe_verifier(path, clock, refresh_after=10.0, max_stale=60.0)
    assert run(v.verify("bot")).ok
    server.stop()
    assert not asyncio.run(v.refresh())  # the Workload API no longer answers
    assert v.status()["health"] == DEGRADED and v.status()["last_error"]
    clock.advance(61)
    r = run(v.verify("bot"))
    assert (r.code, r.reason) == (IDENTITY_UNAVAILABLE, "workload_api_unavailable")
    assert v.status()["health"] == DOWN
    # Never there at all (no socket file): denied at once, with the reason.
    cold = spiffe_verifier(os.path.join(sock_dir, "missing.sock"), Clock())
    r = run(cold.verify("bot"))
    assert r.code == IDENTITY_UNAVAILABLE and "not there" in r.record["error"]
    assert "not there" not in r.message and "/" not in r.message  # the agent sees no path or gRPC detail
    assert run(cold.verify("bot")).code == IDENTITY_UNAVAILABLE and cold.fetches == 1  # backing off


def test_jwt_svid_in_principal_token(sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    authority = JwtAuthority(TD)
    svids = [issue_svid(ca, f"spiffe://{TD}/agent/bot"), issue_svid(ca, f"spiffe://{TD}/agent/other")]
    server = WorkloadApiServer(path, svids, jwt_authorities=[authority]).start()
    try:
        # The agent's JWT-SVID, fetched by the real client as a workload would.
        with WorkloadApiClient(f"unix:{path}", 2.0) as agent_side:
            token = agent_side.fetch_jwt_svid({"faramesh"}).token
        v = spiffe_verifier(path, Clock())
        ok = run(v.verify("bot", token))
        assert ok.ok, ok.message
        assert ok.record["spiffe"]["svid"] == "x509+jwt"
        other = run(v.verify("other", token))
        assert (other.code, other.reason) == (IDENTITY_MISMATCH, "jwt_subject")
        wrong_aud = run(v.verify("bot", authority.mint(f"spiffe://{TD}/agent/bot", ["someone-else"])))
        assert wrong_aud.code == IDENTITY_INVALID
        foreign = JwtAuthority(TD).mint(f"spiffe://{TD}/agent/bot", ["faramesh"])  # same kid, another key
        assert run(v.verify("bot", foreign)).code == IDENTITY_INVALID
    finally:
        server.stop()


def test_spiffe_config_errors() -> None:
    with pytest.raises(IdentityConfigError, match="absolute"):
        SpiffeConfig.from_block("wl", {"socket": "spire.sock", "trust_domain": TD}, {})
    with pytest.raises(IdentityConfigError, match="trust domain"):
        SpiffeConfig.from_block("wl", {"socket": "/run/spire.sock", "trust_domain": "Not A Domain!"}, {})
    with pytest.raises(IdentityConfigError, match="socket"):
        SpiffeConfig.from_block("wl", {"trust_domain": TD}, {})
    config = SpiffeConfig.from_block("wl", {"socket": "unix:///run/spire/agent.sock", "trust_domain": TD}, {})
    assert config.socket == "unix:/run/spire/agent.sock"
    assert config.expected_id("support-bot") == f"spiffe://{TD}/agent/support-bot"


# ---- the combined verifier the engine calls ---------------------------------------------------------------


@dataclass(frozen=True)
class _Policy:
    identities: dict[str, dict[str, Any]]


def test_without_identity_blocks_peer_credentials_are_the_identity() -> None:
    v = IdentityVerifier.from_policy(_Policy({}), {})
    assert not v.declared
    r = run(v.verify("bot", FakePeer(), None))
    assert r.ok and r.method == "peercred" and r.subject == "uid:1000"
    assert dict(r.record) == {"method": "peercred", "subject": "uid:1000"}
    dev = run(IdentityVerifier.from_policy(_Policy({}), {}, dev=True).verify("bot", FakePeer(), None))
    assert dev.record["stub_spiffe_id"] == "spiffe://dev.local/bot"  # a stub, and the DPR says so
    assert v.status() == [{"name": None, "type": "peercred", "health": HEALTHY, "last_error": None, "dev": False}]


def test_spiffe_and_oidc_together(issuer: Issuer, sock_dir: str) -> None:
    ca = make_ca(TD)
    path = os.path.join(sock_dir, "api.sock")
    server = WorkloadApiServer(path, [issue_svid(ca, f"spiffe://{TD}/agent/bot")]).start()
    try:
        policy = _Policy(
            {
                "idp": {
                    "type": "oidc",
                    "issuer": issuer.url,
                    "client_id": "agent-client",
                    "audience": "faramesh-agents",
                },
                "prod": {"type": "spiffe", "socket": path, "trust_domain": TD},
            }
        )
        v = IdentityVerifier.from_policy(policy, {}, clock=Clock())
        v.start()
        token = issuer.mint(spiffe_id="spiffe://example.org/agent/admin")  # a claim cannot override the SVID
        r = run(v.verify("bot", FakePeer(), token))
        assert r.ok, r.message
        assert r.method == "spiffe+oidc" and r.subject == f"spiffe://{TD}/agent/bot"
        assert r.claims["spiffe_id"] == f"spiffe://{TD}/agent/bot" and r.claims["sub"] == "user-42"
        assert set(r.record) >= {"spiffe", "oidc"}
        assert run(v.verify("bot", FakePeer(), None)).reason == "missing_token"
        assert run(v.verify("other", FakePeer(agent_id="other"), token)).code == IDENTITY_MISMATCH
        assert [s["type"] for s in v.status()] == ["spiffe", "oidc"]
        v.close()
    finally:
        server.stop()


def test_a_verifier_that_raises_is_a_denial() -> None:
    class Broken:
        name = "broken"

        def start(self) -> None: ...
        def close(self) -> None: ...
        def status(self) -> dict[str, Any]:
            return {}

        async def verify(self, agent_id: str, token: str | None = None) -> IdentityResult:
            raise RuntimeError("defect")

    r = run(IdentityVerifier([Broken()]).verify("bot", FakePeer(), None))
    assert not r.ok and (r.code, r.reason) == (IDENTITY_UNAVAILABLE, "verifier_error")


def test_heavy_libraries_load_only_for_declared_types() -> None:
    script = (
        "import sys\n"
        "from faramesh.engine.identity import IdentityVerifier\n"
        "class P:\n    identities = {}\n"
        "IdentityVerifier.from_policy(P(), {})\n"
        "print(sorted(m for m in ('grpc', 'spiffe', 'joserfc') if m in sys.modules))\n"
        "P.identities = {'i': {'type': 'oidc', 'issuer': 'https://idp.example.com', 'audience': 'a'}}\n"
        "IdentityVerifier.from_policy(P(), {})\n"
        "print(sorted(m for m in ('grpc', 'spiffe', 'joserfc') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split("\n")[:2] == ["[]", "['joserfc']"]
