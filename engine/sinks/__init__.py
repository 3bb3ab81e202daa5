"""Audit sinks: committed DPRs shipped to a SIEM, off the decision path (issue 6).

Declared as providers (`splunk-sink`, `datadog-sink`, `s3-sink`, `webhook-sink`; the short names
`splunk`, `datadog`, `s3`, `webhook` are accepted too). Each sink has its own spool under
`<state dir>/spool/<provider label>/` and its own delivery thread; see `dispatcher` for the flow,
`spool` for the on-disk layout, and each sink module for its wire format.

Guarantees: at least once, in commit order per sink, nothing lost across a SIGKILL of the engine (a
record is in the spool's page cache when `offer()` returns, fsync'd within `sync_interval`), across a
receiver outage (spooled, retried with backoff), or across a bad credential (4xx: DEGRADED, spooled,
delivered once the credential is fixed). Every record carries its DPR `id` for de-duplication.

This package imports only the standard library and orjson; a sink's SDK (boto3 for S3) is imported on
that sink's thread at its first delivery, so a stack without that sink never loads it.
"""

from faramesh.engine.sinks.config import SINK_TYPES, SinkSpec
from faramesh.engine.sinks.dispatcher import SinkDispatcher, SinkOptions
from faramesh.engine.sinks.errors import DeliveryError, SinkConfigError, SinkError, SinkSpoolError

__all__ = [
    "SINK_TYPES",
    "DeliveryError",
    "SinkConfigError",
    "SinkDispatcher",
    "SinkError",
    "SinkOptions",
    "SinkSpec",
    "SinkSpoolError",
]
