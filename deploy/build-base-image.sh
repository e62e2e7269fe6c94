#!/usr/bin/env bash
# Build a python:3.11-slim equivalent from Debian bookworm without a registry:
# debootstrap a minimal root with Python 3.11, strip what a runtime never reads,
# and `docker import` it. Cached by tag: a second run returns at once.
#
#   deploy/build-base-image.sh [TAG]        (default wanwu-base:bookworm)
#   WANWU_DEBIAN_MIRROR=http://... to use another mirror.
set -euo pipefail

tag=${1:-wanwu-base:bookworm}
mirror=${WANWU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf 'build-base-image: %s\n' "$*" >&2; }

if docker image inspect "$tag" >/dev/null 2>&1; then
  log "$tag is present; nothing to do"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "debootstrap needs root; run as root or provide $tag another way"
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

root=$(mktemp -d /var/tmp/wanwu-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

log "debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase --include=python3,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# Nothing at run time reads these; they are a third of a minbase root.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/usr/share/locale/* "$root"/tmp/*
find "$root"/usr/lib/python3* -name '__pycache__' -type d -prune -exec rm -rf {} +

log "importing as $tag"
tar -C "$root" -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["python3"]' - "$tag" >/dev/null
log "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
