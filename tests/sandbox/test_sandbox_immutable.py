"""immutable: FS_IMMUTABLE_FL and trusted.faramesh.* xattrs on a filesystem that holds them; a typed
error on one that cannot (ramfs, mounted in a forked child's private mount namespace)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from faramesh.sandbox import immutable, mounts, namespaces
from faramesh.sandbox.errors import ImmutableError, ImmutableUnsupported
from sandbox_helpers import IS_ROOT, become_agent, forked, put

needs_root = pytest.mark.skipif(not IS_ROOT, reason="CAP_LINUX_IMMUTABLE / trusted.* need root")


def _supports_flag(directory: str) -> bool:
    fd, probe = tempfile.mkstemp(dir=directory)
    os.close(fd)
    try:
        immutable.get_flags(probe)  # a filesystem without fileattr support fails here already
        if IS_ROOT:
            immutable.set_immutable(probe)
            immutable.clear_immutable(probe)
        return True
    except ImmutableUnsupported:
        return False
    finally:
        os.unlink(probe)


@pytest.fixture
def flag_dir() -> Iterator[str]:
    """A temp dir on a filesystem that can hold the flag: /var/tmp, /tmp or the checkout (ext4/xfs/…)."""
    for candidate in ("/var/tmp", tempfile.gettempdir(), os.path.dirname(os.path.abspath(__file__))):
        d = tempfile.mkdtemp(prefix="faramesh-imm-", dir=candidate)
        if _supports_flag(d):
            break
        shutil.rmtree(d)
    else:
        pytest.fail("no filesystem here holds FS_IMMUTABLE_FL")
    try:
        yield d
    finally:
        for root, dirs, files in os.walk(d):
            for name in dirs + files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    with contextlib.suppress(ImmutableError):
                        immutable.clear_immutable(p)
        shutil.rmtree(d)


def _errno(fn: Any) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno or -1


@needs_root
def test_lock_makes_the_file_immutable_even_for_root(flag_dir: str) -> None:
    policy = os.path.join(flag_dir, "policy.json")
    with open(policy, "w") as f:
        f.write('{"v": 1}')
    immutable.lock(policy, version="sha256:abc", when="2026-01-01T00:00:00Z")
    assert immutable.is_set(policy)
    assert immutable.state(policy) == {"immutable": True, "version": "sha256:abc",
                                       "lock": "locked 2026-01-01T00:00:00Z"}
    if shutil.which("lsattr"):
        out = subprocess.run(["lsattr", policy], capture_output=True, text=True, check=True).stdout
        assert "i" in out.split()[0]
    assert _errno(lambda: put(policy, "x", "a")) == errno.EPERM
    assert _errno(lambda: os.truncate(policy, 0)) == errno.EPERM
    assert _errno(lambda: os.unlink(policy)) == errno.EPERM
    assert _errno(lambda: os.rename(policy, policy + ".moved")) == errno.EPERM
    assert _errno(lambda: os.link(policy, policy + ".hard")) == errno.EPERM
    assert _errno(lambda: os.setxattr(policy, "trusted.faramesh.version", b"forged")) == errno.EPERM
    # Re-locking with a new version works (clear → xattrs → set) and unlock records when.
    immutable.lock(policy, version="sha256:def", when="t2")
    assert immutable.get_xattr(policy, "version") == "sha256:def"
    immutable.unlock(policy, when="t3")
    assert not immutable.is_set(policy)
    assert immutable.get_xattr(policy, "lock") == "unlocked t3"
    with open(policy, "a") as f:
        f.write("\n")


@needs_root
def test_directory_lock_blocks_new_entries(flag_dir: str) -> None:
    d = os.path.join(flag_dir, ".faramesh")
    os.mkdir(d)
    immutable.set_immutable(d)
    assert _errno(lambda: put(os.path.join(d, "new"), "")) == errno.EPERM
    assert _errno(lambda: os.rmdir(d)) == errno.EPERM
    immutable.clear_immutable(d)
    assert immutable.get_xattr(d, "version") is None


def test_symlinks_are_never_followed(flag_dir: str) -> None:
    target = os.path.join(flag_dir, "target")
    put(target, "")
    link = os.path.join(flag_dir, "link")
    os.symlink(target, link)
    with pytest.raises(ImmutableError) as e:
        immutable.set_immutable(link)
    assert e.value.errno == errno.ELOOP
    assert not immutable.is_set(target)


@needs_root
def test_filesystem_without_the_flag_is_a_typed_error(tmp_path: Any) -> None:
    mnt = str(tmp_path / "ramfs")
    os.mkdir(mnt)

    def child() -> dict[str, Any]:
        namespaces.unshare(namespaces.CLONE_NEWNS)
        mounts.make_rprivate("/")
        mounts.mount("ramfs", mnt, "ramfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=700")
        p = os.path.join(mnt, "policy.json")
        put(p, "")
        out: dict[str, Any] = {"mounted": True}
        attempts = (
            ("flag", lambda: immutable.set_immutable(p)),
            ("xattr", lambda: immutable.set_xattr(p, "version", "v")),
        )
        for what, fn in attempts:
            try:
                fn()
                out[what] = None
            except ImmutableUnsupported as e:
                out[what] = [e.code, e.errno]
        return out

    res = forked(child)
    assert res["mounted"] is True
    assert res["flag"] == ["SANDBOX_IMMUTABLE_UNSUPPORTED", errno.ENOTTY]
    assert res["xattr"] is None or res["xattr"][0] == "SANDBOX_IMMUTABLE_UNSUPPORTED"


def test_unprivileged_lock_is_refused(flag_dir: str) -> None:
    """Without CAP_LINUX_IMMUTABLE (the agent's uid, or an unprivileged run) the flag cannot be set."""
    p = os.path.join(flag_dir, "f")
    put(p, "")
    os.chmod(flag_dir, 0o755)
    os.chmod(p, 0o644)

    def child() -> dict[str, Any]:
        uid, _gid = become_agent()
        try:
            immutable.set_immutable(p)
            return {"uid": uid, "code": None}
        except ImmutableError as e:
            return {"uid": uid, "code": e.code, "errno": e.errno}

    res = forked(child)
    assert res["uid"] != 0
    assert res["code"] == "SANDBOX_IMMUTABLE_FAILED" and res["errno"] == errno.EPERM
    assert not immutable.is_set(p)
