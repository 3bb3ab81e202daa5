"""Proxy-tier credentials (issue 6 (b)): a grant names one plain-HTTP request (host, port, method, path,
TTL); the agent sends a placeholder; the proxy swaps in the secret for that one request. Real sockets on
loopback, the in-process proxy of tests/test_proxy.py."""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from test_proxy import FAST, LOOPBACK, Conn, ProxyRunner

SECRET = f"sk_live_SENTINEL_{secrets.token_hex(8)}"


class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Origin.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items())})
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    _Origin.seen.clear()
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Origin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(origin: int) -> Iterator[tuple[ProxyRunner, Clock, int, int]]:
    clock = Clock()
    runner = ProxyRunner(FAST, clock=clock)
    port = runner.agent("bot", [f"{LOOPBACK}:{origin}"])
    yield runner, clock, port, origin
    runner.close()
    assert not runner.logged, runner.logged


def _grant(runner: ProxyRunner, agent: str, origin: int, **over: Any) -> str:
    placeholder = over.pop("placeholder", f"FARAMESH-CREDENTIAL-{secrets.token_urlsafe(18)}")
    fields = {"placeholder": placeholder, "host": f"{LOOPBACK}:{origin}", "method": "POST", "path": "/v1/refunds",
              "header": "Authorization", "value": SECRET, "ttl": 30, **over}  # fmt: skip
    runner.call(runner.proxy.grant, agent, fields)
    return placeholder


def _post(port: int, origin: int, path: str, placeholder: str, method: str = "POST") -> int:
    conn = Conn(port)
    conn.send(
        f"{method} http://{LOOPBACK}:{origin}{path} HTTP/1.1\r\nHost: {LOOPBACK}:{origin}\r\n"
        f"Authorization: Bearer {placeholder}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode()
    )
    status, _, body = conn.response()
    assert SECRET.encode() not in body
    return status


def test_the_placeholder_becomes_the_secret_in_exactly_the_named_request(
    setup: tuple[ProxyRunner, Clock, int, int],
) -> None:
    runner, _, port, origin = setup
    placeholder = _grant(runner, "bot", origin)
    assert _post(port, origin, "/v1/refunds", placeholder) == 200
    assert _Origin.seen[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    # Used once: a replay is refused and reaches nothing.
    assert _post(port, origin, "/v1/refunds", placeholder) == 403
    assert len(_Origin.seen) == 1
    event = runner.wait_event(lambda e: e.get("credentials"))
    assert event["credentials"] == [placeholder]
    assert SECRET not in repr(runner.events) and SECRET not in repr(runner.logged)
    denied = runner.wait_event(lambda e: e.get("reason_code") == "CREDENTIAL_GRANT_INVALID")
    assert denied["effect"] == "deny"


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v1/other", "POST"), ("/v1/refunds", "GET"), ("/v1/refunds/../x", "POST")],
)
def test_another_path_or_method_is_refused_and_the_grant_survives(
    setup: tuple[ProxyRunner, Clock, int, int], path: str, method: str
) -> None:
    runner, _, port, origin = setup
    placeholder = _grant(runner, "bot", origin)
    assert _post(port, origin, path, placeholder, method) == 403
    assert _Origin.seen == []
    assert _post(port, origin, "/v1/refunds", placeholder) == 200  # the named request still works


def test_an_expired_grant_and_another_agents_grant_are_refused(setup: tuple[ProxyRunner, Clock, int, int]) -> None:
    runner, clock, port, origin = setup
    expired = _grant(runner, "bot", origin, ttl=5)
    clock.now += 6
    assert _post(port, origin, "/v1/refunds", expired) == 403
    theirs = _grant(runner, "other", origin)
    assert _post(port, origin, "/v1/refunds", theirs) == 403
    assert _Origin.seen == []


def test_a_placeholder_in_the_target_or_another_header_never_leaves(
    setup: tuple[ProxyRunner, Clock, int, int],
) -> None:
    runner, _, port, origin = setup
    placeholder = _grant(runner, "bot", origin)
    assert _post(port, origin, f"/v1/refunds?k={placeholder}", "x" * 20) == 403
    conn = Conn(port)
    conn.send(
        f"POST http://{LOOPBACK}:{origin}/v1/refunds HTTP/1.1\r\nHost: {LOOPBACK}:{origin}\r\n"
        f"X-Leak: {placeholder}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    assert conn.response()[0] == 403
    assert _Origin.seen == []


@pytest.mark.parametrize(
    "bad",
    [{"placeholder": "short"}, {"path": "/x?y"}, {"header": "Bad: header"}, {"value": "a\r\nX-Injected: 1"},
     {"ttl": 0}, {"ttl": 7200}],
)  # fmt: skip
def test_bad_grants_are_refused(setup: tuple[ProxyRunner, Clock, int, int], bad: dict[str, Any]) -> None:
    runner, _, _, origin = setup
    with pytest.raises(ValueError):
        _grant(runner, "bot", origin, **bad)
