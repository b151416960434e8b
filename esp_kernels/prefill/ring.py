"""Striped ring-attention prefill over an ESP group.

Global token g of a request lives on group rank g mod P at local index g div P. Queries stay;
KV blocks travel: at step s rank i holds the block that originated on rank j = (i - s) mod P,
computes its queries against it (merging into an fp32 running state inside the step kernel) and
forwards it to rank i+1 while the next block arrives from rank i-1.

Messages: K and V of a block travel as ONE contiguous message ([K | V] of exactly the block's
tokens) through two buffers (double buffering: receive into one while computing on the other).
The per-request layout of every block (tokens of each request that rank j holds) is a pure
function of (seqlens, j, P), known to every rank: it is computed once per batch into a [P, B+1]
device table, so nothing but K and V needs to travel per step.

`RingPrefillRunner` prepares one batch on one rank once (block layout, message buffers, the
retention writer with its reserved slots and row maps) and `run(q, k, v, layer)` runs a layer;
`esp.ring_prefill` is the one-call form, reusing the runner of its last batch per ring handle.

No host synchronization inside the loop: each step posts its exchange (on the group's
communication stream, after the compute stream), enqueues the step kernel, and makes the compute
stream wait on the exchange's event before the next step.
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from typing import Sequence

import torch

from .._checks import FLOAT_DTYPES, as_lengths, check_gqa, check_tensor
from ..comm.group import drive
from ..kvcache.cache import PagedKVCache
from ..kvcache.retention import RetentionPlan, RetentionWriter
from ..striping import stripe_lengths
from .step import resolve_backend, run_step, step_tiles, takes_tiles


def _cumsum(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


_LAYOUTS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_LAYOUTS_MAX = 64
_LAYOUTS_LOCK = threading.Lock()  # virtual ranks share the cache from their threads


def _block_layout(lengths: tuple, P: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of every source rank's block, [P, B+1] int32 on `device` (`_uploaded_once`)."""
    return _uploaded_once(("layout", lengths, P, device), lambda: torch.tensor(
        [_cumsum(stripe_lengths(lengths, P, j)) for j in range(P)], dtype=torch.int32))


def _tile_table(lengths: tuple, Hq: int, Hkv: int, device: torch.device, backend: str):
    """The step kernel's table of this rank's query tiles (`step_tiles`; None where the backend
    takes none) on `device`, from `_uploaded_once`."""
    if not takes_tiles(backend):
        return None
    return _uploaded_once(("tiles", lengths, Hq, Hkv, device),
                          lambda: step_tiles(lengths, Hq, Hkv, "cpu", backend))


def _uploaded_once(key: tuple, build) -> torch.Tensor:
    """build() (a CPU tensor) copied to key[-1], the device, once per key.

    Every layer of a prefill has the same batch, so its tables are uploaded once and reused from
    a small LRU cache (shared by the runners of one batch on every virtual rank): a per-layer
    host-to-device copy (pageable, or a fresh pinned buffer) held the host until the queued work
    finished, a 17% gap between a world-of-1 ring and its kernel. The upload may have run on
    another rank's stream: the caller's current stream waits on its event (no host sync).
    """
    device = key[-1]
    with _LAYOUTS_LOCK:
        entry = _LAYOUTS.get(key)
        if entry is None:
            table = build().to(device)
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


