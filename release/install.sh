#!/usr/bin/env bash
# Install this offline release of edgeagent, with no package index: check SHA256SUMS, install
# its wheels (each against its locked sha256) into /opt/edgeagent/releases/<version> with
# `pip --no-index`, switch /opt/edgeagent/current to it atomically, then deploy/install.sh
# (user, groups, config if missing, unit) restarts the unit and waits until it serves. If it
# does not, the previous release is switched back and started, and this exits 1 naming what
# failed. The model store and the config are left alone. A second run changes nothing.
#
#   sudo ./install.sh                     # install or upgrade to this release
#   sudo ./install.sh --rollback          # back to the previous release, by hand
#   sudo ./install.sh --health-wait 600   # seconds the unit has to serve (default 900)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OPT=/opt/edgeagent RELEASES=/opt/edgeagent/releases HEALTH_WAIT=900 ROLLBACK=0
PYTHON=${PYTHON:-/usr/bin/python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --rollback) ROLLBACK=1; shift ;;
        --health-wait) HEALTH_WAIT=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
say() { echo "edgeagent release: $*"; }
fail() { echo "install.sh: $*" >&2; exit 1; }
field() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
linked() {  # current|previous: the version that link names, or nothing
    local target
    target=$(readlink "$OPT/$1" 2>/dev/null) || return 0
    echo "${target##*/}"
}

switch() {  # LINK VERSION: point $OPT/LINK at releases/VERSION by one rename
    ln -sfn "releases/$2" "$OPT/.$1.new"
    mv -T "$OPT/.$1.new" "$OPT/$1"
}

start() {  # VERSION [--restart]: the unit from that release's own files; fails unless it serves
    timeout "$HEALTH_WAIT" bash "$RELEASES/$1/deploy/install.sh" \
        --exec "$OPT/current/venv/bin/edgeagent" --health-wait "$HEALTH_WAIT" "${@:2}"
}

settle() {  # the unit stopped (no automatic restart of the failed one under the switch) and its
    # failed starts forgotten (they must not use up StartLimitBurst before the rollback's start)
    systemctl stop edgeagent.service 2>/dev/null || true
    systemctl reset-failed edgeagent.service 2>/dev/null || true
}

back_to() {  # VERSION PREVIOUS WHY: current -> VERSION (previous -> PREVIOUS) again; exits 1
    settle
    switch current "$1"
    if [ -n "$2" ]; then switch previous "$2"; else rm -f "$OPT/previous"; fi
    say "rolling back to $1"
    start "$1" --restart || fail "$3; rolled back to $1, which does not serve either" \
        "(journalctl -u edgeagent)"
    fail "$3; rolled back to $1, which serves"
}

if [ "$ROLLBACK" -eq 1 ]; then
    previous=$(linked previous)
    [ -n "$previous" ] && [ -f "$RELEASES/$previous/release.json" ] \
        || fail "no previous release to roll back to"
    current=$(linked current)
    settle
    switch current "$previous"
    [ -z "$current" ] || switch previous "$current"
    say "rolled back from ${current:--} to $previous"
    start "$previous" --restart \
        || back_to "$current" "$previous" "$previous did not serve after --rollback"
    exit 0
fi

# 1. The release as built: every file's sha256, and nothing in wheels/ that is not listed.
(cd "$HERE" && sha256sum --quiet --strict -c SHA256SUMS) || fail "$HERE does not match its SHA256SUMS"
unlisted=$(cd "$HERE" && find wheels -type f | sort | comm -23 - <(awk '{print $2}' SHA256SUMS | sort))
[ -z "$unlisted" ] || fail "files not in SHA256SUMS: $unlisted"
VERSION=$(field "$HERE/release.json" version)
FLAVOR=$(field "$HERE/release.json" flavor)
WANT_PY=$(field "$HERE/release.json" python)
HAVE_PY=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$HAVE_PY" = "$WANT_PY" ] || fail "$PYTHON is Python $HAVE_PY; this release's wheels are for $WANT_PY"

# 2. The gpu flavor uses the host's torch and CUDA: check them before anything changes.
SYSTEM_SITE=()
if [ "$FLAVOR" = gpu ]; then
    SYSTEM_SITE=(--system-site-packages)
    want_torch=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["host_packages"]["torch"])' "$HERE/release.json")
    have_torch=$("$PYTHON" -c 'import torch; assert torch.version.cuda, "a CPU build"; print(torch.__version__)' 2>&1) \
        || fail "the gpu flavor needs the host's CUDA torch $want_torch for $PYTHON: $have_torch"
    [ "${have_torch%%+*}" = "${want_torch%%+*}" ] \
        || fail "the host's torch is $have_torch; this release was locked against torch $want_torch"
fi

# 3. The release's own directory: a venv with its wheels, its scripts, and release.json last
#    (the mark of a complete installation).
DEST=$RELEASES/$VERSION
if [ -f "$DEST/release.json" ] && cmp -s "$DEST/release.json" "$HERE/release.json"; then
    installed=0
else
    [ ! -e "$DEST" ] || { say "removing an unfinished $DEST"; rm -rf "$DEST"; }
    say "installing $VERSION ($FLAVOR) into $DEST"
    mkdir -p "$DEST"
    "$PYTHON" -m venv "${SYSTEM_SITE[@]}" "$DEST/venv"
    # No index, no configuration (PIP_CONFIG_FILE=/dev/null): only the wheels shipped here.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PIP_CONFIG_FILE=/dev/null \
        "$DEST/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
        --no-deps --only-binary=:all: --require-hashes --no-compile \
        --find-links "$HERE/wheels" -r "$HERE/requirements.txt" \
        || { rm -rf "$DEST"; fail "installing the wheels of $VERSION failed"; }
    (cd "$HERE" && cp -r --parents install.sh uninstall.sh deploy systemd requirements.txt SHA256SUMS "$DEST/")
    cp "$HERE/release.json" "$DEST/release.json"
    installed=1
    say "installed $VERSION's $(ls "$HERE/wheels" | wc -l) wheels in $SECONDS s"
fi

# 4. Switch and start. previous is the release that served before this one.
before=$(linked current) before_previous=$(linked previous) restart=()
if [ "$before" != "$VERSION" ]; then
    [ -z "$before" ] || switch previous "$before"
    switch current "$VERSION"
    restart=(--restart)
    say "current: ${before:-nothing} -> $VERSION"
fi
status=0
start "$VERSION" "${restart[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    if [ "$status" -eq 124 ]; then
        why="$VERSION did not serve within ${HEALTH_WAIT} s (journalctl -u edgeagent)"
    else
        why="$VERSION did not serve: its deploy/install.sh exited $status (journalctl -u edgeagent)"
    fi
    [ -n "$before" ] && [ "$before" != "$VERSION" ] || fail "$why; no previous release to roll back to"
    back_to "$before" "$before_previous" "$why"
fi
say "$VERSION serves ($SECONDS s since the installer started)"
# 5. Only current and previous are kept.
for old in "$RELEASES"/*; do
    name=${old##*/}
    [ "$name" = "$(linked current)" ] || [ "$name" = "$(linked previous)" ] || {
        rm -rf "$old"; say "removed the old release $name"; }
done
[ "$installed" -eq 1 ] || [ "$before" != "$VERSION" ] || say "$VERSION was already installed and current"
