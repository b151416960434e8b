"""Multi-master distributed decode attention (`esp.distributed_decode`).

Per layer, on every instance of the group:
  1. masters send each holder the queries of the requests it holds (and, for a request whose new
     token this holder stores, that token's K/V) in one grouped exchange;
  2. every holder appends received K/V into its cache, then computes one partial state (o, lse)
     over its shard for all requests it holds, whoever masters them (one kernel launch);
  3. the states go back, o and lse of a master's requests as ONE message per peer;
  4. each master gathers the states of its requests and merges them exactly (fp32), returning
     `out` in the query dtype.

All index maps and buffers depend only on (plan, instance, shapes): they are built once per plan
(`_DecodeStep`) and reused by every layer, so a layer costs a few launches and two exchanges, and
with a fixed plan its buffers keep their addresses (CUDA-graph capturable).

`distributed_decode_steps` is the same layer as a step generator: it yields the Work of each
exchange instead of waiting on it, so `esp.comm.run_steps` can run every virtual rank of a
single-GPU setup in one thread (no GIL contention between rank threads).
"""

from __future__ import annotations

import math

import torch

from .. import _core
from .._checks import FLOAT_DTYPES, check_tensor
from ..comm.group import drive
from ..kvcache.cache import PagedKVCache
from ..kvcache.copy import copy_rows
from ..merge import MAX_KERNEL_STATES, merge_states_multi
from .partial import decode_partial, default_num_splits, new_workspace
from .plan import DecodePlan


def _segments(sizes):
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out, start


