"""CostModel: predicted time of a whole-model prefill iteration, decode step and KV migration.

The model is built from per-component fits (all one layer unless said, one GPU, bf16):

- dense(n)       RMSNorms + QKV/O + gate/up/down GEMMs for n tokens: piecewise linear in n
                 (memory-bound flat for small n, compute-bound linear for large n), knots at the
                 profiled sizes, fitted on relative error.
- lm_head(n)     final norm + LM head for n tokens: piecewise linear likewise.
- ring_attn      striped ring attention. Per instance of a P-instance group, for a batch with
                 n requests, S1 = Σl, S2 = Σl²:
                     a0 + a1·P + b0·S1 + b1·S1/P + c·S2/P
                 For a fixed P this is LoongServe's A + B·Σl + C·Σl² (A = a0 + a1·P, B = b0 + b1/P,
                 C = c/P), but one fit covers every P, so group sizes that were not profiled are
                 predicted too: a1·P is the per-step launch cost (P steps), b0·S1 the work whose
                 per-step tile shrinks as P grows (S1/P tokens per step, P steps), b1·S1/P the
                 per-token work of this rank's own stripes, c·S2/P the causal FLOPs split P ways.
                 Fitted from "ring_attn" samples (all P virtual ranks of one GPU: their time is
                 P x the per-instance time).
- ring comm      modelled, not measured (one GPU has no link): each of the P-1 steps sends this
                 rank's KV block, S1/P tokens · 2·Hkv·D·bytes, over the link; the transfer overlaps
                 the step's compute, so a step takes max(compute, transfer).
- decode_attn    paged decode attention on one instance: k0 + k1·(KV bytes) + k2·(requests).
- copy / link    a + b·bytes each (device copy; inter-GPU send, "link" is modelled from the
                 2xH200 results).
- migration      m0 + 2·copy(bytes) + link(bytes)/efficiency: pack, send, unpack in chunks, plus the
                 four synchronous round trips of a batch (m0); efficiency is what migrate_kv reached
                 against one plain send of the same bytes on 2xH200 (modelled).

Whole iteration, L layers:
    prefill_time(P, seqlens) = L·(dense(ceil(S1/P)) + ring_attn(P) with comm) + lm_head(ceil(n/P))
    decode_time(kv_lens, G, M) = L·(dense(ceil(B/M)) + decode_attn(KV/G bytes, ceil(B/G) requests)
                                    + comm(G)) + lm_head(ceil(B/M))
where a decode over G > 1 instances adds per layer the masters' query send and partial-result
return (2 link messages).

Profile JSON (format version 1): see `CostModel.to_dict`; `load` validates every key, type and sign
and names what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from .fitting import PiecewiseLinear, relative_nnls

FORMAT_VERSION = 1
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles",
                               "h100_llama3_8b.json")
FIT_KINDS = ("dense", "lm_head", "ring_attn", "decode_attn", "copy", "link")
HELD_OUT_KINDS = ("prefill_layer", "decode_layer")


class CostModelError(ValueError):
    """A cost-model profile or samples document is malformed; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the served model (defaults: Llama-3-8B)."""
    num_layers: int = 32
    hidden: int = 4096
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    dtype: str = "bfloat16"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "dtype":
                if v not in _DTYPE_BYTES:
                    raise CostModelError(f"model.dtype {v!r} is not one of {sorted(_DTYPE_BYTES)}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CostModelError(f"model.{f.name} must be an int >= 1, got {v!r}")

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_layer

    @property
    def dense_params_per_layer(self) -> int:
        h, q, kv = self.hidden, self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * self.intermediate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "model") -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise CostModelError(f"{where} must be an object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for n in names:
            if n not in d:
                raise CostModelError(f"{where} is missing key {n!r}")
        return cls(**{n: d[n] for n in names})


# ---- component coefficient sets: (name, keys) ------------------------------------------------
_LINEAR_KEYS = {
    "ring_attn": ("a0", "a1", "b0", "b1", "c"),
    "decode_attn": ("const", "per_byte", "per_request"),
    "copy": ("const", "per_byte"),
    "link": ("const", "per_byte"),
    "migration": ("const", "link_efficiency"),
}


def _ring_features(P, n, S1, S2):
    """Features of the ALL-ranks time of ring_attn (= P x per-instance time)."""
    return [P, P * P, S1 * P, S1, S2]


class CostModel:
    """Predicts iteration times (seconds) for one model on one kind of GPU. See the module doc."""

    def __init__(self, model: ModelConfig, dense: PiecewiseLinear, lm_head: PiecewiseLinear,
                 coeffs: Mapping[str, Mapping[str, float]], meta: Mapping | None = None):
        self.model = model
        self.dense = dense
        self.lm_head = lm_head
        self.coeffs = {k: dict(v) for k, v in coeffs.items()}
        self.meta = dict(meta or {})
        r, d = self.coeffs["ring_attn"], self.coeffs["decode_attn"]
        self._r = (r["a0"], r["a1"], r["b0"], r["b1"], r["c"])
        self._d = (d["const"], d["per_byte"], d["per_request"])
        self._link = (self.coeffs["link"]["const"], self.coeffs["link"]["per_byte"])
        self._copy = (self.coeffs["copy"]["const"], self.coeffs["copy"]["per_byte"])
        self._L = model.num_layers
        self._kvb = model.kv_bytes_per_token_layer
        self._qb = model.num_q_heads * model.head_dim * model.dtype_bytes

    # ---- public predictions ----------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    def prefill_time(self, group_size: int, seqlens: Sequence[int]) -> float:
        """One prefill iteration (all layers + LM head of each request's last token) of this batch
        on an ESP group of group_size instances (striped ring)."""
        P = _pos_int(group_size, "group_size")
        if not len(seqlens):
            raise ValueError("seqlens must hold at least one request")
        S1 = S2 = 0
        for L in seqlens:
            L = _pos_int(L, "seqlens entries")
            S1 += L
            S2 += L * L
        return self._prefill(P, len(seqlens), S1, S2)

    def _prefill(self, P: int, n: int, S1: float, S2: float) -> float:
        a0, a1, b0, b1, c = self._r
        attn = a0 + a1 * P + b0 * S1 + b1 * S1 / P + c * S2 / P
        if P > 1:
            step_tokens = math.ceil(S1 / P)
            xfer = self._link[0] + self._link[1] * step_tokens * self._kvb
            attn += (P - 1) * max(0.0, xfer - attn / P)
        return self._L * (self.dense(math.ceil(S1 / P)) + attn) + self.lm_head(math.ceil(n / P))

    def prefill_time_array(self, P: np.ndarray, n: np.ndarray, S1: np.ndarray,
                           S2: np.ndarray) -> np.ndarray:
        """prefill_time for arrays of (group size, requests, Σl, Σl²) at once (the DP's table);
        equal to prefill_time element by element."""
        P = np.asarray(P, dtype=np.float64)
        a0, a1, b0, b1, c = self._r
        attn = a0 + a1 * P + b0 * S1 + b1 * S1 / P + c * S2 / P
        xfer = self._link[0] + self._link[1] * np.ceil(S1 / P) * self._kvb
        attn = attn + np.where(P > 1, (P - 1) * np.maximum(0.0, xfer - attn / P), 0.0)
        return self._L * (self.dense(np.ceil(S1 / P)) + attn) + self.lm_head(np.ceil(n / P))

    def decode_time(self, kv_lens: Sequence[int], group_size: int = 1,
                    num_masters: int = 1) -> float:
        """One decode step of the whole model for a batch holding these KV lengths, KV spread
        over group_size instances, dense layers split over num_masters masters."""
        G = _pos_int(group_size, "group_size")
        M = _pos_int(num_masters, "num_masters")
        B = len(kv_lens)
        if not B:
            raise ValueError("kv_lens must hold at least one request")
        if min(kv_lens) < 0:
            raise ValueError(f"kv_lens entries must be >= 0, got {min(kv_lens)}")
        return self._decode(B, sum(kv_lens), G, M)

    def _decode(self, B: int, kv_total: int, G: int, M: int) -> float:
        k0, k1, k2 = self._d
        per_master = math.ceil(B / M)
        # KV spread evenly over G instances; each holds shards of about B/G requests
        attn = k0 + k1 * (kv_total / G) * self._kvb + k2 * math.ceil(B / G)
        comm = 0.0
        if G > 1:  # q to the holders, (o, lse) back: two messages per layer
            comm = 2 * (self._link[0] + self._link[1] * per_master * self._qb)
        return self._L * (self.dense(per_master) + attn + comm) + self.lm_head(per_master)

    def migration_time(self, num_tokens: int) -> float:
        """KV of num_tokens tokens (all layers) from one instance to another (one batch)."""
        if (isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer))
                or num_tokens < 0):
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        num_tokens = int(num_tokens)
        if num_tokens == 0:
            return 0.0
        b = num_tokens * self.kv_bytes_per_token
        m = self.coeffs["migration"]
        copy = self._copy[0] + self._copy[1] * b
        link = self._link[0] + self._link[1] * b
        return m["const"] + 2 * copy + link / m["link_efficiency"]

    # ---- per-sample predictions (fit check) -------------------------------------------------
    def predict_sample(self, s: Mapping) -> float:
        """Predicted time of one profiling sample (see SCHED_SPEC.md for the kinds)."""
        kind = s["kind"]
        if kind == "dense":
            return float(self.dense(s["tokens"]))
        if kind == "lm_head":
            return float(self.lm_head(s["tokens"]))
        if kind == "ring_attn":
            P = s["group_size"]
            return float(np.dot(self._r, _ring_features(P, len(s["seqlens"]), sum(s["seqlens"]),
                                                        sum(x * x for x in s["seqlens"]))))
        if kind == "decode_attn":
            kv = s["kv_lens"]
            return self._d[0] + self._d[1] * sum(kv) * self._kvb + self._d[2] * len(kv)
        if kind in ("copy", "link"):
            c = self._copy if kind == "copy" else self._link
            return c[0] + c[1] * s["bytes"]
        if kind == "prefill_layer":  # P virtual ranks one after another, no link
            P, sl = s["group_size"], s["seqlens"]
            attn_all = float(np.dot(self._r, _ring_features(P, len(sl), sum(sl),
                                                            sum(x * x for x in sl))))
            return P * float(self.dense(math.ceil(sum(sl) / P))) + attn_all
        if kind == "decode_layer":
            kv = s["kv_lens"]
            return float(self.dense(len(kv))) + self._d[0] + self._d[1] * sum(kv) * self._kvb + \
                self._d[2] * len(kv)
        raise CostModelError(f"unknown sample kind {kind!r}")

    def report(self, samples_doc) -> dict:
        """{kind: {"n", "mean_rel_err", "max_rel_err"}} over the samples (use held-out ones)."""
        samples = _samples_of(samples_doc)
        errs: dict = {}
        for s in samples:
            if s["kind"] not in FIT_KINDS + HELD_OUT_KINDS:
                continue
            pred = self.predict_sample(s)
            errs.setdefault(s["kind"], []).append(abs(pred - s["time_s"]) / s["time_s"])
        return {k: {"n": len(v), "mean_rel_err": float(np.mean(v)),
                    "max_rel_err": float(np.max(v))} for k, v in sorted(errs.items())}

    # ---- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples_doc, migration: Mapping | None = None) -> "CostModel":
        """Fit every component from a samples document (format in SCHED_SPEC.md).

        migration: {"const", "link_efficiency"}; default: the 2xH200 values of
        DEFAULT_MIGRATION (modelled: migration cannot be measured on one GPU)."""
        samples = _samples_of(samples_doc)
        if migration is not None:  # checked as a profile's migration entry is
            migration = cls._check_coeffs({"migration": migration}, "migration")["migration"]
        model = ModelConfig.from_dict(samples_doc.get("model"), "samples document 'model'")
        by = {}
        for s in samples:
            by.setdefault(s["kind"], []).append(s)
        missing = [k for k in FIT_KINDS if k not in by]
        if missing:
            raise CostModelError(f"samples document has no samples of kind {missing} "
                                 f"(needs all of {list(FIT_KINDS)})")
        kvb = model.kv_bytes_per_token_layer
        dense = PiecewiseLinear.fit([s["tokens"] for s in by["dense"]],
                                    [s["time_s"] for s in by["dense"]])
        lm_head = PiecewiseLinear.fit([s["tokens"] for s in by["lm_head"]],
                                      [s["time_s"] for s in by["lm_head"]])
        ring = relative_nnls(
            np.array([_ring_features(s["group_size"], len(s["seqlens"]), sum(s["seqlens"]),
                                     sum(x * x for x in s["seqlens"])) for s in by["ring_attn"]],
                     dtype=np.float64),
            [s["time_s"] for s in by["ring_attn"]])
        dec = relative_nnls(np.array([[1.0, sum(s["kv_lens"]) * kvb, len(s["kv_lens"])]
                                      for s in by["decode_attn"]]),
                            [s["time_s"] for s in by["decode_attn"]])
        lin = {}
        for kind in ("copy", "link"):
            lin[kind] = relative_nnls(np.array([[1.0, s["bytes"]] for s in by[kind]]),
                                      [s["time_s"] for s in by[kind]])
        coeffs = {
            "ring_attn": dict(zip(_LINEAR_KEYS["ring_attn"], map(float, ring))),
            "decode_attn": dict(zip(_LINEAR_KEYS["decode_attn"], map(float, dec))),
            "copy": dict(zip(_LINEAR_KEYS["copy"], map(float, lin["copy"]))),
            "link": dict(zip(_LINEAR_KEYS["link"], map(float, lin["link"]))),
            "migration": dict(migration or DEFAULT_MIGRATION),
        }
        meta = {k: samples_doc.get(k, "unknown") for k in ("device", "torch", "commit", "date")}
        meta["source"] = samples_doc.get("source", "measured")
        meta["modelled"] = ["link", "migration", "ring comm", "decode comm"]
        cm = cls(model, dense, lm_head, coeffs, meta)
        cm.meta["fit_report"] = cm.report(samples_doc)
        return cm

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "esp_kernels.scheduler.CostModel", "version": FORMAT_VERSION,
                "meta": self.meta, "model": self.model.to_dict(),
                "dense": self.dense.to_dict(), "lm_head": self.lm_head.to_dict(),
                **{k: self.coeffs[k] for k in _LINEAR_KEYS}}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "profile") -> "CostModel":
        if not isinstance(d, Mapping):
            raise CostModelError(f"{where} must be a JSON object, got {type(d).__name__}")
        for key in ("version", "model", "dense", "lm_head", "meta") + tuple(_LINEAR_KEYS):
            if key not in d:
                raise CostModelError(f"{where} is missing key {key!r}")
        if d["version"] != FORMAT_VERSION:
            raise CostModelError(f"{where}: format version {d['version']!r} is not supported "
                                 f"(this library reads version {FORMAT_VERSION})")
        if not isinstance(d["meta"], Mapping):
            raise CostModelError(f"{where}: 'meta' must be an object")
        model = ModelConfig.from_dict(d["model"], f"{where}: 'model'")
        curves = {}
        for key in ("dense", "lm_head"):
            c = d[key]
            if not isinstance(c, Mapping):
                raise CostModelError(f"{where}: {key!r} must be an object with knots and values")
            for sub in ("knots", "values"):
                if sub not in c:
                    raise CostModelError(f"{where}: {key!r} is missing key {sub!r}")
                if not isinstance(c[sub], list) or not all(_is_num(x) for x in c[sub]):
                    raise CostModelError(f"{where}: {key}.{sub} must be a list of numbers")
            if any(not x >= 0 or not math.isfinite(x) for x in c["values"]):
                raise CostModelError(f"{where}: {key}.values must be finite times >= 0")
            try:
                curves[key] = PiecewiseLinear(c["knots"], c["values"])
            except ValueError as exc:
                raise CostModelError(f"{where}: {key}: {exc}") from None
        coeffs = cls._check_coeffs({key: d[key] for key in _LINEAR_KEYS}, where)
        return cls(model, curves["dense"], curves["lm_head"], coeffs, d["meta"])

    @staticmethod
    def _check_coeffs(entries: Mapping, where: str) -> dict:
        """The linear components' coefficients (entries: component -> its mapping, a subset of
        _LINEAR_KEYS) as floats: every name present, finite and >= 0, and a migration's link
        efficiency > 0."""
        coeffs = {}
        for key, c in entries.items():
            if not isinstance(c, Mapping):
                raise CostModelError(f"{where}: {key!r} must be an object")
            for n in _LINEAR_KEYS[key]:
                if n not in c:
                    raise CostModelError(f"{where}: {key!r} is missing key {n!r}")
                if not _is_num(c[n]):
                    raise CostModelError(f"{where}: {key}.{n} must be a number, got "
                                         f"{type(c[n]).__name__}")
                if c[n] < 0 or not math.isfinite(c[n]):
                    raise CostModelError(f"{where}: {key}.{n} is {c[n]!r}: coefficients must be "
                                         "finite and >= 0")
            coeffs[key] = {n: float(c[n]) for n in _LINEAR_KEYS[key]}
        if "migration" in coeffs and coeffs["migration"]["link_efficiency"] <= 0:
            raise CostModelError(f"{where}: migration.link_efficiency must be > 0")
        return coeffs

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "CostModel":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"cost-model file {path}: not valid JSON ({exc})") from None
        return cls.from_dict(d, f"cost-model file {path}")

    @classmethod
    def default(cls) -> "CostModel":
        """The shipped profile: H100, Llama-3-8B shape, 1 GPU per instance (its meta.source says
        whether it is measured or the analytic placeholder)."""
        return cls.load(DEFAULT_PROFILE)

    def __repr__(self):
        meta = self.meta
        return (f"CostModel({self.model.num_layers} layers, hidden {self.model.hidden}, "
                f"source {meta.get('source', '?')!r}, device {meta.get('device', '?')!r})")


# migrate_kv on 2xH200 (bench/results/2026-11-24_h200x2_run4, diag_migration.txt): a batch costs
# four synchronous round trips, 0.65 ms; 1 GiB took 6.36 ms per direction against 3.45 ms for one
# plain send of it, so after 2 copies at 3 TB/s the link ran at 0.68 of a plain send.
DEFAULT_MIGRATION = {"const": 6.5e-4, "link_efficiency": 0.68}


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


_SAMPLE_FIELDS = {
    "dense": {"tokens": int}, "lm_head": {"tokens": int},
    "ring_attn": {"group_size": int, "seqlens": list},
    "prefill_layer": {"group_size": int, "seqlens": list},
    "decode_attn": {"kv_lens": list}, "decode_layer": {"kv_lens": list},
    "copy": {"bytes": int}, "link": {"bytes": int},
}


def _samples_of(doc) -> list:
    """Validated sample list of a samples document."""
    if not isinstance(doc, Mapping):
        raise CostModelError(f"samples document must be an object, got {type(doc).__name__}")
    if "samples" not in doc or not isinstance(doc["samples"], list):
        raise CostModelError("samples document is missing the list 'samples'")
    out = []
    for i, s in enumerate(doc["samples"]):
        if not isinstance(s, Mapping) or "kind" not in s:
            raise CostModelError(f"samples[{i}] must be an object with a 'kind'")
        kind = s["kind"]
        if kind not in _SAMPLE_FIELDS:
            raise CostModelError(f"samples[{i}]: unknown kind {kind!r} (known: "
                                 f"{sorted(_SAMPLE_FIELDS)})")
        for key, typ in list(_SAMPLE_FIELDS[kind].items()) + [("time_s", float)]:
            if key not in s:
                raise CostModelError(f"samples[{i}] ({kind}) is missing key {key!r}")
            v = s[key]
            ok = _is_num(v) and math.isfinite(v) if typ is float else (
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 if typ is int else
                isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool)
                                                  and x >= 1 for x in v))
            if not ok:
                raise CostModelError(f"samples[{i}] ({kind}).{key} has a bad value {v!r} "
                                     "(counts are ints >= 1, time_s a finite number)")
        if s["time_s"] <= 0:
            raise CostModelError(f"samples[{i}] ({kind}).time_s must be > 0")
        out.append(s)
    return out
