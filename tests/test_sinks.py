"""Audit sinks (issue 6): Splunk HEC, Datadog logs intake, webhook and S3, against real receivers.

HTTP sinks talk to small HTTP/1.1 receivers this file runs on 127.0.0.1, which check the path, the
auth header (or the webhook's HMAC) and the body shape before they acknowledge; S3 goes through real
boto3 to a `moto_server` on loopback. Every wait below has a generous upper bound that only keeps a
broken test from hanging; no assertion depends on how long anything took.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from faramesh.engine.sinks import SinkConfigError, SinkDispatcher, SinkOptions
from faramesh.engine.sinks.base import Batch, Position, backoff_delay
from faramesh.engine.sinks.spool import Spool, segment_name
from faramesh.engine.sinks.webhook import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookVerificationError,
    verify_webhook,
)

VENV_BIN = Path(sys.executable).parent
WAIT = 30.0  # upper bound for a condition to come true; never asserted on
HEC_TOKEN = "hec-" + secrets.token_hex(16)
WEBHOOK_SECRET = "whsec-" + secrets.token_hex(16)
DD_KEY = "dd-" + secrets.token_hex(16)
AWS_SECRET = "aws-secret-" + secrets.token_hex(16)
URL_SECRET = "urlsecret" + secrets.token_hex(8)  # in the webhook URL's path: a credential as well
ALL_SECRETS = (HEC_TOKEN, WEBHOOK_SECRET, DD_KEY, AWS_SECRET, URL_SECRET)
FAST = SinkOptions(backoff_base=0.05, backoff_cap=0.2, idle_wait=0.1, timeout=2.0)


# ------------------------------------------------------------------------------------------ helpers


def dpr(chain: str, seq: int) -> dict[str, Any]:
    """A record shaped like a committed DPR (the fields the sinks read, plus typical bulk)."""
    return {
        "schema": "faramesh.dpr/v1",
        "id": f"{chain}-{seq:08d}",
        "chain_id": chain,
        "seq": seq,
        "time": f"2026-11-28T05:19:{seq % 60:02d}.{seq % 1_000_000:06d}Z",
        "agent_id": "support-bot",
        "tool": "stripe/refund",
        "effect": "DENY" if seq % 7 == 0 else "PERMIT",
        "code": "POLICY_DENY" if seq % 7 == 0 else "OK",
        "rule_ref": "governance.fms:14",
        "args_digest": "sha256:" + hashlib.sha256(str(seq).encode()).hexdigest(),
        "prev_record_hash": "0" * 64,
        "record_hash": hashlib.sha256(f"{chain}{seq}".encode()).hexdigest(),
    }


def dprs(chain: str, first: int, last: int) -> list[dict[str, Any]]:
    return [dpr(chain, s) for s in range(first, last + 1)]


def ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in records}


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Logs:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


def assert_no_secret(spool_dir: Path, *texts: str) -> None:
    """No secret in any byte under the spool directory, nor in the log or status text given."""
    blobs = [p.read_bytes() for p in spool_dir.rglob("*") if p.is_file()]
    blobs += [t.encode() for t in texts]
    for secret in ALL_SECRETS:
        for blob in blobs:
            assert secret.encode() not in blob


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Answer = tuple[int, bytes] | None  # None: hang until the receiver stops


@dataclass
class Receiver:
    """An HTTP/1.1 keep-alive receiver on 127.0.0.1. `answer` decides each response; `stop()` closes the
    listener *and* every open connection, as a crashed SIEM would."""

    answer: Callable[[Request], Answer]
    port: int = 0
    requests: list[Request] = field(default_factory=list)  # every request received
    accepted: list[Request] = field(default_factory=list)  # those answered 2xx: what the SIEM really took

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._lock:
                    receiver.requests.append(request)
                answer = receiver.answer(request)
                if answer is None:
                    receiver._release.wait(WAIT)
                    self.close_connection = True
                    return
                status, out = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                if 200 <= status < 300:
                    with receiver._lock:
                        receiver.accepted.append(request)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with receiver._lock:
                    receiver._conns.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with receiver._lock:
                    receiver._conns.discard(request)
                super().shutdown_request(request)

        self._release.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def taken(self) -> list[Request]:
        with self._lock:
            return list(self.accepted)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for r in started:
        r.stop()


# ---- Splunk HEC


def hec_events(body: bytes) -> list[dict[str, Any]]:
    """HEC's body: JSON objects one after another (we also accept any white space between them)."""
    decoder = json.JSONDecoder()
    text, pos, out = body.decode(), 0, []
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
    return out