class _DecodeStep:
    """Exchange layout and persistent buffers of one instance for one plan."""

    def __init__(self, plan: DecodePlan, group, cache: PagedKVCache, Hq: int, D: int,
                 q_dtype: torch.dtype):
        me = group.world_ranks[group.rank]
        pos_of = {w: i for i, w in enumerate(group.world_ranks)}
        for i, rid in enumerate(plan.requests):
            for inst in [plan.masters[i]] + plan.holders(i):
                if inst not in pos_of:
                    raise ValueError(f"plan puts request {rid!r} on instance {inst}, which is not "
                                     f"in the group {list(group.world_ranks)}")
        dev = cache.device
        self.me, self.device, self.Hq, self.D = me, dev, Hq, D
        Hkv = cache.num_kv_heads
        self.mine = plan.mastered_by(me)                    # my q rows -> request indices
        row_of = {i: r for r, i in enumerate(self.mine)}
        masters = sorted({plan.masters[i] for i in plan.held_by(me)})
        # Holder side: Q_hold rows grouped by master, each group in that master's row order.
        self.hold_by_master = {m: [i for i in plan.mastered_by(m) if me in plan.shards[i]]
                               for m in masters}
        hold_order = [i for m in masters for i in self.hold_by_master[m]]
        seg, n_hold = _segments([len(self.hold_by_master[m]) for m in masters])
        self.hold_seg = dict(zip(masters, seg))
        self.n_hold = n_hold
        # Master side: for each holder of my requests, the rows (of mine) it serves.
        holders = sorted({h for i in self.mine for h in plan.holders(i)})
        self.serve = {h: [i for i in self.mine if h in plan.shards[i]] for h in holders}
        remote = [h for h in holders if h != me]
        rseg, n_recv = _segments([len(self.serve[h]) for h in remote])
        self.recv_seg = dict(zip(remote, rseg))
        self.peers = {h: pos_of[h] for h in set(remote) | set(masters)}

        # Query send buffer: rows of mine for each remote holder, holder segments in order.
        q_rows = [row_of[i] for h in remote for i in self.serve[h]]
        self.q_send_seg = dict(zip(remote, rseg))
        self_rows = [row_of[i] for i in self.hold_by_master.get(me, [])]
        # Holding exactly my own requests, in my row order: the kernel reads q itself.
        self.q_identity = self_rows == list(range(len(self.mine))) and n_hold == len(self.mine)
        # Every remote holder serves all my requests in my order (e.g. each request's KV spread
        # over the whole group): its q message is q itself whenever q is contiguous, posted in
        # place of its q_send segment (no gather launch; the fwd sends start with those
        # segments).
        self.q_send_whole = bool(remote) and all(self.serve[h] == self.mine for h in remote)
        self.q_send_count = len(remote)
        # Q = [q_hold ; q_send] is filled from q by one row gather, keyed by (the kernel reads q
        # in place, the holders' messages are q itself): (rows of q, rows of Q).
        own_start = self.hold_seg.get(me, (0, 0))[0]
        send_dst = list(range(n_hold, n_hold + len(q_rows)))
        own_dst = list(range(own_start, own_start + len(self_rows)))
        idx = lambda rows: torch.tensor(rows, dtype=torch.int32, device=dev)  # noqa: E731
        self.q_gather = {}
        for read in (False, True):
            for send in (False, True):
                src = ([] if read else self_rows) + ([] if send else q_rows)
                dst = ([] if read else own_dst) + ([] if send else send_dst)
                self.q_gather[read, send] = (idx(src), idx(dst))
        # Appends: which of my new tokens go where, and which tokens I store for others.
        self.appending = any(t is not None for t in plan.append_to)
        app_dst = {}
        for i in self.mine:
            t = plan.append_to[i]
            if t is not None:
                app_dst.setdefault(t, []).append(i)
        self.app_self_rows = torch.tensor([row_of[i] for i in app_dst.get(me, [])],
                                          dtype=torch.long, device=dev)
        self.app_self_slots = self._slots(plan, cache, app_dst.get(me, []), dev)
        app_remote = [t for t in sorted(app_dst) if t != me]
        aseg, _ = _segments([len(app_dst[t]) for t in app_remote])
        self.app_send_seg = dict(zip(app_remote, aseg))
        self.app_send_idx = torch.tensor([row_of[i] for t in app_remote for i in app_dst[t]],
                                         dtype=torch.long, device=dev)
        incoming = {m: [i for i in plan.mastered_by(m) if plan.append_to[i] == me]
                    for m in sorted({plan.masters[i] for i, t in enumerate(plan.append_to)
                                     if t == me and plan.masters[i] != me})}
        iseg, n_in = _segments([len(incoming[m]) for m in incoming])
        self.app_recv_seg = dict(zip(incoming, iseg))
        self.app_recv_slots = self._slots(plan, cache, [i for m in incoming for i in incoming[m]],
                                          dev)
        self.row = Hkv * D

        # Block table of the held requests, in Q_hold order.
        hold_ids = [plan.requests[i] for i in hold_order]
        self.block_table, self.kv_lens = cache.block_table(hold_ids)
        max_len = max([plan.shards[i][me] for i in hold_order], default=0)
        self.num_splits = default_num_splits(max(1, n_hold), Hkv, max_len, dev, D)
        self.workspace = None
        if dev.type == "cuda" and n_hold:
            # Zeroed once: every call then leaves its tile counters zero (counters_zeroed below).
            self.workspace = new_workspace(n_hold, Hq, D, self.num_splits, dev).zero_()

        # Buffers. States: one fp32 row [o (Hq*D) | lse (Hq) | pad] per request, so the states of
        # a master's requests are one contiguous message; the lse part is padded to 8 floats so
        # every o row stays 32-byte aligned: the decode kernel's 16-byte stores and the merge's
        # 8-wide loads (which need a row stride that is a multiple of 8; 4 sent Hq = 4, 12, ...
        # down the merge's scalar path).
        # X = [held states ; received ; empty state].
        srow = Hq * D + (Hq + 7) // 8 * 8
        self.srow = srow
        self.X = torch.empty(n_hold + n_recv + 1, srow, dtype=torch.float32, device=dev)
        self.X[-1, : Hq * D] = 0
        self.X[-1, Hq * D:] = -math.inf
        self.X[:, Hq * D + Hq:] = 0  # padding travels with the rows: keep it defined
        self.Q = torch.empty(n_hold + len(q_rows), Hq, D, dtype=q_dtype, device=dev)
        self.q_hold, self.q_send = self.Q[:n_hold], self.Q[n_hold:]
        self.kv_send = torch.empty(self.app_send_idx.numel(), 2, self.row, dtype=cache.dtype,
                                   device=dev)
        self.kv_recv = torch.empty(n_in, 2, self.row, dtype=cache.dtype, device=dev)
        # Gather map for my requests: S = most holders of any of them; missing -> empty row.
        S = max([len(plan.holders(i)) for i in self.mine], default=0)
        self.S = S
        gidx = torch.full((max(S, 1), len(self.mine)), n_hold + n_recv, dtype=torch.long)
        own_pos = {i: own_start + k for k, i in enumerate(self.hold_by_master.get(me, []))}
        for b, i in enumerate(self.mine):
            for s, h in enumerate(plan.holders(i)):
                if h == me:
                    gidx[s, b] = own_pos[i]
                else:
                    gidx[s, b] = n_hold + self.recv_seg[h][0] + self.serve[h].index(i)
        self.gather_idx = gidx.to(dev, torch.int32)  # [S, Bm]: merge_states_gather, index_select

        # Everything a layer needs is fixed by the plan: message lists, merge buffers and, on
        # CUDA, the core's tensor descriptors (building them costs ~2 us each per call otherwise;
        # the per-layer host budget is 30 us).
        self.fwd_sends = [(self.q_send[a:b], self.peers[h]) for h, (a, b) in self.q_send_seg.items()]
        self.fwd_sends += [(self.kv_send[a:b], self.peers[t])
                           for t, (a, b) in self.app_send_seg.items()]
        self.fwd_recvs = [(self.q_hold[a:b], self.peers[m]) for m, (a, b) in self.hold_seg.items()
                          if m != me and b > a]
        self.fwd_recvs += [(self.kv_recv[a:b], self.peers[m])
                           for m, (a, b) in self.app_recv_seg.items()]
        self.back_sends = [(self.X[a:b], self.peers[m]) for m, (a, b) in self.hold_seg.items()
                           if m != me and b > a]
        self.back_recvs = [(self.X[n_hold + a: n_hold + b], self.peers[h])
                           for h, (a, b) in self.recv_seg.items() if b > a]
        self.bind(group)
        Bm = len(self.mine)
        self.o_h, self.lse_h = self.states(slice(0, n_hold))
        self.lse_out = torch.empty(Bm, Hq, dtype=torch.float32, device=dev)
        self.fast = dev.type == "cuda" and _core.has_compiled()
        # The merge kernel gathers at most MAX_KERNEL_STATES states per row from X itself; a
        # request with more holders (or the torch backend) goes through a row gather into G and
        # merge_states_multi, which merges in rounds.
        self.fast_merge = self.fast and max(S, 1) <= MAX_KERNEL_STATES
        self.G = torch.empty(max(S, 1) * Bm, srow, dtype=torch.float32, device=dev)
        self.g_o = self.G.as_strided((max(S, 1), Bm, Hq, D), (Bm * srow, srow, D, 1))
        self.g_lse = self.G.as_strided((max(S, 1), Bm, Hq), (Bm * srow, srow, 1), Hq * D)
        if self.fast:
            d = _core.desc
            self.d_hold = [d(t) for t in (self.q_hold, self.o_h, self.lse_h, self.block_table,
                                          self.kv_lens)]
            self.d_ws = d(self.workspace) if self.workspace is not None else None
            # Per-call operands of fixed shape: the pointer is swapped in on each layer.
            self.d_q_direct = d(self.q_hold)
            self.d_q_rows = _core.raw_desc(0, q_dtype, (1, Bm, Hq * D), (Bm * Hq * D, Hq * D, 1))
            self.d_Q = d(self.Q.view(1, -1, Hq * D))
            self.d_q_gather = {k: (d(a), d(b)) for k, (a, b) in self.q_gather.items()}
            self.d_out = _core.raw_desc(0, q_dtype, (Bm, Hq, D), (Hq * D, D, 1))
            x_o, x_lse = self.states(slice(None))
            self.d_merge = (d(x_o), d(x_lse), d(self.gather_idx), d(self.lse_out))

    def bind(self, group):
        """Check the exchanges' fixed buffers once for this group handle (not on every layer)."""
        self.group = group
        # Both are waited on right after posting (q before the partial, states before the
        # merge): consumed at once.
        self.fwd = group.prepare_exchange(self.fwd_sends, self.fwd_recvs, consume_at_once=True)
        self.back = group.prepare_exchange(self.back_sends, self.back_recvs,
                                           consume_at_once=True)

    def gather_q(self, q: torch.Tensor, read_direct: bool, send_direct: bool, backend: str):
        """My rows of q into Q: my own held ones unless the kernel reads q in place
        (`read_direct`), those for remote holders unless q itself is sent (`send_direct`)."""
        src, dst = self.q_gather[read_direct, send_direct]
        if not src.numel():
            return
        if self.fast and backend != "torch" and q.is_contiguous():
            dq = self.d_q_rows
            dq.ptr = q.data_ptr()
            ds, dd = self.d_q_gather[read_direct, send_direct]
            _core._C.copy_rows(dq, ds, self.d_Q, dd, self.device.index,
                               _core.stream_handle(self.device))
        else:
            self.Q[dst] = q[src]

    def partial(self, cache: PagedKVCache, layer: int, q_direct, scale: float,
                deterministic: bool, backend: str):
        """One partial state over this instance's shard for every request it holds; q_direct:
        the caller's q when the kernel can read it in place (else q_hold was filled)."""
        if self.fast and backend != "torch":
            dk, dv = cache.layer_descs(layer)
            dq, do, dlse, dbt, dlen = self.d_hold
            if q_direct is not None:
                dq = self.d_q_direct
                dq.ptr = q_direct.data_ptr()
            # The workspace is this step's own, zeroed once and only used with its num_splits:
            # its tile counters are zero at every call (no memset launch), since the split merge
            # (or, after a failed launch, decode_partial itself) resets them.
            _core._C.decode_partial(dq, dk, dv, dbt, dlen, do, dlse, self.d_ws, self.num_splits,
                                    scale, deterministic, self.device.index,
                                    _core.stream_handle(self.device), True)
        else:
            k_l, v_l = cache.layer(layer)
            q = self.q_hold if q_direct is None else q_direct
            decode_partial(q, k_l, v_l, self.block_table, self.kv_lens,
                           softmax_scale=scale, num_splits=self.num_splits, o=self.o_h,
                           lse=self.lse_h, workspace=self.workspace,
                           deterministic=deterministic, backend=backend)

    def merge(self, dtype: torch.dtype, backend: str, out=None) -> torch.Tensor:
        """Gather every holder's state of my requests and merge them exactly (fp32)."""
        fast = self.fast_merge and backend != "torch"
        if out is None:
            out = torch.empty(len(self.mine), self.Hq, self.D, dtype=dtype, device=self.device)
        if fast:
            x_o, x_lse, rows, lse_out = self.d_merge
            self.d_out.ptr = out.data_ptr()
            _core._C.merge_states_gather(x_o, x_lse, rows, self.d_out, lse_out, self.device.index,
                                         _core.stream_handle(self.device))
        else:
            torch.index_select(self.X, 0, self.gather_idx.view(-1), out=self.G)
            merge_states_multi(self.g_o, self.g_lse, out=out, lse_out=self.lse_out,
                               backend="torch" if backend == "torch" else "auto")
        return out

    @staticmethod
    def _slots(plan, cache, idxs, dev):
        slots = [plan.append_slots[plan.requests[i]] for i in idxs]
        return torch.tensor(slots, dtype=torch.int32, device=dev)

    def states(self, rows: slice):
        """(o [n, Hq, D], lse [n, Hq]) strided views of X's rows."""
        x = self.X[rows]
        hd = self.Hq * self.D
        o = x.as_strided((x.shape[0], self.Hq, self.D), (self.srow, self.D, 1))
        lse = x.as_strided((x.shape[0], self.Hq), (self.srow, 1), x.storage_offset() + hd)
        return o, lse


