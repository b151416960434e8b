"""DecodeRunner: one instance's multi-master decode for one plan, prepared once, run per layer.

Per layer, on every instance of the group:
  1. masters send each holder the queries of the requests it holds (and, for a request whose new
     token this holder stores, that token's K/V) in one grouped exchange;
  2. every holder appends received K/V into its cache, then computes one partial state (o, lse)
     over its shard for all requests it holds, whoever masters them (one kernel launch);
  3. the states go back, o and lse of a master's requests as ONE message per peer;
  4. each master gathers the states of its requests and merges them exactly (fp32), returning
     `out` in the query dtype.

Everything but the per-layer launches depends only on (plan, instance, cache placement, shapes),
so the runner builds it once, when it is made: the index maps (`layout.decode_layout`), the
buffers, the prepared exchanges and the ops' prepared calls (their core descriptors). A layer
then costs a few launches and two exchanges (on CUDA: the q-row gather, the partial kernel and
the merge, plus the appends when the plan appends), and with a fixed runner its buffers keep
their addresses (CUDA-graph capturable). Like FlashInfer's plan()/run() wrappers, a runner is
tied to what it was prepared for: a q of another shape, dtype or device raises, and so does a
cache whose token placement changed under the runner's requests (checked through the cache's
`version` before each layer, like FlashMLA's metadata check), instead of computing garbage.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from .._checks import FLOAT_DTYPES, check_tensor
from .._host import int_tensor, upload
from ..comm.group import drive
from ..kvcache.cache import PagedKVCache, block_table_rows
from ..kvcache.copy import copy_rows_, prepare_copy_rows
from .layout import decode_layout
from .merge_gather import prepare_merge_states_gather
from .partial import prepare_decode_partial
from .plan import DecodePlan


class DecodeRunner:
    """Multi-master decode of this instance (`group`'s rank) for `plan` over `cache`.

    Args:
        plan: the DecodePlan (the same on every instance of the group).
        group: the Group of every instance that masters or holds a request of the plan.
        cache: this instance's PagedKVCache; it must hold exactly the tokens the plan says this
            instance holds (and the slots of the tokens appended here: `plan.reserve`, which
            `plan.scale_up` calls).
        num_q_heads, head_dim, q_dtype: the queries' shape and dtype.

    `run(q, layer, ...)` runs one layer (`steps(...)`: the same as a step generator).
    """

    def __init__(self, plan: DecodePlan, group, cache: PagedKVCache, num_q_heads: int,
                 head_dim: int, q_dtype: torch.dtype):
        if not isinstance(plan, DecodePlan):
            raise TypeError(f"plan must be a DecodePlan, got {type(plan).__name__}")
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        if q_dtype not in FLOAT_DTYPES:
            raise TypeError(f"q_dtype must be float32, float16 or bfloat16, got {q_dtype}")
        Hq, D = int(num_q_heads), int(head_dim)
        if D != cache.head_dim or Hq < 1 or Hq % cache.num_kv_heads:
            raise ValueError(f"q [.., {Hq}, {D}] does not fit the cache's {cache.num_kv_heads} kv "
                             f"heads of dim {cache.head_dim}")
        if cache.device != group.device:
            raise ValueError(f"cache ({cache.device}) and group ({group.device}) must share one "
                             "device")
        members = set(group.world_ranks)
        for i, rid in enumerate(plan.requests):
            for inst in [plan.masters[i], *plan.kv_shards(i)]:
                if inst not in members:
                    raise ValueError(f"plan puts request {rid!r} on instance {inst}, which is "
                                     f"not in the group {list(group.world_ranks)}")
        me = group.world_ranks[group.rank]
        lay = decode_layout(plan, me)
        self.plan, self.group, self.layout = plan, group, lay
        self.num_q_heads, self.head_dim, self.q_dtype = Hq, D, q_dtype
        self.device = dev = cache.device
        self._cuda_index = dev.index if dev.type == "cuda" else -1
        self._cache = lambda: cache  # `_hold_cache_weakly` swaps in a weak reference
        self._state = self._cache_state(cache)
        self._version = cache.version
        Bm, n_held, n_recv = len(lay.mine), lay.n_held, lay.n_recv
        self.num_rows = Bm
        self._q_shape = (Bm, Hq, D)
        row = cache.row_elems
        self._row = row

        # Every index list of the plan, uploaded in one copy from pinned memory (`upload`: a
        # pageable copy would wait for the stream to drain).
        slots = self._state[1]
        n_send = len(lay.q_send_rows)
        send_dst = tuple(range(n_held, n_held + n_send))
        lists = {"app_own_rows": lay.append_own_rows,
                 "app_own_slots": [slots[i] for i in lay.append_own],
                 "app_send_rows": lay.append_send_rows,
                 "app_recv_slots": [slots[i] for i in lay.append_recv],
                 "merge_rows": list(itertools.chain.from_iterable(lay.merge_rows))}
        for read in (False, True):
            for send in (False, True):
                lists["q_src", read, send] = ((() if read else lay.q_own_rows)
                                              + (() if send else lay.q_send_rows))
                lists["q_dst", read, send] = ((() if read else lay.q_own_dst)
                                              + (() if send else send_dst))
        if n_held:
            lists["block_table"], _, lists["kv_lens"] = block_table_rows(self._state[0])
        flat, spans = [], {}
        for key, values in lists.items():
            spans[key] = (len(flat), len(flat) + len(values))
            flat.extend(values)
        i64 = upload(int_tensor(flat), dev)
        i32 = i64.to(torch.int32)

        def ints(key, dtype=torch.int32):
            a, b = spans[key]
            return (i32 if dtype == torch.int32 else i64)[a:b]

        # States: one fp32 row [o (Hq*D) | lse (Hq) | pad] per request, so the states of a
        # master's requests are one contiguous message; the lse part is padded to 8 floats so
        # every o row stays 32-byte aligned: the decode kernel's 16-byte stores and the merge's
        # 8-wide loads (which need a row stride that is a multiple of 8; Hq = 4, 12, ... would
        # take the merge's scalar path). X = [held states ; received ; empty state].
        self._srow = srow = Hq * D + (Hq + 7) // 8 * 8
        self.X = torch.empty(n_held + n_recv + 1, srow, dtype=torch.float32, device=dev)
        self.X[-1, : Hq * D] = 0
        self.X[-1, Hq * D:] = -math.inf
        self.X[:, Hq * D + Hq:] = 0  # padding travels with the rows: keep it defined
        self.Q = torch.empty(n_held + n_send, Hq, D, dtype=q_dtype, device=dev)
        self.q_hold, self.q_send = self.Q[:n_held], self.Q[n_held:]
        self.kv_send = torch.empty(len(lay.append_send_rows), 2, row, dtype=cache.dtype,
                                   device=dev)
        self.kv_recv = torch.empty(len(lay.append_recv), 2, row, dtype=cache.dtype, device=dev)

        # Appends: rows of my new tokens stored here / sent, slots of the tokens I store.
        self._app_own_rows = ints("app_own_rows", torch.long)
        self._app_own_slots = ints("app_own_slots")
        self._app_send_rows = ints("app_send_rows", torch.long)
        self._app_recv_slots = ints("app_recv_slots")
        self._has_app_own, self._has_app_send, self._has_app_recv = (
            bool(lay.append_own), bool(lay.append_send_rows), bool(lay.append_recv))
        self._kv_shape = (Bm, cache.num_kv_heads, D)

        # q rows into Q = [q_hold ; q_send], one prepared row gather per case: the kernel may
        # read q in place (read_direct) and the holders' messages may be q itself (send_direct).
        self._q_gather = {}
        for read in (False, True):
            for send in (False, True):
                src, dst = ("q_src", read, send), ("q_dst", read, send)
                self._q_gather[read, send] = None if not lists[src] else (
                    ints(src, torch.long), ints(dst, torch.long),
                    prepare_copy_rows((1, Bm, Hq * D), ints(src), self.Q.view(1, -1, Hq * D),
                                      ints(dst)))

        # The partial kernel over my shard (block table of the held rows, in held order).
        self._o_held, self._lse_held = self._states(slice(0, n_held))
        self._partial = None
        if n_held:
            k_layers, v_layers = cache.layers()
            self._partial = prepare_decode_partial(
                self.q_hold, k_layers, v_layers, ints("block_table").view(n_held, -1),
                ints("kv_lens"), o=self._o_held, lse=self._lse_held,
                max_len=max(n for _, n in self._state[0]))

        # The master's merge straight from the state pool.
        x_o, x_lse = self._states(slice(None))
        self.lse_out = torch.empty(Bm, Hq, dtype=torch.float32, device=dev)
        merge_rows = ints("merge_rows").view(len(lay.merge_rows), Bm)
        self._merge = prepare_merge_states_gather(x_o, x_lse, merge_rows, lse_out=self.lse_out,
                                                  out_dtype=q_dtype)

        # The two exchanges. Message lists, in the layout's segment order.
        pos_of = {w: p for p, w in enumerate(group.world_ranks)}
        fwd_sends = [(self.q_send[a:b], pos_of[h]) for h, (a, b) in lay.recv_segments.items()]
        fwd_sends += [(self.kv_send[a:b], pos_of[t])
                      for t, (a, b) in lay.append_send_segments.items()]
        fwd_recvs = [(self.q_hold[a:b], pos_of[m]) for m, (a, b) in lay.held_segments.items()
                     if m != me]
        fwd_recvs += [(self.kv_recv[a:b], pos_of[m])
                      for m, (a, b) in lay.append_recv_segments.items()]
        back_sends = [(self.X[a:b], pos_of[m]) for m, (a, b) in lay.held_segments.items()
                      if m != me]
        back_recvs = [(self.X[n_held + a: n_held + b], pos_of[h])
                      for h, (a, b) in lay.recv_segments.items()]
        # Both are waited on right after posting (q before the partial, states before the
        # merge): consumed at once.
        self._fwd = group.prepare_exchange(fwd_sends, fwd_recvs, consume_at_once=True)
        self._back = group.prepare_exchange(back_sends, back_recvs, consume_at_once=True)
        # q itself stands in for every q_send segment (they lead fwd_sends) when each remote
        # holder serves all my requests in my order.
        self._n_q_sends = len(lay.recv_segments)

    # ---- cache consistency -----------------------------------------------------------------
    def _cache_state(self, cache: PagedKVCache):
        """(placement of each held request, {request index: slot} of the tokens appended here),
        after checking that the cache holds what the plan says this instance holds."""
        plan, lay, me = self.plan, self.layout, self.layout.instance
        for i, rid in enumerate(plan.requests):
            want, have = plan.kv_len(i, me), cache.num_tokens(rid)
            if want != have:
                hint = ("its new token's slot is not reserved here: call plan.reserve(cache, "
                        "instance) (plan.scale_up does)" if plan.append_to[i] == me and
                        have == want - 1 else
                        "the plan is stale (build or scale it up again) or the cache is not "
                        "this instance's")
                raise ValueError(f"the plan says instance {me} holds {want} tokens of request "
                                 f"{rid!r} but its cache holds {have}: {hint}")
        slots = {}
        for i in lay.append_own + lay.append_recv:
            rid, pos = plan.requests[i], plan.appended_position(i)
            last = cache.last_token(rid)
            if last is None or last[0] != pos:
                raise ValueError(f"instance {me} stores the new token of request {rid!r} "
                                 f"(position {pos}) but its cache's last token of it is at "
                                 f"{None if last is None else last[0]}: call "
                                 "plan.reserve(cache, instance) (plan.scale_up does)")
            slots[i] = last[1]
        return tuple(cache.placement(plan.requests[i]) for i in lay.held), slots

    def _hold_cache_weakly(self) -> "DecodeRunner":
        """Keep only a weak reference to the cache: for a table of runners keyed weakly by
        their caches (the one-call form's), whose entries must not keep their key alive."""
        self._cache = weakref.ref(self._cache())
        return self

    def _live_cache(self) -> PagedKVCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the DecodeRunner's cache no longer exists")
        if cache.version != self._version:
            # Placement changed somewhere in the cache (e.g. a prefill retained other requests):
            # fine as long as this runner's requests sit where they did.
            moved = ("the cache moved tokens of this DecodeRunner's requests since it was "
                     "prepared (allocation, free or migration): prepare a new runner for the "
                     "current plan")
            try:
                state = self._cache_state(cache)
            except ValueError as exc:
                raise ValueError(f"{moved} ({exc})") from None
            if state != self._state:
                raise ValueError(moved)
            self._version = cache.version
        return cache

    def _states(self, rows: slice):
        """(o [n, Hq, D], lse [n, Hq]) strided views of X's rows."""
        x = self.X[rows]
        hd, H, D = self.num_q_heads * self.head_dim, self.num_q_heads, self.head_dim
        o = x.as_strided((x.shape[0], H, D), (self._srow, D, 1))
        lse = x.as_strided((x.shape[0], H), (self._srow, 1), x.storage_offset() + hd)
        return o, lse

    # ---- per layer -------------------------------------------------------------------------
    def run(self, q, layer: int = 0, *, k_new=None, v_new=None, out=None, softmax_scale=None,
            deterministic=False, backend="auto"):
        """One decode attention layer (call on every instance of the group).

        Args:
            q: [B_m, Hq, D] queries of the requests this instance masters, in plan order
                (`plan.mastered_by(this instance)`), of the prepared heads, dim, dtype; B_m may
                be 0.
            layer: cache layer to attend over.
            k_new, v_new: [B_m, Hkv, D] the new token's K/V of each mastered request, required
                when the plan appends; stored at this layer on the instance the plan chose
                before attention, so each query attends to its own token too.
            out: optional contiguous [B_m, Hq, D] tensor of q's dtype and device to write into
                (e.g. a buffer reused by every layer, or a CUDA graph's fixed output).
            deterministic: bitwise-reproducible partial states (see `decode_partial`).
            backend: "auto" (CUDA kernels on CUDA tensors) or "torch".
        Returns out [B_m, Hq, D] in q.dtype.
        """
        return drive(self.steps(q, layer, k_new=k_new, v_new=v_new, out=out,
                                softmax_scale=softmax_scale, deterministic=deterministic,
                                backend=backend))

    def steps(self, q, layer: int = 0, *, k_new=None, v_new=None, out=None, softmax_scale=None,
              deterministic=False, backend="auto"):
        """`run` as a step generator: yields the Work of each exchange it posts (resume it once
        the Work can be waited on; `esp.comm.drive` / `run_steps` do) and returns out.
        Arguments are checked when it first runs."""
        lay, Hq, D = self.layout, self.num_q_heads, self.head_dim
        # Each access of q.shape / q.device builds an object (~0.3 us on the build machine):
        # one of each per layer. On CUDA the device index (an int) says the device.
        if not isinstance(q, torch.Tensor):
            check_tensor(q, "q", ndim=3)
        shape = q.shape
        Bm = self.num_rows
        if len(shape) == 3 and shape[0] != Bm:
            raise ValueError(f"q has {shape[0]} rows but this instance masters {Bm} requests "
                             "of the plan")
        if shape != self._q_shape or q.dtype != self.q_dtype or (
                q.get_device() != self._cuda_index if self._cuda_index >= 0 else
                q.device != self.device):
            raise ValueError(f"q must be [{Bm}, {Hq}, {D}] {self.q_dtype} on {self.device} (as "
                             f"this runner was prepared), got {tuple(q.shape)} {q.dtype} on "
                             f"{q.device}")
        cache = self._live_cache()
        if layer.__class__ is not int or not 0 <= layer < cache.num_layers:
            cache._check_layer(layer)   # raises unless an int-like layer in range
            layer = int(layer)
        if out is not None:
            # q matched the prepared shape, dtype and device: out is compared with them (the
            # device by index, as q: each .device builds an object).
            if not isinstance(out, torch.Tensor):
                check_tensor(out, "out", ndim=3)
            if (out.shape != shape or out.dtype != self.q_dtype or not out.is_contiguous() or (
                    out.get_device() != self._cuda_index if self._cuda_index >= 0 else
                    out.device != self.device)):
                raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor "
                                 f"on {q.device} (as q), got {tuple(out.shape)} {out.dtype} on "
                                 f"{out.device}")
        if lay.appending:
            for name, t in (("k_new", k_new), ("v_new", v_new)):
                if not isinstance(t, torch.Tensor):
                    check_tensor(t, name, ndim=3)
                if t.shape != self._kv_shape or t.dtype != cache.dtype or (
                        t.get_device() != self._cuda_index if self._cuda_index >= 0 else
                        t.device != self.device):
                    raise ValueError(f"{name} must be [{Bm}, {cache.num_kv_heads}, {D}] "
                                     f"{cache.dtype} on {self.device}, got {tuple(t.shape)} "
                                     f"{t.dtype} on {t.device}")
            new_kv = torch.stack((k_new.reshape(Bm, self._row), v_new.reshape(Bm, self._row)), 1)
            if self._has_app_own:
                _write_kv(cache, layer, new_kv[self._app_own_rows], self._app_own_slots)
            if self._has_app_send:
                torch.index_select(new_kv, 0, self._app_send_rows, out=self.kv_send)
        elif k_new is not None or v_new is not None:
            raise ValueError("k_new/v_new given but the plan appends nothing (call plan.scale_up)")

        # 1. queries (+ appended K/V) to holders, in one grouped exchange.
        contiguous = q.is_contiguous()
        q_direct = q if lay.q_identity and contiguous else None
        send_direct = lay.q_send_whole and contiguous
        gather = self._q_gather[q_direct is not None, send_direct]
        if gather is not None:
            src, dst, prepared = gather
            if contiguous and backend != "torch":
                prepared.launch(q)  # q checked above
            else:
                self.Q[dst] = q[src]
        if self._fwd:
            yield self._fwd.start(dict.fromkeys(range(self._n_q_sends), q) if send_direct
                                  else None)

        # 2. store others' new tokens, then one partial state over my shard for all held
        #    requests.
        if self._has_app_recv:
            _write_kv(cache, layer, self.kv_recv, self._app_recv_slots)
        if self._partial is not None:
            scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
            self._partial.launch(layer, q_direct, softmax_scale=scale,
                                 deterministic=deterministic, backend=backend)

        # 3. states back to masters: one message [o | lse] per peer.
        if self._back:
            yield self._back.start()

        # 4. exact fp32 merge of every holder's state of my requests.
        if out is None:
            out = torch.empty(Bm, Hq, D, dtype=q.dtype, device=self.device)
        if Bm:
            self._merge(out, backend)
        return out

    def __repr__(self):
        lay = self.layout
        return (f"DecodeRunner(instance {lay.instance}, masters {len(lay.mine)} requests, holds "
                f"{lay.n_held}, peers {sorted(lay.peers())}, q [{self.num_q_heads}, "
                f"{self.head_dim}] {self.q_dtype})")


def _write_kv(cache: PagedKVCache, layer: int, rows: torch.Tensor, slots: torch.Tensor):
    """rows [n, 2, Hkv*D] (K, V of n new tokens) -> the cache's slots of one layer (checked
    layer, operands built by the runner: the unchecked copy, ~3 us less per call than the public
    op's checks and array wrapper)."""
    copy_rows_(rows.transpose(0, 1), None,
               cache.kv[layer].view(2, cache.num_slots, cache.row_elems), slots)
