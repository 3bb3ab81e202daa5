"""The launch sequence of DESIGN.md §5, by one code path: C1 (R1–R3, S1–S4) → C2 = PID 1 (S5–S10) → C3.

    launch(spec, argv, landlock_rules=None, report_fd=None) -> exit status of the agent

As root, C1 (the calling process: the zygote's child, or the `agent_exec` launcher) runs R1 (cgroup,
rlimits, oom_score_adj), R2 (workspace/stack checks with no-follow opens) and R3 (uid/gid switch) before
S1; unprivileged it starts at S1 with its own ids. C1 forks C2 after the namespaces exist (a new PID
namespace applies to the unsharer's *children* only), C2 becomes the sandbox's init, confines itself and
forks C3, which execs the agent. C2 stays init: it reaps orphans, forwards SIGINT/SIGTERM to C3's process
group and exits with C3's status, which ends the PID namespace and with it every descendant.

No thread exists in C1 or C2 (unshare(CLONE_NEWUSER) fails in a threaded process, a seccomp filter binds
one thread). Failures before exec are typed SandboxErrors: C2 sends its error to C1 over a close-on-exec
pipe and C1 raises it; the agent never runs unconfined. Every launch writes an enforcement report (what
was applied, what was not and why) to `report_fd` or stderr.

Out of scope here (reported as "not applied"): the egress listener hand-off of S3 (SCM_RIGHTS to the
supervisor). The agent gets no controlling terminal (C2 calls setsid); the launcher gives an
interactive agent a pty of its own (launchers/pty_relay.py). The user-notification violation filter
runs when the caller hands `notify_fd` (the supervisor does).

Per-launch imports: os, ctypes, struct, errno, stat, _signal, _json and the sandbox modules (all imported
here, before S5 hides the host tree: nothing may be imported lazily once the root has changed). The
heavier modules (json, base64, contextlib, the enum-based signal) stay off the launch path:
`json` only for spec_to_json at `apply` and for a spec the fast `_json` scanner rejects (error path, in
C1 before any step), and the C2 → C1 status pipe carries length-prefixed `marshal` records.
"""

from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # the C module: `signal` itself imports enum (≈4 ms per launch)
import binascii
import errno
import marshal
import os
import stat
import sys

from faramesh.sandbox import caps, cgroups, credentials, errors, landlock, mounts, namespaces, seccomp
from faramesh.sandbox.errors import SandboxError
from faramesh.sandbox.spec import BPF_FIELDS, FIELD_NAMES, SandboxSpec

try:
    from _json import make_scanner as _c_make_scanner
except ImportError:  # pragma: no cover - CPython always has _json
    _c_make_scanner = None  # type: ignore[misc,assignment]
_make_scanner: Any = _c_make_scanner

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

# Exit status C2 uses when it failed before exec (the real cause travels over the status pipe).
SETUP_FAILED = 125
EXEC_FAILED = 127

_SPEC_FIELDS = tuple(name for name in FIELD_NAMES if name not in BPF_FIELDS)


class LayoutError(SandboxError):
    """R2: the workspace or stack layout is unsafe (a symlink on the path, wrong owner, not a directory)."""

    code = "SANDBOX_LAYOUT_INVALID"


# --- spec (de)serialisation ----------------------------------------------------------------------------

def spec_to_json(spec: SandboxSpec) -> str:
    """The spec as JSON; each BPF program base64-encoded under `<field>_b64`."""
    import json  # apply time only

    d: dict[str, Any] = {name: getattr(spec, name) for name in _SPEC_FIELDS}
    for name in BPF_FIELDS:
        d[f"{name}_b64"] = binascii.b2a_base64(getattr(spec, name), newline=False).decode("ascii")
    return json.dumps(d, sort_keys=True)