def hec_answer(token: str = HEC_TOKEN, index: str = "faramesh-decisions") -> Callable[[Request], Answer]:
    """Behaves like HEC: 401 without auth, 403 for a wrong token, 400 for a malformed event."""

    def answer(req: Request) -> Answer:
        if req.path != "/services/collector/event":
            return 404, b'{"text":"The requested URL was not found on this server.","code":404}'
        auth = req.headers.get("authorization")
        if auth is None:
            return 401, b'{"text":"Token is required","code":2}'
        if auth != f"Splunk {token}":
            return 403, b'{"text":"Invalid token","code":4}'
        for event in hec_events(req.body):
            ok = (
                isinstance(event.get("event"), dict)
                and isinstance(event.get("time"), float | int)
                and event.get("source") == "faramesh"
                and event.get("sourcetype") == "faramesh:dpr"
                and event.get("index") == index
                and event.get("fields", {}).get("dpr_id") == event["event"].get("id")
            )
            if not ok:
                return 400, b'{"text":"Invalid data format","code":6}'
        return 200, b'{"text":"Success","code":0}'

    return answer


def hec_ids(receiver: Receiver) -> list[str]:
    return [e["event"]["id"] for req in receiver.taken() for e in hec_events(req.body)]


def splunk_providers(url_var: str = "SPLUNK_URL") -> dict[str, Any]:
    """What the seed's `provider "splunk"` block compiles to."""
    return {
        "splunk": {
            "type": "splunk-sink",
            "url": {"$env": url_var},
            "token": {"$env": "SPLUNK_HEC_TOKEN"},
            "index": "faramesh-decisions",
        }
    }


def splunk(
    receiver: Receiver, spool: Path, logs: Logs, *, token: str = HEC_TOKEN, options: SinkOptions = FAST
) -> SinkDispatcher:
    env = {"SPLUNK_URL": receiver.url, "SPLUNK_HEC_TOKEN": token}
    return SinkDispatcher.from_policy(splunk_providers(), env, spool, logs, options=options)


def status_of(dispatcher: SinkDispatcher) -> dict[str, Any]:
    [status] = dispatcher.status()
    return status


# ------------------------------------------------------------------------------------------ configuration


def test_seed_provider_blocks_compile_and_resolve_from_the_engine_environment(tmp_path: Path) -> None:
    from faramesh.engine.policy.compiler import compile_files
    from faramesh.engine.policy.parser import parse_fpl

    src = textwrap.dedent(
        """
        provider "splunk" {
          type = "splunk-sink"
          url = env("SPLUNK_URL")
          token = env("SPLUNK_HEC_TOKEN")
          index = "faramesh-decisions"
        }
        provider "dd" {
          type = "datadog-sink"
          api_key = env("DD_API_KEY")
          site = "datadoghq.eu"
          tags = ["env:prod"]
        }
        provider "archive" {
          type = "s3-sink"
          bucket = "audit"
          prefix = "dpr"
          region = "us-west-2"
        }
        provider "hook" {
          type = "webhook-sink"
          url = env("HOOK_URL")
          secret = env("HOOK_SECRET")
        }
        agent "a" {
          default deny
        }
        """
    )
    env = {
        "SPLUNK_URL": "https://splunk.example:8088",
        "SPLUNK_HEC_TOKEN": HEC_TOKEN,
        "DD_API_KEY": DD_KEY,
        "HOOK_URL": f"https://hooks.example/{URL_SECRET}",
        "HOOK_SECRET": WEBHOOK_SECRET,
    }
    policy = compile_files(parse_fpl(src), {"governance.fms": "0" * 64}, (), env)
    assert not any(s.encode() in policy.to_json() for s in ALL_SECRETS)  # compiled to $env references
    logs = Logs()
    dispatcher = SinkDispatcher.from_policy(policy, env, tmp_path / "spool", logs)
    assert dispatcher.names == ["archive", "dd", "hook", "splunk"]
    targets = {s["name"]: s["target"] for s in dispatcher.status()}
    assert targets == {
        "archive": "s3://audit/dpr",
        "dd": "https://http-intake.logs.datadoghq.eu:443",
        "hook": "https://hooks.example:443",  # the URL's path is a credential: never shown
        "splunk": "https://splunk.example:8088",
    }
    dispatcher.close(0)
    assert_no_secret(tmp_path, json.dumps(dispatcher.status()), logs.text())


