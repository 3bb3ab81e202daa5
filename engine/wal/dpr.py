"""Decision Provenance Records: the fields, their canonical bytes, and the hash chain.

Canonical bytes are RFC 8785 (JCS) of the record without `record_hash`. The DPR domain has no floats
(money is integer cents, latency integer µs, time an RFC 3339 string), so sorted-key `orjson` output
equals JCS there; tests/test_dpr.py proves the byte-identity differentially against `rfc8785`.
The stored bytes are what is hashed: record_hash = sha256(prev_record_hash ‖ bytes), with a genesis
value domain-separated per chain.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson
import rfc8785

SCHEMA = "faramesh.dpr/v1"
_GENESIS_DOMAIN = b"faramesh.dpr.genesis/v1\x00"


class NonCanonicalArgs(ValueError):
    """Agent args that JCS refuses (NaN, out-of-range numbers, lone surrogates…): the call is denied."""


def genesis_hash(chain_id: str) -> str:
    return hashlib.sha256(_GENESIS_DOMAIN + chain_id.encode()).hexdigest()


def _plain_domain(value: Any) -> bool:
    """True when fast sorted-key orjson output is provably JCS for `value` (no floats, small ints)."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return bool(-(2**53) < value < 2**53)
    if t is dict:
        return all(type(k) is str and k.isascii() and _plain_domain(v) for k, v in value.items())
    if t is list:
        return all(_plain_domain(v) for v in value)
    return False


def canonical_bytes(value: Any) -> bytes:
    """JCS bytes. Floats, non-ASCII keys and huge ints go through `rfc8785`; what it refuses raises
    NonCanonicalArgs."""
    if _plain_domain(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            pass  # e.g. a lone surrogate: let rfc8785 give the verdict
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise NonCanonicalArgs(f"args cannot be canonicalised ({type(exc).__name__})") from None


def digest_of(redacted_bytes: bytes) -> str:
    """The DPR's `args_digest`: over the canonical bytes of the *redacted* args."""
    return "sha256:" + hashlib.sha256(redacted_bytes).hexdigest()


def args_digest(redacted_args: Mapping[str, Any]) -> str:
    return digest_of(canonical_bytes(dict(redacted_args)))


def hmac_hex(key: bytes, raw_bytes: bytes) -> str:
    return hmac.new(key, raw_bytes, hashlib.sha256).hexdigest()


def args_hmac(key: bytes, raw_args: Mapping[str, Any]) -> str:
    """Approval matching: an HMAC of the raw args under the engine key, kept only with the approval."""
    return hmac_hex(key, canonical_bytes(dict(raw_args)))


def record_body(record: Mapping[str, Any]) -> bytes:
    """The stored canonical bytes: the record without `record_hash`."""
    body = {k: v for k, v in record.items() if k != "record_hash"}
    return canonical_bytes(body)


def chain_hash(prev_record_hash: str, body: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_record_hash) + body).hexdigest()


REDACTED = "[REDACTED]"


def redact(args: Mapping[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `args` with every dotted path in `paths` masked (lists: the path applies to each item)."""

    def mask(node: Any, parts: list[str]) -> Any:
        if isinstance(node, list):
            return [mask(item, parts) for item in node]
        if not isinstance(node, dict) or parts[0] not in node:
            return node
        out = dict(node)
        out[parts[0]] = REDACTED if len(parts) == 1 else mask(node[parts[0]], parts[1:])
        return out

    result: Any = dict(args)
    for path in paths:
        result = mask(result, path.split("."))
    return dict(result)
