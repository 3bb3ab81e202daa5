"""Alerts: `alert { on = "…"; notify = "<uri>" }` blocks, fired after a decision's DPR committed.

Never on the decision's critical path: the server hands a committed decision to `AlertDispatcher`,
which matches it against the agent's alert blocks and puts what fires on a bounded asyncio queue with
`put_nowait` — when the queue is full the alert is dropped and counted, never waited for. Worker tasks
deliver each alert by a small stdlib HTTP POST (`http.client`, run on daemon threads so a hanging
target can neither block the event loop nor hold the process at exit), retried with backoff
(3 attempts by default). An unreachable target changes no decision; `status` shows the counters.

Events (`on`): `permit`, `defer`, `deny` (what the policy decided — in audit mode the call went ahead,
and the body says so), `any` (every decision and approval), `rate_exceeded`, `budget_exceeded`,
`budget_warning`, `egress_denied`, and `approved` (an operator approved a deferred call).

Targets (`notify`): `https://…` and `http://…` as written; `webhook://host/path` → `https://host/path`;
`slack://#chan` (or `#chan`) → the Slack incoming-webhook URL from `runtime { slack_webhook_url =
env("…") }`, a secret field resolved from the engine's own environment at start. In `faramesh dev` a
Slack alert with no webhook URL is printed on stderr instead (a stub, as for other providers).

The JSON body carries the agent, tool, effect, code, rule_ref, action_id and time of the decision —
never its args, never a secret. Slack gets `{"text": …, "channel": …}` with the same facts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import queue
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF = (0.5, 2.0)  # seconds before the 2nd and 3rd attempt
DEFAULT_TIMEOUT = 5.0  # per attempt (connect and each read)
DEFAULT_WORKERS = 4
MAX_FIELD = 256  # characters of an agent-supplied field (tool id) kept in an alert

EVENTS = (
    "deny", "defer", "permit", "any", "rate_exceeded", "budget_warning", "budget_exceeded", "approved",
    "egress_denied", "sandbox_violation",
)  # fmt: skip
_CODE_EVENTS = {
    "RATE_EXCEEDED": "rate_exceeded",
    "BUDGET_EXCEEDED": "budget_exceeded",
    "EGRESS_DENIED": "egress_denied",
    "SANDBOX_VIOLATION": "sandbox_violation",
}

Poster = Callable[[str, bytes, float], int]


# ------------------------------------------------------------------------------ $env references


class MissingEnvironment(ValueError):
    """A `{"$env": NAME}` reference whose variable the engine's environment does not set."""


