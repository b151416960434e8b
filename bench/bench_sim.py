"""Simulator speed: 10,000 requests on 8 instances with the esp policy (bar: <= 60 s wall on the
2-core dev machine).

Uses the real esp_kernels.scheduler.ESPScheduler and CostModel.default() when they import, else the
test doubles of tests/sim_fakes.py (then it says so). It also splits the wall time into the time
spent inside the scheduler's add_request / schedule / update and the rest: the simulator's own
event loop, token accounting and checks (which call the scheduler's cheap kv_used / state).

    PYTHONPATH=$PWD python bench/bench_sim.py [--requests 10000] [--instances 8] [--workload sharegpt]
                                              [--rate 20] [--policy esp] [--no-check] [--fake]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from esp_kernels.sim import make_policy, make_requests, run_point  # noqa: E402

_TIMED = ("add_request", "schedule", "update")


def timed_scheduler(cls):
    """A subclass of the scheduler class whose public methods add their wall time to .seconds."""
    def wrap(name):
        inner = getattr(cls, name)

        def method(self, *a, **kw):
            t = time.perf_counter()
            try:
                return inner(self, *a, **kw)
            finally:
                type(self).seconds += time.perf_counter() - t
        return method
    return type(f"Timed{cls.__name__}", (cls,), {"seconds": 0.0, **{n: wrap(n) for n in _TIMED}})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--policy", default="esp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the per-event invariant checks")
    ap.add_argument("--fake", action="store_true", help="use the test doubles even if the scheduler imports")
    args = ap.parse_args()

    source = "real esp_kernels.scheduler"
    try:
        if args.fake:
            raise ImportError("--fake")
        from esp_kernels.scheduler import CostModel, ESPScheduler
        cm, sched_cls = CostModel.default(), ESPScheduler
    except ImportError as e:
        from sim_fakes import FakeCostModel, FakeScheduler
        cm, sched_cls = FakeCostModel(), FakeScheduler
        source = f"TEST DOUBLES (tests/sim_fakes.py; real scheduler unavailable: {e})"
    timed = timed_scheduler(sched_cls)

    t0 = time.perf_counter()
    reqs = make_requests(args.workload, args.requests, args.rate, seed=args.seed)
    t_gen = time.perf_counter() - t0
    policy = make_policy(args.policy, cm, args.instances, workload=args.workload,
                         scheduler_cls=timed if args.policy == "esp" else None)
    t1 = time.perf_counter()
    result, row = run_point(policy, reqs, cm, cut_at_horizon=False, check=not args.no_check)
    wall = time.perf_counter() - t1

    print(f"scheduler/cost model: {source}")
    print(f"{args.requests} {args.workload} requests at {args.rate} req/s on {args.instances} instances, "
          f"policy {policy.describe()}, checks {'off' if args.no_check else 'on'}")
    print(f"workload generation {t_gen:.2f} s; simulation wall {wall:.2f} s (bar <= 60 s) for "
          f"{result.num_events} events, simulated {result.end_time:.0f} s")
    if args.policy == "esp":
        loop = wall - timed.seconds
        print(f"  inside the scheduler: {timed.seconds:.2f} s; simulator loop and accounting: {loop:.2f} s "
              f"= {1e6 * loop / max(result.num_events, 1):.1f} us per event")
    print(f"attainment {row['attainment']:.3f}, throughput {row['throughput_rps']:.2f} req/s, "
          f"TTFT p50 {row['ttft_p50']:.3g} s, TPOT p50 {row['tpot_p50']:.3g} s, "
          f"preemptions {row['preemptions']}")
    return 0 if wall <= 60 else 1


if __name__ == "__main__":
    sys.exit(main())
