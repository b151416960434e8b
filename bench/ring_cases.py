"""Shared setup of the ring benchmarks: one long request striped over P ranks, and all P x P
steps of the ring run back to back on one stream (the "step kernels alone" time)."""

import torch

from ring_flash_style import step_slices

from esp_kernels.testing import cu_seqlens, stripe


def random_qkv(L, Hq, Hkv, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(L, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
                 for h in (Hq, Hkv, Hkv))


class OneRequestStep:
    """One request of n tokens for the step diagnostics: q and all its keys and values (bf16), a
    zeroed fp32 state (o, lse) for its queries, and `per_tile_us(ms)`, a step's time spread over
    its tiles on all SMs (128 (token, head) rows a tile in ours, 128 tokens x 1 head in FA3)."""

    def __init__(self, n=8192, Hq=32, Hkv=8, D=128):
        self.n, self.Hq, self.D = n, Hq, D
        self.q, self.k, self.v = random_qkv(n, Hq, Hkv, D)
        self.o = torch.zeros(n, Hq, D, device="cuda")
        self.lse = torch.zeros(n, Hq, device="cuda")
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.tiles = n * Hq // 128

    def per_tile_us(self, ms):
        return ms * 1e3 * self.sms / self.tiles


def causal_flops(L, Hq, D):
    """Useful FLOPs of causal attention over L tokens (QK^T and PV, visible pairs only)."""
    return 4 * D * Hq * L * (L + 1) / 2


class StripedRing:
    """Every rank's stripes of (q, k, v) and one fp32 running state sized for a rank."""

    def __init__(self, q, k, v, P):
        L, Hq, D = q.shape
        self.P, self.n, self.D = P, L // P, D
        self.qs, self.ks, self.vs = (stripe(t, [L], P) for t in (q, k, v))
        self.cu = cu_seqlens([self.n], "cuda")
        self.o = torch.empty(self.n, Hq, D, device="cuda")
        self.lse = torch.empty(self.n, Hq, device="cuda")

    def all_steps(self, step):
        """step(q, k, v, cu, n, o, lse, mask_shift, accumulate) for every (rank, ring step)."""
        for i in range(self.P):
            for s in range(self.P):
                j = (i - s) % self.P
                step(self.qs[i], self.ks[j], self.vs[j], self.cu, self.n, self.o, self.lse,
                     0 if j <= i else -1, s > 0)

    def anchor_steps(self, attend):
        """The same P x P steps with an anchor kernel, `attend(q, k, v, scale) -> (o, lse)`, as
        ring-flash-attention slices them (bench/ring_flash_style.py), outputs dropped: the
        anchor's kernels alone on our steps' work, without any merge."""
        scale = self.D ** -0.5
        for i in range(self.P):
            for s in range(self.P):
                j = (i - s) % self.P
                rows, keys = step_slices(j, i, self.n)
                attend(self.qs[i][rows], self.ks[j][keys], self.vs[j][keys], scale)
