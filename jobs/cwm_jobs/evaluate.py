"""End-of-stage evaluation, written to ``outputs.metrics/eval.json`` for the runner and operator.

* ``validation_loss``: mean masked loss on the stage's validation splits (and per source);
* ``trace_state_exact_match`` / ``trace_action_exact_match`` / ``trace_step_exact_match``: on
  held-out traces, the share of frames the model would predict exactly by greedy decoding from the
  true prefix. With teacher forcing this is exact and needs one forward pass per trace: greedy
  decoding reproduces a frame token for token iff the argmax at each of its positions is the
  true token. The *state* is a frame's event token, locals and ``<|action_sep|>``; the *action*
  is the rest (source line, and the value of a return), through ``<|frame_sep|>``;
* ``cruxeval_o``: CruxEval-O accuracy on the bundled CRUXEval problems (greedy answers checked by
  evaluation in the sandbox);
* ``mutate_fix_solve_rate``: after SFT and RL, the model itself acts as the ForagerAgent (tools,
  turn budget, sandbox as in the trajectory step) on the trajectory data set's held-out tasks
  (its ``eval_tasks`` split, never rolled out for training); a task is solved when its failing
  tests pass again.

Every rank evaluates its share; counts are summed over ranks. Run standalone on a checkpoint with
``python -m cwm_jobs.evaluate --checkpoint DIR [--traces DATASET] [--limit N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from cwm_jobs.data import masked_lm_loss
from cwm_jobs.tasks import (
    OutputTask, extract_answer, prompt_messages, record_frames, task_from_cruxeval, trace_ids,
)
from cwm_spec import storage

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
            counts[1] += state
            counts[2] += action
            counts[3] += state and action
    module.train(was_training)
    frames, state, action, both, tokens, hits, nll = all_sum(counts, _comm_device(module))
    if not frames:
        return {}
    return {"trace_state_exact_match": state / frames, "trace_action_exact_match": action / frames,
            "trace_step_exact_match": both / frames, "trace_frames": frames,
            "trace_token_accuracy": hits / tokens, "trace_token_loss": nll / tokens}


def held_out_traces(uri: str, limit: int, rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's share of the first ``limit`` validation trace records."""
    from cwm_spec.artifacts import iter_records

    records = []
    for i, record in enumerate(iter_records(uri, "validation")):
        if i >= limit:
            break
        if i % world == rank and isinstance(record.get("text"), str):
            records.append(record)
    return records


