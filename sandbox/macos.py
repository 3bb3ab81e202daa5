"""macOS confinement (DESIGN.md §5): the SandboxSpec rendered as an SBPL profile and run by `sandbox-exec -p`.

macOS has no namespaces, seccomp or Landlock; its one per-process confinement a non-Apple program can
apply is Seatbelt, driven by a Scheme-like profile (SBPL). `build_profile()` is a pure function from the
spec (plus the few host facts it needs, passed in) to that profile's text:

- `(deny default)`, never `(allow default)`, and no `import` of Apple's profiles: every operation the
  agent may perform is spelled out here, so the profile can be checked by reading it;
- read (and exec) of the system paths, an allow-list of /private/etc, the stack dir and the read-only
  paths; read-write of the workspace and a private temporary directory (TMPDIR, and HOME unless given);
- the stack's `.faramesh/`, the spec's hidden paths (state, runtime and log dirs) and the invoking user's
  credential files are neither readable, writable nor executable; clearing `uchg` on the config is denied;
- network only to the local egress proxy port and the agent's engine socket.

The file-system view follows the Linux mount tree of mounts.build_root: the deepest zone containing a path
decides (read-only inside read-write inside read-only…), and a hidden path masks everything below it.
Seatbelt's rule precedence has been described both as first-match and as last-match; the profile does not
depend on it: every allow rule carves out (`require-not`) what it must not cover, so no allow and deny ever
match the same request, and the explicit deny rules only restate what `(deny default)` already decides.

Seatbelt matches resolved paths: /tmp, /var and /etc are symlinks into /private, so every path under them is
emitted under both names. Other symlinks are not resolved here (that would be I/O); the supervisor creates
the paths it names and passes them resolved.

Strings are SBPL (Scheme) string literals: backslash and double quote are escaped and control characters
are refused, so a hostile workspace name can only ever be one string. Nothing from the spec is placed in a
regex or a comment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from faramesh.sandbox import credentials
from faramesh.sandbox.errors import SandboxError, SpecError
from faramesh.sandbox.mounts import STACK_HIDDEN, STACK_READ_ONLY
from faramesh.sandbox.spec import SandboxSpec

SANDBOX_EXEC = "/usr/bin/sandbox-exec"
# The name of the engine socket inside the agent's socket directory (DESIGN.md §2).
AGENT_SOCKET_NAME = "agent.sock"

# Read and exec. Not /System whole: /System/Volumes/Data is the data volume, users' homes included.
SYSTEM_READ_PATHS: tuple[str, ...] = (
    "/usr", "/bin", "/sbin",
    "/System/Library", "/System/Cryptexes", "/System/Volumes/Preboot/Cryptexes",  # dyld cache, cryptexes
    "/Library/Apple", "/Library/Frameworks", "/Library/Developer/CommandLineTools",  # python.org, CLT
    "/opt/homebrew", "/opt/local",  # Homebrew on arm64, MacPorts
    "/private/var/db/timezone",  # /etc/localtime points here
    "/private/var/select",  # /bin/sh execs /private/var/select/sh
    "/private/var/db/xcode_select_link",  # the /usr/bin developer-tool shims resolve through it
    "/private/var/db/dyld",  # the dyld shared cache before macOS 11
)
# Like mounts.ETC_ALLOW: what programs need from /etc, and nothing an administrator left world-readable.
ETC_ALLOW: tuple[str, ...] = (
    "bashrc", "group", "hosts", "localtime", "passwd", "paths", "paths.d", "profile", "protocols", "services",
    "shells", "ssl", "zprofile", "zshenv", "zshrc",
)
DEVICES_READ_WRITE: tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/fd", "/dev/ptmx")
DEVICES_READ_ONLY: tuple[str, ...] = ("/dev/random", "/dev/urandom")
# Under the invoking user's home; hidden even when a read-only path would expose them.
CREDENTIAL_HOME_PATHS: tuple[str, ...] = (
    ".ssh", ".aws", ".azure", ".config/gcloud", ".config/gh", ".kube", ".docker", ".gnupg", ".netrc", ".npmrc",
    ".pypirc", ".git-credentials", ".vault-token", ".password-store", "Library/Keychains", "Library/Cookies",
)
CREDENTIAL_SYSTEM_PATHS: tuple[str, ...] = (
    "/Library/Keychains", "/private/var/root", "/private/etc/master.passwd", "/private/etc/sudoers",
)
# sysctl names a libc, a language runtime or `uname` reads. Not kern.proc.all and friends: the agent has no
# business listing the host's processes (on Linux it sees only its own PID namespace).
SYSCTL_PREFIXES: tuple[str, ...] = ("hw.", "machdep.cpu.", "kern.os", "kern.proc.pid.", "kern.proc.pgrp.")
SYSCTL_NAMES: tuple[str, ...] = (
    "kern.argmax", "kern.boottime", "kern.hostname", "kern.maxfiles", "kern.maxfilesperproc", "kern.maxproc",
    "kern.ngroups", "kern.secure_kernel", "kern.usrstack64", "kern.version", "sysctl.proc_cputype", "vm.loadavg",
)
# getpwuid() and friends go through this service; without it `id`, `~user` and getpass.getuser() fail.
MACH_SERVICES: tuple[str, ...] = ("com.apple.system.opendirectoryd.libinfo",)
# Terminals the agent opens through /dev/ptmx carry this sandbox extension; the host's own terminals do
# not, so the agent cannot ioctl (TIOCSTI) into the terminal it was started from.
PTY_EXTENSION = "com.apple.sandbox.pty"
PTY_REGEX = "^/dev/ttys[0-9]+$"

_PRIVATE_ALIASES = ("/tmp", "/var", "/etc")

Mode = Literal["ro", "rw"]


class MacProfileError(SpecError):
    """A path (or option) cannot be expressed safely in an SBPL profile."""

    code = "SANDBOX_MACOS_PROFILE_INVALID"


class MacSandboxUnavailable(SandboxError):
    """sandbox-exec cannot run here (not macOS, or the binary is missing)."""

    code = "SANDBOX_MACOS_UNAVAILABLE"


# --- s-expressions -------------------------------------------------------------------------------------

class Sym(str):
    """A bare SBPL symbol. Only ever built from this module's constants, never from spec data."""


