"""The `cwm` command: validate, plan and run pipelines, print the CRD, inspect runs.

    cwm validate examples/*.yaml          # exit 1 with field paths on any error
    cwm plan examples/tiny.yaml           # the steps, their commands, inputs and outputs
    cwm run examples/tiny.yaml --workdir runs/tiny
    cwm status runs/tiny
    cwm crd > charts/cwm-operator/crds/cwmpipelines.cwm.dev.yaml

Component commands (`cwm model`, `cwm export-hf`, `cwm serve`, `cwm debug`, `cwm render`) live
in their packages and are imported only when used, so the core commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cwm_operator.report import write_comparison, write_report
from cwm_operator.runner import LocalRunner, PlainDisplay, RichDisplay, RunError, summarize
from cwm_spec.crd import crd_yaml
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import ManifestError, load_file, resolve_target

# subcommand -> module providing register(subparsers)
COMPONENT_COMMANDS = {
    "model": "cwm_model.cli",
    "export-hf": "cwm_model.cli",
    "import-hf": "cwm_model.cli",
    "serve": "cwm_model.cli",
    "debug": "cwm_jobs.debug",
    "render": "cwm_operator.render",
}


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            pipeline = load_file(path, target=args.target)
        except ManifestError as err:
            failed += 1
            print(err, file=sys.stderr)
            continue
        steps = build_plan(pipeline, Target.local("artifacts")).names
        print(f"{path}: valid CWMPipeline {pipeline.name!r} ({len(steps)} steps: "
              f"{' → '.join(steps)})")
    return 1 if failed else 0


def _plan(args: argparse.Namespace):
    pipeline = load_file(args.file, target=args.target)
    if resolve_target(pipeline, args.target) == "cluster":
        namespace = args.namespace or pipeline.metadata.namespace or "default"
        target = Target.cluster(pipeline, namespace)
    else:
        workdir = Path(args.workdir or Path("runs") / pipeline.name).resolve()
        target = Target.local(str(workdir / "artifacts"), pipeline)
    return pipeline, build_plan(pipeline, target)


def cmd_plan(args: argparse.Namespace) -> int:
    _, plan = _plan(args)
    if args.json:
        steps = [{
            "name": s.name, "kind": s.kind, "command": list(s.command), "env": dict(s.env),
            "inputs": dict(s.inputs), "outputs": dict(s.outputs), "after": list(s.after),
            "resources": s.resources.dump(), "image": s.image, "fingerprint": s.fingerprint,
        } for s in plan.steps]
        print(json.dumps({"pipeline": plan.pipeline, "target": plan.target.kind,
                          "steps": steps}, indent=2))
        return 0
    print(f"plan of {plan.pipeline} ({plan.target.kind}, {len(plan.steps)} steps)")
    for i, s in enumerate(plan.steps, 1):
        where = f"image {s.image}" if plan.target.kind == "cluster" else "local process"
        print(f"\n{i}. {s.name} [{s.kind}, {where}, fingerprint {s.fingerprint}]")
        print(f"   $ {' '.join(s.command)}")
        for k, v in s.inputs.items():
            print(f"   reads  {k}: {v}")
        for k, v in s.outputs.items():
            print(f"   writes {k}: {v}")
    print("\nEach step reads its configuration from $CWM_STEP_CONFIG (`cwm plan --json` shows it).")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    args.target = "local"
    pipeline, plan = _plan(args)
    workdir = Path(args.workdir or Path("runs") / pipeline.name).resolve()
    display = RichDisplay() if (sys.stderr.isatty() and not args.plain) else PlainDisplay()
    runner = LocalRunner(plan, workdir, display)
    print(f"cwm run: {pipeline.name} in {workdir} ({len(plan.steps)} steps)", file=sys.stderr)
    try:
        runner.run()
    except RunError as err:
        display.close()
        _err(str(err))
        return 1
    except KeyboardInterrupt:
        _err(f"interrupted; `cwm run {args.file} --workdir {workdir}` resumes")
        return 130
    report = write_report(workdir)
    print(f"cwm run: {pipeline.name} succeeded; report: {report}; `cwm status {workdir}` "
          "summarises it", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not (Path(args.workdir) / "run.json").exists():
        _err(f"{args.workdir}: no run here (no run.json)")
        return 1
    print(write_report(Path(args.workdir)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        summary = summarize(Path(args.workdir))
    except RunError as err:
        _err(str(err))
        return 1
    run = summary["run"]
    if args.json:
        print(json.dumps({"run": run, "steps": [vars(r) for r in summary["steps"]]}, indent=2))
        return 0
    table = Table(title=f"{run['pipeline']}: {run['state']} (started {run['started']})")
    for col in ("step", "state", "attempts", "seconds", "from cache", "metrics / message"):
        table.add_column(col, overflow="fold")
    for r in summary["steps"]:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted(r.metrics.items())[:6])
        table.add_row(r.name, r.state, str(r.attempts),
                      f"{r.seconds:.1f}" if r.seconds is not None else "",
                      "yes" if r.cached else "", r.message or metrics)
    Console().print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        path = write_comparison(list(args.workdirs), args.out)
    except (FileNotFoundError, ValueError) as err:
        _err(str(err))
        return 1
    print(path.read_text())
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=["auto", "local", "cluster"], default="auto",
                   help="where the pipeline runs (auto: cluster if spec.storage is set)")


def build_parser(component: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cwm", description="Train code world models: validate, plan and run CWMPipelines.",
        epilog="Component commands: " + ", ".join(sorted(COMPONENT_COMMANDS)),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="validate pipeline manifests")
    p.add_argument("files", nargs="+", type=Path)
    _add_target(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="print the steps a pipeline runs")
    p.add_argument("file", type=Path)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--namespace", default=None, help="for cluster plans (default: the manifest's)")
    p.add_argument("--json", action="store_true", help="full machine-readable plan")
    _add_target(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a pipeline on this machine (resumable)")
    p.add_argument("file", type=Path)
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/<pipeline name>")
    p.add_argument("--plain", action="store_true", help="line output instead of a live table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="summarise a local run")
    p.add_argument("workdir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="(re)write the evaluation report of a local run")
    p.add_argument("workdir", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare the evaluations of several local runs")
    p.add_argument("workdirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("comparison.md"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("crd", help="print the CWMPipeline CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    if component:
        importlib.import_module(COMPONENT_COMMANDS[component]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    component = argv[0] if argv and argv[0] in COMPONENT_COMMANDS else None
    if component:
        try:
            importlib.import_module(COMPONENT_COMMANDS[component])
        except ModuleNotFoundError as err:
            _err(f"`cwm {component}` needs {COMPONENT_COMMANDS[component]}, which is not "
                 f"available ({err})")
            return 1
    args = build_parser(component).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
