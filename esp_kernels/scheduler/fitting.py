"""Least squares on relative error with non-negative coefficients, and piecewise-linear curves.

Profiled times span four orders of magnitude (a 1-token GEMM to a 128k-token prefill), so every
fit minimises sum(((pred - t) / t)^2): each sample weighs by its relative error, not its size.
Coefficients are physical times (per token, per byte, per FLOP-like term) and must be >= 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """min ||A x - b|| subject to x >= 0 (Lawson-Hanson active set). A [m, n], b [m]."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    max_iter = max_iter or 3 * n + 30
    w = A.T @ (b - A @ x)
    tol = 1e-12 * max(1.0, float(np.abs(A).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter):
        if passive.all() or (w[~passive] <= tol).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = A.T @ (b - A @ x)
    return x


def relative_nnls(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative coefficients c minimising sum(((features @ c - t) / t)^2).

    Columns are scaled to unit norm first (Σl² and a constant differ by 10^10)."""
    F = np.asarray(features, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] != t.shape[0]:
        raise ValueError(f"features {F.shape} and times {t.shape} do not match")
    if F.shape[0] == 0:
        raise ValueError("no samples to fit")
    if (t <= 0).any():
        raise ValueError("sample times must be > 0")
    W = F / t[:, None]
    scale = np.linalg.norm(W, axis=0)
    scale[scale == 0] = 1.0
    c = nnls(W / scale, np.ones_like(t))
    return c / scale


class PiecewiseLinear:
    """t(n): linear between knots, the first value below the first knot, the last segment's
    slope beyond the last knot (GEMM time keeps growing linearly with tokens)."""

    def __init__(self, knots: Sequence[float], values: Sequence[float]):
        self.knots = np.asarray(knots, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.float64)
        if self.knots.ndim != 1 or self.knots.shape != self.values.shape or not len(self.knots):
            raise ValueError("knots and values must be equal-length non-empty lists")
        if not (np.isfinite(self.knots).all() and np.isfinite(self.values).all()):
            raise ValueError("knots and values must be finite")
        if (np.diff(self.knots) <= 0).any():
            raise ValueError("knots must be strictly increasing")
        if (self.values < 0).any():
            raise ValueError("values must be >= 0")
        if len(self.knots) > 1:
            self._slope = max(0.0, (self.values[-1] - self.values[-2]) /
                              (self.knots[-1] - self.knots[-2]))
        else:
            self._slope = 0.0
        self._k = self.knots.tolist()
        self._v = self.values.tolist()
        self._memo: dict = {}

    def __call__(self, n):
        """n: a number or an array of numbers."""
        if isinstance(n, np.ndarray):
            out = np.interp(n, self.knots, self.values)
            beyond = n > self.knots[-1]
            return np.where(beyond, self.values[-1] + (n - self.knots[-1]) * self._slope, out)
        hit = self._memo.get(n)
        if hit is not None:
            return hit
        t = self._eval(n)
        if len(self._memo) < 1 << 14:   # the scheduler asks the same small sizes every step
            self._memo[n] = t
        return t

    def _eval(self, n):
        k, v = self._k, self._v
        if n >= k[-1]:
            return v[-1] + (n - k[-1]) * self._slope
        if n <= k[0]:
            return v[0]
        lo, hi = 0, len(k) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if k[mid] <= n:
                lo = mid
            else:
                hi = mid
        f = (n - k[lo]) / (k[hi] - k[lo])
        return v[lo] + f * (v[hi] - v[lo])

    @staticmethod
    def hat_basis(n: np.ndarray, knots: np.ndarray) -> np.ndarray:
        """[len(n), len(knots)]: row i holds the interpolation weights of n[i] on the knots
        (beyond the last knot: the last segment's linear extrapolation)."""
        n = np.asarray(n, dtype=np.float64)
        B = np.zeros((len(n), len(knots)))
        for i, x in enumerate(n):
            if len(knots) == 1 or x <= knots[0]:
                B[i, 0] = 1.0
                continue
            j = int(np.searchsorted(knots, x, side="right")) - 1
            j = min(j, len(knots) - 2)
            f = (x - knots[j]) / (knots[j + 1] - knots[j])
            B[i, j], B[i, j + 1] = 1.0 - f, f
        return B

    @classmethod
    def fit(cls, n: Sequence[float], t: Sequence[float], max_knots: int = 24) -> "PiecewiseLinear":
        """Knots at the distinct sampled sizes (thinned log-uniformly to max_knots), values by
        relative-error NNLS on the hat basis."""
        n = np.asarray(n, dtype=np.float64)
        distinct = np.unique(n)
        if len(distinct) > max_knots:
            idx = np.unique(np.round(np.geomspace(1, len(distinct), max_knots)).astype(int) - 1)
            distinct = distinct[idx]
        return cls(distinct, relative_nnls(cls.hat_basis(n, distinct), np.asarray(t)))

    def to_dict(self) -> dict:
        return {"knots": self.knots.tolist(), "values": self.values.tolist()}
