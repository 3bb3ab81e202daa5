#!/bin/sh
# Install Faramesh from this checkout on a host without dpkg (the .deb is packaging/build-deb).
#
#   packaging/install.sh [--prefix DIR] [--bindir DIR] [--python PATH] [--extras LIST] [--no-system]
#   packaging/install.sh --uninstall [--prefix DIR] [--no-system]
#
# It lays out what the .deb does: a virtualenv in PREFIX (default /opt/faramesh) built on the system
# Python, the shim BINDIR/faramesh (default /usr/bin), the units and sysusers.d/tmpfiles.d snippets from
# systemd/ in /usr/lib, and then runs packaging/postinst (users, directories, systemd reload, engine
# restart), so both paths behave the same. --no-system installs only the virtualenv and the shim (no
# root needed if the directories are writable). Running it again upgrades in place.
# Unlike the .deb, the virtualenv keeps pip: PREFIX/bin/pip can add packages, and this script reinstalls.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")
PREFIX=/opt/faramesh
BINDIR=/usr/bin
PYTHON=/usr/bin/python3
EXTRAS=providers
SYSTEM=1
ACTION=do_install
UNITDIR=/usr/lib/systemd/system
SYSUSERSDIR=/usr/lib/sysusers.d
TMPFILESDIR=/usr/lib/tmpfiles.d

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0"
}

# Errors carry a stable code, as everywhere in Faramesh.
die() {
    code=$1
    shift
    echo "install.sh: $code: $*" >&2
    exit 1
}

step() { echo "[install.sh] $*" >&2; }

need_arg() { [ $# -ge 2 ] || die INSTALL_USAGE "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --bindir) need_arg "$@"; BINDIR=$2; shift 2 ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --extras) need_arg "$@"; EXTRAS=$2; shift 2 ;;
        --no-system) SYSTEM=0; shift ;;
        --uninstall) ACTION=do_uninstall; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die INSTALL_USAGE "unknown argument '$1' (see --help)" ;;
    esac
done

# The paths go into a shebang, a sed replacement and rm -rf: only plain absolute paths are accepted.
for dir in "$PREFIX" "$BINDIR"; do
    case "$dir" in
        /*) ;;
        *) die INSTALL_USAGE "'$dir' is not an absolute path" ;;
    esac
    case "$dir" in
        *[!A-Za-z0-9/._-]* | */../* | */.. | /) die INSTALL_USAGE "'$dir' is not a plain directory path" ;;
    esac
done
case "$EXTRAS" in
    *[!A-Za-z0-9_,-]*) die INSTALL_USAGE "--extras takes a comma-separated list of names" ;;
esac

MANIFEST=$PREFIX/share/faramesh/install-manifest

if [ "$SYSTEM" = 1 ] && [ "$(id -u)" != 0 ]; then
    die INSTALL_NEEDS_ROOT "creating users and installing units needs root; --no-system installs only the files"
fi

# dpkg owns these paths when the package is installed; writing over them would corrupt its database.
if command -v dpkg-query >/dev/null 2>&1 &&
    [ "$(dpkg-query -W -f='${db:Status-Status}' faramesh 2>/dev/null || true)" = installed ] &&
    { [ "$PREFIX" = /opt/faramesh ] || [ "$BINDIR" = /usr/bin ]; }; then
    die INSTALL_DPKG_OWNS "the faramesh .deb is installed: upgrade or remove it with apt/dpkg instead"
fi

