"""The engine of one instance: executes the scheduler's iteration plans on a model.

An Engine holds this instance's world Group handle, its PagedKVCache and the model adapter
(virtual instances of one device share one adapter, i.e. one copy of the weights). Every engine
of the world is given every iteration plan (esp_kernels.scheduler's IterationPlan: prefill groups,
decode batches, migrations, preemptions) and does its part; the same code runs as virtual
instances of one process (runtime.VirtualCluster: only the Group objects differ) or as one process
per GPU (call `execute(plan)` in each, with the same plans in the same order).

One iteration, in order:
  1. `begin`: preempted requests drop their KV here (they are recomputed later by a prefill over
     prompt + generated tokens);
  2. `migrate`: the plan's migrations this instance takes part in (esp.migrate_kv);
  3. `prefill`: if this instance is in a prefill group: embeds its stripes of the group's
     requests (token g of a request on ring rank g mod P), runs every layer's dense parts on
     them with RoPE at the stripes' global positions and attention through esp.ring_prefill,
     which writes the KV the group's retention assigns to each instance into its cache on the
     way; the rank holding a request's last token samples its next token;
  4. `decode_steps`: if this instance is in a decode batch: the batch's DecodePlan with the
     scheduler's append targets (slots allocated here for the tokens appended here); as a master
     it runs the dense layers of its requests (q rows in `mastered_by` order) and samples;
     holders only serve attention (one DecodeRunner per step, its steps per layer);
  5. `exchange_steps`: every instance sends the tokens it sampled to every other one (one small
     message per pair; the layout follows from the plan), so the request state (generated
     tokens, positions) is the same everywhere: whichever instance masters a request next (the
     handoff of the first token from the prefill ring's last-token rank included) or prefills
     it again after a preemption has its tokens. Stop conditions (max new tokens, EOS) are
     applied and finished requests free their KV.

Steps 4 and 5 are step generators (they yield the Work of each exchange) so virtual instances
run them in one thread (esp.comm.run_steps); `execute` drives them with esp.comm.drive.
Consistency with the plan is checked where it is cheap (prefill lengths against prompt +
generated tokens, every shard length against this cache), so a scheduler/engine divergence
raises instead of decoding silently over wrong KV.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import torch

from .._host import int_tensor, upload
from ..comm.group import drive
from ..decode import DecodeRunner
from ..kvcache import PagedKVCache, migrate_kv
from ..prefill import ring_prefill
from ..striping import last_token_location, stripe_indices, stripe_lengths, stripe_positions
from .graphs import DecodeGraphs
from .sampling import GREEDY, SamplingParams, sample


@dataclasses.dataclass
class RequestState:
    rid: Hashable
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    generated: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None   # "length" or "eos"
    recomputes: int = 0

    def tokens(self) -> list[int]:
        """Everything a prefill of this request runs over: prompt + generated tokens."""
        return self.prompt + self.generated


@dataclasses.dataclass
class IterationResult:
    tokens: dict        # request id -> the token it generated in this iteration
    finished: list      # requests that finished in this iteration (KV freed)
    eos: list           # those of them stopped by EOS before max_new_tokens (sched.update's
                        # `finished`)


class Engine:
    """The engine of one instance (see the module docstring).

    group: this instance's handle of the world Group (instances = world ranks);
    adapter: the model (runtime.adapter protocol); cache: this instance's PagedKVCache with the
    adapter's layers, kv heads, head dim, dtype and device; sampler: see runtime.sampling;
    cuda_graphs: run a decode step's dense work (everything but attention) as CUDA graphs, one
    set per padded batch size, captured when first needed (runtime.graphs; ignored on the CPU).
    """

    def __init__(self, group, adapter, cache: PagedKVCache,
                 sampler: Callable[[list, torch.Tensor], torch.Tensor] = sample,
                 cuda_graphs: bool = True):
        want = (adapter.num_layers, adapter.num_kv_heads, adapter.head_dim, adapter.dtype,
                adapter.device)
        have = (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.dtype, cache.device)
        if want != have:
            raise ValueError(f"cache (layers, kv heads, head dim, dtype, device) = {have} does "
                             f"not fit the model's {want}")
        if group.device != cache.device:
            raise ValueError(f"group communicates on {group.device}, the cache is on "
                             f"{cache.device}")
        self.group, self.adapter, self.cache, self.sampler = group, adapter, cache, sampler
        self.instance = group.world_rank
        self._rank_of = {w: i for i, w in enumerate(group.world_ranks)}
        self.requests: dict = {}
        self._sampled: dict = {}     # request id -> 0-d int64 token sampled here this iteration
        # A decode step's dense work as CUDA graphs (graphs.py); eager on the CPU.
        self._graphs = (DecodeGraphs(adapter) if cuda_graphs and cache.device.type == "cuda"
                        else None)

    @classmethod
    def create(cls, group, adapter, kv_slots: int, page_size: int = 16,
               sampler=sample, cuda_graphs: bool = True) -> "Engine":
        """An engine with a new cache of kv_slots token slots (a multiple of page_size)."""
        if kv_slots % page_size:
            raise ValueError(f"kv_slots ({kv_slots}) must be a multiple of page_size "
                             f"({page_size})")
        cache = PagedKVCache(adapter.num_layers, kv_slots // page_size, page_size,
                             adapter.num_kv_heads, adapter.head_dim, adapter.dtype,
                             adapter.device)
        return cls(group, adapter, cache, sampler, cuda_graphs)

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, rid, prompt: Sequence[int], max_new_tokens: int,
                    sampling: SamplingParams | None = None) -> RequestState:
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already known")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"request {rid!r}: prompt must hold at least one token")
        bad = [t for t in prompt if not 0 <= t < self.adapter.vocab_size]
        if bad:
            raise ValueError(f"request {rid!r}: prompt tokens {bad[:4]} are outside the "
                             f"vocabulary [0, {self.adapter.vocab_size})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"request {rid!r}: max_new_tokens must be an int >= 1, got "
                             f"{max_new_tokens!r}")
        limit = self.adapter.max_len
        if limit is not None and len(prompt) + max_new_tokens - 1 > limit:
            raise ValueError(f"request {rid!r}: {len(prompt)} + {max_new_tokens} tokens exceed "
                             f"the {limit} the model serves exactly (its sliding window)")
        st = self.requests[rid] = RequestState(rid, prompt, max_new_tokens, sampling or GREEDY)
        return st

    def _state(self, rid) -> RequestState:
        st = self.requests.get(rid)
        if st is None:
            raise KeyError(f"the plan names request {rid!r}, unknown to instance "
                           f"{self.instance} (add_request it on every engine)")
        if st.finished:
            raise RuntimeError(f"the plan names request {rid!r}, which finished "
                               f"({st.finish_reason})")
        return st

    # ---- one iteration -----------------------------------------------------------------------
    def execute(self, plan) -> IterationResult:
        """The whole iteration on this instance (one process per instance)."""
        self.begin(plan)
        self.migrate(plan)
        self.prefill(plan)
        drive(self.decode_steps(plan))
        return drive(self.exchange_steps(plan))

    def begin(self, plan) -> None:
        self._sampled.clear()
        for rid in plan.preemptions:
            st = self._state(rid)
            self.cache.free(rid)
            st.recomputes += 1

    @torch.no_grad()
    def migrate(self, plan) -> None:
        if not any(self.instance in (m.src, m.dst) for m in plan.migrations):
            return
        mplan = plan.migration_plan()
        # migrate_kv is collective over its group: the instances of the plan, not the world.
        involved = sorted({i for m in plan.migrations for i in (m.src, m.dst)})
        migrate_kv(self.cache, mplan, self.group.subgroup([self._rank_of[i] for i in involved]))

    @torch.no_grad()   # a decorator: it holds in rank threads, where a caller's context does not
    def prefill(self, plan) -> None:
        for pg in plan.prefills:
            if self.instance in pg.instances:
                self._prefill_group(pg)

    def _prefill_group(self, pg) -> None:
        ad, dev = self.adapter, self.cache.device
        ring = self.group.subgroup([self._rank_of[i] for i in pg.instances])
        P, r = ring.size, ring.rank
        seqlens = [int(L) for L in pg.seqlens]
        states = [self._state(rid) for rid in pg.requests]
        tokens = []
        for st, L in zip(states, seqlens):
            if len(st.tokens()) != L:
                raise RuntimeError(f"prefill group {pg.batch_id} prefills request {st.rid!r} "
                                   f"over {L} tokens, but it has {len(st.prompt)} prompt + "
                                   f"{len(st.generated)} generated tokens")
            if self.cache.num_tokens(st.rid):
                raise RuntimeError(f"request {st.rid!r} is prefilled but still holds "
                                   f"{self.cache.num_tokens(st.rid)} KV tokens on instance "
                                   f"{self.instance}")
            tokens += st.tokens()
        retention = pg.retention_plan()
        retention.reserve(self.cache, self.instance)   # fails here, before the ring, if short
        ids = upload(int_tensor(tokens)[stripe_indices(seqlens, P, r)], dev)
        positions = stripe_positions(seqlens, P, r)
        # The length `dynamic` RoPE scales each token by, as transformers' generate computed its
        # K: the prompt's length for a prompt token, position + 1 for a generated one (a
        # recompute after preemption re-prefills those; scaling them all by the new length
        # moved the logits after it by up to 0.08 on a tiny model).
        prompt_lens = torch.repeat_interleave(torch.tensor([len(st.prompt) for st in states]),
                                              torch.tensor(stripe_lengths(seqlens, P, r)))
        lengths = torch.where(positions < prompt_lens, prompt_lens, positions + 1)
        pos = ad.positions(upload(positions, dev), upload(lengths, dev))
        sampled = [(b, row) for b, (rank, row) in enumerate(last_token_location(seqlens, P))
                   if rank == r]
        rows = upload(int_tensor([row for _, row in sampled]), dev)
        h = ad.embed(ids)
        last = ad.num_layers - 1
        for layer in range(ad.num_layers):
            q, k, v = ad.attention_in(layer, h, pos)
            o, _ = ring_prefill(q, k, v, seqlens, ring, retain=(retention, self.cache, layer),
                                softmax_scale=ad.softmax_scale)
            if layer == last:   # its K/V is stored: only the sampled rows go on
                if not sampled:
                    return
                h, o = h[rows], o[rows]
            h = ad.attention_out(layer, h, o)
        self._sample([states[b] for b, _ in sampled], ad.logits(h))

    def _sample(self, states, logits) -> None:
        tokens = self.sampler(states, logits)
        for st, t in zip(states, tokens):
            self._sampled[st.rid] = t

    @torch.no_grad()
    def decode_steps(self, plan):
        """Step generator: this instance's decode batch of the plan, if any."""
        for db in plan.decodes:
            if self.instance in db.instances:
                yield from self._decode_batch(db)

    def _decode_batch(self, db):
        ad, cache, me = self.adapter, self.cache, self.instance
        group = self.group.subgroup([self._rank_of[i] for i in db.instances])
        shards = [{int(i): int(n) for i, n in s} for s in db.shards]
        for rid, s in zip(db.requests, shards):
            if cache.num_tokens(rid) != s.get(me, 0):
                raise RuntimeError(f"decode batch {db.batch_id}: request {rid!r} should hold "
                                   f"{s.get(me, 0)} KV tokens on instance {me}, the cache "
                                   f"holds {cache.num_tokens(rid)}")
        plan = db.decode_plan().allocate_appends(cache, me)
        mine = plan.mastered_by(me)
        states = [self._state(db.requests[i]) for i in mine]
        kv_lens = [sum(shards[i].values()) for i in mine]
        for st, n in zip(states, kv_lens):
            if n != len(st.tokens()) - 1:
                raise RuntimeError(f"decode batch {db.batch_id}: request {st.rid!r} holds {n} "
                                   f"KV tokens, but {len(st.prompt)} prompt + "
                                   f"{len(st.generated)} generated tokens need "
                                   f"{len(st.tokens()) - 1}")
        dev, B = cache.device, len(mine)
        Hq, Hkv, D = ad.num_q_heads, ad.num_kv_heads, ad.head_dim
        graphs = None
        if B:
            # Positions and tokens in one upload that does not drain the stream (`upload`).
            ints = upload(int_tensor(kv_lens + [st.generated[-1] for st in states]), dev)
            positions = ints[:B]
            pos = ad.positions(positions, positions + 1)
            if self._graphs is not None:
                graphs = self._graphs.prepare(B, ints[B:], pos)
            else:
                h = ad.embed(ints[B:])
        else:   # a holder only: no dense work, empty operands
            q = torch.empty(0, Hq, D, dtype=ad.dtype, device=dev)
            k = v = torch.empty(0, Hkv, D, dtype=ad.dtype, device=dev)
        appending = any(t is not None for t in plan.append_to)
        # Attention writes where the next dense piece reads (the graphs' input).
        out = graphs.attn[:B] if graphs is not None else torch.empty(B, Hq, D, dtype=ad.dtype,
                                                                     device=dev)
        # One runner for the step's layers: every step's plan is new (its KV lengths grew), so
        # the one-call form's lookup would compare it by value on every layer and never reuse.
        runner = DecodeRunner(plan, group, cache, Hq, D, ad.dtype)
        for layer in range(ad.num_layers):
            if graphs is not None:
                graphs.graphs[layer].replay()
                q, k, v = (t[:B] for t in graphs.qkv[layer])
            elif B:
                q, k, v = ad.attention_in(layer, h, pos)
            o = yield from runner.steps(
                q, layer, k_new=k if appending else None, v_new=v if appending else None,
                softmax_scale=ad.softmax_scale, out=out)
            if B and graphs is None:
                h = ad.attention_out(layer, h, o)
        if graphs is not None:
            graphs.graphs[-1].replay()
            self._sample(states, graphs.logits[:B])
        elif B:
            self._sample(states, ad.logits(h))

    @torch.no_grad()
    def exchange_steps(self, plan):
        """Step generator: every sampled token to every instance; apply them (module doc)."""
        by_inst: dict = {}
        for pg in plan.prefills:
            P = len(pg.instances)
            for rid, L in zip(pg.requests, pg.seqlens):
                by_inst.setdefault(pg.instances[(int(L) - 1) % P], []).append(rid)
        for db in plan.decodes:
            for rid, m in zip(db.requests, db.masters):
                by_inst.setdefault(m, []).append(rid)
        me, dev = self.instance, self.cache.device
        mine = by_inst.get(me, [])
        missing = [rid for rid in mine if rid not in self._sampled]
        if missing:
            raise RuntimeError(f"instance {me} should have sampled requests {missing[:4]}")
        vec = torch.stack([self._sampled[rid] for rid in mine]).to(torch.int64) if mine else None
        bufs = {w: torch.empty(len(rids), dtype=torch.int64, device=dev)
                for w, rids in by_inst.items() if w != me}
        sends = [] if vec is None else [(vec, self._rank_of[w]) for w in self.group.world_ranks
                                         if w != me]
        recvs = [(buf, self._rank_of[w]) for w, buf in bufs.items()]
        if sends or recvs:
            yield self.group.exchange(sends, recvs)
        tokens = {}
        for w, rids in by_inst.items():
            tokens.update(zip(rids, (vec if w == me else bufs[w]).tolist()))
        self._sampled.clear()
        finished, eos = [], []
        for rid, tok in tokens.items():
            st = self.requests[rid]
            st.generated.append(tok)
            if tok in self.adapter.eos_token_ids or len(st.generated) >= st.max_new_tokens:
                st.finished = True
                st.finish_reason = "length" if len(st.generated) >= st.max_new_tokens else "eos"
                self.cache.free(rid)
                finished.append(rid)
                if st.finish_reason == "eos":
                    eos.append(rid)
        return IterationResult(tokens, finished, eos)
