"""Conservation, determinism and exact single-request timing of every policy; the engine's own checks.

The `esp` cases run over the scheduler classes of `scheduler_impl`: the test double of
tests/sim_fakes.py always, the real esp_kernels.scheduler.ESPScheduler (with its CostModel.default())
whenever it imports.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esp_kernels.sim import (ChunkedPrefillPolicy, DisaggregatedPolicy, ESPPolicy, Launch, Policy,
                             SimulationError, Simulator, StaticSPPolicy, kv_capacity_tokens, make_requests)
from esp_kernels.sim.baselines import WATERMARK
from esp_kernels.sim.workloads import Request
from sim_fakes import FakeCostModel, FakeScheduler, IterationPlan

CM = FakeCostModel()


def _real_or_skip():
    try:
        from esp_kernels.scheduler import CostModel, ESPScheduler
    except ImportError as e:
        return pytest.param(None, id="real", marks=pytest.mark.skip(
            reason=f"esp_kernels.scheduler not importable ({e}); the real-scheduler case runs once it is merged"))
    return pytest.param((ESPScheduler, CostModel.default), id="real")


@pytest.fixture(params=[pytest.param((FakeScheduler, FakeCostModel), id="fake"), _real_or_skip()])
def scheduler_impl(request):
    """(scheduler class, cost model) pair for the esp policy."""
    cls, make_cm = request.param
    return cls, make_cm()


def _run(policy, reqs, **kw):
    res = Simulator(policy, reqs, **kw).run()
    assert res.unfinished == 0
    assert res.generated.tolist() == [r.output_len for r in reqs]
    assert np.all(res.first_token <= res.finish)
    assert np.all(res.first_token >= np.array([r.arrival for r in reqs]))
    return res


def _tight_requests(n=60, seed=0):
    """Requests that oversubscribe a 6,000-token replica (peak 700-2,100 tokens each, all at once)."""
    rng = np.random.default_rng(seed)
    return [Request(i, 0.01 * i, int(rng.integers(500, 1500)), int(rng.integers(200, 600))) for i in range(n)]


BASELINES = {
    "static_sp_8": lambda **kw: StaticSPPolicy(CM, 8, **kw),
    "static_sp_2x4": lambda **kw: StaticSPPolicy(CM, 8, tp=2, **kw),
    "chunked_1x8": lambda **kw: ChunkedPrefillPolicy(CM, 8, chunk_size=2048, **kw),
    "chunked_8x1": lambda **kw: ChunkedPrefillPolicy(CM, 8, tp=1, chunk_size=256, **kw),
    "disagg_4_4": lambda **kw: DisaggregatedPolicy(CM, 8, **kw),
    "disagg_2x1_3x2": lambda **kw: DisaggregatedPolicy(CM, 8, prefill_instances=2, prefill_tp=1,
                                                       decode_tp=2, **kw),
}


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("workload,rate,n", [("sharegpt", 30.0, 300), ("leval", 2.0, 60), ("lveval", 0.1, 12),
                                             ("mixed", 0.5, 45)])
def test_baseline_conservation(name, workload, rate, n):
    reqs = make_requests(workload, n, rate, seed=1)
    policy = BASELINES[name]()
    one_gpu = kv_capacity_tokens(CM, tp=1)
    if name == "chunked_8x1" and any(r.prompt_len + r.output_len - 1 > one_gpu for r in reqs):
        with pytest.raises(ValueError, match="tensor-parallel"):      # LV-Eval's longest exceed one GPU
            _run(policy, reqs)
        return
    _run(policy, reqs)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_preempts_and_recomputes_under_memory_pressure(name):
    res = _run(BASELINES[name](kv_tokens_per_replica=6000), _tight_requests())
    assert res.preemptions.sum() > 0
    used = [u for samples in res.kv_samples for _, u in samples]
    assert max(used) <= 6000 and max(used) > 0


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_deterministic(name):
    reqs = make_requests("mixed", 45, 0.5, seed=2)
    a, b = _run(BASELINES[name](), reqs), _run(BASELINES[name](), reqs)
    assert np.array_equal(a.finish, b.finish) and np.array_equal(a.first_token, b.first_token)
    assert a.launches == b.launches


def _decode_sum(prompt, out, group, masters):
    return sum(CM.decode_time([prompt + k], group, masters) for k in range(out - 1))


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_static_sp_single_request_timing(tp):
    r = Request(0, 1.0, 30_000, 40)
    res = _run(StaticSPPolicy(CM, 8, tp=tp), [r])
    assert res.first_token[0] == pytest.approx(1.0 + CM.prefill_time(tp, [30_000]))
    assert res.finish[0] == pytest.approx(res.first_token[0] + _decode_sum(30_000, 40, tp, tp))


@pytest.mark.parametrize("chunk", [256, 4096, 100_000])
def test_chunked_single_request_costs_one_prefill(chunk):
    """Chunk costs telescope: a request alone pays exactly one full prefill, however it is chunked."""
    r = Request(0, 0.0, 30_000, 40)
    res = _run(ChunkedPrefillPolicy(CM, 8, tp=4, chunk_size=chunk), [r])
    assert res.first_token[0] == pytest.approx(CM.prefill_time(4, [30_000]), rel=1e-9)
    assert res.finish[0] == pytest.approx(res.first_token[0] + _decode_sum(30_000, 40, 4, 4))
    # ceil(L / chunk) prefill iterations, then output_len - 1 decode iterations
    assert len(res.launches) == math.ceil(30_000 / chunk) + 39


def test_chunked_iteration_mixes_decodes_and_a_chunk():
    """Two requests: while the second is prefilled in chunks, the first decodes in the same iterations,
    and each iteration's prefill tokens + decodes stay within the chunk budget."""
    reqs = [Request(0, 0.0, 100, 200), Request(1, 0.05, 5000, 5)]
    res = _run(ChunkedPrefillPolicy(CM, 1, tp=1, chunk_size=512), reqs)
    assert res.finish[0] > res.first_token[1]           # request 0 decodes all through 1's prefill
    during = [l for l in res.launches if l[0] >= 0.05 and l[1] <= res.first_token[1]]
    assert len(during) == math.ceil(5000 / (512 - 1))   # one decode + 511 prefill tokens each
    # each such iteration costs request 0's decode step plus its chunk's share of the prefill
    assert sum(l[1] - l[0] for l in during) > CM.prefill_time(1, [5000])


