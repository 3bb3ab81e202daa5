"""Datadog logs intake: `provider "x" { type = "datadog-sink"; api_key; site; service; tags }`.

POST `https://http-intake.logs.<site>/api/v2/logs` (site defaults to `datadoghq.com`; a `site` written
as an `http(s)://` URL names a relay, such as a Datadog Agent or Vector, and gets `/api/v2/logs`
appended) with the `DD-API-KEY` header and a JSON array of up to 1,000 log entries:

    {"dpr": <the DPR>, "dpr_id": …, "ddsource": "faramesh", "service": "faramesh",
     "ddtags": "tag1,tag2", "hostname": …, "status": "info|warn", "message": "DENY refund by support-bot …"}

HTTP 202 (or 200) is the acknowledgement. De-duplicate on `@dpr_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from faramesh.engine.sinks.base import Batch, SenderContext
from faramesh.engine.sinks.config import SinkSpec
from faramesh.engine.sinks.httpclient import HttpEndpoint, status_error

INTAKE_PATH = "/api/v2/logs"
MAX_RECORDS = 1000  # the intake's limit per request
MAX_BYTES = 4 * 1024 * 1024  # under its 5 MB per request


def intake_url(site: str) -> str:
    if "://" in site:
        base = site.rstrip("/")
        return base if base.endswith(INTAKE_PATH) else base + INTAKE_PATH
    return f"https://http-intake.logs.{site}{INTAKE_PATH}"


def _summary(record: Mapping[str, Any]) -> str:
    parts = [str(record.get(k)) for k in ("effect", "tool") if record.get(k) is not None]
    if record.get("agent_id"):
        parts.append(f"by {record.get('agent_id')}")
    if record.get("code"):
        parts.append(f"({record.get('code')})")
    return "faramesh " + " ".join(parts) if parts else "faramesh DPR"


def datadog_body(
    lines: Sequence[bytes],
    records: Sequence[Mapping[str, Any]],
    *,
    service: str,
    tags: str,
    hostname: str,
) -> bytes:
    out = []
    for line, record in zip(lines, records, strict=True):
        meta: dict[str, Any] = {
            "ddsource": "faramesh",
            "ddtags": tags,
            "dpr_id": record.get("id"),
            "hostname": hostname,
            "message": _summary(record)[:512],
            "service": service,
            "status": "warn" if record.get("effect") in ("DENY", "DEFER") else "info",
        }
        out.append(b'{"dpr":' + line + b"," + orjson.dumps(meta)[1:])
    return b"[" + b",".join(out) + b"]"


class Datadog:
    def __init__(self, spec: SinkSpec, ctx: SenderContext) -> None:
        self.spec = spec
        self.redact = ctx.redact
        self.endpoint = HttpEndpoint(intake_url(str(spec.settings.get("site") or "datadoghq.com")),
                                     timeout=ctx.timeout, redact=ctx.redact)  # fmt: skip
        self.target = self.endpoint.shown
        self.max_records = min(ctx.max_records or MAX_RECORDS, MAX_RECORDS)
        self.max_bytes = MAX_BYTES
        self.linger = ctx.linger if ctx.linger is not None else 0.0
        self.service = str(spec.settings.get("service") or "faramesh")
        self.tags = ",".join(str(t) for t in spec.settings.get("tags") or ())
        self.hostname = ctx.hostname
        self._headers = {"DD-API-KEY": spec.secret("api_key"), "Content-Type": "application/json"}

    def send(self, batch: Batch) -> None:
        body = datadog_body(batch.lines, batch.records, service=self.service, tags=self.tags, hostname=self.hostname)
        response = self.endpoint.post(body, self._headers)
        if response.status in (200, 202):
            return
        hint = (
            f"check the API key ({self.spec.source_of('api_key')}) and `site`"
            if response.status in (401, 403)
            else "check `site` and the API key"
        )
        raise status_error(self.target, response, "Datadog logs intake", hint, self.redact)

    def close(self) -> None:
        self.endpoint.close()


def create(spec: SinkSpec, ctx: SenderContext) -> Datadog:
    return Datadog(spec, ctx)
