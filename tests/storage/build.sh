#!/usr/bin/env bash
# Build the tests' S3 server: SeaweedFS's `weed` (its S3 gateway, `weed mini`/`weed server -s3`)
# from its Go module, because no release binary can be downloaded here. SeaweedFS is served by the
# Go module proxy only as a pseudo-version (no tagged module releases), pinned in gomod/go.mod.
#
#   tests/storage/build.sh              build once; exits at once when the stamped binary exists
#   tests/storage/build.sh --regen      re-resolve gomod/go.{mod,sum} to the proxy's latest
#   tests/storage/build.sh --print-bin  print the binary's path (built or not) and exit
#
# The binary lands in ${CWM_CACHE:-<repo>/.cache}/seaweedfs/<version>/weed, with GOCACHE and
# GOMODCACHE under the same cache root as the control plane's (tests/controlplane/build.sh).
# SeaweedFS's own go.mod has a replace directive, so `go install module@version` refuses it; the
# wrapper module gomod/ requires it and repeats that replace. CGO is off: a static binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/seaweedfs/seaweedfs
# shellcheck source=../gobuild.sh
source "$here/../gobuild.sh" "seaweedfs build"

version="$(sed -En "s#^(require |\t)$module (v[^ ]+)( // indirect)?\$#\2#p" "$here/gomod/go.mod")"
[[ -n "$version" ]] || die "gomod/go.mod does not pin $module (run $0 --regen)"
dest="$cache/seaweedfs/$version"
bin="$dest/weed"

regen() {
  log "pinning $module@latest"
  (cd "$here/gomod" && go get "$module@latest" && go mod tidy)
}

case "${1:-}" in
  --regen) regen; log "regenerated gomod/go.{mod,sum}: commit them"; exit 0 ;;
  --print-bin) echo "$bin"; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (expected --regen or --print-bin)" ;;
esac

reuse_if_built "$bin" "$bin" "$dest/STAMP"
need_go "Go >= 1.26 builds the tests' S3 server"
start=$SECONDS
mkdir -p "$dest"
log "building $module/weed $version (GOFLAGS=$GOFLAGS)"
(cd "$here/gomod" && go build -mod=readonly -trimpath -ldflags "-s -w" -o "$bin.partial" "$module/weed")
"$bin.partial" version >&2
mv "$bin.partial" "$bin"
write_stamp "$dest/STAMP" "VERSION=$version"
log "done in $((SECONDS - start)) s: $bin"
echo "$bin"
