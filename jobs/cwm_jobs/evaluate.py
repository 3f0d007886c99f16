"""End-of-stage evaluation, written to ``outputs.metrics/eval.json`` for the runner and operator.

* ``validation_loss``: mean masked loss on the stage's validation splits (and per source);
* ``trace_state_exact_match`` / ``trace_action_exact_match`` / ``trace_step_exact_match``: on
  held-out traces, the share of frames the model would predict exactly by greedy decoding from the
  true prefix. With teacher forcing this is exact and needs one forward pass per trace: greedy
  decoding reproduces a frame token for token iff the argmax at each of its positions is the
  true token. The *state* is a frame's event token, locals and ``<|action_sep|>``; the *action*
  is the rest (source line, and the value of a return), through ``<|frame_sep|>``;
* output prediction, in the two modes SFT teaches (:mod:`cwm_jobs.tasks`), each with its own
  budget, greedy answers checked in the sandbox: ``cruxeval_o_direct`` (no reasoning prompt, the
  value alone, ``maxNewTokens``) on the CRUXEval problems held out of training
  (``cruxevalHeldOut``, first ``cruxevalLimit`` in program-hash order), and after SFT and RL
  ``cruxeval_o_reasoning`` (CWM's reasoning prompt: the trace, ``</think>``, the value, within
  ``reasoningTokens``), with ``cruxeval_o_reasoning_unfinished``, the share whose reasoning never
  closed; the same for ``heldOutPrograms`` programs of the traces' validation split
  (``heldout_output_direct``, ``heldout_output_reasoning``...);
* ``mutate_fix_solve_rate``: after SFT and RL, the model itself acts as the ForagerAgent (tools,
  turn budget, sandbox as in the trajectory step) on the trajectory data set's held-out tasks
  (its ``eval_tasks`` split, never rolled out for training); a task is solved when its failing
  tests pass again.

Before anything is scored, every evaluation program (held-out traces and programs, CRUXEval
problems, mutate-fix tasks) is hashed with :func:`cwm_spec.programs.program_hash` and looked up in
the training data sets' manifests (``programs.train``): an overlap raises
:class:`~cwm_spec.programs.ContaminationError` naming the data set, never a score.
``decontamination_programs`` counts what was checked; ``decontamination_unchecked`` counts
training data sets whose manifest lists no programs (written before the list existed; a warning
is logged).

Every rank evaluates its share; counts are summed over ranks. Run standalone on a checkpoint with
``python -m cwm_jobs.evaluate --checkpoint DIR [--traces DATASET] [--limit N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist

from cwm_beam.sources import cruxeval_split
from cwm_exec.sandbox import Limits
from cwm_exec.trace_format import (
    END_OF_TEXT,
    FRAME_SEP,
    TraceFormatError,
    final_value,
    parse_frame,
    split_trace,
    trace_parts,
)
from cwm_forager.env import Environments
from cwm_forager.rollout import Action, run_episode
from cwm_forager.tasks import Task
from cwm_jobs.data import masked_lm_loss
from cwm_jobs.rewards import check_outputs
from cwm_jobs.tasks import (
    OutputTask,
    direct_prompt_messages,
    extract_answer,
    prompt_messages,
    record_frames,
    task_from_cruxeval,
    task_from_trace,
    trace_ids,
)
from cwm_model.chat import THINK_END, render_messages
from cwm_model.checkpoint import load_checkpoint
from cwm_model.generate import generate
from cwm_model.model import CWM
from cwm_model.serve import ModelServer
from cwm_spec import storage
from cwm_spec.api import EvaluationSpec
from cwm_spec.artifacts import iter_records, read_manifest
from cwm_spec.programs import (
    TRAINING_SPLITS,
    ContaminationError,
    contamination,
    program_hash,
    task_program_hash,
)
from cwm_spec.stepconfig import read_section

LOG = logging.getLogger("cwm_jobs.evaluate")


def all_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _comm_device(module: torch.nn.Module) -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return next(module.parameters()).device
    return torch.device("cpu")


@torch.no_grad()
def validation_loss(module: torch.nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted mean loss per source and overall (ranks summed)."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    sums: dict[str, list[float]] = {}
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        logits = module(tensors["input_ids"], doc_ids=tensors["doc_ids"], positions=tensors["positions"])
        n = float(tensors["loss_mask"].sum())
        loss = float(masked_lm_loss(logits, tensors["targets"], tensors["loss_mask"]))
        acc = sums.setdefault(batch.get("source", "all"), [0.0, 0.0])
        acc[0] += loss * n
        acc[1] += n
    module.train(was_training)
    names = sorted(sums)
    if dist.is_initialized():  # every rank must take part with the same names
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        names = sorted({n for part in gathered for n in part})
    flat = all_sum([x for n in names for x in sums.get(n, [0.0, 0.0])], _comm_device(module))
    out: dict[str, float] = {}
    total = [0.0, 0.0]
    for i, name in enumerate(names):
        s, n = flat[2 * i], flat[2 * i + 1]
        if n:
            out[f"validation_loss/{name}"] = s / n
        total[0] += s
        total[1] += n
    if total[1]:
        out["validation_loss"] = total[0] / total[1]
    return out


# --------------------------------------------------------------------------- traces


def frame_spans(ids: Sequence[int], frame_sep: int, action_sep: int) -> list[tuple[int, int, int]]:
    """``(start, split, end)`` token indices of each frame after the prompt: the state is
    ``ids[start:split]`` (through ``<|action_sep|>``), the action ``ids[split:end]`` (through
    ``<|frame_sep|>``)."""
    seps = [i for i, t in enumerate(ids) if t == frame_sep]
    spans = []
    for a, b in zip(seps, seps[1:]):
        start, end = a + 1, b + 1
        split = next((i + 1 for i in range(start, end) if ids[i] == action_sep), start)
        spans.append((start, split, end))
    return spans


@torch.no_grad()
def trace_exact_match(module: torch.nn.Module, tokenizer: Any, records: Iterable[dict[str, Any]],
                      max_tokens: int) -> dict[str, float]:
    """Per-frame exact match of state, action and both (ranks summed); see the module doc.
    ``records`` are trace records (``text`` and ``frames``), tokenized by structure."""
    frame_sep = tokenizer.token_id("<|frame_sep|>")
    action_sep = tokenizer.token_id("<|action_sep|>")
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    counts = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # frames, state, action, both; tokens, hits, nll
    for record in records:
        ids = trace_ids(tokenizer, record)[:max_tokens]
        spans = [s for s in frame_spans(ids, frame_sep, action_sep) if s[2] <= len(ids)]
        if not spans:
            continue
        x = torch.tensor([ids], device=device)
        logits = module(x[:, :-1])[0].float()
        predicted = logits.argmax(-1).tolist()  # predicted[i] guesses ids[i + 1]
        hit = [predicted[i - 1] == ids[i] for i in range(len(ids))]
        # Token-level numbers over the frames (not the source prompt): a finer signal than
        # whole-frame exact match for small models.
        first = spans[0][0]
        targets = x[0, first:]
        nll = torch.nn.functional.cross_entropy(logits[first - 1:], targets, reduction="sum")
        counts[4] += len(ids) - first
        counts[5] += sum(hit[first:])
        counts[6] += float(nll)
        for start, split, end in spans:
            state, action = all(hit[start:split]), all(hit[split:end])
            counts[0] += 1
            counts[1] += float(state)
            counts[2] += float(action)
            counts[3] += float(state and action)
    module.train(was_training)
    frames, states, actions, both, tokens, hits, loss = all_sum(counts, _comm_device(module))
    if not frames:
        return {}
    return {"trace_state_exact_match": states / frames,
            "trace_action_exact_match": actions / frames,
            "trace_step_exact_match": both / frames, "trace_frames": frames,
            "trace_token_accuracy": hits / tokens, "trace_token_loss": loss / tokens}


def held_out_traces(uri: str, limit: int, rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's share of the first ``limit`` validation trace records."""

    records = []
    for i, record in enumerate(iter_records(uri, "validation")):
        if i >= limit:
            break
        if i % world == rank and isinstance(record.get("text"), str):
            records.append(record)
    return records


