"""Program identity, shared by data generation and evaluation: the one hash of a program, and the
check that no evaluation program reached a training data set.

Decontamination is by construction: each data step leaves the evaluation's programs out of what
it writes for training (``cwm_beam.traces``: the CRUXEval problems held out by
``spec.evaluation.cruxevalHeldOut``, and its validation split, chosen by program hash;
``cwm_beam.trajectories``: the held-out mutate-fix tasks' functions) and lists, in its manifest's
``programs``, the hashes of the programs each split holds. Before scoring, the evaluation hashes
its own programs with :func:`program_hash` and :func:`contamination` compares them with the
training splits' lists: any overlap is an error, never a number.

Pure: no I/O.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Mapping

# Splits a data step writes for training; the others (validation, eval_tasks, deadletter) are not.
TRAINING_SPLITS = ("train",)


class ContaminationError(ValueError):
    """An evaluation program is in a training data set: the evaluation refuses to score."""


def program_hash(code: str) -> str:
    """sha256 of the program text, trailing spaces and blank edges ignored: the same program
    hashes the same in the trace data, the trajectory tasks and the evaluation."""
    normal = "\n".join(line.rstrip() for line in code.strip().splitlines())
    return hashlib.sha256(normal.encode()).hexdigest()


def function_source(module_source: str, name: str) -> str | None:
    """The source of the (first) function or method ``name`` defined in a module, or None: the
    program of a mutate-fix task is the original function it breaks."""
    try:
        tree = ast.parse(module_source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.get_source_segment(module_source, node)
    return None


def task_program_hash(original: str, path: str, function: str) -> str:
    """The program of a mutate-fix task: its function's original source (the file's path and
    the function's name when the source cannot be read back), hashed by :func:`program_hash`."""
    source = function_source(original, function)
    return program_hash(source if source is not None else f"{path}::{function}")


def split_of(program_hash_hex: str, validation_fraction: float) -> str:
    """``"validation"`` or ``"train"``, a pure function of the program hash, so every record of
    a program (whatever its input or source) lands in the same split."""
    position = int(program_hash_hex[:15], 16) / float(16 ** 15)
    return "validation" if position < validation_fraction else "train"


def contamination(evaluation: Mapping[str, Iterable[str]],
                  training: Mapping[str, Iterable[str]]) -> list[str]:
    """Each evaluation set's programs found in a training data set, one line per pair
    (``"cruxeval: 3 of 50 programs in traces/train (e.g. 1a2b3c4d5e6f)"``); empty when clean.
    ``evaluation`` maps an evaluation's name to its program hashes, ``training`` a data set's
    split (``traces/train``) to the hashes its manifest lists."""
    lines = []
    trained = {name: set(hashes) for name, hashes in training.items()}
    for name, hashes in evaluation.items():
        wanted = set(hashes)
        for where, present in sorted(trained.items()):
            common = sorted(wanted & present)
            if common:
                lines.append(f"{name}: {len(common)} of {len(wanted)} programs in {where} "
                             f"(e.g. {', '.join(h[:12] for h in common[:3])})")
    return lines