def resolve_env_refs(value: Any, environ: Mapping[str, str], where: str) -> Any:
    """`value` with every `{"$env": NAME}` (what secret fields compile to) replaced by `environ[NAME]`.

    The engine calls this at start (and on reload) for the secret fields it uses: a compiled policy and
    its version never hold the secret, the engine's environment does. A variable that is not set raises
    MissingEnvironment naming it and the field."""
    if isinstance(value, Mapping):
        if set(value) == {"$env"}:
            name = value["$env"]
            resolved = environ.get(str(name))
            if resolved is None:
                raise MissingEnvironment(
                    f'{where} references env("{name}"), but {name} is not set in the engine\'s environment'
                )
            return resolved
        return {k: resolve_env_refs(v, environ, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_env_refs(v, environ, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Target:
    notify: str  # as written in the policy
    url: str | None  # where to POST; None: undeliverable (problem says why) or the dev stub
    slack_channel: str | None = None
    problem: str | None = None
    stub: bool = False

    @property
    def shown(self) -> str:
        """How logs name the target: never a webhook URL (its path is often the secret)."""
        if self.slack_channel is not None:
            return f"slack {self.slack_channel}"
        parts = urlsplit(self.url or self.notify)
        return f"{parts.scheme}://{parts.hostname}" if parts.hostname else self.notify[:64]


@dataclass(frozen=True)
class AlertConfig:
    slack_webhook_url: str | None = None
    dev: bool = False

    @classmethod
    def from_policy(cls, policy: Any, environ: Mapping[str, str], *, dev: bool = False) -> AlertConfig:
        """Resolve `runtime.slack_webhook_url`; MissingEnvironment (a ValueError) when it cannot be."""
        raw = policy.runtime.get("slack_webhook_url")
        url = None
        if raw is not None:
            url = resolve_env_refs(raw, environ, "runtime.slack_webhook_url")
            if not isinstance(url, str) or not _http_url(url):
                raise MissingEnvironment("runtime.slack_webhook_url must resolve to an http(s) URL with a host")
        return cls(slack_webhook_url=url, dev=dev)

    def target(self, notify: str) -> Target:
        text = notify.strip()
        if text.startswith("#") or text.lower().startswith("slack://"):
            channel = text[len("slack://") :] if text.lower().startswith("slack://") else text
            if not channel:
                return Target(notify, None, problem="slack:// needs a channel")
            if self.slack_webhook_url:
                return Target(notify, self.slack_webhook_url, slack_channel=channel)
            if self.dev:
                return Target(notify, None, slack_channel=channel, stub=True)
            return Target(notify, None, slack_channel=channel, problem="no runtime slack_webhook_url is set")
        lowered = text.lower()
        if lowered.startswith("webhook://"):
            text = "https://" + text[len("webhook://") :]
            lowered = text.lower()
        if lowered.startswith(("https://", "http://")):
            if not _http_url(text):
                return Target(notify, None, problem="not a usable http(s) URL")
            return Target(notify, text)
        return Target(
            notify, None, problem="unknown notify scheme (use https://, http://, webhook:// or slack://#chan)"
        )


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)


# ------------------------------------------------------------------------------ delivery


def http_post(url: str, body: bytes, timeout: float) -> int:
    """POST `body` as JSON with http.client; the response status. Raises OSError/HTTPException."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "User-Agent": "faramesh-alerts/1"},
        )
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()


class _DaemonPool:
    """A fixed set of daemon threads running blocking calls: a target that hangs holds a thread until
    its timeout, never the event loop, and never keeps the process alive at exit."""

    def __init__(self, size: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"alert-sender-{i}", daemon=True) for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


@dataclass
class AlertStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    stubbed: int = 0
    undeliverable: int = 0
    attempts: int = 0

    def to_dict(self, queued: int) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "retries": self.retries,
            "stubbed": self.stubbed,
            "undeliverable": self.undeliverable,
            "queued": queued,
        }


@dataclass
class _Job:
    target: Target
    body: bytes


@dataclass
class AlertDispatcher:
    config: AlertConfig = field(default_factory=AlertConfig)
    queue_size: int = DEFAULT_QUEUE_SIZE
    attempts: int = DEFAULT_ATTEMPTS
    backoff: tuple[float, ...] = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT
    workers: int = DEFAULT_WORKERS
    post: Poster = http_post
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.stats = AlertStats()
        self._targets: dict[str, Target] = {}
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: _DaemonPool | None = None
        self._warned: set[str] = set()

    # ---- configuration
    def configure(self, config: AlertConfig) -> None:
        """A new policy's configuration (reload): targets are re-resolved lazily."""
        self.config = config
        self._targets = {}
        self._warned = set()

    def target(self, notify: str) -> Target:
        target = self._targets.get(notify)
        if target is None:
            if len(self._targets) > 4096:
                self._targets.clear()
            target = self._targets[notify] = self.config.target(notify)
        return target

    def check_policy(self, policy: Any) -> list[str]:
        """Warnings for alert targets that can never be delivered (logged at start and on reload)."""
        problems = []
        for agent_id, agent in sorted(policy.agents.items()):
            for alert in agent.alerts:
                target = self.target(str(alert.get("notify", "")))
                if target.problem:
                    problems.append(f'agent "{agent_id}": alert to {alert.get("notify")!r}: {target.problem}')
        return problems

    # ---- lifecycle (on the engine's event loop)
    def start(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._pool = _DaemonPool(self.workers)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"alerts-{i}") for i in range(self.workers)]

    async def close(self, grace: float = 2.0) -> None:
        """Deliver what is queued for up to `grace` seconds, then stop (the rest is dropped and counted)."""
        if self._queue is not None and self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._queue is not None:
            self.stats.dropped += self._queue.qsize()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def snapshot(self) -> dict[str, int]:
        return self.stats.to_dict(self._queue.qsize() if self._queue is not None else 0)

    # ---- events (called on the loop after the record committed; O(alert blocks), never blocks)
    def decision(self, agent: Any, record: Mapping[str, Any], decision: Any) -> None:
        alerts = getattr(agent, "alerts", None) or ()
        rule_notify = getattr(decision, "notify", None)  # `notify "#chan"` on the rule that decided
        if not alerts and not rule_notify:
            return
        try:
            events = decision_events(record, decision)
            for alert in alerts:
                on = alert.get("on")
                if on in events:
                    self._enqueue(str(alert.get("notify", "")), alert_body(record, str(on)))
            if rule_notify:
                self._enqueue(str(rule_notify), alert_body(record, str(record.get("policy_effect", "")).lower()))
        except Exception as exc:  # a defect here must never turn a committed decision into an error reply
            self._defect(exc)

    def approval_resolved(self, agent: Any, record: Mapping[str, Any]) -> None:
        alerts = getattr(agent, "alerts", None)
        if not alerts or record.get("effect") != "PERMIT":
            return
        try:
            for alert in alerts:
                on = alert.get("on")
                if on in ("approved", "any"):
                    self._enqueue(str(alert.get("notify", "")), alert_body(record, str(on)))
        except Exception as exc:
            self._defect(exc)

    def _defect(self, exc: Exception) -> None:
        self.stats.failed += 1
        self._say(f"alert matching failed: {type(exc).__name__}")

    def _enqueue(self, notify: str, body: dict[str, Any]) -> None:
        target = self.target(notify)
        if target.problem is not None:
            self.stats.undeliverable += 1
            if notify not in self._warned:
                self._warned.add(notify)
                self._say(f"alert to {target.shown} cannot be delivered: {target.problem}")
            return
        if target.stub:
            self.stats.stubbed += 1
            self._say(f"alert (dev stub: no runtime slack_webhook_url) {target.slack_channel}: {_summary(body)}")
            return
        if self._queue is None:
            self.stats.dropped += 1
            return
        payload = _slack_payload(body, target.slack_channel) if target.slack_channel else body
        try:
            self._queue.put_nowait(_Job(target, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)))
        except asyncio.QueueFull:
            self.stats.dropped += 1

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                await self._deliver(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a defect in delivery must not stop the worker
                self.stats.failed += 1
                self._say(f"alert to {job.target.shown} failed: {type(exc).__name__}")
            finally:
                self._queue.task_done()

    async def _deliver(self, job: _Job) -> None:
        assert self._pool is not None and job.target.url is not None
        url, timeout = job.target.url, self.timeout
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff[min(attempt - 1, len(self.backoff) - 1)] if self.backoff else 0)
            self.stats.attempts += 1
            try:
                status = await asyncio.wrap_future(self._pool.submit(lambda: self.post(url, job.body, timeout)))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = type(exc).__name__
                continue
            if 200 <= status < 300:
                self.stats.sent += 1
                return
            problem = f"HTTP {status}"
        self.stats.failed += 1
        self._say(f"alert to {job.target.shown} failed after {self.attempts} attempts ({problem})")

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        else:
            sys.stderr.write(f"faramesh engine: {message}\n")


