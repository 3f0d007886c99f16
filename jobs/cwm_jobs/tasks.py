"""Output prediction, the verifiable task shared by SFT, RL and evaluation.

One question format everywhere: SFT teaches it, RL rewards it, CruxEval-O measures it, in two
modes. *By reasoning* (:func:`prompt_messages`, :func:`sft_messages`): the execution trace is the
reasoning, then the value; the answer needs a budget that holds a trace. *Directly*
(:func:`direct_messages`, :func:`direct_prompt_messages`): no reasoning prompt, the value alone,
a few tokens. Reasoning is CWM's plain-text ``<think>`` format
(github.com/facebookresearch/cwm ``PROMPTING_GUIDE.md`` "Reasoning", ``cwm/rl/envs/prompts.py``):
the conversation starts with CWM's reasoning system prompt, the generation prompt ends with
``<think>\n`` (``cwm_model.chat.render_messages(..., think=True)``) and the answer is whatever
follows ``</think>`` (or the whole reply when the model did not reason), first line, stripped.
Whether an answer is right is decided by :func:`cwm_jobs.rewards.check_outputs`, in the sandbox.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from cwm_exec.trace_format import (
    START_MARKER,
    Frame,
    encode_frames,
    final_value,
    parse_trace,
    split_trace,
    trace_parts,
)
from cwm_model.chat import REASONING_SYSTEM_PROMPT, THINK_END, THINK_START


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
    """CWM's reasoning system prompt, then the question (render with ``think=True``)."""
    return [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
            {"role": "user", "content": question(task)}]


def direct_prompt_messages(task: OutputTask) -> list[dict[str, Any]]:
    """The question alone, no reasoning system prompt (render with ``think=False``): the reply
    is the value."""
    return [{"role": "user", "content": question(task)}]


def direct_messages(task: OutputTask) -> list[dict[str, Any]]:
    """The SFT example of a direct answer: the question, then the value alone."""
    return [*direct_prompt_messages(task), {"role": "assistant", "content": task.expected}]


def sft_messages(task: OutputTask) -> list[dict[str, Any]]:
    """The SFT example: the trace as reasoning (``<think>\n...\n</think>\n``, ordinary text
    as CWM encodes message bodies; empty when there is no trace, so the reply still has the
    reasoning-mode shape the ``<think>\n`` prompt expects), then the value."""
    answer = {"role": "assistant", "content": task.expected,
              "reasoning_content": task.reasoning or ""}
    return [*prompt_messages(task), answer]


STOP_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def extract_answer(text: str) -> str:
    """The answer in a reply: after the reasoning, first line, without the stop token."""
    for stop in STOP_TEXTS:
        text = text.split(stop, 1)[0]
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START.strip() in text:  # reasoning never closed: no answer
        return ""
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def record_frames(record: dict[str, Any]) -> list[Frame]:
    frames = record.get("frames")
    if not isinstance(frames, list):
        raise ValueError(f"trace record {record.get('id', '?')}: 'frames' must be a list")
    return [f if isinstance(f, Frame) else Frame.from_json(f) for f in frames]


def trace_ids(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Token ids of a trace record: the special tokens where the trace's structure puts them
    (its ``frames``), every value, line and the source encoded as ordinary text, so a value
    spelling ``<|frame_sep|>`` cannot forge a frame (CWM's ``encode_ordinary`` rule)."""
    frames = record_frames(record)
    try:
        context, complete = split_trace(record["text"], frames)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"trace record {record.get('id', '?')}: {err}") from None
    return tokenizer.encode_parts(trace_parts(context, frames, complete=complete))


def task_from_trace(text: str, frames: list | None = None) -> OutputTask | None:
    """An output-prediction task from a trace record's text (and its ``frames``, which make
    it unambiguous when values spell special tokens); None for traces that raise or never
    returned (nothing to predict)."""
    if frames is None:
        source, parsed = parse_trace(text)
    else:
        parsed = [f if isinstance(f, Frame) else Frame.from_json(f) for f in frames]
        source, _ = split_trace(text, parsed)
    frames = parsed
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
