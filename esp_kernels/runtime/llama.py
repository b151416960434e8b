"""Model adapter of the Llama family: Llama, Mistral, Qwen2 (RMSNorm, RoPE with the config's
scaling, GQA, SwiGLU, optional q/k/v(/o) and MLP biases). See adapter.py for the protocol.

Build it from a `transformers` model instance (`LlamaAdapter.from_hf(model)`: its weights are
referenced, the q/k/v and gate/up projections are concatenated once), from a local checkpoint
directory (`LlamaAdapter.from_dir(path)`: config.json + *.safetensors, never a download), or
with random weights from a config dict (`LlamaAdapter.random(cfg)`: demo and benchmarks).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch
import torch.nn.functional as F

from .._checks import resolve_device
from .rope import Rope, apply_rope, rope_tables

FAMILIES = ("llama", "mistral", "qwen2")

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Random-init configs of the demo and benchmarks (HF config keys).
PRESETS = {
    # A few ms per token on two CPU cores; big enough for distinct greedy tokens.
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                 initializer_range=0.1, eos_token_id=None, tie_word_embeddings=False),
    # Llama-3.2-1B-shaped with a 32k vocabulary: 1.0B parameters, 2 GB in bf16.
    "1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_theta=500000.0, initializer_range=0.02, eos_token_id=None,
               tie_word_embeddings=False),
}


def _eos_ids(cfg: Mapping) -> tuple:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


# transformers' defaults for a config.json without the key (MistralConfig, Qwen2Config): a Mistral
# checkpoint without it was served with no window, where transformers applies 4096.
_DEFAULT_SLIDING_WINDOW = {"mistral": 4096, "qwen2": 4096}


def _sliding_window(cfg: Mapping) -> int | None:
    window = (cfg["sliding_window"] if "sliding_window" in cfg
              else _DEFAULT_SLIDING_WINDOW.get(cfg.get("model_type")))
    if not window:
        return None
    if cfg.get("model_type") == "qwen2":
        types = cfg.get("layer_types")
        used = (any(t == "sliding_attention" for t in types) if types
                else bool(cfg.get("use_sliding_window")))
        return int(window) if used else None
    return int(window)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm (fp32 statistics) as torch's rms_norm: bit for bit HF's in fp32; one
    fused kernel on CUDA where HF's spelling is eight launches in bf16 (upcast, five ops, cast,
    weight) and ~3 GB of traffic a norm at 32k tokens of hidden 4096. In bf16 it rounds once
    after the weight where HF rounds before it too: one unit in the last place at most."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _residual_linear(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     b: torch.Tensor | None) -> torch.Tensor:
    """h + x @ w.T (+ b). Without a bias, one GEMM with the residual as its addend (cuBLAS'
    beta = 1 epilogue: one launch instead of two, a quarter of a decode layer's dense launches
    saved); it rounds once where HF rounds the projection and then the sum, so bf16 results may
    differ from HF's by one unit in the last place (fp32: within rounding)."""
    if b is None:
        return torch.addmm(h, x, w.t())
    return h + F.linear(x, w, b)