def held_out_trace_records(uri: str, limit: int, rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's share of the first ``limit`` complete validation traces that returned."""
    records: list[dict[str, Any]] = []
    for record in iter_records(uri, "validation"):
        if len(records) >= limit * world:
            break
        text = record.get("text")
        if isinstance(text, str) and text.endswith(END_OF_TEXT) and record.get("return"):
            records.append(record)
    return records[rank::world]


def predicted_return(frames_text: str) -> str | None:
    """The value of the frame that leaves the entry scope, from generated frame text (parsed
    frame by frame, so a truncated generation still yields what it got to)."""

    depth = 1  # the prompt ends after the entry's call frame
    previous = None
    for index, piece in enumerate(frames_text.split(FRAME_SEP)[:-1]):
        try:
            frame = parse_frame(piece, index)
        except TraceFormatError:
            return None
        depth += {"call": 1, "return": -1}.get(frame.event, 0)
        if depth == 0:   # a return right after an exception: the entry raised
            return frame.value if previous != "exception" else None
        previous = frame.event
    return None


@torch.no_grad()
def trace_output_accuracy(module: torch.nn.Module, tokenizer: Any,
                          records: Sequence[dict[str, Any]], *, max_new_tokens: int,
                          batch_size: int = 8) -> dict[str, float]:
    """Output prediction by trace completion, as CWM predicts execution: the prompt is the
    program and its call frame; the model generates the frames; its answer is the value of the
    frame that returns from the entry. Exact match of the repr (ranks summed)."""

    was_training = module.training
    module.eval()
    right = 0.0
    eos = tokenizer.eos_id
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts, expected = [], []
        for record in batch:
            frames = record_frames(record)
            context, _ = split_trace(record["text"], frames)
            # The prompt: the program and the entry's call frame, tokens from structure.
            prompts.append(tokenizer.encode_parts(trace_parts(context, frames[:1], complete=False)))
            final = final_value(frames)
            expected.append(final[1] if final else None)
        outs = greedy(module, prompts, max_new_tokens, (eos,))
        for out, want in zip(outs, expected):
            got = predicted_return(tokenizer.decode([t for t in out if t != eos]))
            right += got is not None and got == want
    module.train(was_training)
    total = float(len(records))
    right, total = all_sum([right, total], _comm_device(module))
    return {"trace_output_accuracy": right / total, "trace_output_programs": total} if total else {}


# --------------------------------------------------------------------------- output prediction


def greedy(module: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
           stops: Sequence[int]) -> list[list[int]]:
    """Greedy new tokens for each prompt (``module`` is a CWM, whatever wraps it)."""
    return cast(list[list[int]], generate(cast(CWM, module), prompts,
                                          max_new_tokens=max_new_tokens, temperature=0.0,
                                          stop_ids=stops))


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], think: bool = True
                    ) -> list[int]:

    ids: list[int] = []
    # CWM's reasoning prompt: the generation prompt ends with "<think>\n" (cwm_jobs.tasks); a
    # direct answer's has no "<think>".
    for segment in render_messages(messages, add_generation_prompt=True, think=think):
        ids += tokenizer.encode_parts([(segment.text, segment.special)])
    if not ids or ids[0] != tokenizer.bos_id:
        ids = [tokenizer.bos_id, *ids]
    return ids


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """Tokens that end an assistant turn."""
    ids = {tokenizer.eos_id}
    for name in ("<|eot_id|>", "<|eom_id|>"):
        try:
            ids.add(tokenizer.token_id(name))
        except (KeyError, ValueError):
            pass
    return tuple(sorted(ids))


