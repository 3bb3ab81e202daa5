"""Amazon S3 (or any S3 API): `provider "x" { type = "s3-sink"; bucket; prefix; region; endpoint_url }`.

Each batch becomes one JSONL object per chain run — one DPR per line, exactly as spooled — under a key
derived only from the records it holds:

    <prefix>/<chain_id>/<first seq, 12 digits>-<last seq, 12 digits>.jsonl

so a retried batch overwrites its own object instead of adding a copy. (After an engine restart a
batch may be cut differently and overlap an earlier object: de-duplicate on each record's `id`.)
Batches wait up to 1 s to fill (up to 10,000 records), so a busy engine writes about one object a
second. Credentials: the engine's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else
boto3's default chain (profile, web identity, instance role). boto3 is imported on the sink's own
thread at its first delivery, never at engine start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from faramesh.engine.sinks.base import Batch, SenderContext, chain_runs
from faramesh.engine.sinks.config import SinkSpec, shown_url
from faramesh.engine.sinks.errors import (
    SINK_REJECTED,
    SINK_SERVER_ERROR,
    SINK_TIMEOUT,
    SINK_UNREACHABLE,
    DeliveryError,
)

MAX_RECORDS = 10_000
MAX_BYTES = 16 * 1024 * 1024
LINGER = 1.0
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"})


def object_key(prefix: str, records: Sequence[Mapping[str, Any]]) -> str:
    """The object's key: a pure function of the records, so the same batch always lands on one key."""
    first, last = records[0], records[-1]
    chain, seq0, seq1 = first.get("chain_id"), first.get("seq"), last.get("seq")
    head = prefix.strip("/")
    if isinstance(chain, str) and chain and "/" not in chain and type(seq0) is int and type(seq1) is int:
        name = f"{chain}/{seq0:012d}-{seq1:012d}.jsonl"
    else:
        name = f"unchained/{first.get('id')}-{last.get('id')}.jsonl"
    return f"{head}/{name}" if head else name


def s3_objects(prefix: str, batch: Batch) -> list[tuple[str, bytes]]:
    """(key, body) per run of one chain in the batch."""
    return [
        (object_key(prefix, batch.records[a:b]), b"\n".join(batch.lines[a:b]) + b"\n")
        for a, b in chain_runs(batch.records)
    ]


class S3Sink:
    def __init__(self, spec: SinkSpec, ctx: SenderContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.bucket = str(spec.settings["bucket"])
        prefix = spec.settings.get("prefix")
        self.prefix = "faramesh" if prefix is None else str(prefix).strip("/")
        env = ctx.environ
        self.endpoint_url = (
            spec.settings.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        )
        self.region = (
            spec.settings.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        via = f" via {shown_url(self.endpoint_url)}" if self.endpoint_url else ""
        self.target = f"s3://{self.bucket}/{self.prefix}{via}"
        self.max_records = ctx.max_records or MAX_RECORDS
        self.max_bytes = MAX_BYTES
        self.linger = ctx.linger if ctx.linger is not None else LINGER
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            import botocore.config

            env = self.ctx.environ
            session = boto3.session.Session(
                aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                region_name=self.region,
            )
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=botocore.config.Config(
                    connect_timeout=self.ctx.timeout,
                    read_timeout=self.ctx.timeout,
                    retries={"max_attempts": 1, "mode": "standard"},  # the dispatcher retries, with backoff
                ),
            )
        return self._client

    def send(self, batch: Batch) -> None:
        import botocore.exceptions as bex

        try:
            client = self._s3()
            for key, body in s3_objects(self.prefix, batch):
                client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson")
        except bex.ClientError as exc:
            raise self._client_error(exc) from None
        except (bex.ConnectTimeoutError, bex.ReadTimeoutError):
            raise DeliveryError(SINK_TIMEOUT, f"{self.target} did not answer within {self.ctx.timeout:g}s") from None
        except (bex.EndpointConnectionError, bex.ConnectionClosedError):
            raise DeliveryError(SINK_UNREACHABLE, f"{self.target} is unreachable") from None
        except (bex.NoCredentialsError, bex.PartialCredentialsError):
            raise DeliveryError(
                SINK_REJECTED,
                f"no usable AWS credentials for {self.target}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "in the engine's environment, or give the host a role",
            ) from None
        except bex.BotoCoreError as exc:
            raise DeliveryError(
                SINK_SERVER_ERROR, self.ctx.redact(f"{self.target}: {type(exc).__name__}: {exc}")
            ) from None

    def _client_error(self, exc: Any) -> DeliveryError:
        response = getattr(exc, "response", {}) or {}
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        error = response.get("Error", {})
        code, message = str(error.get("Code") or "Error"), str(error.get("Message") or "")
        said = self.ctx.redact(f"{code}: {message}"[:300])
        if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
            return DeliveryError(SINK_SERVER_ERROR, f"S3 at {self.target} answered HTTP {status} ({said})")
        return DeliveryError(
            SINK_REJECTED,
            f"S3 refused PutObject to {self.target} (HTTP {status}, {said}); check the bucket, its policy "
            "and the engine's AWS credentials",
        )

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()


def create(spec: SinkSpec, ctx: SenderContext) -> S3Sink:
    return S3Sink(spec, ctx)