class LlamaAdapter:
    """Llama-family weights for the runtime (the protocol of adapter.py)."""

    def __init__(self, cfg: Mapping, weights: Mapping[str, torch.Tensor], dtype=None,
                 device=None):
        cfg = dict(cfg)
        family = cfg.get("model_type", "llama")
        if family not in FAMILIES:
            raise NotImplementedError(f"model_type {family!r} is not a Llama-family model this "
                                      f"adapter serves ({', '.join(FAMILIES)})")
        self.config = cfg
        w = {k[len("model."):] if k.startswith("model.") else k: t for k, t in weights.items()}
        if "embed_tokens.weight" not in w:
            raise ValueError("weights lack model.embed_tokens.weight: not a Llama-family "
                             "checkpoint")
        emb = w["embed_tokens.weight"]
        self.dtype = dtype or emb.dtype
        self.device = resolve_device(device) if device is not None else emb.device
        self.num_layers = int(cfg["num_hidden_layers"])
        self.hidden_size = int(cfg["hidden_size"])
        self.num_q_heads = int(cfg["num_attention_heads"])
        self.num_kv_heads = int(cfg.get("num_key_value_heads") or self.num_q_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_q_heads)
        self.vocab_size = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.softmax_scale = self.head_dim ** -0.5
        self.eos_token_ids = _eos_ids(cfg)
        self.max_len = _sliding_window(cfg)
        act = cfg.get("hidden_act", "silu")
        if act not in _ACTS:
            raise NotImplementedError(f"hidden_act {act!r} is not supported ({sorted(_ACTS)})")
        self.act = _ACTS[act]
        self.rope = Rope.from_config(cfg, self.head_dim)
        self.intermediate = int(cfg["intermediate_size"])

        def get(name, required=True):
            t = w.get(name)
            if t is None:
                if required:
                    raise ValueError(f"checkpoint lacks weight {name!r}")
                return None
            return t.to(self.device, self.dtype)

        def cat(names, required=True):
            parts = [get(n, required) for n in names]
            if not required and all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"checkpoint has some but not all of {names}")
            return torch.cat(parts).contiguous()

        self.embed_w = get("embed_tokens.weight")
        self.norm_w = get("norm.weight")
        lm = w.get("lm_head.weight")
        if lm is None:
            if not cfg.get("tie_word_embeddings", False):
                raise ValueError("checkpoint lacks lm_head.weight and does not tie embeddings")
            lm = w["embed_tokens.weight"]
        self.lm_w = lm.to(self.device, self.dtype)
        self.layers = []
        for i in range(self.num_layers):
            p = f"layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            self.layers.append(dict(
                ln_in=get(p + "input_layernorm.weight"),
                ln_post=get(p + "post_attention_layernorm.weight"),
                qkv=cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
                qkv_b=cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], False),
                o=get(a + "o_proj.weight"), o_b=get(a + "o_proj.bias", False),
                gate_up=cat([m + "gate_proj.weight", m + "up_proj.weight"]),
                gate_up_b=cat([m + "gate_proj.bias", m + "up_proj.bias"], False),
                down=get(m + "down_proj.weight"), down_b=get(m + "down_proj.bias", False)))
        self._split = (self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim)

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model, dtype=None, device=None) -> "LlamaAdapter":
        """From a transformers causal-LM instance (LlamaForCausalLM, MistralForCausalLM,
        Qwen2ForCausalLM); its generation config's eos_token_id wins over the config's."""
        cfg = model.config.to_dict()
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, "eos_token_id", None) is not None:
            cfg["eos_token_id"] = gen.eos_token_id
        return cls(cfg, dict(model.state_dict()), dtype=dtype, device=device)

    @classmethod
    def from_dir(cls, path: str, dtype=None, device=None) -> "LlamaAdapter":
        """From a local checkpoint directory: config.json and *.safetensors (one file or the
        shards of model.safetensors.index.json). Nothing is downloaded."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path!r} has no config.json: not a local checkpoint "
                                    "directory")
        with open(cfg_path) as f:
            cfg = json.load(f)
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                cfg["eos_token_id"] = eos
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path!r} has no *.safetensors weights")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("loading a checkpoint directory needs the safetensors package "
                              "(pip install safetensors)") from None
        weights = {}
        for name in files:
            weights.update(load_file(os.path.join(path, name)))
        if dtype is None:
            dtype = {"float32": torch.float32, "float16": torch.float16,
                     "bfloat16": torch.bfloat16}.get(cfg.get("torch_dtype") or cfg.get("dtype"))
        return cls(cfg, weights, dtype=dtype, device=device)

    @classmethod
    def random(cls, cfg: Mapping, dtype=torch.float32, device="cpu", seed: int = 0,
               init_std: float | None = None) -> "LlamaAdapter":
        """Random weights (normal, std = cfg's initializer_range; norms 1) made on `device`."""
        cfg = dict(cfg)
        dev = resolve_device(device)
        std = float(init_std or cfg.get("initializer_range", 0.02))
        H, I = cfg["hidden_size"], cfg["intermediate_size"]
        Hq = cfg["num_attention_heads"]
        Hkv = cfg.get("num_key_value_heads") or Hq
        D = cfg.get("head_dim") or H // Hq
        g = torch.Generator(dev).manual_seed(seed)

        def rnd(*shape):
            return torch.empty(shape, dtype=dtype, device=dev).normal_(0, std, generator=g)
        ones = lambda: torch.ones(H, dtype=dtype, device=dev)  # noqa: E731
        w = {"embed_tokens.weight": rnd(cfg["vocab_size"], H), "norm.weight": ones(),
             "lm_head.weight": rnd(cfg["vocab_size"], H)}
        for i in range(cfg["num_hidden_layers"]):
            p = f"layers.{i}."
            w.update({p + "input_layernorm.weight": ones(),
                      p + "post_attention_layernorm.weight": ones(),
                      p + "self_attn.q_proj.weight": rnd(Hq * D, H),
                      p + "self_attn.k_proj.weight": rnd(Hkv * D, H),
                      p + "self_attn.v_proj.weight": rnd(Hkv * D, H),
                      p + "self_attn.o_proj.weight": rnd(H, Hq * D),
                      p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
                      p + "mlp.down_proj.weight": rnd(H, I)})
        return cls(cfg, w, dtype=dtype, device=dev)

    def state_dict(self) -> dict:
        """HF-named weights (for loading the same model into transformers)."""
        out = {"model.embed_tokens.weight": self.embed_w, "model.norm.weight": self.norm_w,
               "lm_head.weight": self.lm_w}
        q, k, v = self._split
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            for name, t in zip(("q_proj", "k_proj", "v_proj"), L["qkv"].split(self._split)):
                out[a + name + ".weight"] = t
            if L["qkv_b"] is not None:
                for name, t in zip(("q_proj", "k_proj", "v_proj"), L["qkv_b"].split(self._split)):
                    out[a + name + ".bias"] = t
            out[a + "o_proj.weight"] = L["o"]
            gate, up = L["gate_up"].split(self.intermediate)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            out[m + "down_proj.weight"] = L["down"]
            if L["o_b"] is not None:  # (attention_bias: o_proj too; mlp_bias: the MLP's three)
                out[a + "o_proj.bias"] = L["o_b"]
            if L["gate_up_b"] is not None:
                out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = \
                    L["gate_up_b"].split(self.intermediate)
            if L["down_b"] is not None:
                out[m + "down_proj.bias"] = L["down_b"]
            out[p + "input_layernorm.weight"] = L["ln_in"]
            out[p + "post_attention_layernorm.weight"] = L["ln_post"]
        return out

    # ---- the protocol ----------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_w)

    def positions(self, positions: torch.Tensor, lengths: torch.Tensor):
        return rope_tables(*self.rope.cos_sin(positions, self.dtype, lengths))

    def attention_in(self, layer: int, h: torch.Tensor, pos):
        L = self.layers[layer]
        T = h.shape[0]
        x = _rms_norm(h, L["ln_in"], self.eps)
        q, k, v = F.linear(x, L["qkv"], L["qkv_b"]).split(self._split, dim=-1)
        D = self.head_dim
        q = apply_rope(q.view(T, self.num_q_heads, D), pos)
        k = apply_rope(k.view(T, self.num_kv_heads, D), pos)
        return q, k, v.reshape(T, self.num_kv_heads, D)

    def attention_out(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        L = self.layers[layer]
        h = _residual_linear(h, attn.reshape(h.shape[0], self._split[0]), L["o"], L["o_b"])
        x = _rms_norm(h, L["ln_post"], self.eps)
        gate, up = F.linear(x, L["gate_up"], L["gate_up_b"]).split(self.intermediate, dim=-1)
        return _residual_linear(h, self.act(gate) * up, L["down"], L["down_b"])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(h, self.norm_w, self.eps), self.lm_w).float()

    def __repr__(self):
        return (f"LlamaAdapter({self.config.get('model_type', 'llama')}, {self.num_layers} "
                f"layers, hidden {self.hidden_size}, heads {self.num_q_heads}/"
                f"{self.num_kv_heads}x{self.head_dim}, vocab {self.vocab_size}, rope "
                f"{self.rope.kind}, {self.dtype}, {self.device})")