class Regex(str):
    """An SBPL regex literal `#"…"`. Only ever built from this module's constants."""


Expr = str | tuple["Expr", ...]


def quote(text: str) -> str:
    """An SBPL string literal for `text`: backslash and double quote escaped, control characters refused.

    NUL would cut the path short for the kernel (a C string), and no path we name needs a newline or
    another control character; rather than rely on the profile compiler's handling of them, they are
    not representable at all.
    """
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise MacProfileError(f"{text!r} contains a control character ({ord(ch):#04x}); refusing it in SBPL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MacProfileError(f"{text!r} is not valid UTF-8 (an undecodable file name)") from None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(expr: Expr) -> str:
    """One line of SBPL for `expr`."""
    if isinstance(expr, Sym):
        return str(expr)
    if isinstance(expr, Regex):
        return "#" + quote(expr)
    if isinstance(expr, str):
        return quote(expr)
    return "(" + " ".join(render(e) for e in expr) + ")"


def _render_rule(rule: tuple[Expr, ...]) -> str:
    """A top-level rule: the action and its operations on one line, each filter on its own line."""
    head = [e for e in rule if isinstance(e, str)]
    filters = [e for e in rule if not isinstance(e, str)]
    text = "(" + " ".join(render(e) for e in head)
    if len(filters) <= 1:
        return text + "".join(" " + render(f) for f in filters) + ")"
    return text + "".join("\n  " + render(f) for f in filters) + ")"


def _rule(action: str, ops: Sequence[str], filters: Iterable[Expr] = (), *,
          unfiltered: bool = False) -> tuple[Expr, ...]:
    """A rule; one meant to be filtered but left without filters would apply to everything: refuse it."""
    filters = tuple(filters)
    if not filters and not unfiltered:
        raise SandboxError(f"internal error: ({action} {' '.join(ops)}) lost its filters")
    return (Sym(action), *(Sym(op) for op in ops), *filters)


# --- paths ---------------------------------------------------------------------------------------------

def _check_path(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise MacProfileError(f"{what} must be a string, not {type(path).__name__}")
    quote(path)  # control characters and undecodable names are refused before anything else looks at it
    stripped = path.rstrip("/")
    if not path.startswith("/") or os.path.normpath(stripped or "/") != stripped or not stripped:
        raise MacProfileError(f"{what} {path!r} must be absolute, normalised and not /")
    return stripped


def twins(path: str) -> tuple[str, ...]:
    """`path` and, under /tmp, /var or /etc, the /private path Seatbelt actually sees."""
    for alias in _PRIVATE_ALIASES:
        if path == alias or path.startswith(alias + "/"):
            return (path, "/private" + path)
    return (path,)


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or below it (by components: /ab is not under /a)."""
    return path == root or path.startswith(root + "/")


def ancestors(path: str) -> list[str]:
    """The directories above `path`, from / down."""
    parts = path.strip("/").split("/")[:-1]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def credential_paths(user_home: str | None) -> tuple[str, ...]:
    """The credential files and stores to hide: the system's, and those in `user_home` when given."""
    home = [] if user_home is None else [f"{_check_path(user_home, 'user home')}/{p}" for p in CREDENTIAL_HOME_PATHS]
    return (*CREDENTIAL_SYSTEM_PATHS, *home)


@dataclass(frozen=True)
class _Zone:
    path: str
    mode: Mode
    # Breaks ties between zones at the same path, in the order mounts.build_root binds them: system,
    # stack, workspace (so a workspace that *is* the stack dir is writable), then the extra read-only
    # paths and the stack floor (so they re-protect what the workspace opened).
    rank: int


@dataclass
class _Layout:
    zones: list[_Zone] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)

    def add(self, path: str, mode: Mode, rank: int) -> None:
        for p in twins(path):
            self.zones.append(_Zone(p, mode, rank))

    def hide(self, path: str) -> None:
        self.hidden.extend(twins(path))

    def masked(self, path: str) -> bool:
        return any(is_under(path, h) for h in self.hidden)

    def mode(self, path: str) -> Mode | None:
        """What the agent may do at `path`: the deepest zone decides; a hidden path masks its subtree."""
        if self.masked(path):
            return None
        best: tuple[int, int, Mode] | None = None
        for z in self.zones:
            if is_under(path, z.path):
                key = (z.path.count("/"), z.rank, z.mode)
                if best is None or key[:2] > best[:2]:
                    best = key
        return best[2] if best is not None else None


def _outermost(paths: Iterable[str]) -> list[str]:
    """Sorted, without duplicates and without any path below another one of the set."""
    out: list[str] = []
    for p in sorted(set(paths), key=lambda x: (x.count("/"), x)):
        if not any(is_under(p, q) for q in out):
            out.append(p)
    return sorted(out)


def _carve(root: str, holes: Iterable[str], kind: str = "subpath") -> Expr:
    """`(subpath root)` minus the holes: `(require-all (subpath root) (require-not (… hole)) …)`."""
    holes = sorted(set(holes))
    if not holes:
        return (Sym("subpath"), root)
    return (Sym("require-all"), (Sym("subpath"), root), *((Sym("require-not"), (Sym(kind), h)) for h in holes))


# --- the profile ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileInputs:
    """Everything besides the spec that the profile depends on (host facts are passed in, not looked up)."""

    tmpdir: str
    home: str
    hidden: tuple[str, ...]
    credentials: tuple[str, ...]
    system_paths: tuple[str, ...]
    engine_socket: str | None


def _inputs(spec: SandboxSpec, tmpdir: str, home: str | None, hidden: Iterable[str], user_home: str | None,
            extra_credentials: Iterable[str], system_paths: Iterable[str], engine_socket: str | None) -> ProfileInputs:
    if not isinstance(spec, SandboxSpec):
        raise MacProfileError(f"expected a SandboxSpec, not {type(spec).__name__}")
    tmp = _check_path(tmpdir, "private temporary directory")
    if engine_socket is None and spec.socket_dir is not None:
        engine_socket = f"{spec.socket_dir.rstrip('/')}/{AGENT_SOCKET_NAME}"
    return ProfileInputs(
        tmpdir=tmp,
        home=_check_path(home, "home") if home is not None else tmp,
        hidden=tuple(_check_path(p, "hidden path") for p in hidden),
        credentials=tuple(_check_path(p, "credential path")
                          for p in (*credential_paths(user_home), *extra_credentials)),
        system_paths=tuple(_check_path(p, "system path") for p in system_paths),
        engine_socket=_check_path(engine_socket, "engine socket") if engine_socket is not None else None,
    )


def _layout(spec: SandboxSpec, inp: ProfileInputs) -> _Layout:
    workspace = _check_path(spec.workspace, "workspace")
    stack = _check_path(spec.stack_dir, "stack dir")
    lay = _Layout()
    for p in inp.system_paths:
        lay.add(p, "ro", 0)
    for name in ETC_ALLOW:
        lay.add("/private/etc/" + name, "ro", 0)
    for p in DEVICES_READ_ONLY:
        lay.add(p, "ro", 0)
    for p in DEVICES_READ_WRITE:
        lay.add(p, "rw", 0)
    lay.add(stack, "ro", 1)
    lay.add(workspace, "rw", 2)
    lay.add(inp.tmpdir, "rw", 2)
    lay.add(inp.home, "rw", 2)
    ro = [_check_path(p, "read-only path") for p in spec.read_only_paths]
    if is_under(stack, workspace):  # mounts.build_root's floor: the config stays read-only in a writable stack
        ro += [f"{stack}/{name}" for name in STACK_READ_ONLY]
    for p in ro:
        lay.add(p, "ro", 3)
    for p in (*(_check_path(h, "hidden path") for h in spec.hidden_paths), *inp.hidden, *inp.credentials,
              *(f"{stack}/{name}" for name in STACK_HIDDEN)):
        lay.hide(p)
    for what, p in (("workspace", workspace), ("private temporary directory", inp.tmpdir), ("home", inp.home)):
        if lay.masked(p):
            raise MacProfileError(f"the {what} {p} lies inside a hidden or credential path")
        if lay.mode(p) != "rw":
            raise MacProfileError(f"the {what} {p} lies inside a read-only path")
    return lay


def build_profile(
    spec: SandboxSpec,
    *,
    tmpdir: str,
    home: str | None = None,
    hidden: Iterable[str] = (),
    user_home: str | None = None,
    extra_credentials: Iterable[str] = (),
    system_paths: Iterable[str] = SYSTEM_READ_PATHS,
    engine_socket: str | None = None,
) -> str:
    """The SBPL profile confining the agent of `spec` (a pure function: no file is looked at).

    `tmpdir` is the agent's private temporary directory (TMPDIR; also HOME unless `home` is given), made
    by the caller and owned by the agent. `hidden` adds paths the agent must not see at all (the stack's
    state, runtime and log dirs). `user_home` is the invoking user's home, whose credential files are
    hidden (`extra_credentials` adds more). `engine_socket` defaults to `<socket_dir>/agent.sock`.
    """
    return _build(spec, _inputs(spec, tmpdir, home, hidden, user_home, extra_credentials, system_paths,
                                engine_socket))


def _build(spec: SandboxSpec, inp: ProfileInputs) -> str:
    lay = _layout(spec, inp)
    hidden_roots = _outermost(lay.hidden)
    live = [z for z in lay.zones if not lay.masked(z.path)]

    # Read (and exec): every visible zone, minus the hidden paths below it.
    read_roots = _outermost(z.path for z in live)
    read_filters = [_carve(r, (h for h in hidden_roots if is_under(h, r))) for r in read_roots]
    # Write: each read-write zone that wins at its own path, minus whatever below it is not read-write.
    write_filters: list[Expr] = []
    for w in sorted({z.path for z in live if z.mode == "rw" and lay.mode(z.path) == "rw"}):
        below = {z.path for z in lay.zones if z.path != w and is_under(z.path, w) and lay.mode(z.path) != "rw"}
        below.update(h for h in hidden_roots if h != w and is_under(h, w))
        write_filters.append(_carve(w, _outermost(below)))
    # Metadata of the directories leading to each zone and to the engine socket (stat, realpath, getcwd).
    sockets = twins(inp.engine_socket) if inp.engine_socket is not None else ()
    pinholes = {a for z in live for a in ancestors(z.path)}
    pinholes.update(a for s in sockets for a in (*ancestors(s), s))
    pinholes = {p for p in pinholes if lay.mode(p) is None}

    rules: list[tuple[Expr, ...]] = [
        _rule("allow", ["process-fork"], unfiltered=True),
        _rule("allow", ["signal"], [(Sym("target"), Sym("same-sandbox"))]),
        _rule("allow", ["process-info*"], [(Sym("target"), Sym("same-sandbox"))]),
        _rule("allow", ["sysctl-read"], [*((Sym("sysctl-name-prefix"), p) for p in SYSCTL_PREFIXES),
                                         *((Sym("sysctl-name"), n) for n in SYSCTL_NAMES)]),
        _rule("allow", ["mach-lookup"], [(Sym("global-name"), n) for n in MACH_SERVICES]),
        _rule("allow", ["ipc-posix-sem"], unfiltered=True),  # multiprocessing's SemLock
        _rule("allow", ["ipc-posix-shm"], unfiltered=True),
        _rule("allow", ["file-read*", "process-exec"], read_filters),
        _rule("allow", ["file-write*"], write_filters),
    ]
    if pinholes:
        rules.append(_rule("allow", ["file-read-metadata"], [(Sym("literal"), p) for p in sorted(pinholes)]))
    pty = (Sym("require-all"), (Sym("regex"), Regex(PTY_REGEX)), (Sym("extension"), PTY_EXTENSION))
    rules += [
        _rule("allow", ["pseudo-tty"], unfiltered=True),
        _rule("allow", ["file-read*", "file-write*"], [pty]),
        _rule("allow", ["file-ioctl"], [(Sym("literal"), "/dev/ptmx"), pty]),
    ]
    net: list[Expr] = []
    if spec.egress_port is not None:
        net.append((Sym("remote"), Sym("tcp"), f"localhost:{int(spec.egress_port)}"))
    net += [(Sym("remote"), Sym("unix-socket"), (Sym("path-literal"), s)) for s in sockets]
    if net:
        rules.append(_rule("allow", ["network-outbound"], net))
    # Restated denies (see the module doc: no allow above matches these).
    rules.append(_rule("deny", ["file-read*", "file-write*", "process-exec"],
                       [_carve(h, (p for p in pinholes if is_under(p, h)), "literal") for h in hidden_roots]))
    config = [p for name in ("governance.fms", *STACK_HIDDEN)
              for p in twins(f"{_check_path(spec.stack_dir, 'stack dir')}/{name}")]
    rules.append(_rule("deny", ["file-write-flags"], [(Sym("subpath"), p) for p in config]))

    lines = ["(version 1)", "(deny default)"]
    lines += [_render_rule(r) for r in rules]
    return "\n".join(lines) + "\n"


# --- the launch ----------------------------------------------------------------------------------------

def sandbox_exec_argv(profile: str, argv: Sequence[str]) -> list[str]:
    """`sandbox-exec -p PROFILE -- argv…` (the `--` keeps an argv[0] such as `-f` from being an option)."""
    if not argv:
        raise SpecError("empty command")
    for arg in (profile, *argv):
        if "\0" in arg:
            raise SpecError("an argument contains NUL (execve cannot carry it)")
    return [SANDBOX_EXEC, "-p", profile, "--", *argv]


@dataclass(frozen=True)
class MacLaunch:
    """What to exec for one agent: argv (through sandbox-exec unless the profile is off), environment, cwd."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    profile: str | None
    report: tuple[str, ...]


def plan_launch(
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    tmpdir: str,
    host_env: Mapping[str, str],
    as_root: bool = False,
    home: str | None = None,
    hidden: Iterable[str] = (),
    user_home: str | None = None,
    extra_credentials: Iterable[str] = (),
    system_paths: Iterable[str] = SYSTEM_READ_PATHS,
    engine_socket: str | None = None,
) -> MacLaunch:
    """The agent's confined command, environment and report (pure: nothing is executed or read)."""
    if not argv:
        raise SpecError("empty command")
    inp = _inputs(spec, tmpdir, home, hidden, user_home, extra_credentials, system_paths, engine_socket)
    extra = {"FARAMESH_AGENT_ID": spec.agent_id, "TMPDIR": inp.tmpdir + "/"}
    if spec.egress_port is not None:
        extra["FARAMESH_PROXY_PORT"] = str(spec.egress_port)
    if inp.engine_socket is not None:
        # No mount namespace: the agent reaches its socket at the host path, not /run/faramesh.
        extra["FARAMESH_SOCKET"] = inp.engine_socket
    env = credentials.agent_environment(host_env, spec.env_allow, spec.env_deny_globs, extra=extra, home=inp.home)
    report = [f"faramesh sandbox (macOS): agent {spec.agent_id}, profile {spec.profile}",
              f"  applied: environment from the allow-list ({len(env)} variables), HOME={inp.home},"
              f" TMPDIR={inp.tmpdir}/"]
    if as_root:
        report.append(f"  applied: host uid/gid {spec.host_uid}/{spec.host_gid}, no supplementary groups")
    else:
        report.append("  NOT applied: uid separation (unprivileged launcher: the agent runs as the invoking uid)")
    report.append("  NOT applied: namespaces, seccomp, Landlock, cgroups (Linux mechanisms)")
    if spec.profile == "off":
        report.insert(1, "  !!! PROFILE OFF: NO OS CONFINEMENT — credential stripping only !!!")
        return MacLaunch(tuple(argv), env, spec.workspace, None, tuple(report))
    profile = _build(spec, inp)  # from the inputs validated above: iterables given to us are read only once
    report.insert(1, f"  applied: sandbox-exec SBPL profile, deny default ({profile.count(chr(10)) + 1} lines):"
                     " generated and structurally checked")
    if spec.profile == "minimal":
        report.append("  note: profile minimal uses the same SBPL profile as full on macOS")
    return MacLaunch(tuple(sandbox_exec_argv(profile, argv)), env, spec.workspace, profile, tuple(report))


def create_private_tmp(parent: str, agent_id: str, uid: int, gid: int, *, as_root: bool) -> str:
    """A fresh 0700 directory for the agent's TMPDIR/HOME, given to the agent's ids when we are root."""
    path = tempfile.mkdtemp(prefix=f"faramesh-{agent_id}-", dir=parent)
    if as_root:
        # mkdtemp made the leaf itself, so it is not a planted symlink; lchown keeps that true.
        os.chown(path, uid, gid, follow_symlinks=False)
    return path


def spawn(launch: MacLaunch, spec: SandboxSpec, *, as_root: bool, **popen: object) -> subprocess.Popen[bytes]:
    """Start the planned command (macOS only). As root, the agent gets the spec's uid/gid before exec.

    A new session, like the Linux launcher's setsid: the agent has no controlling terminal of ours.
    """
    if sys.platform != "darwin":
        raise MacSandboxUnavailable(f"sandbox-exec exists only on macOS (this is {sys.platform})")
    if launch.profile is not None and not os.access(SANDBOX_EXEC, os.X_OK):
        raise MacSandboxUnavailable(f"{SANDBOX_EXEC} is missing or not executable")
    ids: dict[str, object] = {}
    if as_root:
        ids = {"user": spec.host_uid, "group": spec.host_gid, "extra_groups": []}
    return subprocess.Popen(
        list(launch.argv), env=dict(launch.env), cwd=launch.cwd, start_new_session=True, close_fds=True,
        **ids, **popen,
    )
