"""Run a function on N gloo processes (CPU tier of the multi-rank tests).

`run_gloo(n, fn, *args)` spawns n processes, each initializing a gloo process group and calling
fn(group, *args) with `group = esp.comm.from_torch()`. fn must be a module-level function (it is
pickled by reference). Returns the per-rank results; a failure on any rank raises AssertionError
with that rank's traceback. Process launches cost seconds on CI's two cores, so tests batch many
cases into one launch.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp


def _worker(rank, world_size, tmp, fn, args, timeout_s):
    import torch
    import torch.distributed as dist

    import esp_kernels as esp

    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        group = esp.comm.from_torch(timeout=timeout_s)
        result = ("ok", fn(group, *args))
    except BaseException:  # reported to the parent, which fails the test
        result = ("err", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run_gloo(world_size: int, fn, *args, timeout_s: float = 60.0, join_s: float = 300.0):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world_size, tmp, fn, args, timeout_s))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise AssertionError(f"ranks {hung} of {world_size} did not finish in {join_s} s")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {procs[r].exitcode}, no result")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "err":
                errors.append(f"rank {r}:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results
