"""Smallest native-NCCL use: a world of 1, one send-to-self exchange (gpu_check.sh nccl_diag)."""

import torch
import torch.distributed as dist

from esp_kernels.comm import init_nccl

group = init_nccl(0, 1, dist.HashStore(), device=torch.device("cuda", 0), timeout=30)
print("created", group)
x = torch.arange(1024, device="cuda", dtype=torch.float32)
y = torch.empty_like(x)
group.exchange(sends=[(x, 0)], recvs=[(y, 0)]).wait()
print("send-to-self ok:", bool(torch.equal(x, y)))
group.close()
