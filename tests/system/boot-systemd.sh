#!/usr/bin/env bash
# Boot systemd as PID 1 in new namespaces on a private root, without touching the host's files
# (after ../shared/reference/systemd-boot.sh, tried on the development machine): a tmpfs root;
# /usr, /etc, /var and /root as overlays whose upper layers are on tmpfs (what the tests install
# under /usr, the `edgeagent` link and Mender's update module, never reaches the host's); fresh
# /tmp and /run; /bin, /lib... bound in from the host's own; each SRC:DST of SDBINDS at DST.
# Prints the host-side PID of the booted systemd; reach it with `nsenter -t PID -a ...`; stop
# it with `kill -KILL PID` (its namespaces and mounts go with it), never by name.
#
# Never boot systemd on the host's own root: its boot-time tmpfiles emptied the host's /tmp.
#
#   SDROOT=/var/tmp/box1 SDBINDS="/work/main:/srv/checkout" boot-systemd.sh
set -euo pipefail
R=${SDROOT:?set SDROOT to an empty directory outside /tmp}
BINDS=${SDBINDS:-}
mkdir -p "$R"
log="$R.boot.log"
setsid unshare --mount --pid --fork --uts --ipc --net --propagation private -- bash -c '
  set -e
  R="$1"; BINDS="$2"
  mount -t tmpfs -o mode=755 sdroot "$R"
  mkdir -p "$R"/{usr,etc,var,root,proc,sys,dev,run,tmp,opt,srv,.up,.oldroot}
  for l in bin sbin lib lib64 lib32 libx32; do
    if [ -L /$l ]; then cp -P /$l "$R/$l"; elif [ -d /$l ]; then mkdir -p "$R/$l"; mount --rbind /$l "$R/$l"; fi
  done
  mount -t tmpfs tmpfs "$R/.up"
  for d in usr etc var root; do
    mkdir -p "$R/.up/$d/u" "$R/.up/$d/w"
    mount -t overlay overlay -o lowerdir=/$d,upperdir="$R/.up/$d/u",workdir="$R/.up/$d/w" "$R/$d"
  done
  mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
  mount -t tmpfs -o mode=755 tmpfs "$R/run"
  mount --rbind /dev "$R/dev"
  mount --rbind /sys "$R/sys"
  for pair in $BINDS; do
    src=${pair%%:*}; dst=${pair#*:}
    mkdir -p "$R$dst"; mount --rbind "$src" "$R$dst"
  done
  cd "$R"
  pivot_root . .oldroot
  mount -t proc proc /proc
  umount -l /.oldroot
  # systemd sets up LoadCredential= and a unit'"'"'s private mounts by propagating mounts from
  # its own namespace: without a shared root, a unit with credentials fails to start (status 243).
  mount --make-rshared /
  exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system --unit=multi-user.target
' boot "$R" "$BINDS" > "$log" 2>&1 &
launcher=$!
for _ in $(seq 80); do
  for p in $(pgrep -P "$launcher" || true) $launcher; do
    pid=$(pgrep -P "$p" -x systemd || true)
    [ -n "$pid" ] && { echo "$pid"; exit 0; }
  done
  sleep 0.25
done
echo "systemd did not start; see $log" >&2
exit 1
