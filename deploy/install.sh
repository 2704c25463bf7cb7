#!/usr/bin/env bash
# Install edgeagent on one box: the edgeagent user and groups, the config and credential files,
# a virtualenv with edgeagent (or an existing installation), the systemd unit; then enable and
# start it and wait until it serves. Idempotent: a second run changes nothing and says so.
#
#   sudo deploy/install.sh                       # venv in /opt/edgeagent/venv from this checkout
#   sudo deploy/install.sh --source 'edgeagent[gpu]==0.3.0' --extra ''   # from an index
#   sudo deploy/install.sh --exec /usr/bin/edgeagent   # an installation your packaging made
#   deploy/install.sh --root /tmp/scratch --exec "$PWD/.venv/bin/edgeagent" --no-start
#   deploy/install.sh --exec /opt/edgeagent/current/venv/bin/edgeagent --restart  # a release's
#
# --root installs into another file system tree (a scratch root, an image being built): users
# and groups go into its /etc/passwd and /etc/group, the unit is enabled there, nothing starts.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
ROOT=/ SOURCE=$REPO EXTRA=gpu EXEC="" START=1 RESTART=0 HEALTH_WAIT=900 PYTHON=${PYTHON:-python3}
VENV=/opt/edgeagent/venv UNIT=edgeagent.service
CLIENT_GROUP=edgeagent-clients

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --source) SOURCE=$2; shift 2 ;;
        --extra) EXTRA=$2; shift 2 ;;
        --exec) EXEC=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --restart) RESTART=1; shift ;;  # restart even if nothing here changed (a new --exec)
        --health-wait) HEALTH_WAIT=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
ROOT=${ROOT%/}
CHANGED=0
at() { echo "$ROOT$1"; }
did() { echo "edgeagent install: $*"; CHANGED=1; }
prefix=(); [ -z "$ROOT" ] || prefix=(--prefix "$ROOT")

ensure_group() {
    grep -q "^$1:" "$(at /etc/group)" && return
    groupadd --system "${prefix[@]}" "$1"
    did "group $1"
}

ensure_user() {
    grep -q "^edgeagent:" "$(at /etc/passwd)" && return
    useradd --system --gid edgeagent --home-dir /var/lib/edgeagent --no-create-home \
        --shell /usr/sbin/nologin --comment "edgeagent model server" "${prefix[@]}" edgeagent
    did "user edgeagent"
}

ensure_file() {  # SOURCE TARGET MODE: installed only if missing (an operator's edits are kept)
    [ -e "$(at "$2")" ] && return
    install -D -m "$3" "$1" "$(at "$2")"
    did "$2"
}

ensure_venv() {
    if [ -n "$EXEC" ]; then
        [ -x "$EXEC" ] || { echo "install.sh: --exec $EXEC is not executable" >&2; exit 1; }
        return
    fi
    EXEC=$VENV/bin/edgeagent
    [ -x "$(at "$EXEC")" ] && return
    "$PYTHON" -m venv "$(at "$VENV")"
    "$(at "$VENV")/bin/pip" install --quiet --disable-pip-version-check \
        "$SOURCE${EXTRA:+[$EXTRA]}"
    did "virtualenv $VENV with $SOURCE${EXTRA:+[$EXTRA]}"
}

ensure_command() {  # `edgeagent` on root's and the apps' PATH
    local link
    link=$(at /usr/local/bin/edgeagent)
    [ "$(readlink "$link" 2>/dev/null)" = "$EXEC" ] && return
    mkdir -p "$(dirname "$link")"
    ln -sfn "$EXEC" "$link"
    did "/usr/local/bin/edgeagent -> $EXEC"
}

ensure_mender_module() {  # where Mender's client is installed: its update module for models
    local modules target
    modules=$(at /usr/share/mender/modules/v3)
    [ -d "$modules" ] || return 0
    target=$modules/edgeagent-model
    cmp -s "$REPO/deploy/mender/edgeagent-model" "$target" && return
    install -m 0755 "$REPO/deploy/mender/edgeagent-model" "$target"
    did "Mender update module /usr/share/mender/modules/v3/edgeagent-model"
}

ensure_unit() {
    local rendered target
    rendered=$(sed "s|^ExecStart=.*|ExecStart=$EXEC serve|" "$REPO/systemd/$UNIT")
    target=$(at "/etc/systemd/system/$UNIT")
    [ -f "$target" ] && [ "$(cat "$target")" = "$rendered" ] && return
    mkdir -p "$(dirname "$target")"
    printf '%s\n' "$rendered" > "$target.new" && chmod 0644 "$target.new" && mv "$target.new" "$target"
    did "unit /etc/systemd/system/$UNIT (ExecStart=$EXEC serve)"
}

ensure_enabled() {
    if [ -n "$ROOT" ]; then
        [ -L "$(at /etc/systemd/system/multi-user.target.wants/$UNIT)" ] && return
        systemctl --root="$ROOT" enable "$UNIT" 2>/dev/null
    else
        [ "$CHANGED" -eq 1 ] && systemctl daemon-reload
        systemctl is-enabled --quiet "$UNIT" && return
        systemctl enable --quiet "$UNIT"
    fi
    did "enabled $UNIT"
}

start_and_probe() {
    if [ "$CHANGED" -eq 1 ] || [ "$RESTART" -eq 1 ] || ! systemctl is-active --quiet "$UNIT"; then
        systemctl restart "$UNIT"
        echo "edgeagent install: started $UNIT; waiting up to ${HEALTH_WAIT} s for it to serve"
    fi
    if ! "$EXEC" health --target unix:/run/edgeagent/edgeagent.sock --wait "$HEALTH_WAIT"; then
        echo "install.sh: edgeagent is not serving; see: journalctl -u $UNIT -e" >&2
        exit 1
    fi
}

ensure_group edgeagent
ensure_group "$CLIENT_GROUP"
ensure_user
ensure_file "$REPO/deploy/edgeagent.toml.example" /etc/edgeagent/edgeagent.toml 0644
for credential in hub_token api_token admin_token; do  # empty: not set; fill in to use one
    ensure_file /dev/null "/etc/edgeagent/credentials/$credential" 0600
done
chmod 0700 "$(at /etc/edgeagent/credentials)"
ensure_venv
ensure_command
ensure_mender_module
ensure_unit
ensure_enabled
if [ -z "$ROOT" ] && [ "$START" -eq 1 ]; then
    start_and_probe
fi
[ "$CHANGED" -eq 1 ] || echo "edgeagent install: nothing to change"
