"""The egress proxy (DESIGN.md §4): a child process of the engine, so that parsing what a hostile agent sends
happens outside the process that holds keys.

The engine (engine/proxy_host.py) spawns `python -I -m faramesh.engine.proxy --control-fd N` and talks to it
over a Unix SOCK_SEQPACKET socketpair, one JSON object per message: per-agent egress rules and limits, and
listening sockets (SCM_RIGHTS) each tagged with the agent id — the proxy knows the agent by the listener a
connection arrived on, never by anything the agent says. The proxy sends back one event per connection
(aggregated under flood) that the engine turns into a DPR, and answers `stats` queries for `status`.

Per connection, HTTP `CONNECT` (a TLS tunnel, or any TCP) or plain-HTTP forwarding (absolute-form
`http://…` request targets; every request on a kept-alive connection is checked again); no SOCKS:

1. the request head is parsed strictly and within bounds (size, field count, no obs-fold, no bare CR/LF,
   one Host, never Content-Length together with Transfer-Encoding) — anything else is a 400;
2. the target name is canonicalised (case, trailing dot, IDNA, inet_aton forms) and matched against the
   agent's allow/deny entries and ports **before any lookup**: a refused name causes no DNS query;
3. the name is resolved (the resolver is a constructor argument: tests pass one, production uses
   getaddrinfo in a thread), every address is classified (engine/egress.py's explicit table plus this
   host's own addresses), and an address in a refused range passes only for an entry that is exactly that
   name or IP literal — never a glob;
4. the connection goes to the checked address; nothing is resolved again.

A refusal is `403` with `EGRESS_DENIED` in the body; a failure to reach an allowed host is `502`/`504`, never
a refusal. Each agent has a concurrent-connection cap and a byte-rate token bucket, so one agent cannot
exhaust the proxy. Relays are callback-driven protocols with transport flow control (no stream readers on
the hot path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import os
import re
import resource
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from faramesh.engine.egress import (
    REFUSED_ADDRESS,
    EgressConfigError,
    Host,
    IPAddress,
    MalformedHost,
    ProxyEgressPolicy,
    canonical_ip,
    check_address,
    compile_proxy_egress,
    decide_target,
    parse_host_port,
)

MiB = 1024 * 1024
CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 100
COPY_CHUNK = 256 * 1024
HIGH_WATER = 256 * 1024  # buffered unread bytes per connection before reading pauses
MAX_CONTROL_MESSAGE = 256 * 1024
MAX_ADDRESSES_TRIED = 4
LISTEN_BACKLOG = 4096
OWN_ADDRESSES_REFRESH_S = 30.0
MAX_QUEUED_EVENTS = 10_000
LINGER_S = 2.0  # after an error response: drain what the client still sends, so the close is not a reset
LINGER_BYTES = 256 * 1024

# Reason codes the proxy adds to egress.py's (stable: they end up in DPRs).
NO_RULES = "NO_RULES"
HOST_MISMATCH = "HOST_MISMATCH"
MALFORMED_REQUEST = "MALFORMED_REQUEST"
MALFORMED_HOST = "MALFORMED_HOST"
CONNECTION_LIMIT = "CONNECTION_LIMIT"
ALLOWED = "ALLOWED"
PERMIT, DENY = "permit", "deny"


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Bounds and timeouts (seconds). Tests shorten them; production uses the defaults."""

    header_timeout: float = 30.0  # the whole first request head (slow clients)
    keepalive_timeout: float = 60.0  # idle between requests on a kept-alive client connection
    idle_timeout: float = 600.0  # a tunnel or a transfer with no byte either way
    connect_timeout: float = 10.0
    resolve_timeout: float = 10.0
    response_timeout: float = 120.0  # the upstream response head after a request
    reject_timeout: float = 2.0  # reading the head of a connection that is over its agent's limit
    max_head: int = 32 * 1024
    max_response_head: int = 64 * 1024
    max_headers: int = 100
    max_total_connections: int = 8192
    max_rejecting: int = 256  # over-limit connections being answered 429 at once; the rest are closed
    max_events_per_second: int = 50  # per agent and effect; the rest are aggregated
    max_aggregate_buckets: int = 64  # per agent and second
    tick: float = 1.0  # housekeeping period: aggregated events, idle sweep


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """Per-agent caps. `bandwidth_bytes_per_s` 0: no byte-rate cap (both directions share one bucket)."""

    max_connections: int = 256
    bandwidth_bytes_per_s: int = 100 * MiB
    bandwidth_burst_bytes: int = 16 * MiB

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> AgentLimits:
        if not data:
            return cls()
        unknown = set(data) - {"max_connections", "bandwidth_bytes_per_s", "bandwidth_burst_bytes"}
        if unknown:
            raise ValueError(f"unknown proxy limit(s): {', '.join(sorted(unknown))}")
        values: dict[str, int] = {}
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"proxy limit {key} must be a non-negative integer")
            values[key] = value
        limits = cls(**values)
        if limits.max_connections < 1:
            raise ValueError("proxy limit max_connections must be at least 1")
        return limits

    def to_mapping(self) -> dict[str, int]:
        return {
            "max_connections": self.max_connections,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "bandwidth_burst_bytes": self.bandwidth_burst_bytes,
        }


# ------------------------------------------------------------------------------ HTTP heads (pure)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB (CR/LF are split out first)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(;[\x20-\x7e\t]*)?\r\n")
_STATUS = re.compile(rb"[1-5][0-9][0-9]")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "upgrade",
     "http2-settings"}
)  # fmt: skip
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
REASONS = {
    200: "Connection established", 400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 501: "Not Implemented",
    502: "Bad Gateway", 504: "Gateway Timeout",
}  # fmt: skip


class HttpError(Exception):
    """A request (4xx) or upstream response (5xx) the proxy will not pass on. `message` is fixed text: it
    never echoes what the peer sent."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str) -> HttpError:
    return HttpError(400, MALFORMED_REQUEST, message)


def _bad_upstream(message: str) -> HttpError:
    return HttpError(502, "UPSTREAM_ERROR", f"the upstream response is malformed: {message}")


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed request or response head. `start`: (method, target, version) or (version, status, reason)."""

    start: tuple[str, str, str]
    fields: tuple[tuple[str, str], ...]  # (name as sent, value), in order

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n.lower() == name]

    @property
    def version(self) -> str:
        return self.start[2] if self.start[0][:5] != "HTTP/" else self.start[0]


def _lines(data: bytes, error: Callable[[str], HttpError]) -> list[bytes]:
    if not data.endswith(HEAD_END):
        raise error("an unterminated head")
    lines = data[:-4].split(CRLF)
    if lines and lines[0] == b"":  # RFC 9112 §2.2: one empty line before a request is tolerated
        lines = lines[1:]
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise error("a bare CR or LF in the head")
    if not lines or not lines[0]:
        raise error("an empty head")
    return lines


