"""The evaluation report of a local run: ``DIR/report/report.md`` with PNG plots.

It reads only what the steps left in the work directory — step records (state, time, cached,
evaluation metrics), each stage's ``metrics/metrics.jsonl`` and the data sets' manifests — so it
can be regenerated at any time (``cwm report DIR``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cwm_operator.runner import StepRecord, read_json
from cwm_operator.stats import pair_by_key, paired, wilson
from cwm_spec import storage
from cwm_spec.api import STAGE_ORDER

# Evaluation metrics shown first, in this order, when present (others follow alphabetically).
HEADLINE = (
    "validation_loss",
    "validation_loss/rehearsal",
    "trace_step_exact_match",
    "trace_state_exact_match",
    "trace_action_exact_match",
    "cruxeval_o_direct",
    "cruxeval_o_reasoning",
    "heldout_output_direct",
    "heldout_output_reasoning",
    "trace_output_accuracy",
    "mutate_fix_solve_rate",
    "mean_reward",
)
# Output prediction in the two modes SFT teaches (cwm_jobs.evaluate): (label, metric prefix).
OUTPUT_PREDICTION = (("CRUXEval (held out)", "cruxeval_o"),
                     ("held-out programs", "heldout_output"))
# Each data set: (row, step, output). The rehearsal text is the corpus step's second output, or
# its own step's when the corpus is given.
DATA_SETS = (("traces", "traces", "dataset"), ("trajectories", "trajectories", "dataset"),
             ("corpus", "corpus", "dataset"), ("rehearsal", "corpus", "rehearsal"),
             ("rehearsal", "rehearsal", "dataset"))


def _series(uri: str, key: str = "loss") -> list[tuple[int, float]]:
    points: list[tuple[int, float]] = []
    try:
        lines = storage.read_bytes(uri).decode(errors="replace").splitlines()
    except (OSError, storage.StorageError):
        return points
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
            points.append((int(row["step"]), float(value)))
    return sorted(dict(points).items())  # a resumed run rewrites steps: keep the last value


def _metric_names(records: list[StepRecord]) -> list[str]:
    names = {k for r in records for k, v in r.metrics.items() if isinstance(v, (int, float))}
    head = [m for m in HEADLINE if m in names]
    return head + sorted(names - set(head))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend. Imported here, not at the top: it is
    heavy (~0.5 s) and only a report with something to plot needs it."""
    import matplotlib  # noqa: PLC0415 (heavy; see above)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend is chosen)

    return plt


def _plot_losses(stages: list[tuple[str, list[tuple[int, float]]]], out: Path) -> bool:
    if not any(points for _, points in stages):
        return False
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    offset = 0
    for name, points in stages:
        if not points:
            continue
        xs = [offset + s for s, _ in points]
        ax.plot(xs, [v for _, v in points], label=name, linewidth=1.2)
        ax.axvline(offset, color="grey", linewidth=0.5, linestyle=":")
        offset = xs[-1]
    ax.set_xlabel("optimizer step (stages back to back)")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss by stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _plot_metrics(records: list[StepRecord], names: list[str], out: Path) -> bool:
    names = [n for n in names if not n.endswith(("frames", "count", "tasks", "tokens", "samples",
                                                 "problems", "programs", "unchecked"))]
    shown = [n for n in names if any(isinstance(r.metrics.get(n), (int, float)) for r in records)]
    if not shown:
        return False
    plt = _pyplot()

    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, shown):
        xs = [r.name for r in records if isinstance(r.metrics.get(name), (int, float))]
        ys = [r.metrics[name] for r in records if isinstance(r.metrics.get(name), (int, float))]
        ax.plot(xs, ys, marker="o")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Evaluation after each stage")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _data_rows(root: str) -> list[str]:
    """One row per data set: records per split, and the programs its step left out of training
    because the evaluation holds them out (``stats.excluded_for_evaluation``)."""
    rows = []
    for row, step, output in DATA_SETS:
        manifest = read_json(storage.join(root, step, output, "manifest.json"))
        if not manifest:
            continue
        splits = manifest.get("splits", {})
        counts = {name: sum(s.get("records", 0) for s in shards) for name, shards in splits.items()}
        size = sum(s.get("bytes", 0) for shards in splits.values() for s in shards)
        excluded = manifest.get("stats", {}).get("excluded_for_evaluation")
        left_out = "" if excluded is None else str(sum(excluded.values()))
        held = counts.get("validation", counts.get("eval_tasks", 0))
        rows.append(f"| {row} | {manifest.get('kind', '')} | {counts.get('train', 0)} | {held} | "
                    f"{counts.get('deadletter', 0)} | {left_out} | {size / 1e6:.1f} MB |")
    return rows