class RingPrefillRunner:
    """Striped ring prefill of one batch on this rank of `ring`, prepared once, run per layer.

    Args:
        seqlens: global length of every request (sequence of ints or 1-D integer tensor; host).
        ring: a Group (see esp_kernels.comm); its rank order defines the striping.
        num_q_heads, num_kv_heads, head_dim, dtype: the layers' q/k/v shapes and dtype.
        retain: optional (RetentionPlan, PagedKVCache): while each KV block passes this rank,
            the tokens the plan assigns to this instance are written into its cache (proactive
            scale-down; no extra communication); the slots are reserved here, once.
        softmax_scale (default 1/sqrt(D)), causal (default True), backend ("auto", "gluon",
            "triton", "torch"): as in `ring_prefill`.

    What is prepared: the block layout table and, for the Gluon step, the table of this rank's
    query tiles on the device (their uploads are ordered before the stream current at
    construction: run on that stream or one ordered after it), the two message buffers (reused
    by every layer: 4 * max stripe tokens * Hkv * D elements) and the retention writer.
    `run(q, k, v, layer)` checks q/k/v against these shapes and runs the ring.
    """

    def __init__(self, seqlens, ring, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, *, retain=None, softmax_scale=None, causal=True,
                 backend="auto"):
        lengths = as_lengths(seqlens)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        Hq, Hkv, D = int(num_q_heads), int(num_kv_heads), int(head_dim)
        check_gqa(Hq, Hkv)
        P, me = ring.size, ring.rank
        self.lengths, self.P, self.rank = tuple(lengths), P, me
        self._ring = lambda: ring  # `_hold_ring_weakly` swaps in a weak reference
        self.world_ranks = tuple(ring.world_ranks)
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype = Hq, Hkv, D, dtype
        self.device = dev = ring.device
        self.causal = bool(causal)
        self.softmax_scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
        self.backend = resolve_backend(backend, dev)
        self._backend_arg = backend   # matches() resolves only another value (2 us: it reads env)
        local = [stripe_lengths(lengths, P, j) for j in range(P)]  # per source rank, request
        self.totals = [sum(x) for x in local]
        self.max_q_len = max(local[me], default=0)
        self.writer = None
        if retain is not None:
            try:
                plan, cache = retain
            except (TypeError, ValueError):
                raise TypeError("retain must be a (RetentionPlan, PagedKVCache) pair") from None
            self.writer = _retention_writer(plan, cache, self.lengths, ring, Hkv, D, dtype)
            self._retain_cache = cache  # the writer (shared by a table keyed by it) holds it weakly
        self._row = Hkv * D
        self._bufs = []
        self._running = False  # a ring of this runner is between its first and last step
        if sum(lengths):
            self._cu_all = _block_layout(self.lengths, P, dev)
            self._tiles = _tile_table(tuple(local[me]), Hq, Hkv, dev, self.backend)
            t_max = max(self.totals)  # rank 0 holds the most tokens of every request
            self._bufs = [torch.empty(2 * t_max * self._row, dtype=dtype, device=dev)
                          for _ in range(2 if P > 1 else 1)]
            self._steps = self._step_views()

    def _step_views(self) -> list:
        """Per ring step s: (source rank, its K and V in the message buffer, the message sent
        and the buffer received (None at the last step), the block as the retention writer
        reads it). Step s reads buffer s % 2 and receives into the other; the views are made
        once (slicing and viewing per step was ~40% of the ring's own host path, CPU profile)."""
        P, me, row, Hkv, D = self.P, self.rank, self._row, self.num_kv_heads, self.head_dim
        totals, bufs = self.totals, self._bufs
        steps = []
        for s in range(P):
            src, cur = (me - s) % P, bufs[s % 2]
            n = totals[src] * row
            send = recv = None
            if s < P - 1:
                send = cur[:2 * n]
                recv = bufs[(s + 1) % 2][:2 * totals[(me - s - 1) % P] * row]
            steps.append((src, cur[:n].view(totals[src], Hkv, D),
                          cur[n:2 * n].view(totals[src], Hkv, D), send, recv,
                          cur[:2 * n].view(2, totals[src], row)))
        return steps

    def _hold_ring_weakly(self) -> "RingPrefillRunner":
        """Keep only a weak reference to the ring handle: for the one-call form's table of
        runners keyed weakly by ring handle, whose entries must not keep their key alive."""
        self._ring = weakref.ref(self._ring())
        return self

    def matches(self, lengths, ring, Hq, Hkv, D, dtype, softmax_scale, causal, backend,
                retain) -> bool:
        """Whether this runner runs exactly these arguments (the convenience's reuse test)."""
        scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
        if (self._ring() is not ring or self.lengths != lengths or self.num_q_heads != Hq
                or self.num_kv_heads != Hkv or self.head_dim != D or self.dtype != dtype
                or self.softmax_scale != scale or self.causal != bool(causal)
                or (backend != self._backend_arg
                    and self.backend != resolve_backend(backend, self.device))):
            return False
        if (retain is None) != (self.writer is None):
            return False
        return retain is None or (self.writer.cache_is(retain[1])
                                  and self.writer.version == retain[1].version
                                  and self.writer.matches(retain[0], self.world_ranks,
                                                          self.world_ranks[self.rank]))

    def run(self, q, k, v, layer: int | None = None):
        """Causal (by default) attention of this rank's stripes of one layer.

        q: [Tq, Hq, D] this rank's query stripes, packed by request (request b contributes its
        tokens g with g mod P == rank, in increasing g); k, v: [Tq, Hkv, D], same packing; all
        of the prepared shapes and dtype on the ring's device. layer: the cache layer the
        retained tokens go to (required with retain).

        Returns out [Tq, Hq, D] in q.dtype and lse [Tq, Hq] float32 (natural log).
        """
        return drive(self.steps(q, k, v, layer))

    def steps(self, q, k, v, layer: int | None = None):
        """`run` as a step generator: yields the Work of each ring exchange after enqueueing
        the step that overlaps it (resume it once the Work can be waited on; `esp.comm.drive`
        and `run_steps` do) and returns (out, lse). The arguments are checked when it first
        runs. One ring at a time per runner: its message buffers are the runner's, so a second
        generator started before the first ends raises RuntimeError (prepare a runner per
        concurrent ring, e.g. one ring handle each)."""
        if self._running:
            raise RuntimeError("this RingPrefillRunner is already running a ring (its message "
                               "buffers are shared): finish it first, or use another runner")
        self._running = True
        try:
            return (yield from self._ring_steps(q, k, v, layer))
        finally:
            self._running = False

    def _ring_steps(self, q, k, v, layer):
        ring = self._ring()
        if ring is None:
            raise RuntimeError("the RingPrefillRunner's ring group no longer exists")
        P, me, Hq, Hkv, D = self.P, self.rank, self.num_q_heads, self.num_kv_heads, self.head_dim
        Tq = self.totals[me]
        for name, t, heads in (("q", q, Hq), ("k", k, Hkv), ("v", v, Hkv)):
            check_tensor(t, name, ndim=3)
            if tuple(t.shape) != (Tq, heads, D) or t.dtype != self.dtype or \
                    t.device != self.device:
                raise ValueError(f"{name} must be [{Tq}, {heads}, {D}] {self.dtype} on "
                                 f"{self.device} (rank {me} of {P} holds {Tq} tokens of seqlens "
                                 f"with sum {sum(self.lengths)}), got {tuple(t.shape)} {t.dtype} "
                                 f"on {t.device}")
        if self.backend != "torch" and D > 1 and q.stride(2) != 1:
            q = q.contiguous()  # the step kernels read q with a unit stride along D
        if self.writer is not None:
            if layer is None:
                raise ValueError("layer is required: this runner retains KV into a cache")
            self._retain_cache._check_layer(layer)
            self.writer.check(self._retain_cache)
        if not sum(self.lengths):  # every rank sees the same empty batch: nothing to exchange
            return q.new_zeros(q.shape), torch.full((0, Hq), -math.inf, device=q.device)
        cu_all = self._cu_all
        cu_q = cu_all[me]
        steps = self._steps
        steps[0][1].copy_(k)
        steps[0][2].copy_(v)
        o_state = torch.empty(Tq, Hq, D, dtype=torch.float32, device=q.device)
        lse_state = torch.empty(Tq, Hq, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        nxt_rank, prv_rank = (me + 1) % P, (me - 1) % P
        for s, (src, kb, vb, send, recv, block) in enumerate(steps):
            work = None
            if send is not None:
                work = ring.exchange(sends=[(send, nxt_rank)], recvs=[(recv, prv_rank)])
            run_step(q, kb, vb, cu_q, cu_all[src], self.max_q_len, o_state, lse_state,
                     causal=self.causal, mask_shift=0 if src <= me else -1, accumulate=s > 0,
                     softmax_scale=self.softmax_scale, backend=self.backend, tiles=self._tiles,
                     out=out if s == P - 1 else None)
            if self.writer is not None:
                self.writer.write(src, block, layer)
            if work is not None:
                yield work
        return out, lse_state


def _retention_writer(plan, cache, lengths, ring, Hkv, D, dtype) -> RetentionWriter:
    """The RetentionWriter of (plan, cache, ring order), reused from the last call with the same
    ones (its reservation check and row maps cost O(tokens) of host work)."""
    if not isinstance(plan, RetentionPlan):
        raise TypeError(f"retain[0] must be a RetentionPlan, got {type(plan).__name__}")
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"retain[1] must be a PagedKVCache, got {type(cache).__name__}")
    if tuple(lengths) != plan.seqlens:
        raise ValueError(f"retention plan covers seqlens {list(plan.seqlens)[:8]}... but the "
                         f"prefill batch has {list(lengths)[:8]}...")
    if cache.dtype != dtype or cache.num_kv_heads != Hkv or cache.head_dim != D or \
            cache.device != ring.device:
        raise ValueError(f"retain cache ({cache.dtype}, {cache.num_kv_heads} kv heads, head dim "
                         f"{cache.head_dim}, {cache.device}) does not match k ({dtype}, {Hkv}, "
                         f"{D}, {ring.device})")
    order, me = tuple(ring.world_ranks), ring.world_ranks[ring.rank]
    writer = _WRITERS.get(cache)
    # A cache whose placement changed since (e.g. the batch's requests were freed) gets its
    # reservation checked again (and its slots, if they moved): once per batch, not per layer.
    if writer is None or writer.version != cache.version or not writer.matches(plan, order, me):
        writer = RetentionWriter(plan, cache, order, me)
        _WRITERS[cache] = writer
    return writer


