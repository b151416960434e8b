"""decode_partial: attention of one query token per request over this instance's paged KV shard,
returned as a partial state (o fp32, lse fp32 natural log) for the master to merge.

CUDA tensors use the compiled split-KV kernel (csrc/decode/decode_partial.cu); the CPU path
gathers each request's K/V and runs the reference. A request with no tokens here gets (0, -inf).
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _core
from .._checks import HALF_DTYPES, FLOAT_DTYPES, as_int, check_op_backend, check_tensor
from .._host import cuda_properties
from ..reference import attention


@functools.lru_cache(maxsize=4096)
def num_splits_for(batch: int, num_kv_heads: int, max_len: int, num_sms: int,
                   head_dim: int = 128) -> int:
    """KV splits per request for the CUDA kernel: the cost model of csrc/decode/decode_partial.cu.

    A CTA (one request, group of hg kv heads, split) streams `chunk` tokens of its hg heads, hg the
    largest power of two dividing num_kv_heads, at most 4 (the kernel takes fewer heads per CTA
    when a kv head has more than 16 query heads; the model ignores that). CTAs of a uniform batch
    finish together, so whole waves count: cost(s) = waves(s) * (chunk(s) * hg + 64) (+64 for the
    split merge), minimized over 1 <= s <= min(256, ceil(max_len * hg / 256)). E.g. on 132 SMs
    with 8 kv heads: B1 L128k -> 128, B16 L16k -> 8, B64 L4k -> 2, B8 L1k -> 16. Memoized: the
    search walks up to 256 candidates, and decode_partial calls this per launch when num_splits
    is not given.
    """
    if max_len <= 0:
        return 1
    hg = 1
    while hg < 4 and num_kv_heads % (hg * 2) == 0:
        hg *= 2
    pairs = max(1, batch * num_kv_heads // hg)
    slots = num_sms * (2 if head_dim > 64 else 4)  # resident CTAs per SM (smem/registers)
    best, best_cost = 1, None
    for s in range(1, min(256, max(1, math.ceil(max_len * hg / 256))) + 1):
        chunk = math.ceil(math.ceil(max_len / s) / 64) * 64
        cost = math.ceil(pairs * s / slots) * (chunk * hg + 64) + (64 if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


# The automatic schedule (num_splits not given) shares tiles through counters (balanced) only when
# each split has at least this many tokens; shorter splits take fixed ranges. H100, page 16,
# interleaved rounds (bench/diag_decode.py --short), balanced -> fixed: B8 L1k at 16 splits (64
# tokens each) 30.4 -> 28.8 us, B8 L2k (128 each) 45.1 -> 43.8, B32 L1k and B64 L512 (256 each)
# within 0.5%; at 1024+ tokens per split balanced wins (B1 L128k 210.2 -> 208.5 us, B16 L16k
# 393 -> 383). Fixed ranges also skip the counters' memset launch.
BALANCED_MIN_SPLIT_TOKENS = 512


def auto_schedule_is_static(num_splits: int, max_len: int) -> bool:
    """Whether the automatic schedule gives every split a fixed token range (bitwise
    reproducible): splits of a shard of at most max_len tokens that hold fewer than
    BALANCED_MIN_SPLIT_TOKENS tokens each."""
    return math.ceil(max_len / max(1, num_splits)) < BALANCED_MIN_SPLIT_TOKENS


# The kernel's KV copies carry an evict-first L2 policy when a call reads at most this many times
# the device's L2 size of KV (csrc/decode/decode_partial_kernel.cuh, "L2 policy"). H100 (50 MiB of
# L2), each size timed paired with and without it after a 256 MB write (dirty L2): 33.5-134 MB
# 1.07-1.15x faster, 268 MB (5.1x the L2) 1.01-1.02x, 537 MB (10.2x) 0.99x, 1.07 GB 0.97x; after
# a clean eviction 0.99-1.01x at every size.
EVICT_FIRST_MAX_L2_MULTIPLE = 6


def kv_evict_first(batch: int, num_kv_heads: int, max_len: int, head_dim: int, elem_bytes: int,
                   l2_bytes: int) -> bool:
    """Whether the decode kernel streams the K/V of `batch` requests of up to `max_len` tokens
    with the evict-first L2 policy: their bytes are at most EVICT_FIRST_MAX_L2_MULTIPLE times
    `l2_bytes`. Speed only; results are the same either way."""
    kv_bytes = 2 * batch * max_len * num_kv_heads * head_dim * elem_bytes
    return kv_bytes <= EVICT_FIRST_MAX_L2_MULTIPLE * l2_bytes


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device,
                       head_dim: int) -> int:
    """num_splits_for with the SM count of `device` (1 off CUDA)."""
    sms = cuda_properties(device).multi_processor_count if device.type == "cuda" else 1
    return num_splits_for(batch, num_kv_heads, max_len, sms, head_dim)


def default_schedule(batch: int, num_kv_heads: int, max_len: int, device: torch.device,
                     head_dim: int) -> tuple[int, bool]:
    """What a call that leaves num_splits unset runs: `default_num_splits` and whether those
    splits take fixed ranges (`auto_schedule_is_static`)."""
    num_splits = default_num_splits(batch, num_kv_heads, max_len, device, head_dim)
    return num_splits, auto_schedule_is_static(num_splits, max_len)


def _launch_choices(batch: int, num_kv_heads: int, head_dim: int, elem_bytes: int,
                   device: torch.device, num_splits, max_len, page_size: int,
                   table_pages: int) -> tuple[int, bool, bool]:
    """What a kernel launch over shards of up to `max_len` tokens (None: the block table's
    capacity, page_size * table_pages) runs: (num_splits, whether the automatic schedule fixes
    the splits' ranges, whether the KV copies take the evict-first L2 policy). num_splits None
    takes `default_schedule`; a given count keeps the caller's schedule (False here). The
    policy is `kv_evict_first` of that bound (off CUDA: False). decode_partial and
    PreparedDecodePartial decide through this, once per call and once per preparation."""
    bound = page_size * table_pages if max_len is None else max_len
    static = False
    if num_splits is None:
        num_splits, static = default_schedule(batch, num_kv_heads, bound, device, head_dim)
    evict_first = device.type == "cuda" and kv_evict_first(
        batch, num_kv_heads, bound, head_dim, elem_bytes, cuda_properties(device).L2_cache_size)
    return int(num_splits), static, evict_first


def new_workspace(batch: int, num_q_heads: int, head_dim: int, num_splits: int,
                  device: torch.device) -> torch.Tensor:
    """A float32 workspace of `_C.decode_workspace_elems` elements (at least one) on `device`."""
    C = _core.require_compiled("decode_partial")
    need = C.decode_workspace_elems(batch, num_q_heads, head_dim, num_splits)
    return torch.empty(max(need, 1), dtype=torch.float32, device=device)


def _partial_torch(q, k_cache, v_cache, block_table, kv_lens, softmax_scale, o, lse):
    num_pages, page_size = k_cache.shape[:2]
    lens = kv_lens.tolist()
    bt = block_table.cpu()
    slots = []
    for b, n in enumerate(lens):
        if not 0 <= n <= bt.shape[1] * page_size:
            raise ValueError(f"kv_lens[{b}] = {n} is outside [0, {bt.shape[1] * page_size}] (the "
                             f"block table's {bt.shape[1]} pages of {page_size} tokens)")
        pages = bt[b, :-(-n // page_size)]
        bad = (pages < 0) | (pages >= num_pages)
        if bad.any():
            raise ValueError(f"block_table[{b}] holds page {pages[bad][0].item()} among its "
                             f"first {pages.numel()}, outside the cache's {num_pages} pages")
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


def _check_outputs(o, lse, B, Hq, D, device):
    """decode_partial's outputs: float32 [B, Hq, D] and [B, Hq] on q's device."""
    for name, t, shape in (("o", o, (B, Hq, D)), ("lse", lse, (B, Hq))):
        check_tensor(t, name, dtypes=(torch.float32,))
        if tuple(t.shape) != shape or t.device != device:
            raise ValueError(f"{name} must be {list(shape)} on {device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def _check(q, k_cache, v_cache, block_table, kv_lens):
    """Shapes, dtypes and devices of decode_partial's operands (errors name the argument)."""
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
        check_tensor(t, name)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if block_table.dim() != 2 or block_table.shape[0] != B or kv_lens.shape != (B,):
        raise ValueError(f"block_table must be [B={B}, max_pages] and kv_lens [B], got "
                         f"{tuple(block_table.shape)} and {tuple(kv_lens.shape)}")
    return B, Hq, D


@_core.accepts_arrays
def decode_partial(q, k_cache, v_cache, block_table, kv_lens, *, softmax_scale=None,
                   num_splits=None, max_len=None, o=None, lse=None, workspace=None,
                   deterministic=False, backend="auto"):
    """Partial decode attention over a paged shard.

    Args:
        q: [B, Hq, D] (float16/bfloat16 on CUDA; also float32 on the CPU path).
        k_cache, v_cache: [num_pages, page_size, Hkv, D] one layer of a PagedKVCache.
        block_table: int32 [B, max_pages]; kv_lens: int32 [B] (tokens of each request here).
            Their contents are checked on the CPU path (kv_lens within the table's capacity, the
            pages it reads within the cache); the CUDA kernel does not wait on the GPU to check
            them: it clamps kv_lens to the table's capacity and reads the pages it is given.
        num_splits: KV splits per request (default: `num_splits_for` with `max_len`, the
            longest shard, or the block table's capacity, and with it the schedule:
            `auto_schedule_is_static`); fixed per launch, so the op is CUDA-graph capturable
            for a fixed plan. The same bound picks the L2 policy of the kernel's KV reads
            (`kv_evict_first`; speed only).
        workspace: optional float32 buffer of `_C.decode_workspace_elems(...)` elements (the
            driver keeps one per plan so captured graphs reuse it).
        o, lse: optional outputs, float32 [B, Hq, D] and [B, Hq] (strided views allowed).
        softmax_scale: finite and > 0 (default 1/sqrt(D)). backend: "auto" (the CUDA kernel
            for CUDA tensors, else the torch path), "cuda" or "torch".
        deterministic: when the KV is split, False (default) lets the splits of a request share
            its tiles through a counter (no split waits for a slow sibling; the fp32 summation
            order, hence the last bits, can change between runs), except where the default
            split count gives short splits (`auto_schedule_is_static`); True gives every split
            a fixed token range and bitwise-reproducible results. The CPU path is
            deterministic.
    Returns (o, lse). Takes torch tensors or DLPack / __cuda_array_interface__ arrays (results
    come back as the caller's kind); under torch.compile it is the op
    esp_kernels::decode_partial.
    """
    B, Hq, D = _check(q, k_cache, v_cache, block_table, kv_lens)
    check_op_backend(backend, q.device)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale!r}")
    if num_splits is not None:
        num_splits = as_int(num_splits, "num_splits", minimum=1)
    if max_len is not None:
        max_len = as_int(max_len, "max_len", minimum=0)
    if o is None:
        o = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    _check_outputs(o, lse, B, Hq, D, q.device)
    if torch.compiler.is_compiling():
        torch.ops.esp_kernels.decode_partial(q, k_cache, v_cache, block_table, kv_lens, o, lse,
                                             workspace, num_splits, max_len, scale,
                                             bool(deterministic), backend)
    else:
        decode_partial_(q, k_cache, v_cache, block_table, kv_lens, o, lse, workspace,
                        num_splits, max_len, scale, deterministic, backend)
    return o, lse