do_uninstall() {
    if [ ! -f "$MANIFEST" ] || [ ! -f "$PREFIX/pyvenv.cfg" ]; then
        die INSTALL_NOT_OURS "$PREFIX was not installed by install.sh (no $MANIFEST); nothing removed"
    fi
    [ "$SYSTEM" = 0 ] || sh "$HERE/prerm" remove
    while IFS= read -r file; do
        case "$file" in
            /*) rm -f "$file" ;;
        esac
    done <"$MANIFEST"
    rm -rf "$PREFIX"
    [ "$SYSTEM" = 0 ] || sh "$HERE/postrm" remove
    step "removed $PREFIX and the files it listed; /var/lib/faramesh, /var/log/faramesh and the users are kept"
}

install_file() {
    # $1 source, $2 destination directory; recorded for --uninstall.
    mkdir -p "$2"
    cp "$1" "$2/.$(basename "$1").new"
    chmod 0644 "$2/.$(basename "$1").new"
    mv -f "$2/.$(basename "$1").new" "$2/$(basename "$1")"
    echo "$2/$(basename "$1")" >>"$MANIFEST.new"
}

install_systemd() {
    [ -d "$SRC/systemd" ] || { step "no systemd/ directory in $SRC: no units installed"; return 0; }
    for file in "$SRC"/systemd/*; do
        [ -f "$file" ] || continue
        case "$file" in
            *.service | *.socket | *.target | *.timer | *.path | *.slice) install_file "$file" "$UNITDIR" ;;
        esac
    done
    for file in "$SRC"/systemd/sysusers.d/*.conf; do
        [ -f "$file" ] && install_file "$file" "$SYSUSERSDIR"
    done
    for file in "$SRC"/systemd/tmpfiles.d/*.conf; do
        [ -f "$file" ] && install_file "$file" "$TMPFILESDIR"
    done
    return 0
}

do_install() {
    "$PYTHON" -I -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die INSTALL_PYTHON "$PYTHON is missing or older than Python 3.11"
    if [ -e "$PREFIX" ] && [ ! -f "$PREFIX/pyvenv.cfg" ] && [ -n "$(ls -A "$PREFIX")" ]; then
        die INSTALL_NOT_OURS "$PREFIX exists and is not a virtualenv; choose another --prefix"
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/faramesh-install.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    trap 'exit 130' INT TERM

    step "creating the virtualenv $PREFIX on $PYTHON"
    "$PYTHON" -I -m venv "$PREFIX" ||
        die INSTALL_PYTHON "$PYTHON -m venv failed (Debian/Ubuntu: python3-venv; Fedora/RHEL: python3)"

    # pip builds in-tree, so it gets a copy: nothing is written into the checkout.
    mkdir "$work/src"
    (cd "$SRC" && tar -cf - --exclude='./.*' --exclude=./build --exclude=./dist --exclude=__pycache__ \
        --exclude='*.egg-info' --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
        --exclude=.hypothesis .) | (cd "$work/src" && tar -xf -)

    step "installing faramesh[$EXTRAS] and its dependencies with pip (it reuses its cache)"
    target=$work/src
    [ -z "$EXTRAS" ] || target="$work/src[$EXTRAS]"
    "$PREFIX/bin/python" -I -m pip install --disable-pip-version-check --no-input \
        --prefer-binary --upgrade --quiet "$target" ||
        die INSTALL_PIP "pip could not install Faramesh; its output is above"

    mkdir -p "$PREFIX/share/faramesh" "$BINDIR"
    : >"$MANIFEST.new"
    step "writing $BINDIR/faramesh"
    site=$("$PREFIX/bin/python" -I -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    case "$site" in
        "$PREFIX"/*) ;;
        *) die INSTALL_PYTHON "the virtualenv's site-packages ($site) is not inside $PREFIX" ;;
    esac
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@SITE_PACKAGES@|$site|g" "$HERE/shim.in" >"$BINDIR/.faramesh.new"
    chmod 0755 "$BINDIR/.faramesh.new"
    mv -f "$BINDIR/.faramesh.new" "$BINDIR/faramesh"
    echo "$BINDIR/faramesh" >>"$MANIFEST.new"

    if [ "$SYSTEM" = 1 ]; then
        [ "$BINDIR" = /usr/bin ] ||
            step "warning: the units and generated launchers run /usr/bin/faramesh, not $BINDIR/faramesh"
        step "installing the systemd units and snippets"
        install_systemd
        mv -f "$MANIFEST.new" "$MANIFEST"
        step "creating users and directories, reloading systemd (packaging/postinst configure)"
        sh "$HERE/postinst" configure
    else
        mv -f "$MANIFEST.new" "$MANIFEST"
    fi
    step "installed: $("$BINDIR/faramesh" --version)"
}

"$ACTION"