# The conveniences' prepared state, keyed weakly (a cache or ring handle that goes frees it):
# the last retention writer per cache, the last ring runner per ring handle. A prefill runs every
# layer of one batch with one ring handle, so one entry each covers it.
_WRITERS: "weakref.WeakKeyDictionary[PagedKVCache, RetentionWriter]" = weakref.WeakKeyDictionary()
_RUNNERS: "weakref.WeakKeyDictionary[object, RingPrefillRunner]" = weakref.WeakKeyDictionary()


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
        backend: step kernel: "auto" (CUDA: fastest measured kernel, Gluon; CPU: torch),
            "gluon" (Hopper; other calls go to Triton), "triton", "torch"; ESP_PREFILL_BACKEND
            picks it under "auto". "cuda" (the compiled kernel, deleted) raises ValueError.

    Returns:
        out [Tq, Hq, D] in q.dtype and lse [Tq, Hq] float32 (natural log), for this rank's
        query stripes.

    The same as `RingPrefillRunner(seqlens, ring, Hq, Hkv, D, q.dtype, retain=(plan, cache),
    ...).run(q, k, v, layer)`, with the runner of the last batch reused per ring handle. On
    virtual ranks of one process, `esp.comm.run_steps(groups, [ring_prefill_steps(...) for each
    rank])` runs the same ring on every rank from one thread.
    """
    runner, layer = _runner_for_call(q, k, v, seqlens, ring, retain, softmax_scale, causal,
                                     backend)
    return runner.run(q, k, v, layer)


def ring_prefill_steps(q, k, v, seqlens, ring, retain=None, softmax_scale=None, *, causal=True,
                       backend="auto"):
    """`ring_prefill` as a step generator: yields the Work of each ring exchange (resume it once
    the Work can be waited on; `esp.comm.drive` / `run_steps` do) and returns (out, lse). The
    arguments are checked and the runner found or prepared by this call; q, k, v against the
    runner's shapes when the generator first runs.

    Virtual ranks driven this way enqueue from one thread: no rank waits for the GIL while
    another holds it (`run_local` runs one thread per rank)."""
    runner, layer = _runner_for_call(q, k, v, seqlens, ring, retain, softmax_scale, causal,
                                     backend)
    return runner.steps(q, k, v, layer)


def _runner_for_call(q, k, v, seqlens, ring, retain, softmax_scale, causal, backend):
    """The checked arguments' runner (the last one of this ring handle when it matches) and the
    retained layer."""
    lengths = tuple(as_lengths(seqlens))
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
    total = sum(stripe_lengths(lengths, P, me))
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] != total:
            raise ValueError(f"{name} has {t.shape[0]} tokens but rank {me} of {P} holds "
                             f"{total} tokens of seqlens (sum {sum(lengths)})")
    layer = None
    if retain is not None:
        try:
            plan, cache, layer = retain
        except (TypeError, ValueError):
            raise TypeError("retain must be a (RetentionPlan, PagedKVCache, layer) tuple") from None
        if isinstance(cache, PagedKVCache):
            cache._check_layer(layer)
        retain = (plan, cache)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    runner = _RUNNERS.get(ring)
    if runner is None or not runner.matches(lengths, ring, Hq, Hkv, D, q.dtype, softmax_scale,
                                            causal, backend, retain):
        runner = RingPrefillRunner(lengths, ring, Hq, Hkv, D, q.dtype, retain=retain,
                                   softmax_scale=softmax_scale, causal=causal,
                                   backend=backend)._hold_ring_weakly()
        _RUNNERS[ring] = runner
    return runner, layer
