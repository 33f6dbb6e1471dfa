#!/usr/bin/env bash
# Builds a local stand-in for the official slim Python image when no registry can be pulled
# from, and prints its name on stdout (everything else goes to stderr).
#
#   IMAGE=$(bash .ci/base-image.sh)
#   docker build --network host --build-arg BASE_IMAGE="$IMAGE" -t k3s-deploy-action:test .
#
# The stand-in is a Debian bookworm minbase with Debian's python3 (3.11), venv and pip, the
# machine's CA bundle (the package index may sit behind a proxy whose CA is only in it), and
# no EXTERNALLY-MANAGED marker, so `pip install` behaves as in the official image.
#
# Nothing is done when the engine already has the image. The debootstrap result (the slow part,
# about 2 minutes) is cached as a tarball outside the clone, so a later CI run on the same
# machine only imports it.
#
# Environment:
#   BASE_IMAGE_NAME   image name             (default k3s-deploy-base:bookworm)
#   BASE_CACHE_DIR    tarball cache folder   (default ${XDG_CACHE_HOME:-$HOME/.cache}/k3s-deploy-action)
#   DEBIAN_MIRROR     Debian mirror URL      (default: read from this machine's apt sources)
#   REBUILD_BASE=1    ignore the image and the cached tarball
set -euo pipefail

suite=bookworm
packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
image="${BASE_IMAGE_NAME:-k3s-deploy-base:${suite}}"
cache_dir="${BASE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/k3s-deploy-action}"
host_ca=/etc/ssl/certs/ca-certificates.crt

say() { printf 'base-image: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "no docker client: run 'bash .ci/docker-engine.sh' first"
docker info >/dev/null 2>&1 || die "no Docker engine answers: run 'bash .ci/docker-engine.sh' first"

if [ "${REBUILD_BASE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
  say "engine already has $image"
  printf '%s\n' "$image"
  exit 0
fi

# The cache key changes with the suite, the package list and the CA bundle baked in.
key="$(printf '%s\n%s\n' "$suite" "$packages" | cat - "$host_ca" | sha256sum | cut -c1-12)"
tarball="$cache_dir/base-${suite}-${key}.tar.gz"

# First URI of the machine's Debian archive (not the security archive), deb822 or one-line.
find_mirror() {
  local f=/etc/apt/sources.list.d/debian.sources
  if [ -r "$f" ]; then
    awk '
      /^[[:space:]]*$/ { if (uri != "" && types ~ /(^| )deb( |$)/ && uri !~ /security/) { print uri; exit }
                         uri = ""; types = ""; next }
      tolower($1) == "types:" { $1 = ""; types = $0 " " }
      tolower($1) == "uris:"  { uri = $2 }
      END { if (uri != "" && types ~ /(^| )deb( |$)/ && uri !~ /security/) print uri }
    ' "$f" | head -n 1
  fi
  if [ -r /etc/apt/sources.list ]; then
    # deb [options] URI SUITE COMPONENTS...
    sed -n -E 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]].*/\2/p' \
      /etc/apt/sources.list | grep -v security | head -n 1
  fi
}

build_tarball() {
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap missing: run 'bash .ci/docker-engine.sh' first"
  [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
  [ -r "$host_ca" ] || die "no CA bundle at $host_ca"
  local mirror="${DEBIAN_MIRROR:-}"
  [ -n "$mirror" ] || mirror="$(find_mirror | head -n 1)"
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list (set DEBIAN_MIRROR)"

  local work
  work="$(mktemp -d "${TMPDIR:-/var/tmp}/k3s-deploy-base.XXXXXX")"
  # shellcheck disable=SC2064  # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  local root="$work/rootfs"
  say "debootstrap $suite from the machine's mirror (about 2 minutes)"
  if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
      >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2 || true
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
  fi

  install -m 0644 "$host_ca" "$root/etc/ssl/certs/ca-certificates.crt"
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  # Slim it down as the official image does: no downloaded packages, no package lists.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log

  mkdir -p "$cache_dir"
  tar --numeric-owner -C "$root" -c . | gzip -1 >"$tarball.tmp"
  mv "$tarball.tmp" "$tarball"
  rm -rf "$work"
  trap - EXIT
  say "cached $tarball ($(du -m "$tarball" | cut -f1) MB)"
}

if [ "${REBUILD_BASE:-0}" = 1 ] || [ ! -s "$tarball" ]; then
  build_tarball
else
  say "using cached $tarball"
fi

say "importing $image"
gzip -dc "$tarball" | docker import \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["python3"]' \
  -m "local stand-in for the official slim Python image (Debian $suite, Debian's python3)" \
  - "$image" >/dev/null
printf '%s\n' "$image"