def decode_partial_(q, k_cache, v_cache, block_table, kv_lens, o, lse, workspace, num_splits,
                    max_len, scale, deterministic, backend):
    """decode_partial into o / lse, unchecked: the implementation behind it and the registered
    op esp_kernels::decode_partial."""
    B, Hq, D = q.shape
    if q.device.type == "cuda" and backend != "torch":
        if q.dtype not in HALF_DTYPES or k_cache.dtype != q.dtype:
            raise TypeError(f"the CUDA decode kernel needs float16/bfloat16 q and cache of the "
                            f"same dtype, got {q.dtype} and {k_cache.dtype}")
        C = _core.require_compiled("decode_partial")
        num_splits, static, evict_first = _launch_choices(
            B, k_cache.shape[2], D, q.element_size(), q.device, num_splits, max_len,
            k_cache.shape[1], block_table.shape[1])
        deterministic = deterministic or static
        ws = workspace
        if ws is None or ws.numel() < C.decode_workspace_elems(B, Hq, D, num_splits):
            ws = new_workspace(B, Hq, D, num_splits, q.device)
        d = _core.desc
        C.decode_partial(d(q), d(k_cache), d(v_cache), d(block_table), d(kv_lens), d(o), d(lse),
                         d(ws), num_splits, scale, bool(deterministic), q.device.index,
                         _core.stream_handle(q.device), False, evict_first)
    else:
        _partial_torch(q, k_cache, v_cache, block_table, kv_lens, scale, o, lse)


