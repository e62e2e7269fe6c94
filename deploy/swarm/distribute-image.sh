#!/usr/bin/env bash
# Put a local image on every swarm node without a registry: `docker save` here, then
# `docker load` on each node through its engine (ssh://, tcp:// or unix:// DOCKER_HOST).
#
#   deploy/swarm/distribute-image.sh wanwu-worker:cpu ssh://root@gpu-1 ssh://root@gpu-2
#
# A node that already has the same image id is skipped. With many nodes, a private
# registry (Debian's docker-registry package) is the better way: README.md.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 IMAGE DOCKER_HOST..." >&2
  exit 2
fi
image=$1
shift
id=$(docker image inspect --format '{{.Id}}' "$image") || {
  echo "$0: $image is not present here (wanwu image build)" >&2
  exit 1
}
archive=$(mktemp --tmpdir wanwu-image.XXXXXX.tar)
trap 'rm -f "$archive"' EXIT
echo "saving $image ($id)"
docker save -o "$archive" "$image"
for host in "$@"; do
  if [ "$(DOCKER_HOST=$host docker image inspect --format '{{.Id}}' "$image" 2>/dev/null)" = "$id" ]; then
    echo "$host: already has $image"
    continue
  fi
  echo "$host: loading $image"
  DOCKER_HOST=$host docker load -i "$archive" >/dev/null
  echo "$host: $(DOCKER_HOST=$host docker image inspect --format '{{.Id}}' "$image")"
done
