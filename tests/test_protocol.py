"""Wire protocol v1 decoder (engine/protocol.py): the typed and JSON-RPC 2.0 forms, field validation,
and a property test that decode() on anything raises nothing but ProtocolError and that every Message
it returns satisfies the invariants the server and the pipeline rely on."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from faramesh.engine.protocol import (
    AGENT_VERBS,
    MAX_ID_LEN,
    OPERATOR_VERBS,
    Message,
    ProtocolError,
    decode,
    encode_error,
    encode_result,
)
from hypothesis import given
from hypothesis import strategies as st


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def err(obj: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(obj if isinstance(obj, bytes) else enc(obj))
    assert info.value.code == "INVALID_REQUEST"
    return info.value


# ---------------------------------------------------------------- typed form


def test_typed_govern_decodes_with_all_fields() -> None:
    m = decode(
        enc(
            {
                "type": "govern",
                "v": 1,
                "call_id": "c1",
                "agent_id": "bot",
                "session_id": "s",
                "tool_id": "refund",
                "args": {"amount": 5},
                "principal_token": "tok",
            }
        )
    )
    assert (m.verb, m.rpc, m.rpc_id) == ("govern", False, None)
    assert m.fields["tool_id"] == "refund" and m.fields["args"] == {"amount": 5}
    assert m.fields["call_id"] == "c1" and m.fields["agent_id"] == "bot"


def test_typed_version_defaults_to_1_and_other_versions_are_refused() -> None:
    assert decode(enc({"type": "status"})).verb == "status"
    assert decode(enc({"type": "status", "v": 1})).verb == "status"
    for v in (2, 0, "1", 1.0, True, None, [1]):
        e = err({"type": "status", "v": v})
        assert "version" in e.message


def test_typed_missing_or_non_string_type_is_refused() -> None:
    for bad in ({}, {"type": 1}, {"type": None}, {"type": ["govern"]}, {"tool_id": "x"}):
        err(bad)


def test_unknown_type_is_refused_and_named() -> None:
    e = err({"type": "launch_missiles"})
    assert "launch_missiles" in e.message
    assert not e.rpc


def test_args_null_becomes_empty_object_and_missing_args_is_allowed() -> None:
    assert decode(enc({"type": "govern", "tool_id": "t", "args": None})).fields["args"] == {}
    m = decode(enc({"type": "govern", "tool_id": "t"}))
    assert m.fields.get("args", {}) == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_id": 5},
        {"tool_id": ""},
        {"tool_id": None},
        {},
        {"tool_id": "x" * (MAX_ID_LEN + 1)},
        {"tool_id": "t", "args": []},
        {"tool_id": "t", "args": "a=1"},
        {"tool_id": "t", "args": 3},
        {"tool_id": "t", "agent_id": 7},
        {"tool_id": "t", "agent_id": ""},
        {"tool_id": "t", "call_id": {"a": 1}},
        {"tool_id": "t", "session_id": False},
        {"tool_id": "t", "principal_token": 1},
        {"tool_id": "t", "principal_token": "x" * 20000},
    ],
)
def test_govern_wrong_types_are_refused(fields: dict[str, Any]) -> None:
    err({"type": "govern", **fields})


def test_other_verbs_validate_their_fields() -> None:
    err({"type": "poll_defer"})
    err({"type": "poll_defer", "defer_token": 3})
    assert decode(enc({"type": "poll_defer", "defer_token": "apr-1"})).fields["defer_token"] == "apr-1"
    err({"type": "complete"})
    err({"type": "complete", "action_id": "a", "usage": []})
    err({"type": "complete", "action_id": "a", "usage": None})
    assert decode(enc({"type": "complete", "action_id": "a", "usage": {"cost_cents": 3}})).verb == "complete"
    for verb in ("approve", "deny"):
        err({"type": verb})
        err({"type": verb, "approval_id": 1})
        err({"type": verb, "approval_id": "apr-1", "reason": 5})
        err({"type": verb, "approval_id": "apr-1", "reason": "x" * 5000})
        assert decode(enc({"type": verb, "approval_id": "apr-1", "reason": "no"})).fields["reason"] == "no"


def test_not_json_and_not_an_object() -> None:
    for raw in (b"", b"{", b"nope", b"\xff\xfe", b'{"type": "status"} x', b"NaN", b'{"a": NaN}'):
        err(raw)
    for value in ([], 1, "govern", None, True):
        e = err(value)
        assert "object" in e.message


# ---------------------------------------------------------------- JSON-RPC 2.0


def test_jsonrpc_govern_with_tool_id() -> None:
    m = decode(enc({"jsonrpc": "2.0", "id": 7, "method": "govern", "params": {"tool_id": "refund", "args": {}}}))
    assert (m.verb, m.rpc, m.rpc_id, m.fields["tool_id"]) == ("govern", True, 7, "refund")


def test_jsonrpc_tool_plus_operation_becomes_tool_id() -> None:
    m = decode(
        enc({"jsonrpc": "2.0", "id": "x", "method": "govern", "params": {"tool": "stripe", "operation": "refund"}})
    )
    assert m.fields["tool_id"] == "stripe/refund" and m.rpc_id == "x"
    m = decode(enc({"jsonrpc": "2.0", "id": 1, "method": "govern", "params": {"tool": "search"}}))
    assert m.fields["tool_id"] == "search"
    # tool_id wins when both are given
    m = decode(enc({"jsonrpc": "2.0", "id": 1, "method": "govern", "params": {"tool_id": "a", "tool": "b"}}))
    assert m.fields["tool_id"] == "a"


def test_jsonrpc_tool_and_operation_types() -> None:
    for params in ({"tool": 1}, {"tool": "a", "operation": 2}, {"tool": ""}, {"tool": None}, {}):
        e = err({"jsonrpc": "2.0", "id": 3, "method": "govern", "params": params})
        assert e.rpc and e.rpc_id == 3


def test_jsonrpc_envelope_errors_keep_a_valid_id() -> None:
    e = err({"jsonrpc": "1.0", "id": 4, "method": "status"})
    assert (e.rpc, e.rpc_id) == (True, 4)
    e = err({"jsonrpc": "2.0", "id": 4, "method": 5})
    assert e.rpc_id == 4
    e = err({"jsonrpc": "2.0", "id": 4, "method": "status", "params": [1]})
    assert e.rpc_id == 4
    e = err({"jsonrpc": "2.0", "id": 4, "method": "nope"})
    assert e.rpc_id == 4 and "nope" in e.message
    # An id of the wrong type (or an oversized one) is never echoed, even when the rest is also wrong.
    for bad_id in ({"a": 1}, [1], 1.5, True, "i" * (MAX_ID_LEN + 1)):
        e = err({"jsonrpc": "1.0", "id": bad_id, "method": 3})
        assert e.rpc and e.rpc_id is None
        e = err({"jsonrpc": "2.0", "id": bad_id, "method": "status"})
        assert e.rpc_id is None


def test_jsonrpc_notification_without_id_and_without_params() -> None:
    m = decode(enc({"jsonrpc": "2.0", "method": "status"}))
    assert (m.verb, m.rpc, m.rpc_id, m.fields) == ("status", True, None, {})


# ---------------------------------------------------------------- encoding


def test_encode_result_and_errors_in_both_forms() -> None:
    typed = decode(enc({"type": "status"}))
    rpc = decode(enc({"jsonrpc": "2.0", "id": 9, "method": "status"}))
    assert orjson.loads(encode_result(typed, {"a": 1})) == {"a": 1}
    assert orjson.loads(encode_result(rpc, {"a": 1})) == {"jsonrpc": "2.0", "id": 9, "result": {"a": 1}}
    assert orjson.loads(encode_error("POLICY_X", "m")) == {"error": {"code": "POLICY_X", "message": "m"}}
    body = orjson.loads(encode_error("DAEMON_NOT_READY", "m", rpc=True, rpc_id=9))
    assert body["id"] == 9 and body["error"]["data"] == {"code": "DAEMON_NOT_READY"}
    assert isinstance(body["error"]["code"], int)
    for out in (encode_result(typed, {}), encode_error("A", "b", rpc=True)):
        assert out.endswith(b"\n") and out.count(b"\n") == 1


# ---------------------------------------------------------------- property: never raises anything else


def check_message(m: Message) -> None:
    """The invariants the server and the pipeline rely on for every decoded message."""
    assert isinstance(m, Message)
    assert m.verb in AGENT_VERBS | OPERATOR_VERBS
    assert isinstance(m.fields, dict)
    if m.rpc:
        assert m.rpc_id is None or type(m.rpc_id) in (int, str)
    else:
        assert m.rpc_id is None
        assert m.fields.get("v", 1) == 1 and type(m.fields.get("v", 1)) is int

    def opt_str(key: str, limit: int = MAX_ID_LEN) -> None:
        v = m.fields.get(key)
        assert v is None or (type(v) is str and 0 < len(v) <= limit), (key, v)

    if m.verb == "govern":
        tool = m.fields["tool_id"]
        assert type(tool) is str and 0 < len(tool) <= MAX_ID_LEN
        assert type(m.fields.get("args", {})) is dict
        for key in ("agent_id", "call_id", "session_id"):
            opt_str(key)
        opt_str("principal_token", 16384)
    elif m.verb == "poll_defer":
        assert type(m.fields["defer_token"]) is str and m.fields["defer_token"]
    elif m.verb == "complete":
        assert type(m.fields["action_id"]) is str and m.fields["action_id"]
        assert type(m.fields.get("usage", {})) is dict
    elif m.verb in ("approve", "deny"):
        assert type(m.fields["approval_id"]) is str and m.fields["approval_id"]
        opt_str("reason", 4096)


def check_error(e: ProtocolError) -> None:
    assert e.code == "INVALID_REQUEST"
    assert isinstance(e.message, str) and e.message
    assert e.rpc_id is None or type(e.rpc_id) in (int, str)
    assert e.rpc or e.rpc_id is None
    # the server can always turn it into one envelope line
    out = encode_error(e.code, e.message, rpc=e.rpc, rpc_id=e.rpc_id)
    assert out.endswith(b"\n") and b"\n" not in out[:-1]


def run_decode(raw: bytes) -> None:
    try:
        m = decode(raw)
    except ProtocolError as e:
        check_error(e)
    else:
        check_message(m)


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
verbs = st.sampled_from([*sorted(AGENT_VERBS | OPERATOR_VERBS), "nope", "", "GOVERN"])
field_names = st.sampled_from(
    ["tool_id", "tool", "operation", "args", "agent_id", "call_id", "session_id", "principal_token",
     "defer_token", "action_id", "usage", "approval_id", "reason", "v", "type", "id", "jsonrpc", "method", "params"]
)  # fmt: skip
near_valid_fields = st.dictionaries(field_names, json_values | st.text(max_size=300), max_size=6)
typed_requests = st.builds(lambda verb, f: {**f, "type": verb}, verbs, near_valid_fields)
rpc_requests = st.builds(
    lambda verb, f, rid, version: {"jsonrpc": version, "id": rid, "method": verb, "params": f},
    verbs,
    near_valid_fields | json_values,
    json_values,
    st.sampled_from(["2.0", "2.0", "1.0", 2]),
)


@given(st.binary(max_size=512))
def test_property_decode_arbitrary_bytes(raw: bytes) -> None:
    run_decode(raw)


@given(json_values)
def test_property_decode_arbitrary_json_values(value: Any) -> None:
    run_decode(orjson.dumps(value))


@given(typed_requests | rpc_requests)
def test_property_decode_near_valid_requests(request: dict[str, Any]) -> None:
    run_decode(orjson.dumps(request))


@given(st.sampled_from(sorted(AGENT_VERBS | OPERATOR_VERBS)), near_valid_fields, st.binary(max_size=8))
def test_property_decode_truncated_and_mutated_requests(verb: str, fields: dict[str, Any], junk: bytes) -> None:
    raw = orjson.dumps({**fields, "type": verb})
    for cut in (len(raw) // 2, len(raw) - 1):
        run_decode(raw[:cut])
        run_decode(raw[:cut] + junk + raw[cut:])
