"""Request workloads for the serving simulator: arrivals, length distributions, trace files.

No dataset is downloaded. Each length generator is a small parametric model fitted to published
statistics; the source of every number and every assumption sits next to its generator. All
generators are deterministic for a seed: lengths and arrival gaps use separate random streams
(`numpy.random.default_rng([seed, stream])`), so a rate sweep serves the same requests at every
rate and only the gaps scale (common random numbers: rate-to-rate differences are not noise).

Lengths are in tokens. "words -> tokens" uses 1.3 tokens per English word (an assumption: the
usual ratio of Llama-family BPE tokenizers on English prose; LoongServe tokenized with the LWM
(Llama-2) tokenizer).

Workloads (name: what it models)
    sharegpt   multi-turn chat, LoongServe's preprocessing of ShareGPT
    leval      L-Eval long-document instructions
    lveval     LV-Eval 16k..256k-word levels (English subsets)
    mixed      equal parts of the three above (LoongServe: 1500 of each, shuffled)
    zipf1.0 / zipf1.2 / zipf1.4   LoongServe's ablation: prompt lengths Zipf(alpha) on [10, 200000)
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Request", "WORKLOADS", "DOCUMENTED_STATS", "sample_lengths", "arrival_times",
           "make_requests", "load_trace", "save_trace"]

TOKENS_PER_WORD = 1.3


@dataclass(frozen=True)
class Request:
    """One request: id, arrival time (s), prompt length and output length (tokens, >= 1)."""
    rid: int
    arrival: float
    prompt_len: int
    output_len: int


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def _truncated_lognormal(rng, n, median, sigma, lo, hi):
    """n draws of exp(N(log median, sigma)) kept inside [lo, hi] (rejection), as int64."""
    out = np.empty(0, dtype=np.float64)
    while out.size < n:
        x = rng.lognormal(math.log(median), sigma, size=max(2 * (n - out.size), 64))
        out = np.concatenate([out, x[(x >= lo) & (x <= hi)]])
    return np.rint(out[:n]).astype(np.int64)


def _lognormal_median_for_mean(mean, sigma, lo, hi):
    """Median of a lognormal(sigma) truncated to [lo, hi] whose truncated mean is `mean`.

    Closed form of the truncated mean (Phi = standard normal CDF, a/b = standardized bounds):
    E[X | lo<=X<=hi] = exp(mu + s^2/2) (Phi(b - s) - Phi(a - s)) / (Phi(b) - Phi(a)); bisection on mu.
    """
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def tmean(mu):
        a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
        return math.exp(mu + sigma * sigma / 2) * (phi(b - sigma) - phi(a - sigma)) / (phi(b) - phi(a))

    lo_mu, hi_mu = math.log(lo) - 5 * sigma, math.log(hi) + 5 * sigma
    for _ in range(200):
        mid = 0.5 * (lo_mu + hi_mu)
        lo_mu, hi_mu = (mid, hi_mu) if tmean(mid) < mean else (lo_mu, mid)
    return math.exp(0.5 * (lo_mu + hi_mu))


# ---------------------------------------------------------------------------------------------
# ShareGPT (multi-turn chat)
#
# LoongServe (test/longserve/4-preprocess-dataset.py of github.com/LoongServe/LoongServe, used for
# arXiv 2404.09526 §6) builds one request per ShareGPT_V3_unfiltered_cleaned_split conversation with
# >= 3 turns: k ~ Uniform{1..n-1} leading turns joined by newlines form the prompt, turn k+1 is the
# output; requests with prompt or output < 4 tokens, prompt + output >= 200,000 or output >= 1000
# are dropped. We model exactly that procedure over synthetic conversations:
#   - turns alternate human / assistant, starting with human;
#   - per-turn lengths are lognormal with the means the vLLM paper reports for ShareGPT (Kwon et
#     al., SOSP'23, Fig. 11: 161.31 input tokens and 337.99 output tokens on average; quoted from
#     that figure as recalled: the search tools available when this was written could not fetch it
#     to re-check, so verify before citing);
#     sigma 1.2 (human) and 0.8 (assistant) are assumptions (prompts are far more skewed than
#     replies: pasted code/documents);
#   - number of turns n = 3 + Geometric(p = 0.3) - 1 (mean 5.3): an assumption, no published
#     turn-count distribution of the >= 3-turn subset was found;
#   - the newline joining turns is one token per boundary.
# ---------------------------------------------------------------------------------------------
SHAREGPT_HUMAN_TURN_MEAN, SHAREGPT_HUMAN_SIGMA = 161.31, 1.2
SHAREGPT_GPT_TURN_MEAN, SHAREGPT_GPT_SIGMA = 337.99, 0.8
SHAREGPT_EXTRA_TURNS_P = 0.3
SHAREGPT_MAX_TOTAL, SHAREGPT_MAX_OUTPUT, SHAREGPT_MIN_LEN = 200_000, 1000, 4


def _sharegpt_turns(rng, n, mean, sigma):
    # lognormal(mu, sigma) has mean exp(mu + sigma^2/2)
    mu = math.log(mean) - sigma * sigma / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=n))).astype(np.int64)


def _sharegpt(rng, n):
    prompts, outputs = [], []
    have = 0
    while have < n:
        m = max(2 * (n - have), 64)
        turns = 3 + rng.geometric(SHAREGPT_EXTRA_TURNS_P, size=m) - 1        # n >= 3
        k = (rng.random(m) * (turns - 1)).astype(np.int64) + 1                 # 1..n-1
        width = int(turns.max())
        human = _sharegpt_turns(rng, m * width, SHAREGPT_HUMAN_TURN_MEAN,
                                SHAREGPT_HUMAN_SIGMA).reshape(m, width)
        gpt = _sharegpt_turns(rng, m * width, SHAREGPT_GPT_TURN_MEAN,
                              SHAREGPT_GPT_SIGMA).reshape(m, width)
        idx = np.arange(width)
        lengths = np.where(idx % 2 == 0, human, gpt)                           # human first
        prompt = np.where(idx[None, :] < k[:, None], lengths, 0).sum(axis=1) + (k - 1)
        output = lengths[np.arange(m), k]
        keep = ((prompt >= SHAREGPT_MIN_LEN) & (output >= SHAREGPT_MIN_LEN)
                & (prompt + output < SHAREGPT_MAX_TOTAL) & (output < SHAREGPT_MAX_OUTPUT))
        prompts.append(prompt[keep])
        outputs.append(output[keep])
        have += int(keep.sum())
    return np.concatenate(prompts)[:n], np.concatenate(outputs)[:n]


# ---------------------------------------------------------------------------------------------
# L-Eval (An et al., ACL 2024, arXiv 2307.11088): 20 sub-tasks, 508 long documents, > 2,000
# human-labelled instruction/answer pairs, inputs 3k~200k tokens. LoongServe makes one request per
# (document, instruction): prompt = document + instruction. Documents average ~7k words (the
# figure issue 20 gives for L-Eval; not re-checked against the L-Eval paper's tables) = ~9,100 tokens
# at 1.3 tokens/word.
#   prompt: lognormal truncated to [3,000, 200,000] tokens (the published range), sigma 1.0 (an
#           assumption: a long right tail up to 200k with most documents at 4k-16k), median solved
#           so the truncated mean is 9,100 tokens;
#   output: answers range from a letter (multiple choice) to summaries: lognormal truncated to
#           [4, 1024] with mean 100 tokens and sigma 1.0 (assumptions: no published output stats).
# ---------------------------------------------------------------------------------------------
LEVAL_PROMPT_MEAN, LEVAL_PROMPT_SIGMA, LEVAL_PROMPT_RANGE = 7000 * TOKENS_PER_WORD, 1.0, (3000, 200_000)
LEVAL_OUTPUT_MEAN, LEVAL_OUTPUT_SIGMA, LEVAL_OUTPUT_RANGE = 100.0, 1.0, (4, 1024)


def _leval(rng, n):
    pm = _lognormal_median_for_mean(LEVAL_PROMPT_MEAN, LEVAL_PROMPT_SIGMA, *LEVAL_PROMPT_RANGE)
    om = _lognormal_median_for_mean(LEVAL_OUTPUT_MEAN, LEVAL_OUTPUT_SIGMA, *LEVAL_OUTPUT_RANGE)
    return (_truncated_lognormal(rng, n, pm, LEVAL_PROMPT_SIGMA, *LEVAL_PROMPT_RANGE),
            _truncated_lognormal(rng, n, om, LEVAL_OUTPUT_SIGMA, *LEVAL_OUTPUT_RANGE))


# ---------------------------------------------------------------------------------------------
# LV-Eval (Yuan et al., arXiv 2402.05136; github.com/infinigence/LVEval README): five length levels
# 16k, 32k, 64k, 128k, 256k words sharing the same QA pairs (so equal counts per level); average
# 102,380 words, min / max 11,896 / 387,406 words. LoongServe used the English subsets only
# (docs/artifact-eval/supplemental/repro-dataset.md); prompt = context + question.
#   prompt: level chosen uniformly; words = level x lognormal(sigma 0.15) (spread within a level: an
#           assumption), scaled so the overall mean is 102,380 words, clipped to [11,896, 387,406]
#           words, times 1.3 tokens/word;
#   output: short QA answers: lognormal truncated to [2, 256] with mean 16 tokens, sigma 0.8
#           (assumptions: no published answer-length stats).
# ---------------------------------------------------------------------------------------------
LVEVAL_LEVELS_WORDS = (16_000, 32_000, 64_000, 128_000, 256_000)
LVEVAL_MEAN_WORDS, LVEVAL_MIN_WORDS, LVEVAL_MAX_WORDS = 102_380, 11_896, 387_406
LVEVAL_LEVEL_SIGMA = 0.15
LVEVAL_OUTPUT_MEAN, LVEVAL_OUTPUT_SIGMA, LVEVAL_OUTPUT_RANGE = 16.0, 0.8, (2, 256)


def _lveval(rng, n):
    levels = np.asarray(LVEVAL_LEVELS_WORDS, dtype=np.float64)
    # lognormal(-s^2/2, s) has mean 1, so the level means are level x scale before clipping
    scale = LVEVAL_MEAN_WORDS / levels.mean()
    words = (levels[rng.integers(0, levels.size, size=n)] * scale
             * rng.lognormal(-LVEVAL_LEVEL_SIGMA ** 2 / 2, LVEVAL_LEVEL_SIGMA, size=n))
    words = np.clip(words, LVEVAL_MIN_WORDS, LVEVAL_MAX_WORDS)
    om = _lognormal_median_for_mean(LVEVAL_OUTPUT_MEAN, LVEVAL_OUTPUT_SIGMA, *LVEVAL_OUTPUT_RANGE)
    return (np.rint(words * TOKENS_PER_WORD).astype(np.int64),
            _truncated_lognormal(rng, n, om, LVEVAL_OUTPUT_SIGMA, *LVEVAL_OUTPUT_RANGE))


def _mixed(rng, n):
    """Equal parts of ShareGPT, L-Eval and LV-Eval, shuffled (LoongServe 4-mix-dataset.py: 1500 each)."""
    parts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    ps, os_ = zip(*(gen(rng, m) for gen, m in zip((_sharegpt, _leval, _lveval), parts)))
    prompt, output = np.concatenate(ps), np.concatenate(os_)
    order = rng.permutation(n)
    return prompt[order], output[order]


# ---------------------------------------------------------------------------------------------
# Zipf ablation (LoongServe test/longserve/4-mix-dataset-zipf.py): target prompt lengths x on the
# integers [10, 200000) with P(x) ~ 1 / x^alpha (beta = 0), then the request of the union of the
# ShareGPT, L-Eval and LV-Eval datasets whose prompt length is nearest replaces it (its prompt and
# output lengths are used). We do the same over a pool of ZIPF_POOL_PER_DATASET requests drawn from
# each of our three generators.
# ---------------------------------------------------------------------------------------------
ZIPF_RANGE = (10, 200_000)
ZIPF_POOL_PER_DATASET = 4000


def _zipf(alpha):
    def gen(rng, n):
        pool_p, pool_o = zip(*(g(rng, ZIPF_POOL_PER_DATASET) for g in (_sharegpt, _leval, _lveval)))
        pool_p, pool_o = np.concatenate(pool_p), np.concatenate(pool_o)
        order = np.argsort(pool_p, kind="stable")
        pool_p, pool_o = pool_p[order], pool_o[order]
        x = np.arange(*ZIPF_RANGE, dtype=np.float64)
        cdf = np.cumsum(x ** -alpha)
        target = x[np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=x.size - 1)]
        right = np.searchsorted(pool_p, target).clip(1, pool_p.size - 1)
        left = right - 1
        pick = np.where(np.abs(pool_p[left] - target) <= np.abs(pool_p[right] - target), left, right)
        return pool_p[pick], pool_o[pick]
    return gen


_GENERATORS = {
    "sharegpt": _sharegpt, "leval": _leval, "lveval": _lveval, "mixed": _mixed,
    "zipf1.0": _zipf(1.0), "zipf1.2": _zipf(1.2), "zipf1.4": _zipf(1.4),
}
WORKLOADS = tuple(_GENERATORS)

# Statistics each generator is built to reproduce (checked by tests/test_sim_workloads.py on large
# samples): "published" numbers come from the sources above, the others are constraints of the
# documented procedure.
DOCUMENTED_STATS = {
    "sharegpt": {"human_turn_mean": SHAREGPT_HUMAN_TURN_MEAN, "gpt_turn_mean": SHAREGPT_GPT_TURN_MEAN,
                 "output_max_exclusive": SHAREGPT_MAX_OUTPUT, "total_max_exclusive": SHAREGPT_MAX_TOTAL,
                 "min_len": SHAREGPT_MIN_LEN},
    "leval": {"prompt_mean": LEVAL_PROMPT_MEAN, "prompt_range": LEVAL_PROMPT_RANGE,
              "output_mean": LEVAL_OUTPUT_MEAN, "output_range": LEVAL_OUTPUT_RANGE},
    "lveval": {"prompt_mean": LVEVAL_MEAN_WORDS * TOKENS_PER_WORD,
               "prompt_range": (LVEVAL_MIN_WORDS * TOKENS_PER_WORD, LVEVAL_MAX_WORDS * TOKENS_PER_WORD),
               "level_medians": tuple(w * TOKENS_PER_WORD for w in LVEVAL_LEVELS_WORDS),
               "output_mean": LVEVAL_OUTPUT_MEAN, "output_range": LVEVAL_OUTPUT_RANGE},
    "zipf": {"prompt_range": ZIPF_RANGE},
}


def sample_lengths(workload: str, n: int, seed: int = 0):
    """(prompt_len, output_len): two int64 arrays [n] of the named workload, deterministic for seed."""
    if workload not in _GENERATORS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _GENERATORS[workload](_rng(seed, 0), n)


def arrival_times(n: int, rate: float, seed: int = 0, cv: float = 1.0) -> np.ndarray:
    """Arrival times (s, float64 [n], increasing) of a renewal process with `rate` requests/s.

    cv = 1: Poisson (exponential gaps). cv != 1: Gamma gaps with shape 1/cv^2 and the same mean,
    i.e. coefficient of variation cv (cv > 1 is bursty, as in DistServe / AlpaServe's Gamma traces).
    Gaps are one standard draw scaled by 1/rate, so the same seed gives the same arrival pattern
    at every rate.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    rng = _rng(seed, 1)
    if cv == 1.0:
        gaps = rng.standard_exponential(n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.standard_gamma(shape, n) / shape
    return np.cumsum(gaps / rate)


def make_requests(workload: str, n: int, rate: float, seed: int = 0, cv: float = 1.0) -> list[Request]:
    """n requests of `workload` arriving at `rate` requests/s (Poisson, or Gamma with cv)."""
    prompt, output = sample_lengths(workload, n, seed)
    arrivals = arrival_times(n, rate, seed, cv)
    return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompt, output))]


