"""merge_states bandwidth (bytes read + written) vs device copy bandwidth, same run.

Bar (issue 2): >= 80% of copy bandwidth on large inputs.
"""

import torch

from harness import Recorder, copy_bandwidth_gbs, parse_out, time_cuda

import esp_kernels as esp


def main():
    args = parse_out()
    rec = Recorder("merge_states", args.out)
    copy = copy_bandwidth_gbs()
    T = 4096 if args.quick else 32768
    H, D = 32, 128
    cases = [("2 states fp32 -> fp32", 2, torch.float32, torch.float32),
             ("2 states bf16 -> bf16", 2, torch.bfloat16, torch.bfloat16),
             ("2 states fp32 -> bf16 (finalize)", 2, torch.float32, torch.bfloat16),
             ("8 states fp32 -> bf16 (decode splits)", 8, torch.float32, torch.bfloat16)]
    for name, S, din, dout in cases:
        t = T if S == 2 else T // 4
        o = torch.randn(S, t, H, D, device="cuda").to(din)
        lse = torch.randn(S, t, H, device="cuda")
        out = torch.empty(t, H, D, device="cuda", dtype=dout)
        lse_out = torch.empty(t, H, device="cuda")
        if S == 2:
            fn = lambda: esp.merge_states(o[0], lse[0], o[1], lse[1], out=out, lse_out=lse_out)  # noqa: E731
        else:
            fn = lambda: esp.merge_states_multi(o, lse, out=out, lse_out=lse_out)  # noqa: E731
        tm = time_cuda(fn)
        nbytes = o.numel() * o.element_size() + lse.numel() * 4 + out.numel() * \
            out.element_size() + lse_out.numel() * 4
        gbs = nbytes / (tm["ms"] * 1e-3) / 1e9
        rec.add(f"{name} T={t} H={H} D={D}", "merge_states", gbs, "device copy", copy, "GB/s",
                ms=tm["ms"], p10=tm["p10"], p90=tm["p90"], bytes=nbytes)


if __name__ == "__main__":
    main()
