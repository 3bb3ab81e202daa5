"""The egress proxy (engine/proxy.py) and its engine-side host (engine/proxy_host.py), with real sockets.

Every address dialled is on this machine: origins are HTTP, TLS and raw TCP servers on 127.0.0.1 started
here, and a test resolver maps test names (`api.example.test`) to 127.0.0.1. Loopback is a refused range,
so the rules list those names exactly — which is also how the tests show that a glob never reaches it.
Address-range checks for anything that is not this machine are made on addresses, without dialling.
Most tests run the proxy in-process on its own event-loop thread (fast, direct access to the counting
resolver); the host tests run the real child process and kill it.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faramesh.engine.egress import (
    EgressConfigError,
    Host,
    IPAddress,
    MalformedHost,
    check_address,
    classify_address,
    compile_egress,
    compile_proxy_egress,
    decide_target,
    parse_host_port,
    parse_port_entry,
    without_ports,
)
from faramesh.engine.proxy import (
    EgressProxy,
    EventAggregator,
    HttpError,
    ProxyConfig,
    ResolveFailed,
    TokenBucket,
    local_addresses,
    new_event,
    parse_request_head,
    parse_response_head,
    request_framing,
)
from faramesh.engine.proxy_host import ProxyError, ProxyHost, ProxyUnavailable
from hypothesis import given
from hypothesis import strategies as st

LOOPBACK = "127.0.0.1"
TEST_NAMES = {
    "api.example.test": [LOOPBACK],
    "plain.example.test": [LOOPBACK],
    "x.example.test": [LOOPBACK],  # reached through a glob only: must be refused
    "mixed.example.test": ["::1", LOOPBACK],
    "xn--bcher-kva.example.test": [LOOPBACK],  # bücher.example.test
}
WAIT_S = 10.0


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


# ------------------------------------------------------------------------------ pure decisions


def decide(allow: Sequence[str], host: str, port: int, deny: Sequence[str] = ()) -> tuple[bool, str, bool]:
    policy = compile_proxy_egress({"allow": list(allow), "deny": list(deny)})
    parsed, _ = parse_host_port(f"{host}:{port}", None)
    d = decide_target(policy, parsed, port)
    return d.allowed, d.code, d.exact


@pytest.mark.parametrize(
    ("allow", "deny", "target", "expected"),
    [
        (["api.example.com"], [], "api.example.com:443", (True, "ALLOWED", True)),
        (["api.example.com"], [], "api.example.com:80", (True, "ALLOWED", True)),
        (["api.example.com"], [], "api.example.com:22", (False, "PORT_NOT_ALLOWED", False)),
        (["api.example.com:22"], [], "api.example.com:22", (True, "ALLOWED", True)),
        (["api.example.com:22"], [], "api.example.com:443", (False, "PORT_NOT_ALLOWED", False)),
        (["API.Example.COM."], [], "api.example.com:443", (True, "ALLOWED", True)),
        (["api.example.com"], [], "EXAMPLE.com.:443", (False, "NOT_ALLOWED", False)),
        (["api.example.com"], [], "api.example.com.evil.test:443", (False, "NOT_ALLOWED", False)),
        (["*.example.com"], [], "a.b.example.com:443", (True, "ALLOWED", False)),
        (["*.example.com"], [], "example.com:443", (False, "NOT_ALLOWED", False)),
        (["*.example.com", "api.example.com:8443"], [], "api.example.com:8443", (True, "ALLOWED", True)),
        (["*.example.com", "api.example.com:8443"], [], "api.example.com:443", (True, "ALLOWED", False)),
        (["*"], [], "anything.test:443", (True, "ALLOWED", False)),
        (["*"], [], "127.0.0.1:443", (False, "IP_NOT_LISTED", False)),  # `*` does not list IP literals
        (["*"], [], "localhost:443", (False, "REFUSED_NAME", False)),
        (["*.localhost"], [], "a.localhost:80", (False, "REFUSED_NAME", False)),
        (["localhost"], [], "localhost:443", (True, "ALLOWED", True)),
        (["*.internal"], [], "metadata.google.internal:80", (False, "REFUSED_NAME", False)),
        (["*.example.com"], ["bad.example.com"], "bad.example.com:443", (False, "DENY_LISTED", False)),
        (["*.example.com"], ["bad.example.com:22"], "bad.example.com:443", (True, "ALLOWED", False)),
        (["api.example.com"], ["*"], "api.example.com:443", (False, "DENY_LISTED", False)),
        (["93.184.216.34"], [], "93.184.216.34:443", (True, "ALLOWED", True)),
        (["93.184.216.0/24"], [], "93.184.216.34:443", (True, "ALLOWED", False)),
        (["93.184.216.0/24:8080"], [], "93.184.216.34:443", (False, "PORT_NOT_ALLOWED", False)),
        (["api.example.com"], [], "93.184.216.34:443", (False, "IP_NOT_LISTED", False)),
        (["127.0.0.1:8080"], [], "2130706433:8080", (True, "ALLOWED", True)),  # inet_aton form of a listed IP
        (["127.0.0.1:8080"], [], "[::ffff:127.0.0.1]:8080", (True, "ALLOWED", True)),
        (["[::1]:8080"], [], "[::1]:8080", (True, "ALLOWED", True)),
        (["bücher.example.test"], [], "xn--bcher-kva.example.test:443", (True, "ALLOWED", True)),
        (["https://api.example.com:8443/v1"], [], "api.example.com:8443", (True, "ALLOWED", True)),
        (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3:443", (False, "DENY_LISTED", False)),
    ],
)
def test_target_decisions(allow: list[str], deny: list[str], target: str, expected: tuple[bool, str, bool]) -> None:
    host, _, port = target.rpartition(":")
    assert decide(allow, host, int(port), deny) == expected


@pytest.mark.parametrize(
    ("text", "ports"),
    [("api.example.com", None), ("api.example.com:443", {443}), ("*.example.com:8443", {8443}), ("*:8080", {8080}),
     ("[::1]:8080", {8080}), ("::1", None), ("10.0.0.0/8:443", {443}), ("https://a.example.com:8443/x", {8443})],
)  # fmt: skip
def test_port_entries(text: str, ports: set[int] | None) -> None:
    entry = parse_port_entry(text)
    assert entry.ports == (frozenset(ports) if ports is not None else None)
    assert entry.text == text


@pytest.mark.parametrize("text", ["api.example.com:0", "api.example.com:65536", "api.example.com:http", "a:1:2x"])
def test_bad_port_entries_are_refused(text: str) -> None:
    with pytest.raises(EgressConfigError):
        parse_port_entry(text)


def test_the_sdk_tier_still_refuses_ports_in_entries() -> None:
    """The additions for the proxy leave the SDK tier's reading of an entry unchanged; `without_ports`
    gives it the same hosts."""
    block = {"allow": ["api.example.com:443", "*.example.org", "[::1]:8080", "https://b.example:8443/x"],
             "deny": ["bad.example.org:22"]}  # fmt: skip
    with pytest.raises(EgressConfigError):
        compile_egress(block)
    assert without_ports(block) == {
        "allow": ["api.example.com", "*.example.org", "[::1]", "https://b.example/x"], "deny": ["bad.example.org"]
    }  # fmt: skip
    sdk = compile_egress(without_ports(block))
    assert [e.kind for e in sdk.allow] == ["name", "glob", "ip", "name"]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "::ffff:127.0.0.1", "100.100.100.200", "100.64.0.1", "100.127.255.254", "169.254.169.254",
     "fd00:ec2::254", "10.1.2.3", "192.168.1.1", "172.16.0.1", "fc00::1", "fe80::1", "64:ff9b::7f00:1",
     "168.63.129.16", "0.0.0.0", "::ffff:169.254.169.254"],
)  # fmt: skip
def test_refused_addresses_pass_only_through_an_exact_entry(address: str) -> None:
    """Checked on addresses only: nothing here is dialled."""
    glob = decide_target(compile_proxy_egress({"allow": ["*.example.com"]}), Host(name="a.example.com"), 443)
    exact = decide_target(compile_proxy_egress({"allow": ["a.example.com"]}), Host(name="a.example.com"), 443)
    assert glob.allowed and exact.allowed
    assert check_address(glob, ip(address)) is not None
    assert check_address(exact, ip(address)) is None


def test_the_hosts_own_addresses_are_refused_through_a_glob() -> None:
    own = frozenset({ip("203.0.113.9"), ip("2001:4860::9")})
    glob = decide_target(compile_proxy_egress({"allow": ["*"]}), Host(name="a.example.com"), 443)
    assert classify_address(ip("2001:4860::9"), own) == "this host's own address"
    assert check_address(glob, ip("2001:4860::9"), own) is not None
    assert check_address(glob, ip("::ffff:203.0.113.9"), own) is not None
    assert check_address(glob, ip("2001:4860::10"), own) is None  # a public address that is not ours
    assert LOOPBACK in {str(a) for a in local_addresses()}  # /proc is read


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [("api.example.com:443", None, ("api.example.com", 443)), ("API.Example.COM.:443", None, ("api.example.com", 443)),
     ("api.example.com", 80, ("api.example.com", 80)), ("[::1]:8080", None, ("::1", 8080)),
     ("0x7f.1:80", None, ("127.0.0.1", 80)), ("xn--bcher-kva.example:443", None, ("xn--bcher-kva.example", 443))],
)  # fmt: skip
def test_host_port_parsing(text: str, default: int | None, expected: tuple[str, int]) -> None:
    host, port = parse_host_port(text, default)
    assert (str(host), port) == expected


@pytest.mark.parametrize(
    "text",
    ["api.example.com", "api.example.com:", "api.example.com:0", "api.example.com:99999", "user@api.example.com:443",
     "api.example.com:443/x", "::1:443", "[::1", "%61pi.example.com:443", "api.example.com :443", "a..b:443", ""],
)  # fmt: skip
def test_bad_connect_targets(text: str) -> None:
    with pytest.raises(MalformedHost):
        parse_host_port(text, None)


# ------------------------------------------------------------------------------ pure HTTP parsing

GOOD_HEAD = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n"


def test_a_request_head_parses() -> None:
    m = parse_request_head(GOOD_HEAD)
    assert m.start == ("GET", "http://a.test/", "HTTP/1.1")
    assert m.get_all("host") == ["a.test"]
    assert request_framing(m).kind == "none"


BAD_HEADS = [
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n", "obs-fold"),
    (b"GET http://a.test/ HTTP/1.1\nHost: a.test\r\n\r\n", "bare CR or LF"),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\rX: y\r\n\r\n", "bare CR or LF"),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", "more than one Host"),
    (b"GET http://a.test/ HTTP/1.1\r\nHost : a.test\r\n\r\n", "name: value"),
    (b"GET http://a.test/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", "control character"),
    (b"GET http://a.test/ HTTP/2.0\r\n\r\n", "version"),
    (b"GET  http://a.test/ HTTP/1.1\r\n\r\n", "request line"),
    (b"GET http://a.test/\x7f HTTP/1.1\r\n\r\n", "invalid method or target"),
    (b"G(T http://a.test/ HTTP/1.1\r\n\r\n", "invalid method or target"),
    (b"\r\n\r\n", "empty head"),
]


@pytest.mark.parametrize(("head", "reason"), BAD_HEADS)
def test_malformed_heads_are_refused(head: bytes, reason: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(head)
    assert info.value.status == 400
    assert reason in info.value.message


@pytest.mark.parametrize(
    ("fields", "reason"),
    [(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "smuggling"),
     (b"Content-Length: 5\r\nContent-Length: 5\r\n", "repeated"),
     (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "repeated"),
     (b"Transfer-Encoding: gzip, chunked\r\n", "transfer coding"),
     (b"Content-Length: -1\r\n", "Content-Length"), (b"Content-Length: 0x10\r\n", "Content-Length")],
)  # fmt: skip
def test_smuggling_shapes_are_refused(fields: bytes, reason: str) -> None:
    head = parse_request_head(b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + fields + b"\r\n")
    with pytest.raises(HttpError) as info:
        request_framing(head)
    assert reason in info.value.message


def test_too_many_fields_is_431() -> None:
    head = b"GET http://a.test/ HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n"
    with pytest.raises(HttpError) as info:
        parse_request_head(head, 100)
    assert info.value.status == 431


def test_a_malformed_response_is_a_502() -> None:
    with pytest.raises(HttpError) as info:
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n")
    assert info.value.status == 502


@given(st.binary(max_size=300))
def test_the_head_parser_never_fails_otherwise(data: bytes) -> None:
    for head in (data + b"\r\n\r\n", b"GET http://a.test/ HTTP/1.1\r\n" + data + b"\r\n\r\n"):
        try:
            request_framing(parse_request_head(head))
        except HttpError as exc:
            assert exc.status in (400, 431)


# ------------------------------------------------------------------------------ pure limits and aggregation


def test_token_bucket_pauses_for_the_debt() -> None:
    bucket = TokenBucket(rate=1000, burst=1000, now=0.0)
    assert bucket.take(1000, 0.0) == 0.0
    assert bucket.take(500, 0.0) == pytest.approx(0.5)
    assert bucket.take(0, 0.5) == 0.0  # repaid after the pause
    assert bucket.take(2000, 10.0) == pytest.approx(1.0)  # refilled only up to the burst


def test_aggregator_passes_n_per_second_and_counts_the_rest() -> None:
    agg = EventAggregator(per_second=3, max_buckets=2)

    def deny(host: str, t: float) -> dict[str, Any] | None:
        return agg.offer(new_event("a", "deny", "NOT_ALLOWED", "x", 0, host=host, port=443), t)

    passed = [deny("evil.test", 5.0) for _ in range(10)]
    assert sum(e is not None for e in passed) == 3
    assert deny("other.test", 5.1) is None
    assert deny("third.test", 5.2) is None  # over max_buckets: merged into the catch-all
    flushed = agg.flush()
    assert sorted((str(e["host"]), e["count"]) for e in flushed) == [("None", 1), ("evil.test", 7), ("other.test", 1)]
    assert all(e["aggregated"] for e in flushed)
    assert agg.suppressed == 9
    assert deny("evil.test", 6.0) is not None  # a new second


# ------------------------------------------------------------------------------ origins (loopback servers)


class OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self) -> None:
        body = self._body()
        record = {"method": self.command, "path": self.path, "host": self.headers.get("Host"), "body": len(body),
                  "proxy_auth": self.headers.get("Proxy-Authorization")}  # fmt: skip
        type(self).seen.append(record)
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        payload = json.dumps(record).encode()
        if self.path.startswith("/big"):
            payload = b"x" * int(self.path.split("=")[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_HEAD = do_PUT = _answer


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections the proxy aborts (a malformed body) are part of the tests


class Origin:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.server = QuietServer((LOOPBACK, 0), type("Handler", (OriginHandler,), {"seen": self.seen}))
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpOrigin:
    """Reads `up` bytes, answers `down` bytes, closes; or echoes when `echo`."""

    def __init__(self, up: int = 0, down: int = 0, echo: bool = False) -> None:
        self.sock = socket.create_server((LOOPBACK, 0), backlog=2048)
        self.port = self.sock.getsockname()[1]
        self.up, self.down, self.echo = up, down, echo
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.echo:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    return
                got = 0
                while got < self.up:
                    data = conn.recv(65536)
                    if not data:
                        return
                    got += len(data)
                conn.sendall(b"d" * self.down)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.example.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_origin(cert: tuple[Path, Path]) -> Iterator[Origin]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    origin = Origin(ctx)
    yield origin
    origin.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(autouse=True)
def close_connections() -> Iterator[None]:
    yield
    while Conn.opened:
        Conn.opened.pop().close()


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# ------------------------------------------------------------------------------ the proxy in-process


class CountingResolver:
    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.queries: list[str] = []

    async def __call__(self, name: str) -> list[IPAddress]:
        self.queries.append(name)
        if name not in self.names:
            raise ResolveFailed(f"{name} does not resolve")
        return [ip(a) for a in self.names[name]]


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ProxyRunner:
    """An EgressProxy on its own event-loop thread; tests drive it with blocking clients."""

    def __init__(
        self,
        config: ProxyConfig,
        names: dict[str, list[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        own: frozenset[IPAddress] | None = None,
    ) -> None:
        self.resolver = CountingResolver(dict(TEST_NAMES, **(names or {})))
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.logged: list[str] = []
        own_addresses = (lambda: own) if own is not None else local_addresses
        self.proxy = EgressProxy(
            self._event, resolver=self.resolver, config=config, clock=clock, own_addresses=own_addresses,
            log=self.logged.append,
        )  # fmt: skip
        self.run(self.proxy.start())
        self._next = 1

    def _event(self, event: dict[str, Any]) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def wrapper() -> Any:
            return fn(*args)

        return self.run(wrapper())

    def agent(self, agent_id: str, allow: Sequence[str], deny: Sequence[str] = (), **limits: int) -> int:
        """Rules plus a new listener for the agent; returns the listener's port."""
        self.call(self.proxy.set_rules, agent_id, {"allow": list(allow), "deny": list(deny)}, limits or None)
        return self.listen(agent_id)

    def listen(self, agent_id: str) -> int:
        sock = socket.create_server((LOOPBACK, 0), backlog=4096)
        port: int = sock.getsockname()[1]
        self.run(self.proxy.add_listener(self._next, agent_id, sock))
        self._next += 1
        return port

    def wait_event(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        with self.cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {self.events!r}")
                self.cond.wait(left)

    def close(self) -> None:
        self.run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


FAST = ProxyConfig(tick=0.05, header_timeout=2.0, keepalive_timeout=5.0, reject_timeout=1.0)


@pytest.fixture
def proxy() -> Iterator[ProxyRunner]:
    runner = ProxyRunner(FAST)
    yield runner
    runner.close()
    assert not runner.logged, runner.logged  # no handler crashed


class Conn:
    """A raw client connection to the proxy with a small HTTP/1.1 response reader (closed at the end of
    the test that opened it)."""

    opened: ClassVar[list[Conn]] = []

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=WAIT_S)
        self.buf = b""
        Conn.opened.append(self)

    def send(self, data: bytes) -> Conn:
        self.sock.sendall(data)
        return self

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if head_only:
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                break
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def get(host: str, path: str = "/", extra: str = "") -> bytes:
    return f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def urllib_opener(proxy_port: int, cafile: Path | None = None) -> urllib.request.OpenerDirector:
    proxy_url = f"http://{LOOPBACK}:{proxy_port}"
    handlers: list[Any] = [urllib.request.ProxyHandler({"http": proxy_url, "https": proxy_url})]
    if cafile is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(cafile))))
    return urllib.request.build_opener(*handlers)