class _ScanContext:
    """What json.decoder.JSONDecoder hands _json.make_scanner, with json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant: Any = None  # set below (json's: -Infinity, Infinity, NaN)


_ScanContext.parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__
_JSON_WS = " \t\n\r"


def _loads(text: str | bytes) -> object:
    """json.loads without importing json (which imports re): the C scanner json.loads itself uses.

    Anything the fast path does not take as-is (non-UTF-8 bytes, a BOM, trailing data, a syntax error)
    goes to the real json.loads, which accepts or rejects it with its own message."""
    if _make_scanner is not None:
        try:
            s = text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text
            if isinstance(s, str) and not s.startswith("\ufeff"):
                start = len(s) - len(s.lstrip(_JSON_WS))
                obj, end = _make_scanner(_ScanContext)(s, start)
                if not s[end:].strip(_JSON_WS):
                    return obj
        except (ValueError, StopIteration):
            pass
    import json  # the error path (or a spec in UTF-16/32): json decides

    return json.loads(text)


def spec_from_json(text: str | bytes) -> SandboxSpec:
    """Inverse of spec_to_json; validates through SandboxSpec (unknown fields → SpecError)."""
    try:
        d = _loads(text)
    except ValueError as e:
        raise errors.SpecError(f"spec is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise errors.SpecError("spec must be a JSON object")
    unknown = set(d) - set(_SPEC_FIELDS) - {f"{name}_b64" for name in BPF_FIELDS}
    if unknown:
        raise errors.SpecError(f"unknown spec fields: {sorted(unknown)}")
    kw: dict[str, Any] = {}
    for name in _SPEC_FIELDS:
        if name not in d:
            continue
        value = d[name]
        if name in ("read_only_paths", "hidden_paths", "env_allow", "env_deny_globs", "keep_fds"):
            value = tuple(value)
        elif name == "rlimits":
            value = tuple(tuple(r) for r in value)
        kw[name] = value
    for name in BPF_FIELDS:
        b64 = d.get(f"{name}_b64", "")
        try:
            # strict_mode: only the base64 alphabet with correct padding (base64.b64decode(validate=True)
            # without importing base64 and re).
            kw[name] = binascii.a2b_base64(b64, strict_mode=True) if b64 else b""
        except (ValueError, TypeError):
            raise errors.SpecError(f"{name}_b64 is not base64") from None
    try:
        return SandboxSpec(**kw)
    except TypeError as e:
        raise errors.SpecError(f"spec: {e}") from None


def build_spec(profile: str, agent_id: str, host_uid: int, host_gid: int, workspace: str, stack_dir: str,
               **kw: Any) -> SandboxSpec:
    """Build a spec at `apply` time, compiling the profile's seccomp BPF (pyseccomp, not per launch)."""
    if profile == "off" or sys.platform == "darwin":  # macOS confines with sandbox-exec (sandbox/macos.py)
        bpfs = {"seccomp_bpf": b""}
    else:
        bpfs = {"seccomp_bpf": seccomp.build_filter(profile),
                "seccomp_notify_bpf": seccomp.build_filter(profile, notify_calls=True),
                "seccomp_listener_bpf": seccomp.violation_notify_filter(profile)}
    return SandboxSpec(profile=profile, agent_id=agent_id, host_uid=host_uid,
                       host_gid=host_gid, workspace=workspace, stack_dir=stack_dir, **bpfs, **kw)


def default_landlock_rules(spec: SandboxSpec) -> dict[str, list[str]]:
    """Landlock rules matching the tree build_root() makes: everything else (/, /run, /home) is denied."""
    ro = [spec.stack_dir, "/proc"]
    if spec.socket_dir is not None:
        ro.append(mounts.SOCKET_MOUNTPOINT)
    return {
        "read_only": ro,
        "read_exec": ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"],
        "read_write": [spec.workspace, "/tmp", "/var/tmp", spec.home, "/dev"],
    }


# --- the report ----------------------------------------------------------------------------------------

