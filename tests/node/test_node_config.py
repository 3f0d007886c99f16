"""The node's configuration and locally packed images, checked without starting anything."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path

from tests.controlplane import node, nodeimages

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")


def test_every_cluster_address_stays_in_the_benchmarking_range() -> None:
    bridge = node.cni_conflist()["plugins"][0]
    ranges = bridge["ipam"]["ranges"][0][0]
    for net in (node.POD_SUBNET, node.SERVICE_RANGE, ranges["subnet"]):
        assert ipaddress.ip_network(net).subnet_of(BENCHMARK_RANGE), net
    for ip in (node.NODE_IP, node.KUBERNETES_SERVICE_IP, node.DNS_SERVICE_IP, ranges["gateway"]):
        assert ipaddress.ip_address(ip) in BENCHMARK_RANGE, ip
    assert ipaddress.ip_address(node.DNS_SERVICE_IP) in ipaddress.ip_network(node.SERVICE_RANGE)
    assert bridge["ipMasq"] is False  # pod traffic is never rewritten to leave through the host
    assert "forward" not in node.COREFILE  # CoreDNS answers cluster names only, asks nobody else


def test_kubelet_runs_on_cgroup_v1_with_our_containerd(tmp_path: Path) -> None:
    config = node.kubelet_config(tmp_path, 10250, 10248)
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"
    assert config["containerRuntimeEndpoint"] == f"unix://{node.RUN_DIR}/containerd.sock"
    assert config["address"] == node.NODE_IP and config["authentication"]["anonymous"]["enabled"] is False
    containerd = node.containerd_config("/usr/sbin/runc")
    assert f'address = "{node.RUN_DIR}/containerd.sock"' in containerd  # not Docker's socket
    assert "restrict_oom_score_adj = true" in containerd
    assert f'sandbox_image = "{node.PAUSE_IMAGE}"' in containerd


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_image_archive_is_a_deterministic_docker_archive(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF not really")
    spec = nodeimages.ImageSpec("cwm.local/x:1", (nodeimages.Entry("bin", mode=0o755),
                                                  nodeimages.Entry("bin/tool", binary),
                                                  nodeimages.Entry("bin/sh", symlink="tool")),
                                entrypoint=("/bin/tool",), user="65532")
    first, image_id = nodeimages.image_archive(spec)
    assert nodeimages.image_archive(spec) == (first, image_id)
    files = _members(first)
    manifest = json.loads(files["manifest.json"])
    assert manifest[0]["RepoTags"] == ["cwm.local/x:1"]
    config = json.loads(files[manifest[0]["Config"]])
    layer = files[manifest[0]["Layers"][0]]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert image_id == "sha256:" + hashlib.sha256(files[manifest[0]["Config"]]).hexdigest()
    assert config["config"]["User"] == "65532" and config["config"]["Entrypoint"] == ["/bin/tool"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "tool"
    assert members["bin/tool"].mtime == 0 and members["bin/tool"].uid == 0
    binary.write_bytes(b"changed")
    assert nodeimages.image_archive(spec)[1] != image_id  # content decides the id


def test_only_the_layers_containerd_lacks_count_against_the_disk() -> None:
    """A rebuilt image shares most layers with the version already imported: the disk check
    counts the new ones (the trainer's 8 GB of torch are not needed twice)."""
    layers = [("sha256:base", 8 << 30), ("sha256:deps", 1 << 30), ("sha256:project", 3 << 20)]
    assert node.new_layer_bytes(layers, 9 << 30, {"sha256:base", "sha256:deps"}) == 3 << 20
    assert node.new_layer_bytes(layers, 9 << 30, set()) == (9 << 30) + (3 << 20)
    assert node.new_layer_bytes(None, 9 << 30, {"sha256:base"}) == 9 << 30  # unknown: all of it
