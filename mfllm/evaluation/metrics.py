"""Distribution and individual-level metrics. Pure functions; see docs/evaluation.md.

Conventions (all documented in docs/evaluation.md):

- Distribution arguments are 1-D sequences of non-negative numbers (counts or probabilities, the
  same categories in the same order); they are normalised to sum 1 first. An all-zero or empty
  distribution is a ``ValueError`` (the caller skips such bins).
- ``kl`` is KL(p_real || q_sim) in nats, after additive smoothing: ``p' = (p + eps) / sum(p + eps)``
  on both sides, ``eps = 1e-6`` by default, so a category the simulation never produces costs a
  large but finite penalty (about ``p_k * ln(p_k / eps)``).
- ``js`` is the Jensen-Shannon *divergence* (the square of scipy's Jensen-Shannon distance), base 2,
  so it lies in [0, 1].
- ``wasserstein`` places the K categories at 0, 1, ..., K-1 (as the paper does), so it lies in
  [0, K-1]; for nominal dimensions the order is the one in ``dimensions.DIMENSIONS``.
- ``total_variation`` is ``0.5 * sum |p - q|`` in [0, 1].
- ``dtw`` is the mean over categories of dtaidistance's DTW between the real and simulated share
  series of that category (dtaidistance's DTW is the square root of the summed squared differences
  along the best warping path).
- ``micro_f1`` is the per-agent micro-averaged F1 over categories. It rewards predicting each agent's
  majority label, so a sampled crowd (even one drawn from the true distribution) scores below a
  predictor that always says the majority label: read it as majority-biased.

Scoring rules (:class:`Scoring`): ``fair`` (the default) pools a source's replicas per bin and smooths
*counts* on both sides (``(c + alpha) / (n + K alpha)``) before KL and JS; ``paper`` is the paper's rule:
one crowd, ``eps`` added to the normalised shares (KL only). docs/evaluation.md says why.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
from dtaidistance import dtw as _dtw
from pydantic import BaseModel, Field
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import t as _student_t
from scipy.stats import wasserstein_distance

DEFAULT_EPS = 1e-6
# Pseudo-count per category of the fair rule, chosen on the val split (docs/evaluation.md).
DEFAULT_ALPHA = 0.5


class Scoring(BaseModel, frozen=True, extra="forbid"):
    """How a source's label counts in a bin are turned into the distribution KL / JS compare.

    ``replicas``: ``pooled`` sums the counts of every replica crowd in the bin; ``first`` scores
    replica 0 only (one crowd). ``smoothing``: ``additive`` adds ``alpha`` to every category's *count*
    on both sides (real and source) and applies to KL and JS; ``eps`` adds ``eps`` to the normalised
    shares (KL only), the paper's rule. W1, TV and DTW always compare the unsmoothed shares.
    """

    name: str = "fair"
    replicas: Literal["pooled", "first"] = "pooled"
    smoothing: Literal["additive", "eps"] = "additive"
    alpha: float = Field(DEFAULT_ALPHA, gt=0)
    eps: float = Field(DEFAULT_EPS, gt=0)

    def describe(self) -> dict:
        """What metrics.json / results.json record (only the parameter the smoothing uses)."""
        d: dict = {"name": self.name, "replicas": self.replicas, "smoothing": self.smoothing}
        if self.smoothing == "additive":
            d["alpha"] = self.alpha
        else:
            d["eps"] = self.eps
        return d


FAIR = Scoring()
PAPER = Scoring(name="paper", replicas="first", smoothing="eps")


def normalize(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``p`` as a float array summing to 1. Raises ValueError on empty / negative / all-zero."""
    a = np.asarray(p, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"a distribution must be a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("a distribution must be finite and non-negative")
    s = a.sum()
    if s <= 0:
        raise ValueError("a distribution must not be all zero")
    return a / s


def _pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    a, b = normalize(p), normalize(q)
    if a.shape != b.shape:
        raise ValueError(f"distributions have different numbers of categories: {a.size} vs {b.size}")
    return a, b


def smooth(p: Sequence[float] | np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Additive smoothing: normalise, add ``eps`` to every category, renormalise."""
    a = normalize(p) + eps
    return a / a.sum()


def kl(p: Sequence[float], q: Sequence[float], eps: float = DEFAULT_EPS) -> float:
    """KL(p_real || q_sim) in nats, both smoothed with ``eps`` (see module docstring)."""
    a, b = _pair(p, q)
    a, b = smooth(a, eps), smooth(b, eps)
    return float(max(rel_entr(a, b).sum(), 0.0))


def js(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence, base 2 (in [0, 1]) = scipy's jensenshannon(p, q, base=2) ** 2."""
    a, b = _pair(p, q)
    d = float(jensenshannon(a, b, base=2))
    if not np.isfinite(d):  # identical inputs can give nan from sqrt(-tiny)
        d = 0.0
    return min(max(d * d, 0.0), 1.0)


def wasserstein(p: Sequence[float], q: Sequence[float]) -> float:
    """Wasserstein-1 with the K categories placed at 0..K-1."""
    a, b = _pair(p, q)
    pos = np.arange(a.size, dtype=float)
    return float(wasserstein_distance(pos, pos, u_weights=a, v_weights=b))


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Total variation distance 0.5 * sum |p - q| (in [0, 1])."""
    a, b = _pair(p, q)
    return float(0.5 * np.abs(a - b).sum())


def dtw(
    real_traj: Sequence[Sequence[float]] | np.ndarray, sim_traj: Sequence[Sequence[float]] | np.ndarray
) -> float:
    """DTW between two share trajectories, shape (time bins, K categories); lengths may differ.

    Computed per category (the share of category k over time, real vs simulated) with dtaidistance
    and **averaged** over the K categories. A 1-D input is taken as a single category.
    """
    r = np.asarray(real_traj, dtype=float)
    s = np.asarray(sim_traj, dtype=float)
    if r.ndim == 1:
        r = r[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if r.ndim != 2 or s.ndim != 2:
        raise ValueError("trajectories must be 2-D: (time bins, categories)")
    if r.shape[0] == 0 or s.shape[0] == 0:
        raise ValueError("trajectories must have at least one time bin")
    if r.shape[1] != s.shape[1]:
        raise ValueError(f"trajectories have different numbers of categories: {r.shape[1]} vs {s.shape[1]}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(s))):
        raise ValueError("trajectories must be finite")
    dists = [
        _dtw.distance(np.ascontiguousarray(r[:, k]), np.ascontiguousarray(s[:, k]), use_c=True)
        for k in range(r.shape[1])
    ]
    return float(np.mean(dists))


# ---- row-wise versions: the same metrics for many bins at once, (n, K) arrays, one value per row.
# Used by evaluate.py for speed; tests check them against the scalar functions above.


def _rows(p, q) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(p, dtype=float)
    b = np.asarray(q, dtype=float)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(
            f"row-wise metrics need two (n, K) arrays of the same shape, got {a.shape} and {b.shape}"
        )
    if np.any(a < 0) or np.any(b < 0) or np.any(a.sum(1) <= 0) or np.any(b.sum(1) <= 0):
        raise ValueError("every row must be a non-negative, non-zero distribution")
    return a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)


def kl_rows(p, q, eps: float = DEFAULT_EPS) -> np.ndarray:
    a, b = _rows(p, q)
    a = (a + eps) / (a + eps).sum(1, keepdims=True)
    b = (b + eps) / (b + eps).sum(1, keepdims=True)
    return np.maximum(rel_entr(a, b).sum(1), 0.0)


def additive_rows(counts, alpha: float) -> np.ndarray:
    """Additive (Laplace / Lidstone) smoothing of count rows: ``(c + alpha) / (n + K alpha)``."""
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2 or c.shape[1] == 0 or np.any(c < 0) or not alpha > 0:
        raise ValueError("additive smoothing needs an (n, K) array of non-negative counts and alpha > 0")
    c = c + alpha
    return c / c.sum(1, keepdims=True)


def kl_js_rows(p_counts, q_counts, scoring: Scoring) -> tuple[np.ndarray, np.ndarray]:
    """(KL, JS) per row under a scoring rule; rows are counts (or any non-negative weights)."""
    if scoring.smoothing == "eps":
        return kl_rows(p_counts, q_counts, scoring.eps), js_rows(p_counts, q_counts)
    a, b = additive_rows(p_counts, scoring.alpha), additive_rows(q_counts, scoring.alpha)
    return np.maximum(rel_entr(a, b).sum(1), 0.0), js_rows(a, b)


def js_rows(p, q) -> np.ndarray:
    a, b = _rows(p, q)
    d = np.nan_to_num(jensenshannon(a, b, base=2, axis=1), nan=0.0)
    return np.clip(d * d, 0.0, 1.0)


def wasserstein_rows(p, q) -> np.ndarray:
    """W1 on 0..K-1 = sum over k of |CDF_p(k) - CDF_q(k)| (what wasserstein_distance computes there)."""
    a, b = _rows(p, q)
    return np.abs(np.cumsum(a - b, axis=1)[:, :-1]).sum(1)


def total_variation_rows(p, q) -> np.ndarray:
    a, b = _rows(p, q)
    return 0.5 * np.abs(a - b).sum(1)


Item = str | Collection[str] | None


def _as_set(x: Item) -> set[str]:
    if x is None:
        return set()
    if isinstance(x, str):
        return {x}
    return set(x)


def micro_f1(real_labels: Sequence[Item], sim_labels: Sequence[Item]) -> float:
    """Individual-level micro-averaged F1: agent i's simulated label(s) vs its real label(s).

    Each item is one category (str), a set/list of categories (multi-label, e.g. keywords) or None.
    A pair whose *real* item is None (could not be labelled) is skipped; a *simulated* None is
    "no prediction" (counts only as false negatives). Counts over every (agent, category):
    TP = |real & sim|, FP = |sim - real|, FN = |real - sim|; F1 = 2TP / (2TP + FP + FN).
    For single labels with every prediction present this equals accuracy.
    When TP = FP = FN = 0 (e.g. every keyword set empty on both sides) the sides agree: 1.0.
    Raises ValueError when no pair has a real label.
    """
    if len(real_labels) != len(sim_labels):
        raise ValueError(
            f"micro_f1 needs one simulated label per real label: {len(real_labels)} vs {len(sim_labels)}"
        )
    tp = fp = fn = 0
    n = 0
    for r, s in zip(real_labels, sim_labels, strict=True):
        if r is None:
            continue
        n += 1
        rs, ss = _as_set(r), _as_set(s)
        tp += len(rs & ss)
        fp += len(ss - rs)
        fn += len(rs - ss)
    if n == 0:
        raise ValueError("micro_f1: no agent has a real label")
    denom = 2 * tp + fp + fn
    if denom == 0:
        return 1.0
    return 2 * tp / denom


METRICS: tuple[str, ...] = ("kl", "js", "wasserstein", "tv", "dtw", "micro_f1")
SHORT_NAMES: dict[str, str] = {
    "kl": "KL",
    "js": "JS",
    "wasserstein": "W1",
    "tv": "TV",
    "dtw": "DTW",
    "micro_f1": "F1",
}
# Lower is better for every metric except micro_f1.
HIGHER_IS_BETTER: frozenset[str] = frozenset({"micro_f1"})


def summarize(values: Sequence[float | None], *, min_n: int = 2,
              bounds: tuple[float | None, float | None] = (None, None)) -> dict:
    """Mean over events, sample std (ddof=1) and a 95% Student-t interval of the mean, clipped to the
    metric's range ``bounds`` (a KL interval never goes below 0). None / NaN values are dropped; std is None
    with fewer than 2 values, ci95 with fewer than ``min_n`` (evaluate uses 3: two events give no interval
    worth showing), mean with none."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": n}
    std = float(v.std(ddof=1))
    if n < max(2, min_n):
        return {"mean": mean, "std": std, "ci95": None, "n": n}
    half = float(_student_t.ppf(0.975, n - 1)) * std / np.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds[0] is not None:
        lo = max(lo, bounds[0])
    if bounds[1] is not None:
        hi = min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci95": [lo, hi], "n": n}


# The range of each metric (for clipping intervals): all are >= 0, micro-F1 is also <= 1.
METRIC_BOUNDS: dict[str, tuple[float | None, float | None]] = {"micro_f1": (0.0, 1.0)}


def summarize_metric(metric: str, values: Sequence[float | None]) -> dict:
    """``summarize`` for one of METRICS over events: no interval below 3 events, clipped to the metric's range."""
    return summarize(values, min_n=3, bounds=METRIC_BOUNDS.get(metric, (0.0, None)))