MODES = ("direct", "reasoning")


@torch.no_grad()
def answer_tasks(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask], *,
                 max_new_tokens: int, batch_size: int = 32, mode: str = "reasoning"
                 ) -> list[tuple[str, bool]]:
    """Greedy answers to output-prediction questions in ``mode`` (:data:`MODES`), each with
    whether the reply was unfinished (reasoning that never closed within the budget)."""

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    reasoning = mode == "reasoning"
    build = prompt_messages if reasoning else direct_prompt_messages
    was_training = module.training
    module.eval()
    answers = []
    for i in range(0, len(tasks), batch_size):
        prompts = [chat_prompt_ids(tokenizer, build(t), think=reasoning)
                   for t in tasks[i:i + batch_size]]
        completions = greedy(module, prompts, max_new_tokens, stop_ids(tokenizer))
        for c in completions:
            text = tokenizer.decode(c)
            answers.append((extract_answer(text), reasoning and THINK_END not in text))
    module.train(was_training)
    return answers


def cruxeval_tasks(limit: int, held_out: int = 800) -> list[OutputTask]:
    """The first ``limit`` CRUXEval problems held out of training (``held_out``: the spec's
    ``cruxevalHeldOut``), in program-hash order (:func:`cwm_beam.sources.cruxeval_split`)."""
    return [task_from_cruxeval(r) for r in cruxeval_split(held_out).evaluation[:limit]]


