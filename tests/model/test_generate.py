"""Generation with a KV cache against full recomputation, sampling, stop tokens, log-probs."""

from __future__ import annotations

import pytest
import torch

from cwm_model.generate import generate
from cwm_model.model import CWM
from cwm_model.presets import get_preset

PROMPTS = [[5, 9, 300, 41, 7, 7, 120, 3, 64, 18, 2, 99], [42, 43], [600, 1, 2, 3, 4]]


@pytest.fixture(scope="module")
def model() -> CWM:
    torch.manual_seed(0)
    # float64 so that greedy ties cannot differ between the two computations by rounding
    return CWM(get_preset("debug")).double().eval()


def recompute_greedy(model: CWM, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_kv_cache_matches_full_recomputation_for_a_ragged_batch(model):
    # 12 + 20 tokens exceed the local window (8): the cache must apply windows and padding right
    out = generate(model, PROMPTS, max_new_tokens=20)
    assert out == [recompute_greedy(model, p, 20) for p in PROMPTS]


def test_stop_token_is_included_and_ends_only_its_row(model):
    full = generate(model, PROMPTS, max_new_tokens=10)
    stop = full[1][3]
    out = generate(model, PROMPTS, max_new_tokens=10, stop_ids=[stop])
    assert out[1] == full[1][:full[1].index(stop) + 1]
    for row in (0, 2):
        expected = full[row][:full[row].index(stop) + 1] if stop in full[row] else full[row]
        assert out[row] == expected


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy(model):
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    assert a == b and a != c
    nucleus = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus == generate(model, PROMPTS, max_new_tokens=8)


def test_logprobs_equal_the_models_log_softmax(model):
    out, logprobs = generate(model, PROMPTS[:2], max_new_tokens=6, temperature=0.7, seed=3,
                             return_logprobs=True)
    for prompt, new, lps in zip(PROMPTS, out, logprobs):
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            ref = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1] / 0.7, dim=-1)
        expected = ref.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-5)


def test_generate_restores_training_mode_and_rejects_bad_arguments(model):
    model.train()
    generate(model, [[1, 2]], max_new_tokens=1)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[10_000]], max_new_tokens=2)
