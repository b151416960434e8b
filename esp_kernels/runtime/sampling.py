"""Token sampling: greedy, or temperature / top-p with a per-request seed.

A sampler is any callable `sampler(requests, logits) -> tokens`: requests are the RequestStates
of the rows, logits float32 [n, vocab] on the engine's device, tokens int64 [n] on that device.
The default samples each row as its request's SamplingParams say; a seeded draw depends only on
(seed, number of tokens generated so far), so it is the same on whichever instance samples it
(the ring rank holding the last prompt token, then the request's master of the moment).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy (argmax)
    top_p: float = 1.0         # nucleus: smallest set of tokens whose probability reaches top_p
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def _draw(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One seeded draw from a row of logits (on the host: a row is vocab floats)."""
    probs = torch.softmax(logits.double().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p   # the first token always stays
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(requests, logits: torch.Tensor) -> torch.Tensor:
    """The default sampler (see the module docstring)."""
    tokens = logits.argmax(dim=-1)
    for i, st in enumerate(requests):
        if not st.sampling.greedy:
            tokens[i] = _draw(logits[i], st.sampling, len(st.generated))
    return tokens
