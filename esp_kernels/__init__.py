"""esp_kernels: kernels and communication for elastic sequence parallelism (ESP).

    import esp_kernels as esp
    out, lse = esp.reference.attention(q, k, v, cu_q, cu_k)
    o, lse = esp.merge_states(o_a, lse_a, o_b, lse_b)
    groups = esp.comm.local_group(4, "cuda")          # or from_torch / init_nccl
    out, lse = esp.ring_prefill(q, k, v, seqlens, ring, retain=(plan, cache, layer))
    out = esp.distributed_decode(q, cache, decode_plan, group, layer=layer)
    esp.migrate_kv(cache, migration_plan, group)
    sched = esp.scheduler.ESPScheduler(8, kv_slots, esp.scheduler.CostModel.default())

See README.md for shapes, dtypes and the support matrix.
"""

from . import comm, reference, striping
from .config import __version__, config, show_config
from .decode import DecodePlan, decode_partial, distributed_decode, distributed_decode_steps
from .kvcache import (CacheOutOfMemory, MigrationError, MigrationPlan, PagedKVCache,
                      RetentionPlan, migrate_kv)
from .merge import merge_states, merge_states_, merge_states_multi
from .prefill import ring_prefill


def __getattr__(name):
    # esp.scheduler is pure Python and needs nothing above; imported on first use.
    if name == "scheduler":
        import importlib
        return importlib.import_module(".scheduler", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "config", "show_config", "comm", "reference", "striping", "scheduler",
    "merge_states", "merge_states_", "merge_states_multi",
    "ring_prefill", "PagedKVCache", "CacheOutOfMemory", "RetentionPlan", "MigrationPlan",
    "MigrationError", "migrate_kv", "DecodePlan", "decode_partial", "distributed_decode",
    "distributed_decode_steps",
]
