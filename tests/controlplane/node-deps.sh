#!/usr/bin/env bash
# Install what the test node needs beyond the Go-built programs (build.sh): Debian's containerd and
# runc (the container runtime), containernetworking-plugins (bridge, host-local, portmap,
# firewall), iptables and conntrack (kube-proxy), busybox-static (the test image's only binary),
# gcc (the pause binary). Then build the static pause binary into <cache>/node/pause/pause.
# Idempotent: apt-get runs only when something is missing; the pause binary is rebuilt only when
# node/pause.c changes. Needs root (the node itself needs root: cgroups, mounts, iptables).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CWM_CACHE:-$repo/.cache}"
log() { printf '[node deps %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the test node needs root (cgroups, mounts, iptables); run as root"

# Debian package -> a command (found on PATH) or a file (an absolute path) it installs.
declare -A wanted=(
  [containerd]=containerd
  [runc]=runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iptables]=iptables
  [conntrack]=conntrack
  [busybox-static]=/bin/busybox
  [gcc]=gcc
  [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
  [iproute2]=ip
)
present() { if [[ $1 == /* ]]; then [[ -e $1 ]]; else command -v "$1" >/dev/null; fi; }
missing=()
for pkg in "${!wanted[@]}"; do present "${wanted[$pkg]}" || missing+=("$pkg"); done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for pkg in "${!wanted[@]}"; do present "${wanted[$pkg]}" || die "$pkg installed but ${wanted[$pkg]} is absent"; done

out="$cache/node/pause"
sum="$(sha256sum "$here/node/pause.c" | cut -c1-16)"
if [[ ! -x "$out/pause" || "$(cat "$out/pause.src" 2>/dev/null)" != "$sum" ]]; then
  mkdir -p "$out"
  gcc -static -Os -Wall -Werror -o "$out/pause.partial" "$here/node/pause.c"
  strip "$out/pause.partial"
  mv "$out/pause.partial" "$out/pause"
  echo "$sum" >"$out/pause.src"
  log "built $out/pause"
fi
log "node dependencies present: containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}')"