class _Report:
    def __init__(self, spec: SandboxSpec, out_fd: int) -> None:
        self.spec = spec
        self.out_fd = out_fd
        self.applied: list[str] = []
        self.missing: list[str] = []

    def ok(self, what: str) -> None:
        self.applied.append(what)

    def no(self, what: str) -> None:
        self.missing.append(what)

    def render(self, outcome: str) -> str:
        lines = [f"faramesh sandbox: agent {self.spec.agent_id}, profile {self.spec.profile}: {outcome}"]
        if self.spec.profile == "off":
            lines.append("  !!! PROFILE OFF: NO OS CONFINEMENT — credential stripping only !!!")
        lines += [f"  applied: {a}" for a in self.applied]
        lines += [f"  NOT applied: {m}" for m in self.missing]
        return "\n".join(lines) + "\n"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def _send(fd: int, msg: dict[str, Any]) -> None:
    """One status record C2 → C1: a 4-byte length, then the marshalled dict (str/int/list/None only)."""
    data = marshal.dumps(msg)
    _write_all(fd, len(data).to_bytes(4, "little") + data)


# --- R2 ------------------------------------------------------------------------------------------------

def _open_nofollow_dir(path: str) -> int:
    """Walk `path` from / one component at a time with O_NOFOLLOW on a directory fd (no symlink anywhere)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.strip("/").split("/"):
            try:
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise LayoutError(f"{path}: component {part!r}", errno=e.errno) from None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_layout(spec: SandboxSpec, agent_uid: int) -> None:
    """R2: workspace and stack dir are real directories reached without a symlink; the workspace is the
    agent's (as root: owned by its uid); the stack dir is not writable by the agent unless it *is* the
    workspace."""
    ws = _open_nofollow_dir(spec.workspace)
    try:
        st = os.fstat(ws)
        if not stat.S_ISDIR(st.st_mode):
            raise LayoutError(f"workspace {spec.workspace} is not a directory", errno=errno.ENOTDIR)
        if st.st_uid != agent_uid:
            raise LayoutError(f"workspace {spec.workspace} is owned by uid {st.st_uid}, not the agent's {agent_uid}")
    finally:
        os.close(ws)
    sd = _open_nofollow_dir(spec.stack_dir)
    os.close(sd)


# --- signals -------------------------------------------------------------------------------------------

_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _forward_to(target: int, group: bool) -> None:
    def handler(signum: int, _frame: object) -> None:
        try:
            if group:
                os.killpg(target, signum)
            else:
                os.kill(target, signum)
        except ProcessLookupError:
            pass

    for s in _FORWARD:
        signal.signal(s, handler)


def _status_to_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# --- C2 / C3 -------------------------------------------------------------------------------------------

def _send_listener(notify_fd: int, listener: int) -> None:
    """The violation filter's listener to the supervisor (SCM_RIGHTS on the socket it handed the launch).
    `_socket` (not `socket`, which imports enum and selectors) was imported by _launch, before S5."""
    import _socket

    sock = _socket.socket(fileno=notify_fd)
    try:
        sock.sendmsg([b"L"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, listener.to_bytes(4, "little"))])
    finally:
        sock.detach()


def _connect_intake(path: str) -> Any:
    """C1, still the launching user (R3 has not run): a connection to the engine's egress intake, which
    checks that uid. None when no engine listens (the sandbox then keeps an empty network)."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    sock.settimeout(5.0)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _hand_over_listener(intake: Any, agent_id: str, port: int) -> str | None:
    """S3, in the new network namespace: a listener on 127.0.0.1:port, sent to the engine's proxy (SCM_RIGHTS)
    and closed here — no process of the sandbox holds it, relays traffic or can rebind the port. Returns
    None once the engine took it, else why not."""
    import _socket

    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen(512)
        message = b'{"agent_id":"' + agent_id.encode() + b'"}'  # an agent id is [A-Za-z0-9._-]: nothing to escape
        fds = listener.fileno().to_bytes(4, "little")
        intake.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        reply = _loads(intake.recv(4096))
    except (OSError, ValueError) as e:
        return f"the engine's egress intake failed: {e}"
    finally:
        listener.close()
    if isinstance(reply, dict) and reply.get("ok"):
        return None
    return f"the engine refused the listener: {reply.get('error') if isinstance(reply, dict) else reply!r}"


