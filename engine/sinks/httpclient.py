"""A small keep-alive HTTP POST client for the HTTP sinks (stdlib `http.client`).

One connection per sink, used only by that sink's thread. Redirects are never followed: a sink URL
that redirects could carry the credential header to another host. Transport failures become
DeliveryError with a code; messages name `scheme://host:port` only and pass through the sink's redactor.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from faramesh.engine.sinks.config import shown_url
from faramesh.engine.sinks.errors import (
    SINK_REJECTED,
    SINK_SERVER_ERROR,
    SINK_TIMEOUT,
    SINK_TOO_LARGE,
    SINK_UNREACHABLE,
    DeliveryError,
)

MAX_RESPONSE = 64 * 1024  # of a response body kept for an error message
USER_AGENT = "faramesh-sink/1"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class HttpEndpoint:
    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        verify_tls: bool = True,
        redact: Callable[[str], str] = lambda s: s,
    ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.shown = shown_url(url)
        self.timeout = timeout
        self.redact = redact
        self._basic: str | None = None
        if parts.username is not None:
            # Credentials in the URL become a Basic header; http.client would otherwise ignore them.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
        self._context: ssl.SSLContext | None = None
        if self.scheme == "https":
            self._context = ssl.create_default_context()
            if not verify_tls:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._conn: http.client.HTTPConnection | None = None

    def with_path(self, path: str) -> HttpEndpoint:
        """The same endpoint posting to another path (e.g. the HEC event path under a base URL)."""
        self.path = path
        return self

    def _connect(self) -> http.client.HTTPConnection:
        if self._context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def post(self, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST `body`; the response, whatever its status. Raises DeliveryError for transport failures.

        A keep-alive connection the server closed while idle fails on first use; that one case is
        retried at once on a fresh connection, since the request never reached the application."""
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if self._basic is not None and not any(k.lower() == "authorization" for k in all_headers):
            all_headers["Authorization"] = self._basic
        reused = self._conn is not None
        try:
            return self._exchange(body, all_headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            if not reused:
                raise self._transport_error(exc) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self._transport_error(exc) from None
        try:
            return self._exchange(body, all_headers)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self._transport_error(exc) from None

    def _exchange(self, body: bytes, headers: Mapping[str, str]) -> Response:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        if conn.sock is None:
            conn.connect()
            sock: socket.socket | None = conn.sock
            if sock is not None:
                # http.client sends headers and body in two writes: without NODELAY, Nagle plus the
                # peer's delayed ACK can stall a request by ~40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request("POST", self.path, body=body, headers=dict(headers))
        response = conn.getresponse()
        data = response.read(MAX_RESPONSE)
        if not response.isclosed() or response.will_close:  # a body longer than we keep: drop the connection
            self.close()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    def _transport_error(self, exc: BaseException) -> DeliveryError:
        if isinstance(exc, TimeoutError | socket.timeout):
            return DeliveryError(SINK_TIMEOUT, f"{self.shown} did not answer within {self.timeout:g}s")
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = exc.verify_message or "certificate verification failed"
            return DeliveryError(SINK_UNREACHABLE, self.redact(f"TLS with {self.shown} failed: {detail}"))
        if isinstance(exc, ConnectionRefusedError):
            return DeliveryError(SINK_UNREACHABLE, f"{self.shown} refused the connection")
        if isinstance(exc, http.client.HTTPException | ConnectionResetError | BrokenPipeError):
            return DeliveryError(SINK_UNREACHABLE, f"{self.shown} closed the connection ({type(exc).__name__})")
        if isinstance(exc, socket.gaierror):
            return DeliveryError(SINK_UNREACHABLE, f"{self.shown}: host name does not resolve")
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return DeliveryError(SINK_UNREACHABLE, self.redact(f"{self.shown} is unreachable: {reason}"))

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def status_error(shown: str, response: Response, what: str, hint: str, redact: Callable[[str], str]) -> DeliveryError:
    """The DeliveryError for a non-2xx answer: 5xx/429/408 retry (honouring Retry-After), 413 asks for
    smaller batches, 3xx and other 4xx say what to fix (`hint`)."""
    status = response.status
    text = redact(_printable(response.body))
    said = f": {text}" if text else ""
    if status >= 500 or status in (408, 429):
        return DeliveryError(
            SINK_SERVER_ERROR,
            f"{what} at {shown} answered HTTP {status}{said}",
            retry_after=_retry_after(response.headers.get("retry-after")),
        )
    if status == 413:
        return DeliveryError(SINK_TOO_LARGE, f"{what} at {shown} refused the batch as too large (HTTP 413)")
    if 300 <= status < 400:
        return DeliveryError(
            SINK_REJECTED,
            f"{what} at {shown} answered with a redirect (HTTP {status}), which is not followed "
            "(it could carry the credential elsewhere): point the sink at the final URL",
        )
    return DeliveryError(SINK_REJECTED, f"{what} at {shown} rejected the batch (HTTP {status}{said}); {hint}")


def _printable(body: bytes, limit: int = 200) -> str:
    text = body[: limit * 4].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:limit] + ("…" if len(text) > limit else "")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough
    return max(0.0, min(seconds, 300.0))
