"""SandboxSpec: everything one agent launch needs, built once at `apply` (DESIGN.md §5).

The spec is data only. It is validated here (so a malformed spec fails before any privileged step),
then handed unchanged to the zygote, which applies it by one code path.

It is on the per-launch import path, so it is a plain `__slots__` class, not a dataclass: no dataclasses,
typing, re or inspect get imported per launch. It still behaves as a frozen dataclass would (keyword or
positional construction with the same defaults, ==, hash, repr without the BPF, FrozenInstanceError on
assignment), and `dataclasses.replace/fields/asdict/is_dataclass` work on it: `__dataclass_fields__` is
built lazily, from an equivalent dataclass, the first time something asks for it.
"""

from __future__ import annotations

import os
import sys

from faramesh.sandbox.errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    Profile = Literal["full", "minimal", "off"]

PROFILES: tuple[Profile, ...] = ("full", "minimal", "off")

# The agent id becomes a cgroup directory name and a hostname: keep it to a boring alphabet
# (^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$, checked with str methods: no `re` on the launch path).
_AGENT_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_AGENT_ID_CHARS = _ALNUM | frozenset("._-")

# The ids the agent sees inside its user namespace (DESIGN.md §2: never uid 0 inside).
INSIDE_UID = 1000
INSIDE_GID = 1000

# Resource names accepted in `rlimits` (applied by cgroups.apply_rlimits).
RLIMIT_NAMES = ("CORE", "NPROC", "NOFILE", "AS", "FSIZE", "CPU", "MEMLOCK", "STACK")

_REQUIRED = object()
# (name, default, shown in repr), in field order.
_FIELDS: tuple[tuple[str, object, bool], ...] = (
    ("profile", _REQUIRED, True),
    ("agent_id", _REQUIRED, True),
    ("host_uid", _REQUIRED, True),
    ("host_gid", _REQUIRED, True),
    ("workspace", _REQUIRED, True),
    ("stack_dir", _REQUIRED, True),
    ("read_only_paths", (), True),
    ("hidden_paths", (), True),
    ("env_allow", (), True),
    ("env_deny_globs", (), True),
    # (name, soft, hard) with name from RLIMIT_NAMES; -1 means unlimited.
    ("rlimits", (("CORE", 0, 0),), True),
    ("cgroup_pids_max", None, True),
    ("cgroup_memory_max", None, True),
    ("egress_port", None, True),
    # The engine's intake socket: C1 connects before it drops root and hands over the listener it makes
    # on 127.0.0.1:egress_port inside the new network namespace (S3).
    ("egress_intake", None, True),
    ("keep_fds", (), True),
    ("seccomp_bpf", b"", False),
    # The same profile with the reported calls left to a second, user-notification filter whose listener
    # the supervisor holds (seccomp.build_filter(notify_calls=True) + violation_notify_filter). Used only
    # when a launch is handed a socket to send the listener on; otherwise seccomp_bpf alone.
    ("seccomp_notify_bpf", b"", False),
    ("seccomp_listener_bpf", b"", False),
    # The agent's own socket directory (<runtime>/agents/<h>/), shown read-only at /run/faramesh.
    ("socket_dir", None, True),
    ("home", "/home/agent", True),
    ("hostname", "faramesh", True),
    ("inside_uid", INSIDE_UID, True),
    ("inside_gid", INSIDE_GID, True),
    # The cgroup under faramesh/: None means the agent id. The supervisor qualifies it with the stack
    # (`<stack>/<agent>`), so two stacks with the same agent id never share (or remove) one cgroup.
    ("cgroup_name", None, True),
)
FIELD_NAMES: tuple[str, ...] = tuple(f[0] for f in _FIELDS)
BPF_FIELDS = ("seccomp_bpf", "seccomp_notify_bpf", "seccomp_listener_bpf")


def valid_agent_id(agent_id: object) -> bool:
    return (isinstance(agent_id, str) and 1 <= len(agent_id) <= 63 and agent_id.isascii()
            and agent_id[0] in _ALNUM and all(c in _AGENT_ID_CHARS for c in agent_id))


def valid_cgroup_name(name: object) -> bool:
    """1 to 4 '/'-separated segments, each an agent-id-like name (no '.', '..', empty or odd segment)."""
    if not isinstance(name, str) or len(name) > 255:
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 4 and all(valid_agent_id(p) for p in parts)


class _LazyDataclassFields:
    """`__dataclass_fields__` on demand: the Field objects of an equivalent frozen dataclass."""

    fields: dict[str, Any] | None = None

    def __get__(self, obj: object, cls: type | None = None) -> dict[str, Any]:
        if self.fields is None:
            import dataclasses

            shadow = dataclasses.make_dataclass(
                "SandboxSpec",
                [(name, object) if default is _REQUIRED
                 else (name, object, dataclasses.field(default=default, repr=shown))
                 for name, default, shown in _FIELDS],
                frozen=True)
            self.fields = {f.name: f for f in dataclasses.fields(shadow)}
        return self.fields


