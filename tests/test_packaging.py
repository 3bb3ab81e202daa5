"""Packaging (issue 7): `packaging/build-deb`, the .deb's metadata and contents, its installation into a
throwaway root, and `packaging/install.sh`.

The .deb is built once per session (zstd: the same tree as the default xz, built in a fraction of the
time). Installs never modify this host: they run in a private mount namespace (`unshare --mount`) where
/usr and /etc are overlayfs mounts whose upper layers live under the test's tmp dir, so whatever the
package writes there (and nothing else) is left in those upper layers for the test to list after the
namespace is gone.

- The .deb goes through `dpkg --root` into a root the test makes: its own /opt, /var, /run, an
  overlay of the host's /usr (the system Python and libraries the venv runs on) and /etc, and a dpkg
  database holding just the packages the .deb depends on, so dpkg checks `Depends:` for real. dpkg runs
  the maintainer scripts chrooted there; then `faramesh` runs from the chroot, as root and as `faramesh`.
- install.sh runs with its default paths in a namespace where /usr, /etc, /opt, /var and /run are
  overlays of the host's.

The host already may have the `faramesh` user (other tests create it): inside the namespace the accounts
are removed from the overlaid /etc first, so the maintainer scripts really create them.
"""

from __future__ import annotations

import importlib.util
import itertools
import marshal
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
EXAMPLE = REPO / "examples" / "support-bot"
SYSTEM_PYTHON = "/usr/bin/python3"
CI = os.environ.get("CI") == "true"
ALLOWED_PREFIXES = (
    "opt/faramesh/",
    "usr/bin/faramesh",
    "usr/lib/systemd/system/",
    "usr/lib/sysusers.d/",
    "usr/lib/tmpfiles.d/",
    "usr/share/doc/faramesh/",
)
# What creating users may change in /etc, besides the directories tmpfiles.d/faramesh.conf names.
ACCOUNT_FILES = {"passwd", "group", "shadow", "gshadow", "passwd-", "group-", "shadow-", "gshadow-", ".pwd.lock",
                 "subuid", "subgid", "subuid-", "subgid-"}


