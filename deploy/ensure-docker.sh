#!/usr/bin/env bash
# Make a Docker engine answer `docker info`, or say exactly why it cannot.
#
# 1. An engine already answers: nothing to do.
# 2. Root on Debian/Ubuntu without systemd: install docker.io with apt and start
#    dockerd in the background, logging to /var/log/wanwu-dockerd.log.
# 3. Anything else: print what to do and exit 1.
set -euo pipefail

log() { printf 'ensure-docker: %s\n' "$*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

wait_for_engine() {
  local i
  for i in $(seq 1 60); do
    engine_up && return 0
    sleep 1
  done
  return 1
}

if command -v docker >/dev/null 2>&1 && engine_up; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  log "no Docker engine answers and this is not root."
  log "start one (e.g. 'sudo systemctl start docker') or add yourself to the docker group."
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no dockerd and no apt-get: install Docker Engine for this OS, then run again."
    exit 1
  fi
  log "installing docker.io with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

# A stale pid file from a killed daemon stops a new one from starting.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  rm -f /var/run/docker.pid
fi

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  log "starting docker with systemctl"
  systemctl start docker
else
  log "starting dockerd in the background (log: /var/log/wanwu-dockerd.log)"
  nohup setsid dockerd >/var/log/wanwu-dockerd.log 2>&1 </dev/null &
fi

if ! wait_for_engine; then
  log "dockerd did not answer within 60 s; last log lines:"
  tail -n 20 /var/log/wanwu-dockerd.log >&2 || true
  exit 1
fi
log "engine ready: $(docker version --format '{{.Server.Version}}')"
