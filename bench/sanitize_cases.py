"""Small calls of every compiled kernel (esp_kernels._C), run under compute-sanitizer (memcheck,
racecheck) by bench/gpu_check.sh. Each call is checked against the torch path so a silent error
also shows. The ring step has no compiled kernel (Gluon / Triton, tested in tests/)."""

import sys
import os

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import esp_kernels as esp  # noqa: E402
from esp_kernels.decode.partial import decode_partial  # noqa: E402
from esp_kernels.kvcache import copy_rows  # noqa: E402
from esp_kernels.testing import rel_err  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    # merge_states
    o = torch.randn(3, 37, 4, 64, generator=g).to(dev)
    lse = torch.randn(3, 37, 4, generator=g).to(dev)
    lse[1, ::3] = float("-inf")
    a, _ = esp.merge_states_multi(o, lse)
    b, _ = esp.merge_states_multi(o, lse, backend="torch")
    print("merge_states", rel_err(a, b))
    # decode_partial with splits and page size 16 / 1
    for ps in (16, 1):
        cache = esp.PagedKVCache(1, 200 // ps + 8, ps, 2, 128, torch.bfloat16, dev)
        cache.kv.normal_()
        for r, n in enumerate((0, 1, 65, 130)):
            cache.allocate(r, range(n))
        bt, kl = cache.block_table([0, 1, 2, 3])
        k, v = cache.layer(0)
        q = torch.randn(4, 8, 128, generator=g).to(dev, torch.bfloat16)
        b = decode_partial(q, k, v, bt, kl, backend="torch")[0]
        for splits in (3, 20):
            a = decode_partial(q, k, v, bt, kl, num_splits=splits)[0]
            print("decode_partial page", ps, "splits", splits, rel_err(a, b))
    # copy_rows
    src = torch.randn(4, 50, 256, generator=g).to(dev, torch.bfloat16)
    dst = torch.zeros(4, 80, 256, device=dev, dtype=torch.bfloat16)
    idx = torch.randperm(80, generator=g)[:50].to(torch.int32).to(dev)
    copy_rows(src, None, dst, idx)
    print("copy_rows", bool(torch.equal(dst[:, idx.long()], src)))
    # virtual-rank messages (one copy kernel per post): 16-byte aligned with a tail, unaligned
    # byte offsets, empty, and one large enough for several blocks per message
    groups = esp.comm.local_group(3, dev)
    base = torch.randint(0, 255, (300_000,), generator=g, dtype=torch.uint8).to(dev)
    views = [base[0:4100], base[5:1000], base[0:0], base[16:300_000]]

    def rank(group):
        P, r = group.size, group.rank
        bufs = [torch.zeros(t.numel(), dtype=torch.uint8, device=dev) for t in views]
        yield group.exchange([(t, (r + 1) % P) for t in views],
                             [(b, (r - 1) % P) for b in bufs])
        return all(torch.equal(b, t) for b, t in zip(bufs, views))

    print("virtual-rank copies", esp.comm.run_steps(groups, [rank(x) for x in groups]))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