def test_disaggregated_single_request_timing():
    r = Request(0, 0.0, 30_000, 40)
    pol = DisaggregatedPolicy(CM, 8, prefill_instances=4, prefill_tp=4, decode_tp=2)
    res = _run(pol, [r])
    assert res.first_token[0] == pytest.approx(CM.prefill_time(4, [30_000]))
    transfer = CM.migration_time(30_000 // 2)                 # 2 GPU pairs move the TP shards
    assert res.finish[0] == pytest.approx(res.first_token[0] + transfer + _decode_sum(30_000, 40, 2, 2))
    kinds = [l[3] for l in res.launches]
    assert kinds[:2] == ["prefill", "transfer"] and set(kinds[2:]) == {"decode"}


def test_disaggregated_decode_preemption_recomputes_in_prefill_pool():
    pol = DisaggregatedPolicy(CM, 4, prefill_instances=2, prefill_tp=2, decode_tp=2, kv_tokens_per_replica=6000)
    res = _run(pol, _tight_requests(40, seed=3))
    assert res.preemptions.sum() > 0
    assert sum(1 for l in res.launches if l[3] == "transfer") > 40     # recomputed requests move again


def test_baseline_config_errors():
    with pytest.raises(ValueError, match="tp=3 must divide"):
        StaticSPPolicy(CM, 8, tp=3)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedPrefillPolicy(CM, 8, chunk_size=0)
    with pytest.raises(ValueError, match="prefill_instances"):
        DisaggregatedPolicy(CM, 8, prefill_instances=8)
    with pytest.raises(ValueError, match="decode_tp"):
        DisaggregatedPolicy(CM, 8, decode_tp=3)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_refuses_what_an_empty_replica_would_not_admit(name):
    """A request between the capacity less the watermark and the capacity used to pass the
    arrival check and then wait at the head of its queue forever (a stalled run)."""
    pol = BASELINES[name](kv_tokens_per_replica=1008)
    with pytest.raises(ValueError, match=r"request 0 needs 1000 KV tokens \(1008 in pages of "
                                         r"16\) but a .* replica admits at most 997.92"):
        Simulator(pol, [Request(0, 0.0, 1000, 1), Request(1, 0.1, 10, 5)]).run()
    _run(BASELINES[name](kv_tokens_per_replica=1024),
         [Request(0, 0.0, 1000, 1), Request(1, 0.1, 10, 5)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 3000), st.integers(1, 200)), min_size=1, max_size=25),
       st.sampled_from(list(BASELINES) + ["esp_fake"]), st.sampled_from([None, 4000, 20_000]))