def test_missing_or_bad_environment_is_a_config_error_that_names_no_secret(tmp_path: Path) -> None:
    with pytest.raises(SinkConfigError) as missing:
        SinkDispatcher.from_policy(splunk_providers(), {"SPLUNK_URL": "https://h:8088"}, tmp_path)
    assert missing.value.code == "SINK_CONFIG"
    assert "SPLUNK_HEC_TOKEN" in missing.value.message and 'provider "splunk"' in missing.value.message

    bad_url = f"ftp://{URL_SECRET}.example/x"
    with pytest.raises(SinkConfigError) as bad:
        SinkDispatcher.from_policy(splunk_providers(), {"SPLUNK_URL": bad_url, "SPLUNK_HEC_TOKEN": HEC_TOKEN}, tmp_path)
    assert 'env("SPLUNK_URL")' in bad.value.message and "http:// or https://" in bad.value.message
    assert URL_SECRET not in str(bad.value) and HEC_TOKEN not in str(bad.value)


def test_a_stack_without_sinks_gets_a_no_op_dispatcher_and_no_files(tmp_path: Path) -> None:
    providers = {"vault": {"type": "vault", "addr": "https://v:8200", "token": {"$env": "VAULT_TOKEN"}}}
    dispatcher = SinkDispatcher.from_policy(providers, {}, tmp_path / "spool")
    dispatcher.start()
    dispatcher.offer(dprs("c", 1, 3))
    assert dispatcher.status() == [] and dispatcher.resume_seq("c") is None
    dispatcher.close(0)
    assert not (tmp_path / "spool").exists()