def _load_build_deb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("faramesh_build_deb", PACKAGING / "build_deb.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


build_deb = _load_build_deb()


def _version() -> str:
    text = (REPO / "faramesh_pkg" / "__init__.py").read_text(encoding="utf-8")
    found = build_deb.version_from_init(text)
    assert isinstance(found, str)
    return found


def _require(ok: bool, reason: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure (DESIGN.md §7)."""
    if not ok:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    _require(not missing, f"needs {', '.join(missing)}")


def _require_namespaces() -> None:
    _require(os.geteuid() == 0, "installing into a throwaway root needs root (mount namespace, overlayfs)")
    _require_tools("unshare", "chroot", "setpriv", "dpkg")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           check=False)
    _require(probe.returncode == 0, f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}")
    with open("/proc/filesystems", encoding="ascii") as fs:
        _require(any(line.split()[-1] == "overlay" for line in fs if line.strip()), "the kernel lacks overlayfs")


def _control_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


# ------------------------------------------------------------------------------------ the pure helpers


@pytest.mark.parametrize(
    ("pep440", "debian"),
    [
        ("0.1.0", "0.1.0"),
        ("1.0rc1", "1.0~rc1"),
        ("1.0.0-beta.2", "1.0.0~b2"),
        ("2.0.dev3", "2.0~~dev3"),
        ("2.0a1.dev2", "2.0~a1~~dev2"),
        ("1.0.post2", "1.0+post2"),
        ("1!3.1", "1:3.1"),
        ("1.2+local_build.7", "1.2+local.build.7"),
    ],
)
def test_debian_version_spelling(pep440: str, debian: str) -> None:
    assert build_deb.debian_version(pep440) == debian


def test_debian_versions_sort_as_pep440_does() -> None:
    _require_tools("dpkg")
    ordered = ["1.0.dev1", "1.0a1.dev1", "1.0a1", "1.0a2.dev1", "1.0a2", "1.0b1", "1.0rc1", "1.0",
               "1.0.post1.dev1", "1.0.post1", "1.0.1", "1!0.1"]
    converted = [build_deb.debian_version(v) for v in ordered]
    for lower, higher in itertools.pairwise(converted):
        verdict = subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher], check=False)
        assert verdict.returncode == 0, f"dpkg sorts {higher} before {lower}"


def test_debian_version_refuses_what_is_not_pep440() -> None:
    with pytest.raises(build_deb.BuildError) as err:
        build_deb.debian_version("v1 final")
    assert err.value.code == "PKG_BAD_VERSION"


def test_version_must_agree_between_pyproject_and_package(tmp_path: Path) -> None:
    (tmp_path / "faramesh_pkg").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "faramesh"\nversion = "1.0"\n', encoding="utf-8")
    (tmp_path / "faramesh_pkg" / "__init__.py").write_text('__version__ = "1.1"\n', encoding="utf-8")
    with pytest.raises(build_deb.BuildError) as err:
        build_deb.read_version(tmp_path)
    assert err.value.code == "PKG_VERSION_MISMATCH"
    (tmp_path / "faramesh_pkg" / "__init__.py").write_text('__version__ = "1.0"\n', encoding="utf-8")
    assert build_deb.read_version(tmp_path) == "1.0"


def test_build_deb_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_deb.main(["--extras", "providers;rm -rf /"]) == 64
    assert "--extras" in capsys.readouterr().err
    assert build_deb.main(["--compress", "lzma"]) == 64


def test_parse_ldd_attributes_libraries_and_missing_ones() -> None:
    output = (
        "/v/a.so:\n"
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f)\n"
        "\tlibre2-1.so => /v/re2.libs/libre2-1.so (0x00007f)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n"
        "/v/b.so:\n"
        "\tlibfoo.so.9 => not found\n"
    )
    resolved, missing = build_deb.parse_ldd(output)
    assert resolved == {"/v/a.so": {"/lib/x86_64-linux-gnu/libstdc++.so.6", "/v/re2.libs/libre2-1.so"}}
    assert missing == {"/v/b.so": {"libfoo.so.9"}}


def test_parse_dpkg_search_drops_architectures_and_diversions() -> None:
    output = (
        "libc6:amd64, libc6:i386: /lib/x86_64-linux-gnu/libc.so.6\n"
        "diversion by dash from: /bin/sh\n"
        "zlib1g:amd64: /lib/x86_64-linux-gnu/libz.so.1.2.13\n"
    )
    assert build_deb.parse_dpkg_search(output) == {
        "/lib/x86_64-linux-gnu/libc.so.6": {"libc6"},
        "/lib/x86_64-linux-gnu/libz.so.1.2.13": {"zlib1g"},
    }


def test_path_aliases_cover_merged_usr() -> None:
    names = build_deb.path_aliases("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13")
    assert names == [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
        "/lib/x86_64-linux-gnu/libz.so.1.2.13",
    ]


def test_rewrite_record_updates_hashes_and_drops_rows() -> None:
    record = (
        "../../../bin/faramesh,sha256=old,10\n"
        "faramesh-0.1.0.dist-info/direct_url.json,sha256=x,5\n"
        "faramesh/__init__.py,sha256=keep,3\n"
        "faramesh-0.1.0.dist-info/RECORD,,\n"
    )
    new = build_deb.rewrite_record(record, {"../../../bin/faramesh": b"#!/opt/faramesh/bin/python\n"},
                                   {"faramesh-0.1.0.dist-info/direct_url.json"})
    rows = [line.split(",") for line in new.splitlines()]
    assert [r[0] for r in rows] == ["../../../bin/faramesh", "faramesh/__init__.py", "faramesh-0.1.0.dist-info/RECORD"]
    assert rows[0][1] == build_deb.record_hash(b"#!/opt/faramesh/bin/python\n") and rows[0][2] == "27"
    assert rows[1] == ["faramesh/__init__.py", "sha256=keep", "3"]


def test_find_leaks_sees_file_bytes_and_symlink_targets(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "clean").write_bytes(b"#!/opt/faramesh/bin/python\n")
    (tmp_path / "lib" / "dirty.pyc").write_bytes(b"\x00\x01/tmp/stage-x/opt/faramesh/lib\x00")
    (tmp_path / "lib64").symlink_to("/tmp/stage-x/opt/faramesh/lib")
    assert build_deb.find_leaks(tmp_path, b"/tmp/stage-x") == ["lib/dirty.pyc", "lib64"]
    assert build_deb.find_leaks(tmp_path, b"/elsewhere", b"/opt/faramesh/bin") == ["clean"]


# --------------------------------------------------------------------------------------------- the .deb


@dataclass(frozen=True)
class BuiltDeb:
    path: Path
    build_tmp: Path  # TMPDIR of the build: the staging directory was somewhere below it
    seconds: float
    log: str


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> BuiltDeb:
    _require_tools("dpkg-deb", "dpkg", "ldd")
    _require(Path(SYSTEM_PYTHON).exists(), f"the venv is built on {SYSTEM_PYTHON}, which is missing")
    base = tmp_path_factory.mktemp("deb")
    build_tmp = base / "buildtmp"
    build_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(build_tmp)}
    t0 = time.monotonic()
    proc = subprocess.run([str(PACKAGING / "build-deb"), "--out", str(base / "out"), "--compress", "zstd"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    debs = list((base / "out").glob("*.deb"))
    assert [d.name for d in debs] == [f"faramesh_{build_deb.debian_version(_version())}_{_host_arch()}.deb"]
    assert Path(proc.stdout.strip()) == debs[0]
    assert not list(build_tmp.iterdir()), "build-deb left its work directory behind"
    sys.stderr.write(f"build-deb took {seconds:.1f}s\n")
    return BuiltDeb(path=debs[0], build_tmp=build_tmp, seconds=seconds, log=proc.stderr)


def _host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_build_prints_its_progress(built_deb: BuiltDeb) -> None:
    steps = re.findall(r"^\[build-deb\] (\d)/(\d) ", built_deb.log, re.MULTILINE)
    assert steps and steps[-1][0] == steps[-1][1], built_deb.log
    assert "done in" in built_deb.log and f"wrote {built_deb.path}" in built_deb.log


def test_deb_metadata(built_deb: BuiltDeb) -> None:
    deb = built_deb.path
    assert _control_field(deb, "Package") == "faramesh"
    assert _control_field(deb, "Version") == build_deb.debian_version(_version())
    assert _control_field(deb, "Architecture") == _host_arch()
    assert _control_field(deb, "Maintainer")
    assert int(_control_field(deb, "Installed-Size")) > 10_000
    major, minor = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
                                  capture_output=True, text=True, check=True).stdout.split()
    depends = [d.strip() for d in _control_field(deb, "Depends").split(",")]
    assert f"python3 (>= {major}.{minor})" in depends
    assert f"python3 (<< {major}.{int(minor) + 1})" in depends
    assert "libseccomp2" in depends  # loaded with ctypes by pyseccomp: invisible to ldd
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*\s+{script}\s+#!/bin/sh$", info, re.MULTILINE), info


def _member_name(m: tarfile.TarInfo) -> str:
    """`./usr/bin/faramesh` → `usr/bin/faramesh`; the archive's root `./` → ``."""
    name = m.name.removeprefix("./").rstrip("/")
    return "" if name == "." else name


def _members(deb: Path) -> list[tarfile.TarInfo]:
    """The data archive's members, read through dpkg-deb (which knows every compression)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        members = list(tar)
    assert proc.wait() == 0
    return members


def test_deb_contents_stay_inside_their_paths(built_deb: BuiltDeb) -> None:
    members = _members(built_deb.path)
    names = {_member_name(m): m for m in members}
    for name, m in names.items():
        if m.isdir() and any(p.startswith(name + "/") for p in ALLOWED_PREFIXES):
            continue  # a parent directory: ./, opt, usr/lib, …
        if name == "":
            continue
        assert name.startswith(ALLOWED_PREFIXES), f"{name} is outside the package's paths"
        assert (m.uname, m.gname, m.uid, m.gid) == ("root", "root", 0, 0), name
        if m.isdir():
            assert m.mode == 0o755, name
        elif m.isfile():
            assert m.mode in (0o644, 0o755), f"{name} has mode {m.mode:o}"
    shim = names["usr/bin/faramesh"]
    assert shim.isfile() and shim.mode == 0o755
    assert names["opt/faramesh/bin/python3"].issym()
    assert names["opt/faramesh/bin/python3"].linkname == SYSTEM_PYTHON
    assert "opt/faramesh/bin/faramesh" in names
    assert not any(n.startswith("opt/faramesh/bin/pip") for n in names)
    assert not any(re.search(r"/site-packages/(pip|setuptools)/", n) for n in names), "pip ships in the .deb"
    # Whatever systemd/ holds at build time is in the package, where systemd looks for it.
    systemd = REPO / "systemd"
    expected = {f"usr/lib/systemd/system/{p.name}" for p in systemd.glob("*@*") if p.is_file()}
    expected |= {f"usr/lib/sysusers.d/{p.name}" for p in systemd.glob("sysusers.d/*.conf")}
    expected |= {f"usr/lib/tmpfiles.d/{p.name}" for p in systemd.glob("tmpfiles.d/*.conf")}
    assert expected <= set(names)


def test_deb_names_no_build_path_and_bytecode_names_opt(built_deb: BuiltDeb, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(built_deb.path), str(tmp_path)], check=True)
    needles = [str(built_deb.build_tmp).encode(), str(REPO).encode()]
    assert build_deb.find_leaks(tmp_path, *needles) == [], f"files name {needles}"
    shim = (tmp_path / "usr/bin/faramesh").read_text(encoding="utf-8")
    assert not re.search(r"@[A-Z_]+@", shim), shim
    site = next((tmp_path / "opt/faramesh/lib").glob("python3*/site-packages"))
    assert f" /{site.relative_to(tmp_path)} " in shim
    assert "exec /opt/faramesh/bin/python3 -I -m faramesh.launchers.main" in shim
    shebang = (tmp_path / "opt/faramesh/bin/faramesh").read_text(encoding="utf-8").splitlines()[0]
    assert shebang == "#!/opt/faramesh/bin/python"
    assert "command = /usr/bin/python3 -m venv /opt/faramesh" in (tmp_path / "opt/faramesh/pyvenv.cfg").read_text(
        encoding="utf-8")
    pycs = list((tmp_path / "opt/faramesh/lib").rglob("*.pyc"))
    assert len(pycs) > 500
    for pyc in pycs:
        data = pyc.read_bytes()
        # PEP 552 flags 0b11: checked hash-based bytecode, valid whatever mtimes the archive carries.
        assert int.from_bytes(data[4:8], "little") == 0b11, pyc
        code = marshal.loads(data[16:])
        source = pyc.parent.parent / (pyc.name.split(".")[0] + ".py")
        assert code.co_filename == "/" + str(source.relative_to(tmp_path)), pyc
    ours = list((tmp_path / "opt/faramesh/lib").glob("python3*/site-packages/faramesh/launchers/__pycache__/*.pyc"))
    assert ours, "the faramesh package has no bytecode"


# ------------------------------------------------------------------ installing into a throwaway root

# Remove the Faramesh accounts from an /etc (an overlay: the host's files stay as they are), so the
# maintainer scripts have to create them.
SCRUB_ACCOUNTS = r"""
import sys
etc = sys.argv[1]
users, groups = {"faramesh"}, {"faramesh", "faramesh-operators"}
for name, drop in (("passwd", users), ("shadow", users), ("group", groups), ("gshadow", groups)):
    path = f"{etc}/{name}"
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        continue
    out = []
    for line in lines:
        fields = line.split(":")
        if fields[0] in drop:
            continue
        if name in ("group", "gshadow"):
            fields[-1] = ",".join(m for m in fields[-1].split(",") if m and m not in users)
        out.append(":".join(fields))
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
"""

# Inside `unshare --mount --pid --fork`: build the root, install, run, purge. Results go to files in $T.
CHROOT_SCRIPT = r"""
set -euo pipefail
T=$1 DEB=$2 STACK=$3 SYSTEMD_TOOLS=$4
R=$T/root
mkdir -p "$T/up/usr" "$T/up/etc" "$T/wk/usr" "$T/wk/etc"
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"
    elif [ -d "/$d" ]; then mkdir "$R/$d"; mount --bind "/$d" "$R/$d"; mount -o remount,bind,ro "$R/$d"; fi
done
mkdir -p "$R/usr" "$R/etc" "$R/opt" "$R/var/log" "$R/run" "$R/tmp" "$R/dev" "$R/proc" "$R/root"
chmod 1777 "$R/tmp"
mount -t overlay overlay -o "lowerdir=/usr,upperdir=$T/up/usr,workdir=$T/wk/usr" "$R/usr"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$T/up/etc,workdir=$T/wk/etc" "$R/etc"
for n in null zero urandom random; do : > "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mount -t proc proc "$R/proc"
# Nothing below may run unless /usr and /etc of the root are the overlays.
[ "$(findmnt -n -o FSTYPE "$R/usr")" = overlay ] && [ "$(findmnt -n -o FSTYPE "$R/etc")" = overlay ]
/usr/bin/python3 "$T/scrub.py" "$R/etc"
if [ "$SYSTEMD_TOOLS" = no ]; then rm -f "$R/usr/bin/systemd-sysusers" "$R/usr/bin/systemd-tmpfiles"; fi
( cd "$T/up" && find . | sort ) > "$T/upper-before.txt"

# --force-unsafe-io: no fsync per file, this root is thrown away.
dpkg --root="$R" --force-unsafe-io -i "$DEB" > "$T/dpkg-install.log" 2>&1
( cd "$T/up" && find . | sort ) > "$T/upper-installed.txt"
# Again, as an upgrade: prerm upgrade, postrm upgrade, postinst configure <old version> (accounts exist).
# Once is enough: the scripts take the same branches with either set of tools.
if [ "$SYSTEMD_TOOLS" = yes ]; then dpkg --root="$R" --force-unsafe-io -i "$DEB" > "$T/dpkg-reinstall.log" 2>&1; fi
chroot "$R" /usr/bin/faramesh --version > "$T/version.txt"
# The lean launch path through the shim: the sandbox modules import under -I -S, then the spec is unreadable.
rc=0; chroot "$R" /usr/bin/faramesh __agent-exec --spec /nonexistent.json -- /bin/true \
    > "$T/agent-exec.txt" 2>&1 || rc=$?
echo "$rc" > "$T/agent-exec-rc.txt"
chroot "$R" getent passwd faramesh > "$T/passwd.txt"
chroot "$R" getent group faramesh-operators > "$T/group.txt"
for d in /run/faramesh /var/lib/faramesh /var/log/faramesh; do
    chroot "$R" stat -c '%n %a %U %G' "$d" || echo "$d missing"
done > "$T/dirs.txt"
cp -r "$STACK" "$R/tmp/stack"
chmod -R a+rX "$R/tmp/stack"
uid=$(cut -d: -f3 "$T/passwd.txt") gid=$(cut -d: -f4 "$T/passwd.txt")
# As the engine's user, with an empty environment: the venv must be readable and usable by it.
chroot --userspec="$uid:$gid" "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/ \
    /usr/bin/faramesh check --dir /tmp/stack > "$T/check.txt" 2>&1
chroot --userspec="$uid:$gid" "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/ \
    /usr/bin/faramesh test --dir /tmp/stack > "$T/fixtures.txt" 2>&1

dpkg --root="$R" --purge faramesh > "$T/dpkg-purge.log" 2>&1
( cd "$T/up" && find . -not -type d | sort ) > "$T/upper-purged-files.txt"
if [ -e "$R/opt/faramesh" ]; then echo present; else echo absent; fi > "$T/opt-after-purge.txt"
"""


def _minimal_dpkg_db(root: Path, depends: str) -> list[str]:
    """A dpkg database holding only the host's stanzas (and file lists) of the packages `depends` names:
    dpkg checks the .deb's Depends against them, without the noise of 3000 packages' missing file lists."""
    wanted = {re.split(r"[\s(:]", alt.strip(), maxsplit=1)[0] for d in depends.split(",") for alt in d.split("|")}
    admin = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    stanzas = []
    for stanza in Path("/var/lib/dpkg/status").read_text(encoding="utf-8").split("\n\n"):
        m = re.search(r"^Package: (\S+)$", stanza, re.MULTILINE)
        if m and m.group(1) in wanted and re.search(r"^Status: install ok installed$", stanza, re.MULTILINE):
            stanzas.append(stanza.strip("\n"))
            for lst in Path("/var/lib/dpkg/info").glob(f"{m.group(1)}*.list"):
                if lst.name in (f"{m.group(1)}.list",) or lst.name.startswith(f"{m.group(1)}:"):
                    shutil.copyfile(lst, admin / "info" / lst.name)
    (admin / "status").write_text("\n\n".join(stanzas) + "\n", encoding="utf-8")
    (admin / "available").write_text("", encoding="utf-8")
    return sorted(wanted)


def _tmpfiles_dirs() -> dict[str, str]:
    """The `d` lines of systemd/tmpfiles.d/faramesh.conf for the three top directories: path → 'mode user group'."""
    conf = REPO / "systemd" / "tmpfiles.d" / "faramesh.conf"
    found: dict[str, str] = {}
    if conf.exists():
        for line in conf.read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0] == "d" and fields[1] in ("/run/faramesh", "/var/lib/faramesh",
                                                                       "/var/log/faramesh"):
                found[fields[1]] = f"{int(fields[2], 8):o} {fields[3]} {fields[4]}"
    return found


def _upper(path: Path) -> set[str]:
    return {line.removeprefix("./") for line in path.read_text(encoding="utf-8").splitlines() if line != "."}


@pytest.mark.parametrize("systemd_tools", ["yes", "no"], ids=["sysusers+tmpfiles", "useradd+mkdir-fallback"])
def test_deb_installs_runs_and_purges_in_a_throwaway_root(
    built_deb: BuiltDeb, tmp_path: Path, systemd_tools: str
) -> None:
    _require_namespaces()
    _require_tools(*(("systemd-sysusers", "systemd-tmpfiles") if systemd_tools == "yes" else ("useradd",)))
    (tmp_path / "root").mkdir()
    deps = _minimal_dpkg_db(tmp_path / "root", _control_field(built_deb.path, "Depends"))
    assert "python3" in deps
    (tmp_path / "scrub.py").write_text(SCRUB_ACCOUNTS, encoding="utf-8")
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "bash", "-c", CHROOT_SCRIPT, "ns",
         str(tmp_path), str(built_deb.path), str(EXAMPLE), systemd_tools],
        capture_output=True, text=True, timeout=300, check=False,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text(encoding='utf-8', errors='replace')}"
                   for p in sorted(tmp_path.glob("*.log")) + sorted(tmp_path.glob("*.txt"))
                   if not p.name.startswith("upper"))
    assert proc.returncode == 0, proc.stderr + logs

    assert (tmp_path / "version.txt").read_text(encoding="utf-8").strip() == f"faramesh {_version()}"
    assert (tmp_path / "agent-exec-rc.txt").read_text(encoding="utf-8").strip() == "4"
    assert "cannot read spec /nonexistent.json" in (tmp_path / "agent-exec.txt").read_text(encoding="utf-8")
    assert "valid" in (tmp_path / "check.txt").read_text(encoding="utf-8")
    assert re.search(r"\b[1-9]\d* passed, 0 failed", (tmp_path / "fixtures.txt").read_text(encoding="utf-8"))

    # The accounts of sysusers.d/faramesh.conf, by either route.
    passwd = (tmp_path / "passwd.txt").read_text(encoding="utf-8").strip().split(":")
    assert passwd[0] == "faramesh" and 0 < int(passwd[2]) < 1000, passwd
    assert passwd[5] == "/" and passwd[6].endswith("nologin"), passwd
    assert (tmp_path / "group.txt").read_text(encoding="utf-8").startswith("faramesh-operators:")
    dirs = dict(line.split(" ", 1) for line in (tmp_path / "dirs.txt").read_text(encoding="utf-8").splitlines())
    assert dirs == _tmpfiles_dirs() or not _tmpfiles_dirs(), dirs

    # In /usr and /etc the package wrote its own files and the accounts, nothing else.
    before, installed = _upper(tmp_path / "upper-before.txt"), _upper(tmp_path / "upper-installed.txt")
    deb_usr = {_member_name(m) for m in _members(built_deb.path)}
    for path in sorted(installed - before):
        top, _, rest = path.partition("/")
        if top == "usr":
            assert path in deb_usr, f"installing wrote {path}"
        else:
            assert top == "etc" and (rest in ACCOUNT_FILES or rest.split("/")[0] == "faramesh"), path
    assert "usr/bin/faramesh" in installed

    # Purge takes every file of the package away, bytecode included; the accounts stay (postrm says why).
    assert (tmp_path / "opt-after-purge.txt").read_text(encoding="utf-8").strip() == "absent"
    left = [p for p in _upper(tmp_path / "upper-purged-files.txt") if p.startswith("usr/")]
    assert left == [] or all(p in before for p in left), left


# ---------------------------------------------------------------------------------------------- install.sh

INSTALL_SH_SCRIPT = r"""
set -euo pipefail
T=$1 STACK=$2
for d in usr etc opt var run; do
    mkdir -p "$T/up/$d" "$T/wk/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/up/$d,workdir=$T/wk/$d" "/$d"
    [ "$(findmnt -n -o FSTYPE --mountpoint "/$d")" = overlay ]
done
/usr/bin/python3 "$T/scrub.py" /etc
( cd "$T/up" && find . | sort ) > "$T/upper-before.txt"

"$REPO/packaging/install.sh" > "$T/install.log" 2>&1
( cd "$T/up" && find . | sort ) > "$T/upper-installed.txt"
/usr/bin/faramesh --version > "$T/version.txt"
rc=0; /usr/bin/faramesh __agent-exec --spec /nonexistent.json -- /bin/true > "$T/agent-exec.txt" 2>&1 || rc=$?
echo "$rc" > "$T/agent-exec-rc.txt"
getent passwd faramesh > "$T/passwd.txt"
uid=$(cut -d: -f3 "$T/passwd.txt") gid=$(cut -d: -f4 "$T/passwd.txt")
# The stack copy goes where the `faramesh` user can reach it (pytest's tmp dirs are 0700): the overlaid
# /var/tmp, after the listing above.
stack=$(mktemp -d /var/tmp/faramesh-stack.XXXXXX)
cp -r "$STACK/." "$stack"
chmod -R a+rX "$stack"
setpriv --reuid="$uid" --regid="$gid" --clear-groups env -i PATH=/usr/bin:/bin HOME=/ \
    /usr/bin/faramesh check --dir "$stack" > "$T/check.txt" 2>&1

"$REPO/packaging/install.sh" --uninstall > "$T/uninstall.log" 2>&1
( cd "$T/up" && find . -not -type d | sort ) > "$T/upper-uninstalled-files.txt"
"""


def test_install_sh_installs_and_uninstalls_like_the_deb(tmp_path: Path) -> None:
    _require_namespaces()
    installed = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "faramesh"], capture_output=True,
                               text=True, check=False).stdout
    _require(installed != "installed", "the faramesh .deb is installed on this host; install.sh refuses to run")
    (tmp_path / "scrub.py").write_text(SCRUB_ACCOUNTS, encoding="utf-8")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", INSTALL_SH_SCRIPT, "ns",
         str(tmp_path), str(EXAMPLE)],
        env={**os.environ, "REPO": str(REPO)}, capture_output=True, text=True, timeout=600, check=False,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text(encoding='utf-8', errors='replace')}"
                   for p in sorted(tmp_path.glob("*.log")) + sorted(tmp_path.glob("*.txt"))
                   if not p.name.startswith("upper"))
    assert proc.returncode == 0, proc.stderr + logs
    assert (tmp_path / "version.txt").read_text(encoding="utf-8").strip() == f"faramesh {_version()}"
    assert (tmp_path / "agent-exec-rc.txt").read_text(encoding="utf-8").strip() == "4"
    assert "valid" in (tmp_path / "check.txt").read_text(encoding="utf-8")
    passwd = (tmp_path / "passwd.txt").read_text(encoding="utf-8").split(":")
    assert passwd[0] == "faramesh" and passwd[5] == "/"

    before, after = _upper(tmp_path / "upper-before.txt"), _upper(tmp_path / "upper-installed.txt")
    new = after - before
    assert "usr/bin/faramesh" in new and "opt/faramesh/pyvenv.cfg" in new
    systemd = REPO / "systemd"
    for unit in (p for p in systemd.glob("*@*") if p.is_file()):
        assert f"usr/lib/systemd/system/{unit.name}" in new
    for path in sorted(new):
        top, _, rest = path.partition("/")
        allowed = (
            path.startswith(("opt/faramesh", "usr/bin/faramesh", "usr/lib/systemd", "usr/lib/sysusers.d",
                             "usr/lib/tmpfiles.d", "run/faramesh", "var/lib/faramesh", "var/log/faramesh"))
            or path in ("usr/lib", "run", "var/lib", "var/log", "usr/bin")
            or (top == "etc" and (rest in ACCOUNT_FILES or rest.split("/")[0] == "faramesh"))
        )
        assert allowed, f"install.sh wrote {path}"
    # Uninstalling removes the virtualenv, the shim and the units; state, logs and accounts stay.
    left = _upper(tmp_path / "upper-uninstalled-files.txt")
    assert not [p for p in left if p.startswith(("opt/faramesh/", "usr/")) and p not in before], left
