"""macOS sandbox (DESIGN.md §5): the SBPL profile generated from a SandboxSpec, read back with a small
s-expression parser and evaluated by a small Seatbelt model; the chflags lock with an injected flag-setter.

Everything here runs on any platform except the tests marked `macos_only`, which execute sandbox-exec
(it exists only on macOS; .github/workflows/macos.yml runs them on a macOS runner).

The evaluator decides a request the way Seatbelt does: the rules whose operation covers it and whose
filters match it, then `(deny default)` when none does. Seatbelt's precedence between matching rules has
been documented both as first-match and as last-match, so every decision is taken under both and the two
must agree: the profile may not depend on which one the running macOS uses.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from faramesh.sandbox import immutable, macos
from faramesh.sandbox.errors import ImmutableError, ImmutableUnsupported, SpecError
from faramesh.sandbox.spec import SandboxSpec
from hypothesis import given
from hypothesis import strategies as st

BPF = b"\x06\0\0\0\0\0\xff\x7f"  # SandboxSpec wants one for profile full; macOS never loads it
HOME = "/Users/alice"
STACK = f"{HOME}/stack"
WS = f"{STACK}/workspace"
RO = f"{WS}/vendor"
STATE = "/var/lib/faramesh/stack-0123abcd"
RUNTIME = "/var/run/faramesh/stack-0123abcd"
SOCKET_DIR = f"{RUNTIME}/agents/5f3a"
SOCK = f"{SOCKET_DIR}/agent.sock"
TMP = "/var/folders/xy/abc/T/faramesh-bot-1"
PORT = 41234

macos_only = pytest.mark.skipif(
    sys.platform != "darwin", reason="sandbox-exec exists only on macOS; the profile is checked structurally here"
)


def make_spec(**change: Any) -> SandboxSpec:
    kw: dict[str, Any] = {
        "profile": "full", "agent_id": "support-bot", "host_uid": 61001, "host_gid": 61001,
        "workspace": WS, "stack_dir": STACK, "read_only_paths": (RO,), "hidden_paths": (f"{STACK}/.faramesh",),
        "egress_port": PORT, "socket_dir": SOCKET_DIR, "seccomp_bpf": BPF,
    }
    kw.update(change)
    return SandboxSpec(**kw)


def profile_for(spec: SandboxSpec | None = None, **kw: Any) -> str:
    args: dict[str, Any] = {"tmpdir": TMP, "user_home": HOME, "hidden": (STATE, RUNTIME)}
    args.update(kw)
    return macos.build_profile(spec if spec is not None else make_spec(), **args)


# --- a small SBPL reader -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sym:
    name: str


@dataclass(frozen=True)
class Str:
    value: str


@dataclass(frozen=True)
class Rx:
    pattern: str


Node = Sym | Str | Rx | list["Node"]


class ParseError(Exception):
    pass


_ESCAPES = {"\\": "\\", '"': '"'}


def _read_string(text: str, i: int) -> tuple[str, int]:
    """The string literal whose opening quote is at text[i]; returns (value, index after the closing quote)."""
    out: list[str] = []
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _ESCAPES:
                raise ParseError(f"unexpected escape at {i}: {text[i:i + 2]!r}")
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        if ch == "\n" or ord(ch) < 0x20:
            raise ParseError(f"control character inside a string at {i}")
        out.append(ch)
        i += 1
    raise ParseError("unterminated string")


def parse(text: str) -> list[Node]:
    """Top-level forms of an SBPL text. Strict: unbalanced parentheses or a bad string raise ParseError."""
    stack: list[list[Node]] = [[]]
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == ";":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif ch == "(":
            stack.append([])
            i += 1
        elif ch == ")":
            if len(stack) == 1:
                raise ParseError(f"unbalanced ')' at {i}")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif ch == '"':
            value, i = _read_string(text, i)
            stack[-1].append(Str(value))
        elif text.startswith('#"', i):
            value, i = _read_string(text, i + 1)
            stack[-1].append(Rx(value))
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in '();"':
                j += 1
            stack[-1].append(Sym(text[i:j]))
            i = j
    if len(stack) != 1:
        raise ParseError(f"{len(stack) - 1} unclosed '('")
    return stack[0]


@dataclass(frozen=True)
class Rule:
    action: str
    ops: tuple[str, ...]
    filters: tuple[Node, ...]


def rules_of(forms: list[Node]) -> list[Rule]:
    out = []
    for form in forms[2:]:
        assert isinstance(form, list) and isinstance(form[0], Sym), form
        ops = tuple(n.name for n in form[1:] if isinstance(n, Sym))
        filters = tuple(n for n in form[1:] if not isinstance(n, Sym))
        out.append(Rule(form[0].name, ops, filters))
    return out


def walk(node: Node | list[Node]) -> Iterator[Node]:
    yield node
    if isinstance(node, list):
        for child in node:
            yield from walk(child)


def path_literals(forms: list[Node]) -> set[str]:
    """Every string that is a path: the argument of subpath, literal or path-literal."""
    found = set()
    for node in walk(forms):
        if isinstance(node, list) and node and node[0] in (Sym("subpath"), Sym("literal"), Sym("path-literal")):
            assert len(node) == 2 and isinstance(node[1], Str), node
            found.add(node[1].value)
    return found


# --- a small Seatbelt model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    op: str
    path: str | None = None
    remote: tuple[str, str] | None = None  # ("tcp", "localhost:80") or ("unix-socket", "/path")
    name: str | None = None  # sysctl or mach service name
    target: str = "same-sandbox"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def filter_matches(f: Node, req: Req) -> bool:
    assert isinstance(f, list) and isinstance(f[0], Sym), f
    kind, args = f[0].name, f[1:]
    if kind == "require-all":
        return all(filter_matches(a, req) for a in args)
    if kind == "require-any":
        return any(filter_matches(a, req) for a in args)
    if kind == "require-not":
        return not filter_matches(args[0], req)
    if kind in ("subpath", "literal", "regex"):
        if req.path is None:
            return False
        arg = args[0]
        if kind == "regex":
            assert isinstance(arg, Rx)
            return re.search(arg.pattern, req.path) is not None
        assert isinstance(arg, Str)
        return _under(req.path, arg.value) if kind == "subpath" else req.path == arg.value
    if kind == "extension":
        return False  # the requests modelled here hold no sandbox extension
    if kind == "target":
        return args[0] == Sym(req.target)
    if kind in ("global-name", "sysctl-name"):
        return args[0] == Str(req.name or "")
    if kind == "sysctl-name-prefix":
        assert isinstance(args[0], Str)
        return (req.name or "").startswith(args[0].value)
    if kind == "remote":
        if req.remote is None:
            return False
        proto, arg = args
        assert isinstance(proto, Sym)
        if proto.name == "unix-socket":
            assert isinstance(arg, list) and arg[0] == Sym("path-literal") and isinstance(arg[1], Str)
            return req.remote == ("unix-socket", arg[1].value)
        assert isinstance(arg, Str)
        return req.remote == (proto.name, arg.value)
    raise AssertionError(f"the model does not know the filter {kind!r}: teach it before the profile uses it")


def op_covers(rule_op: str, op: str) -> bool:
    return op.startswith(rule_op[:-1]) if rule_op.endswith("*") else rule_op == op


def decide(profile: str, req: Req, precedence: str) -> str:
    forms = parse(profile)
    assert forms[1] == [Sym("deny"), Sym("default")]
    hits = [r for r in rules_of(forms)
            if any(op_covers(o, req.op) for o in r.ops) and (not r.filters or any(filter_matches(f, req)
                                                                                  for f in r.filters))]
    if not hits:
        return "deny"
    return (hits[0] if precedence == "first" else hits[-1]).action


def allowed(profile: str, req: Req) -> bool:
    first, last = decide(profile, req, "first"), decide(profile, req, "last")
    assert first == last, f"{req}: first-match says {first}, last-match says {last}"
    return first == "allow"


def can(profile: str, path: str) -> str:
    """A compact summary: r (read data), w (write data), x (exec), m (stat), each or '-'."""
    return "".join(c if allowed(profile, Req(op, path)) else "-" for c, op in
                   (("r", "file-read-data"), ("w", "file-write-data"), ("x", "process-exec"),
                    ("m", "file-read-metadata")))


# --- structure -----------------------------------------------------------------------------------------

EXPECTED_OPERATIONS = {
    ("deny", "default"),
    ("allow", "process-fork"), ("allow", "process-exec"), ("allow", "signal"), ("allow", "process-info*"),
    ("allow", "sysctl-read"), ("allow", "mach-lookup"), ("allow", "ipc-posix-sem"), ("allow", "ipc-posix-shm"),
    ("allow", "file-read*"), ("allow", "file-write*"), ("allow", "file-read-metadata"), ("allow", "pseudo-tty"),
    ("allow", "file-ioctl"), ("allow", "network-outbound"),
    ("deny", "file-read*"), ("deny", "file-write*"), ("deny", "process-exec"), ("deny", "file-write-flags"),
}


def operations(profile: str) -> set[tuple[str, str]]:
    forms = parse(profile)
    out = set()
    for form in forms[1:]:
        assert isinstance(form, list) and isinstance(form[0], Sym)
        out.update((form[0].name, n.name) for n in form[1:] if isinstance(n, Sym))
    return out


def test_profile_is_balanced_version_first_and_deny_by_default() -> None:
    profile = profile_for()
    forms = parse(profile)
    assert forms[0] == [Sym("version"), Sym("1")]
    assert forms[1] == [Sym("deny"), Sym("default")]
    assert all(isinstance(f, list) and f[0] in (Sym("allow"), Sym("deny")) for f in forms[1:])
    for rule in rules_of(forms):
        assert rule.ops != ("default",) or rule.action == "deny"  # never (allow default)
    # No Scheme beyond rules: nothing imported, defined, parameterised or computed at compile time.
    symbols = {n.name for n in walk(forms) if isinstance(n, Sym)}
    assert not symbols & {"import", "define", "param", "lambda", "string-append", "if", "let", "debug"}


def test_the_set_of_operations_is_exactly_the_expected_one() -> None:
    assert operations(profile_for()) == EXPECTED_OPERATIONS


def test_without_egress_port_or_socket_there_is_no_network_rule() -> None:
    profile = profile_for(make_spec(egress_port=None, socket_dir=None))
    assert operations(profile) == EXPECTED_OPERATIONS - {("allow", "network-outbound")}
    assert not allowed(profile, Req("network-outbound", remote=("tcp", f"localhost:{PORT}")))


def test_rules_meant_to_be_filtered_have_filters() -> None:
    """An unfiltered file, exec or network allow would grant the operation everywhere."""
    unfiltered_ok = {"process-fork", "ipc-posix-sem", "ipc-posix-shm", "pseudo-tty"}
    for rule in rules_of(parse(profile_for())):
        assert rule.filters or set(rule.ops) <= unfiltered_ok | {"default"}, rule


def _expected_paths(spec: SandboxSpec, extra: tuple[str, ...]) -> set[str]:
    base = {
        spec.workspace, spec.stack_dir, *spec.read_only_paths, *spec.hidden_paths, f"{spec.stack_dir}/.faramesh",
        f"{spec.stack_dir}/governance.fms", TMP, SOCK, STATE, RUNTIME, *extra,
        *macos.SYSTEM_READ_PATHS, *(f"/private/etc/{n}" for n in macos.ETC_ALLOW),
        *macos.DEVICES_READ_ONLY, *macos.DEVICES_READ_WRITE, *macos.credential_paths(HOME),
    }
    if _under(spec.stack_dir, spec.workspace):
        base.update({f"{spec.stack_dir}/governance.fms", f"{spec.stack_dir}/.git"})
    twinned = set(base)
    for p in base:
        for alias in ("/tmp", "/var", "/etc"):
            if _under(p, alias):
                twinned.add("/private" + p)
    with_parents = set(twinned)
    for p in twinned:
        parts = p.strip("/").split("/")
        with_parents.update("/" + "/".join(parts[:i]) for i in range(len(parts)))
    return with_parents


@pytest.mark.parametrize("layout", ["nested", "same", "apart"])
def test_every_path_literal_comes_from_the_spec(layout: str) -> None:
    spec = {"nested": make_spec(),
            "same": make_spec(workspace=STACK, read_only_paths=()),
            "apart": make_spec(workspace="/Users/alice/work", read_only_paths=("/opt/models",))}[layout]
    literals = path_literals(parse(profile_for(spec)))
    assert literals <= _expected_paths(spec, ()), literals - _expected_paths(spec, ())
    # … and the spec's paths are all there.
    for p in (spec.workspace, spec.stack_dir, *spec.read_only_paths, f"{STACK}/.faramesh", "/private" + TMP,
              "/private" + SOCK, "/private" + STATE):
        assert p in literals, p


def test_workspace_is_the_only_writable_spec_path_and_hidden_paths_are_denied() -> None:
    forms = parse(profile_for())
    rules = rules_of(forms)
    write = [r for r in rules if r.action == "allow" and "file-write*" in r.ops and len(r.ops) == 1]
    assert len(write) == 1
    written = path_literals(list(write[0].filters))
    assert WS in written and RO in written  # RO only inside (require-not …)
    assert STACK not in written and not any(_under(p, STATE) or _under(p, RUNTIME) for p in written)
    deny = [r for r in rules if r.action == "deny" and "file-read*" in r.ops]
    assert len(deny) == 1 and {"file-write*", "process-exec"} <= set(deny[0].ops)
    denied = path_literals(list(deny[0].filters))
    assert {f"{STACK}/.faramesh", "/private" + STATE, "/private" + RUNTIME, f"{HOME}/.ssh"} <= denied


# --- quoting and injection -----------------------------------------------------------------------------

HOSTILE = [
    '/Users/alice/w") (allow default) (allow file-write* (subpath "/x',
    "/Users/alice/w\\\") (allow default) ;",
    '/Users/alice/w\\',
    "/Users/alice/#\"^/\" ; (allow network*)",
    "/Users/alice/spa ce/é/日本/(paren)",
]


@pytest.mark.parametrize("workspace", HOSTILE)
def test_a_hostile_workspace_name_stays_one_string(workspace: str) -> None:
    baseline = profile_for(make_spec(read_only_paths=()))
    profile = profile_for(make_spec(workspace=workspace, read_only_paths=()))
    forms = parse(profile)
    assert len(forms) == len(parse(baseline))
    assert operations(profile) == operations(baseline)
    assert workspace in path_literals(forms)
    assert allowed(profile, Req("file-write-data", workspace + "/f"))
    assert not allowed(profile, Req("file-write-data", "/Users/alice/x"))
    assert not allowed(profile, Req("network-outbound", remote=("tcp", "*:443")))


_component = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\x7f"), min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..", ".faramesh"))


@given(_component, _component)
def test_any_printable_path_round_trips_exactly(a: str, b: str) -> None:
    workspace = f"/Users/{a}/{b}"
    profile = profile_for(make_spec(workspace=workspace, stack_dir=f"/Users/{a}", read_only_paths=(),
                                    hidden_paths=()), user_home=None)
    forms = parse(profile)
    assert workspace in path_literals(forms)
    assert operations(profile) == EXPECTED_OPERATIONS
    assert allowed(profile, Req("file-write-data", workspace))


@pytest.mark.parametrize("bad", ["\n", "\r", "\0", "\t", "\x1b", "\x7f"])
def test_control_characters_in_a_path_are_refused(bad: str) -> None:
    with pytest.raises(macos.MacProfileError) as e:
        profile_for(make_spec(workspace=f"{STACK}/ws{bad}x"))
    assert e.value.code == "SANDBOX_MACOS_PROFILE_INVALID"
    with pytest.raises(macos.MacProfileError):
        profile_for(hidden=(f"/var/lib/x{bad}",))
    with pytest.raises(macos.MacProfileError):
        profile_for(tmpdir=f"/var/folders/t{bad}")


def test_an_undecodable_file_name_is_refused() -> None:
    with pytest.raises(macos.MacProfileError, match="UTF-8"):
        profile_for(make_spec(workspace=f"{STACK}/ws\udcff"))


@pytest.mark.parametrize("tmpdir", ["relative/tmp", "/var/folders/../etc", "/", "/var//folders"])
def test_option_paths_must_be_absolute_and_normalised(tmpdir: str) -> None:
    with pytest.raises(macos.MacProfileError, match="absolute, normalised"):
        profile_for(tmpdir=tmpdir)


def test_a_workspace_that_is_hidden_or_read_only_is_refused() -> None:
    with pytest.raises(macos.MacProfileError, match="hidden or credential"):
        profile_for(make_spec(workspace=f"{HOME}/.ssh/ws", read_only_paths=()))
    with pytest.raises(macos.MacProfileError, match="hidden or credential"):
        profile_for(tmpdir=f"/private{STATE}/tmp")
    with pytest.raises(macos.MacProfileError, match="lies inside a read-only path"):
        profile_for(make_spec(read_only_paths=(WS,)))


# --- decisions -----------------------------------------------------------------------------------------

DECISIONS = [
    (f"{WS}/agent.py", "rwxm"),
    (f"{WS}", "rwxm"),
    (f"{RO}/lib.py", "r-xm"),  # read-only inside the writable workspace
    (f"{STACK}/governance.fms", "r-xm"),
    (f"{STACK}/README.md", "r-xm"),
    (f"{STACK}/.faramesh", "----"),
    (f"{STACK}/.faramesh/policy.json", "----"),
    (f"{STACK}/.faramesh/bin/agent", "----"),
    (f"{TMP}/scratch", "rwxm"),
    (f"/private{TMP}/scratch", "rwxm"),
    ("/usr/bin/env", "r-xm"),
    ("/bin/sh", "r-xm"),
    ("/private/etc/passwd", "r-xm"),
    ("/private/etc/master.passwd", "----"),
    ("/private/etc/sudoers", "----"),
    ("/private/etc/ssh/ssh_host_ed25519_key", "----"),
    (f"{HOME}/.ssh/id_ed25519", "----"),
    (f"{HOME}/.aws/credentials", "----"),
    (f"{HOME}/Library/Keychains/login.keychain-db", "----"),
    (f"{HOME}/notes.txt", "----"),
    (HOME, "---m"),  # stat only, on the way to the stack
    ("/", "---m"),
    ("/Users/bob/.ssh/id_rsa", "----"),
    ("/System/Volumes/Data/Users/alice/.ssh/id_ed25519", "----"),
    (f"/private{STATE}/keys/signing.pem", "----"),
    (f"/private{STATE}", "----"),
    (f"/private{RUNTIME}/operator.sock", "----"),
    (f"/private{RUNTIME}/supervisor.sock", "----"),
    (f"/private{SOCK}", "---m"),  # the agent's own socket: stat and connect, nothing else
    ("/private/tmp/other-users-file", "----"),
    ("/dev/null", "rwxm"),
    ("/dev/urandom", "r-xm"),
    ("/dev/disk0", "----"),
    ("/dev/ttys003", "----"),  # a terminal the agent did not open itself
    ("/Library/Keychains/System.keychain", "----"),
]


@pytest.mark.parametrize(("path", "expected"), DECISIONS)
def test_file_decisions(path: str, expected: str) -> None:
    assert can(profile_for(), path) == expected


def test_clearing_uchg_on_the_config_is_denied_but_not_in_the_workspace() -> None:
    profile = profile_for()
    for path in (f"{STACK}/governance.fms", f"{STACK}/.faramesh/policy.json", f"{STACK}/.faramesh"):
        assert not allowed(profile, Req("file-write-flags", path))
    assert allowed(profile, Req("file-write-flags", f"{WS}/copied.txt"))  # shutil.copy2 calls chflags


def test_a_workspace_that_is_the_stack_dir_keeps_the_config_read_only() -> None:
    profile = profile_for(make_spec(workspace=STACK, read_only_paths=()))
    assert can(profile, f"{STACK}/src/app.py") == "rwxm"
    assert can(profile, f"{STACK}/governance.fms") == "r-xm"
    assert can(profile, f"{STACK}/.git/hooks/pre-commit") == "r-xm"
    assert can(profile, f"{STACK}/.faramesh/policy.json") == "----"
    assert not allowed(profile, Req("file-write-flags", f"{STACK}/governance.fms"))


def test_a_stack_inside_the_workspace_is_read_only() -> None:
    profile = profile_for(make_spec(workspace=HOME + "/ws", stack_dir=HOME + "/ws/stack", read_only_paths=(),
                                    hidden_paths=()))
    assert can(profile, f"{HOME}/ws/out.txt") == "rwxm"
    assert can(profile, f"{HOME}/ws/stack/governance.fms") == "r-xm"
    assert can(profile, f"{HOME}/ws/stack/.faramesh/policy.json") == "----"


def test_network_only_to_the_proxy_port_and_the_engine_socket() -> None:
    profile = profile_for()

    def out(kind: str, where: str) -> bool:
        return allowed(profile, Req("network-outbound", remote=(kind, where)))

    assert out("tcp", f"localhost:{PORT}")
    assert not out("tcp", f"localhost:{PORT + 1}")
    assert not out("tcp", "*:443") and not out("udp", "*:53") and not out("tcp", "localhost:*")
    assert out("unix-socket", SOCK) and out("unix-socket", "/private" + SOCK)
    assert not out("unix-socket", f"/private{RUNTIME}/operator.sock")
    assert not out("unix-socket", "/private/var/run/mDNSResponder")
    assert not allowed(profile, Req("network-bind", remote=("tcp", f"localhost:{PORT}")))
    assert not allowed(profile, Req("network-inbound", remote=("tcp", "*:22")))


def test_other_operations() -> None:
    profile = profile_for()
    assert allowed(profile, Req("process-fork"))
    assert allowed(profile, Req("signal", target="same-sandbox"))
    assert not allowed(profile, Req("signal", target="others"))
    assert allowed(profile, Req("sysctl-read", name="hw.ncpu"))
    assert allowed(profile, Req("sysctl-read", name="kern.osrelease"))
    assert not allowed(profile, Req("sysctl-read", name="kern.proc.all"))
    assert not allowed(profile, Req("sysctl-write", name="kern.hostname"))
    assert allowed(profile, Req("mach-lookup", name="com.apple.system.opendirectoryd.libinfo"))
    assert not allowed(profile, Req("mach-lookup", name="com.apple.SecurityServer"))  # the keychain
    assert not allowed(profile, Req("mach-lookup", name="com.apple.pasteboard.1"))
    assert not allowed(profile, Req("iokit-open", name="IOHIDSystem"))
    assert allowed(profile, Req("file-ioctl", "/dev/ptmx"))
    assert not allowed(profile, Req("file-ioctl", "/dev/ttys001"))  # no TIOCSTI into the user's terminal


_SEGMENTS = ["Users", "alice", "lib", "stack", "workspace", "vendor", ".faramesh", ".ssh", "governance.fms", ".git",
             "private", "var", "tmp", "run", "faramesh", "stack-0123abcd", "agents", "5f3a", "agent.sock", "usr",
             "bin", "etc", "passwd", "folders", "xy", "abc", "T", "faramesh-bot-1", "dev", "null", "x"]
_OPS = ["file-read-data", "file-read-metadata", "file-write-data", "file-write-unlink", "file-write-flags",
        "process-exec", "file-ioctl"]


_PROFILE = profile_for()


@given(st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=9), st.sampled_from(_OPS))
def test_decisions_do_not_depend_on_rule_precedence_and_respect_the_layout(parts: list[str], op: str) -> None:
    profile = _PROFILE
    path = "/" + "/".join(parts)
    ok = allowed(profile, Req(op, path))  # asserts first-match == last-match
    bare = path.removeprefix("/private")
    if any(_under(bare, h) for h in (f"{STACK}/.faramesh", STATE, f"{HOME}/.ssh")) or (
            _under(bare, RUNTIME) and not _under(SOCK, bare)):
        assert not ok, path
    if ok and op.startswith("file-write"):
        assert allowed(profile, Req("file-read-data", path)), path
        assert any(_under(bare, w) for w in (WS, TMP, "/dev/null", "/dev/zero", "/dev/fd", "/dev/ptmx")), path
        assert not _under(bare, RO), path


# --- the launch plan -----------------------------------------------------------------------------------

HOST_ENV = {"PATH": "/opt/homebrew/bin:/usr/bin:/bin", "LANG": "en_US.UTF-8", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
            "GITHUB_TOKEN": "ghp_x", "HOME": "/Users/alice", "SSH_AUTH_SOCK": "/private/tmp/ssh-x/agent.1",
            "HTTPS_PROXY": "http://corp:3128", "TMPDIR": "/var/folders/host/T/"}


def test_plan_runs_the_command_through_sandbox_exec() -> None:
    launch = macos.plan_launch(make_spec(), ["-f", "x"], tmpdir=TMP, host_env=HOST_ENV, user_home=HOME,
                               hidden=(STATE, RUNTIME))
    assert launch.argv[:2] == ("/usr/bin/sandbox-exec", "-p") and launch.argv[3:] == ("--", "-f", "x")
    assert launch.profile == launch.argv[2] == profile_for()
    assert launch.cwd == WS
    env = dict(launch.env)
    assert env["HOME"] == TMP and env["TMPDIR"] == TMP + "/"
    assert env["FARAMESH_SOCKET"] == SOCK and env["FARAMESH_PROXY_PORT"] == str(PORT)
    assert env["FARAMESH_AGENT_ID"] == "support-bot" and env["NO_PROXY"] == ""
    assert env["PATH"] == HOST_ENV["PATH"]
    for secret in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "SSH_AUTH_SOCK", "HTTPS_PROXY"):
        assert secret not in env
    assert "s3cr3t" not in "".join(launch.report) + "".join(launch.argv)
    assert any("generated and structurally checked" in line for line in launch.report)
    assert any("NOT applied: uid separation" in line for line in launch.report)


def test_profile_off_runs_the_command_unconfined_and_says_so() -> None:
    launch = macos.plan_launch(make_spec(profile="off", seccomp_bpf=b""), ["python3", "agent.py"], tmpdir=TMP,
                               host_env=HOST_ENV, as_root=True)
    assert launch.argv == ("python3", "agent.py") and launch.profile is None
    assert "GITHUB_TOKEN" not in launch.env
    assert "PROFILE OFF" in launch.report[1]
    assert any("host uid/gid 61001/61001" in line for line in launch.report)


def test_empty_or_nul_commands_are_refused() -> None:
    with pytest.raises(SpecError):
        macos.plan_launch(make_spec(), [], tmpdir=TMP, host_env={})
    with pytest.raises(SpecError, match="NUL"):
        macos.sandbox_exec_argv("(version 1)", ["sh", "-c", "a\0b"])


def test_create_private_tmp(tmp_path: Any) -> None:
    as_root = os.geteuid() == 0
    uid, gid = (61001, 61001) if as_root else (os.geteuid(), os.getegid())
    path = macos.create_private_tmp(str(tmp_path), "support-bot", uid, gid, as_root=as_root)
    st_ = os.lstat(path)
    assert stat.S_ISDIR(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o700
    assert (st_.st_uid, st_.st_gid) == (uid, gid)
    assert os.path.basename(path).startswith("faramesh-support-bot-")


def test_spawn_refuses_where_sandbox_exec_cannot_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    launch = macos.plan_launch(make_spec(), ["true"], tmpdir=TMP, host_env={})
    monkeypatch.setattr(macos.sys, "platform", "linux")
    with pytest.raises(macos.MacSandboxUnavailable, match="only on macOS") as e:
        macos.spawn(launch, make_spec(), as_root=False)
    assert e.value.code == "SANDBOX_MACOS_UNAVAILABLE"
    monkeypatch.setattr(macos.sys, "platform", "darwin")
    monkeypatch.setattr(macos, "SANDBOX_EXEC", str(tmp_path / "no-sandbox-exec"))
    with pytest.raises(macos.MacSandboxUnavailable, match="missing"):
        macos.spawn(launch, make_spec(), as_root=False)


# --- chflags -------------------------------------------------------------------------------------------

@dataclass
class FakeStat:
    st_mode: int
    st_flags: int


@dataclass
class FakeFlags:
    """A file system of (mode, flags) and a chflags that records its calls."""

    files: dict[str, FakeStat]
    error: int | None = None
    ignore: bool = False
    calls: list[tuple[str, int]] = field(default_factory=list)

    def lstat(self, path: str) -> FakeStat:
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.files[path]

    def chflags(self, path: str, flags: int) -> None:
        self.calls.append((path, flags))
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error), path)
        if not self.ignore:
            self.files[path].st_flags = flags


def _fs(flags: int = 0, mode: int = stat.S_IFREG | 0o644) -> FakeFlags:
    return FakeFlags({"/s/governance.fms": FakeStat(mode, flags)})


def test_root_sets_uchg_and_schg_a_user_only_uchg() -> None:
    fs = _fs(stat.UF_NODUMP)
    immutable.set_immutable_bsd("/s/governance.fms", is_root=True, chflags=fs.chflags, lstat=fs.lstat)
    assert fs.calls == [("/s/governance.fms", stat.UF_NODUMP | stat.UF_IMMUTABLE | stat.SF_IMMUTABLE)]
    assert immutable.is_set_bsd("/s/governance.fms", lstat=fs.lstat)
    fs = _fs()
    immutable.set_immutable_bsd("/s/governance.fms", is_root=False, chflags=fs.chflags, lstat=fs.lstat)
    assert fs.calls == [("/s/governance.fms", stat.UF_IMMUTABLE)]


def test_an_already_locked_file_is_not_touched_and_root_adds_schg_to_uchg() -> None:
    fs = _fs(stat.UF_IMMUTABLE)
    immutable.set_immutable_bsd("/s/governance.fms", is_root=False, chflags=fs.chflags, lstat=fs.lstat)
    assert fs.calls == []
    immutable.set_immutable_bsd("/s/governance.fms", is_root=True, chflags=fs.chflags, lstat=fs.lstat)
    assert fs.calls == [("/s/governance.fms", stat.UF_IMMUTABLE | stat.SF_IMMUTABLE)]


def test_clear_drops_both_flags_and_keeps_the_others() -> None:
    fs = _fs(stat.UF_IMMUTABLE | stat.SF_IMMUTABLE | stat.UF_HIDDEN)
    immutable.clear_immutable_bsd("/s/governance.fms", is_root=True, chflags=fs.chflags, lstat=fs.lstat)
    assert fs.calls == [("/s/governance.fms", stat.UF_HIDDEN)]
    assert not immutable.is_set_bsd("/s/governance.fms", lstat=fs.lstat)


def test_a_symlink_or_a_fifo_is_refused_without_a_chflags_call() -> None:
    for mode in (stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o600):
        fs = _fs(mode=mode)
        with pytest.raises(ImmutableError, match="neither a regular file nor a directory"):
            immutable.set_immutable_bsd("/s/governance.fms", is_root=True, chflags=fs.chflags, lstat=fs.lstat)
        assert fs.calls == []
    fs = _fs()
    with pytest.raises(ImmutableError) as e:
        immutable.set_immutable_bsd("/s/missing", is_root=True, chflags=fs.chflags, lstat=fs.lstat)
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize(("err", "cls"), [(errno.EPERM, ImmutableError), (errno.EOPNOTSUPP, ImmutableUnsupported)])
def test_chflags_errors_are_typed(err: int, cls: type[Exception]) -> None:
    fs = _fs()
    fs.error = err
    with pytest.raises(cls) as e:
        immutable.set_immutable_bsd("/s/governance.fms", is_root=False, chflags=fs.chflags, lstat=fs.lstat)
    assert type(e.value) is cls and e.value.errno == err  # type: ignore[attr-defined]
    assert "chflags uchg /s/governance.fms" in str(e.value)


def test_a_filesystem_that_ignores_the_flag_is_reported() -> None:
    fs = _fs()
    fs.ignore = True
    with pytest.raises(ImmutableUnsupported, match="silently ignored"):
        immutable.set_immutable_bsd("/s/governance.fms", is_root=True, chflags=fs.chflags, lstat=fs.lstat)


def test_the_real_chflags_path_follows_the_platform(tmp_path: Any) -> None:
    """macOS: a real uchg lock. Elsewhere (no chflags(2), no st_flags): a typed error, never a silent no-op."""
    target = tmp_path / "governance.fms"
    target.write_text("agent a {}\n")
    if not hasattr(os, "chflags"):
        with pytest.raises(ImmutableUnsupported, match="chflags"):
            immutable.set_immutable_bsd(str(target), is_root=False)
        if not hasattr(os.lstat(target), "st_flags"):
            with pytest.raises(ImmutableUnsupported, match="st_flags"):
                immutable.is_set_bsd(str(target))
        return
    immutable.set_immutable_bsd(str(target), is_root=False)
    try:
        assert immutable.is_set_bsd(str(target))
        with pytest.raises(PermissionError):
            target.write_text("agent b {}\n")
    finally:
        immutable.clear_immutable_bsd(str(target), is_root=False)
    target.write_text("agent b {}\n")


# --- for real, on macOS ----------------------------------------------------------------------------------

@dataclass
class Stack:
    root: str
    spec: SandboxSpec
    tmpdir: str
    secret_dir: str
    python_paths: tuple[str, ...]


@pytest.fixture
def real_stack() -> Iterator[Stack]:
    # Under /tmp, not pytest's tmp_path: a Unix socket path must fit macOS's 104-byte sun_path. Resolved,
    # because Seatbelt sees /private/tmp/…, and the spec's paths must be the ones it sees.
    root = os.path.realpath(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))
    stack = f"{root}/stack"
    for d in (f"{stack}/workspace", f"{stack}/.faramesh", f"{root}/run/agents/a1", f"{root}/creds", f"{root}/tmp"):
        os.makedirs(d)
    for path, text in ((f"{stack}/governance.fms", "agent a {}\n"), (f"{stack}/.faramesh/policy.json", "{}"),
                       (f"{root}/creds/token", "s3cr3t\n"), (f"{stack}/workspace/in.txt", "hello\n")):
        with open(path, "w") as f:
            f.write(text)
    py = tuple(sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix,
                                                     os.path.dirname(os.path.realpath(sys.executable)))}))
    spec = make_spec(workspace=f"{stack}/workspace", stack_dir=stack, read_only_paths=py,
                     hidden_paths=(f"{stack}/.faramesh",), socket_dir=f"{root}/run/agents/a1", egress_port=None)
    try:
        yield Stack(root, spec, f"{root}/tmp", f"{root}/creds", py)
    finally:
        shutil.rmtree(root)


def _sandboxed(s: Stack, argv: list[str], *, spec: SandboxSpec | None = None) -> subprocess.CompletedProcess[str]:
    launch = macos.plan_launch(spec or s.spec, argv, tmpdir=s.tmpdir, host_env=dict(os.environ),
                               hidden=(f"{s.root}/run",), extra_credentials=(s.secret_dir,),
                               user_home=os.path.expanduser("~"))
    proc = macos.spawn(launch, spec or s.spec, as_root=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@macos_only
def test_sandbox_exec_accepts_the_profile(real_stack: Stack) -> None:
    assert os.access(macos.SANDBOX_EXEC, os.X_OK), "sandbox-exec is missing on this macOS"
    r = _sandboxed(real_stack, ["/usr/bin/true"])
    assert r.returncode == 0, r.stderr


@macos_only
def test_files_under_sandbox_exec(real_stack: Stack) -> None:
    s = real_stack
    ws, stack = s.spec.workspace, s.spec.stack_dir
    ok = _sandboxed(s, ["/bin/sh", "-c", f'cat in.txt && echo out > out.txt && echo t > "$TMPDIR/t" && '
                                          f'cat {stack}/governance.fms'])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello\nagent a {}\n"
    with open(f"{ws}/out.txt") as f:
        assert f.read() == "out\n"
    for denied in (f"echo x > {stack}/governance.fms", f"echo x > {stack}/new.txt",
                   f"cat {stack}/.faramesh/policy.json", f"cat {s.secret_dir}/token", f"ls {s.root}/run",
                   "echo x > /private/tmp/faramesh-escape-probe", f"chflags uchg {stack}/governance.fms"):
        r = _sandboxed(s, ["/bin/sh", "-c", denied])
        assert r.returncode != 0, denied
    with open(f"{stack}/governance.fms") as f:
        assert f.read() == "agent a {}\n"
    assert not os.path.exists(f"{stack}/new.txt") and not os.path.exists("/private/tmp/faramesh-escape-probe")


@macos_only
def test_config_uchg_cannot_be_cleared_from_inside(real_stack: Stack) -> None:
    s = real_stack
    fms = f"{s.spec.stack_dir}/governance.fms"
    immutable.set_immutable_bsd(fms, is_root=False)
    try:
        r = _sandboxed(s, ["/usr/bin/chflags", "nouchg", fms])
        assert r.returncode != 0 and immutable.is_set_bsd(fms)
    finally:
        immutable.clear_immutable_bsd(fms, is_root=False)


_CONNECT = """
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
s.settimeout(10)
try:
    s.connect(where if kind == "unix" else ("127.0.0.1", int(where)))
    print("connected")
