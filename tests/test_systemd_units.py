"""The systemd units (issue 7, systemd/): what they must say, what systemd says about them, and whether what
they do to a process still lets the engine serve and the sandbox launch real programs.

- Lint: the unit files are parsed (systemd's own list semantics: repeated keys accumulate, an empty
  assignment resets) and every rule of the issue is an assertion that fails when a unit breaks it.
- `systemd-analyze verify` is clean for every unit (the stable path /usr/bin/faramesh is supplied for the
  check by an overlay in a private mount namespace: the host is never changed), and a broken unit is caught.
- `systemd-analyze security --offline=true`: the exposure of each service is within its goal (≤ 2.0 engine,
  ≤ 4.5 supervisor). Offline scoring is deterministic, so the goal is asserted.
- sysusers.d and tmpfiles.d are applied by the real tools to a throwaway root and the result is checked.
- The units' restrictions, applied by the kernel to a real process: PID 1 here is not systemd, so this file
  doubles as a small launcher (`python tests/test_systemd_units.py confine --unit U --instance DIR -- cmd`)
  that applies what the unit says — seccomp allow list (expanded by `systemd-analyze syscall-filter`),
  SystemCallErrorNumber, RestrictAddressFamilies, MemoryDenyWriteExecute (systemd's own seccomp rules),
  RestrictNamespaces, ProtectHostname, the capability bounding set, no_new_privs, UMask, LimitCORE,
  ProtectSystem=strict with ReadWritePaths, ProtectKernelTunables' read-only /proc/sys — then execs `cmd`.
  Under the supervisor unit's restrictions a real sandbox launch (profile full) runs `node -e` with its JIT
  and the everyday Python checks; the same launch under units that add MemoryDenyWriteExecute,
  ProtectKernelTunables, RestrictNamespaces or ProtectHostname fails, which shows the check can fail.
  Under the engine unit's restrictions the real `faramesh serve` answers a govern call.
  Not emulated: PrivateTmp/PrivateDevices/PrivateIPC/ProtectHome, cgroup delegation, journal and notify.
- Where PID 1 is systemd, the target is started for real (the only test here that may skip).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import grp
import itertools
import json
import os
import pwd
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
UNIT_DIR = REPO / "systemd"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
sys.path.append(str(REPO / "bench"))  # appended: bench's module names must never shadow anything

import systemd_security as sdsec  # noqa: E402  (bench/, on the path above)

ENGINE_FILE = UNIT_DIR / "faramesh-engine@.service"
SUPERVISOR_FILE = UNIT_DIR / "faramesh-supervisor@.service"
TARGET_FILE = UNIT_DIR / "faramesh@.target"
SYSUSERS_FILE = UNIT_DIR / "sysusers.d" / "faramesh.conf"
TMPFILES_FILE = UNIT_DIR / "tmpfiles.d" / "faramesh.conf"
EXAMPLE_STACK = "/srv/support-bot"
IS_ROOT = os.geteuid() == 0


def tool(name: str) -> str:
    """A host tool the tests need. Missing → the test fails (never skips): `make deps` must provide it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (Debian: its package must be in the Makefile's DEB_PACKAGES)")
    return found


# ------------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class UnitFile:
    """A unit file as systemd reads it: (section, key, value) in file order, continuation lines joined."""

    path: Path
    assignments: tuple[tuple[str, str, str], ...]

    @classmethod
    def parse(cls, path: Path, text: str) -> UnitFile:
        out: list[tuple[str, str, str]] = []
        section = ""
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not an assignment: {raw!r}")
            out.append((section, key.strip(), value.strip()))
        return cls(path, tuple(out))

    @classmethod
    def load(cls, path: Path) -> UnitFile:
        return cls.parse(path, path.read_text(encoding="utf-8"))

    def raw(self, key: str, section: str = "Service") -> list[str]:
        return [v for s, k, v in self.assignments if s == section and k == key]

    def last(self, key: str, section: str = "Service") -> str | None:
        values = self.raw(key, section)
        return values[-1] if values else None

    def words(self, key: str, section: str = "Service") -> list[str]:
        """A list setting: every assignment adds its words, an empty one resets the list."""
        out: list[str] = []
        for value in self.raw(key, section):
            out = [] if value == "" else out + value.split()
        return out

    def flag(self, key: str, section: str = "Service") -> bool:
        """A boolean setting (unset is false). A non-boolean value is an error for this helper."""
        value = self.last(key, section)
        if value is None or value == "":
            return False
        table = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False,
                 "off": False}
        if value.lower() not in table:
            raise ValueError(f"{self.path.name}: {key}={value} is not a boolean")
        return table[value.lower()]

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.raw("Environment"):
            for word in value.split():
                name, _, val = word.partition("=")
                env[name] = val
        return env


def seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", value)
    assert found, value
    return float(found.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60, "m": 60, "h": 3600}[found.group(2)]


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls a `@group` stands for, as this systemd defines it (nested groups expanded)."""
    done = subprocess.run([tool("systemd-analyze"), "syscall-filter", name], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    names: set[str] = set()
    for line in done.stdout.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= syscall_group(word) if word.startswith("@") else {word}
    return frozenset(names)


def effective_syscall_filter(assignments: Sequence[str]) -> tuple[bool, frozenset[str]]:
    """(allow_list?, names) for a unit's SystemCallFilter= lines, as systemd combines them: the first
    assignment decides the mode (an allow list also gets @default); in an allow list later plain entries
    add and `~` entries remove, in a deny list the other way round; an empty assignment resets."""
    mode: bool | None = None
    names: set[str] = set()
    for value in assignments:
        if value == "":
            mode, names = None, set()
            continue
        invert = value.startswith("~")
        entries: set[str] = set()
        for word in (value[1:] if invert else value).split():
            word = word.split(":", 1)[0]  # name:errno
            entries |= syscall_group(word) if word.startswith("@") else {word}
        if mode is None:
            mode = not invert
            if mode:
                names |= syscall_group("@default")
        if invert != mode:
            names |= entries
        else:
            names -= entries
    return bool(mode), frozenset(names)


ENGINE = UnitFile.load(ENGINE_FILE)
SUPERVISOR = UnitFile.load(SUPERVISOR_FILE)
TARGET = UnitFile.load(TARGET_FILE)


# ------------------------------------------------------------------------------------- lint: the engine


def test_unit_parser_follows_systemd_list_semantics() -> None:
    unit = UnitFile.parse(Path("x.service"), "[Service]\nA=1 2\nA=3\n# c\nB=x\nB=\nB=y \\\n z\n")
    assert unit.words("A") == ["1", "2", "3"]
    assert unit.words("B") == ["y", "z"]
    assert effective_syscall_filter(["@mount", "~umount2"]) == (True, (syscall_group("@default")
                                                                        | syscall_group("@mount")) - {"umount2"})
    assert effective_syscall_filter(["~@mount", "mount"]) == (False, syscall_group("@mount") - {"mount"})


def test_engine_serves_the_installed_policy_as_faramesh() -> None:
    assert ENGINE.raw("ExecStart") == ["/usr/bin/faramesh serve --dir %f"]
    # Never compiles: the only command is `serve` (no ExecStartPre= running check/apply/compile).
    assert [k for s, k, _ in ENGINE.assignments if k.startswith("Exec")] == ["ExecStart"]
    assert ENGINE.last("User") == "faramesh"
    assert ENGINE.last("Group") == "faramesh"
    assert ENGINE.words("SupplementaryGroups") == ["faramesh-operators"]


def test_engine_notifies_and_is_watched() -> None:
    assert ENGINE.last("Type") == "notify"
    assert ENGINE.last("NotifyAccess") == "main"
    assert seconds(ENGINE.last("WatchdogSec") or "0") > 0
    assert ENGINE.last("Restart") == "on-failure"
    # SIGTERM to the engine alone: it drains and signs its last checkpoint through provider children.
    assert ENGINE.last("KillMode") == "mixed"


def test_engine_reads_secret_references_from_the_stack_environment_file() -> None:
    assert ENGINE.raw("EnvironmentFile") == ["-/etc/faramesh/units/%i.env"]
    assert ENGINE.raw("LoadCredential") == []


def test_engine_keeps_what_providers_and_peer_checks_need() -> None:
    families = ENGINE.words("RestrictAddressFamilies")
    assert families and not families[0].startswith("~")
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert not ENGINE.flag("PrivateNetwork")
    assert ENGINE.raw("IPAddressDeny") == []
    assert not ENGINE.flag("PrivateUsers")
    assert ENGINE.last("ProtectProc") in (None, "default")
    assert ENGINE.last("ProcSubset") in (None, "all")


def test_engine_is_locked_down() -> None:
    assert ENGINE.flag("NoNewPrivileges")
    assert ENGINE.raw("CapabilityBoundingSet") == [""]
    assert ENGINE.raw("AmbientCapabilities") == [""]
    assert ENGINE.last("ProtectSystem") == "strict"
    assert ENGINE.last("ProtectHome") == "yes"
    assert ENGINE.flag("MemoryDenyWriteExecute")
    assert ENGINE.flag("RestrictNamespaces")
    for key in ("PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "LockPersonality",
                "RestrictRealtime", "RestrictSUIDSGID"):
        assert ENGINE.flag(key), key
    allow, calls = effective_syscall_filter(ENGINE.raw("SystemCallFilter"))
    assert allow and ENGINE.last("SystemCallErrorNumber") == "EPERM"
    for call in ("mount", "setuid", "ptrace", "reboot", "init_module", "setrlimit", "sethostname", "bpf"):
        assert call not in calls, call
    assert {"fchownat", "socket", "connect", "epoll_wait", "clone3", "execve"} <= calls


def test_engine_and_supervisor_agree_on_the_paths() -> None:
    """The engine runs as `faramesh` (not uid 0): engine/paths.py would pick XDG paths unless the unit names
    /var/lib and /run; the root supervisor and `apply` compute the same directories either way."""
    from faramesh.engine.paths import stack_paths

    stack = Path(EXAMPLE_STACK)
    engine = stack_paths(stack, euid=998, env=ENGINE.environment())
    supervisor = stack_paths(stack, euid=0, env=SUPERVISOR.environment())
    apply_as_root = stack_paths(stack, euid=0, env={})
    assert engine == supervisor == apply_as_root
    assert engine.state_dir.parent == Path("/var/lib/faramesh")
    assert engine.runtime_dir.parent == Path("/run/faramesh")
    rw = set(ENGINE.words("ReadWritePaths"))
    assert {"/var/lib/faramesh", "/run/faramesh"} <= rw


# --------------------------------------------------------------------------------- lint: the supervisor


def test_supervisor_runs_supervise_as_root() -> None:
    assert SUPERVISOR.raw("ExecStart") == ["/usr/bin/faramesh supervise --dir %f"]
    assert SUPERVISOR.last("User") in (None, "root")
    assert SUPERVISOR.last("Type") == "notify"
    assert SUPERVISOR.last("NotifyAccess") == "main"  # agents can never report READY or feed the watchdog
    assert seconds(SUPERVISOR.last("WatchdogSec") or "0") > 0


def test_supervisor_follows_the_engine_without_requiring_it() -> None:
    engine = "faramesh-engine@%i.service"
    assert engine in SUPERVISOR.words("Wants", "Unit")
    assert engine in SUPERVISOR.words("After", "Unit")
    for strong in ("Requires", "BindsTo", "Requisite", "PartOf", "Upholds"):
        assert engine not in SUPERVISOR.words(strong, "Unit"), strong


def test_supervisor_stop_is_sigterm_to_the_tree() -> None:
    assert SUPERVISOR.last("KillMode") == "mixed"
    assert SUPERVISOR.flag("Delegate")
    for key in ("ExecStop", "ExecStopPost", "ExecReload"):
        assert SUPERVISOR.raw(key) == [], key


def test_supervisor_restrictions_leave_the_sandbox_and_programs_working() -> None:
    """Agents inherit all of this: the sandbox must still build (namespaces, fresh /proc, hostname) and a
    JIT must still run; a refused call must fail, not kill."""
    assert not SUPERVISOR.flag("MemoryDenyWriteExecute")
    assert SUPERVISOR.raw("SystemCallFilter")
    assert SUPERVISOR.last("SystemCallErrorNumber") == "EPERM"
    assert SUPERVISOR.raw("RestrictNamespaces") in ([], ["no"])
    for key in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectHostname", "ProtectControlGroups",
                "PrivateUsers", "PrivateNetwork"):
        assert not SUPERVISOR.flag(key), key
    assert SUPERVISOR.last("ProtectProc") in (None, "default")
    assert SUPERVISOR.last("ProcSubset") in (None, "all")
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ReadOnlyPaths"):
        assert not any(p.lstrip("-+").startswith("/proc") for p in SUPERVISOR.words(key)), key
    families = SUPERVISOR.words("RestrictAddressFamilies")
    assert families and not families[0].startswith("~")
    # Exactly the families the sandbox's own filter allows: nothing the sandbox needs is missing, and
    # nothing it refuses is granted to profile-off agents either.
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6"}


# What the supervisor and the sandbox set-up call (supervisor/*.py, sandbox/*.py via _libc and os).
SANDBOX_CALLS = frozenset({
    "unshare", "mount", "umount2", "pivot_root", "mount_setattr", "sethostname", "seccomp",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "setgroups", "setresuid",
    "setresgid", "capget", "capset", "prctl", "prlimit64", "ioctl", "socket", "socketpair", "sendmsg",
    "recvmsg", "clone", "clone3", "vfork", "execve", "wait4", "waitid", "pidfd_open", "pidfd_send_signal",
    "kill", "setsid", "openat", "openat2", "fchown", "fchmod", "fchownat", "mkdirat", "symlinkat", "poll",
    "ppoll", "flock", "statx", "getdents64", "close_range", "rt_sigaction", "setitimer",
})
# Refused to the supervisor and every agent: no code here needs them.
REFUSED_CALLS = frozenset({
    "ptrace", "perf_event_open", "pidfd_getfd", "init_module",
    "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "clock_settime", "settimeofday", "adjtimex", "iopl", "ioperm", "chroot", "fsopen", "fsmount", "fspick",
    "open_tree", "move_mount", "bpf", "acct", "quotactl", "open_by_handle_at", "modify_ldt", "vhangup",
    "setdomainname",
})


def test_supervisor_syscall_filter_is_narrow_and_covers_the_sandbox() -> None:
    allow, calls = effective_syscall_filter(SUPERVISOR.raw("SystemCallFilter"))
    assert allow, "an allow list (systemd-analyze security scores deny lists as unfiltered)"
    assert not SANDBOX_CALLS - calls, sorted(SANDBOX_CALLS - calls)
    assert not REFUSED_CALLS & calls, sorted(REFUSED_CALLS & calls)


NEW_MOUNT_API = ("fsopen", "fsconfig", "fsmount", "fspick", "open_tree", "open_tree_attr", "move_mount")


def test_violation_reports_lost_under_the_unit_are_the_documented_ones() -> None:
    """The sandbox reports some refused calls through a USER_NOTIF filter; a call the unit's own filter
    refuses never gets that far (ERRNO outranks USER_NOTIF). systemd/README.md lists those."""
    from faramesh.sandbox.seccomp import NOTIFY_CALLS

    _, calls = effective_syscall_filter(SUPERVISOR.raw("SystemCallFilter"))
    lost = set(NOTIFY_CALLS) - calls
    modules = {"init_module", "finit_module", "delete_module"}
    assert lost == {"ptrace", "bpf", "kexec_load", "kexec_file_load", *modules, *NEW_MOUNT_API} & set(NOTIFY_CALLS)
    readme = (UNIT_DIR / "README.md").read_text(encoding="utf-8")
    limits = readme[readme.index("## Limits"):]
    for word in ("`ptrace`", "`bpf`", "`kexec_*`", "module loading", *(f"`{c}`" for c in NEW_MOUNT_API)):
        assert word in limits, word


SUPERVISOR_CAPS = {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_KILL",
                   "CAP_SYS_PTRACE"}


def test_supervisor_capabilities_are_the_listed_ones() -> None:
    caps = set(SUPERVISOR.words("CapabilityBoundingSet"))
    assert caps == SUPERVISOR_CAPS
    assert SUPERVISOR.flag("NoNewPrivileges")
    assert SUPERVISOR.raw("AmbientCapabilities") == [""]
    # Every capability is explained in the unit's comment table.
    text = SUPERVISOR_FILE.read_text(encoding="utf-8")
    for cap in caps:
        assert re.search(rf"^#\s+(CAP_\w+ )*{cap}\b", text, re.M), cap


def test_supervisor_can_write_what_it_and_its_agents_must() -> None:
    assert SUPERVISOR.last("ProtectSystem") == "strict"
    assert set(SUPERVISOR.words("ReadWritePaths")) == {"/var/lib/faramesh", "/run/faramesh", "/var/log/faramesh",
                                                       "%f"}
    assert SUPERVISOR.last("ProtectHome") == "read-only"
    assert "%f" in SUPERVISOR.words("RequiresMountsFor", "Unit")


def test_supervisor_does_not_start_an_engine_of_its_own() -> None:
    assert SUPERVISOR.environment()["FARAMESH_ENGINE_UNIT"] == "faramesh-engine@%i.service"


# ------------------------------------------------------------------------------------ lint: the target


def test_target_binds_both_services() -> None:
    services = {"faramesh-engine@%i.service", "faramesh-supervisor@%i.service"}
    assert services <= set(TARGET.words("Wants", "Unit"))
    assert TARGET.words("WantedBy", "Install") == ["multi-user.target"]
    for unit in (ENGINE, SUPERVISOR):
        assert unit.words("PartOf", "Unit") == ["faramesh@%i.target"], unit.path.name


def test_instance_paths_use_f_not_I() -> None:
    """`systemd-escape --path` drops the leading slash and %I gives it back without one ("srv/stack"),
    which systemd ignores in path settings; %f is the path."""
    for unit in (ENGINE, SUPERVISOR, TARGET):
        assert not any("%I" in value for _, _, value in unit.assignments), unit.path.name
    escaped = subprocess.run([tool("systemd-escape"), "--path", "/srv/a-b c"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert "/" not in escaped and escaped.startswith("srv")
    back = subprocess.run([tool("systemd-escape"), "--unescape", "--path", escaped], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert back == "/srv/a-b c"


# ------------------------------------------------------------------------------- sysusers and tmpfiles


def _agent_uid_range() -> tuple[int, int]:
    from faramesh.supervisor.layout import AGENTS_PER_STACK, UID_BASE, UID_STACK_SLOTS

    return UID_BASE, UID_BASE + UID_STACK_SLOTS * AGENTS_PER_STACK - 1


def test_sysusers_documents_the_agent_range_and_allocates_none() -> None:
    lines = [ln.split() for ln in SYSUSERS_FILE.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert sorted(ln[:2] for ln in lines) == [["g", "faramesh-operators"], ["u", "faramesh"]]
    assert not any(ln[0] == "r" for ln in lines)  # an r line would move every system user into the range
    low, high = _agent_uid_range()
    assert f"{low}-{high}" in SYSUSERS_FILE.read_text(encoding="utf-8")



def _read_ids(root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    def table(name: str) -> dict[str, list[str]]:
        text = (root / "etc" / name).read_text(encoding="utf-8")
        return {ln.split(":")[0]: ln.split(":") for ln in text.splitlines() if ln}

    return table("passwd"), table("group")


def test_sysusers_and_tmpfiles_in_a_throwaway_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n", encoding="utf-8")
    (root / "etc" / "group").write_text("root:x:0:\n", encoding="utf-8")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).write_text("", encoding="utf-8")
    users = subprocess.run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS_FILE)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert users.returncode == 0, users.stderr
    passwd, group = _read_ids(root)
    uid, gid = int(passwd["faramesh"][2]), int(passwd["faramesh"][3])
    assert 0 < uid < 1000 and group["faramesh"][2] == str(gid), passwd["faramesh"]  # a system user
    low, high = _agent_uid_range()
    assert not low <= uid <= high
    assert passwd["faramesh"][6] == "/usr/sbin/nologin"
    operators = int(group["faramesh-operators"][2])

    for attempt in range(2):  # the second run must change nothing and say nothing
        made = subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES_FILE)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0 and made.stderr == "", (attempt, made.stderr)
    expected = {
        "run/faramesh": (0o711, uid, gid),
        "var/lib/faramesh": (0o755, 0, 0),
        "var/lib/faramesh/wal": (0o700, uid, gid),
        "var/log/faramesh": (0o750, 0, operators),
        "etc/faramesh": (0o755, 0, 0),
        "etc/faramesh/units": (0o700, 0, 0),
    }
    for rel, (mode, owner, owner_group) in expected.items():
        st = os.lstat(root / rel)
        assert stat.S_ISDIR(st.st_mode), rel
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, owner, owner_group), rel


# --------------------------------------------------------------------------------- systemd-analyze


def _instances(directory: Path) -> list[Path]:
    escaped = sdsec.escape_path(EXAMPLE_STACK)
    return sdsec.instance_links(directory, UNIT_DIR, escaped,
                                [ENGINE_FILE.name, SUPERVISOR_FILE.name, TARGET_FILE.name])


def _with_stable_path(argv: list[str], work: Path) -> list[str]:
    """`argv` where /usr/bin/faramesh exists: as it is when installed; otherwise in a private mount
    namespace whose /usr/bin is an overlay adding a link to this checkout's entry point. Nothing on the host
    changes (the namespace ends with the command)."""
    if os.path.exists("/usr/bin/faramesh"):
        return argv
    entry = REPO / ".venv" / "bin" / "faramesh"
    assert entry.exists(), f"{entry} missing: run `make deps`"
    layer = work / "stable-path"
    layer.mkdir()
    (layer / "faramesh").symlink_to(entry)
    userns = [] if IS_ROOT else ["--user", "--map-root-user"]
    script = 'mount -t overlay overlay -o "lowerdir=$0:/usr/bin" /usr/bin && exec "$@"'
    return [tool("unshare"), *userns, "--mount", "--propagation", "private", "/bin/sh", "-c", script,
            str(layer), *argv]


def _verify(units: list[Path], work: Path) -> subprocess.CompletedProcess[str]:
    argv = [tool("systemd-analyze"), "verify", "--man=no", *map(str, units)]
    return subprocess.run(_with_stable_path(argv, work), capture_output=True, text=True, timeout=120, check=False)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    done = _verify(_instances(units), tmp_path)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    """The same check on a unit with an unknown key and a misspelt value: not clean (verify exits 0 on
    warnings, which is why the test above also requires empty output)."""
    units = tmp_path / "units"
    units.mkdir()
    broken = units / ENGINE_FILE.name
    broken.write_text(ENGINE_FILE.read_text(encoding="utf-8") + "ProtectKernelTunabels=yes\nKillMode=mix\n",
                      encoding="utf-8")
    link = units / sdsec.instance_name(ENGINE_FILE.name, "srv-x")
    link.symlink_to(broken)
    done = _verify([link], tmp_path)
    assert "ProtectKernelTunabels" in done.stderr and "kill mode" in done.stderr, done.stderr


def test_parse_overall_reads_systemd_analyze_output() -> None:
    sample = ("  NAME  DESCRIPTION  EXPOSURE\n✗ PrivateNetwork=  x  0.5\n\n"
              "→ Overall exposure level for a@b.service: 4.5 OK 🙂\n")
    assert sdsec.parse_overall(sample) == 4.5
    with pytest.raises(sdsec.SecurityScoreError):
        sdsec.parse_overall("nothing here")
    assert sdsec.instance_name("faramesh@.target", "srv-x") == "faramesh@srv-x.target"


def test_security_exposure_meets_the_goals() -> None:
    rows = sdsec.security_rows()
    print("\n" + sdsec.render(rows))
    assert [unit for unit, _, _ in rows] == [ENGINE_FILE.name, SUPERVISOR_FILE.name]
    for unit, exposure, goal in rows:
        assert 0.0 <= exposure <= goal, (unit, exposure, goal)


def test_security_score_reflects_the_unit(tmp_path: Path) -> None:
    """The score is of the unit as written: stripping the engine's hardening raises it past its goal."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ENGINE_FILE.name).write_text(
        "[Service]\nType=notify\nExecStart=/usr/bin/faramesh serve --dir %f\nUser=faramesh\n", encoding="utf-8")
    [(unit, exposure, goal)] = sdsec.security_rows(unit_dir=bare, goals=[(ENGINE_FILE.name, 2.0)])
    assert unit == ENGINE_FILE.name and exposure > goal


