"""How many tokens an answer by reasoning needs: the length of the replies SFT teaches (the trace
as reasoning, ``</think>``, the value) over a traces data set, in a pipeline's tokenizer, against
the prompt's. The evaluation's ``reasoningTokens`` budget should hold most of them
(docs/benchmarks.md, "Output prediction: the two modes' budgets").

    python benchmarks/reasoning_budget.py --traces runs/tiny/artifacts/traces/dataset \\
        --tokenizer runs/tiny/artifacts/tokenizer/tokenizer --records 300
"""

from __future__ import annotations

import argparse

from cwm_jobs.tasks import prompt_messages, sft_messages, task_from_trace
from cwm_model.chat import render_messages
from cwm_model.tokenizer import CWMTokenizer
from cwm_spec.artifacts import iter_records


def length(tokenizer: CWMTokenizer, messages: list[dict], prompt: bool) -> int:
    segments = render_messages(messages, add_generation_prompt=prompt, think=prompt)
    return sum(len(tokenizer.encode_parts([(s.text, s.special)])) for s in segments)


def quantile(values: list[int], q: float) -> int:
    return sorted(values)[int(q * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--records", type=int, default=300, help="per split")
    args = parser.parse_args()
    tokenizer = CWMTokenizer.load(args.tokenizer)
    replies, prompts = [], []
    for split in ("validation", "train"):
        for index, record in enumerate(iter_records(args.traces, split)):
            if index >= args.records:
                break
            task = task_from_trace(record["text"], record.get("frames"))
            if task is None:
                continue
            prompt = length(tokenizer, prompt_messages(task), True)
            prompts.append(prompt)
            replies.append(length(tokenizer, sft_messages(task), False) - prompt)
    for name, values in (("reply (reasoning + value)", replies), ("prompt", prompts)):
        print(f"{name}: {len(values)} programs, median {quantile(values, 0.5)}, "
              f"p75 {quantile(values, 0.75)}, p90 {quantile(values, 0.9)}, max {max(values)}")
    for budget in (128, 256, 512, 640, 1024, 2048):
        share = sum(r <= budget for r in replies) / len(replies)
        print(f"budget {budget}: {share:.0%} of the replies fit")


if __name__ == "__main__":
    main()