def _fields(lines: list[bytes], max_fields: int, error: Callable[[str], HttpError]) -> tuple[tuple[str, str], ...]:
    if len(lines) > max_fields:
        raise HttpError(431, MALFORMED_REQUEST, f"more than {max_fields} header fields")
    out = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise error("a folded header line (obs-fold)")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise error("a header line that is not `name: value`")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise error("a control character in a header value")
        out.append((name.decode("ascii"), value.decode("latin-1")))
    return tuple(out)


def parse_request_head(data: bytes, max_fields: int = 100) -> Message:
    """A request head ending in CRLF CRLF → Message; HttpError (400/431) on anything not strictly HTTP/1.x."""
    lines = _lines(data, _bad)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _bad("a request line that is not `METHOD target HTTP/1.x`")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise _bad("a request line with an invalid method or target")
    if version not in _VERSIONS:
        raise _bad("an HTTP version other than 1.0 or 1.1")
    message = Message(
        (method.decode("ascii"), target.decode("ascii"), version.decode("ascii")), _fields(lines[1:], max_fields, _bad)
    )
    if len(message.get_all("host")) > 1:
        raise _bad("more than one Host header")
    return message


def parse_response_head(data: bytes, max_fields: int = 100) -> Message:
    """An upstream response head → Message; HttpError 502 when it is malformed."""
    lines = _lines(data, _bad_upstream)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in _VERSIONS or not _STATUS.fullmatch(status) or _BAD_VALUE.search(reason) or b"\t" in reason:
        raise _bad_upstream("an invalid status line")
    try:
        fields = _fields(lines[1:], max_fields, _bad_upstream)
    except HttpError as exc:
        raise _bad_upstream(exc.message) from None
    return Message((version.decode("ascii"), status.decode("ascii"), reason.decode("latin-1")), fields)


@dataclass(frozen=True, slots=True)
class Framing:
    kind: str  # none | length | chunked | close
    length: int = 0


NO_BODY = Framing("none")


def _framing(message: Message, error: Callable[[str], HttpError]) -> Framing | None:
    te, cl = message.get_all("transfer-encoding"), message.get_all("content-length")
    if te and cl:
        raise error("both Transfer-Encoding and Content-Length (a request smuggling shape)")
    if len(te) > 1 or len(cl) > 1:
        raise error("a repeated Transfer-Encoding or Content-Length header")
    if te:
        if message.version == "HTTP/1.0":
            raise error("Transfer-Encoding in an HTTP/1.0 message")
        if te[0].lower() != "chunked":
            raise error("a transfer coding other than `chunked`")
        return Framing("chunked")
    if cl:
        if not cl[0].isdigit() or not cl[0].isascii() or len(cl[0]) > 15:
            raise error("an invalid Content-Length")
        return Framing("length", int(cl[0]))
    return None


def connection_tokens(message: Message, error: Callable[[str], HttpError]) -> frozenset[str]:
    tokens: set[str] = set()
    for value in message.get_all("connection") + message.get_all("proxy-connection"):
        for token in value.split(","):
            token = token.strip().lower()
            if not token:
                continue
            if not _TOKEN.fullmatch(token.encode("latin-1")):
                raise error("an invalid Connection header")
            tokens.add(token)
    if tokens & _FRAMING:
        raise error("a Connection header naming Host, Content-Length or Transfer-Encoding")
    return frozenset(tokens)


def request_framing(request: Message) -> Framing:
    return _framing(request, _bad) or NO_BODY


def response_framing(method: str, response: Message) -> Framing:
    status = int(response.start[1])
    framing = _framing(response, _bad_upstream)
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    return framing or Framing("close")


def parse_absolute_target(target: str) -> tuple[Host, int, str]:
    """`http://host[:port]/path?query` → (host, port, origin-form). HttpError 400 otherwise."""
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isalpha():
        raise _bad("a proxy request needs an absolute http:// URL (origin-form targets are not proxied)")
    if scheme.lower() != "http":
        raise _bad("only http:// URLs are forwarded; use CONNECT for TLS")
    if "#" in rest:
        raise _bad("a fragment in the request target")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    try:
        host, port = parse_host_port(authority, 80)
    except MalformedHost as exc:
        raise HttpError(400, MALFORMED_HOST, f"the target host is refused: {exc}") from None
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def authority(host: Host, port: int, default_port: int | None = 80) -> str:
    text = f"[{host.ip}]" if isinstance(host.ip, ipaddress.IPv6Address) else str(host)
    return text if port == default_port else f"{text}:{port}"


def same_target(a: tuple[Host, int], b: tuple[Host, int]) -> bool:
    (ha, pa), (hb, pb) = a, b
    if pa != pb:
        return False
    if ha.ip is not None and hb.ip is not None:
        return canonical_ip(ha.ip) == canonical_ip(hb.ip)
    return ha == hb


