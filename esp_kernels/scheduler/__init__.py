"""esp_kernels.scheduler: the ESP cost model and scheduler (pure Python, deterministic, no GPU).

    from esp_kernels.scheduler import CostModel, ESPScheduler
    cm = CostModel.default()                       # shipped H100 profile (see its meta.source)
    sched = ESPScheduler(8, 500_000, cm, page_size=16)
    sched.add_request("r0", prompt_len=30_000, max_new_tokens=256)
    it = sched.schedule(now=0.0)                   # IterationPlan
    sched.update(it)                               # or one batch at a time

cost_model.py documents the cost model and the profile format, scheduler.py the policy and its
knobs (Policy), batching.py the DP, plans.py the plans, fit.py the fitting command.
"""

from .cost_model import CostModel, CostModelError, ModelConfig
from .plans import DecodeBatch, IterationPlan, MigrationOrder, PrefillGroup
from .scheduler import ESPScheduler, Policy

__all__ = ["CostModel", "CostModelError", "ModelConfig", "ESPScheduler", "Policy",
           "PrefillGroup", "DecodeBatch", "MigrationOrder", "IterationPlan"]
