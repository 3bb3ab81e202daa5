"""Wire protocol v1: one JSON object per line on a Unix socket. Pure decode/encode; no I/O.

Accepted shapes: the typed form `{"type": "govern", "v": 1, ...}` and JSON-RPC 2.0
`{"jsonrpc": "2.0", "id": N, "method": "govern", "params": {...}}` (params may give `tool` +
`operation` instead of `tool_id`). Anything else decodes to a ProtocolError, which the server turns
into an error envelope while keeping the connection open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_FRAME = 1024 * 1024
MAX_ID_LEN = 256

AGENT_VERBS = frozenset({"govern", "poll_defer", "complete", "status"})
OPERATOR_VERBS = frozenset(
    {"approvals_list", "approve", "deny", "reload", "shutdown", "config_event", "sandbox_violation"}
)
CONFIG_EVENTS = frozenset({"config_unlocked", "config_locked"})
MAX_CONFIG_PATHS = 64
MAX_VIOLATION_KINDS = 64
_SYSCALL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True, slots=True)
class Message:
    verb: str
    fields: dict[str, Any]
    rpc_id: Any = None  # JSON-RPC id; None for the typed form
    rpc: bool = False


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, rpc_id: Any = None, rpc: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rpc_id = rpc_id
        self.rpc = rpc


def _str(fields: dict[str, Any], key: str, *, required: bool, rpc_id: Any, rpc: bool, limit: int = MAX_ID_LEN) -> None:
    value = fields.get(key)
    if value is None:
        if required:
            raise ProtocolError("INVALID_REQUEST", f"`{key}` is required", rpc_id, rpc)
        return
    if type(value) is not str or not value or len(value) > limit:
        raise ProtocolError(
            "INVALID_REQUEST", f"`{key}` must be a non-empty string of at most {limit} characters", rpc_id, rpc
        )


def decode(line: bytes) -> Message:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("INVALID_REQUEST", f"not valid JSON: {str(exc).split(':')[0]}") from None
    if type(data) is not dict:
        raise ProtocolError("INVALID_REQUEST", "a request is a JSON object")
    rpc = "jsonrpc" in data
    rpc_id = data.get("id") if rpc else None
    if rpc:
        # Check the id first: only a valid id is ever echoed back in an error.
        bad_id = type(rpc_id) not in (int, str) or (type(rpc_id) is str and len(rpc_id) > MAX_ID_LEN)
        if rpc_id is not None and bad_id:
            raise ProtocolError("INVALID_REQUEST", "JSON-RPC id must be a number or a string", None, rpc)
        if data.get("jsonrpc") != "2.0" or type(data.get("method")) is not str:
            raise ProtocolError(
                "INVALID_REQUEST", 'JSON-RPC requests need "jsonrpc": "2.0" and a "method"', rpc_id, rpc
            )
        verb = data["method"]
        params = data.get("params", {})
        if type(params) is not dict:
            raise ProtocolError("INVALID_REQUEST", "params must be an object", rpc_id, rpc)
        fields = dict(params)
        if verb == "govern" and "tool_id" not in fields and "tool" in fields:
            tool, op = fields.get("tool"), fields.get("operation")
            if type(tool) is not str or (op is not None and type(op) is not str):
                raise ProtocolError("INVALID_REQUEST", "`tool` and `operation` must be strings", rpc_id, rpc)
            fields["tool_id"] = f"{tool}/{op}" if op else tool
    else:
        verb = data.get("type")
        if type(verb) is not str:
            raise ProtocolError("INVALID_REQUEST", 'a request needs a "type"')
        v = data.get("v", 1)
        if v != 1 or type(v) is not int:
            raise ProtocolError("INVALID_REQUEST", f"unsupported protocol version {v!r}; this engine speaks v1")
        fields = data
    if verb not in AGENT_VERBS and verb not in OPERATOR_VERBS:
        raise ProtocolError("INVALID_REQUEST", f"unknown request type {verb[:64]!r}", rpc_id, rpc)
    if verb == "govern":
        _str(fields, "tool_id", required=True, rpc_id=rpc_id, rpc=rpc)
        _str(fields, "agent_id", required=False, rpc_id=rpc_id, rpc=rpc)
        _str(fields, "call_id", required=False, rpc_id=rpc_id, rpc=rpc)
        _str(fields, "session_id", required=False, rpc_id=rpc_id, rpc=rpc)
        _str(fields, "principal_token", required=False, rpc_id=rpc_id, rpc=rpc, limit=16384)
        args = fields.get("args", {})
        if args is None:
            fields["args"] = {}
        elif type(args) is not dict:
            raise ProtocolError("INVALID_REQUEST", "`args` must be an object", rpc_id, rpc)
    elif verb == "poll_defer":
        _str(fields, "defer_token", required=True, rpc_id=rpc_id, rpc=rpc)
    elif verb == "complete":
        _str(fields, "action_id", required=True, rpc_id=rpc_id, rpc=rpc)
        if type(fields.get("usage", {})) is not dict:
            raise ProtocolError("INVALID_REQUEST", "`usage` must be an object", rpc_id, rpc)
    elif verb == "config_event":
        if fields.get("event") not in CONFIG_EVENTS:
            raise ProtocolError(
                "INVALID_REQUEST", f"`event` must be one of {', '.join(sorted(CONFIG_EVENTS))}", rpc_id, rpc
            )
        _str(fields, "by", required=False, rpc_id=rpc_id, rpc=rpc)
        paths = fields.get("paths", [])
        if (
            type(paths) is not list
            or len(paths) > MAX_CONFIG_PATHS
            or any(type(p) is not str or not p or len(p) > 4096 for p in paths)
        ):
            raise ProtocolError(
                "INVALID_REQUEST",
                f"`paths` must be a list of at most {MAX_CONFIG_PATHS} non-empty strings",
                rpc_id,
                rpc,
            )
    elif verb == "sandbox_violation":
        _str(fields, "agent_id", required=True, rpc_id=rpc_id, rpc=rpc)
        attempts = fields.get("attempts")
        if (
            type(attempts) is not dict
            or not 0 < len(attempts) <= MAX_VIOLATION_KINDS
            or any(
                not 0 < len(name) <= 32
                or not set(name) <= _SYSCALL_NAME_CHARS
                or type(count) is not int
                or not 0 < count < 2**53
                for name, count in attempts.items()
            )
        ):
            raise ProtocolError(
                "INVALID_REQUEST",
                f"`attempts` must map at most {MAX_VIOLATION_KINDS} syscall names to positive counts",
                rpc_id,
                rpc,
            )
        for key in ("first_ms", "last_ms"):
            value = fields.get(key)
            if value is not None and (type(value) is not int or not 0 <= value < 2**53):
                raise ProtocolError("INVALID_REQUEST", f"`{key}` must be epoch milliseconds", rpc_id, rpc)
    elif verb in ("approve", "deny"):
        _str(fields, "approval_id", required=True, rpc_id=rpc_id, rpc=rpc)
        _str(fields, "reason", required=False, rpc_id=rpc_id, rpc=rpc, limit=4096)
    return Message(verb, fields, rpc_id, rpc)


def encode_result(message: Message | None, result: dict[str, Any]) -> bytes:
    if message is not None and message.rpc:
        return orjson.dumps({"jsonrpc": "2.0", "id": message.rpc_id, "result": result}) + b"\n"
    return orjson.dumps(result) + b"\n"


_RPC_CODES = {"INVALID_REQUEST": -32600, "FRAME_TOO_LARGE": -32600}


def encode_error(code: str, message: str, *, rpc: bool = False, rpc_id: Any = None) -> bytes:
    if rpc:
        body = {"code": _RPC_CODES.get(code, -32000), "message": message, "data": {"code": code}}
        return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "error": body}) + b"\n"
    return orjson.dumps({"error": {"code": code, "message": message}}) + b"\n"
