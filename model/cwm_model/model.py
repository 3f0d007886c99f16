"""The CWM decoder in one file: RMSNorm, RoPE, attention, SwiGLU, block, model, KV cache.

Architecture from the CWM report and github.com/facebookresearch/cwm (``cwm/model/transformer.py``):
a pre-norm Llama-style decoder with grouped-query attention, Llama-3-scaled RoPE, local
(sliding-window) and global layers interleaved (layer ``i`` global when ``i % global_every == 0``
or it is the last layer) and untied input/output embeddings. Module names follow CWM's
(``tok_embeddings``, ``attention.wq/wk/wv/wo``, ``feed_forward.w1/w2/w3``, ``output``);
:mod:`cwm_model.hf_export` renames them for Hugging Face.

Packed training sequences carry ``doc_ids``: a token attends only to earlier tokens of the same
document, within its layer's window. How that mask is applied is decided in one place,
:func:`make_attention`: PyTorch SDPA with explicit boolean masks (CPU, and decoding with a cache),
or FlexAttention with block-sparse masks on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cwm_model.config import ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin: (B, T, 1, head_dim)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


# --------------------------------------------------------------------------------------- RoPE
def rope_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) with Llama-3 scaling: long wavelengths are slowed by
    ``rope_factor``, short ones kept, the band between interpolated smoothly."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)
    if config.rope_factor == 1.0:
        return inv_freq
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_ctx = config.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / config.rope_factor, inv_freq)
    blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
    """cos and sign-folded sin tables for ``positions`` (B, T), in the rotate-half layout
    Hugging Face uses: pairs are (i, i + hd/2)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos = torch.cat((cos, cos), dim=-1)[:, :, None]  # (B, T, 1, hd)
    sin = torch.cat((-sin, sin), dim=-1)[:, :, None]  # (B, T, 1, hd)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate each (i, i + hd/2) pair of ``x`` (B, T, H, hd) by its position's angle:
    ``x * cos + rotate_half(x) * sin``, with rotate_half's sign folded into the sin table so the
    rotation is a single ``roll``."""
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# --------------------------------------------------------------------------- attention adapter
def visibility_mask(q_doc: torch.Tensor, k_doc: torch.Tensor, q_idx: torch.Tensor,
                    k_idx: torch.Tensor, window: int) -> torch.Tensor:
    """True where query i may attend key j: same document, j <= i, and i - j < window."""
    rel = q_idx[:, None] - k_idx[None, :]  # (T, S)
    causal = (rel >= 0) & (rel < window)
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]  # (B, T, S)
    return (same_doc & causal)[:, None]  # (B, 1, T, S)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     doc: torch.Tensor | None, window: int) -> torch.Tensor:
    """Sliding-window attention in O(T * window) instead of O(T^2), for full-sequence passes.

    Queries are cut into blocks of ``window``; block i attends only keys of blocks i-1 and i,
    the only ones its window can reach, under an explicit mask. The padding added to make T a
    multiple of the window only ever sees padding, so no row is empty.
    """
    B, H, T, D = q.shape
    n, pad = -(-T // window), -T % window
    W = window

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, D) -> (B, n, h, W, D)
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(B, x.shape[1], n, W, D).transpose(1, 2)

    def with_previous(x: torch.Tensor, dim: int) -> torch.Tensor:  # block i-1 then block i
        prev = torch.cat([torch.full_like(x.narrow(1, 0, 1), -1), x.narrow(1, 0, n - 1)], dim=1)
        return torch.cat([prev, x], dim=dim)

    qb, kb, vb = blocks(q), with_previous(blocks(k), 3), with_previous(blocks(v), 3)
    starts = torch.arange(n, device=q.device)[:, None, None] * W  # (n, 1, 1)
    q_pos = starts + torch.arange(W, device=q.device)[None, :, None]  # (n, W, 1)
    k_pos = starts - W + torch.arange(2 * W, device=q.device)[None, None, :]  # (n, 1, 2W)
    rel = q_pos - k_pos
    mask = ((rel >= 0) & (rel < W) & (k_pos >= 0))[None, :, None]  # (1, n, 1, W, 2W)
    if doc is not None:
        d = F.pad(doc, (0, pad), value=-1).view(B, n, W)  # padding is a document of its own
        same = d[:, :, :, None] == with_previous(d, 2)[:, :, None, :]  # (B, n, W, 2W)
        mask = mask & same[:, :, None]  # (B, n, 1, W, 2W)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, H, n * W, D)[:, :, :T]  # (B, H, T, D)


def sdpa_attention(q_doc: torch.Tensor | None, k_doc: torch.Tensor | None, q_idx: torch.Tensor,
                   k_idx: torch.Tensor, windows: set[int]) -> Attend:
    """SDPA with explicit boolean masks, one per window size, shared by all layers of that size.

    In a full-sequence pass, a window covering the whole single-document sequence needs no
    mask (PyTorch's causal kernel), and a window of at most a quarter of the sequence goes
    through :func:`banded_attention` (measured: 5x faster forward + backward at 2048 tokens and
    window 128, slower at two blocks). Decoding with a cache masks the cached keys explicitly.
    """
    full_pass = q_idx.numel() == k_idx.numel()
    T = q_idx.numel()
    masks: dict[int, torch.Tensor | None] = {}
    banded: set[int] = set()
    for window in windows:
        if full_pass and 4 * window <= T:
            banded.add(window)
        elif q_doc is None and full_pass and window >= T:
            masks[window] = None
        else:
            qd = q_doc if q_doc is not None else torch.zeros_like(q_idx)[None]
            kd = k_doc if k_doc is not None else torch.zeros_like(k_idx)[None]
            masks[window] = visibility_mask(qd, kd, q_idx, k_idx, window)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        if window in banded:
            return banded_attention(q, k, v, q_doc, window)
        mask = masks[window]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=True)

    return attend


_compiled_flex: Callable | None = None


def flex_attention_fn(compiled: bool) -> Callable:
    """FlexAttention, compiled once per process on a GPU (uncompiled it is only a reference)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415 (pulls in torch's compiler stack, ~1.3 s; only FlexAttention runs use it)

    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def window_mask(window: int, doc: torch.Tensor | None) -> Callable:
    """FlexAttention's mask_mod for one window: causal, within the window, same document.

    The window is a closure variable, never a default argument: FlexAttention caches what it
    traced from a mask_mod's code, and on CUDA (PyTorch 2.11) a default argument was not part of
    that key, so every window silently got the first window's mask."""
    def mask_mod(b, h, q, k):  # noqa: ANN001, ANN202 - FlexAttention's signature
        visible = (k <= q) & (q - k < window)
        return visible & (doc[b, q] == doc[b, k]) if doc is not None else visible
    return mask_mod


def flex_attention(doc: torch.Tensor | None, length: int, windows: set[int],
                   device: torch.device) -> Attend:
    """Block-sparse FlexAttention: fully masked blocks (other documents, beyond the window) are
    skipped rather than computed, which is what makes 131k-token global layers affordable."""
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415 (pulls in torch's compiler stack, ~1.3 s; only FlexAttention runs use it)

    batch = doc.shape[0] if doc is not None else 1
    compiled = device.type == "cuda"
    block_masks = {}
    for window in windows:
        # compiled mask construction never materialises the (T, T) mask: needed at 131k tokens
        block_masks[window] = create_block_mask(window_mask(window, doc), batch, None, length,
                                                length, device=device, _compile=compiled)
    run = flex_attention_fn(compiled)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        return run(q, k, v, block_mask=block_masks[window], enable_gqa=True)

    return attend


def make_attention(backend: str, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None,
                   q_idx: torch.Tensor, k_idx: torch.Tensor, windows: set[int],
                   device: torch.device) -> Attend:
    """The one place that picks the attention implementation.

    ``auto`` uses FlexAttention on CUDA for full-sequence passes (training, prefill without a
    cache) and SDPA with explicit masks otherwise; ``sdpa`` / ``flex`` force one.
    """
    full_pass = q_idx.numel() == k_idx.numel()
    if backend == "auto":
        backend = "flex" if device.type == "cuda" and full_pass else "sdpa"
    if backend == "flex":
        if not full_pass:
            raise ValueError("attention_backend 'flex' cannot decode with a KV cache; use 'auto'")
        return flex_attention(q_doc, q_idx.numel(), windows, device)
    if backend == "sdpa":
        return sdpa_attention(q_doc, k_doc, q_idx, k_idx, windows)
    raise ValueError(f"attention_backend must be auto, sdpa or flex, got {backend!r}")


# ------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``max_len`` positions."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.doc = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0

    def extend_docs(self, doc: torch.Tensor) -> torch.Tensor:
        """Record the document ids (B, T) of the incoming tokens; return those of all keys."""
        end = self.length + doc.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.doc[:, self.length:end] = doc
        return self.doc[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this step's k, v (B, n_kv, T, hd); return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --------------------------------------------------------------------------------- the modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the input dtype (as Llama / Hugging Face); written out because
        # F.rms_norm measured ~20% slower forward + backward on the CPU
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention; ``window`` is this layer's local or global span. Its block calls
    :meth:`qkv` and :meth:`project` around the attention kernel (see :class:`Block`)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.window = layer, config.window(layer)
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        """Queries and keys (RoPE applied) and values, (B, heads, T, hd) each."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.wq(x).view(B, T, nh, hd), rope)  # (B, T, nh, hd)
        k = apply_rope(self.wk(x).view(B, T, nkv, hd), rope)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, nkv, hd)  # (B, T, nkv, hd)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """The attention output (B, nh, T, hd) back to the residual stream (B, T, dim)."""
        B, _, T, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``. Separate w1 / w3 matmuls measured as fast as one fused
    matmul on the CPU, and their backward needs no concatenation of activation gradients."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, ffn) -> (B, T, dim)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``.

    The work around the attention kernel is two functions, :meth:`attention_inputs` and
    :meth:`attention_outputs`, so that :meth:`CWM.compile_for_training` can compile each whole
    (norm, projections, RoPE; output projection, residual adds, norm, SwiGLU) while the
    attention, whose masks change every batch, stays outside the compiled code."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.compiled_parts: tuple[Callable, Callable] | None = None

    def attention_inputs(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        return self.attention.qkv(self.attention_norm(x), rope)

    def attention_outputs(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.project(out)
        return x + self.feed_forward(self.ffn_norm(x))

    def forward(self, x: torch.Tensor, rope: Rope, attend: Attend,
                cache: KVCache | None = None) -> torch.Tensor:
        inputs, outputs = self.compiled_parts or (self.attention_inputs, self.attention_outputs)
        q, k, v = inputs(x, rope)
        if cache is not None:
            k, v = cache.update(self.attention.layer, k, v)  # (B, nkv, S, hd)
        return outputs(x, attend(q, k, v, self.attention.window))


class CWM(nn.Module):
    """The decoder: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.attention_backend = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual-branch outputs scaled by 1/sqrt(2 * layers)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, std=std)

    def compile_for_training(self, scope: str = "blocks") -> None:
        """Fuse the memory-bound work around the matmuls with ``torch.compile`` (for the GPU,
        where each elementwise op is otherwise a full pass over the activations; the attention
        is compiled already, FlexAttention). ``blocks``: each block's work before and after its
        attention kernel, whole (norms, RoPE, residual adds, SwiGLU, projections); one compiled
        graph serves every block. ``pointwise``: only each RMSNorm and SwiGLU, the earlier and
        smaller scope, kept for comparison (benchmarks/train_throughput.py --compile-scope).
        Parameters and checkpoints are unchanged. Compiling again is a no-op."""
        if scope not in ("blocks", "pointwise"):
            raise ValueError(f"compile scope must be blocks or pointwise, got {scope!r}")
        if scope == "blocks":   # the blocks, and the final norm outside them
            targets = [*self.layers, self.norm]
        else:
            targets = [m for m in self.modules() if isinstance(m, (RMSNorm, FeedForward))]
        for module in targets:
            if getattr(module, "_compiled", False):
                continue
            if isinstance(module, Block):
                module.compiled_parts = (torch.compile(module.attention_inputs, dynamic=False),
                                         torch.compile(module.attention_outputs, dynamic=False))
            else:
                module.compile(dynamic=False)
            module._compiled = True

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = bool(enabled)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for ``input_ids`` (B, T).

        ``doc_ids`` (B, T): equal ids mark one document; tokens never attend across documents.
        ``positions`` (B, T): RoPE positions (restarting per document when packing); default
        ``0..T-1``, offset by what ``cache`` already holds. With ``cache`` the new keys/values
        are appended to it. ``last_only`` returns logits for the last position only (B, 1, V).
        """
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        q_idx = torch.arange(start, start + T, device=device)
        if positions is None:
            positions = q_idx.expand(B, T)
        k_doc, k_idx = doc_ids, q_idx
        if cache is not None:
            doc_ids = doc_ids if doc_ids is not None else torch.zeros_like(input_ids)
            k_doc, k_idx = cache.extend_docs(doc_ids), torch.arange(start + T, device=device)
        windows = {self.config.window(layer) for layer in range(len(self.layers))}
        attend = make_attention(self.attention_backend, doc_ids, k_doc, q_idx, k_idx, windows,
                                device)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        rope = rope_cos_sin(rope_frequencies(self.config, device), positions, x.dtype)
        for block in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, attend, cache, use_reentrant=False)
            else:
                x = block(x, rope, attend, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))  # (B, T, V)
