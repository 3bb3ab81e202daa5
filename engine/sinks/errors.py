"""Typed failures of the audit sinks. Every message is safe to log: no secret, no secret URL."""

from __future__ import annotations

from typing import Final

SINK_CONFIG: Final = "SINK_CONFIG"  # the declared sink cannot work (missing env var, bad URL, bad field)
SINK_SPOOL: Final = "SINK_SPOOL"  # the spool directory cannot be created, written or synced
SINK_UNREACHABLE: Final = "SINK_UNREACHABLE"  # connection refused or reset, DNS or TLS failure
SINK_TIMEOUT: Final = "SINK_TIMEOUT"  # no answer within the sink's timeout
SINK_SERVER_ERROR: Final = "SINK_SERVER_ERROR"  # 5xx, 429, 408: the receiver is unwell, retry later
SINK_REJECTED: Final = "SINK_REJECTED"  # 4xx or 3xx: credentials or configuration; will not heal by retrying
SINK_TOO_LARGE: Final = "SINK_TOO_LARGE"  # 413: the batch is too large for the receiver


class SinkError(Exception):
    """A failure with a stable `code` and a message a human can act on."""

    code: str = "SINK_ERROR"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class SinkConfigError(SinkError, ValueError):
    """One or more declared sinks cannot be built; the message names every problem."""

    code = SINK_CONFIG


class SinkSpoolError(SinkError, OSError):
    code = SINK_SPOOL


class DeliveryError(SinkError):
    """One delivery attempt failed. The batch stays spooled and is retried; nothing is dropped."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """A failure that retrying alone will not fix (an operator must change a token or URL)."""
        return self.code == SINK_REJECTED