# ---------------------------------------------------------------- the units' restrictions, applied here

CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6,
            "AF_NETLINK": 16, "AF_PACKET": 17}
AF_MAX = 46
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new-style syscall table)
MOUNT_ATTR_RDONLY = 0x1
API_FILESYSTEMS = ("/proc", "/sys", "/dev")  # left writable by ProtectSystem=strict


@dataclass(frozen=True)
class Confinement:
    """What a unit does to its process, in the terms the kernel applies it."""

    syscall_allow_list: bool | None = None  # None: no SystemCallFilter
    syscalls: frozenset[str] = frozenset()
    syscall_errno: int | None = None  # None: a refused call kills (SIGSYS)
    families: frozenset[int] | None = None
    deny_write_execute: bool = False
    restrict_namespaces: bool = False
    protect_hostname: bool = False
    capabilities: frozenset[str] | None = None
    no_new_privileges: bool = False
    umask: int | None = None
    core_zero: bool = False
    read_only_root: bool = False
    read_write: tuple[str, ...] = ()
    proc_sys_read_only: bool = False
    implicit_denies: frozenset[str] = field(default_factory=frozenset)


def confinement(unit: UnitFile, instance: str) -> Confinement:
    """The kernel-level effect of `unit` for the stack directory `instance` (%f)."""
    implicit: set[str] = set()
    for key, group in (("ProtectClock", "@clock"), ("ProtectKernelModules", "@module"),
                       ("PrivateDevices", "@raw-io")):
        if unit.flag(key):
            implicit |= syscall_group(group)
    if unit.flag("ProtectKernelLogs"):
        implicit.add("syslog")
    raw_filter = unit.raw("SystemCallFilter")
    allow: bool | None = None
    calls: frozenset[str] = frozenset()
    if raw_filter:
        allow, calls = effective_syscall_filter(raw_filter)
        calls = calls - implicit if allow else calls | implicit
    elif implicit:
        allow, calls = False, frozenset(implicit)
    errno_name = unit.last("SystemCallErrorNumber")
    families = unit.words("RestrictAddressFamilies")
    if families and families[0].startswith("~"):
        raise NotImplementedError("deny-list RestrictAddressFamilies")
    caps = unit.raw("CapabilityBoundingSet")
    cap_set = None if not caps else frozenset(unit.words("CapabilityBoundingSet"))
    if unit.flag("PrivateDevices") and cap_set is not None:
        cap_set -= {"CAP_MKNOD", "CAP_SYS_RAWIO"}
    umask = unit.last("UMask")
    paths = [p.lstrip("-+").replace("%f", instance) for p in unit.words("ReadWritePaths")]
    return Confinement(
        syscall_allow_list=allow,
        syscalls=calls,
        syscall_errno=getattr(errno, errno_name) if errno_name else None,
        families=frozenset(FAMILIES[f] for f in families) if families else None,
        deny_write_execute=unit.flag("MemoryDenyWriteExecute"),
        restrict_namespaces=unit.flag("RestrictNamespaces"),
        protect_hostname=unit.flag("ProtectHostname"),
        capabilities=cap_set,
        no_new_privileges=unit.flag("NoNewPrivileges"),
        umask=int(umask, 8) if umask else None,
        core_zero=unit.last("LimitCORE") == "0",
        read_only_root=unit.last("ProtectSystem") == "strict",
        read_write=tuple(paths),
        proc_sys_read_only=unit.flag("ProtectKernelTunables"),
    )


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _mountpoints() -> list[str]:
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            raw = line.split()[4]
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return sorted(points, key=lambda p: (p.count("/"), p))


