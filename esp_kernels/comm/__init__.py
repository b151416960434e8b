"""Communication groups behind one interface (see group.py):

    esp.comm.local_group(n, device)             # n virtual ranks in this process
    esp.comm.run_local(groups, fn, ...)         # fn on every virtual rank, one thread each
    esp.comm.run_steps(groups, steps)           # step generators of all ranks in this thread
    esp.comm.from_torch(process_group)          # wrap torch.distributed (gloo / nccl)
    esp.comm.init_nccl(rank, world_size, store) # native NCCL world communicator
    ring = g.subgroup([3, 0, 5])                # ordered ESP group, no new communicator
    ring.rank, ring.world_rank                  # ring rank (position), world rank (identity)

A rank that fails aborts its virtual-rank world (its peers raise CommAborted at once); NCCL and
torch.distributed peers raise CommTimeout / CommError within the group's timeout
(docs/DESIGN.md §6).
"""

from .group import CommAborted, CommError, CommTimeout, CompletedWork, Group, Work, drive
from .local import LocalGroup, local_group, run_local, run_steps
from .nccl import init_nccl
from .torch_backend import TorchGroup, from_torch


__all__ = ["CommAborted", "CommError", "CommTimeout", "CompletedWork", "Group", "Work", "drive",
           "LocalGroup", "local_group", "run_local", "run_steps", "TorchGroup", "from_torch",
           "init_nccl"]
