"""Real servers for the gs:// and az:// storage tests, built by tests/storage/emulators.sh
(`make emulators`): fake-gcs-server (Google Cloud Storage's JSON API, Go) and Azurite's blob
service (Microsoft's Azure Storage emulator, Node.js). Each runs as its own process on a free
loopback port with a temporary data folder and holds one bucket (container), ``cwm``; neither
creates a bucket on demand, so a missing one is an error, as in the clouds.

:meth:`env` is what a client needs, in each backend's standard variables (what
``spec.storage.secret`` would hold): ``STORAGE_EMULATOR_HOST`` for gcsfs and :data:`GCS_CLIENT`
(fake-gcs-server accepts any caller: there are no credentials to get wrong),
``AZURE_STORAGE_CONNECTION_STRING`` for adlfs
(Azurite checks the shared-key signature of every request against the random account key).

Run by hand::

    python -m tests.storage.emulators gcs        # or azurite: prints the environment, Ctrl-C stops
"""

from __future__ import annotations

import abc
import base64
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.storage.s3server import log_tail, serve_until_stopped, stop_group

HERE = Path(__file__).resolve().parent
BUILD = HERE / "emulators.sh"
FIX = "make emulators   (or tests/storage/emulators.sh)"
BUCKET = "cwm"
# A gs:// client of the emulator, in a new process. gcsfs >= 2026 asks Storage Control's gRPC API
# for each bucket's layout, which an emulator does not serve (a 60 s timeout per bucket): its
# plain JSON-API file system is the one to test (read when gcsfs is imported). Anonymous access
# (fsspec's per-protocol default, read when fsspec is imported): else google-auth looks for
# credentials, Compute Engine's metadata server (169.254.169.254, off this machine) among them.
GCS_CLIENT = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS_TOKEN": "anon"}


class EmulatorError(RuntimeError):
    """The server is not built or did not start; the message says how to fix it."""


def entry_point(which: str) -> Path:
    path = Path(subprocess.run([str(BUILD), "--print-bin", which], check=True,
                               capture_output=True, text=True).stdout.strip())
    if not path.exists():
        raise EmulatorError(f"the tests' {which} server is not built ({path} missing): run {FIX}")
    return path


def free_port(bind: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


class Emulator(abc.ABC):
    """One server process; subclasses give its command line, client environment and a readiness
    probe that creates the bucket."""

    name = "emulator"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The server's command line."""

    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """The client environment that points fsspec's backend at this server."""

    def server_env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root)}

    @abc.abstractmethod
    def prepare(self) -> None:
        """Before the first readiness probe: make the bucket (once the server answers)."""

    def start(self, timeout: float = 60.0) -> Emulator:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = open(self.root / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root,
                                     env=self.server_env(), start_new_session=True)
        self._wait(self.prepare, timeout)
        return self

    def _wait(self, probe: Callable[[], Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmulatorError(f"{self.name} exited with {self.proc.returncode}:\n"
                                    f"{self.log_tail()}")
            try:
                probe()
                return
            except Exception as err:  # noqa: BLE001 - not ready yet: retry until the deadline
                last = err
            time.sleep(0.3)
        self.stop()
        raise EmulatorError(f"{self.name} not ready after {timeout:.0f}s ({last}):\n"
                            f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.root / f"{self.name}.log", lines)

    def stop(self) -> None:
        stop_group(self.proc)


class GcsServer(Emulator):
    """fake-gcs-server, plain HTTP, objects on disk; the bucket is a folder of its ``-data``."""

    name = "fake-gcs-server"

    def argv(self) -> list[str]:
        (self.root / "seed" / BUCKET).mkdir(parents=True, exist_ok=True)
        return [str(entry_point("gcs")), "-scheme", "http", "-host", "127.0.0.1",
                "-port", str(self.port), "-backend", "filesystem",
                "-filesystem-root", str(self.root / "objects"), "-data", str(self.root / "seed"),
                "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint,
                "-log-level", "warn"]

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, **GCS_CLIENT}

    def prepare(self) -> None:
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{BUCKET}", timeout=2) as r:
            r.read()


class AzuriteServer(Emulator):
    """Azurite's blob service with one account (random name and key), telemetry off, path-style
    URLs (``http://127.0.0.1:PORT/ACCOUNT/CONTAINER/...``)."""

    name = "azurite"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.account = "cwm" + secrets.token_hex(4)
        self.key = base64.b64encode(secrets.token_bytes(32)).decode()

    def argv(self) -> list[str]:
        node = shutil.which("node")
        if node is None:
            raise EmulatorError(f"node is not on PATH (Azurite runs on Node.js >= 20): run {FIX}")
        return [node, str(entry_point("azurite")), "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port), "--location", str(self.root / "data"),
                "--silent", "--disableTelemetry", "--disableProductStyleUrl",
                "--skipApiVersionCheck"]

    def server_env(self) -> dict[str, str]:
        return {**super().server_env(), "AZURITE_ACCOUNTS": f"{self.account}:{self.key}"}

    def connection_string(self, key: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};"
                f"AccountKey={key or self.key};BlobEndpoint={self.endpoint}/{self.account};")

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def prepare(self) -> None:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string())
        with contextlib.suppress(ResourceExistsError):  # a restarted server keeps its data
            client.create_container(BUCKET)


SERVERS = {"gcs": GcsServer, "azurite": AzuriteServer}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in SERVERS:
        print(f"usage: python -m tests.storage.emulators {{{'|'.join(SERVERS)}}}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix=f"cwm-{args[0]}-"))
    serve_until_stopped(SERVERS[args[0]](root).start(), BUCKET, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
