"""Fixtures of the end-to-end runs on the node-backed test cluster.

``node_s3``: the tests' real S3 server (SeaweedFS, tests/storage/s3server.py) listening on the
node's bridge address (198.18.0.1), where the cluster's pods reach it, as they would reach an
object store outside the cluster. It starts after the node (the bridge exists only while the
node runs) and holds the bucket ``cwm``. A missing build FAILS with `make s3server`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.controlplane.node import NODE_IP
from tests.storage.s3server import S3Server, S3ServerError


@pytest.fixture(scope="module")
def node_s3(kube_node: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if kube_node.local is None:
        pytest.skip("needs the local node: the S3 server listens on its bridge address")
    try:
        server = S3Server(tmp_path_factory.mktemp("node-s3"), bind=NODE_IP).start()
    except S3ServerError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
