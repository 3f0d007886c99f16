"""A stand-in for a real step, used only by the runner tests.

It reads its configuration exactly as a real entry point does ($CWM_STEP_CONFIG), appends its
name to $STANDIN_CALLS (so tests see the order), writes each output, and can be told to sleep
or fail through $STANDIN_SLEEP_<STEP> / $STANDIN_FAIL_<STEP> (every attempt) /
$STANDIN_FAIL_ONCE_<STEP> (the first attempt: the variable names a marker file).
"""

import json
import os
import sys
import time
from pathlib import Path

from cwm_spec.stepconfig import load_step_config


def main() -> int:
    config, _ = load_step_config()
    step = config["step"]
    if os.environ.get("STANDIN_DUMP_ENV"):  # the environment the runner gave this step
        Path(os.environ["STANDIN_DUMP_ENV"]).write_text(json.dumps(dict(os.environ)))
    with open(os.environ["STANDIN_CALLS"], "a") as f:
        f.write(f"{step} {os.getpid()}\n")
    print(f"{step}: reading {sorted(config['inputs'])}", flush=True)
    for name, uri in config["inputs"].items():
        if not Path(uri).exists():
            print(f"{step}: input {name} missing at {uri}", file=sys.stderr)
            return 3
    delay = float(os.environ.get(f"STANDIN_SLEEP_{step.upper()}", "0"))
    time.sleep(delay)
    if os.environ.get(f"STANDIN_FAIL_{step.upper()}"):
        print(f"{step}: deliberate failure for the test", file=sys.stderr)
        return 7
    once = os.environ.get(f"STANDIN_FAIL_ONCE_{step.upper()}")  # a marker file's path
    if once and not Path(once).exists():
        Path(once).touch()
        print(f"{step}: deliberate failure, this attempt only", file=sys.stderr)
        return 7
    for name, uri in config["outputs"].items():
        out = Path(uri)
        out.mkdir(parents=True, exist_ok=True)
        (out / "payload.json").write_text(json.dumps({"step": step, "output": name,
                                                      "spec": config["spec"]}, sort_keys=True))
    if "metrics" in config["outputs"]:
        metrics = Path(config["outputs"]["metrics"])
        (metrics / "eval.json").write_text(json.dumps({"validation_loss": 1.5, "cruxeval_o": 0.25}))
        (metrics / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 4)))
    print(f"{step}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
