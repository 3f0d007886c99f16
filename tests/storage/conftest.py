"""The real S3 server (SeaweedFS, tests/storage/s3server.py) for the storage tests: one per
session, on loopback (``CWM_S3_BIND`` chooses another address), with a temporary data folder, a
random access key and secret, and one bucket, ``cwm``. Built by `make s3server`; a missing
build fails the tests with that command."""

from __future__ import annotations

import os

import pytest
import s3fs

from tests.storage.s3server import S3Server, S3ServerError


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    try:
        server = S3Server(root, bind=os.environ.get("CWM_S3_BIND", "127.0.0.1")).start()
    except S3ServerError as err:
        pytest.fail(str(err))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process (and the processes it starts) configured as a client of the server, the way
    a pod gets it from spec.storage.secret: the standard AWS variables."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # clients built with other credentials
    yield s3_server.env()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket_fs(s3_server):
    """A client with the right credentials, for the tests' own checks."""
    return s3fs.S3FileSystem(key=s3_server.access_key, secret=s3_server.secret_key,
                             endpoint_url=s3_server.endpoint, skip_instance_cache=True)
