#!/usr/bin/env bash
# Build Kubeflow's training operator from its Go module and keep the manifests it ships with.
#
#   tests/kubeflow/build.sh             build once; exits at once when the stamped build exists
#   tests/kubeflow/build.sh --print-dir print the folder (built or not) and exit
#
# No release image can be pulled here, so the operator runs as a process (see README.md). Its
# go.mod has no replace directives, so `go install <pkg>@<version>` builds it with the module's
# own go.sum (no wrapper module). CRDs, webhook and RBAC manifests are copied from the same module
# version (manifests/base/) into the cache folder: they are never copied into this repository.
#
# Output: ${CWM_CACHE:-<repo>/.cache}/kubeflow/training-operator-<v>/{bin/training-operator,
# manifests/{crds,webhook,rbac}/*.yaml,STAMP}; GOCACHE and GOMODCACHE under the same cache root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=../gobuild.sh
source "$here/../gobuild.sh" "kubeflow build"
module=github.com/kubeflow/training-operator
dest="$cache/kubeflow/training-operator-${TRAINING_OPERATOR_VERSION}"
stamp="$dest/STAMP"

case "${1:-}" in
  --print-dir) echo "$dest"; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (expected --print-dir)" ;;
esac

reuse_if_built "$dest" "$stamp" "$dest/bin/training-operator" \
  "$dest/manifests/crds/kubeflow.org_pytorchjobs.yaml"
need_go "Go >= 1.22 builds the training operator"

start=$SECONDS
tmp="$dest.partial"
rm -rf "$tmp"; mkdir -p "$tmp/bin" "$tmp/manifests"
log "go install $module/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION (GOFLAGS=$GOFLAGS)"
GOBIN="$tmp/bin" go install -trimpath -ldflags "-s -w" "$module/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
mv "$tmp/bin/training-operator.v1" "$tmp/bin/training-operator"

src="$(go mod download -json "$module@$TRAINING_OPERATOR_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$src/manifests/base/crds" ]] || die "$module@$TRAINING_OPERATOR_VERSION has no manifests/base/crds (layout changed?)"
for part in crds webhook rbac; do
  mkdir -p "$tmp/manifests/$part"
  cp "$src/manifests/base/$part/"*.yaml "$tmp/manifests/$part/"
done
chmod -R u+w "$tmp"

write_stamp "$tmp/STAMP" "TRAINING_OPERATOR_VERSION=$TRAINING_OPERATOR_VERSION"
rm -rf "$dest"; mv "$tmp" "$dest"
log "done in $((SECONDS - start)) s: $dest"
echo "$dest"