def test_heavy_sdks_are_not_imported_for_a_stack_without_that_sink(tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = Receiver(hec_answer()).start()
    receivers.append(receiver)
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from faramesh.engine.sinks import SinkDispatcher
        providers = {{
            "splunk": {{"type": "splunk-sink", "url": {{"$env": "U"}}, "token": {{"$env": "T"}},
                       "index": "faramesh-decisions"}},
            "archive": {{"type": "s3-sink", "bucket": "b"}},
        }}
        d = SinkDispatcher.from_policy(providers, {{"U": "{receiver.url}", "T": "{HEC_TOKEN}"}}, Path(sys.argv[1]))
        d.start()
        print(sorted(m for m in ("boto3", "botocore") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=WAIT, check=True
    )
    # Even with an S3 sink declared, boto3 waits for that sink's first delivery, on its own thread.
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------------------ Splunk HEC


def test_hec_receives_every_dpr_with_auth_index_and_dedup_fields(tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = Receiver(hec_answer()).start()
    receivers.append(receiver)
    logs = Logs()
    dispatcher = splunk(receiver, tmp_path / "spool", logs)
    dispatcher.start()
    records = dprs("chainA", 1, 2500)
    for i in range(0, len(records), 100):
        dispatcher.offer(records[i : i + 100])
    wait_for("all 2500 DPRs at HEC", lambda: set(hec_ids(receiver)) == ids(records))
    events = [e for req in receiver.snapshot() for e in hec_events(req.body)]
    assert [e["event"] for e in events] == records  # in commit order, each exactly as committed
    first = events[0]
    epoch = datetime(2026, 11, 28, 5, 19, 1, 1, tzinfo=UTC).timestamp()
    assert first["time"] == pytest.approx(epoch, abs=1e-6)  # the DPR's own time, in epoch seconds
    assert first["fields"] == {"dpr_id": "chainA-00000001", "chain_id": "chainA", "seq": "1"}
    assert all(r.headers.get("x-splunk-request-channel") for r in receiver.snapshot())
    wait_for("the status to settle", lambda: status_of(dispatcher)["delivered"] == 2500)
    status = status_of(dispatcher)
    assert status["health"] == "HEALTHY" and status["spooled"] == 0 and status["last_error"] is None

    # A clean restart delivers nothing twice: the acknowledged position survives.
    dispatcher.close(5)
    seen = len(receiver.snapshot())
    again = splunk(receiver, tmp_path / "spool", logs)
    again.start()
    again.offer(dprs("chainA", 2501, 2510))
    wait_for("the next records", lambda: len(set(hec_ids(receiver))) == 2510)
    assert len(hec_ids(receiver)) == 2510  # no record delivered twice
    assert len(receiver.snapshot()) == seen + 1
    assert again.resume_seq("chainA") is not None
    again.close(5)
    assert again.resume_seq("chainA") == 2510
    assert_no_secret(tmp_path, logs.text(), json.dumps(again.status()))


def test_receiver_down_mid_stream_spools_then_delivers_everything(tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = Receiver(hec_answer()).start()
    receivers.append(receiver)
    logs = Logs()
    dispatcher = splunk(receiver, tmp_path / "spool", logs)
    dispatcher.start()
    first, second = dprs("c1", 1, 600), dprs("c1", 601, 1500)
    for i in range(0, len(first), 50):
        dispatcher.offer(first[i : i + 50])
    wait_for("the first part", lambda: status_of(dispatcher)["delivered"] == 600)
    before = hec_ids(receiver)
    assert set(before) == ids(first)

    receiver.stop()
    for i in range(0, len(second), 50):
        dispatcher.offer(second[i : i + 50])
    wait_for("the sink to notice", lambda: status_of(dispatcher)["health"] == "DEGRADED")
    status = status_of(dispatcher)
    assert status["spooled"] == 900 and status["spool_bytes"] > 0 and status["delivered"] == 600
    assert status["last_error"]["code"] == "SINK_UNREACHABLE"
    assert "127.0.0.1" in status["last_error"]["message"]
    assert any("SINK_UNREACHABLE" in line and "retried" in line for line in logs.lines)

    back = Receiver(hec_answer(), port=receiver.port).start()  # the same address, a fresh process
    receivers.append(back)
    wait_for("the spooled part", lambda: set(hec_ids(back)) == ids(second))
    delivered = before + hec_ids(back)
    assert set(delivered) == ids(first + second)  # exactly once after de-duplication by DPR id
    wait_for("recovery", lambda: status_of(dispatcher)["health"] == "HEALTHY")
    wait_for("the spool to drain", lambda: status_of(dispatcher)["spooled"] == 0)
    assert any("delivering again" in line for line in logs.lines)
    dispatcher.close(5)
    assert_no_secret(tmp_path, logs.text(), json.dumps(dispatcher.status()))


def test_bad_token_is_degraded_and_spooled_not_dropped(tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = Receiver(hec_answer()).start()
    receivers.append(receiver)
    logs = Logs()
    wrong = "hec-wrong-" + secrets.token_hex(8)
    dispatcher = splunk(receiver, tmp_path / "spool", logs, token=wrong)
    dispatcher.start()
    records = dprs("c2", 1, 300)
    dispatcher.offer(records)
    wait_for("a refusal", lambda: (status_of(dispatcher)["last_error"] or {}).get("code") == "SINK_REJECTED")
    status = status_of(dispatcher)
    assert status["health"] == "DEGRADED" and status["delivered"] == 0 and status["spooled"] == 300
    message = status["last_error"]["message"]
    assert "HTTP 403" in message and "Invalid token" in message and 'env("SPLUNK_HEC_TOKEN")' in message
    wait_for("a retry", lambda: len(receiver.snapshot()) >= 2)  # kept, and tried again with backoff
    dispatcher.close(1)
    text = logs.text() + json.dumps(dispatcher.status())
    assert wrong not in text and all(wrong.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())

    # The operator fixes the token: the same spool is delivered in full.
    fixed = splunk(receiver, tmp_path / "spool", logs)
    fixed.start()
    wait_for("delivery after the fix", lambda: set(hec_ids(receiver)) == ids(records))
    assert any("replaying 300 record(s)" in line for line in logs.lines)
    wait_for("old segments deleted", lambda: status_of(fixed)["spooled"] == 0)
    fixed.close(5)
    assert_no_secret(tmp_path, logs.text())


def test_5xx_and_timeouts_are_retried_for_the_same_batch(tmp_path: Path, receivers: list[Receiver]) -> None:
    calls: list[int] = []

    def flaky(req: Request) -> Answer:
        calls.append(1)
        n = len(calls)
        if n <= 2:
            return 503, b'{"text":"Server is busy","code":9}'
        if n == 3:
            time.sleep(1.5)  # longer than the sink's timeout: the client gives up, then retries
            return 200, b'{"text":"Success","code":0}'
        return hec_answer()(req)

    receiver = Receiver(flaky).start()
    receivers.append(receiver)
    logs = Logs()
    options = SinkOptions(backoff_base=0.05, backoff_cap=0.2, idle_wait=0.1, timeout=0.5)
    dispatcher = splunk(receiver, tmp_path / "spool", logs, options=options)
    dispatcher.start()
    records = dprs("c3", 1, 40)
    dispatcher.offer(records)
    wait_for("delivery", lambda: status_of(dispatcher)["delivered"] == 40)
    requests = receiver.snapshot()
    assert len(requests) == 4
    assert len({r.body for r in requests}) == 1  # the very same batch each time
    status = status_of(dispatcher)
    assert status["retries"] == 3 and status["health"] == "HEALTHY"
    assert status["last_error"]["code"] == "SINK_TIMEOUT"  # the most recent failure, kept for the operator
    text = logs.text()
    assert "SINK_SERVER_ERROR" in text and "HTTP 503" in text and "SINK_TIMEOUT" in text
    dispatcher.close(5)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    low = [backoff_delay(n, 1.0, 30.0, lambda: 0.0) for n in range(1, 8)]
    high = [backoff_delay(n, 1.0, 30.0, lambda: 1.0) for n in range(1, 8)]
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert high == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_offer_never_blocks_while_the_receiver_hangs(tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = Receiver(lambda req: None).start()  # accepts, reads, never answers
    receivers.append(receiver)
    options = SinkOptions(backoff_base=0.05, backoff_cap=0.2, idle_wait=0.1, timeout=WAIT * 2)
    dispatcher = splunk(receiver, tmp_path / "spool", Logs(), options=options)
    dispatcher.start()
    dispatcher.offer(dprs("c4", 1, 10))
    wait_for("the first request to hang", lambda: len(receiver.snapshot()) == 1)

    def offer_more() -> None:
        for start in range(11, 5011, 100):
            dispatcher.offer(dprs("c4", start, start + 99))

    offering = threading.Thread(target=offer_more)
    offering.start()
    offering.join(WAIT)
    assert not offering.is_alive()  # every offer returned while the sink's only request still hangs
    status = status_of(dispatcher)
    assert len(receiver.snapshot()) == 1 and status["state"] == "delivering" and status["delivered"] == 0
    assert status["spooled"] == 5010 and status["queued"] == 0
    receiver.stop()
    dispatcher.close(0)


# ------------------------------------------------------------------------------------------ crash safety


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from faramesh.engine.sinks import SinkDispatcher, SinkOptions
    sys.path.insert(0, sys.argv[3])
    from test_sinks import dpr, splunk_providers
    env = {"SPLUNK_URL": sys.argv[1], "SPLUNK_HEC_TOKEN": sys.argv[4]}
    d = SinkDispatcher.from_policy(splunk_providers(), env, Path(sys.argv[2]), lambda m: None,
                                   options=SinkOptions(max_records=50, timeout=5.0))
    d.start()
    seq = 0
    while True:
        d.offer([dpr("crash", s) for s in range(seq + 1, seq + 21)])
        seq += 20
        print(seq, flush=True)  # after offer() returned: these must survive a SIGKILL
        time.sleep(0.002)
    """
)


def test_sigkill_mid_stream_loses_nothing_offered(tmp_path: Path, receivers: list[Receiver]) -> None:
    gate = threading.Event()
    answered = [0]

    def stalling(req: Request) -> Answer:
        answered[0] += 1
        if answered[0] > 10:  # the SIEM stalls after ten batches: a backlog is spooled when the engine dies
            gate.wait(WAIT)
        return hec_answer()(req)

    receiver = Receiver(stalling).start()
    receivers.append(receiver)
    spool = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, receiver.url, str(spool), str(Path(__file__).parent), HEC_TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    offered = 0
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + WAIT
        while offered < 3000 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            offered = int(line)
        delivered_before = len(set(hec_ids(receiver)))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
    assert offered >= 3000, child.stderr.read() if child.stderr else ""
    assert 0 < delivered_before <= 500  # killed mid-stream: ten batches (≤ 50 each) delivered, the rest spooled
    gate.set()

    logs = Logs()
    again = splunk(receiver, spool, logs)
    assert again.resume_seq("crash") is not None  # where the engine's WAL catch-up would start
    again.start()
    expected = {dpr("crash", s)["id"] for s in range(1, offered + 1)}
    wait_for("every offered DPR", lambda: expected <= set(hec_ids(receiver)))
    assert any("replaying" in line for line in logs.lines)
    assert all(r.startswith("crash-") for r in hec_ids(receiver))
    again.close(5)


def test_resume_seq_lets_the_engine_re_offer_what_a_crash_kept_from_the_spool(tmp_path: Path) -> None:
    receiver_less = {"SPLUNK_URL": "http://127.0.0.1:9", "SPLUNK_HEC_TOKEN": HEC_TOKEN}  # discard port
    first = SinkDispatcher.from_policy(splunk_providers(), receiver_less, tmp_path, Logs(), options=FAST)
    assert first.resume_seq("w") is None  # a new sink starts with what is committed from now on
    first.offer(dprs("w", 1, 40))
    first.close(0)  # never started: the records are spooled and fsync'd
    second = SinkDispatcher.from_policy(splunk_providers(), receiver_less, tmp_path, Logs(), options=FAST)
    assert second.resume_seq("w") == 40 and second.resume_seq("other") is None
    assert status_of(second)["spool_bytes"] > 0


# ------------------------------------------------------------------------------------------ webhook


def test_webhook_body_is_hmac_signed_and_verifiable(tmp_path: Path, receivers: list[Receiver]) -> None:
    def answer(req: Request) -> Answer:
        if not req.path.endswith(URL_SECRET):
            return 404, b"{}"
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), req.body, hashlib.sha256).hexdigest()
        if req.headers.get(SIGNATURE_HEADER.lower()) != expected:
            return 401, b'{"error":"bad signature"}'
        body = json.loads(req.body)
        if str(body["sent_at"]) != req.headers.get(TIMESTAMP_HEADER.lower()):
            return 401, b'{"error":"timestamp"}'
        if body["batch"] != req.headers.get(DELIVERY_HEADER.lower()) or body["count"] != len(body["records"]):
            return 400, b"{}"
        return 204, b""

    receiver = Receiver(answer).start()
    receivers.append(receiver)
    providers = {"hook": {"type": "webhook-sink", "url": {"$env": "HOOK_URL"}, "secret": {"$env": "HOOK_SECRET"}}}
    env = {"HOOK_URL": f"{receiver.url}/ingest/{URL_SECRET}", "HOOK_SECRET": WEBHOOK_SECRET}
    logs = Logs()
    dispatcher = SinkDispatcher.from_policy(
        providers, env, tmp_path / "spool", logs, options=SinkOptions(max_records=100, idle_wait=0.1)
    )
    dispatcher.start()
    records = dprs("wh", 1, 250)
    dispatcher.offer(records)
    wait_for("delivery", lambda: status_of(dispatcher)["delivered"] == 250)
    got = [r for req in receiver.snapshot() for r in json.loads(req.body)["records"]]
    assert got == records
    assert [json.loads(r.body)["batch"] for r in receiver.snapshot()] == ["wh:1-100", "wh:101-200", "wh:201-250"]

    # The documented verifier accepts what was sent and refuses tampering, a wrong secret and replays.
    req = receiver.snapshot()[0]
    sig, stamp = req.headers[SIGNATURE_HEADER.lower()], req.headers[TIMESTAMP_HEADER.lower()]
    now = float(stamp)
    assert verify_webhook(WEBHOOK_SECRET, req.body, sig, stamp, now=now)["count"] == 100
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_SECRET, req.body.replace(b"PERMIT", b"DENY\x20\x20", 1), sig, stamp, now=now)
    with pytest.raises(WebhookVerificationError):
        verify_webhook("not-the-secret", req.body, sig, stamp, now=now)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_SECRET, req.body, sig, str(int(stamp) + 1), now=now)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(WEBHOOK_SECRET, req.body, sig, stamp, now=now + 3600)
    assert status_of(dispatcher)["target"] == receiver.url  # never the path, which holds a credential
    dispatcher.close(5)
    assert_no_secret(tmp_path, logs.text(), json.dumps(dispatcher.status()))


# ------------------------------------------------------------------------------------------ Datadog


def test_datadog_logs_intake_gets_a_json_array_with_the_api_key(tmp_path: Path, receivers: list[Receiver]) -> None:
    def answer(req: Request) -> Answer:
        if req.path != "/api/v2/logs":
            return 404, b"{}"
        if req.headers.get("dd-api-key") != DD_KEY:
            return 403, b'{"errors":[{"status":"403","title":"Forbidden","detail":"Api key is invalid"}]}'
        entries = json.loads(req.body)
        if not isinstance(entries, list) or not 0 < len(entries) <= 1000:
            return 400, b"{}"
        return 202, b"{}"

    receiver = Receiver(answer).start()
    receivers.append(receiver)
    providers = {
        "dd": {"type": "datadog-sink", "api_key": {"$env": "DD_API_KEY"}, "site": receiver.url, "tags": ["env:test"]}
    }
    logs = Logs()
    dispatcher = SinkDispatcher.from_policy(providers, {"DD_API_KEY": DD_KEY}, tmp_path / "spool", logs, options=FAST)
    dispatcher.start()
    records = dprs("dd", 1, 1200)
    dispatcher.offer(records)
    wait_for("delivery", lambda: status_of(dispatcher)["delivered"] == 1200)
    entries = [e for req in receiver.snapshot() for e in json.loads(req.body)]
    assert [e["dpr"] for e in entries] == records
    assert all(len(json.loads(req.body)) <= 1000 for req in receiver.snapshot())
    assert {(e["ddsource"], e["service"], e["ddtags"]) for e in entries} == {("faramesh", "faramesh", "env:test")}
    assert [e["dpr_id"] for e in entries] == [r["id"] for r in records]
    assert entries[6]["status"] == "warn" and "DENY stripe/refund by support-bot" in entries[6]["message"]
    dispatcher.close(5)

    wrong = SinkDispatcher.from_policy(
        providers, {"DD_API_KEY": "dd-wrong-key-0000"}, tmp_path / "s2", logs, options=FAST
    )
    wrong.start()
    wrong.offer(dprs("dd", 1, 3))
    wait_for("refusal", lambda: (status_of(wrong)["last_error"] or {}).get("code") == "SINK_REJECTED")
    assert 'env("DD_API_KEY")' in status_of(wrong)["last_error"]["message"]
    assert status_of(wrong)["spooled"] == 3
    wrong.close(0)
    assert_no_secret(tmp_path, logs.text(), json.dumps(dispatcher.status()))


# ------------------------------------------------------------------------------------------ S3 (moto)


@dataclass
class Moto:
    endpoint: str
    s3: Any


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    binary = VENV_BIN / "moto_server"
    if not binary.exists():
        message = f"{binary} is missing (pip install -e '.[test,providers]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    import boto3

    tmp = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = (tmp / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.defpath, "HOME": str(tmp), "LANG": "C.UTF-8"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            except urllib.error.HTTPError:
                return True
            except OSError:
                assert proc.poll() is None, "moto_server exited"
                return False
            return True

        wait_for("moto_server", up, timeout=60)
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key=AWS_SECRET,
        )
        yield Moto(endpoint, s3)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def s3_objects(moto: Moto, bucket: str, prefix: str) -> dict[str, bytes]:
    listing = moto.s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: moto.s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def test_s3_batches_become_jsonl_objects_with_deterministic_keys(tmp_path: Path, moto: Moto) -> None:
    bucket = "audit-" + secrets.token_hex(4)
    providers = {"archive": {"type": "s3-sink", "bucket": bucket, "prefix": "dpr/", "endpoint_url": moto.endpoint}}
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    logs = Logs()
    options = SinkOptions(backoff_base=0.05, backoff_cap=0.3, idle_wait=0.1, linger=0.05, timeout=5.0)
    dispatcher = SinkDispatcher.from_policy(providers, env, tmp_path / "spool", logs, options=options)
    dispatcher.start()
    records = dprs("chainS", 1, 300) + dprs("chainT", 1, 50)
    dispatcher.offer(records)
    # No bucket yet: S3 refuses, the sink is degraded, nothing is lost.
    wait_for("refusal", lambda: (status_of(dispatcher)["last_error"] or {}).get("code") == "SINK_REJECTED")
    status = status_of(dispatcher)
    assert (
        status["health"] == "DEGRADED"
        and status["spooled"] == 350
        and "NoSuchBucket" in status["last_error"]["message"]
    )

    moto.s3.create_bucket(Bucket=bucket)
    wait_for("delivery", lambda: status_of(dispatcher)["delivered"] == 350)
    objects = s3_objects(moto, bucket, "dpr/")
    lines = [json.loads(line) for body in objects.values() for line in body.splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(ids(records))
    for key, body in objects.items():
        match = re.fullmatch(r"dpr/(chain[ST])/(\d{12})-(\d{12})\.jsonl", key)
        assert match, key
        seqs = [json.loads(line)["seq"] for line in body.splitlines()]
        chains = {json.loads(line)["chain_id"] for line in body.splitlines()}
        assert chains == {match.group(1)} and (seqs[0], seqs[-1]) == (int(match.group(2)), int(match.group(3)))

    # A retried batch lands on the same key: re-sending overwrites instead of adding a copy.
    from faramesh.engine.sinks.s3 import object_key

    assert object_key("dpr/", dprs("chainS", 1, 300)) == "dpr/chainS/000000000001-000000000300.jsonl"
    sender = dispatcher._workers[0].sender
    batch = Batch(tuple(orjson.dumps(r) for r in records[:300]), tuple(records[:300]), Position(0, 0), 300)
    sender.send(batch)
    sender.send(batch)
    after = s3_objects(moto, bucket, "dpr/")
    assert len(after) == len(objects) + ("dpr/chainS/000000000001-000000000300.jsonl" not in objects)
    dispatcher.close(5)
    assert_no_secret(tmp_path, logs.text(), json.dumps(dispatcher.status()))


# ------------------------------------------------------------------------------------------ the spool


def test_spool_replay_skips_a_torn_tail_and_resumes_after_the_acknowledged_position(tmp_path: Path) -> None:
    lines = [orjson.dumps(dpr("t", s)) for s in range(1, 6)]
    (tmp_path / segment_name(3)).write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:25])  # killed mid-write
    (tmp_path / segment_name(4)).write_bytes(lines[4] + b"\n")
    spool = Spool(tmp_path)
    assert spool.count_earlier() == 4
    got, end = spool.read(2, 1 << 20)
    assert got == lines[:2] and end.segment == 3
    spool.ack(end, 2)
    spool.close()
    # A new run starts after the acknowledged records, skips the torn one, and never appends to old files.
    again = Spool(tmp_path)
    assert again.count_earlier() == 2
    got, end = again.read(10, 1 << 20)
    assert got == [lines[2], lines[4]]  # segment 3's unfinished last line is skipped
    assert again.torn_bytes == 25
    again.ack(end, 2)
    assert not (tmp_path / segment_name(3)).exists() and not (tmp_path / segment_name(4)).exists()
    again.append(lines[0] + b"\n", 1, {"t": 1})
    assert (tmp_path / segment_name(5)).exists()


def test_spool_rotates_and_deletes_only_delivered_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=300)
    lines = [orjson.dumps(dpr("r", s)) for s in range(1, 11)]
    for line in lines:
        spool.append(line + b"\n", 1, {"r": int(orjson.loads(line)["seq"])})
    segments = sorted(p.name for p in tmp_path.glob("seg-*.jsonl"))
    assert len(segments) == 10  # each record is over 300 bytes: one segment each
    got, end = spool.read(4, 1 << 20)
    assert got == lines[:4]
    assert sorted(p.name for p in tmp_path.glob("seg-*.jsonl")) == segments  # read is not delivered
    spool.ack(end, 4)
    assert sorted(p.name for p in tmp_path.glob("seg-*.jsonl")) == segments[4:]
    assert spool.pending() == (6, sum(len(line) + 1 for line in lines[4:]))
    spool.sync(force_through=True)
    assert json.loads((tmp_path / "through.json").read_bytes()) == {"r": 10}
    spool.note_dropped({"r": 7})  # records from 7 on never reached the disk: the WAL catch-up must redo them
    spool.sync(force_through=True)
    assert Spool(tmp_path).through("r") == 6


def test_wal_records_are_offered_as_committed_and_verify_at_the_receiver(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    from faramesh.engine.wal.dpr import chain_hash, genesis_hash, record_body
    from faramesh.engine.wal.store import StoredRecord

    receiver = Receiver(hec_answer()).start()
    receivers.append(receiver)
    dispatcher = splunk(receiver, tmp_path / "spool", Logs())
    dispatcher.start()
    prev = genesis_hash("walchain")
    stored = []
    for seq in range(1, 121):
        record = {k: v for k, v in dpr("walchain", seq).items() if k != "record_hash"}
        record["prev_record_hash"] = prev
        body = record_body(record)
        prev = chain_hash(prev, body)
        stored.append(StoredRecord(seq, record["id"], record["time"], "support-bot", "stripe/refund",
                                   record["effect"], record["code"], None, "tool_call", body, prev))  # fmt: skip
    dispatcher.offer_committed("walchain", stored[:70])
    dispatcher.offer_committed("walchain", stored[70:])
    wait_for("delivery", lambda: len(hec_ids(receiver)) == 120)
    # The SIEM can check the chain itself: each event is the stored body plus its record_hash.
    head = genesis_hash("walchain")
    for event in (e["event"] for req in receiver.snapshot() for e in hec_events(req.body)):
        assert event["record_hash"] == chain_hash(head, record_body(event)) and event["prev_record_hash"] == head
        head = event["record_hash"]
    assert head == prev
    dispatcher.close(5)
    assert dispatcher.resume_seq("walchain") == 120


def test_a_spool_left_by_a_removed_sink_is_reported_at_start(tmp_path: Path) -> None:
    old = tmp_path / "spool" / "old-siem"
    old.mkdir(parents=True)
    (old / segment_name(1)).write_bytes(orjson.dumps(dpr("o", 1)) + b"\n")
    logs = Logs()
    env = {"SPLUNK_URL": "http://127.0.0.1:9", "SPLUNK_HEC_TOKEN": HEC_TOKEN}
    SinkDispatcher.from_policy(splunk_providers(), env, tmp_path / "spool", logs).close(0)
    assert any(str(old) in line and "belongs to no declared sink" in line for line in logs.lines)
