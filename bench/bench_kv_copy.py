"""KV pack / unpack for migration (all layers, one request's tokens in shuffled pages) vs device
copy bandwidth, bytes read + written, page sizes 1 and 16. Bar (issue 5): >= 80% of copy."""

import torch

from harness import Recorder, copy_bandwidth_gbs, parse_out, time_cuda

from esp_kernels.kvcache import copy_rows


def main():
    args = parse_out()
    rec = Recorder("kv_pack_unpack", args.out)
    copy = copy_bandwidth_gbs()
    layers, Hkv, D = 16, 8, 128
    n = 4096 if args.quick else 16384
    gen = torch.Generator(device="cuda").manual_seed(0)
    for page_size in (16, 1):
        pages = n // page_size + 64
        kv = torch.randn(layers, 2, pages, page_size, Hkv, D, device="cuda",
                         dtype=torch.bfloat16, generator=gen)
        rows = kv.view(layers * 2, pages * page_size, Hkv * D)
        page_perm = torch.randperm(pages, device="cuda", generator=gen)[: n // page_size]
        slots = (page_perm[:, None] * page_size + torch.arange(page_size, device="cuda")
                 ).flatten().to(torch.int32)
        staged = torch.empty(layers * 2, n, Hkv * D, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * staged.numel() * 2
        t_pack = time_cuda(lambda: copy_rows(rows, slots, staged, None))
        t_unpack = time_cuda(lambda: copy_rows(staged, None, rows, slots))
        assert torch.equal(staged, rows[:, slots.long()])
        for name, t in (("pack", t_pack), ("unpack", t_unpack)):
            rec.add(f"{name} {n} tokens x {layers} layers, page {page_size}", f"copy_rows {name}",
                    nbytes / (t["ms"] * 1e-3) / 1e9, "device copy", copy, "GB/s", ms=t["ms"],
                    bytes=nbytes)


if __name__ == "__main__":
    main()
