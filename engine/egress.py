"""Egress, SDK tier: host arguments in a tool call's args checked against the agent's `egress` block.

Pure: no DNS, no sockets, no clock. The pipeline calls `check_args` for permits and defers of an agent
that has an `egress` block (`settings["egress"] = {"allow": [...], "deny": [...]}`); a refusal turns the
decision into DENY `EGRESS_DENIED`. This tier binds only an agent that goes through the SDK; the proxy
tier (engine/proxy.py, DESIGN.md §4) is what binds a hostile one.

Host arguments are the values under keys named like a host or URL (`url`, `uri`, `endpoint`, `host`,
`hostname`, `domain`, `base_url`, `webhook`, their plurals, and compound keys ending in one of those
words: `callback_url`, `apiEndpoint`, `hostName`), at any depth, including strings in lists under such
keys. Each value is parsed fail-closed:

- characters no client sends raw (backslash, whitespace, control and format characters), userinfo
  (`https://api.example.com@evil.com`), `%` in the host, a bad port or an unparseable host → refused
  as malformed;
- `http:evil.com`, `https:/evil.com` and `http:///evil.com` mean host `evil.com` (as WHATWG parsers
  read them); `localhost:8080` is a host and a port, not a scheme;
- names are IDNA-encoded (IDNA 2003 mapping, then the ASCII form), lower-cased, one trailing dot
  dropped; a name holding an IDNA 2003/2008 deviation character (ß, ς) is refused, since clients
  disagree about where it goes;
- a host whose last label is a number is IPv4 in `inet_aton` form (`2130706433`, `0x7f.1`,
  `017700000001`, `127.1`), normalised before anything else; one that does not parse is malformed.

Matching: `deny` first (exact name, `*.example.com`, IP literal, CIDR, `*`), then `allow`. `*.example.com`
matches subdomains at any depth, never `example.com` itself. IP literals are classified with an explicit
table (`classify`, not `ipaddress.is_private`); an address in a refused class, and the names `localhost`,
`*.localhost` and the cloud metadata names, are allowed only by an allow entry that is exactly that IP
literal or name — never through a glob, a CIDR or `*`.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST_WORDS = frozenset(
    {
        "url", "urls", "uri", "uris", "endpoint", "endpoints", "host", "hosts", "hostname", "hostnames",
        "domain", "domains", "webhook", "webhooks",
    }
)  # fmt: skip
# Every host word contains one of these: args whose canonical bytes hold none have no host argument, and
# the Python-level walk (≈1 µs per node) is skipped — the common case, and a 1 MiB line stays cheap.
_HINTS = (b"url", b"uri", b"host", b"endpoint", b"domain", b"webhook")
MAX_HOST_VALUES = 1000  # more host arguments than this in one call → refused (bounded work per call)
SPECIAL_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp"})
# Schemes whose URLs name no network host: nothing to check.
HOSTLESS_SCHEMES = frozenset({"mailto", "data", "urn", "tel", "sms", "javascript", "about"})
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$", re.S)
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$")
# Characters on which IDNA 2003 and 2008/UTS 46 disagree: the same name would reach two hosts.
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


class EgressConfigError(ValueError):
    """An `egress` entry that cannot be understood: the policy must not be served with it."""


class MalformedHost(ValueError):
    """A host argument that is refused without matching (the message says why). `host`: the host a
    client would most likely reach, when that is evident (`http://a.example@evil.com` → evil.com)."""

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


# ------------------------------------------------------------------------------ address classes

_V4_TABLE: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        # most specific first: metadata addresses sit inside link-local and CGNAT
        ("169.254.169.254/32", "cloud metadata (169.254.169.254)"),
        ("100.100.100.200/32", "cloud metadata (Alibaba 100.100.100.200)"),
        ("168.63.129.16/32", "cloud metadata (Azure 168.63.129.16)"),
        ("0.0.0.0/8", "this network (0.0.0.0/8)"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("169.254.0.0/16", "link-local"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64/10)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("198.18.0.0/15", "benchmarking"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (240/4, broadcast)"),
    )
)
_V6_TABLE: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("fd00:ec2::254/128", "cloud metadata (AWS fd00:ec2::254)"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b::/96", "NAT64 (64:ff9b::/96)"),
        ("64:ff9b:1::/48", "NAT64 (local use)"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local (fc00::/7)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
# Names that reach the same places as refused addresses: allowed only by an exact entry.
_REFUSED_NAMES = {
    "localhost": "loopback name",
    "metadata.google.internal": "cloud metadata name",
    "metadata.goog": "cloud metadata name",
    "metadata": "cloud metadata name",
    "instance-data": "cloud metadata name",
    "instance-data.ec2.internal": "cloud metadata name",
}


def classify(ip: IPAddress) -> str | None:
    """The refused class an address belongs to, or None for a public address.

    IPv4-mapped IPv6 (`::ffff:a.b.c.d`) and 6to4 (`2002:AABB:CCDD::/48`) are classified by the IPv4
    address they carry; NAT64 is refused whatever it carries.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        for net4, label in _V4_TABLE:
            if ip in net4:
                return label
        return None
    if ip in _MAPPED:
        inner = classify(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return f"IPv4-mapped {inner}" if inner else None
    if ip in _SIX_TO_FOUR:
        inner = classify(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
        return f"6to4 {inner}" if inner else None
    for net6, label in _V6_TABLE:
        if ip in net6:
            return label
    return None


def canonical_ip(ip: IPAddress) -> IPAddress:
    """The address compared with allow/deny entries: an IPv4-mapped IPv6 address is its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ------------------------------------------------------------------------------ parsing


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """`inet_aton` semantics: 1–4 parts, each decimal, `0x` hex or leading-`0` octal; the last part fills
    the remaining bytes (`127.1`, `2130706433`, `0x7f.1`, `017700000001`). None when it does not parse."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            digits, base, allowed = part[2:], 16, "0123456789abcdefABCDEF"
        elif len(part) > 1 and part[0] == "0":
            digits, base, allowed = part[1:], 8, "01234567"
        else:
            digits, base, allowed = part, 10, "0123456789"
        if not digits or any(c not in allowed for c in digits):
            return None
        values.append(int(digits, base))
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for v in head:
        number = (number << 8) | v
    number = (number << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(number)


@dataclass(frozen=True, slots=True)
class Host:
    """A parsed host: a normalised name (ASCII, lower case, no trailing dot) or an IP address."""

    name: str | None = None
    ip: IPAddress | None = None

    def __str__(self) -> str:
        if self.ip is not None:
            return str(self.ip)
        return self.name or ""


def _check_characters(value: str) -> None:
    for ch in value:
        if ch == "\\":
            raise MalformedHost("a backslash in a host argument")
        if ch.isspace():
            raise MalformedHost("whitespace in a host argument")
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Zs"):
            raise MalformedHost("a control or invisible character in a host argument")


def normalise_name(raw: str) -> Host:
    """A host name or IPv4 literal (no brackets, no port) → Host; MalformedHost when unusable."""
    if not raw:
        raise MalformedHost("an empty host")
    if "%" in raw:
        raise MalformedHost("percent-encoding in a host")
    if raw.isascii():
        name = raw.lower()
    else:
        if any(ch in _DEVIATIONS for ch in raw):
            raise MalformedHost("a host with an IDNA deviation character (ß, ς): clients disagree where it goes")
        try:
            name = raw.encode("idna").decode("ascii").lower()
        except (UnicodeError, ValueError):
            raise MalformedHost("a host that is not a valid internationalised domain name") from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise MalformedHost("an empty host")
    labels = name.split(".")
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        ip = parse_ipv4(name)
        if ip is None:
            raise MalformedHost("a host ending in a number that is not an IPv4 address")
        return Host(ip=ip)
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise MalformedHost("a host that is not a valid domain name")
    return Host(name=name)


def _parse_ipv6(text: str) -> ipaddress.IPv6Address:
    if "%" in text:
        raise MalformedHost("an IPv6 zone identifier in a host")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise MalformedHost("an invalid IPv6 address") from None


def parse_authority(text: str) -> Host | None:
    """`host[:port][/path…]` → the Host; None when there is no host (an empty authority)."""
    end = len(text)
    for sep in "/?#":
        i = text.find(sep)
        if i != -1:
            end = min(end, i)
    authority = text[:end]
    if "@" in authority:
        behind = authority.rpartition("@")[2]
        try:
            reached: str | None = str(parse_authority(behind)) if "@" not in behind else None
        except MalformedHost:
            reached = None
        raise MalformedHost("user information (`…@host`) in a URL", reached)
    if not authority:
        return None
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise MalformedHost("an unterminated [IPv6] host")
        host = Host(ip=_parse_ipv6(authority[1:close]))
        _check_port(authority[close + 1 :], allow_missing=True)
        return host
    if authority.count(":") >= 2:  # a bare IPv6 address (host arguments are not always URLs)
        return Host(ip=_parse_ipv6(authority))
    name, colon, port = authority.partition(":")
    if colon:
        _check_port(":" + port, allow_missing=True)
    return normalise_name(name)


def _check_port(text: str, *, allow_missing: bool) -> None:
    if text in ("", ":") and allow_missing:
        return
    if not text.startswith(":") or not text[1:].isdigit() or not text[1:].isascii() or int(text[1:]) > 65535:
        raise MalformedHost("an invalid port")


def parse_host_value(value: str) -> Host | None:
    """The host a host argument names; None when it names none (a path, `mailto:`, `file:///…`).
    MalformedHost when the value is refused outright."""
    _check_characters(value)
    if not value:
        return None
    m = _SCHEME_RE.match(value)
    if m is not None:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme in SPECIAL_SCHEMES:
            # WHATWG: any number of slashes (none included) before the authority of a special scheme
            return _required(parse_authority(rest.lstrip("/")))
        if rest.startswith("//"):
            return parse_authority(rest[2:])  # file:///x, foo://: an empty authority names no host
        if scheme in HOSTLESS_SCHEMES:
            return None
        # `localhost:8080/x`, `fe80::1`, `example.com:443`: not a scheme but a host (fail closed)
        return parse_authority(value)
    if value.startswith("//"):
        return _required(parse_authority(value[2:]))
    if value.startswith("/"):
        return None  # a path: no host
    return parse_authority(value)


def _required(host: Host | None) -> Host:
    if host is None:
        raise MalformedHost("a URL without a host")
    return host


# ------------------------------------------------------------------------------ the egress block


@dataclass(frozen=True, slots=True)
class Entry:
    text: str
    kind: str  # any | name | glob | ip | cidr
    name: str | None = None
    ip: IPAddress | None = None
    net: IPNetwork | None = None


def parse_entry(text: str) -> Entry:
    """An `egress` allow/deny entry: `*`, `api.example.com`, `*.example.com`, `10.0.0.5`, `[::1]`,
    `10.0.0.0/8` (a URL is taken for its host). EgressConfigError when it is none of these."""
    if not isinstance(text, str):
        raise EgressConfigError(f"egress entry {text!r} is not a string")
    raw = text.strip()
    try:
        if raw == "*":
            return Entry(text, "any")
        if raw.startswith("*."):
            host = normalise_name(raw[2:])
            if host.name is None or "*" in raw[2:]:
                raise EgressConfigError(f'egress entry "{text}": a glob is `*.` followed by a domain name')
            return Entry(text, "glob", name=host.name)
        if "*" in raw:
            raise EgressConfigError(f'egress entry "{text}": `*` is allowed only as `*` or a leading `*.`')
        if "/" in raw and "://" not in raw:
            try:
                net = ipaddress.ip_network(raw, strict=False)
            except ValueError:
                raise EgressConfigError(f'egress entry "{text}" is not a host, IP literal or CIDR') from None
            return Entry(text, "cidr", net=net)
        _check_characters(raw)
        if "://" in raw:
            host = _required(parse_host_value(raw))
        elif raw.startswith("[") and raw.endswith("]"):
            host = Host(ip=_parse_ipv6(raw[1:-1]))
        elif raw.count(":") >= 2:
            host = Host(ip=_parse_ipv6(raw))
        else:
            if ":" in raw:
                raise EgressConfigError(f'egress entry "{text}": entries are hosts, without a port')
            host = normalise_name(raw)
    except MalformedHost as exc:
        raise EgressConfigError(f'egress entry "{text}": {exc}') from None
    if host.ip is not None:
        return Entry(text, "ip", ip=canonical_ip(host.ip))
    return Entry(text, "name", name=host.name)


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    allow: tuple[Entry, ...]
    deny: tuple[Entry, ...]


def compile_egress(block: Mapping[str, Any]) -> EgressPolicy:
    """The agent's `egress` settings block → matchers. EgressConfigError names a bad entry."""
    out: dict[str, tuple[Entry, ...]] = {}
    for key in ("allow", "deny"):
        entries = block.get(key) or ()
        if isinstance(entries, str) or not isinstance(entries, list | tuple):
            raise EgressConfigError(f"egress.{key} must be a list of hosts")
        out[key] = tuple(parse_entry(e) for e in entries)
    return EgressPolicy(out["allow"], out["deny"])


def _name_matches(entry: Entry, name: str) -> bool:
    if entry.kind == "name":
        return entry.name == name
    if entry.kind == "glob":
        return name.endswith("." + str(entry.name))
    return entry.kind == "any"


def _refused_name(name: str) -> str | None:
    if name == "localhost" or name.endswith(".localhost"):
        return "loopback name"
    return _REFUSED_NAMES.get(name)


def decide_host(policy: EgressPolicy, host: Host) -> str | None:
    """Why `host` is refused, or None when it is allowed."""
    if host.ip is not None:
        ip = canonical_ip(host.ip)
        for e in policy.deny:
            if e.kind == "any" or (e.kind == "ip" and e.ip == ip) or (e.kind == "cidr" and _in(ip, e.net)):
                return f'matches egress.deny entry "{e.text}"'
        if any(e.kind == "ip" and e.ip == ip for e in policy.allow):
            return None
        refused = classify(host.ip)
        if refused is not None:
            return f"{refused} address: allowed only by an egress.allow entry that is exactly this IP literal"
        if any(e.kind == "any" or (e.kind == "cidr" and _in(ip, e.net)) for e in policy.allow):
            return None
        return "not in egress.allow"
    name = str(host.name)
    for e in policy.deny:
        if _name_matches(e, name):
            return f'matches egress.deny entry "{e.text}"'
    if any(e.kind == "name" and e.name == name for e in policy.allow):
        return None
    refused = _refused_name(name)
    if refused is not None:
        return f"{refused}: allowed only by an egress.allow entry that is exactly this name"
    if any(_name_matches(e, name) for e in policy.allow):
        return None
    return "not in egress.allow"


def _in(ip: IPAddress, net: IPNetwork | None) -> bool:
    return net is not None and ip.version == net.version and ip in net


# ------------------------------------------------------------------------------ args


@lru_cache(maxsize=4096)
def is_host_key(key: str) -> bool:
    """`url`, `base_url`, `callbackURL`, `hostName`, `webhooks`… (the last word, or the last two joined)."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
    if not words:
        return False
    return words[-1] in HOST_WORDS or (len(words) > 1 and words[-2] + words[-1] in HOST_WORDS)


def host_arguments(args: Any) -> Iterator[tuple[tuple[str, ...], str]]:
    """(key path, value) for every string under a host-like key, at any depth (iterative: no recursion)."""
    stack: list[tuple[Any, tuple[str, ...], bool]] = [(args, (), False)]
    while stack:
        node, path, under_host_key = stack.pop()
        if isinstance(node, str):
            if under_host_key:
                yield path, node
        elif isinstance(node, Mapping):
            for k, v in reversed(list(node.items())):
                key = str(k)
                stack.append((v, (*path, key), is_host_key(key)))
        elif isinstance(node, list | tuple):
            for item in reversed(node):
                stack.append((item, path, under_host_key))


@dataclass(frozen=True, slots=True)
class Refusal:
    arg: str  # dotted key path of the argument (list positions omitted)
    host: str | None  # the normalised host, when one could be parsed
    reason: str


def may_hold_hosts(raw: bytes) -> bool:
    """False when JSON bytes certainly hold no host-like key (a fast, case-insensitive pre-check)."""
    lowered = raw.lower()
    return any(hint in lowered for hint in _HINTS)


def check_args(policy: EgressPolicy, args: Any, raw: bytes | None = None) -> Refusal | None:
    """The first host argument the policy refuses, or None when every one is allowed. `raw`: the args'
    canonical JSON bytes, when the caller has them (lets args without any host-like key skip the walk)."""
    if raw is not None and not may_hold_hosts(raw):
        return None
    seen: dict[str, str | None] = {}
    for count, (path, value) in enumerate(host_arguments(args), start=1):
        arg = ".".join(path)
        if count > MAX_HOST_VALUES:
            return Refusal(arg, None, f"more than {MAX_HOST_VALUES} host arguments in one call")
        try:
            host = parse_host_value(value)
        except MalformedHost as exc:
            return Refusal(arg, exc.host, str(exc))
        if host is None:
            continue
        key = str(host)
        if key not in seen:
            seen[key] = decide_host(policy, host)
        if seen[key] is not None:
            return Refusal(arg, key, str(seen[key]))
    return None


def validate_policy(policy: Any) -> None:
    """Every agent's `egress` block compiles for both tiers (engine start and reload): entries may carry
    ports (the proxy's reading); EgressConfigError otherwise."""
    for agent_id, agent in policy.agents.items():
        block = agent.settings.get("egress")
        if block is not None:
            try:
                compile_egress(without_ports(block))
            except EgressConfigError as exc:
                raise EgressConfigError(f'agent "{agent_id}": {exc}') from None


# ------------------------------------------------------------------------------ proxy tier (ports, resolved addresses)
#
# The proxy (engine/proxy.py) decides per connection: the name and port first (no DNS for a refused name),
# then every resolved address. Entries there may carry a port (`api.example.com:443`, `*.example.com:8443`,
# `[::1]:8080`, `10.0.0.0/8:443`); an allow entry without one means ports 80 and 443, a deny entry without
# one means every port. The functions above keep their meaning for the SDK tier.

DEFAULT_PORTS = frozenset({80, 443})
_PORT_RE = re.compile(r"^[0-9]{1,5}$")

# Reason codes of a proxy refusal (stable: they end up in DPRs).
DENY_LISTED = "DENY_LISTED"  # an egress.deny entry matches
NOT_ALLOWED = "NOT_ALLOWED"  # no egress.allow entry matches the host
PORT_NOT_ALLOWED = "PORT_NOT_ALLOWED"  # an allow entry names the host, not this port
IP_NOT_LISTED = "IP_NOT_LISTED"  # an IP literal that no allow entry lists
REFUSED_NAME = "REFUSED_NAME"  # localhost / metadata names reached through a glob or `*`
REFUSED_ADDRESS = "REFUSED_ADDRESS"  # resolved into a refused range through a glob or `*`


@dataclass(frozen=True, slots=True)
class PortEntry:
    """An egress entry with the ports it covers; `ports` None: the default (allow: 80 and 443; deny: any)."""

    entry: Entry
    ports: frozenset[int] | None = None
    text: str = ""  # the entry as written (with its port), for reasons and DPRs

    def covers(self, port: int, *, default: frozenset[int] | None) -> bool:
        ports = self.ports if self.ports is not None else default
        return ports is None or port in ports


@dataclass(frozen=True, slots=True)
class ProxyEgressPolicy:
    allow: tuple[PortEntry, ...]
    deny: tuple[PortEntry, ...]


@dataclass(frozen=True, slots=True)
class TargetDecision:
    """The proxy's decision on a host and port, before any lookup. `exact`: allowed by an entry that is
    exactly this name or IP literal, the only kind that may reach an address in a refused range."""

    allowed: bool
    code: str
    reason: str
    rule: str | None = None
    exact: bool = False


def _parse_port(text: str, entry: str) -> int:
    if not _PORT_RE.match(text) or not 1 <= int(text) <= 65535:
        raise EgressConfigError(f'egress entry "{entry}": "{text}" is not a port (1-65535)')
    return int(text)


def parse_port_entry(text: str) -> PortEntry:
    """An allow/deny entry of the proxy tier: what `parse_entry` reads, optionally followed by `:port`."""
    if not isinstance(text, str):
        raise EgressConfigError(f"egress entry {text!r} is not a string")
    raw = text.strip()
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
        end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
        authority = rest[:end]
        bracket = authority.rfind("]")
        _, colon, port_text = authority[bracket + 1 :].rpartition(":")
        if colon and port_text:
            host_part = authority[: len(authority) - len(port_text) - 1]
            return PortEntry(
                parse_entry(f"{scheme}://{host_part}{rest[end:]}"), frozenset({_parse_port(port_text, text)}), text
            )
        return PortEntry(parse_entry(raw), None, text)
    if raw.startswith("["):
        close = raw.find("]")
        if close != -1 and raw[close + 1 : close + 2] == ":":
            return PortEntry(parse_entry(raw[: close + 1]), frozenset({_parse_port(raw[close + 2 :], text)}), text)
        return PortEntry(parse_entry(raw), None, text)
    if raw.count(":") == 1:
        host_part, _, port_text = raw.partition(":")
        return PortEntry(parse_entry(host_part), frozenset({_parse_port(port_text, text)}), text)
    return PortEntry(parse_entry(raw), None, text)


def compile_proxy_egress(block: Mapping[str, Any]) -> ProxyEgressPolicy:
    """The agent's `egress` block → the proxy's matchers (entries may carry ports). EgressConfigError
    names a bad entry."""
    out: dict[str, tuple[PortEntry, ...]] = {}
    for key in ("allow", "deny"):
        entries = block.get(key) or ()
        if isinstance(entries, str) or not isinstance(entries, list | tuple):
            raise EgressConfigError(f"egress.{key} must be a list of hosts")
        out[key] = tuple(parse_port_entry(e) for e in entries)
    return ProxyEgressPolicy(out["allow"], out["deny"])


def _ports_text(entries: list[PortEntry]) -> str:
    ports: set[int] = set()
    for e in entries:
        ports |= e.ports if e.ports is not None else DEFAULT_PORTS
    return ", ".join(str(p) for p in sorted(ports))


def decide_target(policy: ProxyEgressPolicy, host: Host, port: int) -> TargetDecision:
    """Whether the proxy may go on to resolve (or, for an IP literal, connect to) `host`:`port`.

    Pure. Deny entries first; then allow. An IP literal must be listed by an IP or CIDR allow entry (`*`
    does not list it); one in a refused range only by an entry that is exactly that literal. A refused
    name (`localhost`, metadata names) only by an entry that is exactly that name."""
    if host.ip is not None:
        return _decide_ip(policy, canonical_ip(host.ip), port)
    name = str(host.name)
    for pe in policy.deny:
        if _name_matches(pe.entry, name) and pe.covers(port, default=None):
            return TargetDecision(False, DENY_LISTED, f'{name}:{port} matches egress.deny entry "{pe.text}"')
    named = [pe for pe in policy.allow if _name_matches(pe.entry, name)]
    covering = [pe for pe in named if pe.covers(port, default=DEFAULT_PORTS)]
    exact = next((pe for pe in covering if pe.entry.kind == "name"), None)
    if exact is not None:
        return TargetDecision(True, "ALLOWED", f'egress.allow entry "{exact.text}"', exact.text, True)
    refused = _refused_name(name)
    if refused is not None and (covering or not named):
        return TargetDecision(
            False,
            REFUSED_NAME,
            f"{name} is a {refused}: allowed only by an egress.allow entry that is exactly this name",
        )
    if covering:
        rule = covering[0].text
        return TargetDecision(True, "ALLOWED", f'egress.allow entry "{rule}"', rule, False)
    if named:
        return TargetDecision(
            False, PORT_NOT_ALLOWED, f"port {port} is not allowed for {name} (allowed: {_ports_text(named)})"
        )
    return TargetDecision(False, NOT_ALLOWED, f"{name} is not in egress.allow")


def _decide_ip(policy: ProxyEgressPolicy, ip: IPAddress, port: int) -> TargetDecision:
    def hits(e: Entry) -> bool:
        return (e.kind == "ip" and e.ip == ip) or (e.kind == "cidr" and _in(ip, e.net))

    for pe in policy.deny:
        if (pe.entry.kind == "any" or hits(pe.entry)) and pe.covers(port, default=None):
            return TargetDecision(False, DENY_LISTED, f'{ip} port {port} matches egress.deny entry "{pe.text}"')
    listed = [pe for pe in policy.allow if hits(pe.entry)]
    covering = [pe for pe in listed if pe.covers(port, default=DEFAULT_PORTS)]
    exact = next((pe for pe in covering if pe.entry.kind == "ip"), None)
    if exact is not None:
        return TargetDecision(True, "ALLOWED", f'egress.allow entry "{exact.text}"', exact.text, True)
    if covering:
        rule = covering[0].text
        return TargetDecision(True, "ALLOWED", f'egress.allow entry "{rule}"', rule, False)
    if listed:
        return TargetDecision(
            False, PORT_NOT_ALLOWED, f"port {port} is not allowed for {ip} (allowed: {_ports_text(listed)})"
        )
    return TargetDecision(False, IP_NOT_LISTED, f"the IP literal {ip} is not listed in egress.allow")


def classify_address(ip: IPAddress, own_addresses: frozenset[IPAddress] = frozenset()) -> str | None:
    """`classify`, plus the host's own addresses (the proxy's view of "this machine"), compared in the
    canonical form (an IPv4-mapped address is its IPv4 address)."""
    refused = classify(ip)
    if refused is None and canonical_ip(ip) in own_addresses:
        return "this host's own address"
    return refused


def check_address(
    decision: TargetDecision, ip: IPAddress, own_addresses: frozenset[IPAddress] = frozenset()
) -> str | None:
    """Why a resolved address may not be dialled under `decision`, or None. Only an exact entry reaches
    a refused range (an internal service named on purpose); a glob or `*` never does."""
    if not decision.allowed:
        return decision.reason
    if decision.exact:
        return None
    refused = classify_address(ip, own_addresses)
    if refused is not None:
        return (
            f"resolves to {canonical_ip(ip)} ({refused}): a refused range is reachable only through an "
            "egress.allow entry that is exactly this host name or IP literal"
        )
    return None


def parse_host_port(text: str, default_port: int | None) -> tuple[Host, int]:
    """`host:port`, `[v6]:port` or (with a default port) a bare host, as in a CONNECT target or a Host
    header → the canonical Host and port. MalformedHost when it is anything else (userinfo, a path…)."""
    _check_characters(text)
    if not text or any(c in text for c in "@/?#"):
        raise MalformedHost("a host[:port] with other URL parts")
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise MalformedHost("an unterminated [IPv6] host")
        host = Host(ip=_parse_ipv6(text[1:close]))
        rest = text[close + 1 :]
    else:
        if text.count(":") > 1:
            raise MalformedHost("an IPv6 host without brackets")
        name, colon, port_text = text.partition(":")
        host = normalise_name(name)
        rest = colon + port_text
    if rest == "" and default_port is not None:
        return host, default_port
    if not rest.startswith(":") or not _PORT_RE.match(rest[1:]) or not 1 <= int(rest[1:]) <= 65535:
        raise MalformedHost("a missing or invalid port")
    return host, int(rest[1:])


def without_ports(block: Mapping[str, Any]) -> dict[str, list[str]]:
    """An `egress` block whose entries may carry ports (the proxy tier's reading) → the same hosts without
    ports, for `compile_egress` (the SDK tier matches hosts in tool args, which carry no port decision).
    EgressConfigError names a bad entry."""
    policy = compile_proxy_egress(block)
    return {"allow": [pe.entry.text for pe in policy.allow], "deny": [pe.entry.text for pe in policy.deny]}