def _output_prediction_rows(stages: list[StepRecord]) -> list[str]:
    """Per stage and evaluation set: direct and by-reasoning accuracy, and the share of
    reasoning that never closed within its budget."""
    rows = []
    for record in stages:
        m = record.metrics
        for label, prefix in OUTPUT_PREDICTION:
            if f"{prefix}_direct" not in m:
                continue
            rows.append(f"| {record.name} | {label} | {_fmt(m.get(f'{prefix}_problems'))} | "
                        f"{_fmt(m.get(f'{prefix}_direct'))} | "
                        f"{_fmt(m.get(f'{prefix}_reasoning'))} | "
                        f"{_fmt(m.get(f'{prefix}_reasoning_unfinished'))} |")
    return rows


def _decontamination_line(stages: list[StepRecord]) -> list[str]:
    values = [r.metrics.get("decontamination_programs") for r in stages]
    checked = [float(c) for c in values if isinstance(c, (int, float))]
    if not checked:
        return []
    unchecked = max(float(r.metrics.get("decontamination_unchecked") or 0) for r in stages)
    line = (f"Decontamination: up to {max(checked):.0f} evaluation programs per stage checked "
            "against the training data sets' program lists: none in training (the evaluation "
            "refuses to score otherwise).")
    if unchecked:
        line += f" {unchecked:.0f} training data set(s) listed no programs and were not checked."
    return [line, ""]