_TRACE_FIELDS = ("arrival", "prompt_len", "output_len")


def _trace_request(i, row, where):
    try:
        arrival, prompt, output = float(row["arrival"]), int(row["prompt_len"]), int(row["output_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace {where}: needs numeric fields {_TRACE_FIELDS}, got {row!r}") from e
    if not (math.isfinite(arrival) and arrival >= 0) or prompt < 1 or output < 1:
        raise ValueError(f"trace {where}: arrival must be >= 0 and lengths >= 1, got {row!r}")
    return Request(i, arrival, prompt, output)


def load_trace(path: str) -> list[Request]:
    """Requests from a .csv (header with arrival,prompt_len,output_len) or .jsonl file (one object
    per line with those keys); sorted by arrival (stable), ids 0..n-1 in that order."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl"):
        raise ValueError(f"trace path must end in .csv or .jsonl, got {path!r}")
    with open(path, newline="") as f:
        if ext == ".csv":
            rows = [(f"line {i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
        else:
            rows = [(f"line {i + 1}", json.loads(line)) for i, line in enumerate(f) if line.strip()]
    reqs = [_trace_request(i, row, f"{path} {where}") for i, (where, row) in enumerate(rows)]
    reqs.sort(key=lambda r: r.arrival)
    return [Request(i, r.arrival, r.prompt_len, r.output_len) for i, r in enumerate(reqs)]


def save_trace(requests, path: str) -> None:
    """Write requests to .csv or .jsonl (the format load_trace reads); arrivals keep full precision."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl"):
        raise ValueError(f"trace path must end in .csv or .jsonl, got {path!r}")
    with open(path, "w", newline="") as f:
        if ext == ".csv":
            w = csv.writer(f)
            w.writerow(_TRACE_FIELDS)
            for r in requests:
                w.writerow((repr(float(r.arrival)), r.prompt_len, r.output_len))
        else:
            for r in requests:
                f.write(json.dumps({"arrival": float(r.arrival), "prompt_len": r.prompt_len,
                                    "output_len": r.output_len}) + "\n")