def _load_seccomp(spec: SandboxSpec, notify_fd: int | None, info: dict[str, Any]) -> None:
    """S8. With a supervisor socket: the profile's filter minus the reported calls, plus the
    user-notification filter for those, whose listener goes to the supervisor and is closed here before
    C3 exists — the agent must never hold it (answering its own notifications with CONTINUE would run
    them). Without one (the launcher): the plain filter, the same calls failing with EPERM unreported.
    If the supervisor is gone, a reported call fails with ENOSYS: the kernel never executes it."""
    if notify_fd is not None and spec.seccomp_listener_bpf:
        seccomp.load_filter(spec.seccomp_notify_bpf)
        listener = seccomp.load_filter(spec.seccomp_listener_bpf, new_listener=True)
        assert listener is not None
        try:
            _send_listener(notify_fd, listener)
            sent = True
        except OSError:
            sent = False
        os.close(listener)
        os.close(notify_fd)
        n = (len(spec.seccomp_notify_bpf) + len(spec.seccomp_listener_bpf)) // 8
        info["applied"].append(f"S8 seccomp {spec.profile} filter ({n} BPF instructions), reported calls"
                               " answered EPERM by the supervisor")
        if not sent:
            info["missing"].append("seccomp violation reports: the supervisor's socket is gone (calls fail ENOSYS)")
        return
    seccomp.load_filter(spec.seccomp_bpf)
    info["applied"].append(f"S8 seccomp {spec.profile} filter ({len(spec.seccomp_bpf) // 8} BPF instructions)")
    info["missing"].append("seccomp violation reports (launcher: no supervisor to report to; calls fail EPERM)")


def _c2(spec: SandboxSpec, argv: Sequence[str], env: dict[str, str], rules: Mapping[str, Sequence[str]] | None,
        status_w: int, alive_r: int, notify_fd: int | None) -> int:
    """PID 1 of the sandbox. Returns only on failure before C3 exists (the caller _exits with SETUP_FAILED)."""
    info: dict[str, Any] = {"applied": [], "missing": []}
    # Death signal tied to C1 first: if C1 dies from here on, C2 (and with it the PID namespace) dies.
    # getppid() is 0 for PID 1 (the parent is outside the namespace), so liveness is checked on a pipe
    # whose write end only C1 holds: EOF means C1 is already gone.
    caps.set_pdeathsig(signal.SIGKILL)
    os.set_blocking(alive_r, False)
    try:
        if os.read(alive_r, 1) == b"":
            raise errors.CapsError("C1 died before PR_SET_PDEATHSIG")
    except BlockingIOError:
        pass
    os.close(alive_r)

    full = spec.profile == "full"
    # S5: the new root, pivot, hostname.
    mounts.build_root(spec)
    namespaces.sethostname(spec.hostname)
    info["applied"].append("S5 new root (allow-listed binds, private /tmp /home $HOME, fresh /proc), pivot_root")
    # S6: Landlock (on paths of the final tree).
    if full:
        r = rules if rules is not None else default_landlock_rules(spec)
        ll = landlock.restrict(read_only=r.get("read_only", ()), read_write=r.get("read_write", ()),
                               read_exec=r.get("read_exec", ()), missing_ok=True)
        info["applied"].append(f"S6 Landlock ABI {ll['abi']} (fs rights {ll['handled_fs']:#x},"
                               f" scoped {ll['scoped']:#x})")
        if ll["abi"] < 6:
            info["missing"].append(f"Landlock signal/abstract-socket scoping (kernel ABI {ll['abi']} < 6)")
    else:
        info["missing"].append("S6 Landlock (profile minimal)")
    # S7: capabilities, no_new_privs, dumpable, new session (no controlling tty of the caller).
    caps.drop_all()
    caps.set_no_new_privs()
    caps.set_dumpable(False)
    os.setsid()
    info["applied"].append("S7 securebits locked, all capability sets empty, no_new_privs, dumpable 0, setsid"
                           " (no controlling terminal), pdeathsig SIGKILL tied to C1")
    # S8: seccomp, last before the fd sweep: every earlier step needs calls the filter denies.
    _load_seccomp(spec, notify_fd, info)
    # S9: close every fd but 0/1/2, the kept ones and the status pipe.
    keep = sorted({*spec.keep_fds, status_w})
    lo = 3
    for fd in keep:
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)
    info["applied"].append(f"S9 fds closed but 0/1/2{''.join(f',{fd}' for fd in spec.keep_fds)};"
                           f" environment allow-list ({len(env)} variables)")
    # S10: C3.
    return _fork_c3_and_wait(argv, env, status_w, info)