def _write_kv(cache: PagedKVCache, layer: int, rows: torch.Tensor, slots: torch.Tensor):
    """rows [n, 2, Hkv*D] (K, V of n new tokens) -> the cache's slots of one layer."""
    copy_rows(rows.transpose(0, 1), None, cache.slot_rows(layer), slots)


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

    On virtual ranks of one process, `esp.comm.run_steps(groups, [distributed_decode_steps(...)
    for each rank])` runs the same layer on every rank from one thread.
    """
    return drive(distributed_decode_steps(
        q, cache, plan, group, layer=layer, k_new=k_new, v_new=v_new, softmax_scale=softmax_scale,
        deterministic=deterministic, backend=backend, out=out))


def distributed_decode_steps(q, cache: PagedKVCache, plan: DecodePlan, group, *, layer: int = 0,
                             k_new=None, v_new=None, softmax_scale=None, deterministic=False,
                             backend="auto", out=None):
    """`distributed_decode` as a step generator: yields the Work of each exchange it posts
    (resume it once the Work can be waited on; `esp.comm.drive` / `run_steps` do) and returns
    out. Arguments are checked when it first runs."""
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    if not isinstance(plan, DecodePlan):
        raise TypeError(f"plan must be a DecodePlan, got {type(plan).__name__}")
    if q.device != cache.device or q.device != group.device:
        raise ValueError(f"q ({q.device}), cache ({cache.device}) and group ({group.device}) "
                         "must share one device")
    cache._check_layer(layer)
    Bm, Hq, D = q.shape
    if D != cache.head_dim or Hq % cache.num_kv_heads:
        raise ValueError(f"q [.., {Hq}, {D}] does not fit the cache's {cache.num_kv_heads} kv "
                         f"heads of dim {cache.head_dim}")
    if out is not None:
        check_tensor(out, "out", ndim=3)
        if (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on "
                             f"{q.device} (as q), got {tuple(out.shape)} {out.dtype} on "
                             f"{out.device}")
    me = group.world_ranks[group.rank]
    key = (me, tuple(group.world_ranks), id(cache), Hq, D, q.dtype)
    step = plan._steps.get(key)
    if step is None:
        step = plan._steps[key] = _DecodeStep(plan, group, cache, Hq, D, q.dtype)
    elif step.group is not group:
        step.bind(group)
    if Bm != len(step.mine):
        raise ValueError(f"q has {Bm} rows but this instance masters {len(step.mine)} requests "
                         "of the plan")
    if step.appending:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_tensor(t, name, ndim=3)
            if tuple(t.shape) != (Bm, cache.num_kv_heads, D) or t.dtype != cache.dtype:
                raise ValueError(f"{name} must be [{Bm}, {cache.num_kv_heads}, {D}] "
                                 f"{cache.dtype}, got {tuple(t.shape)} {t.dtype}")
        row = cache.num_kv_heads * D
        new_kv = torch.stack((k_new.reshape(Bm, row), v_new.reshape(Bm, row)), 1)
        if step.app_self_slots.numel():
            _write_kv(cache, layer, new_kv[step.app_self_rows], step.app_self_slots)
        if step.app_send_idx.numel():
            torch.index_select(new_kv, 0, step.app_send_idx, out=step.kv_send)
    elif k_new is not None or v_new is not None:
        raise ValueError("k_new/v_new given but the plan appends nothing (call plan.scale_up)")

    # 1. queries (+ appended K/V) to holders, in one grouped exchange.
    contiguous = q.is_contiguous()
    q_direct = q if step.q_identity and contiguous else None
    send_direct = step.q_send_whole and contiguous
    step.gather_q(q, q_direct is not None, send_direct, backend)
    if step.fwd:
        yield step.fwd.start(dict.fromkeys(range(step.q_send_count), q) if send_direct else None)

    # 2. store others' new tokens, then one partial state over my shard for all held requests.
    if step.app_recv_slots.numel():
        _write_kv(cache, layer, step.kv_recv, step.app_recv_slots)
    if step.n_hold:
        step.partial(cache, layer, q_direct,
                     D ** -0.5 if softmax_scale is None else float(softmax_scale), deterministic,
                     backend)

    # 3. states back to masters: one message [o | lse] per peer.
    if step.back:
        yield step.back.start()

    # 4. exact fp32 merge of every holder's state of my requests.
    if Bm == 0:
        return q.new_empty(q.shape) if out is None else out
    return step.merge(q.dtype, backend, out)
