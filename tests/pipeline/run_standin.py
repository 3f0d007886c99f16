"""Run a pipeline's real plan with every step replaced by the stand-in (runner tests only).

    python run_standin.py MANIFEST WORKDIR [--only-first N]
"""

import dataclasses
import signal
import sys
from pathlib import Path

from cwm_operator.runner import LocalRunner, RunError
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import load_file

STANDIN = str(Path(__file__).with_name("standin_step.py"))


def standin_plan(manifest: str, workdir: Path, first: int | None = None):
    plan = build_plan(load_file(manifest), Target.local(str(workdir / "artifacts")))
    steps = tuple(
        dataclasses.replace(s, command=(sys.executable, STANDIN), module="")
        for s in plan.steps[:first]
    )
    return dataclasses.replace(plan, steps=steps)


def main(argv: list[str]) -> int:
    # Ctrl-C as a terminal's foreground process gets it: a test run started in the background of
    # a non-interactive shell (`make test &` in a script) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler, so the Ctrl-C test would see the run finish.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    first = int(argv[3]) if len(argv) > 3 and argv[2] == "--only-first" else None
    workdir = Path(argv[1])
    try:
        LocalRunner(standin_plan(argv[0], workdir, first), workdir).run()
    except RunError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
