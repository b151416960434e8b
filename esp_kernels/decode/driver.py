"""Multi-master distributed decode as one call per layer (`esp.distributed_decode`).

The work is `DecodeRunner`'s (runner.py): prepared once per (plan, instance, cache, shapes), run
per layer. These conveniences keep, per cache, the runners of the last few plans they were
called with, so calling them layer after layer with one plan costs what `runner.run` costs: the
lookup is an identity check of the plan, group and shapes (the plan is compared by value only
when its object is new). The runners live in a table keyed by the cache (its entry dropped when
the cache goes), not on the plan (plans are pure data), and hold the cache weakly, so a cache
that goes frees its runners.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .._checks import FLOAT_DTYPES, check_tensor
from ..comm.group import drive
from ..kvcache.cache import PagedKVCache
from .plan import DecodePlan
from .runner import DecodeRunner

# A decode step runs every layer with one plan, and scale_up makes the next step's plan: two
# runners per cache cover a plan in use plus one being switched to, without keeping the
# buffers of many stale plans alive. Keyed by id(cache) with a finalizer that drops the entry
# when the cache goes (a WeakKeyDictionary lookup builds a weakref per call, ~0.2 us a layer);
# the runners hold their cache weakly, so the table never keeps a cache alive.
_RUNNERS_PER_CACHE = 2
_RUNNERS: dict[int, list[DecodeRunner]] = {}
_RUNNERS_LOCK = threading.Lock()  # virtual ranks call from their threads


def decode_runner(plan: DecodePlan, group, cache: PagedKVCache, num_q_heads: int, head_dim: int,
                  q_dtype: torch.dtype) -> DecodeRunner:
    """The DecodeRunner these arguments prepare, reused from the last calls when one matches
    (same plan by value, same group handle, same shapes), else a new one."""
    entries = _RUNNERS.get(id(cache))
    if entries:
        for r in entries:
            if (r.plan is plan and r.group is group and r.num_q_heads == num_q_heads
                    and r.head_dim == head_dim and r.q_dtype == q_dtype):
                return r
    with _RUNNERS_LOCK:
        entries = _RUNNERS.get(id(cache))
        if entries is None:
            entries = _RUNNERS[id(cache)] = []
            weakref.finalize(cache, _RUNNERS.pop, id(cache), None)
        for r in entries:
            if (r.group is group and r.num_q_heads == num_q_heads and r.head_dim == head_dim
                    and r.q_dtype == q_dtype and r.plan == plan):
                return r
    runner = DecodeRunner(plan, group, cache, num_q_heads, head_dim, q_dtype)._hold_cache_weakly()
    with _RUNNERS_LOCK:
        entries.insert(0, runner)
        del entries[_RUNNERS_PER_CACHE:]
    return runner


def distributed_decode(q, cache: PagedKVCache, plan: DecodePlan, group, *, layer: int = 0,
                       k_new=None, v_new=None, softmax_scale=None, deterministic=False,
                       backend="auto", out=None):
    """One decode attention layer across the group (call on every instance of `group`).

    Args:
        q: [B_m, Hq, D] queries of the requests this instance masters, in plan order
            (`plan.mastered_by(this instance)`); B_m may be 0.
        cache: this instance's PagedKVCache; plan: the DecodePlan (same on every instance).
        layer: cache layer to attend over.
        k_new, v_new: [B_m, Hkv, D] the new token's K/V of each mastered request, required when
            the plan appends (after `plan.scale_up`); stored at this layer on the instance the
            plan chose before attention, so each query attends to its own token too.
        deterministic: bitwise-reproducible partial states (see `decode_partial`); the default
            balances the KV splits dynamically, which is faster on long shards.
        out: optional contiguous [B_m, Hq, D] tensor of q's dtype and device to write the result
            into (e.g. a buffer reused by every layer, or a CUDA graph's fixed output); by
            default a new tensor per call.
    Returns out [B_m, Hq, D] in q.dtype.

    The same as `DecodeRunner(plan, group, cache, Hq, D, q.dtype).run(q, layer, ...)`, with the
    runner reused across calls. On virtual ranks of one process,
    `esp.comm.run_steps(groups, [distributed_decode_steps(...) for each rank])` runs the same
    layer on every rank from one thread.
    """
    return drive(_runner_for_call(q, cache, plan, group).steps(
        q, layer, k_new=k_new, v_new=v_new, out=out, softmax_scale=softmax_scale,
        deterministic=deterministic, backend=backend))


def distributed_decode_steps(q, cache: PagedKVCache, plan: DecodePlan, group, *, layer: int = 0,
                             k_new=None, v_new=None, softmax_scale=None, deterministic=False,
                             backend="auto", out=None):
    """`distributed_decode` as a step generator: yields the Work of each exchange it posts
    (resume it once the Work can be waited on; `esp.comm.drive` / `run_steps` do) and returns
    out. The runner is found or prepared by this call (a bad plan, cache or q raises here); the
    layer's arguments are checked when the generator first runs. It is the runner's own
    generator: a wrapping one cost every resume another frame (~0.5 us a decode layer and rank
    on two virtual ranks, this build machine)."""
    return _runner_for_call(q, cache, plan, group).steps(
        q, layer, k_new=k_new, v_new=v_new, out=out, softmax_scale=softmax_scale,
        deterministic=deterministic, backend=backend)


def _runner_for_call(q, cache, plan, group) -> DecodeRunner:
    shape = q.shape if isinstance(q, torch.Tensor) else None
    if shape is None or len(shape) != 3 or q.dtype not in FLOAT_DTYPES:
        check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    if type(plan) is not DecodePlan and not isinstance(plan, DecodePlan):
        raise TypeError(f"plan must be a DecodePlan, got {type(plan).__name__}")
    if type(cache) is not PagedKVCache and not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    # q's device is checked by the runner (whose cache and group share one device).
    return decode_runner(plan, group, cache, shape[1], shape[2], q.dtype)