except OSError as e:
    print("refused", e.errno)
"""


@macos_only
def test_network_under_sandbox_exec(real_stack: Stack) -> None:
    s = real_stack
    listeners: list[socket.socket] = []

    def serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # the listener was closed at the end of the test
            conn.close()

    def listen(sock: socket.socket) -> socket.socket:
        sock.listen(8)
        listeners.append(sock)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
        return sock

    proxy = listen(socket.create_server(("127.0.0.1", 0)))
    other = listen(socket.create_server(("127.0.0.1", 0)))
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(f"{s.root}/run/agents/a1/agent.sock")
    listen(engine)
    operator = socket.socket(socket.AF_UNIX)
    operator.bind(f"{s.root}/run/operator.sock")
    listen(operator)
    spec = s.spec.replace(egress_port=proxy.getsockname()[1])
    py = os.path.realpath(sys.executable)
    try:
        def probe(kind: str, where: str) -> str:
            r = _sandboxed(s, [py, "-I", "-S", "-c", _CONNECT, kind, where], spec=spec)
            assert r.returncode == 0, r.stderr
            return r.stdout.split()[0]

        assert probe("tcp", str(proxy.getsockname()[1])) == "connected"
        assert probe("tcp", str(other.getsockname()[1])) == "refused"
        assert probe("unix", f"{s.root}/run/agents/a1/agent.sock") == "connected"
        assert probe("unix", f"{s.root}/run/operator.sock") == "refused"
    finally:
        for sock in listeners:
            sock.close()


def test_one_shot_iterables_are_read_once() -> None:
    """Generators for the path options must give the same profile as tuples (no silently empty second read)."""
    launch = macos.plan_launch(make_spec(), ["true"], tmpdir=TMP, host_env={}, user_home=HOME,
                               hidden=(p for p in (STATE, RUNTIME)),
                               extra_credentials=(p for p in ("/opt/vault-agent",)),
                               system_paths=(p for p in macos.SYSTEM_READ_PATHS))
    assert launch.profile == profile_for(extra_credentials=("/opt/vault-agent",))
    assert launch.profile is not None and can(launch.profile, "/opt/vault-agent/token") == "----"
    assert can(launch.profile, f"/private{STATE}/keys") == "----"
