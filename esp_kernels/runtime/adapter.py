"""The model-adapter protocol: the only model-specific code the runtime calls.

The engine owns everything ESP (striping, the ring, retention, multi-master decode, migration,
request state); a model family plugs in through one object with the attributes and methods
below, all operating on packed tokens (no batch dimension, no padding). Another family is one
file implementing them (see llama.py).

Attributes
    num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size, vocab_size: ints
    dtype, device: of the weights, activations and KV cache
    softmax_scale: float, the attention's scale (e.g. head_dim ** -0.5)
    eos_token_ids: tuple of ints ending a request (may be empty)
    max_len: int or None, the longest sequence the adapter serves exactly (a sliding-window
        model is exact up to its window: attention here is full causal)

Methods (T tokens, tensors on `device`)
    embed(tokens int64 [T]) -> h [T, hidden]: the residual stream entering layer 0
    positions(positions int64 [T], lengths int64 [T]) -> pos: whatever the layers need to
        place each token (RoPE cos/sin), computed once per batch and passed to every layer;
        positions are global token positions within each request, lengths the request's
        length when the token's K/V is computed (prefill length, or position + 1 in decode)
    attention_in(layer, h [T, hidden], pos) -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]:
        everything before attention (norm, projections, rotary embedding)
    attention_out(layer, h [T, hidden], attn [T, Hq, D]) -> h [T, hidden]: everything after
        it (output projection, residual, MLP), the new residual stream
    logits(h [n, hidden]) -> float32 [n, vocab]: final norm and LM head of the rows sampled

The engine calls them from several threads at once (virtual instances share one adapter), so
they must not mutate shared state.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelAdapter(Protocol):
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    softmax_scale: float
    eos_token_ids: tuple
    max_len: int | None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def positions(self, positions: torch.Tensor, lengths: torch.Tensor): ...

    def attention_in(self, layer: int, h: torch.Tensor, pos) -> tuple: ...

    def attention_out(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...
