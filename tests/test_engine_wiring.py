"""The real `faramesh serve` with its audit sinks and identity verifiers wired in: committed DPRs reach a
local Splunk HEC receiver (also across an outage and a SIGKILL of the engine), and `principal.*` comes
only from a verified OIDC token — never from what the agent puts in its request."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import EngineDirs, EngineProcess, compile_policy, govern, make_stack
from oidc_issuer import Issuer
from test_sinks import HEC_TOKEN, Receiver, hec_answer, hec_ids

POLICY = """\
runtime {
  backend = "sqlite"
  wal_sync = "normal"
  cold_start_deny_window = "10s"
}

provider "siem" {
  type = "splunk-sink"
  url = env("HEC_URL")
  token = env("HEC_TOKEN")
  index = "faramesh-decisions"
}
%(identity)s
agent "bot" {
  default deny
  rules {
    permit admin/reset if principal.groups contains "admins"
    permit search
  }
}
"""


def _wait(what: str, condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    i = Issuer().start()
    yield i
    i.stop()


def _engine(tmp_path: Path, receiver: Receiver, identity: str = "") -> tuple[EngineProcess, EngineDirs]:
    stack = make_stack(tmp_path, POLICY % {"identity": identity})
    env = {"HEC_URL": receiver.url, "HEC_TOKEN": HEC_TOKEN}
    _, pf = compile_policy(stack, tmp_path / "policy.json", text=POLICY % {"identity": identity})
    assert pf is not None
    dirs = EngineDirs.fresh()
    return EngineProcess(stack, pf, dirs, hooks=env), dirs


def test_every_committed_dpr_reaches_the_siem_across_an_outage_and_a_kill(tmp_path: Path) -> None:
    receiver = Receiver(hec_answer()).start()
    eng, dirs = _engine(tmp_path, receiver)
    try:
        eng.start()
        ids: list[str] = []
        with eng.agent("bot") as bot:
            for i in range(20):
                ids.append(bot.call(govern("search", {"q": i}))["action_id"])
        _wait("the first 20 DPRs at the receiver", lambda: set(ids) <= set(hec_ids(receiver)))
        status = eng.status()
        assert status is not None and status["sinks"][0]["health"] == "HEALTHY", status
        receiver.stop()  # the SIEM goes away: decisions go on, DPRs spool
        with eng.agent("bot") as bot:
            for i in range(30):
                ids.append(bot.call(govern("search", {"q": 100 + i}))["action_id"])
        eng.kill()  # SIGKILL: what was committed is in the spool or re-offered from the WAL at start
        receiver.start()
        eng.start()
        _wait("every DPR at the receiver after the restart", lambda: set(ids) <= set(hec_ids(receiver)))
        assert len(set(hec_ids(receiver))) >= len(ids)
        raw = b"".join(p.read_bytes() for p in Path(dirs.state_root).rglob("*") if p.is_file())
        assert HEC_TOKEN.encode() not in raw  # the token is in no state, spool or WAL file
    finally:
        eng.ensure_stopped()
        receiver.stop()
        dirs.cleanup()


def test_principal_comes_only_from_a_verified_token(tmp_path: Path, issuer: Issuer) -> None:
    receiver = Receiver(hec_answer()).start()
    identity = (
        f'identity "corp" {{\n  type = "oidc"\n  issuer = "{issuer.url}"\n  client_id = "agent-client"\n'
        f'  audience = "faramesh-agents"\n}}\n'
    )
    eng, dirs = _engine(tmp_path, receiver, identity)
    try:
        eng.start()
        with eng.agent("bot") as bot:
            forged = bot.call(govern("admin/reset", principal={"groups": ["admins"]}))
            assert forged["effect"] == "DENY", forged  # no token: the claim in the request counts for nothing
            token = issuer.mint()
            ok = bot.call(govern("admin/reset", principal_token=token))
            assert ok["effect"] == "PERMIT", ok
            other = bot.call(govern("admin/reset", principal_token=issuer.mint(groups=["support"])))
            assert other["effect"] == "DENY" and other["structured_denial"]["code"] == "POLICY_DENY", other
            expired = bot.call(govern("search", principal_token=issuer.mint(exp=int(time.time()) - 3600)))
            assert expired["effect"] == "DENY", expired
            assert expired["structured_denial"]["code"] in ("IDENTITY_INVALID", "IDENTITY_MISMATCH"), expired
        status = eng.status()
        assert status is not None and status["identity"][0]["type"] == "oidc", status
        text = subprocess.run(
            [str(Path(sys.executable).parent / "faramesh"), "status", "--dir", str(eng.stack)],
            env=eng.env, capture_output=True, text=True, timeout=30,
        ).stdout
        assert "identity  corp (oidc): HEALTHY" in text and "sink      siem (splunk-sink): HEALTHY" in text, text
    finally:
        eng.ensure_stopped()
        receiver.stop()
        dirs.cleanup()


def test_without_an_identity_block_a_principal_in_the_request_is_ignored(tmp_path: Path) -> None:
    receiver = Receiver(hec_answer()).start()
    eng, dirs = _engine(tmp_path, receiver)
    try:
        eng.start()
        with eng.agent("bot") as bot:
            forged = bot.call(govern("admin/reset", principal={"groups": ["admins"]}))
        assert forged["effect"] == "DENY", forged
    finally:
        eng.ensure_stopped()
        receiver.stop()
        dirs.cleanup()