def held_out_trace_records(uri: str, limit: int, rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's share of the first ``limit`` complete validation traces that returned."""
    from cwm_exec.trace_format import END_OF_TEXT
    from cwm_spec.artifacts import iter_records

    records = []
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
    from cwm_exec.trace_format import FRAME_SEP, TraceFormatError, parse_frame

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
    from cwm_exec.trace_format import final_value, split_trace, trace_parts
    from cwm_model.generate import generate

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
        outs = generate(module, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_ids=(eos,))
        for out, want in zip(outs, expected):
            got = predicted_return(tokenizer.decode([t for t in out if t != eos]))
            right += got is not None and got == want
    module.train(was_training)
    total = float(len(records))
    right, total = all_sum([right, total], _comm_device(module))
    return {"trace_output_accuracy": right / total, "trace_output_programs": total} if total else {}


# --------------------------------------------------------------------------- output prediction


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    from cwm_model.chat import render_messages

    ids: list[int] = []
    # CWM's reasoning prompt: the generation prompt ends with "<think>\n" (cwm_jobs.tasks).
    for segment in render_messages(messages, add_generation_prompt=True, think=True):
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


@torch.no_grad()
def answer_tasks(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask], *,
                 max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to output-prediction questions."""
    from cwm_model.generate import generate

    was_training = module.training
    module.eval()
    answers = []
    for i in range(0, len(tasks), batch_size):
        prompts = [chat_prompt_ids(tokenizer, prompt_messages(t)) for t in tasks[i:i + batch_size]]
        completions = generate(module, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                               stop_ids=stop_ids(tokenizer))
        answers += [extract_answer(tokenizer.decode(c)) for c in completions]
    module.train(was_training)
    return answers


def cruxeval_tasks(limit: int) -> list[OutputTask]:
    path = resources.files("cwm_beam") / "data" / "cruxeval" / "cruxeval.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [task_from_cruxeval(json.loads(line)) for line in lines[:limit] if line.strip()]


def output_prediction_accuracy(module: torch.nn.Module, tokenizer: Any, tasks: Sequence[OutputTask],
                               *, rank: int, world: int, max_new_tokens: int,
                               sandbox: Mapping[str, Any] | None) -> float:
    from cwm_jobs.rewards import check_outputs

    mine = list(tasks[rank::world])
    answers = answer_tasks(module, tokenizer, mine, max_new_tokens=max_new_tokens)
    verdicts = check_outputs([(a, t.expected) for a, t in zip(answers, mine)], sandbox)
    right, total = all_sum([float(sum(verdicts)), float(len(mine))], _comm_device(module))
    return right / total if total else 0.0


# --------------------------------------------------------------------------- mutate-fix


class ModelPolicy:
    """The model itself as the agent's policy, in process: the same request → reply logic as
    ``cwm serve`` (CWM's chat format, tool calls parsed from the reply). Greedy for evaluation;
    RL samples (``temperature``, and ``seed`` advanced per turn so episodes are reproducible). A
    prompt longer than the model's context ends the episode as a policy error (a failure)."""

    name = "model-under-evaluation"

    def __init__(self, module: torch.nn.Module, tokenizer: Any, max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int | None = None) -> None:
        from cwm_model.serve import ModelServer

        self.server = ModelServer(module, tokenizer, self.name)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.turns = 0

    def act(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Any:
        from cwm_forager.rollout import Action

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
    from cwm_spec.artifacts import iter_records, read_manifest

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
    from cwm_forager.env import Environments
    from cwm_forager.rollout import run_episode
    from cwm_forager.tasks import Task
    from cwm_exec.sandbox import Limits

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


def evaluate_model(module: torch.nn.Module, tokenizer: Any, *, rank: int, world: int,
                   validation: Iterable[dict[str, Any]] = (), traces_uri: str | None = None,
                   trajectories_uri: str | None = None,
                   evaluation: Mapping[str, Any] | None = None,
                   sandbox: Mapping[str, Any] | None = None, max_tokens: int = 2048) -> dict[str, float]:
    """Everything the stage reports, as flat numbers. ``trajectories_uri`` is given by the
    stages whose model speaks the chat format (SFT, RL): it enables the mutate-fix solve rate."""
    ev = dict(evaluation or {})
    results = validation_loss(module, validation)
    held_out = int(ev.get("heldOutTraces", 200))
    if traces_uri and held_out:
        from cwm_spec.artifacts import read_manifest

        if read_manifest(traces_uri).splits.get("validation"):
            held = held_out_traces(traces_uri, held_out, rank, world)
            results.update(trace_exact_match(module, tokenizer, held, max_tokens))
        outputs = int(ev.get("traceOutputs", 0))
        if outputs:
            records = held_out_trace_records(traces_uri, outputs, rank, world)
            results.update(trace_output_accuracy(
                module, tokenizer, records,
                max_new_tokens=int(ev.get("traceOutputTokens", 384))))
    if ev.get("cruxeval", True):
        tasks = cruxeval_tasks(int(ev.get("cruxevalLimit", 800)))
        results["cruxeval_o"] = output_prediction_accuracy(
            module, tokenizer, tasks, rank=rank, world=world,
            max_new_tokens=int(ev.get("maxNewTokens", 128)), sandbox=sandbox)
        results["cruxeval_o_problems"] = float(len(tasks))
    if trajectories_uri and ev.get("mutateFix", True):
        records = mutate_fix_records(trajectories_uri, int(ev.get("mutateFixTasks", 8)))
        if records:
            results.update(mutate_fix_solve_rate(
                module, tokenizer, records, rank=rank, world=world,
                max_turns=int(ev.get("mutateFixTurns", 8)),
                max_new_tokens=int(ev.get("maxNewTokens", 128)), sandbox=sandbox))
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
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    from cwm_model.checkpoint import load_checkpoint

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
                    "mutateFixTurns": args.mutate_fix_turns},
        max_tokens=model.config.max_seq_len)
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