class PreparedDecodePartial:
    """decode_partial with its operands fixed once, launched per layer by `__call__`.

    Built by `prepare_decode_partial`. On CUDA with the compiled core it holds the core's
    descriptors of every fixed operand and a workspace of its own, zeroed once: each launch
    leaves the workspace's tile counters zero again (the split merge resets them, and so does
    the op after a failed launch), so every call passes `counters_zeroed=True` and skips the
    memset launch. A call only swaps in the layer's K/V pointers (and q's, when given) and
    launches: ~2 us per descriptor saved against the per-layer host budget of 30 us.
    """

    def __init__(self, q, k_layers, v_layers, block_table, kv_lens, o, lse, num_splits,
                 max_len):
        for name, t in (("k_layers", k_layers), ("v_layers", v_layers)):
            check_tensor(t, name, ndim=5)
        if k_layers.shape != v_layers.shape:
            raise ValueError(f"k_layers {tuple(k_layers.shape)} and v_layers "
                             f"{tuple(v_layers.shape)} differ")
        B, Hq, D = _check(q, k_layers[0], v_layers[0], block_table, kv_lens)
        _check_outputs(o, lse, B, Hq, D, q.device)
        dev = q.device
        self.q, self.k_layers, self.v_layers = q, k_layers, v_layers
        self.block_table, self.kv_lens, self.o, self.lse = block_table, kv_lens, o, lse
        self.num_layers = k_layers.shape[0]
        self._q_shape, self._q_dtype = q.shape, q.dtype
        self._device, self._device_index = dev, dev.index
        # With the default split count comes the automatic schedule (decode_partial). (An empty
        # batch plans as one request; it launches through decode_partial, not the descriptors.)
        self.num_splits, self._static, self._kv_evict_first = _launch_choices(
            max(1, B), k_layers.shape[3], D, k_layers.element_size(), dev, num_splits, max_len,
            k_layers.shape[2], block_table.shape[1])
        self.workspace = None
        self._descs = None
        if (dev.type == "cuda" and _core.has_compiled() and q.dtype in HALF_DTYPES
                and k_layers.dtype == q.dtype and B):
            self.workspace = new_workspace(B, Hq, D, self.num_splits, dev).zero_()
            d = _core.desc
            self._d_k, self._d_v = d(k_layers[0]), d(v_layers[0])
            elem = k_layers.element_size()
            self._k_base, self._v_base = k_layers.data_ptr(), v_layers.data_ptr()
            self._k_step, self._v_step = k_layers.stride(0) * elem, v_layers.stride(0) * elem
            self._d_q = d(q)
            self._q_ptr = q.data_ptr()
            self._descs = (d(block_table), d(kv_lens), d(o), d(lse), d(self.workspace))

    def __call__(self, layer: int, q=None, *, softmax_scale: float, deterministic: bool = False,
                 backend: str = "auto"):
        """Partial states of layer `layer` (0 <= layer < num_layers, not checked) into the
        prepared o / lse. q: None for the prepared q buffer, or a contiguous tensor of its
        shape and dtype on its device to read in place."""
        if q is not None and (q.shape != self._q_shape or q.dtype != self._q_dtype
                              or not q.is_contiguous() or q.device != self._device):
            raise ValueError(f"q must be a contiguous {tuple(self._q_shape)} {self._q_dtype} "
                             f"tensor on {self._device}, got {tuple(q.shape)} {q.dtype} on "
                             f"{q.device}")
        self.launch(layer, q, softmax_scale=softmax_scale, deterministic=deterministic,
                    backend=backend)

    def launch(self, layer: int, q=None, *, softmax_scale: float, deterministic: bool = False,
               backend: str = "auto"):
        """`__call__` without its check of q, for a caller that checked it already (a decode
        runner checks q once per layer)."""
        if self._descs is not None and backend != "torch":
            dk, dv, dq = self._d_k, self._d_v, self._d_q
            dk.ptr = self._k_base + layer * self._k_step
            dv.ptr = self._v_base + layer * self._v_step
            dq.ptr = self._q_ptr if q is None else q.data_ptr()
            dbt, dlen, do, dlse, dws = self._descs
            # counters_zeroed=True and the L2 policy passed by position: a keyword sends
            # pybind11 through its name matching, +0.2-0.5 us per call on this per-layer path.
            _core._C.decode_partial(dq, dk, dv, dbt, dlen, do, dlse, dws, self.num_splits,
                                    softmax_scale, deterministic or self._static,
                                    self._device_index,
                                    _core.stream_handle(self._device), True,
                                    self._kv_evict_first)
            return
        decode_partial(self.q if q is None else q, self.k_layers[layer], self.v_layers[layer],
                       self.block_table, self.kv_lens, softmax_scale=softmax_scale,
                       num_splits=self.num_splits, o=self.o, lse=self.lse,
                       workspace=self.workspace, deterministic=deterministic or self._static,
                       backend=backend)


def prepare_decode_partial(q, k_layers, v_layers, block_table, kv_lens, *, o, lse,
                           num_splits=None, max_len=None) -> PreparedDecodePartial:
    """Check once and prepare decode_partial over every layer of a paged KV pool.

    q: [B, Hq, D] buffer read by default; k_layers, v_layers: [num_layers, num_pages,
    page_size, Hkv, D] (e.g. `PagedKVCache.layers()`); block_table, kv_lens, o, lse as in
    `decode_partial`; num_splits / max_len as there (fixed here, once). The tensors' storage
    must stay where it is while the prepared call is used (their pointers are taken here).
    """
    return PreparedDecodePartial(q, k_layers, v_layers, block_table, kv_lens, o, lse,
                                 num_splits, max_len)
