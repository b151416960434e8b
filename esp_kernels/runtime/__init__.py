"""The ESP runtime: engines that execute the scheduler's iteration plans on a model.

    from esp_kernels.runtime import LlamaAdapter, VirtualCluster, serve
    adapter = LlamaAdapter.from_hf(hf_model)          # or .from_dir(path) / .random(cfg)
    cluster = VirtualCluster(adapter, num_instances=4, kv_slots_per_instance=4096)
    result = serve(cluster, scheduler, workload)      # an esp_kernels.scheduler.ESPScheduler

One `Engine` per instance (engine.py: what an iteration does); `VirtualCluster` runs N of them on
one device with shared weights; a process per GPU runs one `Engine` over a torch.distributed or
NCCL world Group. The model-specific code is an adapter (adapter.py: the protocol; llama.py:
Llama, Mistral, Qwen2).
"""

from .adapter import ModelAdapter
from .cluster import PhaseTimes, VirtualCluster
from .engine import Engine, IterationResult, RequestState
from .llama import PRESETS, LlamaAdapter
from .rope import Rope
from .sampling import GREEDY, SamplingParams, sample
from .serve import Arrival, IterationRecord, RequestRecord, ServeResult, serve

__all__ = ["ModelAdapter", "VirtualCluster", "PhaseTimes", "Engine", "IterationResult",
           "RequestState", "PRESETS", "LlamaAdapter", "Rope", "GREEDY", "SamplingParams",
           "sample", "Arrival", "IterationRecord", "RequestRecord", "ServeResult", "serve"]
