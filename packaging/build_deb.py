"""Build `faramesh_<version>_<arch>.deb` from this checkout (run it as `packaging/build-deb [--out DIR]`).

The package holds:

- `/opt/faramesh`: a self-contained virtualenv on the system Python (`/usr/bin/python3`) with Faramesh and
  its runtime dependencies (non-editable), bytecode compiled for its final path, no pip or setuptools;
- `/usr/bin/faramesh`: a shim (packaging/shim.in), the stable path launchers and units exec;
- whatever `systemd/` holds: units in /usr/lib/systemd/system, `sysusers.d/` and `tmpfiles.d/` snippets in
  /usr/lib/sysusers.d and /usr/lib/tmpfiles.d;
- /usr/share/doc/faramesh, and the maintainer scripts packaging/{postinst,prerm,postrm}.

Relocation. A virtualenv records its own path (console-script shebangs, `activate`, pyvenv.cfg, the
`co_filename` inside every .pyc), so it must be built for /opt/faramesh, but a build must not write to the
build host's /opt. The venv is created at `<stage>/opt/faramesh` with `python3 -m venv`; pip installs with
`--no-compile`, and every Python process of the build runs with PYTHONDONTWRITEBYTECODE, so no bytecode
naming the staging path is written. Then the few text files that name the staging path (`bin/*` and
pyvenv.cfg) are rewritten to name /opt/faramesh (their RECORD hashes updated), and `compileall` writes the
bytecode with `-s <stage> -p /`, so tracebacks and `__file__` name /opt/faramesh. Last, every file and
symlink in the staging tree is searched for the build's temporary path: any hit fails the build. The
venv's `bin/python3` is a symlink to the system interpreter, which is why the package depends on exactly
the system Python's minor version (the extension modules are built for its ABI).

Dependencies come from pip's configured index, reusing pip's cache (`--prefer-binary` keeps to wheels
where there are some); PIP_CONSTRAINT pins versions for a repeatable build. Library dependencies of the
bundled extension modules are found with ldd and mapped to Debian packages with dpkg-query.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "faramesh"
PREFIX = "/opt/faramesh"
SHIM_PATH = "usr/bin/faramesh"
UNIT_DIR = "usr/lib/systemd/system"
SYSUSERS_DIR = "usr/lib/sysusers.d"
TMPFILES_DIR = "usr/lib/tmpfiles.d"
DOC_DIR = f"usr/share/doc/{PACKAGE}"
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".path", ".slice")
DEFAULT_EXTRAS = "providers"
DEFAULT_MAINTAINER = "Faramesh maintainers <faramesh@localhost>"
# Libraries loaded with ctypes.util.find_library, which ldd cannot see: libseccomp (pyseccomp, at
# `apply`, to compile the sandbox's filter).
CTYPES_LIBRARIES = ("seccomp",)
# Not part of the built distribution, or build output that must not leak into it.
SOURCE_IGNORE = ("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis")

PACKAGING_DIR = Path(__file__).resolve().parent


class BuildError(Exception):
    """A build failure with a stable code (PKG_…) and a message that says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# --- the functional core ----------------------------------------------------------------------------

_PEP440 = re.compile(
    r"^(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|b|rc|alpha|beta|c|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?(?P<post>post|rev|r)[-_.]?(?P<post_n>\d*))?"
    r"(?:[-_.]?(?P<dev>dev)[-_.]?(?P<dev_n>\d*))?"
    r"(?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?$",
    re.IGNORECASE,
)
_PRE_CANON = {"alpha": "a", "beta": "b", "c": "rc", "pre": "rc", "preview": "rc"}


