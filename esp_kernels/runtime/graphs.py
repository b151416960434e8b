"""CUDA graphs of a decode step's dense work (everything but attention), per padded batch size.

A decode step on a master runs, per layer, the adapter's `attention_in` and `attention_out`
around the multi-master attention: ~20 torch launches a layer whose host time (~420 us a layer
on the H100 machine's host, Llama-3-8B shape) exceeded the GPU's (~300 us at 16 requests), so
the step was host-bound at twice the cost model's time. Here the dense work between two
attentions is one graph: graph 0 = embed + attention_in(0); graph l = attention_out(l - 1) +
attention_in(l); graph L = attention_out(L - 1) + logits. Attention itself stays eager (it
exchanges messages with other instances and its plan changes every step): the piecewise
scheme of vLLM's decode graphs.

Batches are padded to a bucket (`bucket`) so that a serving run captures a few sizes, not one
per batch size; padded rows compute on zeros and are never read. Rows are independent in every
dense op, so the first B rows are what eager code computes for B rows, up to the GEMM kernel a
padded shape selects (bf16: within rounding). RoPE tables are computed eagerly each step (a
dynamic-scaling RoPE reads lengths on the host) and copied into the graphs' inputs: every
tensor of the adapter's `positions()` result must have the token dimension first.

One `DecodeGraphs` per engine; its graphs share one memory pool and a step replays one bucket's
graphs in the order they were captured (torch's condition for sharing a pool): a graph's output
memory can be reused by a later capture only once no later graph reads it, and the q/k/v and
logits the eager code reads stay referenced for the bucket's lifetime.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


def bucket(rows: int) -> int:
    """The padded batch size of `rows` masters' rows: powers of two up to 32, then multiples of
    32 (a decode GEMM reads its weights once whatever M <= 128: padding is free on the GPU)."""
    if rows <= 32:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 32) * 32


class _Bucket:
    """The captured graphs of one padded batch size and their static inputs and outputs."""

    def __init__(self, adapter, rows: int, pos_example, pool):
        ad, dev = adapter, adapter.device
        self.ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.attn = torch.zeros(rows, ad.num_q_heads, ad.head_dim, dtype=ad.dtype, device=dev)
        leaves, spec = pytree.tree_flatten(pos_example)
        self.pos_leaves = [torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
                           for t in leaves]
        pos = pytree.tree_unflatten(self.pos_leaves, spec)
        L = ad.num_layers

        def piece(i, h):
            """Graph i's work: (h, q, k, v) entering attention i, or the logits (i = L)."""
            if i == 0:
                h = ad.embed(self.ids)
            else:
                h = ad.attention_out(i - 1, h, self.attn)
            if i == L:
                return ad.logits(h)
            return (h,) + tuple(ad.attention_in(i, h, pos))

        # Warm up once eagerly on a side stream (cuBLAS handles and workspaces, lazy inits),
        # then capture every piece on it. capture_begin/end directly: torch.cuda.graph's context
        # also synchronizes, collects garbage and empties the allocator's cache per capture.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        self.graphs, self.qkv = [], []
        with torch.cuda.stream(side):
            h = None
            for i in range(L + 1):
                out = piece(i, h)
                h = out[0] if i < L else None
            h = None
            for i in range(L + 1):
                g = torch.cuda.CUDAGraph()
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                out = piece(i, h)
                g.capture_end()
                self.graphs.append(g)
                if i < L:
                    h = out[0]
                    self.qkv.append(out[1:])
                else:
                    self.logits = out
        torch.cuda.current_stream(dev).wait_stream(side)


class DecodeGraphs:
    """The decode-step graphs of one engine (see the module docstring)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._pool = torch.cuda.graph_pool_handle()
        self._buckets: dict[int, _Bucket] = {}

    def prepare(self, rows: int, tokens: torch.Tensor, pos) -> _Bucket:
        """The bucket of `rows` masters' rows with this step's inputs copied in: tokens int64
        [rows] (each request's last token), pos the adapter's positions() of the rows."""
        size = bucket(rows)
        b = self._buckets.get(size)
        if b is None:
            b = self._buckets[size] = _Bucket(self.adapter, size, pos, self._pool)
        b.ids[:rows].copy_(tokens)
        for static, t in zip(b.pos_leaves, pytree.tree_leaves(pos)):
            static[:rows].copy_(t)
        return b
