"""Splunk HTTP Event Collector: `provider "x" { type = "splunk-sink"; url; token; index; source;
sourcetype; verify_tls }`.

POST `<url>/services/collector/event` (a `url` with no path gets that path; one ending in
`/services/collector` gets `/event`; any other path is used as written) with
`Authorization: Splunk <token>`. The body is the batch's events as concatenated JSON objects, one per
line, each

    {"event": <the DPR>, "time": <its time, epoch seconds>, "host": …, "source": "faramesh",
     "sourcetype": "faramesh:dpr", "index": <index, when set>,
     "fields": {"dpr_id": …, "chain_id": …, "seq": "…"}}

`fields` are indexed fields, so `| dedup dpr_id` (or `fields.dpr_id`) removes at-least-once duplicates
cheaply. HTTP 200 is the acknowledgement. A `X-Splunk-Request-Channel` header is always sent, so a
token with indexer acknowledgement enabled accepts the data too (acks are not polled: 200 = accepted).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from faramesh.engine.sinks.base import Batch, SenderContext, epoch_of
from faramesh.engine.sinks.config import SinkSpec
from faramesh.engine.sinks.httpclient import HttpEndpoint, status_error

EVENT_PATH = "/services/collector/event"
MAX_RECORDS = 1000
MAX_BYTES = 768 * 1024  # of DPRs per request: HEC's default max_content_length has been 1 MB


def hec_path(path: str) -> str:
    base, sep, query = path.partition("?")
    stripped = base.rstrip("/")
    if not stripped:
        base = EVENT_PATH
    elif stripped.endswith("/services/collector"):
        base = stripped + "/event"
    return base + sep + query


def hec_body(
    lines: Sequence[bytes],
    records: Sequence[Mapping[str, Any]],
    *,
    index: str | None,
    source: str,
    sourcetype: str,
    host: str,
) -> bytes:
    """The HEC request body. Each DPR is spliced in as spooled (never re-encoded)."""
    out = []
    for line, record in zip(lines, records, strict=True):
        meta: dict[str, Any] = {}
        epoch = epoch_of(record)
        if epoch is not None:
            meta["time"] = epoch
        meta["host"] = host
        meta["source"] = source
        meta["sourcetype"] = sourcetype
        if index:
            meta["index"] = index
        fields = {"dpr_id": record.get("id"), "chain_id": record.get("chain_id"), "seq": record.get("seq")}
        meta["fields"] = {k: str(v) for k, v in fields.items() if v is not None}
        out.append(b'{"event":' + line + b"," + orjson.dumps(meta)[1:])
    return b"\n".join(out)


class SplunkHec:
    def __init__(self, spec: SinkSpec, ctx: SenderContext) -> None:
        self.spec = spec
        self.redact = ctx.redact
        self.endpoint = HttpEndpoint(
            spec.secret("url"),
            timeout=ctx.timeout,
            verify_tls=bool(spec.settings.get("verify_tls", True)),
            redact=ctx.redact,
        )
        self.endpoint.with_path(hec_path(self.endpoint.path))
        self.target = self.endpoint.shown
        self.max_records = ctx.max_records or MAX_RECORDS
        self.max_bytes = MAX_BYTES
        self.linger = ctx.linger if ctx.linger is not None else 0.0
        self.index = spec.settings.get("index") or None
        self.source = str(spec.settings.get("source") or "faramesh")
        self.sourcetype = str(spec.settings.get("sourcetype") or "faramesh:dpr")
        self.host = ctx.hostname
        self._headers = {
            "Authorization": "Splunk " + spec.secret("token"),
            "Content-Type": "application/json",
            "X-Splunk-Request-Channel": str(uuid.uuid4()),
        }

    def send(self, batch: Batch) -> None:
        body = hec_body(
            batch.lines, batch.records, index=self.index, source=self.source, sourcetype=self.sourcetype, host=self.host
        )
        response = self.endpoint.post(body, self._headers)
        if response.status == 200:
            return
        raise status_error(self.target, response, "Splunk HEC", self._hint(response.status, response.body), self.redact)

    def _hint(self, status: int, body: bytes) -> str:
        try:
            code = orjson.loads(body).get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = None
        if status in (401, 403) or code in (1, 2, 3, 4):
            return f"check the HEC token ({self.spec.source_of('token')}) and that it is enabled"
        if code == 7:
            return f"the token may not write to index {self.index!r}: check `index` and the token's allowed indexes"
        if status == 404:
            return f"check the HEC URL's path ({self.spec.source_of('url')})"
        return "check the HEC token, index and URL"

    def close(self) -> None:
        self.endpoint.close()


def create(spec: SinkSpec, ctx: SenderContext) -> SplunkHec:
    return SplunkHec(spec, ctx)