def _fork_c3_and_wait(argv: Sequence[str], env: dict[str, str], status_w: int, info: dict[str, Any]) -> int:
    _send(status_w, {"info": info})
    # Signals that arrive before C3 exists are held back, then forwarded once it does.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARD)
    # C3 by posix_spawn (clone(CLONE_VM|CLONE_VFORK) + execve: no copy of this Python process), with
    # what the fork+exec child did by hand: its own process group (setpgid(0, 0) before exec, so no
    # window where a signal to the group misses it), default dispositions for the forwarded signals and
    # for SIGPIPE/SIGXFSZ (Python ignores those, and ignored dispositions survive execve), and the
    # signal mask C2 had before the block above. An exec failure comes back here as OSError.
    try:
        path = argv[0] if "/" in argv[0] else _which(argv[0], env)
        c3 = os.posix_spawn(path, list(argv), env, setpgroup=0, resetids=True,
                            setsigdef=(*_FORWARD, signal.SIGPIPE, signal.SIGXFSZ),
                            setsigmask=set(old_mask) - set(_FORWARD))
    except OSError as e:
        try:  # noqa: SIM105 (no contextlib on the launch path)
            _send(status_w, {"exec_error": [e.errno, argv[0]]})
        except OSError:
            pass
        os.close(status_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return EXEC_FAILED
    _forward_to(c3, group=True)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(status_w)
    # Reap everything (we are init); return when C3 is gone. The kernel kills the rest when PID 1 exits.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if pid == c3:
            return _status_to_code(status)


def _which(name: str, env: Mapping[str, str]) -> str:
    for d in env.get("PATH", credentials.DEFAULT_PATH).split(":"):
        p = os.path.join(d or ".", name)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    raise FileNotFoundError(errno.ENOENT, "command not found", name)


# --- C1 ------------------------------------------------------------------------------------------------

def _raise_from_child(msg: dict[str, Any]) -> None:
    cls: type[SandboxError] = SandboxError
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, SandboxError) and obj.code == msg.get("code"):
            cls = obj
    if msg.get("code") == LayoutError.code:
        cls = LayoutError
    err = cls(msg.get("message", "sandbox set-up failed"))
    err.errno = msg.get("errno")
    raise err


def _read_status(fd: int) -> list[dict[str, Any]]:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    buf = b"".join(chunks)
    msgs: list[dict[str, Any]] = []
    i = 0
    while i + 4 <= len(buf):
        n = int.from_bytes(buf[i:i + 4], "little")
        record = buf[i + 4:i + 4 + n]
        i += 4 + n
        if len(record) != n:
            break  # C2 died mid-write: what arrived whole still counts
        try:
            msg = marshal.loads(record)
        except (ValueError, EOFError, TypeError):
            msg = None
        if isinstance(msg, dict):
            msgs.append(msg)
    return msgs


def launch(spec: SandboxSpec, argv: Sequence[str], *, landlock_rules: Mapping[str, Sequence[str]] | None = None,
           report_fd: int | None = None, host_env: Mapping[str, str] | None = None,
           notify_fd: int | None = None) -> int:
    """Run `argv` confined by `spec` (DESIGN.md §5) and return its exit status (128+signal if killed).

    Call in a process that may be changed for good (C1: the zygote's child, or the launcher itself) and
    that has no threads. Raises a SandboxError (nothing exec'd) when any step cannot be applied.
    `notify_fd`: a Unix socket to the supervisor; the seccomp violation listener is sent on it (S8).
    """
    if not argv:
        raise errors.SpecError("empty command")
    out_fd = report_fd if report_fd is not None else 2
    report = _Report(spec, out_fd)
    try:
        code = _launch(spec, list(argv), landlock_rules, report, dict(os.environ if host_env is None else host_env),
                       notify_fd)
    except SandboxError as e:
        report.no(f"REFUSED before exec: {e.code}: {e}")
        _write_all(out_fd, report.render("refused").encode())
        raise
    return code