def debian_version(version: str) -> str:
    """A PEP 440 version as a Debian version that sorts the same way: pre-releases sort before the
    release, which Debian spells with `~` (1.0rc1 → 1.0~rc1), and a dev release before its pre-releases
    too, hence `~~` (1.0.dev2 → 1.0~~dev2 < 1.0~a1 < 1.0)."""
    m = _PEP440.match(version.strip())
    if m is None:
        raise BuildError("PKG_BAD_VERSION", f"{version!r} is not a PEP 440 version")
    out = m["release"]
    if m["epoch"] and int(m["epoch"]):
        out = f"{int(m['epoch'])}:{out}"
    if m["pre"]:
        tag = m["pre"].lower()
        out += f"~{_PRE_CANON.get(tag, tag)}{int(m['pre_n'] or 0)}"
    if m["post"]:
        # `+` sorts before `.`, so 1.0+post1 falls between 1.0 and 1.0.1 as in PEP 440.
        out += f"+post{int(m['post_n'] or 0)}"
    if m["dev"]:
        out += f"~~dev{int(m['dev_n'] or 0)}"
    if m["local"]:
        out += "+" + re.sub(r"[-_]", ".", m["local"].lower())
    return out


def python_depends(major: int, minor: int) -> str:
    """The venv's interpreter is a symlink to the system python3 and its extension modules are built for
    that minor version's ABI: any other minor version breaks it."""
    return f"python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1})"


def version_from_init(text: str) -> str | None:
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    return m.group(1) if m else None


def parse_ldd(output: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """`ldd FILE…` output → ({object: resolved library paths}, {object: sonames not found}).

    With one argument ldd prints no `FILE:` header, so callers pass at least two files or accept that
    everything is attributed to ""."""
    resolved: dict[str, set[str]] = {}
    missing: dict[str, set[str]] = {}
    current = ""
    for line in output.splitlines():
        if not line.startswith(("\t", " ")) and line.endswith(":"):
            current = line[:-1]
            continue
        entry = line.strip()
        if "=>" not in entry:
            continue  # the vdso and the dynamic loader itself
        soname, _, rest = entry.partition("=>")
        rest = rest.strip()
        if rest.startswith("not found"):
            missing.setdefault(current, set()).add(soname.strip())
        elif rest.startswith("/"):
            resolved.setdefault(current, set()).add(rest.split(" (", 1)[0].strip())
    return resolved, missing


def parse_dpkg_search(output: str) -> dict[str, set[str]]:
    """`dpkg-query -S PATH…` output → {path: packages}; diversion lines and architecture qualifiers are
    dropped (`libc6:amd64, libc6:i386: /lib/…/libc.so.6` → {'/lib/…/libc.so.6': {'libc6'}})."""
    found: dict[str, set[str]] = {}
    for line in output.splitlines():
        if line.startswith(("diversion by", "local diversion")) or ": " not in line:
            continue
        owners, _, path = line.rpartition(": ")
        names = {o.strip().split(":", 1)[0] for o in owners.split(",") if o.strip()}
        if names:
            found.setdefault(path.strip(), set()).update(names)
    return found


def path_aliases(path: str, real: str) -> list[str]:
    """The names dpkg may know a library by on a merged-/usr host: as given, resolved, and each with
    and without the /usr prefix (Debian 12 registers libc6 under /lib and zlib under /lib, libstdc++ under
    /usr/lib)."""
    names: list[str] = []
    for p in (path, real):
        for q in (p, p.removeprefix("/usr") if p.startswith("/usr/") else "/usr" + p):
            if q not in names:
                names.append(q)
    return names


def parse_ldconfig(output: str) -> dict[str, str]:
    """`ldconfig -p` → {soname: path}, the first (preferred) entry of each name."""
    libs: dict[str, str] = {}
    for line in output.splitlines():
        m = re.match(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)\s*$", line)
        if m and m.group(1) not in libs:
            libs[m.group(1)] = m.group(3)
    return libs


@dataclass(frozen=True)
class ControlFields:
    version: str
    architecture: str
    depends: Sequence[str]
    installed_size_kib: int
    maintainer: str
    summary: str
    description: str
    homepage: str | None = None


def control_text(c: ControlFields) -> str:
    lines = [
        f"Package: {PACKAGE}",
        f"Version: {c.version}",
        f"Architecture: {c.architecture}",
        f"Maintainer: {c.maintainer}",
        f"Installed-Size: {c.installed_size_kib}",
        f"Depends: {', '.join(c.depends)}",
        "Section: admin",
        "Priority: optional",
    ]
    if c.homepage:
        lines.append(f"Homepage: {c.homepage}")
    lines.append(f"Description: {c.summary}")
    for para_index, para in enumerate(p for p in c.description.strip().split("\n\n") if p.strip()):
        if para_index:
            lines.append(" .")
        lines.extend(f" {line.strip()}" for line in para.strip().splitlines())
    return "\n".join(lines) + "\n"


def record_hash(data: bytes) -> str:
    """The hash format of a wheel RECORD (PEP 376/427)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewrite_record(text: str, changed: dict[str, bytes], dropped: set[str]) -> str:
    """A RECORD with the rows of `dropped` removed and the hash and size of `changed` recomputed; keys
    are the row paths as written (relative to site-packages)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(text)):
        if not row or row[0] in dropped:
            continue
        if row[0] in changed:
            data = changed[row[0]]
            row = [row[0], record_hash(data), str(len(data))]
        writer.writerow(row)
    return out.getvalue()