class SandboxSpec:
    """One agent's confinement. Paths are host paths; the sandbox shows them at the same place."""

    __slots__ = FIELD_NAMES
    __dataclass_fields__ = _LazyDataclassFields()

    if TYPE_CHECKING:
        profile: Profile
        agent_id: str
        host_uid: int
        host_gid: int
        workspace: str
        stack_dir: str
        read_only_paths: tuple[str, ...]
        hidden_paths: tuple[str, ...]
        env_allow: tuple[str, ...]
        env_deny_globs: tuple[str, ...]
        rlimits: tuple[tuple[str, int, int], ...]
        cgroup_pids_max: int | None
        cgroup_memory_max: int | None
        egress_port: int | None
        egress_intake: str | None
        keep_fds: tuple[int, ...]
        seccomp_bpf: bytes
        seccomp_notify_bpf: bytes
        seccomp_listener_bpf: bytes
        socket_dir: str | None
        home: str
        hostname: str
        inside_uid: int
        inside_gid: int
        cgroup_name: str | None

    def __init__(self, *args: Any, **kw: Any) -> None:
        if len(args) > len(_FIELDS):
            raise TypeError(f"SandboxSpec() takes {len(_FIELDS)} positional arguments but {len(args)} were given")
        setattr_ = object.__setattr__
        for i, (name, default, _shown) in enumerate(_FIELDS):
            if i < len(args):
                if name in kw:
                    raise TypeError(f"SandboxSpec() got multiple values for argument {name!r}")
                value = args[i]
            elif name in kw:
                value = kw.pop(name)
            elif default is _REQUIRED:
                raise TypeError(f"SandboxSpec() missing required argument: {name!r}")
            else:
                value = default
            setattr_(self, name, value)
        for name in kw:
            if name in FIELD_NAMES:
                continue  # given positionally too: reported above
            raise TypeError(f"SandboxSpec() got an unexpected keyword argument {name!r}")
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SpecError(f"profile must be one of {PROFILES}, not {self.profile!r}")
        if not valid_agent_id(self.agent_id):
            raise SpecError(f"agent id {self.agent_id!r} must match {_AGENT_ID_PATTERN}")
        if self.cgroup_name is not None and not valid_cgroup_name(self.cgroup_name):
            raise SpecError(f"cgroup name {self.cgroup_name!r} must be 1-4 '/'-separated segments matching"
                            f" {_AGENT_ID_PATTERN}")
        # DESIGN.md §2: the host uid is never 0 and never nobody (65534, shared by every daemon).
        for what, value in (("host_uid", self.host_uid), ("host_gid", self.host_gid)):
            if value <= 0 or value == 65534:
                raise SpecError(f"{what} must be a dedicated non-root id, not {value}")
        if self.inside_uid == 0 or self.inside_gid == 0:
            raise SpecError("the agent is never uid/gid 0 inside its namespace")
        paths = [self.workspace, self.stack_dir, self.home, *self.read_only_paths, *self.hidden_paths]
        if self.socket_dir is not None:
            paths.append(self.socket_dir)
        if self.egress_intake is not None:
            paths.append(self.egress_intake)
            if self.egress_port is None:
                raise SpecError("egress_intake needs egress_port")
        for p in paths:
            if not os.path.isabs(p) or os.path.normpath(p) != p.rstrip("/") or p == "/":
                raise SpecError(f"path {p!r} must be absolute, normalised and not /")
        for name, soft, hard in self.rlimits:
            if name not in RLIMIT_NAMES:
                raise SpecError(f"unknown rlimit {name!r}")
            if hard != -1 and (soft == -1 or soft > hard):
                raise SpecError(f"rlimit {name}: soft {soft} exceeds hard {hard}")
        if any(fd < 3 for fd in self.keep_fds):
            raise SpecError("keep_fds lists extra fds; 0/1/2 are always kept")
        if self.egress_port is not None and not 0 < self.egress_port < 65536:
            raise SpecError(f"egress port {self.egress_port} out of range")
        if self.profile != "off" and not self.seccomp_bpf and sys.platform != "darwin":  # macOS: SBPL instead
            raise SpecError(f"profile {self.profile} needs the precompiled seccomp BPF")
        for name in BPF_FIELDS:
            if len(getattr(self, name)) % 8:
                raise SpecError(f"{name} is not a whole number of sock_filter instructions")
        if bool(self.seccomp_notify_bpf) != bool(self.seccomp_listener_bpf):
            raise SpecError("seccomp_notify_bpf and seccomp_listener_bpf come as a pair")

    @property
    def cgroup(self) -> str:
        """The cgroup name in force: `cgroup_name`, or the agent id."""
        return self.cgroup_name if self.cgroup_name is not None else self.agent_id

    # --- frozen-dataclass behaviour ---------------------------------------------------------------------

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in FIELD_NAMES)

    def __setattr__(self, name: str, value: object) -> None:
        import dataclasses

        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        import dataclasses

        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._astuple() == other._astuple()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name, _d, show in _FIELDS if show)
        return f"{self.__class__.__qualname__}({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._astuple())

    def __copy__(self) -> SandboxSpec:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> SandboxSpec:
        return self

    def replace(self, **changes: Any) -> SandboxSpec:
        """dataclasses.replace() without importing dataclasses."""
        kw = {name: getattr(self, name) for name in FIELD_NAMES}
        for name in changes:
            if name not in kw:
                raise TypeError(f"SandboxSpec() got an unexpected keyword argument {name!r}")
        kw.update(changes)
        return SandboxSpec(**kw)