def _launch(spec: SandboxSpec, argv: list[str], rules: Mapping[str, Sequence[str]] | None, report: _Report,
            host_env: dict[str, str], notify_fd: int | None = None) -> int:
    if notify_fd is not None:
        import _socket  # noqa: F401 - loaded now, while the host tree is whole (S5 hides it)
    out_fd_env = {"FARAMESH_AGENT_ID": spec.agent_id}
    if spec.egress_port is not None:
        # Every common client honours these; NO_PROXY is empty on purpose (a loopback entry would make
        # clients bypass the proxy, and loopback inside the sandbox holds nothing but the proxy anyway).
        proxy = f"http://127.0.0.1:{spec.egress_port}"
        out_fd_env["FARAMESH_PROXY_PORT"] = str(spec.egress_port)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            out_fd_env[name] = out_fd_env[name.lower()] = proxy
        out_fd_env["NO_PROXY"] = out_fd_env["no_proxy"] = ""
    env = credentials.agent_environment(host_env, spec.env_allow, spec.env_deny_globs, extra=out_fd_env,
                                        home=spec.home)
    report.ok(f"environment from the allow-list ({len(env)} variables), HOME={spec.home}")
    is_root = os.geteuid() == 0
    if len(os.listdir("/proc/self/task")) != 1:
        raise SandboxError("launch() needs a single-threaded process (unshare/seccomp bind one thread)")

    # The egress intake is reached now, as the launching user: after R3 only the agent's uid is left,
    # which the engine would (rightly) refuse.
    intake = None
    if spec.egress_intake is not None and spec.egress_port is not None and spec.profile != "off":
        intake = _connect_intake(spec.egress_intake)
        if intake is None:
            report.no(f"S3 egress: no engine answers on {spec.egress_intake} (the network stays empty)")

    # R1 (root) / rlimits and oom for everyone.
    if is_root:
        cg = cgroups.join_cgroup(spec.cgroup, spec.cgroup_pids_max, spec.cgroup_memory_max)
        for ctrl, state in cg.items():
            (report.ok if state == "joined" else report.no)(f"R1 cgroup {ctrl}: {state}")
    else:
        report.no("R1 cgroup: unprivileged launcher (rlimits and the PID namespace contain the agent)")
    applied = cgroups.apply_rlimits(spec.rlimits)
    report.ok("R1 rlimits " + ", ".join(f"{k}={v[0]}/{v[1]}" for k, v in applied.items()
                                         if k in ("CORE", *(r[0] for r in spec.rlimits))))
    cgroups.set_oom_score_adj(1000)
    report.ok("R1 oom_score_adj=1000")

    # R2 + R3 (root only). R3 switches ids BEFORE any user namespace exists: a user namespace created by
    # root is owned by host root, and a mapping to host 0 would be host root for file access; created by
    # the agent's uid it can never act as anything but that uid on the host.
    if is_root:
        check_layout(spec, spec.host_uid)
        report.ok("R2 workspace/stack reached without symlinks, workspace owned by the agent")
        namespaces.switch_ids(spec.host_uid, spec.host_gid)
        report.ok(f"R3 host uid/gid {spec.host_uid}/{spec.host_gid}, no supplementary groups")
        uid, gid = spec.host_uid, spec.host_gid
    else:
        uid, gid = os.getuid(), os.getgid()
        check_layout(spec, uid)
        report.no(f"R3 uid separation: unprivileged launcher, the agent runs as the invoking uid {uid}"
                  " (mapped to 1000 inside)")

    if spec.profile == "off":
        if notify_fd is not None:
            os.close(notify_fd)
        report.no("S1-S8: namespaces, mounts, Landlock, capabilities, seccomp (profile off)")
        return _launch_off(argv, env, report)

    # S1: all namespaces in one call (no window with only some of them).
    namespaces.unshare(namespaces.SANDBOX_NAMESPACES)
    report.ok("S1 namespaces user, mount, pid, net, ipc, uts, cgroup")
    # S2: setgroups deny + map 1000 -> uid/gid (write_id_maps makes us dumpable for the writes: R3 left
    # the process non-dumpable, which makes /proc/self/* owned by unmapped host root).
    namespaces.write_id_maps(spec.inside_uid, uid, spec.inside_gid, gid)
    report.ok(f"S2 setgroups deny, uid {spec.inside_uid}->{uid}, gid {spec.inside_gid}->{gid}")
    # S3: mounts slave, lo up.
    mounts.make_rslave("/")
    namespaces.bring_up_loopback()
    report.ok("S3 mounts slave, new network namespace with lo up")
    if intake is not None and spec.egress_port is not None:
        problem = _hand_over_listener(intake, spec.agent_id, spec.egress_port)
        if problem is None:
            report.ok(f"S3 egress: 127.0.0.1:{spec.egress_port} is the engine's proxy (allow-listed hosts only)")
        else:
            report.no(f"S3 egress: {problem} (the network stays empty)")
    elif spec.egress_port is None:
        report.ok("S3 egress: none (no egress block: an empty network namespace)")

    # S4: fork C2. C1 only waits (forwarding SIGINT/SIGTERM to C2) and reports.
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARD)
    c2 = os.fork()
    if c2 == 0:
        code = SETUP_FAILED
        try:
            os.close(status_r)
            os.close(alive_w)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARD)
            code = _c2(spec, argv, env, rules, status_w, alive_r, notify_fd)
        except SandboxError as e:
            msg = {"code": e.code, "message": str(e), "errno": e.errno}
            try:  # noqa: SIM105 (no contextlib on the launch path)
                _send(status_w, {"error": msg})
            except OSError:
                pass
        except BaseException as e:  # a bug: still never exec
            try:  # noqa: SIM105 (no contextlib on the launch path)
                _send(status_w, {"error": {"code": "SANDBOX_ERROR", "message": repr(e)}})
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(status_w)
    os.close(alive_r)
    if notify_fd is not None:
        os.close(notify_fd)  # C2 has it; the supervisor must see EOF once C2 has sent (or died)
    _forward_to(c2, group=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARD)
    report.ok(f"S4 C2 = sandbox init (host pid {c2})")
    return _finish(c2, status_r, alive_w, report)


