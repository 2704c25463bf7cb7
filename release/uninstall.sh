#!/usr/bin/env bash
# Remove edgeagent installed from offline releases: deploy/uninstall.sh stops and removes the
# unit and the `edgeagent` command, then every release in /opt/edgeagent/releases goes, and the
# current and previous links. The model store, cache, config, credentials and user stay
# unless --purge is given.
#
#   sudo ./uninstall.sh [--purge]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
    ""|--purge) ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }
bash "$HERE/deploy/uninstall.sh" --venv /opt/edgeagent/releases "$@"
for link in current previous; do
    if [ -L "/opt/edgeagent/$link" ]; then
        rm -f "/opt/edgeagent/$link" && echo "edgeagent uninstall: removed /opt/edgeagent/$link"
    fi
done
rmdir /opt/edgeagent 2>/dev/null || true