# ------------------------------------------------------------------------------ matching and bodies


def decision_events(record: Mapping[str, Any], decision: Any) -> frozenset[str]:
    """The `on` values a committed govern decision fires. Effects are what the policy decided (in audit
    mode the enforced effect is PERMIT and the body says so)."""
    effect = str(record.get("policy_effect") or record.get("effect") or "")
    code = str(record.get("policy_code") or record.get("code") or "")
    events = {"any", effect.lower()}
    if code in _CODE_EVENTS:
        events.add(_CODE_EVENTS[code])
    if decision is not None and getattr(decision, "budget_warn", False):
        events.add("budget_warning")
    return frozenset(events)


def _field(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "…"
    return value


def alert_body(record: Mapping[str, Any], event: str) -> dict[str, Any]:
    """What an alert says: facts of the decision, never its args (nor the egress host, which is an arg)."""
    body = {
        "source": "faramesh",
        "event": event,
        "agent": _field(record.get("agent_id")),
        "tool": _field(record.get("tool")),
        "effect": record.get("effect"),
        "code": record.get("code"),
        "rule_ref": record.get("rule_ref"),
        "action_id": record.get("id"),
        "time": record.get("time"),
        "mode": record.get("mode"),
        "dev": bool(record.get("dev")),
    }
    if record.get("policy_effect") and record.get("policy_effect") != record.get("effect"):
        body["policy_effect"] = record.get("policy_effect")
        body["policy_code"] = record.get("policy_code")
    if record.get("approval_id"):
        body["approval_id"] = record.get("approval_id")
        if record.get("approver"):
            body["approver"] = _field(record.get("approver"))
    return body


def _slack_escape(value: Any) -> str:
    """Slack's control characters: an agent-chosen tool id must not become `<!channel>` or a link."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _summary(body: Mapping[str, Any]) -> str:
    return (
        f"{body.get('event')}: {body.get('effect')} {body.get('code')} agent {body.get('agent')} "
        f"tool {body.get('tool')} rule {body.get('rule_ref') or '-'} action {body.get('action_id')} "
        f"at {body.get('time')}"
    )


def _slack_payload(body: Mapping[str, Any], channel: str) -> dict[str, Any]:
    return {"text": "Faramesh " + _slack_escape(_summary(body)), "channel": channel}
