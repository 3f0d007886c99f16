#!/usr/bin/env bash
# Build sigs.k8s.io/kube-network-policies from its Go module: the agent that enforces
# NetworkPolicy on the test node (the bridge CNI alone enforces nothing).
#
#   tests/netpol/build.sh             build once; exits at once when the stamped build exists
#   tests/netpol/build.sh --print-dir print the folder (built or not) and exit
#
# Its go.mod has no replace directives, so `go install <pkg>@<version>` builds it with the
# module's own go.sum (pure Go: nftables and NFQUEUE over netlink, CGO off). The module's
# install.yaml (RBAC of the agent) is copied next to the binary, never into this repository.
#
# Output: ${CWM_CACHE:-<repo>/.cache}/netpol/kube-network-policies-<v>/{bin/kube-network-policies,
# install.yaml,STAMP}; GOCACHE and GOMODCACHE under the same cache root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=../gobuild.sh
source "$here/../gobuild.sh" "netpol build"
module=sigs.k8s.io/kube-network-policies
dest="$cache/netpol/kube-network-policies-${KUBE_NETWORK_POLICIES_VERSION}"

case "${1:-}" in
  --print-dir) echo "$dest"; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (expected --print-dir)" ;;
esac

if [[ -f "$dest/STAMP" && -x "$dest/bin/kube-network-policies" ]]; then
  log "up to date: $dest"
  echo "$dest"
  exit 0
fi

command -v go >/dev/null || die "go is not on PATH (Go >= 1.23 builds kube-network-policies)"

start=$SECONDS
tmp="$dest.partial"
rm -rf "$tmp"; mkdir -p "$tmp/bin"
log "go install $module/cmd@$KUBE_NETWORK_POLICIES_VERSION (GOFLAGS=$GOFLAGS)"
GOBIN="$tmp/bin" go install -trimpath -ldflags "-s -w" "$module/cmd@$KUBE_NETWORK_POLICIES_VERSION"
mv "$tmp/bin/cmd" "$tmp/bin/kube-network-policies"
src="$(go mod download -json "$module@$KUBE_NETWORK_POLICIES_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -f "$src/install.yaml" ]] || die "$module@$KUBE_NETWORK_POLICIES_VERSION has no install.yaml (layout changed?)"
cp "$src/install.yaml" "$tmp/install.yaml"
chmod -R u+w "$tmp"
{
  echo "KUBE_NETWORK_POLICIES_VERSION=$KUBE_NETWORK_POLICIES_VERSION"
  echo "GO_VERSION=$(go env GOVERSION)"
  echo "BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "SECONDS=$((SECONDS - start))"
} >"$tmp/STAMP"
rm -rf "$dest"; mv "$tmp" "$dest"
log "done in $((SECONDS - start)) s: $dest"
echo "$dest"
