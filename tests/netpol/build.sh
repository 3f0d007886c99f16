#!/usr/bin/env bash
# Build kube-router from its Go module: its network-policy controller is the agent that enforces
# NetworkPolicy on the test node (the bridge CNI alone enforces nothing).
#
#   tests/netpol/build.sh             build once; exits at once when the stamped build exists
#   tests/netpol/build.sh --print-dir print the folder (built or not) and exit
#
# Its go.mod has no replace directives, so `go install <pkg>@<version>` builds it with the
# module's own go.sum (CGO off: it drives iptables and ipset through their binaries). Only the
# binary is kept, never any of the module's files in this repository. Installs Debian's ipset
# (and iptables) when missing: the agent runs them.
#
# Output: ${CWM_CACHE:-<repo>/.cache}/netpol/kube-router-<v>/{bin/kube-router,STAMP}; GOCACHE and
# GOMODCACHE under the same cache root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=../gobuild.sh
source "$here/../gobuild.sh" "netpol build"
module=github.com/cloudnativelabs/kube-router/v2
dest="$cache/netpol/kube-router-${KUBE_ROUTER_VERSION}"

case "${1:-}" in
  --print-dir) echo "$dest"; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (expected --print-dir)" ;;
esac

# What the agent runs on the node (needs root, like `make node`): Debian's ipset, and iptables.
missing=()
for tool in ipset iptables; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
  log "installing ${missing[*]} (Debian)"
  [[ $(id -u) -eq 0 ]] || die "${missing[*]} missing and not root: apt-get install ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

reuse_if_built "$dest" "$dest/STAMP" "$dest/bin/kube-router"
need_go "Go >= 1.21 builds kube-router"

start=$SECONDS
tmp="$dest.partial"
rm -rf "$tmp"; mkdir -p "$tmp/bin"
log "go install $module/cmd/kube-router@$KUBE_ROUTER_VERSION (GOFLAGS=$GOFLAGS)"
GOBIN="$tmp/bin" go install -trimpath \
  -ldflags "-s -w -X $module/pkg/version.Version=$KUBE_ROUTER_VERSION" \
  "$module/cmd/kube-router@$KUBE_ROUTER_VERSION"
write_stamp "$tmp/STAMP" "KUBE_ROUTER_VERSION=$KUBE_ROUTER_VERSION"
rm -rf "$dest"; mv "$tmp" "$dest"
log "done in $((SECONDS - start)) s: $dest"
echo "$dest"