def test_conservation_property(specs, name, kv):
    specs.sort()
    reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(specs)]
    if name == "esp_fake":
        pol = ESPPolicy(CM, 8, kv_slots_per_instance=kv, scheduler_cls=FakeScheduler)
    else:
        pol = BASELINES[name](**({} if kv is None else {"kv_tokens_per_replica": kv}))
    # A baseline's replica admits up to its capacity less the watermark (an empty one too).
    limit = None if kv is None else kv if name == "esp_fake" else kv - WATERMARK * kv
    if limit is not None and any(-(-(r.prompt_len + r.output_len - 1) // 16) * 16 > limit
                                 for r in reqs):
        with pytest.raises(ValueError):
            Simulator(pol, reqs).run()
        return
    _run(pol, reqs)


# --- the esp policy over the real scheduler (when merged) and the fake ---------------------------------

@pytest.mark.parametrize("workload,rate,n", [("sharegpt", 30.0, 300), ("leval", 2.0, 40), ("mixed", 0.5, 30)])
def test_esp_conservation(scheduler_impl, workload, rate, n):
    cls, cm = scheduler_impl
    reqs = make_requests(workload, n, rate, seed=4)
    res = _run(ESPPolicy(cm, 8, scheduler_cls=cls), reqs)
    assert res.busy_time.max() > 0


def test_esp_lveval_spans_instances(scheduler_impl):
    """LV-Eval prompts up to ~500k tokens: the real scheduler spreads them over several instances; the
    fake, which keeps a request on one instance, refuses the ones that do not fit one."""
    cls, cm = scheduler_impl
    reqs = make_requests("lveval", 10, 0.05, seed=5)
    pol = ESPPolicy(cm, 8, kv_slots_per_instance=200_000, scheduler_cls=cls)
    if cls is FakeScheduler:
        with pytest.raises(ValueError, match="never fits"):
            Simulator(pol, reqs).run()
    else:
        _run(pol, reqs)


def test_esp_memory_pressure(scheduler_impl):
    cls, cm = scheduler_impl
    res = _run(ESPPolicy(cm, 4, kv_slots_per_instance=6000, scheduler_cls=cls), _tight_requests(80, seed=6))
    used = [u for samples in res.kv_samples for _, u in samples]
    assert 0 < max(used) <= 6000


def test_esp_deterministic(scheduler_impl):
    cls, cm = scheduler_impl
    reqs = make_requests("sharegpt", 200, 20.0, seed=7)
    a = _run(ESPPolicy(cm, 8, scheduler_cls=cls), reqs)
    b = _run(ESPPolicy(cm, 8, scheduler_cls=cls), reqs)
    assert np.array_equal(a.finish, b.finish) and a.launches == b.launches


def test_esp_many_instances(scheduler_impl):
    cls, cm = scheduler_impl
    reqs = make_requests("sharegpt", 400, 200.0, seed=8)
    res = _run(ESPPolicy(cm, 64, scheduler_cls=cls), reqs)
    assert (res.busy_time > 0).sum() > 8


def test_esp_fake_single_request_timing():
    r = Request(0, 0.5, 20_000, 30)
    res = _run(ESPPolicy(CM, 8, scheduler_cls=FakeScheduler), [r])
    assert res.first_token[0] == pytest.approx(0.5 + CM.prefill_time(1, [20_000]))
    assert res.finish[0] == pytest.approx(res.first_token[0] + _decode_sum(20_000, 30, 1, 1))


def test_many_instances_baselines():
    reqs = make_requests("leval", 200, 20.0, seed=9)
    _run(ChunkedPrefillPolicy(CM, 64, tp=8, chunk_size=2048), reqs)
    _run(DisaggregatedPolicy(CM, 64, prefill_instances=32, prefill_tp=4, decode_tp=4), reqs)


# --- the engine's invariant checks fire -------------------------------------------------------------

class _Toy(Policy):
    """One instance; each request is served by one launch that emits all its tokens."""
    name = "toy"
    num_instances = 1

    def __init__(self, double_book=False, kv=0.0, extra_token=False, idle=False):
        self.double_book, self.kv, self.extra_token, self.idle = double_book, kv, extra_token, idle
        self.queue, self.busy = [], False

    def on_arrival(self, request, now):
        self.queue.append(request)

    def schedule(self, now):
        if self.idle or not self.queue or (self.busy and not self.double_book):
            return []
        self.busy = True
        return [Launch((0,), now, now + 1.0, "prefill", self.queue.pop(0))]

    def on_complete(self, launch, now):
        self.busy = False
        r = launch.payload
        for _ in range(r.output_len + (1 if self.extra_token else 0)):
            self.rec.token(r.rid, now)

    def kv_used(self, i):
        return self.kv

    def kv_capacity(self, i):
        return 100.0


REQ3 = [Request(0, 0.0, 10, 2), Request(1, 0.0, 10, 2), Request(2, 0.5, 10, 3)]


def test_engine_serves_the_toy_policy():
    res = _run(_Toy(), REQ3)
    assert res.finish.tolist() == [1.0, 2.0, 3.0]
    assert res.busy_time.tolist() == [3.0]


@pytest.mark.parametrize("kw,match", [({"double_book": True}, "two batches"), ({"kv": 101.0}, "capacity"),
                                      ({"extra_token": True}, "token 3 of 2"), ({"idle": True}, "stalled")])
def test_engine_checks(kw, match):
    with pytest.raises(SimulationError, match=match):
        Simulator(_Toy(**kw), REQ3).run()


def test_engine_max_time_cuts_the_run():
    res = Simulator(_Toy(), REQ3, max_time=1.5).run()
    assert res.unfinished == 2 and res.finish[0] == 1.0
    assert res.end_time == 1.0 and res.busy_time.tolist() == [1.0]    # the batch running past the cut


def test_engine_rejects_unsorted_requests():
    with pytest.raises(ValueError, match="rid 0..n-1"):
        Simulator(_Toy(), [Request(1, 0.0, 1, 1)])
    with pytest.raises(ValueError, match="sorted by arrival"):
        Simulator(_Toy(), [Request(0, 1.0, 1, 1), Request(1, 0.0, 1, 1)])


# --- how the esp policy reads plans (migrations, batch-less plans) --------------------------------------

class _Migration:
    def __init__(self, request, start, end, src, dst):
        self.request, self.start, self.end, self.src, self.dst = request, start, end, src, dst


class _MigratingFake(FakeScheduler):
    """Answers every odd call with a plan holding only a 1000-token migration 0 -> 1 (no batches), and
    adds that migration to every plan that prefills on instance 0."""

    calls = 0

    def schedule(self, now=0.0):
        self.calls += 1
        mig = (_Migration(0, 0, 1000, 0, 1),)
        if self.calls % 2:
            return IterationPlan(-1, now, (), (), mig, (), 0.0)
        plan = super().schedule(now)
        if any(0 in p.instances for p in plan.prefills):
            plan = IterationPlan(plan.index, now, plan.prefills, plan.decodes, mig, (), plan.predicted_time)
        return plan


def test_esp_migrations_delay_their_batches_and_batchless_plans_are_retried():
    r = Request(0, 0.0, 20_000, 3)
    res = _run(ESPPolicy(CM, 2, scheduler_cls=_MigratingFake), [r])   # stalls unless batch-less plans are retried
    assert res.launches[0][2] == (0,)           # the prefill ran on instance 0, behind the migration
    assert res.first_token[0] == pytest.approx(CM.prefill_time(1, [20_000]) + CM.migration_time(1000))
    # decode plans carry no migration: undelayed
    assert res.finish[0] == pytest.approx(res.first_token[0] + _decode_sum(20_000, 3, 1, 1))


class _LyingFake(FakeScheduler):
    def state(self, rid):
        return "decoding"


def test_esp_checks_the_scheduler_agrees_on_finished_requests():
    with pytest.raises(SimulationError, match="the scheduler says 'decoding'"):
        Simulator(ESPPolicy(CM, 2, scheduler_cls=_LyingFake), [Request(0, 0.0, 100, 3)]).run()