# --- I/O at the edges ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Step lines with timings on stderr, so `build-deb > log` still shows where a slow build is."""

    started: float
    total_steps: int
    step_no: int = 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.step_no += 1
        t0 = time.monotonic()
        print(f"[build-deb] {self.step_no}/{self.total_steps} {what} …", file=sys.stderr, flush=True)
        yield
        print(f"[build-deb]     done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # No bytecode naming the staging path may be written by any Python process of the build.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def run(argv: Sequence[str | Path], code: str, hint: str, *, quiet: bool = False) -> str:
    """Run a build tool; its output is shown on failure (or always when not quiet)."""
    cmd = [str(a) for a in argv]
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError("PKG_TOOL_MISSING", f"{cmd[0]} is not installed ({hint})") from exc
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BuildError(code, f"`{' '.join(cmd[:4])} …` exited {proc.returncode} ({hint})")
    if not quiet and proc.stdout.strip():
        sys.stderr.write(proc.stdout)
    return proc.stdout


def probe(argv: Sequence[str], hint: str) -> str:
    """stdout of a query tool whose exit status only says "some of the names were not found"."""
    try:
        return subprocess.run(list(argv), env=_env(), capture_output=True, text=True, check=False).stdout
    except FileNotFoundError as exc:
        raise BuildError("PKG_TOOL_MISSING", f"{argv[0]} is not installed ({hint})") from exc


def read_version(src: Path) -> str:
    """The version both pyproject.toml and faramesh_pkg/__init__.py state; they must agree, or the
    package would carry one version and `faramesh --version` print another."""
    project = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    init_path = src / "faramesh_pkg" / "__init__.py"
    from_init = version_from_init(init_path.read_text(encoding="utf-8")) if init_path.exists() else None
    static = project.get("version")
    if static and from_init and static != from_init:
        raise BuildError(
            "PKG_VERSION_MISMATCH",
            f"pyproject.toml says {static} but faramesh_pkg/__init__.py says {from_init}; make them agree",
        )
    version = static or from_init
    if not isinstance(version, str):
        raise BuildError("PKG_BAD_VERSION", "no version in pyproject.toml [project] or faramesh_pkg/__init__.py")
    return version


def copy_source(src: Path, dest: Path) -> None:
    """The checkout without VCS data, virtualenvs, caches and build output: pip builds in-tree, and the
    build must write nothing into the checkout."""
    top_ignore = shutil.ignore_patterns(".*", "build", "dist", *SOURCE_IGNORE)
    nested_ignore = shutil.ignore_patterns(*SOURCE_IGNORE)

    def ignore(directory: str, names: list[str]) -> set[str]:
        pattern = top_ignore if Path(directory) == src else nested_ignore
        return set(pattern(directory, names))

    shutil.copytree(src, dest, ignore=ignore, symlinks=True)


def python_version(python: str) -> tuple[int, int]:
    out = run([python, "-I", "-c", "import sys; print(*sys.version_info[:2])"], "PKG_PYTHON_UNSUITABLE",
              f"{python} must be a working Python 3", quiet=True)
    major, minor = (int(x) for x in out.split())
    if (major, minor) < (3, 11):
        raise BuildError("PKG_PYTHON_UNSUITABLE", f"{python} is Python {major}.{minor}; Faramesh needs 3.11 or later")
    return major, minor


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise BuildError("PKG_VENV_LAYOUT", f"expected one site-packages under {venv}/lib, found {len(found)}")
    return found[0]


def install_into_venv(python: str, venv: Path, source: Path, extras: str, verbose: bool) -> None:
    run([python, "-I", "-m", "venv", venv], "PKG_PYTHON_UNSUITABLE",
        f"{python} -m venv failed; on Debian: apt-get install python3-venv", quiet=True)
    target = f"{source}[{extras}]" if extras else str(source)
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip"]
    run([*pip, "install", "--no-compile", "--prefer-binary", *([] if verbose else ["-q"]), target],
        "PKG_PIP_FAILED", "pip could not install Faramesh and its dependencies; its output is above",
        quiet=not verbose)


def prune_bootstrap(venv: Path) -> list[str]:
    """Drop pip and setuptools (ensurepip put them there; the installed venv never installs anything:
    dpkg owns every file) unless an installed distribution requires them."""
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip"]
    shown = run([*pip, "show", "pip", "setuptools"], "PKG_PIP_FAILED", "pip show failed", quiet=True)
    removable: list[str] = []
    for block in shown.split("\n---\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("Name") and not fields.get("Required-by", "").strip():
            removable.append(fields["Name"])
    if removable:
        run([*pip, "uninstall", "-q", "-y", *removable], "PKG_PIP_FAILED", "pip uninstall failed", quiet=True)
    return removable


def relocate(venv: Path, staged_prefix: str, final_prefix: str) -> list[Path]:
    """Make the venv built at `staged_prefix` name `final_prefix`; returns the rewritten files."""
    old, new = staged_prefix.encode(), final_prefix.encode()
    rewritten: list[Path] = []
    candidates = [p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    candidates.append(venv / "pyvenv.cfg")
    for path in candidates:
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))
            rewritten.append(path)
    site = site_packages(venv)
    rewritten_real = {p.resolve() for p in rewritten}
    for cache in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    for record in site.glob("*.dist-info/RECORD"):
        dist_info = record.parent
        dropped: set[str] = set()
        direct_url = dist_info / "direct_url.json"
        # direct_url.json names the temporary source copy pip installed from (PEP 610); without it the
        # distribution reads as an ordinary install, which is what it is on the target.
        if direct_url.exists():
            direct_url.unlink()
            dropped.add(f"{dist_info.name}/direct_url.json")
        changed: dict[str, bytes] = {}
        text = record.read_text(encoding="utf-8")
        for row in csv.reader(io.StringIO(text)):
            if row and (site / row[0]).resolve() in rewritten_real:
                changed[row[0]] = (site / row[0]).read_bytes()
        if dropped or changed:
            record.write_text(rewrite_record(text, changed, dropped), encoding="utf-8")
    return rewritten


def compile_bytecode(python: str, stage: Path, venv: Path) -> None:
    """`-s stage -p /` puts /opt/faramesh/… into co_filename. checked-hash bytecode stays valid whatever
    mtimes the archive carries, and keeps the build reproducible."""
    argv = [python, "-I", "-m", "compileall", "-q", "-j0", "-s", str(stage), "-p", "/",
            "--invalidation-mode", "checked-hash", str(venv / "lib")]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        # A file that cannot be compiled cannot be imported either; it is not a reason to fail the build.
        sys.stderr.write(proc.stdout + proc.stderr)
        print("[build-deb] warning: compileall could not compile the files above", file=sys.stderr)


def normalise_modes(root: Path) -> None:
    """0755 directories, 0644 files (0755 if any execute bit): readable by the `faramesh` user whatever
    umask pip or wheel archives used."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.lstat(p).st_mode & 0o111 else 0o644)


def find_leaks(root: Path, *needles: bytes) -> list[str]:
    """Every file whose bytes, and every symlink whose target, contain one of `needles`."""
    pattern = re.compile(b"|".join(re.escape(n) for n in needles))
    hits: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk lists a symlink to a directory (the venv's lib64) among the directories.
        for name in (*dirnames, *filenames):
            p = Path(dirpath, name)
            if p.is_dir() and not p.is_symlink():
                continue
            if p.is_symlink():
                if pattern.search(os.readlink(p).encode()):
                    hits.append(str(p.relative_to(root)))
            elif pattern.search(p.read_bytes()):
                hits.append(str(p.relative_to(root)))
    return sorted(hits)


def shared_library_depends(venv: Path) -> list[str]:
    """Debian packages providing the system libraries the bundled extension modules link against, plus
    the ctypes-loaded ones; libraries bundled inside wheels (`*.libs/`) need nothing."""
    objects = sorted(str(p) for p in venv.rglob("*.so*") if p.is_file() and not p.is_symlink())
    wanted: set[str] = set()
    if objects:
        # A second argument makes ldd print the `FILE:` headers even when there is one object.
        resolved, missing = parse_ldd(probe(["ldd", *objects, "/dev/null"], "ldd is part of libc-bin"))
        missing = {obj: libs for obj, libs in missing.items() if obj}
        if missing:
            detail = "; ".join(f"{Path(o).name}: {', '.join(sorted(libs))}" for o, libs in sorted(missing.items()))
            raise BuildError("PKG_LIBRARY_MISSING", f"libraries not found on the build host: {detail}")
        for libs in resolved.values():
            wanted.update(lib for lib in libs if not lib.startswith(str(venv)))
    # ldconfig lives in /sbin, which an unprivileged builder's PATH often lacks.
    ldconfig = shutil.which("ldconfig", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "ldconfig"
    known = parse_ldconfig(run([ldconfig, "-p"], "PKG_TOOL_MISSING", "ldconfig is part of libc-bin", quiet=True))
    for name in CTYPES_LIBRARIES:
        paths = [path for soname, path in known.items() if soname.startswith(f"lib{name}.so.")]
        if not paths:
            raise BuildError(
                "PKG_LIBRARY_MISSING",
                f"lib{name} is loaded at run time but absent on the build host (apt-get install lib{name}2)",
            )
        wanted.add(paths[0])
    aliases = {lib: path_aliases(lib, os.path.realpath(lib)) for lib in sorted(wanted)}
    query = sorted({a for names in aliases.values() for a in names})
    owners = parse_dpkg_search(probe(["dpkg-query", "-S", *query], "dpkg-query is part of dpkg"))
    packages: set[str] = set()
    unowned: list[str] = []
    for lib, names in aliases.items():
        owner = next((owners[n] for n in names if n in owners), None)
        if owner is None:
            unowned.append(lib)
        else:
            packages.update(owner)
    if unowned:
        raise BuildError("PKG_LIBRARY_UNPACKAGED",
                         f"no Debian package owns {', '.join(unowned)}: the target host would not have it")
    return sorted(packages)


def stage_systemd(src: Path, stage: Path) -> list[str]:
    """Units, drop-in directories and the sysusers.d/tmpfiles.d snippets found in systemd/."""
    unit_src = src / "systemd"
    staged: list[str] = []
    if not unit_src.is_dir():
        return staged
    for entry in sorted(unit_src.iterdir()):
        if entry.name in ("sysusers.d", "tmpfiles.d") and entry.is_dir():
            dest = stage / (SYSUSERS_DIR if entry.name == "sysusers.d" else TMPFILES_DIR)
            for conf in sorted(entry.glob("*.conf")):
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(conf, dest / conf.name)
                staged.append(f"/{dest.relative_to(stage)}/{conf.name}")
        elif entry.is_file() and entry.name.endswith(UNIT_SUFFIXES):
            dest = stage / UNIT_DIR
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry, dest / entry.name)
            staged.append(f"/{UNIT_DIR}/{entry.name}")
        elif entry.is_dir() and entry.name.endswith(tuple(s + ".d" for s in UNIT_SUFFIXES)):
            shutil.copytree(entry, stage / UNIT_DIR / entry.name)
            staged.append(f"/{UNIT_DIR}/{entry.name}/")
        else:
            print(f"[build-deb] note: systemd/{entry.name} is not a unit or snippet; not packaged", file=sys.stderr)
    return staged


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def copyright_text(license_name: str) -> str:
    return (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {PACKAGE}\n\n"
        "Files: *\n"
        "Copyright: the Faramesh authors\n"
        f"License: {license_name}\n"
        f" See /usr/share/common-licenses/{license_name} on Debian systems.\n\n"
        f"Files: {PREFIX.lstrip('/')}/lib/*/site-packages/*\n"
        "Copyright: the authors of each bundled distribution\n"
        "License: various\n"
        " The virtualenv bundles Faramesh's Python dependencies; each one's license is in its\n"
        " *.dist-info directory.\n"
    )


def shim_text(template: str, prefix: str, site_packages_dir: str) -> str:
    return template.replace("@PREFIX@", prefix).replace("@SITE_PACKAGES@", site_packages_dir)


def stage_files(src: Path, stage: Path, project: dict[str, object], site_packages_dir: str) -> list[str]:
    shim = shim_text((PACKAGING_DIR / "shim.in").read_text(encoding="utf-8"), PREFIX, site_packages_dir)
    (stage / SHIM_PATH).parent.mkdir(parents=True, exist_ok=True)
    (stage / SHIM_PATH).write_text(shim, encoding="utf-8")
    os.chmod(stage / SHIM_PATH, 0o755)
    units = stage_systemd(src, stage)
    doc = stage / DOC_DIR
    doc.mkdir(parents=True, exist_ok=True)
    license_name = project.get("license")
    (doc / "copyright").write_text(copyright_text(license_name if isinstance(license_name, str) else "Apache-2.0"),
                                   encoding="utf-8")
    for name in ("README.md",):
        if (src / name).is_file():
            (doc / f"{name}.gz").write_bytes(gzip_bytes((src / name).read_bytes()))
    packaging_readme = PACKAGING_DIR / "README.md"
    if packaging_readme.is_file():
        (doc / "README.packaging.md.gz").write_bytes(gzip_bytes(packaging_readme.read_bytes()))
    return units


def installed_size_kib(root: Path) -> int:
    """Like dpkg-gencontrol: file sizes rounded up to KiB, one KiB per directory and symlink."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += 1 if os.path.islink(os.path.join(dirpath, name)) else -(-st.st_size // 1024)
    return total


def md5sums_text(root: Path) -> str:
    lines = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not p.is_symlink():
                lines.append(f"{hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()}  {p.relative_to(root)}")
    return "\n".join(sorted(lines, key=lambda line: line[34:])) + "\n"


def maintainer(project: dict[str, object], override: str | None) -> str:
    if override:
        return override
    name, email = os.environ.get("DEBFULLNAME"), os.environ.get("DEBEMAIL")
    if name and email:
        return f"{name} <{email}>"
    for key in ("maintainers", "authors"):
        people = project.get(key)
        if isinstance(people, list):
            for person in people:
                if isinstance(person, dict) and person.get("name") and person.get("email"):
                    return f"{person['name']} <{person['email']}>"
    return DEFAULT_MAINTAINER


LONG_DESCRIPTION = """\
Faramesh sits between an AI agent and its tools: every tool call is permitted, deferred for a human or
denied against a policy file (governance.fms, written in FPL), and every decision becomes a hash-chained,
signed record in a write-ahead log. A root-started supervisor launches agents in an OS sandbox while the
enforcement engine runs beside it as the faramesh user.

This package installs a self-contained virtualenv in /opt/faramesh on the system Python, the faramesh
command (/usr/bin/faramesh), the systemd units faramesh@.target, faramesh-engine@.service and
faramesh-supervisor@.service, and the faramesh user and faramesh-operators group.
"""


@dataclass(frozen=True)
class Options:
    src: Path
    out: Path
    python: str
    extras: str
    compress: str
    maintainer: str | None
    keep_work: bool
    verbose: bool


def build(opts: Options) -> Path:
    progress = Progress(started=time.monotonic(), total_steps=7)
    src = opts.src.resolve()
    project_raw = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    project: dict[str, object] = project_raw if isinstance(project_raw, dict) else {}
    version = debian_version(read_version(src))
    arch = run(["dpkg", "--print-architecture"], "PKG_TOOL_MISSING", "build-deb runs on a dpkg host",
               quiet=True).strip()
    major, minor = python_version(opts.python)
    if shutil.which("dpkg-deb") is None:
        raise BuildError("PKG_TOOL_MISSING", "dpkg-deb is not installed (apt-get install dpkg)")
    opts.out.mkdir(parents=True, exist_ok=True)
    # Like dpkg-name and dpkg-buildpackage, the file name leaves out the epoch.
    deb = opts.out.resolve() / f"{PACKAGE}_{version.split(':', 1)[-1]}_{arch}.deb"
    print(f"[build-deb] {deb.name}: Python {major}.{minor} from {opts.python}, extras [{opts.extras}]",
          file=sys.stderr)

    old_umask = os.umask(0o022)
    work = Path(tempfile.mkdtemp(prefix="faramesh-deb-"))
    try:
        stage = work / "root"
        venv = stage / PREFIX.lstrip("/")
        venv.parent.mkdir(parents=True)
        with progress.step("copying the source tree"):
            copy_source(src, work / "src")
        with progress.step(f"building the virtualenv at {PREFIX} (pip may download; it reuses its cache)"):
            install_into_venv(opts.python, venv, work / "src", opts.extras, opts.verbose)
            check = run([venv / "bin" / "python", "-I", "-m", "faramesh.launchers.main", "--version"],
                        "PKG_SMOKE_FAILED", "the staged virtualenv cannot run faramesh", quiet=True).strip()
            if check != f"{PACKAGE} {read_version(src)}":
                raise BuildError("PKG_SMOKE_FAILED", f"the staged faramesh reports {check!r}")
            removed = prune_bootstrap(venv)
            print(f"[build-deb]     removed from the venv: {', '.join(removed) or 'nothing'}", file=sys.stderr)
        with progress.step(f"relocating to {PREFIX} and compiling bytecode"):
            rewritten = relocate(venv, str(venv), PREFIX)
            print(f"[build-deb]     rewrote {len(rewritten)} file(s) naming the staging path", file=sys.stderr)
            compile_bytecode(opts.python, stage, venv)
        with progress.step("staging the shim, systemd units and docs"):
            site_dir = "/" + str(site_packages(venv).relative_to(stage))
            units = stage_files(src, stage, project, site_dir)
            print(f"[build-deb]     systemd files: {', '.join(units) or 'none (systemd/ is empty or absent)'}",
                  file=sys.stderr)
            normalise_modes(stage)
        with progress.step("checking for the staging path and computing dependencies"):
            leaks = find_leaks(stage, str(work).encode())
            if leaks:
                raise BuildError("PKG_STAGING_PATH_LEAK",
                                 f"{len(leaks)} file(s) still name the build directory: {', '.join(leaks[:10])}")
            depends = [python_depends(major, minor), *shared_library_depends(venv)]
        with progress.step("writing the control files"):
            md5sums = md5sums_text(stage)
            installed_kib = installed_size_kib(stage)
            control_dir = stage / "DEBIAN"
            control_dir.mkdir(mode=0o755)
            urls = project.get("urls")
            homepage = urls.get("Homepage") if isinstance(urls, dict) else None
            summary = project.get("description")
            fields = ControlFields(
                version=version,
                architecture=arch,
                depends=depends,
                installed_size_kib=installed_kib,
                maintainer=maintainer(project, opts.maintainer),
                summary=summary if isinstance(summary, str) else "policy enforcement for AI agents",
                description=LONG_DESCRIPTION,
                homepage=homepage if isinstance(homepage, str) else None,
            )
            (control_dir / "control").write_text(control_text(fields), encoding="utf-8")
            (control_dir / "md5sums").write_text(md5sums, encoding="utf-8")
            for script in MAINTAINER_SCRIPTS:
                shutil.copyfile(PACKAGING_DIR / script, control_dir / script)
                os.chmod(control_dir / script, 0o755)
            os.chmod(control_dir / "control", 0o644)
            os.chmod(control_dir / "md5sums", 0o644)
            os.chmod(stage, 0o755)
        with progress.step(f"dpkg-deb --build (-Z{opts.compress})"):
            partial = deb.with_name(deb.name + ".partial")
            run(["dpkg-deb", "--root-owner-group", f"-Z{opts.compress}", "--build", stage, partial],
                "PKG_DPKG_DEB_FAILED", "dpkg-deb refused the staging tree; its message is above", quiet=True)
            partial.replace(deb)
    finally:
        os.umask(old_umask)
        if opts.keep_work:
            print(f"[build-deb] kept the work directory {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    size_mib = deb.stat().st_size / 2**20
    print(f"[build-deb] wrote {deb} ({size_mib:.1f} MiB, Installed-Size {installed_kib} KiB) "
          f"in {progress.elapsed():.1f}s", file=sys.stderr)
    return deb


def parse_args(argv: Sequence[str]) -> Options:
    ap = argparse.ArgumentParser(
        prog="build-deb",
        description="Build faramesh_<version>_<arch>.deb: a virtualenv in /opt/faramesh on the system Python, "
        "/usr/bin/faramesh, the systemd units and the sysusers/tmpfiles snippets (packaging/README.md).",
    )
    ap.add_argument("--out", type=Path, default=PACKAGING_DIR.parent / "dist",
                    help="directory for the .deb (default: dist/ in the checkout)")
    ap.add_argument("--source", type=Path, default=PACKAGING_DIR.parent,
                    help="the checkout to package (default: the one holding this script)")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="the system interpreter the venv is built on (default: /usr/bin/python3)")
    ap.add_argument("--extras", default=DEFAULT_EXTRAS,
                    help=f"optional dependency groups to bundle, comma-separated; '' for none "
                    f"(default: {DEFAULT_EXTRAS}, the Vault/AWS/PostgreSQL backends)")
    ap.add_argument("--compress", choices=("xz", "zstd", "gzip", "none"), default="xz",
                    help="dpkg-deb compression (default: xz; zstd builds much faster, dpkg >= 1.21.18 reads it)")
    ap.add_argument("--maintainer", help="the Maintainer field (default: $DEBFULLNAME <$DEBEMAIL>, else pyproject)")
    ap.add_argument("--keep-work", action="store_true", help="keep the staging directory for inspection")
    ap.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    ns = ap.parse_args(list(argv))
    extras = ns.extras.replace(" ", "")
    if extras and not re.fullmatch(r"[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*", extras):
        ap.error(f"--extras: {ns.extras!r} is not a comma-separated list of names")
    return Options(src=ns.source, out=ns.out, python=ns.python, extras=extras, compress=ns.compress,
                   maintainer=ns.maintainer, keep_work=ns.keep_work, verbose=ns.verbose)


EXIT_USAGE = 64  # as every faramesh command (argparse's own 2 is remapped)


def main(argv: Iterable[str] | None = None) -> int:
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return EXIT_USAGE if exc.code == 2 else int(exc.code or 0)
    try:
        deb = build(opts)
    except BuildError as exc:
        print(f"build-deb: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
