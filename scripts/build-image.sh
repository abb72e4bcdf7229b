#!/usr/bin/env bash
# Builds the container image of llm-edge (Containerfile) with podman.
#
#   scripts/build-image.sh [--binary PATH] [--tag NAME] [--base IMAGE]
#
# The build context is the .deb's tree (scripts/package-deb.sh, which builds
# the binary with the dist profile unless --binary is given): /usr/bin/llm-edge
# and /etc/llm-edge/llm-edge.yaml. The base image is --base, else
# debian:bookworm-slim when a registry answers, else a Debian bookworm made here
# with `debootstrap --variant=minbase` and `podman import`ed as
# localhost/debian-minbase:bookworm (cached in ${LLM_EDGE_CACHE:-~/.cache/llm-edge}).
# Prints the image name on stdout. Needs podman, dpkg-deb; debootstrap for the
# local base (Debian: apt-get install podman debootstrap).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
binary=()
tag=localhost/llm-edge:latest
base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=(--binary "$2"); shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--tag NAME] [--base IMAGE]" >&2; exit 2 ;;
  esac
done
log() { echo "build-image: $*" >&2; }

if [ -z "$base" ]; then
  if podman image exists docker.io/library/debian:bookworm-slim \
     || podman pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
    base=docker.io/library/debian:bookworm-slim
  else
    base=localhost/debian-minbase:bookworm
    if ! podman image exists "$base"; then
      cache="${LLM_EDGE_CACHE:-$HOME/.cache/llm-edge}"
      rootfs="$cache/rootfs-minbase"
      if [ ! -x "$rootfs/bin/sh" ]; then
        log "no registry: making a Debian bookworm base with debootstrap (a few minutes)"
        rm -rf "$rootfs.tmp"
        debootstrap --variant=minbase bookworm "$rootfs.tmp" http://deb.debian.org/debian >&2
        mv "$rootfs.tmp" "$rootfs"
      fi
      log "importing $rootfs as $base"
      # apt's lists and caches, manuals and translations are not needed at run time
      tar -C "$rootfs" -c \
        --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' \
        --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' \
        --exclude='./usr/share/info/*' \
        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' . \
        | podman import - "$base" >&2
    fi
  fi
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
deb=$("$repo/scripts/package-deb.sh" "${binary[@]}" --compress none --out "$context/deb")
dpkg-deb -x "$deb" "$context"
cp "$repo/Containerfile" "$context/"
log "building $tag from $base"
podman build -q --build-arg "BASE=$base" -t "$tag" -f "$context/Containerfile" "$context" >&2
echo "$tag"