def output_prediction(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask], *,
                      rank: int, world: int, max_new_tokens: int,
                      sandbox: Mapping[str, Any] | None, mode: str) -> tuple[float, float]:
    """Accuracy and the share of unfinished replies in ``mode``, over all ranks' shares."""

    mine = list(tasks[rank::world])
    answers = answer_tasks(module, tokenizer, mine, max_new_tokens=max_new_tokens, mode=mode)
    verdicts = check_outputs([(a, t.expected) for (a, _), t in zip(answers, mine)], sandbox)
    right, unfinished, total = all_sum([float(sum(verdicts)),
                                        float(sum(u for _, u in answers)), float(len(mine))],
                                       _comm_device(module))
    return (right / total, unfinished / total) if total else (0.0, 0.0)


def output_prediction_accuracy(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask],
                               *, rank: int, world: int, max_new_tokens: int,
                               sandbox: Mapping[str, Any] | None) -> float:
    """Accuracy by reasoning (CWM's reasoning prompt), the mode RL rewards."""
    return output_prediction(module, tokenizer, tasks, rank=rank, world=world,
                             max_new_tokens=max_new_tokens, sandbox=sandbox, mode="reasoning")[0]


def both_modes(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask], name: str,
               ev: EvaluationSpec, *, rank: int, world: int, chat: bool,
               sandbox: Mapping[str, Any] | None) -> dict[str, float]:
    """``NAME_direct`` (budget ``maxNewTokens``) and, in a stage whose model speaks the chat
    format, ``NAME_reasoning`` and ``NAME_reasoning_unfinished`` (budget ``reasoningTokens``)."""
    results = {f"{name}_problems": float(len(tasks))}
    results[f"{name}_direct"], _ = output_prediction(
        module, tokenizer, tasks, rank=rank, world=world, max_new_tokens=ev.max_new_tokens,
        sandbox=sandbox, mode="direct")
    if chat and ev.reasoning:
        right, unfinished = output_prediction(
            module, tokenizer, tasks, rank=rank, world=world, max_new_tokens=ev.reasoning_tokens,
            sandbox=sandbox, mode="reasoning")
        results[f"{name}_reasoning"] = right
        results[f"{name}_reasoning_unfinished"] = unfinished
    return results


# --------------------------------------------------------------------------- decontamination


def held_out_programs(uri: str, limit: int) -> list[tuple[dict[str, Any], OutputTask]]:
    """The first ``limit`` validation records whose program returned, with their questions."""
    found: list[tuple[dict[str, Any], OutputTask]] = []
    for record in iter_records(uri, "validation"):
        if len(found) >= limit:
            break
        text = record.get("text")
        task = task_from_trace(text, record.get("frames")) if isinstance(text, str) else None
        if task is not None:
            found.append((record, task))
    return found