def _finish(child: int, status_r: int, alive_w: int | None, report: _Report) -> int:
    msgs = _read_status(status_r)
    error = None
    for m in msgs:
        if "info" in m:
            for a in m["info"]["applied"]:
                report.ok(a)
            for a in m["info"]["missing"]:
                report.no(a)
        if "error" in m:
            error = m["error"]
        if "exec_error" in m:
            e, name = m["exec_error"]
            report.no(f"exec {name}: [{e}] {os.strerror(e)}")
    if error is not None:
        _, status = os.waitpid(child, 0)
        if alive_w is not None:
            os.close(alive_w)
        _raise_from_child(error)
    report_text = report.render("running" if not any(k.startswith("exec ") for k in report.missing) else "exec failed")
    _write_all(report.out_fd, report_text.encode())
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            status = 0
            break
    if alive_w is not None:
        os.close(alive_w)
    return _status_to_code(status)


def _launch_off(argv: list[str], env: dict[str, str], report: _Report) -> int:
    """Profile off: the agent runs with the stripped environment (and, as root, its own uid) only."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    info: dict[str, Any] = {"applied": [], "missing": []}
    pid = os.fork()  # a small parent for the agent so launch() can return its status
    if pid == 0:
        try:
            os.close(status_r)
            caps.set_pdeathsig(signal.SIGKILL)
            code = _fork_c3_and_wait(argv, env, status_w, info)
        except BaseException:
            code = SETUP_FAILED
        os._exit(code)
    os.close(status_w)
    _forward_to(pid, group=False)
    return _finish(pid, status_r, None, report)
