"""`cwm serve` as the tests start it: a checkpoint behind the OpenAI-compatible HTTP server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serving(checkpoint: Path, model_name: str) -> Iterator[str]:
    """``python -m cwm_model.cli serve CHECKPOINT`` on a free port, one torch thread; yields its
    base URL (``http://HOST:PORT/v1``) once it listens, and stops it afterwards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cwm_model.cli", "serve", str(checkpoint), "--port", "0",
         "--model-name", model_name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, f"server did not start: {line}{proc.stdout.read()}"
        yield line.split("listening on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