def record_hash(record: dict[str, Any]) -> str | None:
    """A trace record's program hash, from its code (None for a record without code)."""
    code = record.get("code")
    return program_hash(code) if isinstance(code, str) else None


def training_programs(training: Mapping[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """``{"traces/train": [hashes]}`` from each training data set's manifest, and the data sets
    whose manifest lists no programs (they cannot be checked)."""
    lists: dict[str, list[str]] = {}
    unchecked = []
    for name, uri in sorted(training.items()):
        manifest = read_manifest(uri)
        if not manifest.programs:
            unchecked.append(f"{name} ({uri})")
            continue
        for split in TRAINING_SPLITS:
            lists[f"{name}/{split}"] = manifest.programs.get(split, [])
    return lists, unchecked


def check_decontamination(evaluation: Mapping[str, list[str]],
                          training: Mapping[str, str]) -> dict[str, float]:
    """Refuse (:class:`ContaminationError`) when an evaluation program is in a training data
    set; else the counts for the report. Every rank reads the same lists, so all raise or none."""
    lists, unchecked = training_programs(training)
    found = contamination(evaluation, lists)
    if found:
        raise ContaminationError(
            "evaluation programs are in the training data, so no score would be honest: "
            + "; ".join(found) + ". Regenerate the data with this spec's evaluation section "
            "(the data steps leave its programs out), or evaluate other programs.")
    for name in unchecked:
        LOG.warning("decontamination: %s lists no programs in its manifest: not checked", name)
    return {"decontamination_programs": float(len({h for v in evaluation.values() for h in v})),
            "decontamination_unchecked": float(len(unchecked))}


# --------------------------------------------------------------------------- mutate-fix


class ModelPolicy:
    """The model itself as the agent's policy, in process: the same request → reply logic as
    ``cwm serve`` (CWM's chat format, tool calls parsed from the reply). Greedy for evaluation;
    RL samples (``temperature``, and ``seed`` advanced per turn so episodes are reproducible). A
    prompt longer than the model's context ends the episode as a policy error (a failure)."""

    name = "model-under-evaluation"

    def __init__(self, module: torch.nn.Module, tokenizer: Any, max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int | None = None) -> None:

        self.server = ModelServer(cast(CWM, module), tokenizer, self.name)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.turns = 0

    def act(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Any:

        # The agent's trajectories are trained without reasoning: ask for none (cwm serve, like
        # CWM's OpenAI API, reasons by default).
        body: dict[str, Any] = {"messages": list(messages), "tools": list(tools),
                                "temperature": self.temperature, "max_tokens": self.max_new_tokens,
                                "reasoning": {"enabled": False}}
        if self.seed is not None:
            body["seed"] = self.seed + self.turns
        self.turns += 1
        with torch.no_grad():
            reply = self.server.chat(body)
        usage = reply["usage"]
        return Action(reply["choices"][0]["message"], usage["prompt_tokens"],
                      usage["completion_tokens"])


def mutate_fix_records(uri: str, limit: int) -> list[dict[str, Any]]:
    """The trajectory data set's held-out tasks, in a stable order."""

    if not read_manifest(uri).splits.get("eval_tasks"):
        return []
    records = sorted(iter_records(uri, "eval_tasks"), key=lambda r: str(r.get("id")))
    return records[:limit]


@torch.no_grad()
def mutate_fix_solve_rate(module: torch.nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                          *, rank: int, world: int, max_turns: int, max_new_tokens: int,
                          sandbox: Mapping[str, Any] | None = None,
                          policy: Any = None) -> dict[str, float]:
    """Episodes of the model on held-out mutate-fix tasks (this rank's share); ranks summed.
    ``policy`` replaces the model as the agent (a baseline, e.g. the search-based repair policy)."""

    was_training = module.training
    module.eval()
    policy = policy or ModelPolicy(module, tokenizer, max_new_tokens)
    solved = turns = 0.0
    mine = list(records[rank::world])
    try:
        with Environments(Limits.from_spec(dict(sandbox or {})), "cwm-mutate-fix-") as envs:
            for record in mine:
                trajectory = run_episode(envs.get(record["repository"]),
                                         Task.from_json(record["task"]), policy, max_turns)
                solved += trajectory.success
                turns += trajectory.meta["turns"]
                LOG.info("mutate-fix %s: %s after %d turns (%s)", trajectory.meta["task_id"],
                         "solved" if trajectory.success else "not solved",
                         trajectory.meta["turns"], trajectory.meta["stop"])
    finally:
        module.train(was_training)
    solved, turns, total = all_sum([solved, turns, float(len(mine))], _comm_device(module))
    if not total:
        return {}
    return {"mutate_fix_solve_rate": solved / total, "mutate_fix_tasks": total,
            "mutate_fix_mean_turns": turns / total}


# --------------------------------------------------------------------------- the stage's report


@dataclass
class Chosen:
    """What one evaluation scores, chosen before anything runs and the same on every rank
    (each then takes its share)."""

    traces: list[dict[str, Any]] = field(default_factory=list)         # trace exact match
    trace_outputs: list[dict[str, Any]] = field(default_factory=list)  # by trace completion
    cruxeval: list[OutputTask] = field(default_factory=list)
    cruxeval_hashes: list[str] = field(default_factory=list)
    programs: list[tuple[dict[str, Any], OutputTask]] = field(default_factory=list)
    mutate_fix: list[dict[str, Any]] = field(default_factory=list)

    def hashes(self) -> dict[str, list[str]]:
        """Each evaluation's program hashes (records without code have none)."""
        def of(records: Iterable[dict[str, Any]]) -> list[str]:
            return [h for h in map(record_hash, records) if h]

        tasks = [r["task"] for r in self.mutate_fix]
        return {"held-out traces": of([*self.traces, *self.trace_outputs]),
                "held-out programs": of(r for r, _ in self.programs),
                "cruxeval": list(self.cruxeval_hashes),
                "mutate-fix": [task_program_hash(t["original"], t["path"], t["function"])
                               for t in tasks]}


def choose(ev: EvaluationSpec, traces_uri: str | None, trajectories_uri: str | None,
           chat: bool) -> Chosen:
    """The programs each enabled measurement scores (I/O: reads the data sets)."""
    chosen = Chosen()
    if traces_uri and read_manifest(traces_uri).splits.get("validation"):
        chosen.traces = held_out_traces(traces_uri, ev.held_out_traces, 0, 1)
        if ev.trace_outputs:
            chosen.trace_outputs = held_out_trace_records(traces_uri, ev.trace_outputs, 0, 1)
        if ev.held_out_programs:
            chosen.programs = held_out_programs(traces_uri, ev.held_out_programs)
    if ev.cruxeval:
        problems = cruxeval_split(ev.cruxeval_held_out).evaluation[:ev.cruxeval_limit]
        chosen.cruxeval = [task_from_cruxeval(r) for r in problems]
        chosen.cruxeval_hashes = [program_hash(r["code"]) for r in problems]
    if chat and trajectories_uri and ev.mutate_fix:
        chosen.mutate_fix = mutate_fix_records(trajectories_uri, ev.mutate_fix_tasks)
    return chosen


def evaluate_model(module: torch.nn.Module, tokenizer: Any, *, rank: int, world: int,
                   validation: Iterable[dict[str, Any]] = (), traces_uri: str | None = None,
                   trajectories_uri: str | None = None,
                   evaluation: EvaluationSpec | Mapping[str, Any] | None = None,
                   sandbox: Mapping[str, Any] | None = None, max_tokens: int = 2048,
                   chat: bool | None = None,
                   training: Mapping[str, str] | None = None) -> dict[str, float]:
    """Everything the stage reports, as flat numbers. ``chat``: the model speaks the chat format
    (SFT, RL), which enables reasoning-mode output prediction and the mutate-fix solve rate
    (default: whether ``trajectories_uri`` is given). ``training``: the data sets of programs
    the model trained on (default: the traces and trajectories given), checked first."""
    ev = evaluation if isinstance(evaluation, EvaluationSpec) else read_section(
        EvaluationSpec, dict(evaluation or {}), "evaluation")
    chat = trajectories_uri is not None if chat is None else chat
    chosen = choose(ev, traces_uri, trajectories_uri, chat)
    if training is None:
        training = {n: u for n, u in (("traces", traces_uri), ("trajectories", trajectories_uri))
                    if u}
    results = check_decontamination(chosen.hashes(), training)
    results.update(validation_loss(module, validation))
    if chosen.traces:
        results.update(trace_exact_match(module, tokenizer, chosen.traces[rank::world],
                                         max_tokens))
    if chosen.trace_outputs:
        results.update(trace_output_accuracy(module, tokenizer, chosen.trace_outputs[rank::world],
                                             max_new_tokens=ev.trace_output_tokens))
    for name, tasks in (("cruxeval_o", chosen.cruxeval),
                        ("heldout_output", [t for _, t in chosen.programs])):
        if tasks:
            results.update(both_modes(module, tokenizer, tasks, name, ev, rank=rank, world=world,
                                      chat=chat, sandbox=sandbox))
    if chosen.mutate_fix:
        results.update(mutate_fix_solve_rate(
            module, tokenizer, chosen.mutate_fix, rank=rank, world=world,
            max_turns=ev.mutate_fix_turns, max_new_tokens=ev.max_new_tokens, sandbox=sandbox))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Evaluate a saved checkpoint in one process and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (path or URI)")
    parser.add_argument("--traces", default=None, help="a traces data set (validation split)")
    parser.add_argument("--limit", type=int, default=800, help="CRUXEval problems")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--trace-outputs", type=int, default=0,
                        help="held-out programs whose output is predicted by trace completion")
    parser.add_argument("--no-cruxeval", action="store_true")
    parser.add_argument("--trajectories", default=None,
                        help="a trajectories data set: mutate-fix solve rate on its eval_tasks")
    parser.add_argument("--mutate-fix-tasks", type=int, default=8)
    parser.add_argument("--mutate-fix-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="budget of a direct answer and of a mutate-fix turn")
    parser.add_argument("--reasoning-tokens", type=int, default=1024,
                        help="budget of an answer by reasoning")
    parser.add_argument("--cruxeval-held-out", type=int, default=800,
                        help="CRUXEval problems held out of training (the spec's value)")
    parser.add_argument("--held-out-programs", type=int, default=0,
                        help="validation programs whose output is predicted in chat")
    parser.add_argument("--chat", action="store_true",
                        help="the checkpoint speaks the chat format (after SFT): also reasoning")
    parser.add_argument("--training", action="append", default=[], metavar="DATASET",
                        help="a data set the model trained on, checked for evaluation programs "
                        "(default: --traces and --trajectories)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, _ = load_checkpoint(storage.local_copy(args.checkpoint), device=device)
    if tokenizer is None:
        raise SystemExit(f"{args.checkpoint}: the checkpoint carries no tokenizer")
    results = evaluate_model(
        model, tokenizer, rank=0, world=1, traces_uri=args.traces,
        trajectories_uri=args.trajectories,
        evaluation={"heldOutTraces": args.held_out, "cruxevalLimit": args.limit,
                    "traceOutputs": args.trace_outputs, "cruxeval": not args.no_cruxeval,
                    "maxNewTokens": args.max_new_tokens, "mutateFixTasks": args.mutate_fix_tasks,
                    "mutateFixTurns": args.mutate_fix_turns,
                    "reasoningTokens": args.reasoning_tokens,
                    "cruxevalHeldOut": args.cruxeval_held_out,
                    "heldOutPrograms": args.held_out_programs},
        max_tokens=model.config.max_seq_len, chat=args.chat or args.trajectories is not None,
        training={f"training[{i}]": uri for i, uri in enumerate(args.training)} or None)
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
