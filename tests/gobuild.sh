# Sourced by the Go build scripts under tests/ (control plane and node, Kubeflow's training
# operator, the NetworkPolicy agent, the S3 server): one cache layout and one Go environment.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/../gobuild.sh" "kubeflow build"   # the log prefix
#
# Sets repo (the checkout), cache (${CWM_CACHE:-<repo>/.cache}, absolute, created), log and die;
# exports GOMODCACHE and GOCACHE under the cache (shared by every build, so modules common to
# them are downloaded and compiled once), GOTOOLCHAIN=local (never download a toolchain),
# CGO_ENABLED=0 (static binaries) and GOFLAGS (CWM_BUILD_JOBS parallel packages, default 2;
# -modcacherw so the module cache can be deleted).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CWM_CACHE:-$repo/.cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
_gobuild_name="$1"

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$_gobuild_name" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-p=${CWM_BUILD_JOBS:-2} -buildvcs=false -modcacherw"

# Exit 0 with $1 (the build's path) on stdout when every other argument exists: the build is
# cached. Returns (and the build goes on) otherwise.
reuse_if_built() {
  local out="$1" f
  shift
  for f in "$@"; do [[ -e $f ]] || return 0; done
  log "up to date: $out"
  echo "$out"
  exit 0
}

need_go() { command -v go >/dev/null || die "go is not on PATH ($*)"; }

# Write a build's STAMP file ($1): the given KEY=VALUE lines, the Go version, when it was built and
# how long it took (seconds since $start).
write_stamp() {
  local file="$1"
  shift
  {
    printf '%s\n' "$@"
    echo "GO_VERSION=$(go env GOVERSION)"
    echo "BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "SECONDS=$((SECONDS - ${start:-0}))"
  } >"$file"
}
