"""decode_partial: attention of one query token per request over this instance's paged KV shard,
returned as a partial state (o fp32, lse fp32 natural log) for the master to merge.

CUDA tensors use the compiled split-KV kernel (csrc/decode/decode_partial.cu); the CPU path
gathers each request's K/V and runs the reference. A request with no tokens here gets (0, -inf).
"""

from __future__ import annotations

import math

import torch

from .. import _core
from .._checks import HALF_DTYPES, FLOAT_DTYPES, check_tensor
from ..reference import attention


def num_splits_for(batch: int, num_kv_heads: int, max_len: int, num_sms: int) -> int:
    """KV splits per request: enough CTAs for about two waves on the GPU, each split keeping
    at least 256 tokens so the per-split merge stays a small fraction of the work."""
    if max_len <= 0:
        return 1
    ctas = max(1, batch * num_kv_heads)
    want = math.ceil(2 * num_sms / ctas)
    return int(max(1, min(want, math.ceil(max_len / 256), 64)))


def _partial_torch(q, k_cache, v_cache, block_table, kv_lens, softmax_scale, o, lse):
    page_size = k_cache.shape[1]
    lens = kv_lens.tolist()
    bt = block_table.cpu()
    slots = []
    for b, n in enumerate(lens):
        i = torch.arange(n)
        slots.append(bt[b, i // page_size].long() * page_size + i % page_size)
    flat = torch.cat(slots).to(q.device) if slots else torch.empty(0, dtype=torch.long)
    rows_k = k_cache.reshape(-1, k_cache.shape[2], k_cache.shape[3])[flat]
    rows_v = v_cache.reshape(-1, v_cache.shape[2], v_cache.shape[3])[flat]
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(q.device)
    out, l = attention(q.float(), rows_k.float(), rows_v.float(), cu_q, cu_k, causal=False,
                       softmax_scale=softmax_scale)
    o.copy_(out)
    lse.copy_(l)


def decode_partial(q, k_cache, v_cache, block_table, kv_lens, *, softmax_scale=None,
                   num_splits=None, o=None, lse=None, backend="auto"):
    """Partial decode attention over a paged shard.

    Args:
        q: [B, Hq, D] (float16/bfloat16 on CUDA; any float dtype on the CPU path).
        k_cache, v_cache: [num_pages, page_size, Hkv, D] one layer of a PagedKVCache.
        block_table: int32 [B, max_pages]; kv_lens: int32 [B] (tokens of each request here).
        num_splits: KV splits per request (default: `num_splits_for`); fixed per launch so the
            op is CUDA-graph capturable for a fixed plan.
        o, lse: optional outputs, float32 [B, Hq, D] and [B, Hq] (strided views allowed).
    Returns (o, lse).
    """
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k_cache, "k_cache", ndim=4)
    check_tensor(v_cache, "v_cache", ndim=4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "differ")
    B, Hq, D = q.shape
    if k_cache.shape[3] != D:
        raise ValueError(f"head dim of q ({D}) and k_cache ({k_cache.shape[3]}) differ")
    if Hq % k_cache.shape[2]:
        raise ValueError(f"q has {Hq} heads, not a multiple of the cache's {k_cache.shape[2]}")
    for name, t in (("block_table", block_table), ("kv_lens", kv_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if block_table.dim() != 2 or block_table.shape[0] != B or kv_lens.shape != (B,):
        raise ValueError(f"block_table must be [B={B}, max_pages] and kv_lens [B], got "
                         f"{tuple(block_table.shape)} and {tuple(kv_lens.shape)}")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if o is None:
        o = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    if q.device.type == "cuda" and backend != "torch":
        if q.dtype not in HALF_DTYPES or k_cache.dtype != q.dtype:
            raise TypeError(f"the CUDA decode kernel needs float16/bfloat16 q and cache of the "
                            f"same dtype, got {q.dtype} and {k_cache.dtype}")
        C = _core.require_compiled("decode_partial")
        if num_splits is None:
            max_len = k_cache.shape[1] * block_table.shape[1]
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = num_splits_for(B, k_cache.shape[2], max_len, sms)
        ws = torch.empty(C.decode_workspace_elems(B, Hq, D, int(num_splits)),
                         dtype=torch.float32, device=q.device)
        d = _core.desc
        C.decode_partial(d(q), d(k_cache), d(v_cache), d(block_table), d(kv_lens), d(o), d(lse),
                         d(ws), int(num_splits), scale, q.device.index,
                         _core.stream_handle(q.device))
    else:
        _partial_torch(q, k_cache, v_cache, block_table, kv_lens, scale, o, lse)
    return o, lse
