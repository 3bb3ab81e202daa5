"""Alerts (engine/alerts.py) through real engines and real HTTP receivers on 127.0.0.1, and
`faramesh status --watch`, which shows their counters.

Receivers are threaded `http.server`s bound to loopback on free ports; nothing leaves the machine."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import REPO, InProcessEngine, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine.alerts import (
    AlertConfig,
    AlertDispatcher,
    MissingEnvironment,
    alert_body,
    decision_events,
    resolve_env_refs,
)
from faramesh.engine.policy.evaluate import Decision

CARD = "4000000000000002"


class Receiver:
    """A local webhook: records every POST; answers with the next status of `statuses` (then 200), or
    blocks until released when `hang` is set."""

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.hang = hang
        self.release = threading.Event()
        self.arrived = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with outer.arrived:
                    outer.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "raw": raw, "body": json.loads(raw)}
                    )
                    outer.arrived.notify_all()
                if outer.hang:
                    outer.release.wait(30)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.requests)} alert(s) arrived, expected {n}")
                self.arrived.wait(left)
            return list(self.requests)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def alert_policy(notify: str, on: str = "deny", extra_runtime: str = "") -> str:
    return f"""\
runtime {{
  approval_ttl = "1h"
{extra_runtime}
}}

agent "bot" {{
  default deny
  rules {{
    permit search
    permit refund if amount < $25
    defer refund if amount < $500
    deny refund reason "too much"
  }}
  redact refund args: ["card.number", "card.cvv"]
  alert {{ on = "{on}" notify = "{notify}" }}
}}
"""


def alert_stats(eng: InProcessEngine, until: Any = None, timeout: float = 10.0) -> dict[str, int]:
    """The engine's alert counters, read through the operator socket (so on the engine's loop, after the
    alerts of every decision already answered were matched); with `until`, polled until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        with eng.conn("operator") as op:
            stats: dict[str, int] = op.call({"type": "status"})["alerts"]
        if until is None or until(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def start_engine(tmp: Path, text: str, **dispatcher: Any) -> InProcessEngine:
    policy = compile_policy(make_stack(tmp, text))[0]
    eng = InProcessEngine(policy, tmp / "run")
    config = AlertConfig.from_policy(policy, os.environ)
    eng.server.alerts = AlertDispatcher(
        config, backoff=dispatcher.pop("backoff", (0.01, 0.01)), timeout=dispatcher.pop("timeout", 5.0), **dispatcher
    )
    return eng.start()


# ------------------------------------------------------------------------------ delivery


def test_a_deny_alert_reaches_the_receiver_with_the_decisions_facts_and_no_args(tmp: Path, receiver: Receiver) -> None:
    eng = start_engine(tmp, alert_policy(receiver.url))
    try:
        with eng.conn("bot") as bot:
            permitted = bot.call(govern("search", {"q": "x"}))
            denied = bot.call(govern("refund", {"amount": 900, "card": {"number": CARD, "cvv": "999"}}))
        assert permitted["effect"] == "PERMIT" and denied["effect"] == "DENY"
        (got,) = receiver.wait_for(1)
        time.sleep(0.2)
        assert len(receiver.requests) == 1  # only the deny fired
        body = got["body"]
        record = json.loads(eng.store.record_by_id(denied["action_id"]).body)
        assert body["event"] == "deny" and body["agent"] == "bot" and body["tool"] == "refund"
        assert body["effect"] == "DENY" and body["code"] == "POLICY_DENY"
        assert body["rule_ref"] == record["rule_ref"] and body["rule_ref"].startswith("governance.fms:")
        assert body["action_id"] == denied["action_id"] and body["time"] == record["time"]
        assert "args" not in body and "card" not in body and "args_digest" not in body
        assert CARD.encode() not in got["raw"] and b"999" not in got["raw"]
        assert got["path"] == "/hook" and got["headers"]["Content-Type"] == "application/json"
        assert alert_stats(eng, lambda s: s["sent"] == 1)["sent"] == 1
    finally:
        eng.stop()


def test_a_rules_own_notify_fires_when_that_rule_decides(tmp: Path, receiver: Receiver) -> None:
    """`defer refund if … notify "<target>"` (the registry's form) alerts its target when it decides."""
    policy = f"""\
agent "bot" {{
  default deny
  rules {{
    permit search
    defer refund if amount < $500 notify "{receiver.url}"
  }}
}}
"""
    eng = start_engine(tmp, policy)
    try:
        with eng.conn("bot") as bot:
            assert bot.call(govern("search", {"q": "x"}))["effect"] == "PERMIT"
            deferred = bot.call(govern("refund", {"amount": 100}))
        assert deferred["effect"] == "DEFER"
        (got,) = receiver.wait_for(1)
        time.sleep(0.2)
        assert len(receiver.requests) == 1  # the permit's rule has no notify
        assert got["body"]["event"] == "defer" and got["body"]["action_id"] == deferred["action_id"]
    finally:
        eng.stop()


def test_a_target_failing_twice_gets_three_attempts(tmp: Path) -> None:
    flaky = Receiver(statuses=[500, 500, 200])
    try:
        eng = start_engine(tmp, alert_policy(flaky.url))
        try:
            with eng.conn("bot") as bot:
                bot.call(govern("refund", {"amount": 900}))
            got = flaky.wait_for(3)
            assert [r["body"]["action_id"] for r in got] == [got[0]["body"]["action_id"]] * 3
            stats = alert_stats(eng, lambda s: s["sent"] == 1)
            assert stats["sent"] == 1 and stats["retries"] == 2 and stats["failed"] == 0
        finally:
            eng.stop()
    finally:
        flaky.close()


def test_a_target_that_keeps_failing_is_given_up_after_three_attempts(tmp: Path) -> None:
    down = Receiver(statuses=[500] * 10)
    try:
        eng = start_engine(tmp, alert_policy(down.url))
        try:
            with eng.conn("bot") as bot:
                assert bot.call(govern("refund", {"amount": 900}))["effect"] == "DENY"
            down.wait_for(3)
            assert alert_stats(eng, lambda s: s["failed"] == 1)["failed"] == 1
            time.sleep(0.1)
            assert len(down.requests) == 3
        finally:
            eng.stop()
    finally:
        down.close()


def test_a_hanging_target_does_not_slow_decisions_and_overflow_is_dropped_and_counted(tmp: Path) -> None:
    hanging = Receiver(hang=True)
    try:
        eng = start_engine(tmp, alert_policy(hanging.url, on="any"), queue_size=8, workers=2, timeout=20.0)
        try:
            with eng.conn("bot") as bot:
                bot.call(govern("search", {"q": "warm-up"}))
                hanging.wait_for(1)  # a delivery is now stuck inside the receiver
                started = time.monotonic()
                replies = [bot.call(govern("search", {"q": str(i)}, call_id=str(i))) for i in range(50)]
                elapsed = time.monotonic() - started
            assert [r["call_id"] for r in replies] == [str(i) for i in range(50)]
            assert all(r["effect"] == "PERMIT" for r in replies)
            assert elapsed < 10.0, elapsed  # generous: the receiver would hold each delivery for 20 s
            stats = alert_stats(eng)
            assert stats["sent"] == 0 and stats["dropped"] >= 50 + 1 - 2 - 8, stats
            assert stats["queued"] <= 8
        finally:
            hanging.release.set()
            eng.stop()
    finally:
        hanging.close()


def test_an_unreachable_target_never_affects_decisions(tmp: Path) -> None:
    gone = Receiver()
    url = gone.url
    gone.close()  # nothing listens on that port any more
    eng = start_engine(tmp, alert_policy(url, on="any"), timeout=1.0)
    try:
        with eng.conn("bot") as bot:
            assert bot.call(govern("search", {}))["effect"] == "PERMIT"
            assert bot.call(govern("refund", {"amount": 900}))["effect"] == "DENY"
            assert bot.call(govern("refund", {"amount": 10}))["effect"] == "PERMIT"
        assert alert_stats(eng, lambda s: s["failed"] >= 3)["failed"] == 3
        assert eng.server.status()["daemon"]["degraded"] is False
    finally:
        eng.stop()


def test_approved_fires_when_an_operator_approves(tmp: Path, receiver: Receiver) -> None:
    eng = start_engine(tmp, alert_policy(receiver.url, on="approved"))
    try:
        args = {"amount": 100, "card": {"number": CARD, "cvv": "999"}}
        with eng.conn("bot") as bot, eng.conn("operator") as op:
            apr = bot.call(govern("refund", args))["defer_token"]
            time.sleep(0.1)
            assert receiver.requests == []  # a defer is not an approval
            op.call({"type": "approve", "approval_id": apr, "approver": "alice"})
            (got,) = receiver.wait_for(1)
            body = got["body"]
            assert body["event"] == "approved" and body["approval_id"] == apr and "alice" in body["approver"]
            assert body["agent"] == "bot" and body["tool"] == "refund" and body["effect"] == "PERMIT"
            assert body["code"] == "APPROVED"
            assert CARD.encode() not in got["raw"]
            # the approved retry is a permit, not another approval
            assert bot.call(govern("refund", args))["effect"] == "PERMIT"
            time.sleep(0.2)
            assert len(receiver.requests) == 1
    finally:
        eng.stop()


def test_operator_denials_do_not_fire_approved(tmp: Path, receiver: Receiver) -> None:
    eng = start_engine(tmp, alert_policy(receiver.url, on="approved"))
    try:
        with eng.conn("bot") as bot, eng.conn("operator") as op:
            apr = bot.call(govern("refund", {"amount": 100}))["defer_token"]
            op.call({"type": "deny", "approval_id": apr, "reason": "no"})
            time.sleep(0.2)
        assert receiver.requests == []
    finally:
        eng.stop()


def test_slack_alerts_go_to_the_webhook_url_from_the_engines_environment(
    tmp: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = alert_policy("slack://#sec-alerts", extra_runtime='  slack_webhook_url = env("FM_TEST_SLACK_URL")')
    policy = compile_policy(make_stack(tmp, text))[0]
    assert dict(policy.runtime["slack_webhook_url"]) == {"$env": "FM_TEST_SLACK_URL"}  # never the URL itself
    slack_url = f"http://127.0.0.1:{receiver.port}/services/T000/B000/secret"
    monkeypatch.setenv("FM_TEST_SLACK_URL", slack_url)
    eng = InProcessEngine(policy, tmp / "run").start()  # the default dispatcher, resolved from os.environ
    try:
        with eng.conn("bot") as bot:
            r = bot.call(govern("<!channel>", {}))  # an agent-chosen tool id must not ping the channel
            assert r["effect"] == "DENY"
        (got,) = receiver.wait_for(1)
        assert got["path"] == "/services/T000/B000/secret"
        body = got["body"]
        assert body["channel"] == "#sec-alerts" and set(body) == {"text", "channel"}
        assert "DENY" in body["text"] and r["action_id"] in body["text"]
        assert "<!channel>" not in body["text"] and "&lt;!channel&gt;" in body["text"]
    finally:
        eng.stop()


def test_webhook_scheme_means_https() -> None:
    config = AlertConfig()
    assert config.target("webhook://hooks.example.com/x?y=1").url == "https://hooks.example.com/x?y=1"
    assert config.target("https://hooks.example.com/secret/path").shown == "https://hooks.example.com"
    assert config.target("ftp://x").problem is not None
    assert config.target("slack://#x").problem == "no runtime slack_webhook_url is set"
    assert AlertConfig(dev=True).target("#x").stub
    assert AlertConfig("https://hooks.slack.example/T/B/X").target("#ops").slack_channel == "#ops"


def test_an_undeliverable_target_is_counted_and_reported_once(tmp: Path) -> None:
    logged: list[str] = []
    eng = start_engine(tmp, alert_policy("ftp://files.example/alerts"), log=logged.append)
    try:
        with eng.conn("bot") as bot:
            for _ in range(3):
                assert bot.call(govern("refund", {"amount": 900}))["effect"] == "DENY"
        assert alert_stats(eng)["undeliverable"] == 3
        assert len([m for m in logged if "ftp" in m]) == 1
    finally:
        eng.stop()


def test_dev_prints_slack_alerts_when_no_webhook_url_is_set(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from faramesh.engine.runner import dev_server, stack_paths

    text = alert_policy("slack://#sec-alerts", extra_runtime='  socket = "' + str(tmp / "d.sock") + '"')
    stack = make_stack(tmp, text)
    policy = compile_policy(stack)[0]
    server = dev_server(policy, stack, stack_paths(stack, env={"FARAMESH_RUNTIME_DIR": str(tmp / "rt"),
                                                              "FARAMESH_STATE_DIR": str(tmp / "st")}))  # fmt: skip
    record = {"agent_id": "bot", "tool": "refund", "effect": "DENY", "code": "POLICY_DENY", "id": "01J", "time": "t"}

    async def fire() -> None:
        server.alerts.start()
        server.alerts.decision(policy.agents["bot"], record, None)
        await server.alerts.close(0.1)

    asyncio.run(fire())
    assert "dev stub" in capsys.readouterr().err
    assert server.alerts.snapshot()["stubbed"] == 1


# ------------------------------------------------------------------------------ secrets from the environment


def test_env_references_resolve_from_the_engines_environment() -> None:
    assert resolve_env_refs({"$env": "A"}, {"A": "x"}, "f") == "x"
    assert resolve_env_refs({"k": [{"$env": "A"}, 1]}, {"A": "x"}, "f") == {"k": ["x", 1]}
    with pytest.raises(MissingEnvironment, match="B is not set") as info:
        resolve_env_refs({"k": {"$env": "B"}}, {}, "runtime")
    assert "runtime.k" in str(info.value)


def test_serve_refuses_to_start_when_the_slack_url_variable_is_unset(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faramesh.engine.runner import EngineStartError, serve_server, stack_paths

    monkeypatch.delenv("FM_TEST_UNSET_SLACK", raising=False)
    text = alert_policy("slack://#x", extra_runtime='  slack_webhook_url = env("FM_TEST_UNSET_SLACK")')
    stack = make_stack(tmp, text)
    _, pf = compile_policy(stack, tmp / "policy.json")
    paths = stack_paths(stack, env={"FARAMESH_STATE_DIR": str(tmp / "st"), "FARAMESH_RUNTIME_DIR": str(tmp / "rt")})
    with pytest.raises(EngineStartError, match="FM_TEST_UNSET_SLACK"):
        serve_server(stack, paths, pf)


def test_a_literal_slack_webhook_url_is_refused_at_compile_time(tmp: Path) -> None:
    from faramesh.engine.policy.errors import PolicySecretError

    text = alert_policy("#x", extra_runtime='  slack_webhook_url = "https://hooks.slack.com/services/T/B/X"')
    with pytest.raises(PolicySecretError):
        compile_policy(make_stack(tmp, text))


def test_reload_is_refused_when_a_referenced_variable_is_unset(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faramesh.engine.policy.model import CompiledPolicy

    monkeypatch.delenv("FM_TEST_UNSET_SLACK", raising=False)
    policy = compile_policy(make_stack(tmp, alert_policy("#x")))[0]
    newer = compile_policy(
        make_stack(tmp, alert_policy("#x", extra_runtime='  slack_webhook_url = env("FM_TEST_UNSET_SLACK")'), "b")
    )[0]

    def loader(version: str) -> CompiledPolicy:
        return newer

    eng = InProcessEngine(policy, tmp / "run")
    eng.server.policy_loader = loader
    eng.start()
    try:
        with eng.conn("operator") as op:
            reply = op.call({"type": "reload", "policy_version": newer.version})
        assert reply["error"]["code"] == "RELOAD_REFUSED" and "FM_TEST_UNSET_SLACK" in reply["error"]["message"]
        assert eng.server.policy is policy
    finally:
        eng.stop()


# ------------------------------------------------------------------------------ matching


def _decision(budget_warn: bool = False) -> Decision:
    return Decision("PERMIT", "POLICY_PERMIT", "f:1", "r", "t", budget_warn=budget_warn)


@pytest.mark.parametrize(
    ("record", "budget_warn", "expected"),
    [
        ({"effect": "DENY", "code": "POLICY_DENY"}, False, {"any", "deny"}),
        ({"effect": "DENY", "code": "RATE_EXCEEDED"}, False, {"any", "deny", "rate_exceeded"}),
        ({"effect": "DENY", "code": "BUDGET_EXCEEDED"}, False, {"any", "deny", "budget_exceeded"}),
        ({"effect": "DEFER", "code": "BUDGET_EXCEEDED"}, False, {"any", "defer", "budget_exceeded"}),
        ({"effect": "DENY", "code": "EGRESS_DENIED"}, False, {"any", "deny", "egress_denied"}),
        ({"effect": "PERMIT", "code": "POLICY_PERMIT"}, True, {"any", "permit", "budget_warning"}),
        ({"effect": "DEFER", "code": "POLICY_DEFER"}, False, {"any", "defer"}),
        # audit mode: the policy's decision is what alerts match
        (
            {"effect": "PERMIT", "code": "AUDIT_MODE_PERMIT", "policy_effect": "DENY", "policy_code": "POLICY_DENY"},
            False,
            {"any", "deny"},
        ),
    ],
)
def test_decision_events(record: dict[str, Any], budget_warn: bool, expected: set[str]) -> None:
    assert decision_events(record, _decision(budget_warn)) == expected


def test_rate_exceeded_and_egress_denied_alerts_fire_from_real_decisions(tmp: Path, receiver: Receiver) -> None:
    text = f"""\
agent "bot" {{
  default deny
  rules {{
    permit fetch
  }}
  rate_limit "fetch": 1 per minute
  egress {{ allow = ["api.example.com"] }}
  alert {{ on = "rate_exceeded" notify = "{receiver.url}" }}
  alert {{ on = "egress_denied" notify = "{receiver.url}" }}
}}
"""
    eng = start_engine(tmp, text)
    try:
        with eng.conn("bot") as bot:
            assert bot.call(govern("fetch", {"url": "http://169.254.169.254/"}))["effect"] == "DENY"
            assert bot.call(govern("fetch", {"url": "https://api.example.com/"}))["effect"] == "PERMIT"
            assert bot.call(govern("fetch", {"url": "https://api.example.com/"}))["effect"] == "DENY"
        got = receiver.wait_for(2)
        assert sorted((r["body"]["event"], r["body"]["code"]) for r in got) == [
            ("egress_denied", "EGRESS_DENIED"),
            ("rate_exceeded", "RATE_EXCEEDED"),
        ]
        assert all(b"169.254" not in r["raw"] for r in got)  # the host is an argument: not in alerts
    finally:
        eng.stop()


def test_alert_bodies_bound_agent_supplied_fields() -> None:
    body = alert_body({"tool": "x" * 10_000, "agent_id": "bot", "args": {"a": 1}}, "deny")
    assert len(body["tool"]) <= 260 and "args" not in body


# ------------------------------------------------------------------------------ status --watch


def test_status_watch_prints_one_json_object_per_line_and_exits_0_on_ctrl_c(tmp: Path) -> None:
    eng = start_engine(tmp, alert_policy("#x"))
    try:
        stack = tmp / "stack"
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "faramesh"), "status", "--dir", str(stack), "--watch", "--format", "json",
             "--socket", str(eng.sockets["operator"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        guard = threading.Timer(30, proc.kill)  # a hung watch fails the test instead of hanging it
        guard.start()
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(2)]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(20)
        finally:
            guard.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        objects = [json.loads(line) for line in lines]
        assert all(o["daemon"]["state"] == "READY" and "alerts" in o for o in objects)
        assert objects[1]["daemon"]["uptime_seconds"] >= objects[0]["daemon"]["uptime_seconds"]
        assert all("\n" not in line.rstrip("\n") for line in lines)
    finally:
        eng.stop()


def test_status_watch_text_redraws_and_keeps_watching_a_stopped_engine(tmp: Path) -> None:
    stack = make_stack(tmp, alert_policy("#x"))
    env = {**os.environ, "FARAMESH_RUNTIME_DIR": str(tmp / "rt"), "FARAMESH_STATE_DIR": str(tmp / "st")}
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "faramesh"), "status", "--dir", str(stack), "--watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    guard = threading.Timer(30, proc.kill)
    guard.start()
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert "DOWN" in first and "DOWN" in second


def test_sandbox_violation_alerts_fire_from_the_supervisors_report(tmp: Path, receiver: Receiver) -> None:
    eng = start_engine(tmp, alert_policy(receiver.url, on="sandbox_violation"))
    try:
        with eng.conn("operator") as op:
            reply = op.call({"type": "sandbox_violation", "agent_id": "bot", "attempts": {"mount": 3, "ptrace": 1}})
        assert reply.get("count") == 4, reply
        (got,) = receiver.wait_for(1)
        assert got["body"]["event"] == "sandbox_violation" and got["body"]["agent"] == "bot"
        assert got["body"]["code"] == "SANDBOX_VIOLATION"
    finally:
        eng.stop()
