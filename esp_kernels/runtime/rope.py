"""Rotary position embeddings of the Llama family, with the scaling variants of HF configs.

`Rope.from_config(cfg)` reads a config dict (config.json or `PretrainedConfig.to_dict()`): the
older `rope_theta` + `rope_scaling` keys or the newer `rope_parameters`. Supported `rope_type`s:
default, linear, dynamic (NTK), llama3, yarn: the same inverse frequencies and cos/sin scaling as
`transformers.modeling_rope_utils` (tests compare them). Others (e.g. longrope) raise.

`dynamic` differs from transformers in one documented way: transformers keeps one process-wide
frequency table that grows with the longest sequence seen; here each token uses the frequencies
of its own request's length when `generate` first computed its K/V (the prompt's length for a
prompt token, position + 1 for a generated one, also when a preempted request is prefilled again
over both), which equals transformers' `generate` for one request from a fresh model.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(cfg: Mapping) -> dict:
    """The RoPE parameters of a config dict, normalized: {"rope_type", "rope_theta", ...}."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        out = dict(params)
    else:
        out = dict(cfg.get("rope_scaling") or {})
        out["rope_theta"] = cfg.get("rope_theta", 10000.0)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    # The pretraining length of the scaled types, as transformers' standardize_rope_params sets
    # it: a top-level original_max_position_embeddings wins (Phi3-style configs), else the
    # nested one, else max_position_embeddings (a bare KeyError here before).
    if out["rope_type"] in ("llama3", "yarn"):
        if "original_max_position_embeddings" in cfg:
            out["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif "max_position_embeddings" in cfg:
            out.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return out


class Rope:
    """cos/sin tables for global positions (fp32 math, cast to the model dtype as HF does)."""

    def __init__(self, head_dim: int, params: Mapping, max_position_embeddings: int,
                 partial_rotary_factor: float = 1.0):
        self.kind = params["rope_type"]
        if self.kind not in SUPPORTED:
            raise NotImplementedError(f"rope_type {self.kind!r} is not supported (supported: "
                                      f"{', '.join(SUPPORTED)})")
        self.params = dict(params)
        self.base = float(params["rope_theta"])
        self.dim = int(head_dim * float(params.get("partial_rotary_factor",
                                                   partial_rotary_factor)))
        if self.dim != head_dim:
            raise NotImplementedError("partial rotary embeddings are not supported "
                                      f"(rotary dim {self.dim} of head dim {head_dim})")
        self.max_pos = int(max_position_embeddings)
        self.inv_freq, self.attention_scaling = self._init()
        self._on_device = {}   # device -> inv_freq there (uploaded once, not per batch)

    @classmethod
    def from_config(cls, cfg: Mapping, head_dim: int) -> "Rope":
        return cls(head_dim, rope_parameters(cfg), cfg.get("max_position_embeddings", 2048),
                   cfg.get("partial_rotary_factor", 1.0))

    def _default_inv_freq(self, base=None) -> torch.Tensor:
        base = self.base if base is None else base
        exps = torch.arange(0, self.dim, 2, dtype=torch.int64).to(torch.float) / self.dim
        return 1.0 / (base ** exps)

    def _init(self) -> tuple[torch.Tensor, float]:
        p, kind = self.params, self.kind
        if kind in ("default", "dynamic"):
            return self._default_inv_freq(), 1.0
        if kind == "linear":
            return self._default_inv_freq() / p["factor"], 1.0
        if kind == "llama3":
            inv = self._default_inv_freq()
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            lo_wl, hi_wl = old / lo, old / hi
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
            return torch.where(medium, smoothed, scaled), 1.0
        return self._yarn()

    def _yarn(self) -> tuple[torch.Tensor, float]:
        p, dim, base = self.params, self.dim, self.base
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor") or self.max_pos / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        att = p.get("attention_factor")
        if att is None:
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            att = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else \
                mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low),
                           0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, att

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        seq_len = max(int(seq_len), self.max_pos)
        f = self.params["factor"]
        base = self.base * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
        return self._default_inv_freq(base)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in `dtype` for int64 `positions` [T] (on their device).

        lengths [T] (host or device int64): the length of each token's request that `dynamic`
        scales by; ignored by the other kinds."""
        dev = positions.device
        if (self.kind == "dynamic" and lengths is not None and lengths.numel()
                and int(lengths.max()) > self.max_pos):
            inv = torch.empty(positions.numel(), self.dim // 2, dtype=torch.float32, device=dev)
            host = lengths.cpu()
            for L in host.unique().tolist():
                sel = (host == L).to(dev)
                inv[sel] = self._dynamic_inv_freq(L).to(dev)
            freqs = positions[:, None].float() * inv
        else:
            inv = self._on_device.get(dev)
            if inv is None:
                inv = self._on_device[dev] = self.inv_freq.to(dev)
            freqs = positions[:, None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(dtype),
                (emb.sin() * self.attention_scaling).to(dtype))


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) [T, 1, D] for `apply_rope` from HF-style cos/sin [T, D]: made once per
    batch, they let every layer rotate with 4 ops instead of rotate_half's 9."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None]


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, H, D] rotated as HF's `x * cos + rotate_half(x) * sin`, bit for bit: rotate_half(x)
    * sin = cat(-x2, x1) * cat(s1, s2) = roll(x, D/2) * cat(-s1, s2) (a sign moves exactly)."""
    cos, signed_sin = tables
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