class _Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long

    def check(self, result: int, what: str) -> None:
        if result == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str | None, target: str, flags: int) -> None:
        self.check(self.lib.mount(source.encode() if source else None, target.encode(), None,
                                  ctypes.c_ulong(flags), None), f"mount {target}")

    def read_only(self, target: str) -> None:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
        self.check(self.lib.syscall(SYS_MOUNT_SETATTR, -100, target.encode(), 0, ctypes.byref(attr),
                                    ctypes.sizeof(attr)), f"mount_setattr {target}")


def _seccomp_filters(c: Confinement) -> list[Any]:
    import pyseccomp as sc

    def new(default: Any) -> Any:
        f = sc.SyscallFilter(default)
        f.set_attr(sc.Attr.CTL_NNP, 0)  # no_new_privs is set (or not) by the caller, as the unit says
        return f

    def number(name: str) -> int | None:
        try:
            nr = int(sc.resolve_syscall(0, name))
        except (ValueError, TypeError, RuntimeError):
            return None
        return nr if nr >= 0 else None  # negative: not a call of this architecture

    eperm = sc.ERRNO(errno.EPERM)
    filters = []
    if c.families is not None:
        f = new(sc.ALLOW)
        for family in range(AF_MAX):
            if family not in c.families:
                f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), number("socket"), sc.Arg(0, sc.EQ, family))
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), number("socket"), sc.Arg(0, sc.GE, AF_MAX))
        filters.append(f)
    if c.deny_write_execute:  # systemd's seccomp_memory_deny_write_execute(), rule for rule
        f = new(sc.ALLOW)
        f.add_rule(eperm, number("mmap"), sc.Arg(2, sc.MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        f.add_rule(eperm, number("mprotect"), sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, number("pkey_mprotect"), sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, number("shmat"), sc.Arg(2, sc.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(f)
    if c.restrict_namespaces:
        f = new(sc.ALLOW)
        for flag in NS_FLAGS:
            f.add_rule(eperm, number("unshare"), sc.Arg(0, sc.MASKED_EQ, flag, flag))
            f.add_rule(eperm, number("clone"), sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(eperm, number("setns"))
        filters.append(f)
    if c.protect_hostname:
        f = new(sc.ALLOW)
        for name in ("sethostname", "setdomainname"):
            f.add_rule(eperm, number(name))
        filters.append(f)
    if c.syscall_allow_list is not None:
        # Last, as systemd loads it: it may refuse seccomp(2) itself, which the loads above still need.
        refused = sc.ERRNO(c.syscall_errno) if c.syscall_errno is not None else sc.KILL_PROCESS
        f = new(refused if c.syscall_allow_list else sc.ALLOW)
        for name in sorted(c.syscalls):
            nr = number(name)
            if nr is not None:
                f.add_rule(sc.ALLOW if c.syscall_allow_list else refused, nr)
        filters.append(f)
    return filters


def apply_confinement(c: Confinement, uid: int | None = None, extra_read_write: Sequence[str] = ()) -> None:
    """Make this (single-threaded, root) process what the unit makes of its main process, in systemd's
    order: mount namespace, umask and limits, bounding set, user, no_new_privs, seccomp. Then exec."""
    libc = _Libc()
    if c.read_only_root or c.proc_sys_read_only:
        libc.check(libc.lib.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        libc.mount(None, "/", MS_REC | MS_SLAVE)
    if c.read_only_root:
        writable = [p for p in (*c.read_write, *extra_read_write) if os.path.isdir(p)]
        for path in writable:
            libc.mount(path, path, MS_BIND | MS_REC)
        for point in _mountpoints():
            if not _under(point, API_FILESYSTEMS) and not _under(point, writable):
                libc.read_only(point)
    if c.proc_sys_read_only:
        for path in ("/proc/sys", "/proc/sysrq-trigger"):
            if not os.path.exists(path):  # systemd skips what the kernel does not have
                continue
            libc.mount(path, path, MS_BIND)
            libc.read_only(path)
    if c.umask is not None:
        os.umask(c.umask)
    if c.core_zero:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if c.capabilities is not None:
        for number, name in enumerate(CAP_NAMES):
            kept_or_dropped = name in c.capabilities or libc.lib.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) == 0
            if not kept_or_dropped and ctypes.get_errno() != errno.EINVAL:  # EINVAL: no such capability here
                libc.check(-1, f"PR_CAPBSET_DROP {name}")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    # systemd sets no_new_privs itself when a seccomp filter must be loaded without CAP_SYS_ADMIN.
    filters = _seccomp_filters(c)
    implied = bool(filters) and (uid not in (None, 0) or "CAP_SYS_ADMIN" not in (c.capabilities or CAP_NAMES))
    if c.no_new_privileges or implied:
        libc.check(libc.lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    for f in filters:
        f.load()


def confine_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="test_systemd_units.py confine")
    parser.add_argument("--unit", required=True, type=Path)
    parser.add_argument("--instance", required=True, help="the stack directory (%%f)")
    parser.add_argument("--uid", type=int, default=None, help="run as this uid (User=)")
    parser.add_argument("--rw", action="append", default=[], help="stand-ins for ReadWritePaths absent here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no command")
    try:
        apply_confinement(confinement(UnitFile.load(ns.unit), ns.instance), ns.uid, ns.rw)
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"confine: {exc}\n")
    return 125


def confine_argv(unit: Path, instance: str, command: Sequence[str], *, uid: int | None = None,
                 rw: Sequence[str] = ()) -> list[str]:
    argv = [PYTHON, str(HERE), "confine", "--unit", str(unit), "--instance", instance]
    if uid is not None:
        argv += ["--uid", str(uid)]
    for path in rw:
        argv += ["--rw", path]
    return [*argv, "--", *command]


def require_root() -> None:
    if not IS_ROOT:
        pytest.fail("applying a unit's restrictions (mount namespace, bounding set, uid switch) needs root")


def _status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


PROBE = r"""
import ctypes, errno, json, os, resource, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {"status": open("/proc/self/status").read(), "umask": os.umask(0o022)}
try:
    socket.socket(16, socket.SOCK_RAW, 0).close(); out["netlink"] = 0
except OSError as e:
    out["netlink"] = e.errno
out["ptrace"] = libc.ptrace(0, 0, None, None), ctypes.get_errno()
out["usr_ro"] = bool(os.statvfs("/usr").f_flag & os.ST_RDONLY)
out["stack_ro"] = bool(os.statvfs(sys.argv[1]).f_flag & os.ST_RDONLY)
out["core"] = resource.getrlimit(resource.RLIMIT_CORE)
print(json.dumps(out))
"""


def test_confinement_applies_what_the_unit_says(tmp_path: Path) -> None:
    """The harness itself: under the supervisor unit a process has exactly its bounding set, no_new_privs,
    a seccomp filter refusing ptrace with EPERM and netlink sockets, a read-only tree but the stack."""
    require_root()
    stack = tmp_path / "stack"
    stack.mkdir()
    done = subprocess.run(confine_argv(SUPERVISOR_FILE, str(stack), ["/usr/bin/python3", "-I", "-c", PROBE,
                                                                     str(stack)]),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    status = _status_fields(out["status"])
    want = sum(1 << CAP_NAMES.index(c) for c in SUPERVISOR_CAPS)
    assert int(status["CapBnd"], 16) == want and int(status["CapEff"], 16) == want
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert out["ptrace"] == [-1, errno.EPERM]
    assert out["netlink"] == errno.EAFNOSUPPORT
    assert out["usr_ro"] is True and out["stack_ro"] is False
    assert out["umask"] == 0o077 and out["core"] == [0, 0]


# The agent inside the sandbox: a JIT and the everyday checks; one JSON line on stdout.
AGENT = r"""
import json, os, socket, subprocess, sys, threading
out = {}
js = ("const add = new Function('a', 'b', 'return a + b'); let s = 0;"
      "for (let i = 0; i < 2e6; i++) s = add(s, 1); console.log(s)")
node = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=60)
out["node"] = [node.returncode, node.stdout.strip(), node.stderr[-300:]]
py = subprocess.run(["/usr/bin/python3", "-c", "import json, ssl, sqlite3, urllib.request; print('ok')"],
                    capture_output=True, text=True, timeout=60)
out["python"] = [py.returncode, py.stdout.strip(), py.stderr[-300:]]
sh = subprocess.run(["/bin/sh", "-c", "ls /usr/bin >/dev/null && echo fine"], capture_output=True, text=True,
                    timeout=30)
out["sh"] = [sh.returncode, sh.stdout.strip()]
box = []
t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
t.start(); t.join()
out["thread"] = len(box) == 1
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    socket.socket(fam, socket.SOCK_STREAM).close()
out["sockets"] = True
with open("written-by-agent", "w") as fh:
    fh.write("x")
out["workspace"] = os.getcwd()
print(json.dumps(out))
"""
BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from faramesh.launchers.agent_exec import run; run()"


@pytest.fixture(scope="module")
def pkg_root() -> Iterator[str]:
    """A world-readable directory whose `faramesh/` mirrors the package (the lean launcher's -I -S root)."""
    d = tempfile.mkdtemp(prefix="faramesh-sd-pkg-", dir="/tmp")
    os.chmod(d, 0o755)
    pkg = Path(d) / "faramesh"
    pkg.mkdir(mode=0o755)
    (pkg / "__init__.py").symlink_to(REPO / "faramesh_pkg" / "__init__.py")
    for sub in ("sandbox", "launchers"):
        (pkg / sub).symlink_to(REPO / sub)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class SandboxStack:
    base: Path
    stack: Path
    workspace: Path
    spec_file: Path
    uid: int


@pytest.fixture
def sandbox_stack() -> Iterator[SandboxStack]:
    from faramesh.sandbox import cgroups
    from faramesh.sandbox.launch import build_spec, spec_to_json

    uid = 64700 + (os.getpid() % 20) * 10 + next(_uids) % 10
    base = Path(tempfile.mkdtemp(prefix="faramesh-sd-", dir="/tmp"))
    os.chmod(base, 0o755)
    stack = base / "stack"
    stack.mkdir(mode=0o755)
    (stack / "governance.fms").write_text("# not read by the launcher\n", encoding="utf-8")
    workspace = stack / "workspace"
    workspace.mkdir(mode=0o750)
    os.chown(workspace, uid, uid)
    spec = build_spec("full", f"sd{uid}", uid, uid, str(workspace), str(stack))
    spec_file = base / "spec.json"
    spec_file.write_text(spec_to_json(spec), encoding="utf-8")
    os.chmod(spec_file, 0o644)
    yield SandboxStack(base, stack, workspace, spec_file, uid)
    shutil.rmtree(base, ignore_errors=True)
    with contextlib.suppress(Exception):
        cgroups.remove_cgroup(spec.cgroup)


_uids = itertools.count()


def _launch_under(unit: Path, s: SandboxStack, pkg: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    launcher = ["/usr/bin/python3", "-I", "-S", "-c", BOOT, pkg, "--spec", str(s.spec_file), "--",
                "/usr/bin/python3", "-I", "-c", AGENT]
    done = subprocess.run(confine_argv(unit, str(s.stack), launcher), capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return done, (json.loads(lines[-1]) if lines else {})


def test_agents_work_under_the_supervisor_units_restrictions(pkg_root: str, sandbox_stack: SandboxStack) -> None:
    """A real launch, profile full, inside the supervisor unit's restrictions: every sandbox step applies,
    node's JIT runs, Python with ssl/sqlite, a shell, threads, fork, sockets, the workspace is writable."""
    require_root()
    tool("node")
    done, out = _launch_under(SUPERVISOR_FILE, sandbox_stack, pkg_root)
    assert done.returncode == 0, done.stderr
    for step in ("R3 host uid/gid", "S1 namespaces", "S5 new root", "S6 Landlock", "S8 seccomp full"):
        assert step in done.stderr, (step, done.stderr)
    assert out["node"][:2] == [0, "2000000"], out["node"]
    assert out["python"][:2] == [0, "ok"], out["python"]
    assert out["sh"] == [0, "fine"]
    assert out["thread"] is True and out["fork"] == 7 and out["sockets"] is True
    assert out["workspace"] == str(sandbox_stack.workspace)
    assert (sandbox_stack.workspace / "written-by-agent").stat().st_uid == sandbox_stack.uid


BREAKING = {
    # What each option would do to every agent (why the supervisor unit must not have it): the JIT dies,
    # or the sandbox refuses to start the agent, at the step named.
    "MemoryDenyWriteExecute=yes": "jit",
    "ProtectKernelTunables=yes": "SANDBOX_MOUNT_FAILED: mount('proc'",  # /proc/sys covered: mount_too_revealing
    "RestrictNamespaces=yes": "SANDBOX_NAMESPACE_FAILED: unshare(",  # S1
    "ProtectHostname=yes": "SANDBOX_NAMESPACE_FAILED: sethostname",  # S5
}


@pytest.mark.parametrize("option", sorted(BREAKING))
def test_a_unit_that_breaks_agents_is_caught(option: str, tmp_path: Path, pkg_root: str,
                                             sandbox_stack: SandboxStack) -> None:
    require_root()
    tool("node")
    unit = tmp_path / SUPERVISOR_FILE.name
    unit.write_text(SUPERVISOR_FILE.read_text(encoding="utf-8") + f"\n{option}\n", encoding="utf-8")
    done, out = _launch_under(unit, sandbox_stack, pkg_root)
    if BREAKING[option] == "jit":
        assert done.returncode == 0, done.stderr
        assert out["python"][:2] == [0, "ok"]
        assert out["node"][0] != 0, out["node"]
    else:
        assert done.returncode != 0 and not out, done.stdout
        assert f"REFUSED before exec: {BREAKING[option]}" in done.stderr, done.stderr


def test_engine_serves_under_its_units_restrictions() -> None:
    """The real `faramesh serve` as an unprivileged uid with the engine unit's seccomp filter (incl.
    MemoryDenyWriteExecute), address families, empty bounding set, no_new_privs and read-only tree: it
    reaches READY, answers a govern call and drains on SIGTERM."""
    require_root()
    from engine_harness import EngineDirs, EngineProcess, compile_policy, govern, make_stack, short_tmpdir

    uid = 64690 + os.getpid() % 10
    root = short_tmpdir("fmsd")
    dirs = EngineDirs.fresh()
    try:
        os.chmod(root, 0o755)
        stack = make_stack(root)
        policy_file = root / "policy.json"
        compile_policy(stack, policy_file)
        for d in (dirs.state_root, dirs.runtime_root):
            os.chown(d, uid, uid)

        class ConfinedEngine(EngineProcess):
            def argv(self) -> list[str]:
                serve = [PYTHON, "-m", "faramesh.launchers.main", "serve", "--dir", str(self.stack), "--policy",
                         str(self.policy_file)]
                return confine_argv(ENGINE_FILE, str(self.stack), serve, uid=uid,
                                    rw=[str(dirs.state_root), str(dirs.runtime_root)])

        engine = ConfinedEngine(stack, policy_file, dirs)
        engine.start(timeout=60)
        try:
            status = _status_fields(Path(f"/proc/{engine.pid}/status").read_text())
            assert status["Uid"].split()[0] == str(uid)
            assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
            assert int(status["CapBnd"], 16) == 0
            with engine.agent("bot") as conn:
                reply = conn.call(govern("search", {"query": "reset password"}, agent_id="bot"))
            assert reply["effect"] == "PERMIT", reply
            with engine.agent("bot") as conn:
                reply = conn.call(govern("refund", {"amount": 1000}, agent_id="bot"))
            assert reply["effect"] == "DENY", reply
            assert engine.terminate() == 0, engine.log()
        finally:
            engine.ensure_stopped()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dirs.cleanup()


# --------------------------------------------------------------------- where PID 1 is systemd: for real


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text(encoding="ascii").strip()
    except OSError as exc:
        return f"unknown ({exc.strerror})"


SYSTEMD_IS_PID1 = os.path.isdir("/run/systemd/system")  # sd_booted(3)

IT_AGENT = r"""
import json, os, subprocess, sys
js = ("const add = new Function('a', 'b', 'return a + b'); let s = 0;"
      "for (let i = 0; i < 2e6; i++) s = add(s, 1); console.log(s)")
node = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=60)
py = subprocess.run(["/usr/bin/python3", "-c", "import json, ssl, sqlite3, urllib.request; print('ok')"],
                    capture_output=True, text=True, timeout=60)
print("faramesh-it checks " + json.dumps({"node": [node.returncode, node.stdout.strip()],
                                         "python": [py.returncode, py.stdout.strip()]}), flush=True)
here = os.path.dirname(os.path.abspath(__file__))
os.execv(sys.executable, [sys.executable, "-S", os.path.join(here, "supervised_agent.py"), *sys.argv[1:]])
"""


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def _wait_for(predicate: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.skipif(not SYSTEMD_IS_PID1, reason=f"needs systemd as PID 1 (PID 1 here is {_pid1()!r})")
def test_the_target_runs_the_seed_smoke_test_for_real() -> None:
    """Install the units (runtime, /run/systemd/system), the users and directories, a copy of the
    support-bot stack whose agent runs node's JIT and the Python checks in the sandbox before the seed's
    smoke test; start faramesh@<stack>.target; approve the deferred refund as the operator; the smoke
    test passes; stopping the target stops everything."""
    require_root()
    tool("node")
    from faramesh.engine.paths import stack_paths
    from faramesh.engine.policy.stack import compile_stack

    example = REPO / "examples" / "support-bot"
    # Not under /tmp or /var/tmp: the supervisor unit has PrivateTmp=yes.
    base = Path(tempfile.mkdtemp(prefix="faramesh-it-", dir="/var/lib"))
    stack = base / "support-bot"
    runtime_units = Path("/run/systemd/system")
    installed: list[Path] = []
    escaped = sdsec.escape_path(str(stack))
    target = f"faramesh@{escaped}.target"
    try:
        os.chmod(base, 0o755)
        shutil.copytree(example, stack, ignore=shutil.ignore_patterns("tests", "__pycache__", "demo.py"))
        shutil.copyfile(REPO / "engine" / "client.py", stack / "faramesh_client.py")
        (stack / "it_agent.py").write_text(IT_AGENT, encoding="utf-8")
        command = f"/usr/bin/python3 -S {stack / 'it_agent.py'} --approval-timeout 60"
        text = (stack / "governance.fms").read_text(encoding="utf-8")
        text = text.replace("runtime {\n", "runtime {\n  os_tier = true\n", 1)
        text = text.replace('agent "support-bot" {\n', f'agent "support-bot" {{\n  command = "{command}"\n', 1)
        (stack / "governance.fms").write_text(text, encoding="utf-8")

        subprocess.run([tool("systemd-sysusers"), str(SYSUSERS_FILE)], check=True, timeout=60)
        subprocess.run([tool("systemd-tmpfiles"), "--create", str(TMPFILES_FILE)], check=True, timeout=60)
        engine_user = pwd.getpwnam("faramesh")
        operators = grp.getgrnam("faramesh-operators")
        for unit in (ENGINE_FILE, SUPERVISOR_FILE, TARGET_FILE):
            dest = runtime_units / unit.name
            shutil.copyfile(unit, dest)
            installed.append(dest)
        if not os.path.exists("/usr/bin/faramesh"):  # not installed: the checkout's entry point, by drop-in
            for unit in (ENGINE_FILE, SUPERVISOR_FILE):
                verb = "serve" if unit is ENGINE_FILE else "supervise"
                dropin = runtime_units / f"{unit.name}.d" / "checkout.conf"
                dropin.parent.mkdir(exist_ok=True)
                dropin.write_text(f"[Service]\nExecStart=\nExecStart={REPO / '.venv/bin/faramesh'} {verb} --dir %f\n",
                                  encoding="utf-8")
                installed.append(dropin.parent)

        # What `faramesh apply` installs: the compiled policy in the state dir, owned by the engine's user.
        paths = stack_paths(stack, euid=0, env={})
        paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths.policy_copy.write_bytes(compile_stack(stack, env={}).policy.to_json())
        for path in (paths.state_dir, paths.policy_copy):
            os.chown(path, engine_user.pw_uid, engine_user.pw_gid)

        _systemctl("daemon-reload")
        _systemctl("start", target)
        assert _systemctl("is-active", target).stdout.strip() == "active"
        engine_pid = int(_systemctl("show", "-P", "MainPID", f"faramesh-engine@{escaped}.service").stdout)
        status = _status_fields(Path(f"/proc/{engine_pid}/status").read_text())
        assert status["Uid"].split()[0] == str(engine_user.pw_uid)
        assert str(operators.gr_gid) in status["Groups"].split()
        assert status["NoNewPrivs"] == "1" and int(status["CapBnd"], 16) == 0

        agent_log = paths.log_dir / "agent-support-bot.log"

        def log() -> str:
            return agent_log.read_text(errors="replace") if agent_log.exists() else ""

        checks = _wait_for(lambda: re.search(r"faramesh-it checks (\{.*\})", log()), "the in-sandbox checks")
        result = json.loads(checks.group(1))
        assert result["node"] == [0, "2000000"] and result["python"] == [0, "ok"], result
        approval = _wait_for(lambda: re.search(r"approvals approve (\S+)", log()), "the deferred refund")
        cli = "/usr/bin/faramesh" if os.path.exists("/usr/bin/faramesh") else str(REPO / ".venv/bin/faramesh")
        approved = subprocess.run([cli, "approvals", "approve", approval.group(1), "--dir", str(stack)],
                                  capture_output=True, text=True, timeout=60, check=False)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        verdict = _wait_for(lambda: re.search(r"smoke test exit (\d+)", log()), "the smoke test's verdict")
        assert verdict.group(1) == "0", log()

        _systemctl("stop", target)
        for name in (f"faramesh-engine@{escaped}.service", f"faramesh-supervisor@{escaped}.service"):
            assert _systemctl("is-active", name, check=False).stdout.strip() == "inactive", name
    finally:
        _systemctl("stop", target, check=False)
        for path in installed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        _systemctl("daemon-reload", check=False)
        with contextlib.suppress(Exception):
            p = stack_paths(stack, euid=0, env={})
            for d in (p.state_dir, p.runtime_dir, p.log_dir):
                shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["confine"]:
        sys.exit(confine_main(sys.argv[2:]))
    sys.stderr.write("usage: test_systemd_units.py confine --unit UNIT --instance DIR [--uid N] [--rw DIR] -- CMD\n")
    sys.exit(64)
