"""Batched generation with a KV cache: greedy, temperature and top-p sampling, stop tokens.

Prompts of different lengths are left-padded into one batch. Padding gets its own document id, so
real tokens never attend to it, and each row's RoPE positions start at 0 on its first real token:
every row computes exactly what it would alone. The prompt is run once (prefill), then one token
per step reuses the cached keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cwm_model.model import CWM, KVCache

PAD_DOC, REAL_DOC = 0, 1


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, doc_ids, positions), each (B, L), for prompts right-aligned to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    doc = torch.full((len(prompts), width), PAD_DOC, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            doc[row, width - len(prompt):] = REAL_DOC
    lengths = torch.tensor([len(p) for p in prompts])
    positions = (torch.arange(width)[None] - (width - lengths)[:, None]).clamp(min=0)
    return ids.to(device), doc.to(device), positions.to(device)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) from last-position ``logits`` (B, V) and their log-probabilities under
    ``softmax(logits / temperature)`` (temperature 0 counts as 1), before top-p truncation:
    the quantity a trainer recomputes from the same logits."""
    logits = logits.float()
    scaled = logits / temperature if temperature > 0 else logits
    logprobs = torch.log_softmax(scaled, dim=-1)
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def validate(model: CWM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, "
                         f"got {temperature}, {top_p}")
    vocab = model.config.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ValueError(f"generate: prompt token ids must lie in [0, {vocab})")


@torch.inference_mode()
def generate(model: CWM, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             seed: int | None = None, return_logprobs: bool = False
             ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New tokens for each prompt (a stop token, if hit, is included and ends that row).

    ``temperature`` 0 is greedy. ``seed`` makes sampling reproducible. With ``return_logprobs``
    also returns each new token's log-probability (see :func:`sample`).
    """
    validate(model, prompts, max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids, doc, positions = left_pad(prompts, pad_id=0, device=device)
        batch, width = ids.shape
        cache = KVCache(model.config, batch, width + max_new_tokens, device,
                        next(model.parameters()).dtype)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        logits = model(ids, doc, positions, cache=cache, last_only=True)[:, -1]  # (B, V)
        next_pos = positions[:, -1] + 1  # (B,)
        stops = set(stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        done = [False] * batch
        for step in range(max_new_tokens):
            tokens, logprobs = sample(logits, temperature, top_p, generator)
            for row, (tok, lp) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                if not done[row]:
                    out[row].append(tok)
                    lps[row].append(lp)
                    done[row] = tok in stops
            if all(done) or step == max_new_tokens - 1:
                break
            real = torch.full((batch, 1), REAL_DOC, dtype=torch.long, device=device)
            logits = model(tokens[:, None], real, next_pos[:, None], cache=cache)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return (out, lps) if return_logprobs else out
