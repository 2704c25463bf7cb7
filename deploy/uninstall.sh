#!/usr/bin/env bash
# Remove edgeagent from one box: stop and disable the unit, remove it and the virtualenv that
# install.sh made. The model store (/var/lib/edgeagent), the cache, the config, the credentials
# and the user stay unless --purge is given.
#
#   sudo deploy/uninstall.sh [--purge] [--root DIR] [--venv /opt/edgeagent/venv]
set -euo pipefail

ROOT=/ PURGE=0 VENV=/opt/edgeagent/venv UNIT=edgeagent.service
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --purge) PURGE=1; shift ;;
        --venv) VENV=$2; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }
ROOT=${ROOT%/}
at() { echo "$ROOT$1"; }
gone() { echo "edgeagent uninstall: removed $*"; }

if [ -z "$ROOT" ]; then
    systemctl disable --now --quiet "$UNIT" 2>/dev/null || true
elif [ -L "$(at /etc/systemd/system/multi-user.target.wants/$UNIT)" ]; then
    systemctl --root="$ROOT" disable "$UNIT" 2>/dev/null
fi
if [ -f "$(at /etc/systemd/system/$UNIT)" ]; then
    rm -f "$(at /etc/systemd/system/$UNIT)" && gone "/etc/systemd/system/$UNIT"
    [ -n "$ROOT" ] || systemctl daemon-reload
fi
if [ -L "$(at /usr/local/bin/edgeagent)" ]; then
    rm -f "$(at /usr/local/bin/edgeagent)" && gone /usr/local/bin/edgeagent
fi
if [ -f "$(at /usr/share/mender/modules/v3/edgeagent-model)" ]; then
    rm -f "$(at /usr/share/mender/modules/v3/edgeagent-model)" \
        && gone /usr/share/mender/modules/v3/edgeagent-model
fi
if [ -d "$(at "$VENV")" ]; then
    rm -rf "$(at "$VENV")" && gone "$VENV"
fi
if [ "$PURGE" -eq 0 ]; then
    echo "edgeagent uninstall: kept the model store, cache, config, credentials and user" \
         "(--purge removes them)"
    exit 0
fi
for path in /var/lib/edgeagent /var/cache/edgeagent /etc/edgeagent; do
    if [ -e "$(at $path)" ]; then rm -rf "$(at $path)" && gone "$path"; fi
done
prefix=(); [ -z "$ROOT" ] || prefix=(--prefix "$ROOT")
if grep -q "^edgeagent:" "$(at /etc/passwd)"; then userdel "${prefix[@]}" edgeagent && gone "user edgeagent"; fi
for group in edgeagent edgeagent-clients; do
    if grep -q "^$group:" "$(at /etc/group)"; then groupdel "${prefix[@]}" "$group" && gone "group $group"; fi
done
