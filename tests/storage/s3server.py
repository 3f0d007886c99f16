"""A real S3 server for the tests: SeaweedFS (`weed mini`: master, volume, filer and its S3
gateway in one process), built from its Go module by tests/storage/build.sh.

The server keeps its data in a temporary folder, listens on free ports of ``bind`` (loopback by
default; ``CWM_S3_BIND`` or ``--bind`` choose another address, e.g. the node-backed test
cluster's bridge address 198.18.0.1, which its pods reach; ``--s3-port`` fixes the S3 port, so
an EndpointSlice can name it), accepts one access key and secret (signature V4,
checked: a wrong secret is refused), and holds one bucket created at start; no bucket is created
on demand, so a missing bucket is an error, as on AWS.

Run by hand::

    python tests/storage/s3server.py --bind 127.0.0.1     # prints the AWS_* environment, Ctrl-C stops
    python tests/storage/s3server.py --bind 198.18.0.1 --s3-port 8333   # for the test cluster's pods
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build.sh"
FIX = "make s3server   (or tests/storage/build.sh)"
# Every listening port, given explicitly (free ones), so tests never collide with a default.
PORTS = {name: f"-{name.split('.')[0]}.port{'.grpc' if name.endswith('.grpc') else ''}"
         for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                      "s3", "s3.grpc", "admin", "admin.grpc")}


class S3ServerError(RuntimeError):
    """The server is not built or did not start; the message says how to fix it."""


def binary() -> Path:
    """The built ``weed`` binary; an error naming the build command when it is missing."""
    path = Path(subprocess.run([str(BUILD), "--print-bin"], check=True, capture_output=True,
                               text=True).stdout.strip())
    if not os.access(path, os.X_OK):
        raise S3ServerError(f"the tests' S3 server is not built ({path} missing): run {FIX}")
    return path


def free_ports(bind: str, count: int, taken: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free TCP ports on ``bind``, none of ``taken`` (also free at port +
    10000, where SeaweedFS puts a gRPC port unless told otherwise)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((bind, 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in ports and port not in taken:
            ports.append(port)
    return ports


class S3Server:
    """One ``weed mini`` process; :meth:`env` is the client environment that reaches it."""

    def __init__(self, root: Path, *, bind: str = "127.0.0.1", bucket: str = "cwm",
                 s3_port: int | None = None):
        self.root, self.bind, self.bucket, self.s3_port = Path(root), bind, bucket, s3_port
        self.access_key = "cwm" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.bind}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS environment of a client of this server (what a Secret would hold)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> S3Server:
        weed = binary()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "cwm-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        fixed = (self.s3_port,) if self.s3_port else ()
        self.ports = dict(zip(PORTS, free_ports(self.bind, len(PORTS), fixed)))
        if self.s3_port:
            self.ports["s3"] = self.s3_port
        argv = [str(weed), "mini", f"-dir={data}", f"-ip={self.bind}", f"-ip.bind={self.bind}",
                f"-s3.config={config}", f"-bucket={self.bucket}", "-s3.autoCreateBucket=false",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-admin.port.legacy=0", "-s3.iam=false",
                f"-s3.localSocket={self.root / 's3.sock'}"]
        argv += [f"{PORTS[name]}={port}" for name, port in self.ports.items()]
        log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root,
                                     start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until an authenticated request sees the bucket (the gateway answers before the
        filer and volume server behind it are ready)."""
        import s3fs  # the client under test; imported here so the CLI needs it only to start

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise S3ServerError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                                       endpoint_url=self.endpoint, skip_instance_cache=True)
                fs.pipe_file(f"{self.bucket}/.ready", b"ok")
                if fs.cat_file(f"{self.bucket}/.ready") == b"ok":
                    fs.rm_file(f"{self.bucket}/.ready")
                    return
            except Exception as err:  # noqa: BLE001 - not ready yet: retry until the deadline
                last = err
            time.sleep(0.5)
        self.stop()
        raise S3ServerError(f"S3 server not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.root / "weed.log", lines)

    def stop(self) -> None:
        stop_group(self.proc)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a server's log ("" if it has none yet)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_group(proc: subprocess.Popen | None) -> None:
    """SIGTERM to a server's process group (it was started in a session of its own), SIGKILL
    after 15 s; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default=os.environ.get("CWM_S3_BIND", "127.0.0.1"))
    parser.add_argument("--bucket", default="cwm")
    parser.add_argument("--s3-port", type=int, help="the S3 port (default: a free one)")
    parser.add_argument("--dir", help="data folder (default: a temporary one, removed at exit)")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cwm-s3-"))
    server = S3Server(root, bind=args.bind, bucket=args.bucket, s3_port=args.s3_port).start()
    serve_until_stopped(server, f"s3://{args.bucket}", None if args.dir else root)
    return 0


def serve_until_stopped(server: Any, bucket: str, scratch: Path | None) -> None:
    """The command-line mode of a test server: print its environment as `export` lines, run
    until SIGINT/SIGTERM, stop it and remove ``scratch`` (its temporary data folder). The two
    signals stay blocked, so a second Ctrl-C while it stops cannot cut the clean-up short."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    for key, value in server.env().items():
        print(f"export {key}='{value}'")
    print(f"# bucket {bucket}; Ctrl-C stops", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
