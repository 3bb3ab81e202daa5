"""seccomp: the exported BPF, loaded in forked children, denies what DESIGN.md §5 lists and nothing more."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import socket
import struct
import subprocess
import threading
from typing import Any

import pyseccomp
import pytest
from faramesh.sandbox import caps, seccomp
from faramesh.sandbox.errors import NoNewPrivsNotSet, SeccompError
from sandbox_helpers import forked, raw, raw_nr

FULL = seccomp.build_filter("full")
MINIMAL = seccomp.build_filter("minimal")
EPERM_ACTION = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS_ACTION = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS


def nr(name: str) -> int:
    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    assert number >= 0, name
    return number


AF_NETLINK, AF_PACKET, AF_VSOCK, AF_BLUETOOTH, AF_ALG = 16, 17, 40, 31, 38
HIGH = 1 << 32
READ_IMPLIES_EXEC = 0x0400000
ADDR_NO_RANDOMIZE = 0x0040000


def confine(bpf: bytes) -> dict[str, Any]:
    """In the child: no_new_privs, then the filter; reports that both took."""
    caps.set_no_new_privs()
    seccomp.load_filter(bpf)
    status = caps.current_caps()
    return {"seccomp_mode": status["Seccomp"], "nnp": status["NoNewPrivs"]}


def test_bpf_has_only_the_expected_actions_and_never_log() -> None:
    for bpf in (FULL, MINIMAL):
        actions = seccomp.return_actions(bpf)
        assert seccomp.SECCOMP_RET_LOG not in actions
        assert actions == {seccomp.SECCOMP_RET_ALLOW, EPERM_ACTION, ENOSYS_ACTION, seccomp.SECCOMP_RET_KILL_PROCESS}
        first = next(seccomp.instructions(bpf))
        assert first == (0x20, 0, 0, 4)  # ld [4]: seccomp_data.arch is checked before anything else
    assert len(FULL) // 8 < seccomp.BPF_MAXINSNS
    assert len(MINIMAL) < len(FULL)


def test_unknown_profile_and_bad_bpf_are_typed_errors() -> None:
    with pytest.raises(SeccompError) as e:
        seccomp.build_filter("off")
    assert e.value.code == "SANDBOX_SECCOMP_FAILED"
    with pytest.raises(SeccompError):
        seccomp.load_filter(b"\0" * 7)


def test_load_refuses_without_no_new_privs() -> None:
    def child() -> dict[str, Any]:
        try:
            seccomp.load_filter(FULL)
        except NoNewPrivsNotSet as e:
            return {"code": e.code, "mode": caps.current_caps()["Seccomp"]}
        return {"code": None}

    res = forked(child)
    assert res["code"] == "SANDBOX_NO_NEW_PRIVS_NOT_SET"
    assert res["mode"] == 0


def _attempts() -> dict[str, int]:
    """Every denied call of the full profile, by raw syscall, each with arguments that stay harmless if
    a call were let through (ptrace and process_vm_* target a sacrificial child, never pytest)."""
    victim = os.fork()
    if victim == 0:
        signal.pause()
        os._exit(0)
    try:
        return _attempts_on(victim)
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)


def _attempts_on(victim: int) -> dict[str, int]:
    out: dict[str, int] = {}
    out["unshare_user"] = raw("unshare", 0x10000000)
    out["unshare_ns"] = raw("unshare", 0x00020000)
    out["setns"] = raw_nr(nr("setns"), 0, 0)
    out["mount"] = raw_nr(nr("mount"), 0, 0, 0, 0, 0)
    out["umount2"] = raw_nr(nr("umount2"), 0, 0)
    out["pivot_root"] = raw_nr(nr("pivot_root"), 0, 0)
    for name in ("fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr"):
        out[name] = raw_nr(nr(name), 0, 0, 0, 0, 0)
    out["io_uring_setup"] = raw_nr(nr("io_uring_setup"), 1, 0)
    out["io_uring_enter"] = raw_nr(nr("io_uring_enter"), 0, 0, 0, 0, 0)
    out["io_uring_register"] = raw_nr(nr("io_uring_register"), 0, 0, 0, 0)
    out["ptrace_attach"] = raw_nr(nr("ptrace"), 16, victim, 0, 0)
    out["process_vm_readv"] = raw_nr(nr("process_vm_readv"), victim, 0, 0, 0, 0, 0)
    out["process_vm_writev"] = raw_nr(nr("process_vm_writev"), victim, 0, 0, 0, 0, 0)
    out["bpf"] = raw_nr(nr("bpf"), 0, 0, 0)
    out["perf_event_open"] = raw_nr(nr("perf_event_open"), 0, 0, -1, -1, 0)
    out["userfaultfd"] = raw_nr(nr("userfaultfd"), 0)
    out["keyctl"] = raw_nr(nr("keyctl"), 0, 0)
    out["add_key"] = raw_nr(nr("add_key"), 0, 0, 0, 0, 0)
    out["request_key"] = raw_nr(nr("request_key"), 0, 0, 0, 0)
    # nr_segments 0 would *unload* a loaded kexec image if the call got through: use 1000 segments and
    # an unknown flag, which the kernel rejects with EINVAL before doing anything.
    out["kexec_load"] = raw_nr(nr("kexec_load"), 0, 1000, 0, 0x100)
    out["kexec_file_load"] = raw_nr(nr("kexec_file_load"), -1, -1, 0, 0, 0)
    out["init_module"] = raw_nr(nr("init_module"), 0, 0, 0)
    out["finit_module"] = raw_nr(nr("finit_module"), -1, 0, 0)
    out["delete_module"] = raw_nr(nr("delete_module"), 0, 0)
    out["open_by_handle_at"] = raw_nr(nr("open_by_handle_at"), -1, 0, 0)
    out["clone_newuser"] = raw_nr(nr("clone"), 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
    out["clone_newnet_highbits"] = raw_nr(nr("clone"), HIGH | 0x40000000 | signal.SIGCHLD, 0, 0, 0, 0)
    out["clone3"] = raw_nr(nr("clone3"), 0, 0)
    for fam_name, fam in (("netlink", AF_NETLINK), ("packet", AF_PACKET), ("vsock", AF_VSOCK),
                          ("bluetooth", AF_BLUETOOTH), ("alg", AF_ALG)):
        out[f"socket_{fam_name}"] = raw_nr(nr("socket"), fam, socket.SOCK_RAW, 0)
        out[f"socket_{fam_name}_bit32"] = raw_nr(nr("socket"), fam | HIGH, socket.SOCK_RAW, 0)
        out[f"socketpair_{fam_name}"] = raw_nr(nr("socketpair"), fam, socket.SOCK_DGRAM, 0, 0)
    out["personality_read_implies_exec"] = raw_nr(nr("personality"), READ_IMPLIES_EXEC)
    out["personality_no_randomize"] = raw_nr(nr("personality"), ADDR_NO_RANDOMIZE)
    out["personality_rie_bit31"] = raw_nr(nr("personality"), READ_IMPLIES_EXEC | 0x80000000)
    out["personality_rie_bit32"] = raw_nr(nr("personality"), READ_IMPLIES_EXEC | HIGH)
    out["personality_linux32"] = raw_nr(nr("personality"), 0x0008)
    return out


# Full profile: what each attempt must return (every entry of _attempts()).
_DENIED_FULL = [
    "unshare_user", "unshare_ns", "setns", "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "ptrace_attach", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "clone_newuser", "clone_newnet_highbits", "socket_netlink", "socket_netlink_bit32",
    "socketpair_netlink", "socket_packet", "socket_packet_bit32", "socketpair_packet", "socket_vsock",
    "socket_vsock_bit32", "socketpair_vsock", "socket_bluetooth", "socket_bluetooth_bit32", "socketpair_bluetooth",
    "socket_alg", "socket_alg_bit32", "socketpair_alg", "personality_read_implies_exec", "personality_no_randomize",
    "personality_rie_bit31", "personality_rie_bit32", "personality_linux32",
]
EXPECTED_FULL = {name: errno.EPERM for name in _DENIED_FULL}
EXPECTED_FULL["clone3"] = errno.ENOSYS


def _tty_attempts() -> dict[str, int]:
    """TIOCSTI on a fresh pty (root could inject without the filter), plain and with high bits."""
    master, slave = os.openpty()
    c = ctypes.c_char(b"x")
    out = {
        "tiocsti": raw_nr(nr("ioctl"), slave, seccomp.TIOCSTI, ctypes.addressof(c)),
        "tiocsti_high": raw_nr(nr("ioctl"), slave, HIGH | seccomp.TIOCSTI, ctypes.addressof(c)),
        "tiocsti_high_all": raw_nr(nr("ioctl"), slave, (0xFFFFFFFF << 32) | seccomp.TIOCSTI, ctypes.addressof(c)),
        "tioclinux": raw_nr(nr("ioctl"), slave, seccomp.TIOCLINUX, ctypes.addressof(c)),
    }
    buf = ctypes.create_string_buffer(64)
    out["tcgets"] = raw_nr(nr("ioctl"), slave, 0x5401, ctypes.addressof(buf))
    os.close(master)
    os.close(slave)
    return out


def _everyday() -> dict[str, Any]:
    """What a sandbox must not break: dynamic binaries, Python with ssl/sqlite, threads, fork."""
    out: dict[str, Any] = {}
    py = subprocess.run(["/usr/bin/python3", "-c", "import json, ssl, sqlite3, urllib.request; print('ok')"],
                        capture_output=True, text=True, timeout=30)
    out["python"] = (py.returncode, py.stdout.strip(), py.stderr[-500:])
    sh = subprocess.run(["/bin/sh", "-c", "ls / >/dev/null && echo fine"], capture_output=True, text=True, timeout=30)
    out["sh"] = (sh.returncode, sh.stdout.strip())
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    t.start()  # pthread_create tries clone3 (ENOSYS) and falls back to clone
    t.join()
    out["thread"] = len(box) == 1
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out["personality_query"] = raw_nr(nr("personality"), 0xFFFFFFFF)
    out["personality_zero"] = raw_nr(nr("personality"), 0)
    for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.close()
    out["sockets"] = True
    return out


def test_full_filter_denies_the_list() -> None:
    def child() -> dict[str, Any]:
        before = {
            "bpf_unfiltered": raw_nr(nr("bpf"), 0, 0, 0),
            "netlink_unfiltered": raw_nr(nr("socket"), AF_NETLINK, socket.SOCK_RAW, 0),
        }
        out = confine(FULL)
        out.update(before)
        out["attempts"] = _attempts()
        out["tty"] = _tty_attempts()
        return out

    res = forked(child)
    assert res["seccomp_mode"] == 2 and res["nnp"] == 1
    if os.geteuid() == 0:  # the control: unfiltered, root gets past the EPERM stage
        assert res["netlink_unfiltered"] == 0
        assert res["bpf_unfiltered"] != errno.EPERM
    got = res["attempts"]
    assert set(got) == set(EXPECTED_FULL)
    wrong = {k: (errno.errorcode.get(v, v), errno.errorcode[EXPECTED_FULL[k]]) for k, v in got.items()
             if v != EXPECTED_FULL[k]}
    assert not wrong, wrong
    tty = res["tty"]
    assert tty["tiocsti"] == tty["tiocsti_high"] == tty["tiocsti_high_all"] == tty["tioclinux"] == errno.EPERM
    assert tty["tcgets"] == 0


def test_full_filter_keeps_everyday_programs_working() -> None:
    def child() -> dict[str, Any]:
        out = confine(FULL)
        out.update(_everyday())
        return out

    res = forked(child, timeout=60)
    assert res["seccomp_mode"] == 2
    assert res["python"][0] == 0 and res["python"][1] == "ok", res["python"]
    assert res["sh"] == [0, "fine"]
    assert res["thread"] is True
    assert res["fork_status"] == 7
    assert res["personality_query"] == 0 and res["personality_zero"] == 0
    assert res["sockets"] is True


def test_minimal_filter_denies_only_its_subset() -> None:
    def child() -> dict[str, Any]:
        out = confine(MINIMAL)
        out["attempts"] = _attempts()
        out["everyday"] = _everyday()
        return out

    res = forked(child, timeout=60)
    assert res["seccomp_mode"] == 2
    got = res["attempts"]
    for name in ("unshare_user", "setns", "mount", "pivot_root", "fsopen", "open_tree", "move_mount",
                 "mount_setattr", "io_uring_setup", "clone_newuser", "clone_newnet_highbits",
                 "socket_netlink", "socket_netlink_bit32", "socket_packet_bit32", "socket_vsock_bit32"):
        assert got[name] == errno.EPERM, name
    assert got["clone3"] == errno.ENOSYS
    # Not in `minimal`: these reach the kernel, which answers for itself.
    assert got["personality_read_implies_exec"] == 0
    assert got["keyctl"] != errno.EPERM or os.geteuid() != 0
    assert res["everyday"]["python"][0] == 0


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386/x32 ABIs exist only on x86_64")
@pytest.mark.parametrize("abi", ["i386", "x32"])
def test_non_native_abi_kills_the_process(abi: str) -> None:
    # mov eax, 20 (getpid on i386); int 0x80; ret   |   mov eax, 0x40000027 (x32 getpid); syscall; ret
    code = bytes.fromhex("b814000000cd80c3") if abi == "i386" else bytes.fromhex("b8270000400f05c3")

    def child() -> dict[str, Any]:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        buf.write(code)
        fn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        control = fn()  # unfiltered: the call works (or ENOSYS for x32 on kernels without it)
        confine(FULL)
        os.write(2, b"")  # still alive after loading
        fn()
        return {"survived": True, "control": control}

    res = forked(child)
    assert res.signal == signal.SIGSYS, res
    assert res.data == {}


def test_violation_notification_reports_and_fails_closed() -> None:
    """Stretch of DESIGN.md §5: a second filter hands `mount` etc. to a listener, which answers EPERM;
    with the listener gone the call fails (ENOSYS) instead of running."""
    main = seccomp.build_filter("full", notify_calls=True)
    notify = seccomp.violation_notify_filter("full")

    def supervisor_side() -> dict[str, Any]:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the "agent"
            try:
                parent_sock.close()
                caps.set_no_new_privs()
                seccomp.load_filter(main)
                listener = seccomp.load_filter(notify, new_listener=True)
                assert listener is not None
                socket.send_fds(child_sock, [b"L"], [listener])
                os.close(listener)
                child_sock.recv(1)  # wait until the supervisor holds the fd
                first = raw_nr(nr("mount"), 0, 0, 0, 0, 0)
                child_sock.sendall(bytes([first]))
                child_sock.recv(1)  # the supervisor has closed its listener
                second = raw_nr(nr("mount"), 0, 0, 0, 0, 0)
                unshare = raw("unshare", 0x10000000)
                child_sock.sendall(bytes([second, unshare]))
            finally:
                os._exit(0)
        child_sock.close()
        _msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 1, 1)
        listener = fds[0]
        parent_sock.sendall(b"g")
        notif = seccomp.receive_violation(listener)
        seen = notif.data.nr
        seccomp.respond_eperm(listener, notif)
        first = parent_sock.recv(1)[0]
        os.close(listener)
        parent_sock.sendall(b"c")
        rest = parent_sock.recv(2)
        os.waitpid(pid, 0)
        return {"seen": seen, "first": first, "second": rest[0], "unshare": rest[1]}

    res = forked(supervisor_side)
    assert res["seen"] == nr("mount")
    assert res["first"] == errno.EPERM
    assert res["second"] == errno.ENOSYS
    assert res["unshare"] == errno.ENOSYS


def test_instructions_decoder_round_trips() -> None:
    prog = struct.pack("=HBBI", 0x06, 0, 0, seccomp.SECCOMP_RET_ALLOW)
    assert list(seccomp.instructions(prog)) == [(0x06, 0, 0, seccomp.SECCOMP_RET_ALLOW)]
    assert seccomp.return_actions(prog) == {seccomp.SECCOMP_RET_ALLOW}


def test_load_refuses_a_threaded_process() -> None:
    def child() -> dict[str, Any]:
        caps.set_no_new_privs()
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            seccomp.load_filter(FULL)
            code = None
        except SeccompError as e:
            code = e.code
        stop.set()
        t.join()
        return {"code": code, "mode": caps.current_caps()["Seccomp"]}

    res = forked(child)
    assert res["code"] == "SANDBOX_SECCOMP_FAILED" and res["mode"] == 0


def test_only_calls_the_profile_denies_are_reported() -> None:
    """A call the profile allows must never wait on the supervisor: `minimal` allows ptrace and bpf."""
    assert "ptrace" not in seccomp.notify_calls_for("minimal")
    assert "bpf" not in seccomp.notify_calls_for("minimal")
    assert {"mount", "unshare", "setns", "io_uring_setup"} <= set(seccomp.notify_calls_for("minimal"))
    assert {"ptrace", "bpf", "kexec_load", "init_module"} <= set(seccomp.notify_calls_for("full"))
    # The notifying variant of a profile leaves exactly the reported calls out of its EPERM list.
    import pyseccomp as sc

    for profile in ("full", "minimal"):
        plain = seccomp.build_filter(profile)
        notifying = seccomp.build_filter(profile, notify_calls=True)
        assert notifying != plain
        listener = seccomp.violation_notify_filter(profile)
        numbers = {k for code, _jt, _jf, k in seccomp.instructions(listener) if code == 0x15}  # BPF_JEQ|K
        for name in seccomp.notify_calls_for(profile):
            number = int(sc.resolve_syscall(0, name)) if int(sc.resolve_syscall(0, name)) >= 0 else None
            if number is not None:
                assert number in numbers, (profile, name)
        assert int(sc.resolve_syscall(0, "ptrace")) not in numbers or profile == "full"
