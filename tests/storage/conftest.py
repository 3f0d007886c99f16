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


# ------------------------------------------------------------------ gs:// and az:// (emulators.py)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    import fsspec
    from gcsfs.core import GCSFileSystem

    from tests.storage.emulators import EmulatorError, GcsServer

    # In this process, what emulators.GCS_CLIENT sets up in new ones: the JSON-API file system
    # (whatever gcsfs imported as its default), anonymous (see the store fixture).
    fsspec.register_implementation("gs", GCSFileSystem, clobber=True)
    try:
        server = GcsServer(tmp_path_factory.mktemp("gcs")).start()
    except EmulatorError as err:
        pytest.fail(str(err))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory):
    from tests.storage.emulators import AzuriteServer, EmulatorError

    try:
        server = AzuriteServer(tmp_path_factory.mktemp("azurite")).start()
    except EmulatorError as err:
        pytest.fail(str(err))
    yield server
    server.stop()


def clear_clients() -> None:
    """fsspec caches a file system per scheme and options: forget those built for another
    environment (endpoint, credentials)."""
    import fsspec

    for scheme in ("gs", "az"):
        fsspec.get_filesystem_class(scheme).clear_instance_cache()


@pytest.fixture(params=[pytest.param("gs", marks=pytest.mark.gcs),
                        pytest.param("az", marks=pytest.mark.azure)])
def store(request, monkeypatch):
    """The URI of the bucket ``cwm`` on one of the two emulators, this process configured as its
    client through the backend's standard environment (as a pod is by spec.storage.secret)."""
    server = request.getfixturevalue("gcs_server" if request.param == "gs" else "azurite_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    if request.param == "gs":  # fsspec read FSSPEC_GS_TOKEN when imported: set it here too
        import fsspec

        monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    clear_clients()
    yield f"{request.param}://cwm"
    clear_clients()
