"""Shared setup of the ring benchmarks: one long request striped over P ranks, and all P x P
steps of the ring run back to back on one stream (the "step kernels alone" time)."""

import torch

from ring_flash_style import step_slices

from esp_kernels.testing import cu_seqlens, stripe


def random_qkv(L, Hq, Hkv, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(L, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
                 for h in (Hq, Hkv, Hkv))


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
