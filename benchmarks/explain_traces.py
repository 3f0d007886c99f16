"""Explained traces on a pipeline's trace data with a served model: how many explanations are
kept, how many rejected and why (docs/benchmarks.md, "Explained traces").

    python -m benchmarks.explain_traces --checkpoint runs/tiny/artifacts/sft/checkpoint \\
        --out /tmp/explained --max-records 64 --max-tokens 256

1. ``cwm serve CHECKPOINT`` starts on a free port (one torch thread: it answers one request at a
   time anyway).
2. The pipeline (``--pipeline``, default examples/tiny.yaml) gets ``data.traces.explain``
   pointed at it, is validated and planned like ``cwm run`` would; the plan's own traces step
   (its command and ``$CWM_STEP_CONFIG``) runs as a subprocess writing under ``--out``: the same
   programs, the same traces, plus the explanations.
3. The manifest's ``stats.explain`` is printed with the wall time, a few rejected explanations
   (the value stated against the traced one) and the first kept one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from cwm_spec import artifacts
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import parse_pipeline


@contextlib.contextmanager
def served(checkpoint: str, name: str) -> Iterator[str]:
    """``cwm serve`` on a free port; yields its base URL once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cwm_model.cli", "serve", checkpoint,
                             "--port", "0", "--model-name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"cwm serve did not start: {line}{proc.stdout.read()}")
        yield line.split("listening on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def traces_step(pipeline_file: str, out: str, explain: dict) -> tuple[list[str], dict[str, str]]:
    """The plan's traces step for the pipeline with ``explain`` set: its command and env."""
    doc = yaml.safe_load(Path(pipeline_file).read_text())
    doc["spec"].setdefault("data", {}).setdefault("traces", {})["explain"] = explain
    pipeline = parse_pipeline(doc, target="local")
    step = build_plan(pipeline, Target.local(out, pipeline)).step("traces")
    return list(step.command), dict(step.env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--pipeline", default="examples/tiny.yaml")
    parser.add_argument("--out", required=True, help="artifacts folder of this run")
    parser.add_argument("--max-records", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--model-name", default="tiny")
    args = parser.parse_args(argv)
    explain = {"model": args.model_name, "maxRecords": args.max_records,
               "maxTokens": args.max_tokens, "concurrency": 1}
    with served(args.checkpoint, args.model_name) as url:
        command, env = traces_step(args.pipeline, args.out, {"endpoint": url, **explain})
        started = time.monotonic()
        subprocess.run(command, env={**os.environ, **env}, check=True)
        seconds = time.monotonic() - started
    dataset = str(Path(args.out) / "traces" / "dataset")
    stats = artifacts.verify(dataset).stats
    print(json.dumps({"explain": stats["explain"], "train_records": stats["train_records"],
                      "seconds": round(seconds, 1), "load": os.getloadavg()}, indent=1))
    rejected = list(artifacts.iter_records(dataset, "explain_rejected"))
    for record in [r for r in rejected if r["verdict"] != "skipped"][:5]:
        print(f"{record['id']}: {record['verdict']}: stated {record['stated']!r}, traced "
              f"{record['return']!r}: {record['explanation'][-200:]!r}{record['detail'][:200]}")
    for record in list(artifacts.iter_records(dataset, "explained"))[:1]:
        print(f"kept {record['id']}: {record['explanation'][:600]!r}")


if __name__ == "__main__":
    main()
