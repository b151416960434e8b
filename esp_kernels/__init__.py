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
from .decode import (DecodePlan, DecodeRunner, decode_partial, distributed_decode,
                     distributed_decode_steps)
from .kvcache import (CacheOutOfMemory, MigrationError, MigrationPlan, MigrationRunner,
                      PagedKVCache, RetentionPlan, migrate_kv)
from .merge import merge_states, merge_states_, merge_states_multi
from .prefill import RingPrefillRunner, ring_prefill
from . import ops  # noqa: E402  registers torch.ops.esp_kernels.* (torch.compile traces them)


_LAZY = ("scheduler", "runtime", "sim")


def __getattr__(name):
    # The elastic layer (esp.scheduler, esp.runtime, esp.sim) is imported on first use: the
    # kernels' users pay nothing for it.
    if name in _LAZY:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "config", "show_config", "comm", "ops", "reference", "striping",
    "scheduler", "runtime", "sim",
    "merge_states", "merge_states_", "merge_states_multi",
    "ring_prefill", "PagedKVCache", "CacheOutOfMemory", "RetentionPlan", "MigrationPlan",
    "MigrationError", "migrate_kv", "DecodePlan", "decode_partial", "distributed_decode",
    "distributed_decode_steps", "RingPrefillRunner", "DecodeRunner", "MigrationRunner",
]