def write_report(workdir: Path) -> Path:
    """Write ``DIR/report/report.md`` (and its PNGs); return its path."""
    workdir = Path(workdir)
    run = read_json(workdir / "run.json") or {"pipeline": "?", "steps": [], "state": "?"}
    records = [StepRecord.load(workdir / "steps" / n / "state.json", n) for n in run["steps"]]
    stages = [r for r in records if r.name in STAGE_ORDER]
    out_dir = workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {run['pipeline']}: evaluation report", "",
             f"Run state: **{run['state']}** (started {run.get('started')}, finished "
             f"{run.get('finished')}).", "", "## Steps", "",
             "| step | state | seconds | from cache |", "| --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r.name} | {r.state} | {_fmt(r.seconds)} | "
                     f"{'yes' if r.cached else ''} |")
    total = sum(r.seconds or 0 for r in records if not r.cached)
    lines += ["", f"Compute time of the steps run this time: {total:.0f} s.", ""]

    root = run.get("storage") or str(workdir / "artifacts")  # the plan's storage root
    data = _data_rows(root)
    if data:
        lines += ["## Data", "", "| data set | kind | train | held out | dead letters | "
                  "left out for evaluation | size |", "| --- | --- | --- | --- | --- | --- | --- |",
                  *data, "", *_decontamination_line(stages)]

    losses = [(r.name, _series(storage.join(root, r.name, "metrics", "metrics.jsonl")))
              for r in stages]
    if _plot_losses(losses, out_dir / "loss.png"):
        lines += ["## Training loss", "", "![training loss](loss.png)", ""]
        lines += ["| stage | first loss | last loss | steps |", "| --- | --- | --- | --- |"]
        for name, points in losses:
            if points:
                lines.append(f"| {name} | {points[0][1]:.4f} | {points[-1][1]:.4f} | "
                             f"{points[-1][0]} |")
        lines.append("")

    names = _metric_names(stages)
    if names:
        lines += ["## Evaluation", "", "| stage | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for r in stages:
            lines.append(f"| {r.name} | " + " | ".join(_fmt(r.metrics.get(n)) for n in names)
                         + " |")
        if _plot_metrics(stages, names, out_dir / "metrics.png"):
            lines += ["", "![evaluation metrics](metrics.png)"]
        lines.append("")
    predictions = _output_prediction_rows(stages)
    if predictions:
        lines += ["## Output prediction", "", "Direct: the value alone (budget maxNewTokens); by "
                  "reasoning: the trace as SFT teaches it, then the value (budget "
                  "reasoningTokens); unfinished: reasoning never closed within its budget.", "",
                  "| stage | programs | count | direct | reasoning | unfinished |",
                  "| --- | --- | --- | --- | --- | --- |", *predictions, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_comparison(workdirs: list[Path], out: Path) -> Path:
    """Compare the evaluation of several runs stage by stage (e.g. the trace-data ablation),
    then the accuracies of the last stage they share with 95% confidence intervals, and, where
    every run holds a ``verdicts.json`` (per-problem verdicts, see :func:`read_verdicts`), the
    paired difference of each run from the first."""
    runs = []
    for workdir in workdirs:
        run = read_json(Path(workdir) / "run.json")
        if run is None:
            raise FileNotFoundError(f"{workdir}: no run here (no run.json)")
        records = [StepRecord.load(Path(workdir) / "steps" / n / "state.json", n)
                   for n in run["steps"] if n in STAGE_ORDER]
        runs.append((run["pipeline"], {r.name: r for r in records}))
    stages = [s for s in STAGE_ORDER if any(s in recs for _, recs in runs)]
    names = _metric_names([r for _, recs in runs for r in recs.values()])
    lines = ["# Comparison: " + " vs ".join(name for name, _ in runs), ""]
    for stage in stages:
        lines += [f"## After {stage}", "", "| metric | " + " | ".join(n for n, _ in runs) + " |",
                  "| --- |" + " --- |" * len(runs)]
        for metric in names:
            values = [recs[stage].metrics.get(metric) if stage in recs else None
                      for _, recs in runs]
            if any(v is not None for v in values):
                lines.append(f"| {metric} | " + " | ".join(_fmt(v) for v in values) + " |")
        lines.append("")
    shared = [s for s in stages if all(s in recs for _, recs in runs)]
    if shared:
        lines += interval_lines(shared[-1], [(n, recs[shared[-1]].metrics) for n, recs in runs])
    verdicts = [read_verdicts(Path(w)) for w in workdirs]
    if len(runs) > 1 and all(v is not None for v in verdicts):
        lines += paired_lines([(n, v) for (n, _), v in zip(runs, verdicts) if v is not None])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


# Accuracies the evaluation reports, each with the metric that counts what it was scored on.
ACCURACY_COUNTS = {
    "heldout_output_direct": "heldout_output_problems",
    "heldout_output_reasoning": "heldout_output_problems",
    "cruxeval_o_direct": "cruxeval_o_problems",
    "cruxeval_o_reasoning": "cruxeval_o_problems",
    "trace_output_accuracy": "trace_output_programs",
    "mutate_fix_solve_rate": "mutate_fix_tasks",
}


def interval_lines(stage: str, runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown: each accuracy of ``stage`` with its 95% Wilson interval and ``right/n``. Pure."""
    rows = []
    for metric, count in ACCURACY_COUNTS.items():
        cells = []
        for _, metrics in runs:
            value, n = metrics.get(metric), metrics.get(count)
            if not isinstance(value, (int, float)) or not isinstance(n, (int, float)) or n < 1:
                cells.append("")
                continue
            right = round(value * n)
            cells.append(f"{wilson(right, int(n)).format()} ({right}/{int(n)})")
        if any(cells):
            rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [f"## Accuracies after {stage}, with 95% confidence intervals (Wilson)", "",
            "| metric | " + " | ".join(n for n, _ in runs) + " |",
            "| --- |" + " --- |" * len(runs), *rows, ""]


def read_verdicts(workdir: Path) -> dict[str, dict[str, bool]] | None:
    """``DIR/verdicts.json``: ``{"evaluations": {NAME: {PROBLEM: right?}}}``, each run's verdict
    on each problem, keyed so that two runs' keys name the same problem (benchmarks/ablation.py
    writes it, keyed by program hash and call). None when the run has none."""
    data = read_json(workdir / "verdicts.json")
    if data is None:
        return None
    evaluations = data.get("evaluations") if isinstance(data, dict) else None
    if not isinstance(evaluations, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, bool) for x in v.values())
            for v in evaluations.values()):
        raise ValueError(f"{workdir / 'verdicts.json'}: expected {{\"evaluations\": {{NAME: "
                         "{PROBLEM: true|false}}}")
    return evaluations


def paired_lines(runs: list[tuple[str, dict[str, dict[str, bool]]]]) -> list[str]:
    """Markdown: every later run against the first on each evaluation both scored, paired by
    problem: accuracies (Wilson), the difference in points with its 95% bootstrap interval,
    the discordant counts and McNemar's exact p. Pure (the bootstrap is seeded)."""
    (first, base), rows = runs[0], []
    for name, verdicts in runs[1:]:
        for evaluation in sorted(set(base) & set(verdicts)):
            keys, a, b = pair_by_key(base[evaluation], verdicts[evaluation])
            if not keys:
                continue
            result = paired(a, b)
            rows.append(f"| {evaluation} | {name} | {result.n} | {result.a.format()} | "
                        f"{result.b.format()} | {result.difference.format(points=True)} | "
                        f"{result.a_only} / {result.b_only} | {result.p_value:.2g} |")
    if not rows:
        return []
    return [f"## Paired differences: {first} minus each other run, on the same problems", "",
            f"| evaluation | other run | problems | {first} | other | difference, points "
            "(95% bootstrap) | right only in first / only in other | McNemar exact p |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
