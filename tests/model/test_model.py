"""The decoder: shapes, causality, local/global windows, document masking, attention backends,
presets and parameter counts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cwm_model.config import ModelConfig
from cwm_model.model import (
    CWM,
    banded_attention,
    make_attention,
    rope_cos_sin,
    rope_frequencies,
    visibility_mask,
)
from cwm_model.presets import PRESETS, count_parameters, get_preset


def make(seed: int = 0, **overrides) -> CWM:
    torch.manual_seed(seed)
    return CWM(get_preset("debug", **overrides)).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 768, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_dtype():
    model = make()
    x = tokens(3, 17)
    logits = model(x)
    assert logits.shape == (3, 17, 768) and logits.dtype == torch.float32
    assert model(x, last_only=True).shape == (3, 1, 768)
    assert torch.allclose(model(x, last_only=True)[:, 0], logits[:, -1], atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    x = tokens(1, 30)
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 7) % 768
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :20], b[0, :20], atol=1e-6)
    assert not torch.allclose(a[0, 20:], b[0, 20:], atol=1e-3)


def influence_of_first_position(model: CWM, layer: int, length: int) -> torch.Tensor:
    """Max change of each position's output of block ``layer`` when only position 0's input
    changes."""
    x = torch.randn(1, length, model.config.dim, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 0] += 1.0
    idx = torch.arange(length)
    windows = {block.attention.window for block in model.layers}
    attend = make_attention("sdpa", None, None, idx, idx, windows, x.device)
    rope = rope_cos_sin(rope_frequencies(model.config), idx[None], x.dtype)
    block = model.layers[layer]
    with torch.no_grad():
        return (block(x, rope, attend) - block(y, rope, attend)).abs().amax(dim=-1)[0]


def test_local_layer_cannot_see_past_its_window_global_layer_can():
    model = make()  # debug: layers global, local, local, global; local window 8
    assert [model.config.is_global(i) for i in range(4)] == [True, False, False, True]
    local, glob = influence_of_first_position(model, 1, 20), influence_of_first_position(model, 0, 20)
    # position p sees position 0 iff p - 0 < window: the window counts the token itself
    assert (local[:8] > 1e-4).all()
    assert (local[8:] == 0).all()
    assert (glob > 1e-4).all()


def test_interleaving_follows_cwm_pattern():
    config = get_preset("cwm-32b")
    kinds = "".join("G" if config.is_global(i) else "L" for i in range(config.n_layers))
    assert kinds == "GLLL" * 15 + "GLLG"  # 3 local : 1 global, last layer forced global (CWM)
    model = make()
    assert [b.attention.window for b in model.layers] == [256, 8, 8, 256]


def test_packed_documents_do_not_see_each_other():
    model = make()
    # 40 tokens: local layers (window 8) take the banded path, each document alone does not
    a, b = tokens(1, 11, seed=2)[0], tokens(1, 29, seed=3)[0]
    packed = torch.cat([a, b])[None]
    doc_ids = torch.tensor([[0] * 11 + [1] * 29])
    positions = torch.cat([torch.arange(11), torch.arange(29)])[None]
    with torch.no_grad():
        together = model(packed, doc_ids, positions)[0]
        alone_a, alone_b = model(a[None])[0], model(b[None])[0]
        other = torch.cat([tokens(1, 11, seed=9)[0], b])[None]
        changed_a = model(other, doc_ids, positions)[0]
    assert torch.allclose(together[:11], alone_a, atol=1e-5)
    assert torch.allclose(together[11:], alone_b, atol=1e-5)
    assert torch.allclose(changed_a[11:], together[11:], atol=1e-6)


@pytest.mark.parametrize("length,window,packed", [(300, 64, False), (300, 64, True), (37, 8, True)])
def test_banded_local_attention_equals_the_masked_computation(length, window, packed):
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, heads, length, 16, generator=gen) for heads in (4, 2, 2))
    doc = (torch.arange(length)[None] >= torch.tensor([[length // 3], [length // 2]])).long()
    doc = doc if packed else None
    idx = torch.arange(length)
    docs = doc if packed else torch.zeros(1, length, dtype=torch.long)
    mask = visibility_mask(docs, docs, idx, idx, window)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(banded_attention(q, k, v, doc, window), reference, atol=1e-5)


def test_flex_attention_matches_sdpa_with_documents_and_windows():
    model = make()
    x = tokens(2, 40)
    doc_ids = torch.tensor([[0] * 15 + [1] * 25, [3] * 40])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model(x, doc_ids)
        model.attention_backend = "flex"
        flex = model(x, doc_ids)
    assert torch.allclose(reference, flex, atol=1e-5)


def test_unknown_attention_backend_is_rejected():
    model = make()
    model.attention_backend = "xformers"
    with pytest.raises(ValueError, match="attention_backend"):
        model(tokens(1, 4))


def test_activation_checkpointing_gives_the_same_gradients():
    x = tokens(2, 24)
    grads = []
    for enabled in (False, True):
        model = make().train()
        model.set_activation_checkpointing(enabled)
        model(x).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_rope_scaling_is_identity_at_factor_one_and_slows_long_wavelengths():
    plain = rope_frequencies(get_preset("debug"))
    scaled = rope_frequencies(get_preset("debug", rope_factor=16.0, rope_original_context=64))
    assert torch.equal(plain, 1.0 / 10_000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert scaled[0] == plain[0]  # shortest wavelength untouched
    assert torch.isclose(scaled[-1], plain[-1] / 16)  # longest slowed by the factor


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    config = get_preset(name)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_parameter_counts():
    assert count_parameters(get_preset("debug")) < 1_000_000
    assert 9_000_000 <= count_parameters(get_preset("tiny")) <= 11_000_000
    assert 115_000_000 <= count_parameters(get_preset("small")) <= 135_000_000
    assert 32_500_000_000 <= count_parameters(get_preset("cwm-32b")) <= 32_700_000_000


def test_overrides_accept_camel_case_and_name_bad_fields():
    assert get_preset("tiny", nLayers=4, localWindow=64).n_layers == 4
    with pytest.raises(ValueError, match="nLayer"):
        get_preset("tiny", nLayer=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        get_preset("debug", n_kv_heads=3)
    with pytest.raises(ValueError, match="local_window"):
        get_preset("debug", local_window=1000)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("70b")


def test_model_info_cli(capsys):
    from cwm_model.cli import main

    assert main(["model", "info", "cwm-32b"]) == 0
    out = capsys.readouterr().out
    count = int(out.split(":")[1].split("parameters")[0].replace(",", ""))
    assert 32_500_000_000 <= count <= 32_700_000_000


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "pointwise"])
def test_compiled_for_training_equals_eager_with_one_graph_for_all_blocks(scope):
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    # Windows that all reach back over the whole sequence: every layer's attention output has
    # the same layout (the CPU's banded local attention returns other strides, which compile
    # one more graph).
    eager = CWM(get_preset("debug", local_window=128, max_seq_len=128))
    eager.attention_backend = "sdpa"
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()   # what earlier tests compiled (the same module code) is forgotten
    compiled.compile_for_training(scope)
    compiled.compile_for_training(scope)   # again: a no-op
    x = torch.randint(0, 768, (2, 128))
    doc_ids = torch.cat([torch.zeros(2, 50), torch.ones(2, 78)], dim=1).long()
    counters.clear()
    grads = []
    for model in (eager, compiled):
        for _ in range(2):   # the second call reuses what the first compiled
            model.zero_grad()
            logits = model(x, doc_ids)
            logits.logsumexp(-1).mean().backward()
        grads.append((logits.detach(), model.output.weight.grad, model.layers[1].attention.wq.weight.grad,
                      model.layers[2].feed_forward.w1.weight.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # blocks: inputs and outputs of a block, and the final norm; pointwise: RMSNorm and SwiGLU
    assert counters["stats"]["unique_graphs"] == (3 if scope == "blocks" else 2)
    assert sum(counters["recompiles"].values()) == 0
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.gpu
def test_gpu_fast_path_matches_sdpa_forward_and_backward():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = CWM(get_preset("debug", local_window=128, max_seq_len=512)).cuda()
    x = torch.randint(0, 768, (2, 512), device="cuda")
    doc_ids = torch.cat([torch.zeros(2, 200), torch.ones(2, 312)], dim=1).long().cuda()
    results = []
    keys = list(model.state_dict())
    # auto = compiled FlexAttention on CUDA; then with each block compiled around it too
    for backend, compiled in (("sdpa", False), ("auto", False), ("auto", True)):
        model.zero_grad()
        model.attention_backend = backend
        if compiled:
            model.compile_for_training()
        logits = model(x, doc_ids)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), model.output.weight.grad.clone()))
    for other in results[1:]:
        assert torch.allclose(results[0][0], other[0], atol=2e-3)
        assert torch.allclose(results[0][1], other[1], atol=2e-3)
    assert list(model.state_dict()) == keys  # checkpoints unchanged by compilation
