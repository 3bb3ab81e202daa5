"""Generic webhook: `provider "x" { type = "webhook-sink"; url; secret; verify_tls }`.

Each batch is one POST of `application/json`:

    {"batch": "<chain_id>:<first seq>-<last seq>", "count": N, "records": [<DPR>, …],
     "sent_at": <unix seconds>, "source": "faramesh"}

with these headers:

    X-Faramesh-Signature: sha256=<hex HMAC-SHA256(secret, the exact body bytes)>
    X-Faramesh-Timestamp: <unix seconds> (equal to the body's `sent_at`)
    X-Faramesh-Delivery:  <the batch key> (the same on every retry of the batch)

To verify (see `verify_webhook`): compute the HMAC over the raw body as received, before any JSON
parsing, compare in constant time, then check that `sent_at` equals the timestamp header and is within
your tolerance (5 minutes) to refuse replays. Any 2xx acknowledges the batch; anything else is retried.
Records are delivered at least once: de-duplicate on each record's `id`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
from faramesh.engine.sinks.base import Batch, SenderContext
from faramesh.engine.sinks.config import SinkSpec
from faramesh.engine.sinks.httpclient import HttpEndpoint, status_error

SIGNATURE_HEADER: Final = "X-Faramesh-Signature"
TIMESTAMP_HEADER: Final = "X-Faramesh-Timestamp"
DELIVERY_HEADER: Final = "X-Faramesh-Delivery"
MAX_RECORDS = 500
MAX_BYTES = 1024 * 1024
DEFAULT_TOLERANCE = 300.0


class WebhookVerificationError(ValueError):
    """The body is not what the holder of the secret sent (or is too old)."""


def webhook_body(key: str, lines: Sequence[bytes], sent_at: int) -> bytes:
    return (
        b'{"batch":' + orjson.dumps(key) + b',"count":' + str(len(lines)).encode() + b',"records":['
        + b",".join(lines) + b'],"sent_at":' + str(sent_at).encode() + b',"source":"faramesh"}'
    )  # fmt: skip


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_webhook(
    secret: str | bytes,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """What a receiver runs: the parsed body when the signature and timestamp hold, else
    WebhookVerificationError. `body` must be the raw bytes received."""
    key = secret.encode() if isinstance(secret, str) else secret
    if not signature or not hmac.compare_digest(sign(key, body), signature.strip()):
        raise WebhookVerificationError("signature does not match the body")
    try:
        stamp = int(timestamp or "")
        data = orjson.loads(body)
    except (ValueError, orjson.JSONDecodeError):
        raise WebhookVerificationError("timestamp or body is malformed") from None
    if not isinstance(data, dict) or data.get("sent_at") != stamp:
        raise WebhookVerificationError("the timestamp header does not match the signed body")
    if abs(now - stamp) > tolerance:
        raise WebhookVerificationError("the delivery is older than the tolerance (a replay?)")
    return data


class Webhook:
    def __init__(self, spec: SinkSpec, ctx: SenderContext) -> None:
        self.spec = spec
        self.redact = ctx.redact
        self.clock = ctx.clock
        self.endpoint = HttpEndpoint(
            spec.secret("url"),
            timeout=ctx.timeout,
            verify_tls=bool(spec.settings.get("verify_tls", True)),
            redact=ctx.redact,
        )
        self.target = self.endpoint.shown
        self.max_records = ctx.max_records or MAX_RECORDS
        self.max_bytes = MAX_BYTES
        self.linger = ctx.linger if ctx.linger is not None else 0.0
        self._key = spec.secret("secret").encode()

    def send(self, batch: Batch) -> None:
        sent_at = int(self.clock())
        key = batch.key
        body = webhook_body(key, batch.lines, sent_at)
        headers: Mapping[str, str] = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._key, body),
            TIMESTAMP_HEADER: str(sent_at),
            DELIVERY_HEADER: key,
        }
        response = self.endpoint.post(body, headers)
        if 200 <= response.status < 300:
            return
        raise status_error(
            self.target,
            response,
            "the webhook",
            f"check the URL ({self.spec.source_of('url')}) and that the receiver uses the same "
            f"secret ({self.spec.source_of('secret')})",
            self.redact,
        )

    def close(self) -> None:
        self.endpoint.close()


def create(spec: SinkSpec, ctx: SenderContext) -> Webhook:
    return Webhook(spec, ctx)
