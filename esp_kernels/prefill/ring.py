"""Striped ring-attention prefill over an ESP group (DESIGN.md §1, §3).

Global token g of a request lives on group rank g mod P at local index g div P. Queries stay;
KV blocks travel: at step s rank i holds the block that originated on rank j = (i - s) mod P,
computes its queries against it (merging into an fp32 running state inside the step kernel) and
forwards it to rank i+1 while the next block arrives from rank i-1.

Messages: K and V of a block travel as ONE contiguous message ([K | V] of exactly the block's
tokens) through two persistent buffers allocated once per call (double buffering: receive into
one while computing on the other). The per-request layout of every block (tokens of each request
that rank j holds) is a pure function of (seqlens, j, P), known to every rank: it is computed once
before the loop into a [P, B+1] device table, so nothing but K and V needs to travel per step.

No host synchronization inside the loop: each step posts its exchange (on the group's
communication stream, after the compute stream), enqueues the step kernel, and makes the compute
stream wait on the exchange's event before the next step.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Sequence

import torch

from .._checks import FLOAT_DTYPES, as_int, check_gqa, check_tensor
from ..striping import stripe_lengths
from .step import resolve_backend, run_step


def _as_lengths(seqlens) -> list[int]:
    if isinstance(seqlens, torch.Tensor):
        if seqlens.dim() != 1 or seqlens.dtype.is_floating_point:
            raise TypeError("seqlens must be a 1-D integer tensor or a sequence of ints")
        seqlens = seqlens.tolist()
    return [as_int(L, f"seqlens[{i}]", minimum=0) for i, L in enumerate(seqlens)]


def _cumsum(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


_LAYOUTS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_LAYOUTS_MAX = 64
_LAYOUTS_LOCK = threading.Lock()  # virtual ranks share the cache from their threads


def _block_layout(lengths: tuple, P: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of every source rank's block, [P, B+1] int32 on `device`.

    Every layer of a prefill has the same batch, so the table is uploaded once and reused from a
    small LRU cache: a per-layer host-to-device copy (pageable, or a fresh pinned buffer) held the
    host until the queued work finished, a 17% gap between a world-of-1 ring and its kernel
    (GPU runs 4-5). The upload may have run on another rank's stream: the caller's current
    stream waits on its event (no host sync).
    """
    key = (lengths, P, device)
    with _LAYOUTS_LOCK:
        entry = _LAYOUTS.get(key)
        if entry is None:
            rows = [_cumsum(stripe_lengths(lengths, P, j)) for j in range(P)]
            table = torch.tensor(rows, dtype=torch.int32).to(device)
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            entry = _LAYOUTS[key] = (table, event)
            if len(_LAYOUTS) > _LAYOUTS_MAX:
                _LAYOUTS.popitem(last=False)
        else:
            _LAYOUTS.move_to_end(key)
    table, event = entry
    if event is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)
        # Used on this stream too: an eviction must not hand the block back before it is done.
        table.record_stream(stream)
    return table


def ring_prefill(q, k, v, seqlens, ring, retain=None, softmax_scale=None, *, causal=True,
                 backend="auto"):
    """Causal attention of a batch striped over the ESP group `ring`; call on every rank.

    Args:
        q: [Tq, Hq, D] this rank's query stripes, packed by request (request b contributes its
            tokens g with g mod P == rank, in increasing g).
        k, v: [Tq, Hkv, D] this rank's key/value stripes, same packing; Hq % Hkv == 0.
        seqlens: global length of every request (sequence of ints or 1-D integer tensor; host).
        ring: a Group (see esp_kernels.comm); its rank order defines the striping.
        retain: optional (RetentionPlan, PagedKVCache, layer): while each KV block passes this
            rank, the tokens the plan assigns to this instance are written into its cache
            (proactive scale-down; no extra communication). Instances are world ranks.
        softmax_scale: defaults to 1/sqrt(D).
        causal: causal mask over global positions (default True).
        backend: step kernel: "auto" (CUDA: fastest measured kernel; CPU: torch), "cuda",
            "triton", "torch".

    Returns:
        out [Tq, Hq, D] in q.dtype and lse [Tq, Hq] float32 (natural log), for this rank's
        query stripes.
    """
    lengths = _as_lengths(seqlens)
    P, me = ring.size, ring.rank
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=3, dtypes=FLOAT_DTYPES)
        if t.device != ring.device:
            raise ValueError(f"{name} is on {t.device} but the ring group communicates on "
                             f"{ring.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    check_gqa(q.shape[1], k.shape[1])
    local = [stripe_lengths(lengths, P, j) for j in range(P)]  # per source rank, per request
    totals = [sum(x) for x in local]
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] != totals[me]:
            raise ValueError(f"{name} has {t.shape[0]} tokens but rank {me} of {P} holds "
                             f"{totals[me]} tokens of seqlens (sum {sum(lengths)})")
    backend = resolve_backend(backend, q.device)
    Tq, Hq, D = q.shape
    if sum(lengths) == 0:  # every rank sees the same empty batch: nothing to exchange
        return q.new_zeros(q.shape), torch.full((0, Hq), -math.inf, device=q.device)
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)

    writer = None
    if retain is not None:
        from ..kvcache.retention import RetentionWriter

        writer = RetentionWriter.prepare(retain, lengths, ring, k)

    cu_all = _block_layout(tuple(lengths), P, q.device)
    cu_q = cu_all[me]
    max_q_len = max(local[me], default=0)

    row = Hkv * D
    t_max = max(totals)  # rank 0 holds the most tokens of every request
    bufs = [torch.empty(2 * t_max * row, dtype=k.dtype, device=q.device)
            for _ in range(2 if P > 1 else 1)]

    def message(buf, n_tokens):
        return buf[: 2 * n_tokens * row]

    def kv_views(buf, n_tokens):
        n = n_tokens * row
        return buf[:n].view(n_tokens, Hkv, D), buf[n:2 * n].view(n_tokens, Hkv, D)

    cur = bufs[0]
    kb, vb = kv_views(cur, totals[me])
    kb.copy_(k)
    vb.copy_(v)
    o_state = torch.empty(Tq, Hq, D, dtype=torch.float32, device=q.device)
    lse_state = torch.empty(Tq, Hq, dtype=torch.float32, device=q.device)
    nxt_rank, prv_rank = (me + 1) % P, (me - 1) % P

    for s in range(P):
        src = (me - s) % P
        work = None
        if s < P - 1:
            nxt = bufs[(s + 1) % 2]
            incoming = (me - s - 1) % P
            work = ring.exchange(sends=[(message(cur, totals[src]), nxt_rank)],
                                 recvs=[(message(nxt, totals[incoming]), prv_rank)])
        kb, vb = kv_views(cur, totals[src])
        run_step(q, kb, vb, cu_q, cu_all[src], max_q_len, o_state, lse_state, causal=causal,
                  mask_shift=0 if src <= me else -1, accumulate=s > 0, softmax_scale=scale,
                  backend=backend)
        if writer is not None:
            writer.write(src, message(cur, totals[src]).view(2, totals[src], row))
        if work is not None:
            work.wait()
            cur = nxt
    return o_state.to(q.dtype), lse_state
