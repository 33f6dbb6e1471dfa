#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine, for the container tests.
#
# Idempotent: does nothing when `docker info` already works. Otherwise installs Debian's
# docker.io (and debootstrap, which .ci/base-image.sh needs) when missing, starts dockerd in
# the background with its log in a file, and waits a bounded time for it to answer.
#
# The engine runs with the vfs storage driver and without iptables or a bridge: that is what
# works on a CI machine that is itself a container or a small VM. Containers then use
# `--network host` (or `--network none`).
#
# Environment:
#   DOCKERD_LOG          dockerd's log file        (default /var/log/k3s-deploy-dockerd.log)
#   DOCKERD_WAIT         seconds to wait for it    (default 60)
set -euo pipefail

log_file="${DOCKERD_LOG:-/var/log/k3s-deploy-dockerd.log}"
wait_s="${DOCKERD_WAIT:-60}"

say() { printf 'docker-engine: %s\n' "$*" >&2; }

engine_answers() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

die_with_log() {
  say "ERROR: $*"
  if [ -s "$log_file" ]; then
    say "last lines of $log_file:"
    tail -n 40 "$log_file" >&2 || true
  fi
  exit 1
}

if engine_answers; then
  say "engine already answers"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  die_with_log "no Docker engine answers and this script needs root to install or start one"
fi

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
# A machine may have a docker client without an engine (or the reverse): docker.io has both.
if ! command -v docker >/dev/null 2>&1 && [ "${#need_apt[@]}" -eq 0 ]; then
  need_apt+=(docker.io)
fi
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
if [ "${#need_apt[@]}" -gt 0 ]; then
  say "installing ${need_apt[*]}"
  apt-get update -qq
  # policy-rc.d-less machines would try to start the service from the package scripts:
  # harmless (no init system), but keep the output short.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

if pgrep -x dockerd >/dev/null 2>&1; then
  say "dockerd is already running but does not answer yet: waiting for it"
else
  mkdir -p "$(dirname "$log_file")"
  say "starting dockerd (log: $log_file)"
  {
    printf '\n==== %s: dockerd started by .ci/docker-engine.sh ====\n' "$(date -u +%FT%TZ)"
  } >>"$log_file"
  # setsid + closed stdin: the engine outlives this script and holds none of its pipes.
  setsid dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
    </dev/null >>"$log_file" 2>&1 &
  dockerd_pid=$!
fi

deadline=$((SECONDS + wait_s))
until engine_answers; do
  if [ -n "${dockerd_pid:-}" ] && ! kill -0 "$dockerd_pid" 2>/dev/null; then
    die_with_log "dockerd exited before answering"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    die_with_log "no answer from the Docker engine after ${wait_s}s"
  fi
  sleep 1
done

say "engine answers: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}' 2>/dev/null || echo ok)"