def _head_bytes(start: str, fields: Iterable[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{n}: {v}" for n, v in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def forward_request_head(request: Message, path: str, host_value: str, tokens: frozenset[str]) -> bytes:
    """The head sent upstream: origin-form target, the checked Host, hop-by-hop fields dropped."""
    method, _, version = request.start
    drop = HOP_BY_HOP | tokens
    fields = [("Host", host_value)]
    fields += [(n, v) for n, v in request.fields if n.lower() not in drop and n.lower() != "host"]
    return _head_bytes(f"{method} {path} {version}", fields)


def forward_response_head(response: Message, tokens: frozenset[str], *, close: bool) -> bytes:
    _, status, reason = response.start
    drop = HOP_BY_HOP | tokens
    fields = [(n, v) for n, v in response.fields if n.lower() not in drop]
    if close:
        fields.append(("Connection", "close"))
    return _head_bytes(f"HTTP/1.1 {status} {reason}".rstrip(), fields)


def error_response(status: int, code: str, message: str) -> bytes:
    """Every error response closes the connection (what follows the refused request is never parsed)."""
    body = f"{code}: {message}\n".encode()
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return _head_bytes(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", fields) + body


def parse_chunk_size(line: bytes) -> int:
    m = _CHUNK_SIZE.fullmatch(line)
    if m is None:
        raise _bad("an invalid chunk size line")
    return int(m.group(1), 16)


# ------------------------------------------------------------------------------ limits and events (pure)


class TokenBucket:
    """Bytes per second with a burst; `take` may go into debt and says how long to pause to repay it."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def new_event(agent_id: str, effect: str, reason_code: str, reason: str, now_ms: int, **extra: Any) -> dict[str, Any]:
    """One proxy event (the engine's DPR input). Fields:

    - `agent_id` — the listener's agent; `effect` — `permit` | `deny` (a connection error is a permit whose
      `outcome` says what failed); `reason_code` — `ALLOWED`, egress.py's codes (`NOT_ALLOWED`,
      `DENY_LISTED`, `PORT_NOT_ALLOWED`, `IP_NOT_LISTED`, `REFUSED_NAME`, `REFUSED_ADDRESS`) or the proxy's
      (`NO_RULES`, `HOST_MISMATCH`, `MALFORMED_REQUEST`, `MALFORMED_HOST`, `CONNECTION_LIMIT`, `MIXED` for
      a catch-all aggregate); `reason` — human text (never request bytes);
    - `host`, `port` — the canonical target; `address` — the checked address connected to (or refused);
      `rule` — the allow entry that matched; `method` — `CONNECT`, `GET`…;
    - `outcome` — `refused`, `malformed`, `limit`, `closed`, `revoked` (new rules closed it),
      `idle_timeout`, `connect_failed`, `resolve_failed`, `timeout`, `upstream_error`, `proxy_error`;
    - `requests` (plain HTTP requests served on the upstream connection), `bytes_up` / `bytes_down`
      (bytes written to / read from the upstream, counted at close), `started_ms` / `ended_ms` (epoch ms);
    - `count`, `aggregated` — under flood, one event stands for `count` connections (bytes summed).
    """
    event: dict[str, Any] = {
        "agent_id": agent_id, "effect": effect, "reason_code": reason_code, "reason": reason, "host": None,
        "port": None, "address": None, "rule": None, "method": None,
        "outcome": "refused" if effect == DENY else "closed", "requests": 0, "bytes_up": 0, "bytes_down": 0,
        "started_ms": now_ms, "ended_ms": now_ms, "count": 1, "aggregated": False,
    }  # fmt: skip
    event.update(extra)
    return event


class EventAggregator:
    """At most `per_second` events per agent and effect pass each second; the rest are merged by (agent,
    effect, host, port, reason code) into one event per key with a `count` and summed bytes, released by
    `flush` (every tick). Keys per agent and second are bounded too; overflow merges into one catch-all."""

    def __init__(self, per_second: int, max_buckets: int) -> None:
        self.per_second = per_second
        self.max_buckets = max_buckets
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        self._pending: dict[tuple[str, str, str | None, int | None, str], dict[str, Any]] = {}
        self._buckets: dict[str, int] = {}
        self.suppressed = 0

    def offer(self, event: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The event to send now, or None when it was folded into an aggregate."""
        second = int(now)
        key = (str(event["agent_id"]), str(event["effect"]))
        start, count = self._windows.get(key, (second, 0))
        if start != second:
            start, count = second, 0
        if count < self.per_second:
            self._windows[key] = (start, count + 1)
            return event
        self._windows[key] = (start, count)
        self.suppressed += int(event["count"])
        agent = key[0]
        bucket = (agent, key[1], event["host"], event["port"], str(event["reason_code"]))
        pending = self._pending.get(bucket)
        if pending is None:
            if self._buckets.get(agent, 0) >= self.max_buckets:
                bucket = (agent, key[1], None, None, "MIXED")
                pending = self._pending.get(bucket)
            if pending is None:
                self._buckets[agent] = self._buckets.get(agent, 0) + 1
                pending = dict(event, count=0, bytes_up=0, bytes_down=0, requests=0, aggregated=True)
                if bucket[4] == "MIXED":
                    pending.update(host=None, port=None, address=None, reason_code="MIXED", reason="mixed reasons")
                self._pending[bucket] = pending
        pending["count"] += event["count"]
        for name in ("bytes_up", "bytes_down", "requests"):
            pending[name] += event[name]
        pending["started_ms"] = min(pending["started_ms"], event["started_ms"])
        pending["ended_ms"] = max(pending["ended_ms"], event["ended_ms"])
        return None

    def flush(self) -> list[dict[str, Any]]:
        out = list(self._pending.values())
        self._pending.clear()
        self._buckets.clear()
        return out


# ------------------------------------------------------------------------------ name resolution

Resolver = Callable[[str], Awaitable[Sequence[IPAddress]]]


class ResolveFailed(Exception):
    """The name does not resolve (a connection error, never a refusal)."""


class SystemResolver:
    """getaddrinfo in a dedicated thread pool (a slow lookup never blocks the event loop or other agents'
    connections behind the default executor)."""

    def __init__(self, workers: int = 16) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="faramesh-dns")

    async def __call__(self, name: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        lookup = functools.partial(socket.getaddrinfo, name, None, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            infos = await loop.run_in_executor(self._pool, lookup)
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveFailed(f"{name} does not resolve ({getattr(exc, 'strerror', None) or exc})") from None
        out: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            text = str(sockaddr[0])
            if "%" in text:
                continue  # a scoped (link-local) address: refused anyway, and not comparable
            ip = ipaddress.ip_address(text)
            if ip not in out:
                out.append(ip)
        return out


def local_addresses() -> frozenset[IPAddress]:
    """This host's own addresses (the proxy's network namespace), from /proc; empty where /proc lacks them."""
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError), open("/proc/net/fib_trie", encoding="ascii") as f:
        last: str | None = None
        for line in f:
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif text.startswith("/32 host LOCAL") and last is not None:
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.IPv4Address(last))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as f:
        for line in f:
            with contextlib.suppress(ValueError, IndexError):
                found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    return frozenset(found)


# ------------------------------------------------------------------------------ connections


class StreamClosed(Exception):
    """The peer closed (or the connection was aborted) before what was being read arrived."""


class HeadTooLarge(Exception):
    pass


class Stream(asyncio.Protocol):
    """One TCP connection. Buffered reads while heads are parsed; once two streams relay, bytes go from one
    `data_received` straight into the other transport, and each side's write buffer pauses the other's
    reading (transport flow control). A shared token bucket pauses reading when an agent is over its rate."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self.loop = loop
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self.sent = 0
        self.received = 0
        self.peer: Stream | None = None
        self.bucket: TokenBucket | None = None
        self.last_activity = clock()
        self.on_made: Callable[[Stream], None] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._eof_sent = False
        self._pauses: set[str] = set()

    # -- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.received += n
        self.last_activity = now = self.clock()
        if self.bucket is not None:
            delay = self.bucket.take(n, now)
            if delay > 0 and "rate" not in self._pauses:
                self._pause("rate")
                self.loop.call_later(delay, self._resume, "rate")
        if self.peer is not None:
            self.peer.write(data)
            return
        self.buf += data
        if len(self.buf) > HIGH_WATER:
            self._pause("buffer")
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        if self.peer is not None:
            self.peer.write_eof()
            if self.peer.eof:
                self.close()
                self.peer.close()
        return True  # half-close: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.eof = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.peer is not None:
            self.peer._pause("peer")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.peer is not None:
            self.peer._resume("peer")
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- flow control
    def _pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pauses.add(why)

    def _resume(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses and self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if len(self.buf) <= HIGH_WATER:
            self._resume("buffer")
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- writing
    def write(self, data: bytes) -> None:
        if self.closed or self._eof_sent or self.transport is None or self.transport.is_closing():
            return
        self.sent += len(data)
        self.last_activity = self.clock()
        self.transport.write(data)

    def write_eof(self) -> None:
        if self._eof_sent or self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self._eof_sent = True  # asyncio raises on a write after write_eof
            self.transport.write_eof()

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain
        if self.closed:
            raise StreamClosed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- reading (one reader at a time)
    async def read_until(self, delimiter: bytes, limit: int) -> bytes:
        start = 0
        while True:
            i = self.buf.find(delimiter, start)
            if i != -1:
                end = i + len(delimiter)
                if end > limit:
                    raise HeadTooLarge
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) >= limit:
                raise HeadTooLarge
            if self.eof:
                raise StreamClosed
            start = max(0, len(self.buf) - len(delimiter) + 1)
            await self._wait()

    async def read_some(self, most: int) -> bytes:
        while not self.buf:
            if self.eof:
                return b""
            await self._wait()
        data = bytes(self.buf[:most])
        del self.buf[:most]
        return data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise StreamClosed
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def relay_with(self, peer: Stream) -> None:
        """From now on every byte read goes to `peer` (call on both streams)."""
        self.peer = peer
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            peer.write(data)
        self._resume("buffer")
        if peer._write_paused:
            self._pause("peer")
        if self.closed:
            peer.close()
        elif self.eof:
            peer.write_eof()
            if peer.eof:
                self.close()
                peer.close()


async def copy_exact(src: Stream, dst: Stream, n: int) -> None:
    while n > 0:
        data = await src.read_some(min(n, COPY_CHUNK))
        if not data:
            raise StreamClosed
        dst.write(data)
        await dst.drain()
        n -= len(data)


async def copy_body(src: Stream, dst: Stream, framing: Framing) -> None:
    """Copies one message body, validating chunked framing (so the next message starts where it should)."""
    if framing.kind == "length":
        await copy_exact(src, dst, framing.length)
    elif framing.kind == "close":
        while data := await src.read_some(COPY_CHUNK):
            dst.write(data)
            await dst.drain()
    elif framing.kind == "chunked":
        while True:
            line = await _read_line(src)
            size = parse_chunk_size(line)
            dst.write(line)
            if size == 0:
                break
            await copy_exact(src, dst, size)
            if await src.read_exact(2) != CRLF:
                raise _bad("a chunk not followed by CRLF")
            dst.write(CRLF)
        for _ in range(MAX_TRAILER_LINES):
            line = await _read_line(src)
            if line != CRLF:
                _fields([line[:-2]], 1, _bad)
            dst.write(line)
            if line == CRLF:
                await dst.drain()
                return
        raise _bad("too many trailer fields")


async def _read_line(src: Stream) -> bytes:
    try:
        line = await src.read_until(CRLF, MAX_CHUNK_LINE)
    except HeadTooLarge:
        raise _bad("a chunk or trailer line that is too long") from None
    if b"\n" in line[:-2] or b"\r" in line[:-2]:
        raise _bad("a bare CR or LF in chunked framing")
    return line


# ------------------------------------------------------------------------------ the proxy


@dataclass
class Upstream:
    stream: Stream
    host: Host
    port: int
    address: IPAddress
    rule: str | None
    method: str
    started_ms: int
    requests: int = 0


# Proxy-tier credentials (issue 6 (b)): a permit names one plain-HTTP request (host, port, method, path,
# TTL); the agent holds only a placeholder, and the proxy swaps it for the secret in that one request.
PLACEHOLDER_PREFIX = "FARAMESH-CREDENTIAL-"
_PLACEHOLDER = re.compile(r"FARAMESH-CREDENTIAL-[A-Za-z0-9_-]{16,64}")
MAX_GRANTS_PER_AGENT = 1024
CREDENTIAL_GRANT_INVALID = "CREDENTIAL_GRANT_INVALID"


@dataclass(frozen=True)
class CredentialGrant:
    """One use of a secret in one request: in the header named `header`, the placeholder is replaced by
    `value` (the agent writes `Authorization: Bearer FARAMESH-CREDENTIAL-…`). The value never leaves this
    process except in that request; events name the grant by its placeholder."""

    placeholder: str
    host: Host
    port: int
    method: str
    path: str  # without the query
    header: str
    value: str = field(repr=False)
    expires: float  # on the proxy's monotonic clock

    def matches(self, host: Host, port: int, method: str, path: str, now: float) -> bool:
        return (
            now < self.expires
            and same_target((self.host, self.port), (host, port))
            and method == self.method
            and path.split("?", 1)[0] == self.path
        )


@dataclass(eq=False)
class AgentState:
    agent_id: str
    policy: ProxyEgressPolicy | None = None
    limits: AgentLimits = field(default_factory=AgentLimits)
    bucket: TokenBucket | None = None
    flows: set[Flow] = field(default_factory=set)
    listeners: set[int] = field(default_factory=set)
    permits: int = 0
    refusals: int = 0
    errors: int = 0
    limited: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    grants: dict[str, CredentialGrant] = field(default_factory=dict)
    injected: int = 0


@dataclass(eq=False)
class Flow:
    """One client connection accepted on an agent's listener."""

    agent: AgentState
    client: Stream
    upstream: Upstream | None = None
    outcome: str = "closed"
    responding: bool = False  # response bytes went to the client: no error response can follow
    linger: bool = False  # an error response was written: drain the client before closing
    credentials: list[str] = field(default_factory=list)  # placeholders of grants used on this connection


class EgressProxy:
    """The proxy itself (runs in the child; tests may run it in-process). `on_event` receives one dict per
    connection (see `new_event`); `resolver` resolves names (a test hook — production passes none and gets
    getaddrinfo); `clock` is monotonic seconds, `wall_clock` epoch seconds for event times."""

    def __init__(
        self,
        on_event: Callable[[dict[str, Any]], None],
        *,
        resolver: Resolver | None = None,
        config: ProxyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        own_addresses: Callable[[], frozenset[IPAddress]] = local_addresses,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.on_event = on_event
        self.resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self.config = config or ProxyConfig()
        self.clock = clock
        self.wall_clock = wall_clock
        self._own_addresses_source = own_addresses
        self.own_addresses: frozenset[IPAddress] = frozenset()
        self._own_refreshed = -OWN_ADDRESSES_REFRESH_S
        self.log = log or (lambda line: print(f"faramesh-proxy: {line}", file=sys.stderr, flush=True))
        self.agents: dict[str, AgentState] = {}
        self.listeners: dict[int, tuple[str, asyncio.Server]] = {}
        self.aggregator = EventAggregator(self.config.max_events_per_second, self.config.max_aggregate_buckets)
        self.open_connections = 0
        self.rejecting = 0
        self.dns_queries = 0
        self.started = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._housekeeping: asyncio.Task[None] | None = None

    # -- control surface
    async def start(self) -> None:
        self._refresh_own_addresses()
        self._housekeeping = asyncio.get_running_loop().create_task(self._tick())

    def set_rules(self, agent_id: str, egress: Mapping[str, Any], limits: Mapping[str, Any] | None = None) -> None:
        """Installs (or replaces) an agent's rules; open connections the new rules refuse are closed.
        EgressConfigError / ValueError when the rules or limits are unusable (nothing changes then)."""
        policy = compile_proxy_egress(egress)
        parsed = AgentLimits.from_mapping(limits)
        agent = self._agent(agent_id)
        agent.policy = policy
        if parsed != agent.limits or agent.bucket is None:
            agent.limits = parsed
            rate = parsed.bandwidth_bytes_per_s
            agent.bucket = TokenBucket(rate, parsed.bandwidth_burst_bytes or rate, self.clock()) if rate else None
            for flow in agent.flows:
                flow.client.bucket = agent.bucket
                if flow.upstream is not None:
                    flow.upstream.stream.bucket = agent.bucket
        for flow in list(agent.flows):
            up = flow.upstream
            if up is None:
                continue
            decision = decide_target(policy, up.host, up.port)
            if check_address(decision, up.address, self.own_addresses) is not None:
                flow.outcome = "revoked"
                flow.client.abort()
                up.stream.abort()

    async def add_listener(self, listener_id: int, agent_id: str, sock: socket.socket) -> None:
        """Serves `sock` (a listening TCP socket, owned by the proxy from now on) for `agent_id`."""
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.close()
            raise ValueError("a proxy listener must be a TCP socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.close()
            raise ValueError("a proxy listener must be listening")
        self.remove_listener(listener_id)
        agent = self._agent(agent_id)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: self._new_client(agent), sock=sock, backlog=LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self.listeners[listener_id] = (agent_id, server)
        agent.listeners.add(listener_id)

    def remove_listener(self, listener_id: int) -> None:
        entry = self.listeners.pop(listener_id, None)
        if entry is not None:
            entry[1].close()
            if entry[0] in self.agents:
                self.agents[entry[0]].listeners.discard(listener_id)

    def forget_agent(self, agent_id: str) -> None:
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return
        for listener_id in list(agent.listeners):
            self.remove_listener(listener_id)
        for flow in list(agent.flows):
            flow.outcome = "revoked"
            flow.client.abort()
            if flow.upstream is not None:
                flow.upstream.stream.abort()

    def grant(self, agent_id: str, fields: Mapping[str, Any]) -> None:
        """Install a proxy-tier credential for one request of `agent_id` (ValueError on a bad grant)."""
        placeholder = str(fields.get("placeholder", ""))
        if not _PLACEHOLDER.fullmatch(placeholder):
            raise ValueError("a grant's placeholder is FARAMESH-CREDENTIAL- and 16-64 URL-safe characters")
        host, port = parse_host_port(str(fields["host"]), 80)
        method, path, header = str(fields["method"]).upper(), str(fields["path"]), str(fields["header"])
        value, ttl = str(fields["value"]), float(fields["ttl"])
        if not path.startswith("/") or "?" in path or not header or any(c in header for c in ":\r\n "):
            raise ValueError("a grant names an origin path without query and a header name")
        if any(c in value for c in "\r\n\0") or not 0 < ttl <= 3600:
            raise ValueError("a grant's value has no line breaks and its TTL is 1 s to 1 h")
        agent = self._agent(agent_id)
        now = self.clock()
        agent.grants = {k: g for k, g in agent.grants.items() if g.expires > now}
        if len(agent.grants) >= MAX_GRANTS_PER_AGENT:
            raise ValueError(f"agent {agent_id} holds {MAX_GRANTS_PER_AGENT} unused grants")
        agent.grants[placeholder] = CredentialGrant(placeholder, host, port, method, path, header, value, now + ttl)

    def _inject(self, flow: Flow, request: Message, host: Host, port: int, path: str) -> Message | None:
        """The request with each placeholder swapped for its grant's secret (each grant used once), or None
        when a placeholder names no live grant for exactly this request: that request is refused, so a
        placeholder never reaches an upstream and grants cannot be probed or replayed."""
        method = request.start[0]
        used: list[str] = []
        fields = []
        for name, value in request.fields:
            found = _PLACEHOLDER.findall(value)
            for placeholder in found:
                grant = flow.agent.grants.get(placeholder)
                if grant is None or name.lower() != grant.header.lower():
                    return None
                if not grant.matches(host, port, method, path, self.clock()):
                    return None
                value = value.replace(placeholder, grant.value)
                used.append(placeholder)
            fields.append((name, value))
        if any(_PLACEHOLDER.search(part) for part in request.start):
            return None  # in the target: never substituted, never forwarded
        for placeholder in used:
            flow.agent.grants.pop(placeholder, None)
        flow.agent.injected += len(used)
        flow.credentials += used
        return Message(request.start, tuple(fields)) if used else request

    def stats(self) -> dict[str, Any]:
        agents = {
            a.agent_id: {
                "open_connections": len(a.flows), "permits": a.permits, "refusals": a.refusals, "errors": a.errors,
                "limited": a.limited, "bytes_up": a.bytes_up, "bytes_down": a.bytes_down,
                "listeners": len(a.listeners), "has_rules": a.policy is not None,
                "credentials_injected": a.injected, "grants_pending": len(a.grants),
            }
            for a in self.agents.values()
        }  # fmt: skip
        return {
            "pid": os.getpid(),
            "uptime_s": int(self.clock() - self.started),
            "open_connections": self.open_connections,
            "listeners": len(self.listeners),
            "dns_queries": self.dns_queries,
            "events_suppressed": self.aggregator.suppressed,
            "agents": agents,
        }

    async def close(self) -> None:
        for listener_id in list(self.listeners):
            self.remove_listener(listener_id)
        for agent in self.agents.values():
            for flow in list(agent.flows):
                flow.client.abort()
                if flow.upstream is not None:
                    flow.upstream.stream.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # their last events are emitted here
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        self._emit_aggregates()

    # -- events
    def _emit(self, event: dict[str, Any]) -> None:
        out = self.aggregator.offer(event, self.clock())
        if out is not None:
            self._deliver(out)

    def _emit_aggregates(self) -> None:
        for event in self.aggregator.flush():
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        try:
            self.on_event(event)
        except Exception as exc:  # the sink is the engine's: its failure must not take connections down
            self.log(f"event sink failed: {type(exc).__name__}")

    def _now_ms(self) -> int:
        return int(self.wall_clock() * 1000)

    # -- housekeeping
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            try:
                self._emit_aggregates()
                self._sweep_idle()
                if self.clock() - self._own_refreshed >= OWN_ADDRESSES_REFRESH_S:
                    self._refresh_own_addresses()
            except Exception as exc:  # housekeeping must survive anything
                self.log(f"housekeeping failed: {type(exc).__name__}: {exc}")

    def _refresh_own_addresses(self) -> None:
        self._own_refreshed = self.clock()
        self.own_addresses = frozenset(canonical_ip(ip) for ip in self._own_addresses_source())

    def _sweep_idle(self) -> None:
        limit = self.clock() - self.config.idle_timeout
        for agent in self.agents.values():
            for flow in list(agent.flows):
                up = flow.upstream
                last = max(flow.client.last_activity, up.stream.last_activity if up is not None else 0.0)
                if up is not None and last < limit:
                    flow.outcome = "idle_timeout"
                    flow.client.abort()
                    up.stream.abort()

    # -- accepting
    def _agent(self, agent_id: str) -> AgentState:
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = AgentState(agent_id)
        return agent

    def _new_client(self, agent: AgentState) -> Stream:
        stream = Stream(asyncio.get_running_loop(), self.clock)
        stream.on_made = functools.partial(self._accepted, agent)
        return stream

    def _accepted(self, agent: AgentState, stream: Stream) -> None:
        loop = stream.loop
        if self.agents.get(agent.agent_id) is not agent:
            stream.abort()  # the agent was forgotten while the accept was queued
            return
        if (
            len(agent.flows) >= agent.limits.max_connections
            or self.open_connections >= self.config.max_total_connections
        ):
            agent.limited += 1
            if self.rejecting >= self.config.max_rejecting:
                stream.abort()
                return
            self.rejecting += 1
            self._spawn(loop, self._reject(agent, stream))
            return
        flow = Flow(agent, stream)
        stream.bucket = agent.bucket
        agent.flows.add(flow)
        self.open_connections += 1
        self._spawn(loop, self._serve(flow))

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reject(self, agent: AgentState, stream: Stream) -> None:
        """Over the limit: read the head briefly so the client sees the 429 rather than a reset."""
        try:
            with contextlib.suppress(TimeoutError, StreamClosed, HeadTooLarge):
                async with asyncio.timeout(self.config.reject_timeout):
                    await stream.read_until(HEAD_END, self.config.max_head)
            message = f"agent {agent.agent_id} has {agent.limits.max_connections} proxy connections open"
            stream.write(error_response(429, "EGRESS_LIMIT", message))
            self._emit(new_event(agent.agent_id, DENY, CONNECTION_LIMIT, message, self._now_ms(), outcome="limit"))
            stream.close()
        finally:
            self.rejecting -= 1

    # -- serving one client connection
    async def _serve(self, flow: Flow) -> None:
        client = flow.client
        first = True
        try:
            while not client.closed:
                try:
                    async with asyncio.timeout(self.config.header_timeout if first else self.config.keepalive_timeout):
                        head = await client.read_until(HEAD_END, self.config.max_head)
                except TimeoutError:
                    if first or client.buf:
                        self._error(flow, 408, "REQUEST_TIMEOUT", "the request head did not arrive in time")
                    return
                except HeadTooLarge:
                    raise HttpError(
                        431, MALFORMED_REQUEST, f"a request head over {self.config.max_head} bytes"
                    ) from None
                except StreamClosed:
                    return
                first = False
                request = parse_request_head(head, self.config.max_headers)
                if request.start[0] == "CONNECT":
                    await self._connect(flow, request)
                    return
                if not await self._forward(flow, request):
                    return
        except HttpError as exc:
            if not flow.responding:
                self._error(flow, exc.status, exc.code, exc.message)
            if exc.status < 500:
                self._refused(flow, exc.code, exc.message, None, None, None, outcome="malformed")
            else:
                flow.outcome = "upstream_error"
        except StreamClosed:
            pass
        except Exception as exc:  # a bug must cost one connection, never the proxy
            self.log(f"connection handler failed for agent {flow.agent.agent_id}: {type(exc).__name__}: {exc}")
            flow.outcome = "proxy_error"
        finally:
            self._close_upstream(flow)
            if flow.linger and not client.closed:
                with contextlib.suppress(Exception):
                    await self._linger(client)
            self._finish(flow)

    async def _linger(self, stream: Stream) -> None:
        """Closing with unread input makes the kernel send a reset, which can destroy the error response
        before the client reads it: half-close, then discard a bounded amount for a bounded time."""
        stream.write_eof()
        budget = LINGER_BYTES
        with contextlib.suppress(TimeoutError, StreamClosed):
            async with asyncio.timeout(LINGER_S):
                while budget > 0 and (data := await stream.read_some(65536)):
                    budget -= len(data)

    def _finish(self, flow: Flow) -> None:
        flow.client.close()
        self._close_upstream(flow)
        if flow in flow.agent.flows:
            flow.agent.flows.discard(flow)
            self.open_connections -= 1

    def _close_upstream(self, flow: Flow) -> None:
        up, flow.upstream = flow.upstream, None
        if up is None:
            return
        up.stream.close()
        agent = flow.agent
        agent.bytes_up += up.stream.sent
        agent.bytes_down += up.stream.received
        event = new_event(
            agent.agent_id, PERMIT, ALLOWED, f"allowed by {up.rule}" if up.rule else "allowed", up.started_ms,
            host=str(up.host), port=up.port, address=str(up.address), rule=up.rule, method=up.method,
            outcome=flow.outcome, requests=up.requests, bytes_up=up.stream.sent, bytes_down=up.stream.received,
            ended_ms=self._now_ms(),
        )  # fmt: skip
        if flow.credentials:  # which grants were spent (their placeholders), never the secrets
            event["credentials"], flow.credentials = flow.credentials, []
        flow.outcome = "closed"
        self._emit(event)

    def _refused(
        self,
        flow: Flow,
        code: str,
        reason: str,
        host: Host | None,
        port: int | None,
        method: str | None,
        *,
        address: IPAddress | None = None,
        outcome: str = "refused",
    ) -> None:
        flow.agent.refusals += 1
        self._emit(
            new_event(
                flow.agent.agent_id, DENY, code, reason, self._now_ms(), host=str(host) if host else None, port=port,
                address=str(address) if address is not None else None, method=method, outcome=outcome,
            )
        )  # fmt: skip

    def _error(self, flow: Flow, status: int, code: str, message: str) -> None:
        flow.client.write(error_response(status, code, message))
        flow.linger = True

    def _deny(self, flow: Flow, code: str, reason: str, host: Host, port: int, method: str, **kw: Any) -> None:
        self._error(flow, 403, "EGRESS_DENIED", f"{code}: {reason}")
        self._refused(flow, code, reason, host, port, method, **kw)

    def _failed(self, flow: Flow, status: int, outcome: str, reason: str, host: Host, port: int, method: str) -> None:
        """A permitted destination that could not be reached: an error, recorded, never a refusal."""
        flow.agent.errors += 1
        self._error(flow, status, "UPSTREAM_UNREACHABLE" if status == 502 else "UPSTREAM_TIMEOUT", reason)
        self._emit(
            new_event(
                flow.agent.agent_id, PERMIT, ALLOWED, reason, self._now_ms(), host=str(host), port=port,
                method=method, outcome=outcome,
            )
        )  # fmt: skip

    async def _open(self, flow: Flow, host: Host, port: int, method: str) -> Upstream | None:
        """Decide, resolve, check, connect. None: a response was written and the client must be closed."""
        agent = flow.agent
        if agent.policy is None:
            self._deny(flow, NO_RULES, f"no egress rules are installed for agent {agent.agent_id}", host, port, method)
            return None
        decision = decide_target(agent.policy, host, port)
        if not decision.allowed:
            self._deny(flow, decision.code, decision.reason, host, port, method)
            return None
        up = flow.upstream
        if up is not None:
            reusable = (up.host, up.port) == (host, port) and not up.stream.closed and not up.stream.eof
            if reusable and check_address(decision, up.address, self.own_addresses) is None:
                up.rule = decision.rule
                return up
            self._close_upstream(flow)
        try:
            addresses = await self._resolve(host)
        except ResolveFailed as exc:
            self._failed(flow, 502, "resolve_failed", str(exc), host, port, method)
            return None
        except TimeoutError:
            self._failed(flow, 504, "timeout", f"resolving {host} timed out", host, port, method)
            return None
        if not addresses:
            self._failed(flow, 502, "resolve_failed", f"{host} has no address", host, port, method)
            return None
        for ip in addresses:
            why = check_address(decision, ip, self.own_addresses)
            if why is not None:
                self._deny(flow, REFUSED_ADDRESS, f"{host} {why}", host, port, method, address=ip)
                return None
        stream, address, error = await self._dial(addresses, port, agent)
        if stream is None or address is None:
            status, outcome, reason = error
            self._failed(
                flow, status, outcome, f"connecting to {authority(host, port, None)}: {reason}", host, port, method
            )
            return None
        agent.permits += 1
        flow.upstream = Upstream(stream, host, port, address, decision.rule, method, self._now_ms())
        return flow.upstream

    async def _resolve(self, host: Host) -> list[IPAddress]:
        if host.ip is not None:
            return [host.ip]
        self.dns_queries += 1
        async with asyncio.timeout(self.config.resolve_timeout):
            found = await self.resolver(str(host.name))
        out: list[IPAddress] = []
        for ip in found:
            if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise ResolveFailed("the resolver returned something that is not an address")
            if ip not in out:
                out.append(ip)
        return out

    async def _dial(
        self, addresses: list[IPAddress], port: int, agent: AgentState
    ) -> tuple[Stream | None, IPAddress | None, tuple[int, str, str]]:
        """Connects to the first checked address that answers (the numeric address: no lookup happens)."""
        loop = asyncio.get_running_loop()
        error = (502, "connect_failed", "no address to try")
        for ip in addresses[:MAX_ADDRESSES_TRIED]:
            target = canonical_ip(ip)
            family = socket.AF_INET if target.version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await loop.sock_connect(sock, (str(target), port))
                return await self._attach(sock, agent), target, error
            except TimeoutError:
                sock.close()
                error = (504, "timeout", f"{target} did not answer in {self.config.connect_timeout:g} s")
            except OSError as exc:
                sock.close()
                error = (502, "connect_failed", f"{target}: {os.strerror(exc.errno) if exc.errno else exc}")
        return None, None, error

    async def _attach(self, sock: socket.socket, agent: AgentState) -> Stream:
        stream = Stream(asyncio.get_running_loop(), self.clock)
        stream.bucket = agent.bucket
        await stream.loop.create_connection(lambda: stream, sock=sock)
        return stream

    async def _connect(self, flow: Flow, request: Message) -> None:
        method = "CONNECT"
        if request.get_all("content-length") or request.get_all("transfer-encoding"):
            raise _bad("a CONNECT request with a body")
        try:
            host, port = parse_host_port(request.start[1], None)
        except MalformedHost as exc:
            raise HttpError(400, MALFORMED_HOST, f"the CONNECT target is refused: {exc}") from None
        up = await self._open(flow, host, port, method)
        if up is None:
            return
        up.requests = 1
        client = flow.client
        client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        flow.responding = True
        client.relay_with(up.stream)
        up.stream.relay_with(client)
        await asyncio.gather(client.lost, up.stream.lost)

    async def _forward(self, flow: Flow, request: Message) -> bool:
        """One plain-HTTP request and its response. True: the client connection stays open."""
        method, target, version = request.start
        host, port, path = parse_absolute_target(target)
        framing = request_framing(request)
        tokens = connection_tokens(request, _bad)
        hosts = request.get_all("host")
        if hosts:
            try:
                claimed = parse_host_port(hosts[0], 80)
            except MalformedHost as exc:
                raise HttpError(400, MALFORMED_HOST, f"the Host header is refused: {exc}") from None
            if not same_target(claimed, (host, port)):
                reason = f"the Host header names {authority(*claimed)}, the request target {authority(host, port)}"
                self._deny(flow, HOST_MISMATCH, reason, host, port, method)
                return False
        injected = self._inject(flow, request, host, port, path)
        if injected is None:
            reason = "a credential placeholder that names no live grant for this host, method and path"
            self._deny(flow, CREDENTIAL_GRANT_INVALID, reason, host, port, method)
            return False
        request = injected
        up = await self._open(flow, host, port, method)
        if up is None:
            return False
        upstream = up.stream
        up.requests += 1
        upstream.write(forward_request_head(request, path, authority(host, port), tokens))
        body = asyncio.get_running_loop().create_task(copy_body(flow.client, upstream, framing))
        body.add_done_callback(lambda t: upstream.abort() if not t.cancelled() and t.exception() else None)
        try:
            try:
                response = await self._response_head(flow, upstream)
            except HttpError:
                failed = body.exception() if body.done() and not body.cancelled() else None
                if failed is not None:
                    raise failed from None  # the client's body was malformed: that is what failed
                raise
            rframing = response_framing(method, response)
            if version == "HTTP/1.0" and rframing.kind == "chunked":
                raise _bad_upstream("a chunked response to an HTTP/1.0 request")
            rtokens = connection_tokens(response, _bad_upstream)
            client_close = version == "HTTP/1.0" or "close" in tokens or rframing.kind == "close"
            reusable = response.version == "HTTP/1.1" and "close" not in rtokens and rframing.kind != "close"
            flow.client.write(forward_response_head(response, rtokens, close=client_close))
            flow.responding = True
            await copy_body(upstream, flow.client, rframing)
            flow.responding = False
            if not body.done():  # answered before the request body ended: the framing is lost
                client_close, reusable = True, False
            else:
                body.result()
        finally:
            if not body.done():
                body.cancel()
                await asyncio.wait([body])  # never raises the body's outcome; our own cancellation still propagates
        if not reusable:
            self._close_upstream(flow)
        return not client_close

    async def _response_head(self, flow: Flow, upstream: Stream) -> Message:
        try:
            async with asyncio.timeout(self.config.response_timeout):
                while True:
                    raw = await upstream.read_until(HEAD_END, self.config.max_response_head)
                    response = parse_response_head(raw, self.config.max_headers)
                    status = int(response.start[1])
                    if status == 101:
                        raise _bad_upstream("a protocol switch that was not asked for")
                    if status >= 200:
                        return response
                    flow.client.write(forward_response_head(response, frozenset(), close=False))
        except TimeoutError:
            raise HttpError(504, "UPSTREAM_TIMEOUT", "the upstream response did not arrive in time") from None
        except HeadTooLarge:
            raise _bad_upstream("a response head that is too large") from None
        except StreamClosed:
            raise HttpError(502, "UPSTREAM_ERROR", "the upstream closed the connection without a response") from None


# ------------------------------------------------------------------------------ the child process


class ControlChannel:
    """The proxy's end of the engine's socketpair (SOCK_SEQPACKET: one JSON object per message, listener
    fds attached). Messages are handled one at a time, in order. EOF → the engine is gone → the proxy exits."""

    def __init__(self, sock: socket.socket, proxy: EgressProxy, done: asyncio.Event) -> None:
        self.sock = sock
        self.proxy = proxy
        self.done = done
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[tuple[bytes, list[int]]] = asyncio.Queue()
        self.outbox: deque[bytes] = deque()
        self.dropped = 0
        self._writing = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        self.worker = self.loop.create_task(self._work())

    def send(self, message: Mapping[str, Any]) -> None:
        data = orjson.dumps(message)
        if self.outbox or not self._try_send(data):
            if len(self.outbox) >= MAX_QUEUED_EVENTS:
                self.dropped += 1
                return
            self.outbox.append(data)
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.sock.fileno(), self._writable)

    def event(self, event: dict[str, Any]) -> None:
        self.send({"op": "event", "event": event})

    def _try_send(self, data: bytes) -> bool:
        try:
            self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            self.done.set()  # the engine end is gone
        return True

    def _writable(self) -> None:
        while self.outbox:
            if not self._try_send(self.outbox[0]):
                return
            self.outbox.popleft()
        self._writing = False
        self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_CONTROL_MESSAGE, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data:
                self.loop.remove_reader(self.sock.fileno())
                self.done.set()
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                self.proxy.log("a control message was truncated; ignored")
                continue
            self.inbox.put_nowait((data, fds))

    async def _work(self) -> None:
        while True:
            data, fds = await self.inbox.get()
            reply_id: Any = None
            try:
                message = orjson.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("a control message must be an object")
                reply_id = message.get("id")
                result = await self._handle(message, fds)
                fds = []
                self.send({"op": "reply", "id": reply_id, "ok": True, "result": result})
            except Exception as exc:  # a bad message is answered; it never stops the channel
                if isinstance(exc, EgressConfigError):
                    code = "EGRESS_CONFIG"
                elif isinstance(exc, ValueError | KeyError | TypeError | OSError):
                    code = "PROXY_CONTROL_ERROR"
                else:
                    code = "PROXY_INTERNAL_ERROR"
                    self.proxy.log(f"control message failed: {type(exc).__name__}: {exc}")
                self.send({"op": "reply", "id": reply_id, "ok": False, "error": {"code": code, "message": str(exc)}})
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    async def _handle(self, message: dict[str, Any], fds: list[int]) -> Any:
        op = message.get("op")
        if op == "rules":
            self.proxy.set_rules(str(message["agent_id"]), message["egress"], message.get("limits"))
            return None
        if op == "listen":
            if len(fds) != 1:
                raise ValueError("a listen message carries exactly one socket")
            sock = socket.socket(fileno=fds.pop())
            await self.proxy.add_listener(int(message["listener_id"]), str(message["agent_id"]), sock)
            return None
        if op == "unlisten":
            self.proxy.remove_listener(int(message["listener_id"]))
            return None
        if op == "forget":
            self.proxy.forget_agent(str(message["agent_id"]))
            return None
        if op == "grant":
            self.proxy.grant(str(message["agent_id"]), message["grant"])
            return None
        if op == "stats":
            return dict(self.proxy.stats(), events_dropped=self.dropped)
        raise ValueError(f"unknown control operation {op!r}")

    async def close(self) -> None:
        self.worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.worker
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self._writable()  # last events, best effort


def _raise_fd_limit() -> None:
    """Each proxied connection costs two descriptors: use the hard limit."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    control: socket.socket,
    *,
    resolver: Resolver | None = None,
    config: ProxyConfig | None = None,
    own_addresses: Callable[[], frozenset[IPAddress]] = local_addresses,
) -> None:
    """Runs the proxy on a control socket until the engine closes its end (or SIGTERM)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, done.set)
    config = config or ProxyConfig()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        config = _replace_total(config, max(16, (soft - 64) // 2))
    channel: ControlChannel | None = None

    def on_event(event: dict[str, Any]) -> None:
        if channel is not None:
            channel.event(event)

    proxy = EgressProxy(on_event, resolver=resolver, config=config, own_addresses=own_addresses)
    await proxy.start()
    channel = ControlChannel(control, proxy, done)
    channel.send({"op": "ready", "pid": os.getpid()})
    await done.wait()
    await proxy.close()
    await channel.close()


def _replace_total(config: ProxyConfig, most: int) -> ProxyConfig:
    return dataclasses.replace(config, max_total_connections=min(config.max_total_connections, most))


def run_child(
    argv: Sequence[str] | None = None,
    *,
    resolver: Resolver | None = None,
    config: ProxyConfig | None = None,
    own_addresses: Callable[[], frozenset[IPAddress]] = local_addresses,
) -> int:
    """The child's entry: `--control-fd N` names the engine's socketpair end. Tests call this from their
    own child script to pass a resolver; production runs `main` and never can."""
    parser = argparse.ArgumentParser(prog="faramesh.engine.proxy", add_help=False)
    parser.add_argument("--control-fd", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine decides when the proxy stops (Ctrl-C in dev)
    _raise_fd_limit()
    try:
        control = socket.socket(fileno=args.control_fd)
    except OSError as exc:
        print(
            f"faramesh-proxy: control fd {args.control_fd} is unusable: {errno.errorcode.get(exc.errno or 0)}",
            file=sys.stderr,
        )
        return 4
    asyncio.run(serve(control, resolver=resolver, config=config, own_addresses=own_addresses))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_child(argv)


if __name__ == "__main__":
    sys.exit(main())
