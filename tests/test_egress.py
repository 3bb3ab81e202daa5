"""Egress, SDK tier (engine/egress.py): host arguments in tool args checked against the agent's `egress`
block, and the pipeline's use of it through a real in-process engine.

Nothing here resolves a name or dials an address: the classification table is exercised on parsed
addresses only (DESIGN.md §7)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import InProcessEngine, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine import egress
from faramesh.engine.egress import (
    EgressConfigError,
    Host,
    MalformedHost,
    check_args,
    classify,
    compile_egress,
    host_arguments,
    is_host_key,
    parse_entry,
    parse_host_value,
    parse_ipv4,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name resolution or connection from the code under test fails the test."""

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError(f"egress checks must not touch the network: {a!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------ parsing host values

PARSED = [
    # (value, host it names; None: no host)
    ("https://api.example.com/v1/x?q=1", "api.example.com"),
    ("HTTPS://API.Example.COM./path", "api.example.com"),
    ("http://api.example.com:8443", "api.example.com"),
    ("api.example.com", "api.example.com"),
    ("api.example.com:443/path", "api.example.com"),
    ("//api.example.com/x", "api.example.com"),
    ("http:evil.com", "evil.com"),  # WHATWG: special schemes need no slashes
    ("https:/evil.com", "evil.com"),
    ("http:///evil.com", "evil.com"),
    ("localhost:8080", "localhost"),  # a host and a port, not the scheme `localhost`
    ("ws://chat.example.com/sock", "chat.example.com"),
    ("http://ａｐｉ.example.com/", "api.example.com"),  # fullwidth letters map to ASCII (IDNA)
    ("https://bücher.example/", "xn--bcher-kva.example"),
    ("https://пример.испытание/", "xn--e1afmkfd.xn--80akhbyknj4f"),
    ("http://2130706433/", "127.0.0.1"),  # decimal
    ("http://0x7f.1/", "127.0.0.1"),  # hex + short form
    ("http://017700000001/", "127.0.0.1"),  # octal
    ("http://0x7f000001/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://127.0.0.1./", "127.0.0.1"),
    ("http://[::1]:80/", "::1"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1"),
    ("fe80::1", "fe80::1"),  # a bare IPv6 address in a host argument
    ("[fd00:ec2::254]", "fd00:ec2::254"),
    ("file://fileserver/share", "fileserver"),  # file:// with a host reaches it (SMB)
    ("", None),
    ("/relative/path", None),
    ("mailto:someone@example.com", None),
    ("data:text/plain,hello", None),
    ("file:///etc/hosts", None),
]


@pytest.mark.parametrize(("value", "expected"), PARSED)
def test_host_values_parse_to_the_host_a_client_would_reach(value: str, expected: str | None) -> None:
    host = parse_host_value(value)
    assert (str(host) if host is not None else None) == expected


MALFORMED = [
    ("http://api.example.com@evil.com/", "user information", "evil.com"),
    ("https://user:password@api.example.com/", "user information", "api.example.com"),
    ("http://a@b@evil.com", "user information", "evil.com"),
    ("api.example.com@evil.com", "user information", "evil.com"),
    ("http://api.example.com\\@evil.com/", "backslash", None),
    ("http:\\\\evil.com", "backslash", None),
    ("http://api.example.com /x", "whitespace", None),
    ("http://api.example.com\t.evil.com", "whitespace", None),
    ("http://api.example.com\n", "whitespace", None),
    ("http://api.exa\x00mple.com", "control", None),
    ("http://api.example.com\u200b.evil.com", "control", None),  # zero-width space (Cf)
    ("http://\u202eevil.com", "control", None),  # bidi override
    ("http://%65vil.com/", "percent", None),
    ("http://[fe80::1%25eth0]/", "zone", None),
    ("http://[::1/", "unterminated", None),
    ("http://[zz::1]/", "IPv6", None),
    ("http://api.example.com:99999/", "port", None),
    ("http://api.example.com:8o/", "port", None),
    ("http://faß.de/", "deviation", None),
    ("http://example.0x1/", "number", None),  # ends in a number but is no IPv4 address
    ("http://1.2.3.4.5/", "number", None),
    ("http://256.1.1.1/", "number", None),
    ("http://08/", "number", None),
    ("http://ex_ample..com/", "domain", None),
    ("http://" + "a" * 64 + ".com/", "domain", None),
    ("http:///", "without a host", None),
    ("http://evil.com／@api.example.com", "user information", "api.example.com"),  # fullwidth solidus
    ("http://ｅvil.com＠api.example.com/", "domain", None),  # fullwidth @ maps to @: not a name
]


@pytest.mark.parametrize(("value", "reason", "evident_host"), MALFORMED)
def test_malformed_host_values_are_refused(value: str, reason: str, evident_host: str | None) -> None:
    with pytest.raises(MalformedHost) as info:
        parse_host_value(value)
    assert reason in str(info.value)
    assert info.value.host == evident_host


IPV4_FORMS = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.1", "0X7F.0.0.1",
              "017700000001", "0177.0.0.01", "00", "0", "4294967295", "1.16777215", "10.0x10.0.1"]  # fmt: skip
BAD_IPV4 = ["", "0x", "08", "1..1", "1.2.3.4.5", "256.1.1.1", "1.16777216", "4294967296", "0x100.1", "1.2.3.-4",
            "１２７.0.0.1", "1.2.3.4 "]  # fmt: skip


@pytest.mark.parametrize("text", IPV4_FORMS + BAD_IPV4)
def test_ipv4_forms_follow_inet_aton(text: str) -> None:
    """The pure parser agrees with the C library's inet_aton (no lookup: inet_aton parses only)."""
    try:
        expected: bytes | None = socket.inet_aton(text)
    except (OSError, UnicodeError):
        expected = None
    if text.endswith(" "):
        expected = None  # glibc accepts trailing junk after a space; host arguments never reach it
    ours = parse_ipv4(text)
    assert (ours.packed if ours is not None else None) == expected


# ------------------------------------------------------------------------------ classification

CLASSES = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "this network"),
    ("10.1.2.3", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.255", "RFC 1918"),
    ("192.168.1.1", "RFC 1918"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("febf:ffff::1", "link-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("fd00:ec2::254", "metadata"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("64:ff9b::7f00:1", "NAT64"),
    ("64:ff9b::808:808", "NAT64"),  # refused whatever it carries
    ("64:ff9b:1::1", "NAT64"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("2002:7f00:1::1", "6to4 loopback"),
    ("2002:a9fe:a9fe::1", "6to4 cloud metadata"),
    ("2001:db8::1", "documentation"),
    ("ff02::1", "multicast"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    # public
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("172.32.0.1", None),
    ("100.128.0.1", None),
    ("169.255.0.1", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),
    ("2002:808:808::1", None),
]


@pytest.mark.parametrize(("address", "label"), CLASSES)
def test_the_address_table_classifies_without_is_private(address: str, label: str | None) -> None:
    result = classify(ipaddress.ip_address(address))
    if label is None:
        assert result is None
    else:
        assert result is not None and label in result, (address, result)


def test_the_table_is_explicit_where_is_private_would_be_wrong() -> None:
    # is_private calls 100.64/10 neither private nor global, and says nothing of metadata addresses
    assert classify(ipaddress.ip_address("100.64.0.1")) is not None
    assert classify(ipaddress.ip_address("168.63.129.16")) is not None  # a public address, but Azure's wire server


# ------------------------------------------------------------------------------ entries and matching

POLICY = compile_egress(
    {
        "allow": ["api.example.com", "*.example.org", "10.0.0.5", "[::1]", "8.8.8.0/24", "metadata.google.internal"],
        "deny": ["bad.example.org", "*.evil.example.org", "8.8.8.66"],
    }
)
OPEN = compile_egress({"allow": ["*", "0.0.0.0/0", "::/0"], "deny": []})

DECISIONS = [
    # (policy, url, None = allowed, else a fragment of the reason)
    (POLICY, "https://api.example.com/x", None),
    (POLICY, "https://API.EXAMPLE.COM./x", None),
    (POLICY, "https://other.example.com/", "not in egress.allow"),
    (POLICY, "https://example.com/", "not in egress.allow"),
    (POLICY, "https://a.example.org/", None),
    (POLICY, "https://a.b.c.example.org/", None),  # subdomains at any depth
    (POLICY, "https://example.org/", "not in egress.allow"),  # *.example.org is subdomains only
    (POLICY, "https://notexample.org/", "not in egress.allow"),
    (POLICY, "https://bad.example.org/", 'egress.deny entry "bad.example.org"'),  # deny wins over the allow glob
    (POLICY, "https://x.evil.example.org/", "egress.deny"),
    (POLICY, "http://10.0.0.5/", None),  # a refused class, allowed by that exact literal
    (POLICY, "http://10.0.0.6/", "RFC 1918"),
    (POLICY, "http://167772165/", None),  # 10.0.0.5 in decimal is still 10.0.0.5
    (POLICY, "http://[::1]/", None),
    (POLICY, "http://[::ffff:10.0.0.5]/", None),  # IPv4-mapped: the same address
    (POLICY, "http://8.8.8.8/", None),  # public, in the allowed CIDR
    (POLICY, "http://8.8.8.66/", "egress.deny"),
    (POLICY, "http://8.8.4.4/", "not in egress.allow"),
    (POLICY, "http://metadata.google.internal/", None),  # exact name entry
    (POLICY, "http://localhost/", "loopback name"),
    (POLICY, "http://api.localhost/", "loopback name"),
    # `*`, 0.0.0.0/0 and ::/0 never reach a refused class
    (OPEN, "https://anything.example/", None),
    (OPEN, "http://1.2.3.4/", None),
    (OPEN, "http://127.0.0.1/", "loopback"),
    (OPEN, "http://2130706433/", "loopback"),
    (OPEN, "http://0x7f.1/", "loopback"),
    (OPEN, "http://017700000001/", "loopback"),
    (OPEN, "http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
    (OPEN, "http://169.254.169.254/latest/meta-data/", "metadata"),
    (OPEN, "http://[fd00:ec2::254]/", "metadata"),
    (OPEN, "http://100.100.100.200/", "metadata"),
    (OPEN, "http://168.63.129.16/", "metadata"),
    (OPEN, "http://100.64.1.1/", "carrier-grade NAT"),
    (OPEN, "http://[fe80::1]/", "link-local"),
    (OPEN, "http://[fc00::1]/", "unique local"),
    (OPEN, "http://[64:ff9b::a9fe:a9fe]/", "NAT64"),
    (OPEN, "http://0.0.0.0:8080/", "this network"),
    (OPEN, "http://localhost:8080/", "loopback name"),
    (OPEN, "http://metadata.google.internal/", "metadata name"),
    (OPEN, "http://api.example.com@127.0.0.1/", "user information"),
]


@pytest.mark.parametrize(("policy", "url", "refused"), DECISIONS)
def test_deny_first_then_allow_and_refused_classes_need_the_exact_literal(
    policy: Any, url: str, refused: str | None
) -> None:
    result = check_args(policy, {"url": url})
    if refused is None:
        assert result is None, result
    else:
        assert result is not None and refused in result.reason, (url, result)


def test_a_glob_never_allows_a_refused_name_and_an_exact_entry_does() -> None:
    glob = compile_egress({"allow": ["*.localhost", "*.internal", "*"]})
    assert check_args(glob, {"host": "api.localhost"}) is not None
    assert check_args(glob, {"host": "metadata.google.internal"}) is not None
    exact = compile_egress({"allow": ["api.localhost", "127.0.0.1"]})
    assert check_args(exact, {"host": "api.localhost"}) is None
    assert check_args(exact, {"url": "http://2130706433/"}) is None  # the same literal, another spelling
    cidr = compile_egress({"allow": ["127.0.0.0/8", "10.0.0.0/8"]})
    assert check_args(cidr, {"url": "http://127.0.0.1/"}) is not None  # never through a CIDR
    assert check_args(cidr, {"url": "http://10.1.1.1/"}) is not None


def test_an_empty_egress_block_allows_nothing() -> None:
    nothing = compile_egress({})
    assert check_args(nothing, {"url": "https://api.example.com"}) is not None
    assert check_args(nothing, {"query": "https://api.example.com"}) is None  # not a host argument


ENTRIES = [
    ("*", "any"),
    ("api.example.com", "name"),
    ("API.Example.COM.", "name"),
    ("*.example.com", "glob"),
    ("10.0.0.5", "ip"),
    ("0x7f.1", "ip"),
    ("[::1]", "ip"),
    ("fd00:ec2::254", "ip"),
    ("10.0.0.0/8", "cidr"),
    ("2001:db8::/32", "cidr"),
    ("https://api.example.com/path", "name"),
    ("bücher.example", "name"),
]


@pytest.mark.parametrize(("text", "kind"), ENTRIES)
def test_entries(text: str, kind: str) -> None:
    assert parse_entry(text).kind == kind


@pytest.mark.parametrize(
    "text",
    ["api.*.com", "*example.com", "a*", "*.", "api..example.com", "10.0.0.0/33", "api.example.com:443",
     "http://u@api.example.com", "ex ample.com", "example.0x1", "[zz::1]", "bad\\host", ""],
)  # fmt: skip
def test_unreadable_entries_are_refused(text: str) -> None:
    with pytest.raises(EgressConfigError):
        parse_entry(text)


# ------------------------------------------------------------------------------ which args are host arguments


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("url", True), ("URL", True), ("uri", True), ("endpoint", True), ("host", True), ("hostname", True),
        ("hostName", True), ("domain", True), ("base_url", True), ("baseURL", True), ("webhook", True),
        ("webhookUrl", True), ("callback_url", True), ("api-endpoint", True), ("urls", True), ("hosts", True),
        ("ghost", False), ("curl", False), ("query", False), ("body", False), ("name", False),
        ("url_template_name", False), ("hostile", False),
    ],
)  # fmt: skip
def test_host_keys(key: str, expected: bool) -> None:
    assert is_host_key(key) is expected


def test_host_arguments_are_found_at_any_depth_and_in_lists() -> None:
    args = {
        "url": "https://a.example",
        "query": "https://not-checked.example",
        "nested": {"deeper": {"base_url": "https://b.example", "name": "x"}},
        "urls": ["https://c.example", ["https://d.example"], {"href": "https://not-a-host-key.example"}],
        "items": [{"endpoint": "https://e.example"}],
        "host": 443,  # not a string: nothing to check
    }
    found = sorted((".".join(p), v) for p, v in host_arguments(args))
    assert found == [
        ("items.endpoint", "https://e.example"),
        ("nested.deeper.base_url", "https://b.example"),
        ("url", "https://a.example"),
        ("urls", "https://c.example"),
        ("urls", "https://d.example"),
    ]


def test_every_host_argument_must_pass_and_the_refusal_names_the_argument() -> None:
    policy = compile_egress({"allow": ["api.example.com"]})
    ok = {"url": "https://api.example.com/a", "backup": {"urls": ["https://api.example.com/b"]}}
    assert check_args(policy, ok) is None
    bad = {"url": "https://api.example.com/a", "backup": {"urls": ["https://api.example.com/b", "http://evil.com"]}}
    refusal = check_args(policy, bad)
    assert refusal is not None and refusal.arg == "backup.urls" and refusal.host == "evil.com"


def test_a_flood_of_host_arguments_is_refused_not_walked_forever() -> None:
    policy = compile_egress({"allow": ["api.example.com"]})
    refusal = check_args(policy, {"urls": ["https://api.example.com"] * (egress.MAX_HOST_VALUES + 1)})
    assert refusal is not None and "more than" in refusal.reason


def test_deeply_nested_args_are_walked_without_recursion() -> None:
    node: Any = {"url": "http://evil.com"}
    for _ in range(5000):
        node = {"n": node}
    refusal = check_args(compile_egress({"allow": ["api.example.com"]}), node)
    assert refusal is not None and refusal.host == "evil.com"


def test_host_is_a_value_type() -> None:
    assert str(Host(name="a.example")) == "a.example"
    assert str(Host(ip=ipaddress.ip_address("::1"))) == "::1"


# ------------------------------------------------------------------------------ the pipeline, on a real engine

EGRESS_POLICY = """\
runtime {
  approval_ttl = "1h"
}

agent "fetcher" {
  default deny
  rules {
    permit http/get
    defer http/post
    deny http/delete
    permit secret/fetch
  }
  rate_limit "http/get": 3 per minute
  redact secret/fetch args: ["target"]
  egress { allow = ["api.example.com", "*.cdn.example.net", "10.0.0.5"]; deny = ["bad.cdn.example.net"] }
}

agent "free" {
  default deny
  rules {
    permit http/get
  }
}
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def engine(tmp: Path) -> Iterator[InProcessEngine]:
    policy = compile_policy(make_stack(tmp, EGRESS_POLICY))[0]
    eng = InProcessEngine(policy, tmp / "run").start()
    yield eng
    eng.stop()


def dpr(eng: InProcessEngine, action_id: str) -> dict[str, Any]:
    rec = eng.store.record_by_id(action_id)
    assert rec is not None
    body = json.loads(rec.body)
    assert isinstance(body, dict)
    return body


def test_an_allowed_host_is_permitted(engine: InProcessEngine) -> None:
    with engine.conn("fetcher") as c:
        r = c.call(govern("http/get", {"url": "https://api.example.com/v1"}))
        assert r["effect"] == "PERMIT"
        r = c.call(govern("http/get", {"request": {"base_url": "https://img.cdn.example.net", "path": "/x"}}))
        assert r["effect"] == "PERMIT"
        r = c.call(govern("http/get", {"query": "no host argument at all"}))
        assert r["effect"] == "PERMIT"


@pytest.mark.parametrize(
    ("args", "host", "reason"),
    [
        ({"url": "https://evil.example.com/"}, "evil.example.com", "not in egress.allow"),
        ({"url": "http://api.example.com@evil.com/"}, "evil.com", "user information"),
        ({"url": "http://2130706433/"}, "127.0.0.1", "loopback"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "169.254.169.254", "metadata"),
        ({"url": "http://bad.cdn.example.net/"}, "bad.cdn.example.net", "egress.deny"),
        ({"hosts": ["api.example.com", "10.0.0.6"]}, "10.0.0.6", "RFC 1918"),
    ],
)
def test_a_refused_host_is_denied_egress_denied_with_an_sdk_tier_dpr(
    engine: InProcessEngine, args: dict[str, Any], host: str, reason: str
) -> None:
    with engine.conn("fetcher") as c:
        r = c.call(govern("http/get", args, call_id="c1"))
    assert r["effect"] == "DENY"
    denial = r["structured_denial"]
    agent_ref = engine.state.policy.agents["fetcher"].ref
    assert denial["code"] == "EGRESS_DENIED" and denial["rule_ref"] == agent_ref
    assert host in denial["human_message"] and denial["resolution"] == {"type": "rule_block"}
    record = dpr(engine, r["action_id"])
    assert record["tier"] == "sdk" and record["code"] == "EGRESS_DENIED" and record["effect"] == "DENY"
    assert record["rule_ref"] == agent_ref
    assert record["egress"]["host"] == host and reason in record["egress"]["reason"]
    assert record["egress"]["tier"] == "sdk"


def test_egress_is_checked_before_an_approval_is_created(engine: InProcessEngine) -> None:
    with engine.conn("fetcher") as c:
        r = c.call(govern("http/post", {"url": "https://evil.example.com/"}))
        assert r["effect"] == "DENY" and r["structured_denial"]["code"] == "EGRESS_DENIED"
        assert "defer_token" not in r
        assert engine.store.approvals() == [] and engine.state.approvals == {}
        ok = c.call(govern("http/post", {"url": "https://api.example.com/"}))
        assert ok["effect"] == "DEFER" and ok["defer_token"].startswith("apr-")


def test_an_approved_call_is_still_refused_when_its_host_is_not_allowed_any_more(tmp: Path) -> None:
    """The approval is looked up after egress: reloading a policy that no longer allows the host turns
    the approved retry into EGRESS_DENIED, and the approval stays unused."""
    policy = compile_policy(make_stack(tmp, EGRESS_POLICY))[0]
    narrower = compile_policy(make_stack(tmp, EGRESS_POLICY.replace('"api.example.com", ', ""), name="narrow"))[0]
    eng = InProcessEngine(policy, tmp / "run").start()
    try:
        args = {"url": "https://api.example.com/"}
        with eng.conn("fetcher") as c, eng.conn("operator") as op:
            apr = c.call(govern("http/post", args))["defer_token"]
            assert op.call({"type": "approve", "approval_id": apr})["approval"]["status"] == "APPROVED"

            def swap() -> None:
                eng.server.policy = narrower
                eng.state.policy = narrower

            eng.call_in_loop(swap)
            r = c.call(govern("http/post", args))
            assert r["structured_denial"]["code"] == "EGRESS_DENIED"
            assert eng.state.approvals[apr].status == "APPROVED"  # not consumed
    finally:
        eng.stop()


def test_a_deny_stays_the_rules_deny_and_denies_spend_no_rate_tokens(engine: InProcessEngine) -> None:
    with engine.conn("fetcher") as c:
        r = c.call(govern("http/delete", {"url": "https://evil.example.com/"}))
        assert r["structured_denial"]["code"] == "POLICY_DENY"  # a deny is already a deny
        for _ in range(5):  # egress denials spend nothing of the 3-per-minute limit
            r = c.call(govern("http/get", {"url": "https://evil.example.com/"}))
            assert r["structured_denial"]["code"] == "EGRESS_DENIED"
        for _ in range(3):
            assert c.call(govern("http/get", {"url": "https://api.example.com/"}))["effect"] == "PERMIT"
        r = c.call(govern("http/get", {"url": "https://evil.example.com/"}))
        assert r["structured_denial"]["code"] == "RATE_EXCEEDED"  # the limit is checked first


def test_the_refused_host_of_a_redacted_argument_is_not_recorded(engine: InProcessEngine) -> None:
    with engine.conn("fetcher") as c:
        r = c.call(govern("secret/fetch", {"target": {"url": "https://secret-partner.example/"}}))
    assert r["structured_denial"]["code"] == "EGRESS_DENIED"
    record = dpr(engine, r["action_id"])
    assert record["egress"]["host"] == "[REDACTED]" and record["egress"]["arg"] == "target.url"
    assert b"secret-partner" not in engine.store.record_by_id(r["action_id"]).body
    assert b"secret-partner" not in (engine.store.request_args(json.loads(
        engine.store.record_by_id(r["action_id"]).body)["seq"]) or b"")  # fmt: skip


def test_an_agent_without_an_egress_block_is_not_checked(engine: InProcessEngine) -> None:
    with engine.conn("free") as c:
        assert c.call(govern("http/get", {"url": "http://169.254.169.254/"}))["effect"] == "PERMIT"


def test_audit_mode_records_the_egress_denial_and_lets_the_call_go(tmp: Path) -> None:
    text = EGRESS_POLICY.replace('approval_ttl = "1h"', 'approval_ttl = "1h"\n  mode = "audit"')
    policy = compile_policy(make_stack(tmp, text))[0]
    eng = InProcessEngine(policy, tmp / "run").start()
    try:
        with eng.conn("fetcher") as c:
            r = c.call(govern("http/get", {"url": "https://evil.example.com/"}))
        assert r["effect"] == "PERMIT"
        record = dpr(eng, r["action_id"])
        assert record["policy_code"] == "EGRESS_DENIED" and record["code"] == "AUDIT_MODE_PERMIT"
    finally:
        eng.stop()


def _with_entry(tmp: Path, entry: str) -> Any:
    """A compiled artifact whose egress entry `check` would refuse: written by hand (the engine must still
    refuse it — the compiler is not the engine's only line of defence)."""
    from faramesh.engine.policy.model import policy_from_json

    good = compile_policy(make_stack(tmp, EGRESS_POLICY))[0]
    return policy_from_json(good.to_json().replace(b'"10.0.0.5"', f'"{entry}"'.encode()))


def test_an_unreadable_egress_entry_is_a_compile_error(tmp: Path) -> None:
    from faramesh.engine.policy.errors import PolicySchemaError

    with pytest.raises(PolicySchemaError, match="egress"):
        compile_policy(make_stack(tmp, EGRESS_POLICY.replace('"10.0.0.5"', '"api.*.example.com"')))


def test_an_unreadable_egress_entry_refuses_the_start(tmp: Path) -> None:
    policy = _with_entry(tmp, "api.*.example.com")
    eng = InProcessEngine(policy, tmp / "run").start(wait_ready=False)
    assert eng.join(20) == 1
    assert eng.server.lifecycle == "HALT"


def test_an_unreadable_egress_entry_is_denied_if_it_ever_reaches_the_pipeline() -> None:
    from faramesh.engine.pipeline import EngineState, Peer

    stack = short_tmpdir()
    try:
        policy = _with_entry(stack, "a b")
    finally:
        shutil.rmtree(stack, ignore_errors=True)
    state = EngineState(policy, hmac_key=b"k" * 32, dev=False)
    verdict = state.govern(
        {"tool_id": "http/get", "args": {"url": "https://api.example.com/"}},
        Peer("agent", "fetcher"),
        now=1_780_315_200.0,
        new_id=lambda: "01JAAAAAAAAAAAAAAAAAAAAAAA",
        timestamp="2026-06-01T12:00:00.000000Z",
        started_ns=0,
        clock_ns=lambda: 0,
    )
    assert verdict.reply["structured_denial"]["code"] == "EGRESS_DENIED"
    assert "invalid" in verdict.reply["structured_denial"]["human_message"]


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=24))
def test_the_byte_pre_check_never_skips_a_host_key(key: str) -> None:
    """Skipping the walk when the canonical bytes hold no host word is sound: every host key contains one."""
    from faramesh.engine.wal.dpr import canonical_bytes

    if is_host_key(key):
        assert egress.may_hold_hosts(canonical_bytes({key: "x"}))


@pytest.mark.parametrize("key", ["url", "URL", "baseURL", "hostName", "callback_url", "Webhooks", "apiEndpoint"])
def test_the_pre_check_finds_host_keys_and_skips_args_without_them(key: str) -> None:
    from faramesh.engine.wal.dpr import canonical_bytes

    policy = compile_egress({"allow": ["api.example.com"]})
    args = {"nested": [{key: "http://evil.com"}]}
    assert check_args(policy, args, canonical_bytes(args)) is not None
    plain = {"items": [{"name": "x", "id": i} for i in range(100)]}
    assert check_args(policy, plain, canonical_bytes(plain)) is None
