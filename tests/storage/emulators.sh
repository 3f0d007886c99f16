#!/usr/bin/env bash
# Build the tests' gs:// and az:// servers (`make emulators`), both real servers speaking each
# store's own HTTP API, run by tests/storage/emulators.py:
#   fake-gcs-server  Google Cloud Storage's JSON API, built from its Go module (the proxy serves
#                    tagged releases: `go install module@version`, CGO off)
#   Azurite          Azure Storage's emulator (Microsoft's, Node.js), its blob service, installed
#                    with `npm ci` from azurite/package{,-lock}.json (3.35.0: the newest release
#                    whose engines accept the Node 20 here; 3.36 wants Node >= 21)
#
#   tests/storage/emulators.sh                 build both; each exits at once when stamped
#   tests/storage/emulators.sh --print-bin gcs|azurite   print the entry point (built or not)
#
# Both land under ${CWM_CACHE:-<repo>/.cache}: fake-gcs-server/<version>/fake-gcs-server and
# azurite/<version>/node_modules/azurite, with the Go caches shared with the other Go builds
# (tests/gobuild.sh). Cold: ~5 min each on 2 idle cores (12 and 5 min measured under heavy
# load); warm: < 0.1 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../gobuild.sh
source "$here/../gobuild.sh" "storage emulators"

gcs_module=github.com/fsouza/fake-gcs-server
gcs_version=v1.56.1
azurite_version="$(sed -En 's/^ *"azurite": "([0-9.]+)".*/\1/p' "$here/azurite/package.json")"
[[ -n "$azurite_version" ]] || die "azurite/package.json pins no azurite version"
gcs_dest="$cache/fake-gcs-server/$gcs_version"
gcs_bin="$gcs_dest/fake-gcs-server"
az_dest="$cache/azurite/$azurite_version"
az_main="$az_dest/node_modules/azurite/dist/src/blob/main.js"

case "${1:-}" in
  --print-bin)
    case "${2:-}" in
      gcs) echo "$gcs_bin" ;;
      azurite) echo "$az_main" ;;
      *) die "--print-bin takes gcs or azurite" ;;
    esac
    exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (expected --print-bin gcs|azurite)" ;;
esac

build_gcs() {
  if [[ -x "$gcs_bin" && -f "$gcs_dest/STAMP" ]]; then
    log "up to date: $gcs_bin"
    return
  fi
  need_go "Go >= 1.26 builds fake-gcs-server"
  local start=$SECONDS
  mkdir -p "$gcs_dest/bin.partial"
  log "building $gcs_module@$gcs_version (GOFLAGS=$GOFLAGS)"
  GOBIN="$gcs_dest/bin.partial" go install -trimpath -ldflags "-s -w" "$gcs_module@$gcs_version"
  mv "$gcs_dest/bin.partial/fake-gcs-server" "$gcs_bin"
  rmdir "$gcs_dest/bin.partial"
  write_stamp "$gcs_dest/STAMP" "VERSION=$gcs_version"
  log "fake-gcs-server done in $((SECONDS - start)) s: $gcs_bin"
}

build_azurite() {
  if [[ -f "$az_main" && -f "$az_dest/STAMP" ]] \
      && cmp -s "$here/azurite/package-lock.json" "$az_dest/package-lock.json"; then
    log "up to date: $az_main"
    return
  fi
  command -v npm >/dev/null || die "npm is not on PATH (Node.js >= 20 runs Azurite: apt-get install nodejs npm)"
  local start=$SECONDS
  rm -rf "$az_dest"
  mkdir -p "$az_dest"
  cp "$here/azurite/package.json" "$here/azurite/package-lock.json" "$az_dest/"
  log "installing azurite $azurite_version with npm ci"
  (cd "$az_dest" && npm ci --omit=dev --no-audit --no-fund --loglevel=error)
  [[ -f "$az_main" ]] || die "npm ci finished but $az_main is missing"
  printf 'VERSION=%s\nNODE_VERSION=%s\nBUILT=%s\n' "$azurite_version" "$(node --version)" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$az_dest/STAMP"
  log "azurite done in $((SECONDS - start)) s: $az_main"
}

build_gcs
build_azurite