# ------------------------------------------------------------------------------ allowed traffic


def test_connect_to_an_exact_host_completes_a_real_tls_handshake(
    proxy: ProxyRunner, tls_origin: Origin, cert: tuple[Path, Path]
) -> None:
    port = proxy.agent("bot", [f"api.example.test:{tls_origin.port}"])
    with urllib_opener(port, cert[0]).open(f"https://api.example.test:{tls_origin.port}/hello", timeout=WAIT_S) as r:
        assert r.status == 200
        assert json.loads(r.read())["path"] == "/hello"
    event = proxy.wait_event(lambda e: e["effect"] == "permit")
    assert event["agent_id"] == "bot"
    assert (event["host"], event["port"], event["address"]) == ("api.example.test", tls_origin.port, LOOPBACK)
    assert event["method"] == "CONNECT" and event["outcome"] == "closed"
    assert event["rule"] == f"api.example.test:{tls_origin.port}"
    assert event["bytes_up"] > 200 and event["bytes_down"] > 300  # a TLS handshake went through
    assert proxy.resolver.queries == ["api.example.test"]


def test_the_same_through_curl(proxy: ProxyRunner, tls_origin: Origin, cert: tuple[Path, Path]) -> None:
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is not installed")
        pytest.skip("curl is not installed")
    port = proxy.agent("bot", [f"api.example.test:{tls_origin.port}"])
    url = f"https://api.example.test:{tls_origin.port}/via-curl"
    base = [curl, "-sS", "--noproxy", "", "-x", f"http://{LOOPBACK}:{port}", "--max-time", "10"]
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    ok = subprocess.run([*base, "--cacert", str(cert[0]), url], capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == "/via-curl"
    denied = subprocess.run(
        [*base, "-o", "/dev/null", "-w", "%{http_connect}", "https://evil.test/"], capture_output=True, text=True,
        env=env, check=False,
    )  # fmt: skip
    assert denied.stdout.strip() == "403"  # curl reports the proxy's answer to CONNECT
    assert "evil.test" not in proxy.resolver.queries


def test_plain_http_is_forwarded_in_origin_form(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    request = urllib.request.Request(
        f"http://plain.example.test:{origin.port}/a/b?c=d", data=b"12345", headers={"Proxy-Authorization": "Basic x"}
    )
    with urllib_opener(port).open(request, timeout=WAIT_S) as r:
        seen = json.loads(r.read())
    assert seen == {"method": "POST", "path": "/a/b?c=d", "host": f"plain.example.test:{origin.port}", "body": 5,
                    "proxy_auth": None}  # fmt: skip
    event = proxy.wait_event(lambda e: e["effect"] == "permit")
    assert event["method"] == "POST" and event["requests"] == 1 and event["address"] == LOOPBACK


def test_chunked_bodies_head_and_keep_alive_reuse(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    host = f"plain.example.test:{origin.port}"
    c = Conn(port)
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    c.send(f"POST http://{host}/up HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body)
    status, _, payload = c.response()
    assert status == 200 and json.loads(payload)["body"] == 11
    status, headers, payload = c.send(get(host, "/chunked")).response()
    assert (status, payload, headers.get("transfer-encoding")) == (200, b"hello chunked world", "chunked")
    c.send(f"HEAD http://{host}/h HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status, headers, _ = c.response(head_only=True)
    assert status == 200 and int(headers["content-length"]) > 0
    status, _, payload = c.send(get(host, "/last")).response()  # nothing of HEAD's length was read as a body
    assert json.loads(payload)["path"] == "/last"
    c.close()
    event = proxy.wait_event(lambda e: e["effect"] == "permit")
    assert event["requests"] == 4  # one upstream connection served all four
    assert proxy.resolver.queries == ["plain.example.test"]


def test_pipelined_requests_are_each_checked(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    host = f"plain.example.test:{origin.port}"
    c = Conn(port).send(get(host, "/one") + get(host, "/two") + get("evil.test", "/three"))
    assert json.loads(c.response()[2])["path"] == "/one"
    assert json.loads(c.response()[2])["path"] == "/two"
    status, _, body = c.response()
    assert status == 403 and b"EGRESS_DENIED" in body
    assert [s["path"] for s in origin.seen] == ["/one", "/two"]
    assert "evil.test" not in proxy.resolver.queries


def test_bandwidth_cap_still_delivers_every_byte(proxy: ProxyRunner) -> None:
    size = 1536 * 1024
    tcp = TcpOrigin(up=1, down=size)
    try:
        port = proxy.agent("slow", [f"api.example.test:{tcp.port}"], bandwidth_bytes_per_s=4 * 1024 * 1024,
                           bandwidth_burst_bytes=256 * 1024)  # fmt: skip
        c = Conn(port).send(connect(f"api.example.test:{tcp.port}"))
        assert c.response(head_only=True)[0] == 200
        c.send(b"!")
        got = len(c.buf)
        while got < size:
            data = c.sock.recv(65536)
            assert data, got
            got += len(data)
        c.close()
        event = proxy.wait_event(lambda e: e["effect"] == "permit")
        assert event["bytes_down"] == size and event["bytes_up"] == 1
    finally:
        tcp.close()


# ------------------------------------------------------------------------------ refusals


def test_a_denied_host_gets_403_an_event_and_no_dns_query(proxy: ProxyRunner) -> None:
    port = proxy.agent("bot", ["api.example.test"])
    for request in (connect("evil.test:443"), get("evil.test")):
        status, headers, body = Conn(port).send(request).response()
        assert status == 403 and headers["connection"] == "close"
        assert body.startswith(b"EGRESS_DENIED: NOT_ALLOWED")
    event = proxy.wait_event(lambda e: e["effect"] == "deny")
    assert (event["agent_id"], event["host"], event["port"], event["reason_code"]) == (
        "bot",
        "evil.test",
        443,
        "NOT_ALLOWED",
    )
    assert event["address"] is None
    assert proxy.resolver.queries == []


def test_connect_to_port_22_is_refused_unless_the_port_is_allowed(proxy: ProxyRunner) -> None:
    port = proxy.agent("bot", ["api.example.test"])
    status, _, body = Conn(port).send(connect("api.example.test:22")).response()
    assert status == 403 and b"PORT_NOT_ALLOWED" in body
    tcp = TcpOrigin(up=1, down=3)
    try:
        other = proxy.agent("ops", ["api.example.test", f"api.example.test:{tcp.port}"])
        c = Conn(other).send(connect(f"api.example.test:{tcp.port}"))
        assert c.response(head_only=True)[0] == 200
        assert proxy.resolver.queries == ["api.example.test"]
    finally:
        tcp.close()


def test_a_glob_resolving_to_loopback_is_refused(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"*.example.test:{origin.port}", f"api.example.test:{origin.port}"])
    status, _, body = Conn(port).send(connect(f"x.example.test:{origin.port}")).response()
    assert status == 403 and b"REFUSED_ADDRESS" in body
    event = proxy.wait_event(lambda e: e["effect"] == "deny")
    assert (event["reason_code"], event["address"]) == ("REFUSED_ADDRESS", LOOPBACK)
    status, _, body = Conn(port).send(connect(f"mixed.example.test:{origin.port}")).response()
    assert status == 403 and b"REFUSED_ADDRESS" in body
    assert origin.seen == []
    # the exact entry in the same list does reach it
    assert Conn(port).send(connect(f"api.example.test:{origin.port}")).response(head_only=True)[0] == 200


def test_the_hosts_own_address_through_a_glob_is_refused(origin: Origin) -> None:
    own = sorted(str(a) for a in local_addresses() if not a.is_loopback and a.version == 4 and not a.is_link_local)
    runner = ProxyRunner(FAST, names={"own.example.test": own[:1] or [LOOPBACK]})
    try:
        port = runner.agent("bot", [f"*.example.test:{origin.port}"])
        status, _, body = Conn(port).send(connect(f"own.example.test:{origin.port}")).response()
        assert status == 403 and b"REFUSED_ADDRESS" in body
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("target", "expected"),
    [("API.Example.TEST.", 200), ("api.example.test.evil.test", 403), ("example.test", 403),
     ("127.0.0.1", 403), ("2130706433", 403), ("[::ffff:127.0.0.1]", 403), ("0x7f.1", 403),
     ("xn--bcher-kva.example.test", 200)],
)  # fmt: skip
def test_names_are_canonicalised_before_matching(
    proxy: ProxyRunner, origin: Origin, target: str, expected: int
) -> None:
    port = proxy.agent("bot", [f"api.example.test:{origin.port}", f"bücher.example.test:{origin.port}"])
    status, _, body = Conn(port).send(connect(f"{target}:{origin.port}")).response(head_only=expected == 200)
    assert status == expected, body
    if expected == 403:
        assert proxy.resolver.queries == []
        code = proxy.wait_event(lambda e: e["effect"] == "deny")["reason_code"]
        assert code == ("IP_NOT_LISTED" if target[0].isdigit() or target[0] == "[" else "NOT_ALLOWED")


def test_an_ip_literal_passes_only_when_listed(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"127.0.0.1:{origin.port}"])
    assert Conn(port).send(connect(f"127.0.0.1:{origin.port}")).response(head_only=True)[0] == 200
    assert Conn(port).send(connect(f"2130706433:{origin.port}")).response(head_only=True)[0] == 200
    status, _, payload = Conn(port).send(get(f"127.0.0.1:{origin.port}", "/lit")).response()
    assert status == 200 and json.loads(payload)["host"] == f"127.0.0.1:{origin.port}"
    assert proxy.resolver.queries == []


def test_a_mismatched_host_header_is_refused(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    target = f"plain.example.test:{origin.port}"
    request = f"GET http://{target}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode()
    status, _, body = Conn(port).send(request).response()
    assert status == 403 and b"HOST_MISMATCH" in body
    request = f"GET http://{target}/ HTTP/1.1\r\nHost: plain.example.test\r\n\r\n".encode()  # port 80 ≠ target port
    assert Conn(port).send(request).response()[0] == 403
    assert origin.seen == []
    request = f"GET http://{target}/ok HTTP/1.1\r\nHost: PLAIN.example.test.:{origin.port}\r\n\r\n".encode()
    status, _, payload = Conn(port).send(request).response()
    assert status == 200 and json.loads(payload)["host"] == target  # forwarded with the canonical Host


def test_a_second_keep_alive_request_to_a_denied_host_gets_403(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    c = Conn(port)
    status, headers, _ = c.send(get(f"plain.example.test:{origin.port}", "/first")).response()
    assert status == 200 and headers.get("connection") != "close"
    status, _, body = c.send(get("evil.test", "/second")).response()
    assert status == 403 and b"EGRESS_DENIED" in body
    assert c.closed_by_peer()
    assert [s["path"] for s in origin.seen] == ["/first"]


def test_an_agent_without_rules_is_refused(proxy: ProxyRunner) -> None:
    port = proxy.listen("nobody")
    status, _, body = Conn(port).send(connect("api.example.test:443")).response()
    assert status == 403 and b"NO_RULES" in body
    assert proxy.resolver.queries == []


def test_connection_errors_are_not_refusals(proxy: ProxyRunner) -> None:
    closed = socket.create_server((LOOPBACK, 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    port = proxy.agent("bot", [f"api.example.test:{dead_port}", "nowhere.test"])
    status, _, body = Conn(port).send(connect(f"api.example.test:{dead_port}")).response()
    assert status == 502 and b"EGRESS_DENIED" not in body
    event = proxy.wait_event(lambda e: e["outcome"] == "connect_failed")
    assert event["effect"] == "permit"
    status, _, body = Conn(port).send(connect("nowhere.test:443")).response()
    assert status == 502 and b"does not resolve" in body
    assert proxy.wait_event(lambda e: e["outcome"] == "resolve_failed")["effect"] == "permit"


def test_new_rules_close_connections_they_refuse(proxy: ProxyRunner) -> None:
    tcp = TcpOrigin(echo=True)
    try:
        port = proxy.agent("bot", [f"api.example.test:{tcp.port}"])
        c = Conn(port).send(connect(f"api.example.test:{tcp.port}"))
        assert c.response(head_only=True)[0] == 200
        c.send(b"ping")
        assert c.sock.recv(4) == b"ping"
        proxy.call(proxy.proxy.set_rules, "bot", {"allow": ["other.test"]}, None)
        assert c.closed_by_peer()
        assert proxy.wait_event(lambda e: e["effect"] == "permit")["outcome"] == "revoked"
    finally:
        tcp.close()


# ------------------------------------------------------------------------------ records and limits


def test_events_carry_byte_counts_at_close(proxy: ProxyRunner) -> None:
    tcp = TcpOrigin(up=1000, down=2500)
    try:
        port = proxy.agent("bot", [f"api.example.test:{tcp.port}"])
        c = Conn(port).send(connect(f"api.example.test:{tcp.port}"))
        assert c.response(head_only=True)[0] == 200
        c.send(b"u" * 1000)
        got = len(c.buf)
        while data := c.sock.recv(65536):
            got += len(data)
        assert got == 2500
        c.close()
        event = proxy.wait_event(lambda e: e["effect"] == "permit")
        assert (event["bytes_up"], event["bytes_down"], event["requests"]) == (1000, 2500, 1)
        assert event["ended_ms"] >= event["started_ms"]
    finally:
        tcp.close()


def test_a_flood_of_refusals_is_aggregated() -> None:
    config = ProxyConfig(tick=0.05, max_events_per_second=5)
    runner = ProxyRunner(config, clock=FrozenClock())  # one second that never ends: the flood stays in it
    try:
        port = runner.agent("flooder", ["api.example.test"])
        for i in range(40):
            assert Conn(port).send(connect(f"evil{i % 3}.test:443")).response()[0] == 403
        runner.wait_event(lambda e: e["aggregated"])
        deadline = time.monotonic() + WAIT_S
        while sum(e["count"] for e in runner.events) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        singles = [e for e in runner.events if not e["aggregated"]]
        aggregated = [e for e in runner.events if e["aggregated"]]
        assert len(singles) == 5
        assert sum(e["count"] for e in aggregated) == 35
        assert {e["host"] for e in aggregated} <= {"evil0.test", "evil1.test", "evil2.test"}
        stats = runner.call(runner.proxy.stats)
        assert stats["events_suppressed"] == 35 and stats["agents"]["flooder"]["refusals"] == 40
    finally:
        runner.close()


def test_the_per_agent_connection_limit(proxy: ProxyRunner) -> None:
    tcp = TcpOrigin(echo=True)
    try:
        port = proxy.agent("greedy", [f"api.example.test:{tcp.port}"], max_connections=2)
        other = proxy.agent("calm", [f"api.example.test:{tcp.port}"])
        tunnels = [Conn(port).send(connect(f"api.example.test:{tcp.port}")) for _ in range(2)]
        assert all(t.response(head_only=True)[0] == 200 for t in tunnels)
        status, _, body = Conn(port).send(connect(f"api.example.test:{tcp.port}")).response()
        assert status == 429 and b"EGRESS_LIMIT" in body
        assert proxy.wait_event(lambda e: e["reason_code"] == "CONNECTION_LIMIT")["agent_id"] == "greedy"
        # another agent is unaffected
        assert Conn(other).send(connect(f"api.example.test:{tcp.port}")).response(head_only=True)[0] == 200
        stats = proxy.call(proxy.proxy.stats)
        assert stats["agents"]["greedy"]["open_connections"] == 2 and stats["agents"]["greedy"]["limited"] == 1
        tunnels[0].close()
        deadline = time.monotonic() + WAIT_S
        while True:  # the slot frees once the proxy has seen the close
            status = Conn(port).send(connect(f"api.example.test:{tcp.port}")).response(head_only=True)[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status == 200
    finally:
        tcp.close()


def test_many_concurrent_tunnels() -> None:
    n = 1000
    runner = ProxyRunner(FAST)
    tcp = TcpOrigin(echo=True)
    conns: list[Conn] = []
    try:
        port = runner.agent("busy", [f"api.example.test:{tcp.port}"], max_connections=n + 10)
        for _ in range(n):
            conns.append(Conn(port).send(connect(f"api.example.test:{tcp.port}")))
        for c in conns:
            assert c.response(head_only=True)[0] == 200
        assert runner.call(runner.proxy.stats)["open_connections"] == n
        for i, c in enumerate(conns):
            c.send(b"%04d" % i)
        for i, c in enumerate(conns):
            while len(c.buf) < 4:
                assert c._fill()
            assert c.buf == b"%04d" % i
    finally:
        for c in conns:
            c.close()
        tcp.close()
        runner.close()


# ------------------------------------------------------------------------------ hostile clients

MALFORMED_REQUESTS = [
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n folded: x\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\nHost: api.example.test\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nHost: evil.test\r\n\r\n",
    b"POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\n",
    b"POST http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\nConnection: content-length\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET https://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    b"GET http://user@api.example.test/ HTTP/1.1\r\n\r\n",
    b"GET http://api.example.test/#frag HTTP/1.1\r\n\r\n",
    b"GET http://api.exa%6dple.test/ HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.test HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.test:443/x HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.test:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"CONNECT http://api.example.test:443 HTTP/1.1\r\n\r\n",
    b"GET http://api.example.test/ HTTP/3\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET http://api.example.test/\xff HTTP/1.1\r\n\r\n",
]


def test_malformed_requests_get_400_and_the_proxy_keeps_serving(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", ["api.example.test", f"plain.example.test:{origin.port}"])
    for request in MALFORMED_REQUESTS:
        status, _, body = Conn(port).send(request).response()
        assert status == 400, (request, body)
        assert request.split(b"\r\n")[0][:20] not in body or b"\xff" in request  # fixed text, no echo
    too_many = b"GET http://api.example.test/ HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n"
    too_big = b"GET http://api.example.test/ HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n"
    for request in (too_many, too_big):
        assert Conn(port).send(request).response()[0] == 431
    assert origin.seen == [] and proxy.resolver.queries == []
    bad_chunk = f"POST http://plain.example.test:{origin.port}/ HTTP/1.1\r\nHost: plain.example.test:{origin.port}\r\n"
    status, _, _ = Conn(port).send(bad_chunk.encode() + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n").response()
    assert status == 400
    status, _, payload = Conn(port).send(get(f"plain.example.test:{origin.port}", "/alive")).response()
    assert status == 200 and json.loads(payload)["path"] == "/alive"
    assert proxy.wait_event(lambda e: e["reason_code"] == "MALFORMED_REQUEST")["effect"] == "deny"


def test_slow_and_silent_clients_are_timed_out() -> None:
    runner = ProxyRunner(ProxyConfig(tick=0.05, header_timeout=0.3))
    try:
        port = runner.agent("bot", ["api.example.test"])
        slow = Conn(port).send(b"GET http://api.example.test/ HTTP/1.1\r\nHost: api.")
        silent = Conn(port)
        assert slow.response()[0] == 408
        assert silent.response()[0] == 408
        assert silent.closed_by_peer()
    finally:
        runner.close()


# ------------------------------------------------------------------------------ the host and the child process

CHILD = """
import ipaddress, json, sys
from faramesh.engine.proxy import ProxyConfig, ResolveFailed, run_child
names = json.loads(sys.argv[1])
async def resolve(name):
    if name not in names:
        raise ResolveFailed(name + " does not resolve")
    return [ipaddress.ip_address(a) for a in names[name]]
sys.exit(run_child(sys.argv[2:], resolver=resolve, config=ProxyConfig(tick=0.05)))
"""


def child_command() -> list[str]:
    return [sys.executable, "-c", CHILD, json.dumps(TEST_NAMES)]


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def exchange(port: int, request: bytes, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    c = Conn(port)
    try:
        return c.send(request).response(head_only)
    finally:
        c.close()


def test_the_host_runs_the_child_and_restarts_it_with_its_listeners(origin: Origin) -> None:
    events: list[dict[str, Any]] = []
    logged: list[str] = []

    async def scenario() -> None:
        host = ProxyHost(events.append, command=child_command(), log=logged.append, backoff=(0.05, 0.5))
        await host.set_rules("bot", {"allow": [f"plain.example.test:{origin.port}"]})  # before start: kept
        await host.start()
        try:
            listener = socket.create_server((LOOPBACK, 0), backlog=128)
            port = listener.getsockname()[1]
            await host.add_listener("bot", listener)
            listener.close()  # the host keeps its own duplicate
            status, _, body = await blocking(exchange, port, get(f"plain.example.test:{origin.port}", "/before"))
            assert status == 200 and json.loads(body)["path"] == "/before"
            status, _, body = await blocking(exchange, port, connect("evil.test:443"))
            assert status == 403
            first_pid = host.pid
            assert first_pid is not None
            stats = await host.stats()
            assert stats["agents"]["bot"]["refusals"] == 1 and stats["running"] and stats["pid"] == first_pid

            os.kill(first_pid, signal.SIGKILL)
            async with asyncio.timeout(WAIT_S):
                while not (host.ready and host.pid not in (None, first_pid)):
                    await asyncio.sleep(0.02)
            assert host.restarts == 1 and host.last_exit == -signal.SIGKILL
            status, _, body = await blocking(exchange, port, get(f"plain.example.test:{origin.port}", "/after"))
            assert status == 200 and json.loads(body)["path"] == "/after"
            stats = await host.stats()
            assert stats["pid"] == host.pid and stats["agents"]["bot"]["listeners"] == 1

            await host.set_rules("bot", {"allow": ["other.test"]})
            status, _, body = await blocking(exchange, port, get(f"plain.example.test:{origin.port}", "/gone"))
            assert status == 403
            with pytest.raises(EgressConfigError):
                await host.set_rules("bot", {"allow": ["bad host"]})
            await host.forget_agent("bot")
            assert host.status()["listeners"] == 0
        finally:
            await host.close()
        assert host.pid is None and not host.ready

    asyncio.run(scenario())
    kinds = [(e["effect"], e["reason_code"]) for e in events]
    assert ("deny", "NOT_ALLOWED") in kinds and ("permit", "ALLOWED") in kinds
    assert [e["bytes_down"] > 0 for e in events if e["effect"] == "permit"] == [True, True]
    assert [s["path"] for s in origin.seen] == ["/before", "/after"]


def test_the_production_child_starts_and_refuses_without_rules() -> None:
    """The default command (`python -I -m faramesh.engine.proxy`, PATH and LANG only). It has no test
    resolver, so the only request names an unlisted loopback literal: even a broken proxy would stay on this
    machine and make no DNS query."""

    async def scenario() -> None:
        host = ProxyHost(lambda e: None)
        await host.start()
        try:
            listener = socket.create_server((LOOPBACK, 0))
            port = listener.getsockname()[1]
            await host.add_listener("bot", listener)
            await host.set_rules("bot", {"allow": ["api.example.test"]})
            status, _, body = await blocking(exchange, port, connect(f"127.0.0.1:{port}"))
            assert status == 403 and b"IP_NOT_LISTED" in body
            stats = await host.stats()
            assert stats["dns_queries"] == 0
            listener.close()
            with socket.socket() as unbound, pytest.raises(ValueError):
                await host.add_listener("bot", unbound)  # not listening
        finally:
            await host.close()
        with pytest.raises(ProxyUnavailable):
            await host.stats()

    asyncio.run(scenario())


def test_a_child_that_cannot_start_is_reported() -> None:
    async def scenario() -> None:
        host = ProxyHost(lambda e: None, command=[sys.executable, "-c", "import sys; sys.exit(3)"], log=lambda s: None,
                         ready_timeout=5.0, backoff=(0.05, 0.1))  # fmt: skip
        with pytest.raises(ProxyUnavailable, match="exit status 3"):
            await host.start()
        assert host.last_exit == 3
        await host.close()

    asyncio.run(scenario())


def test_the_child_answers_bad_control_messages_with_typed_errors() -> None:
    async def scenario() -> None:
        host = ProxyHost(lambda e: None, command=child_command())
        await host.start()
        try:
            with pytest.raises(ProxyError) as info:
                await host._request({"op": "rules", "agent_id": "x", "egress": {"allow": ["bad host"]}})
            assert info.value.code == "EGRESS_CONFIG"
            with pytest.raises(ProxyError) as info:
                await host._request({"op": "listen", "listener_id": 9, "agent_id": "x"})  # no descriptor
            assert info.value.code == "PROXY_CONTROL_ERROR"
            with pytest.raises(ProxyError):
                await host._request({"op": "nope"})
            assert (await host.stats())["running"]
        finally:
            await host.close()

    asyncio.run(scenario())


def test_expect_100_continue_is_relayed(proxy: ProxyRunner, origin: Origin) -> None:
    port = proxy.agent("bot", [f"plain.example.test:{origin.port}"])
    host = f"plain.example.test:{origin.port}"
    c = Conn(port).send(
        f"PUT http://{host}/put HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    assert c.response(head_only=True)[0] == 100  # the body is sent only after the interim response
    status, _, payload = c.send(b"data").response()
    assert status == 200 and json.loads(payload)["body"] == 4


def test_the_next_checked_address_is_tried_when_one_refuses(proxy: ProxyRunner, origin: Origin) -> None:
    """mixed.example.test → [::1, 127.0.0.1]; the origin listens on 127.0.0.1 only (both are this host)."""
    port = proxy.agent("bot", [f"mixed.example.test:{origin.port}"])
    c = Conn(port).send(connect(f"mixed.example.test:{origin.port}"))
    assert c.response(head_only=True)[0] == 200
    c.close()
    assert proxy.wait_event(lambda e: e["effect"] == "permit")["address"] == LOOPBACK


def test_random_bytes_never_break_the_proxy(proxy: ProxyRunner, origin: Origin) -> None:
    import random

    rng = random.Random(5)
    port = proxy.agent("bot", ["api.example.test", f"plain.example.test:{origin.port}"], max_connections=1000)
    pieces = [b"GET ", b"CONNECT ", b"http://", b"api.example.test", b":443", b" HTTP/1.1", b"\r\n", b"\r\n\r\n",
              b"Host: ", b"Transfer-Encoding: chunked", b"Content-Length: 9", b"\n", b"\r", b" ", b":", b"\x00",
              b"\xff", b"0\r\n\r\n", b"%", b"@", b"[", b"]"]  # fmt: skip
    conns = []
    for _ in range(300):
        data = b"".join(rng.choice(pieces) if rng.random() < 0.8 else bytes([rng.randrange(256)]) for _ in range(20))
        c = Conn(port).send(data)
        c.sock.shutdown(socket.SHUT_WR)  # nothing more is coming: the proxy answers or closes now
        conns.append(c)
    for c in conns:
        try:
            while c._fill():
                pass
        except ConnectionResetError:
            pass
        assert c.buf == b"" or c.buf.split(b" ")[1] in (b"400", b"403", b"431", b"502", b"200"), c.buf[:80]
        c.close()
    status, _, payload = Conn(port).send(get(f"plain.example.test:{origin.port}", "/still")).response()
    assert status == 200 and json.loads(payload)["path"] == "/still"


def test_an_idle_tunnel_is_closed() -> None:
    runner = ProxyRunner(ProxyConfig(tick=0.05, idle_timeout=0.3))
    tcp = TcpOrigin(echo=True)
    try:
        port = runner.agent("bot", [f"api.example.test:{tcp.port}"])
        c = Conn(port).send(connect(f"api.example.test:{tcp.port}"))
        assert c.response(head_only=True)[0] == 200
        c.send(b"ping")
        assert c.sock.recv(4) == b"ping"
        assert c.closed_by_peer()  # nothing more either way: the sweep closes it
        event = runner.wait_event(lambda e: e["effect"] == "permit")
        assert (event["outcome"], event["bytes_up"], event["bytes_down"]) == ("idle_timeout", 4, 4)
    finally:
        tcp.close()
        runner.close()
