"""Checkpoint upload and download through cwm_spec.storage against plain fsspec put/get of the
same bytes, same run, same real S3 server (SeaweedFS, tests/storage/s3server.py; build it with
`make s3server`).

The storage layer does more than fsspec's put: it deletes the old commit marker first and writes
the marker (each file's size) last; on download it reads the marker, checks sizes and renames the
folder into place. The ratio says what that costs. Each round runs both in alternating order,
so neither always meets the server fresher.

    .venv/bin/python benchmarks/storage_throughput.py --size-mb 256 --files 4 --repeats 3

Prints MB/s of both, per direction, as medians over interleaved rounds, and the ratios
(storage / fsspec; >= 0.9 is the target).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cwm_spec import storage  # noqa: E402
from tests.storage.s3server import S3Server  # noqa: E402


def make_checkpoint(folder: Path, size_mb: int, files: int) -> int:
    """A checkpoint-like folder: ``files`` weight shards of random bytes and a small config."""
    folder.mkdir(parents=True)
    per_file = (size_mb << 20) // files
    for i in range(files):
        (folder / f"model-{i:05d}.safetensors").write_bytes(os.urandom(per_file))
    (folder / "config.json").write_text('{"format": "bench"}')
    return sum(p.stat().st_size for p in folder.iterdir())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(folder: Path, work: Path, index: int) -> dict[str, float]:
    fs = fsspec.filesystem("s3")
    plain, layer = f"cwm/bench/plain-{index}", f"s3://cwm/bench/layer-{index}"
    out_plain, out_layer = work / f"get-plain-{index}", work / f"get-layer-{index}"
    runs = {
        "fsspec put": lambda: fs.put(str(folder) + "/", plain, recursive=True),
        "storage upload": lambda: storage.upload_tree(folder, layer),
        "fsspec get": lambda: fs.get(plain + "/", str(out_plain) + "/", recursive=True),
        "storage download": lambda: storage.download_tree(layer, out_layer),
    }
    order = list(runs) if index % 2 == 0 else ["storage upload", "fsspec put",
                                                "storage download", "fsspec get"]
    seconds = {name: timed(runs[name]) for name in order}
    fs.rm(plain, recursive=True)
    fs.rm(layer.removeprefix("s3://"), recursive=True)
    shutil.rmtree(out_plain, ignore_errors=True)
    shutil.rmtree(out_layer, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwm-bench-s3-") as tmp:
        root = Path(tmp)
        server = S3Server(root / "server").start()
        os.environ.update(server.env())
        try:
            folder = root / "checkpoint"
            total = make_checkpoint(folder, args.size_mb, args.files)
            rounds = [one_round(folder, root, i) for i in range(args.repeats)]
        finally:
            server.stop()
    mb = total / 1e6
    rate = {k: mb / statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"checkpoint: {args.files} files, {mb:.0f} MB; {args.repeats} rounds, medians")
    for key, value in rate.items():
        print(f"  {key:17s} {value:8.1f} MB/s")
    print(f"  upload ratio   (storage / fsspec): {rate['storage upload'] / rate['fsspec put']:.2f}x")
    print(f"  download ratio (storage / fsspec): "
          f"{rate['storage download'] / rate['fsspec get']:.2f}x")


if __name__ == "__main__":
    main()
