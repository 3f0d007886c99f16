"""Output prediction, the verifiable task shared by SFT, RL and evaluation.

One question format everywhere: SFT teaches it (with the execution trace as the reasoning), RL
rewards it, CruxEval-O measures it. The answer is whatever follows ``<|reasoning_thinking_end|>``
(or the whole reply when the model did not reason), first line, stripped. Whether an answer is
right is decided by :func:`cwm_jobs.rewards.check_outputs`, in the sandbox.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

THINK_START = "<|reasoning_thinking_start|>"
THINK_END = "<|reasoning_thinking_end|>"


@dataclass(frozen=True)
class OutputTask:
    """A program, the call to predict, and the true value's ``repr``."""

    source: str
    call: str
    expected: str
    reasoning: str | None = None  # the execution trace frames, when known


def question(task: OutputTask) -> str:
    # The call comes last, nearest to the answer that depends on it.
    return (f"Here is a Python program:\n```python\n{task.source.rstrip()}\n```\n"
            f"Answer with a Python literal. What does this return: {task.call}")


def prompt_messages(task: OutputTask) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question(task)}]


def sft_messages(task: OutputTask) -> list[dict[str, Any]]:
    """The SFT example: the trace as reasoning, then the value."""
    answer = task.expected
    if task.reasoning:
        answer = f"{THINK_START}{task.reasoning}{THINK_END}{task.expected}"
    return [*prompt_messages(task), {"role": "assistant", "content": answer}]


STOP_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def extract_answer(text: str) -> str:
    """The answer in a reply: after the reasoning, first line, without the stop token."""
    for stop in STOP_TEXTS:
        text = text.split(stop, 1)[0]
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START in text:  # reasoning never closed: no answer
        return ""
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def task_from_trace(text: str) -> OutputTask | None:
    """An output-prediction task from a trace record's text; None for traces that raise or
    never returned (nothing to predict)."""
    from cwm_exec.trace_format import START_MARKER, encode_frames, final_value, parse_trace

    source, frames = parse_trace(text)
    final = final_value(frames)
    if final is None or final[0] != "return" or not frames or frames[0].event != "call":
        return None
    entry = frames[0].line.split("def ", 1)[-1].split("(", 1)[0].strip()
    args = ", ".join((frames[0].locals or {}).values())
    return OutputTask(source=source.replace(f"  {START_MARKER}", ""), call=f"{entry}({args})",
                      expected=final[1], reasoning=encode_frames(frames))


def task_from_cruxeval(record: dict[str, Any]) -> OutputTask:
    """CRUXEval's ``code``/``input``/``output`` (the function is always ``f``)."""
    return OutputTask(source=record["code"], call=f"f({record['input']})", expected=record["output"])


# --------------------------------------------------------------------------- a learnable family

_COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")
_WEIGHTS = (3, 1, 1, 3, 1, 3)  # reflexive comparisons are True 3 times in 4


def comparison_tasks(count: int, seed: int = 0) -> list[OutputTask]:
    """Tiny programs comparing their argument with itself (``return x <= x``): the result, True
    or False, depends on the operator only, and True is three times as frequent. A policy that
    answers at random scores 0.5; one that learned the frequencies 0.75; one that reads the
    operator 1.0. Small enough for the ``debug`` model to improve by RL in a few dozen CPU steps,
    and still verified by running the program."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        op, x = rng.choices(_COMPARISONS, _WEIGHTS)[0], rng.randrange(100)
        source = f"def f(x):\n    return x {op} x\n"
        tasks.append(OutputTask(source, f"f({x})", repr(eval(f"{x} {op} {x}"))))
    return tasks
