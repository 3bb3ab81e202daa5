"""SandboxSpec: everything one agent launch needs, built once at `apply` (DESIGN.md §5).

The spec is data only. It is validated here (so a malformed spec fails before any privileged step),
then handed unchanged to the zygote, which applies it by one code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from faramesh.sandbox.errors import SpecError

Profile = Literal["full", "minimal", "off"]
PROFILES: tuple[Profile, ...] = ("full", "minimal", "off")

# The agent id becomes a cgroup directory name and a hostname: keep it to a boring alphabet.
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# The ids the agent sees inside its user namespace (DESIGN.md §2: never uid 0 inside).
INSIDE_UID = 1000
INSIDE_GID = 1000

# Resource names accepted in `rlimits` (applied by cgroups.apply_rlimits).
RLIMIT_NAMES = ("CORE", "NPROC", "NOFILE", "AS", "FSIZE", "CPU", "MEMLOCK", "STACK")


@dataclass(frozen=True)
class SandboxSpec:
    """One agent's confinement. Paths are host paths; the sandbox shows them at the same place."""

    profile: Profile
    agent_id: str
    host_uid: int
    host_gid: int
    workspace: str
    stack_dir: str
    read_only_paths: tuple[str, ...] = ()
    hidden_paths: tuple[str, ...] = ()
    env_allow: tuple[str, ...] = ()
    env_deny_globs: tuple[str, ...] = ()
    # (name, soft, hard) with name from RLIMIT_NAMES; -1 means unlimited.
    rlimits: tuple[tuple[str, int, int], ...] = (("CORE", 0, 0),)
    cgroup_pids_max: int | None = None
    cgroup_memory_max: int | None = None
    egress_port: int | None = None
    keep_fds: tuple[int, ...] = ()
    seccomp_bpf: bytes = field(default=b"", repr=False)
    # The agent's own socket directory (<runtime>/agents/<h>/), shown read-only at /run/faramesh.
    socket_dir: str | None = None
    home: str = "/home/agent"
    hostname: str = "faramesh"
    inside_uid: int = INSIDE_UID
    inside_gid: int = INSIDE_GID

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SpecError(f"profile must be one of {PROFILES}, not {self.profile!r}")
        if not _AGENT_ID.match(self.agent_id):
            raise SpecError(f"agent id {self.agent_id!r} must match {_AGENT_ID.pattern}")
        # DESIGN.md §2: the host uid is never 0 and never nobody (65534, shared by every daemon).
        for what, value in (("host_uid", self.host_uid), ("host_gid", self.host_gid)):
            if value <= 0 or value == 65534:
                raise SpecError(f"{what} must be a dedicated non-root id, not {value}")
        if self.inside_uid == 0 or self.inside_gid == 0:
            raise SpecError("the agent is never uid/gid 0 inside its namespace")
        paths = [self.workspace, self.stack_dir, self.home, *self.read_only_paths, *self.hidden_paths]
        if self.socket_dir is not None:
            paths.append(self.socket_dir)
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
        if self.profile != "off" and not self.seccomp_bpf:
            raise SpecError(f"profile {self.profile} needs the precompiled seccomp BPF")
        if len(self.seccomp_bpf) % 8:
            raise SpecError("seccomp_bpf is not a whole number of sock_filter instructions")
