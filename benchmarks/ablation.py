"""Does trace data teach execution? Run both arms of the ablation and compare them with
confidence intervals (docs/benchmarks.md, "Does trace data teach execution?").

    python -m benchmarks.ablation --base runs/ablation            # programs, both arms, compare
    python -m benchmarks.ablation --base runs/ablation --no-run   # evaluate and compare only

1. The same programs (benchmarks/ablation_programs.py, difficulty fixed there) are written into
   each arm's work directory; examples/ablation/{with,without}-traces.yaml read them as a jsonl
   trace source. The arms differ only in mid-training's mix.
2. Both arms run side by side, one core each (``OMP_NUM_THREADS=1``: two torch processes that
   each take both cores run several times slower), or one after the other (``--serial``). Wall
   time, each arm's CPU time (its steps' included) and the machine's load (``/proc/loadavg``,
   sampled) are recorded: this machine is shared.
3. Each arm's final checkpoint (``--stage``, default sft) answers the same questions with the
   same prompts (cwm_jobs.evaluate's): held-out programs (the traces' validation split, one call
   per distinct program, never trained on: checked against the training manifest) and held-out
   CRUXEval problems, directly (the headline) and by reasoning (the trace, then the value;
   reported, not compared: an arm without traces in mid-training meets traces in SFT only).
   Per-problem verdicts go to ``DIR/verdicts.json``, keyed by program hash and call.
4. ``cwm compare`` prints every stage's metrics, Wilson intervals, and the paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import ablation_programs
from cwm_jobs.evaluate import MODES, answer_tasks, check_decontamination, cruxeval_tasks
from cwm_jobs.rewards import check_outputs
from cwm_jobs.tasks import OutputTask, task_from_trace
from cwm_model.checkpoint import load_checkpoint
from cwm_operator.report import write_comparison
from cwm_spec.artifacts import iter_records
from cwm_spec.programs import program_hash

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("with", "without")


def arm_dir(base: Path, arm: str) -> Path:
    return base.parent / f"{base.name}-{arm}"


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while the arms run."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_arms(base: Path, serial: bool) -> dict[str, Any]:
    """``cwm run`` each arm (resumable: a finished step is not rerun); wall times and load."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cwm = str(Path(sys.executable).with_name("cwm"))
    commands = {arm: [cwm, "run", str(ROOT / f"examples/ablation/{arm}-traces.yaml"),
                      "--workdir", str(arm_dir(base, arm)), "--plain"] for arm in ARMS}
    timings: dict[str, Any] = {"mode": "serial" if serial else "side by side, one core each"}
    with LoadSampler() as load:
        started = time.monotonic()
        procs = {}
        for arm in ARMS:
            log = open(arm_dir(base, arm) / "ablation-run.log", "ab")  # closed below
            procs[arm] = (subprocess.Popen(commands[arm], stdout=log, stderr=subprocess.STDOUT,
                                           env=env), log, time.monotonic())
            if serial:
                procs[arm][0].wait()
        for arm, (proc, log, start) in procs.items():
            # wait4: the arm's CPU time, its steps' included (the machine is shared: wall time
            # alone says little about what an arm costs)
            _, status, usage = os.wait4(proc.pid, 0)
            code = proc.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            timings[arm] = {"seconds": round(time.monotonic() - start, 1), "returncode": code,
                            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                            "command": " ".join(commands[arm])}
            if code:
                raise SystemExit(f"{arm} arm failed ({code}): see {arm_dir(base, arm)}/"
                                 "ablation-run.log and `cwm status`")
        timings["wall_seconds"] = round(time.monotonic() - started, 1)
    timings["load_average"] = {"min": min(load.samples), "max": max(load.samples),
                               "mean": round(sum(load.samples) / len(load.samples), 2),
                               "samples": len(load.samples)}
    return timings


def held_out_questions(traces: str, limit: int) -> list[tuple[str, int, OutputTask]]:
    """``(key, statements, task)`` for the first ``limit`` distinct programs of the validation
    split (one call each), key = program hash and call."""
    found: dict[str, tuple[str, int, OutputTask]] = {}
    for record in iter_records(traces, "validation"):
        code, text = record.get("code"), record.get("text")
        task = task_from_trace(text, record.get("frames")) if isinstance(text, str) else None
        if task is None or not isinstance(code, str):
            continue
        digest = program_hash(code)
        statements = code.count("\n") - 2  # def, return
        found.setdefault(digest, (f"{digest}:{task.call}", statements, task))
        if len(found) >= limit:
            break
    return list(found.values())


