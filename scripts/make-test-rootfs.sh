#!/usr/bin/env bash
# Makes the Debian bookworm root file systems the packaging tests boot or build
# from, once, into a cache outside the repository:
#   ${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/rootfs-minbase   debootstrap --variant=minbase
#     (the container image's base, scripts/build-image.sh)
#   ${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}/rootfs-systemd   the same plus systemd, dbus,
#     openssh and autossh, booted with systemd-nspawn by tests/python/test_package.py
# Prints the rootfs-systemd path. 4-6 minutes the first time, instant after.
# Needs root and debootstrap (Debian package).
set -euo pipefail

cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}"
minbase="$cache/rootfs-minbase"
systemd="$cache/rootfs-systemd"
log() { echo "make-test-rootfs: $*" >&2; }

done_already() { [ -x "$minbase/bin/sh" ] && [ -x "$systemd/lib/systemd/systemd" ]; }
if done_already; then echo "$systemd"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.rootfs.lock"
flock 9
if done_already; then echo "$systemd"; exit 0; fi

start=$(date +%s)
if [ ! -x "$minbase/bin/sh" ]; then
  log "debootstrap --variant=minbase bookworm (a few minutes)"
  rm -rf "$minbase.tmp"
  debootstrap --variant=minbase bookworm "$minbase.tmp" http://deb.debian.org/debian >&2
  mv "$minbase.tmp" "$minbase"
fi
rm -rf "$systemd.tmp"
cp -a "$minbase" "$systemd.tmp"
log "installing systemd, openssh and autossh into the test root"
chroot "$systemd.tmp" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus \
  openssh-server openssh-client autossh curl procps libgomp1 && apt-get clean' >&2
# Nothing the tests do not start: no console, no logind, sshd only as the tests configure it.
chroot "$systemd.tmp" systemctl mask ssh.service getty@tty1.service console-getty.service \
  systemd-logind.service >/dev/null 2>&1
mv "$systemd.tmp" "$systemd"
log "ready in $(( $(date +%s) - start )) s: $systemd"
echo "$systemd"