def verdicts_of(model: Any, tokenizer: Any, tasks: list[OutputTask], mode: str,
                budget: int) -> list[bool]:
    answers = answer_tasks(model, tokenizer, tasks, max_new_tokens=budget, mode=mode)
    return check_outputs([(answer, t.expected) for (answer, _), t in zip(answers, tasks)])


def evaluate_arm(workdir: Path, stage: str, programs: int, cruxeval: int, direct_tokens: int,
                 reasoning_tokens: int, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Every question in each of ``modes`` on ``stage``'s checkpoint; writes ``verdicts.json``."""
    traces = str(workdir / "artifacts/traces/dataset")
    questions = held_out_questions(traces, programs)
    crux = cruxeval_tasks(cruxeval, held_out=800)
    crux_keys = [f"{program_hash(t.source)}:{t.call}" for t in crux]
    # The evaluation's own guard: refuses if a held-out program is in the training manifest.
    check_decontamination({"held-out programs": [k.split(":")[0] for k, _, _ in questions],
                           "cruxeval": [k.split(":")[0] for k in crux_keys]},
                          {"traces": traces})
    torch.manual_seed(0)
    model, tokenizer, _ = load_checkpoint(workdir / f"artifacts/{stage}/checkpoint")
    evaluations: dict[str, dict[str, bool]] = {}
    budgets = {"direct": direct_tokens, "reasoning": reasoning_tokens}
    for mode in modes:
        budget = budgets[mode]
        right = verdicts_of(model, tokenizer, [t for _, _, t in questions], mode, budget)
        evaluations[f"heldout_{mode}"] = {k: v for (k, _, _), v in zip(questions, right)}
        for n in sorted({s for _, s, _ in questions}):
            evaluations[f"heldout_{mode}/{n} statement{'s' if n > 1 else ''}"] = {
                k: v for (k, s, _), v in zip(questions, right) if s == n}
        right = verdicts_of(model, tokenizer, crux, mode, budget)
        evaluations[f"cruxeval_{mode}"] = dict(zip(crux_keys, right))
    data = {"stage": stage, "checkpoint": str(workdir / f"artifacts/{stage}/checkpoint"),
            "budgets": {m: budgets[m] for m in modes},
            "evaluations": evaluations}
    (workdir / "verdicts.json").write_text(json.dumps(data, indent=1))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("runs/ablation"),
                        help="work directories BASE-with and BASE-without")
    parser.add_argument("--count", type=int, default=20000, help="programs generated")
    parser.add_argument("--seed", type=int, default=0, help="the programs' seed")
    parser.add_argument("--no-run", action="store_true", help="evaluate finished runs only")
    parser.add_argument("--serial", action="store_true", help="one arm after the other")
    parser.add_argument("--stage", default="sft", help="the checkpoint evaluated")
    parser.add_argument("--programs", type=int, default=400, help="held-out programs scored")
    parser.add_argument("--cruxeval", type=int, default=200, help="held-out CRUXEval problems")
    parser.add_argument("--direct-tokens", type=int, default=16)
    parser.add_argument("--reasoning-tokens", type=int, default=160)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="output-prediction modes scored here (the stages' own evaluation "
                        "already scores both on the same programs)")
    args = parser.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes {args.modes!r}: expected a comma-separated subset of "
                     f"{','.join(MODES)}")

    base = args.base.resolve()
    report: dict[str, Any] = {"programs": {"count": args.count, "seed": args.seed,
                                           **ablation_programs.SETTINGS}}
    if not args.no_run:
        for arm in ARMS:
            ablation_programs.write(arm_dir(base, arm) / "programs.jsonl", args.seed, args.count)
        report["timings"] = run_arms(base, args.serial)
    for arm in ARMS:
        data = evaluate_arm(arm_dir(base, arm), args.stage, args.programs, args.cruxeval,
                            args.direct_tokens, args.reasoning_tokens, modes)
        report[arm] = {name: f"{sum(v.values())}/{len(v)}"
                       for name, v in data["evaluations"].items()}
    out = write_comparison([arm_dir(base, arm) for arm in ARMS], base.parent /
                           f"{base.name}.md")
    (base.parent / f"{base.name}.json").write_text(json.dumps(report, indent=1))
    print(out.read_text())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
