"""Statistics over replicas: the mean with a percentile band (forecasts), and paired effects with a 95%
Student-t interval (interventions).

Paired effects: `intervene` runs the baseline and the intervened arm with the *same* replica ids, action
ids and seed (common random numbers): before the intervention both arms produce identical actions, and
after it the difference per replica is the intervention's effect, not sampling noise. Effects are the
paired differences of label shares (intervened - baseline) per replica, summarised by their mean and a
95% Student-t interval over the R replicas (mfllm.evaluation.metrics.summarize).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from mfllm.evaluation import metrics as M
from mfllm.whatif.shares import block_shares, per_dim


def mean_band(shares: np.ndarray, lo: float = 5, hi: float = 95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and the lo-hi percentiles over axis 0 (replicas), ignoring NaN (all-NaN -> NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmean(shares, 0), np.nanpercentile(shares, lo, axis=0), np.nanpercentile(shares, hi, axis=0))


def num(x) -> float | None:
    """A JSON number: rounded to 6 decimals, None for NaN / inf."""
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def nums(a) -> list[float | None]:
    return [num(v) for v in np.asarray(a).ravel()]


def summary(values: np.ndarray) -> dict:
    """Mean, 95% interval, std and n of the finite values (mfllm.evaluation.metrics.summarize)."""
    s = M.summarize([float(v) for v in values if np.isfinite(v)])
    return {"mean": s["mean"], "ci95": s["ci95"], "std": s["std"], "n": s["n"]}


def paired_effects(base: np.ndarray, intv: np.ndarray) -> dict[str, dict[str, dict]]:
    """{dim: {cat: {mean, ci95, std, n}}} of the per-replica differences intervened - baseline (shares,
    (R, K) arrays); replicas where either arm has no labelled agent are dropped."""
    diff = block_shares(intv) - block_shares(base)
    return per_dim(diff, summary)


def points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def describe_effect(dim: str, cat: str, e: dict, where: str) -> str:
    if e["mean"] is None:
        return f"{dim}={cat}: no data {where}"
    s = f"{dim}={cat} {points(e['mean'])} points"
    if e["ci95"] is not None:
        lo, hi = e["ci95"]
        s += f" (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}, {e['n']} paired runs)"
    else:
        s += f" (no interval: {e['n']} paired run{'s' if e['n'] != 1 else ''})"
    return s + f" {where}"


def headline(effects: dict, top: int = 5) -> list[tuple[str, str, dict]]:
    """The largest effects: per dimension its category with the largest |mean| (binary dimensions are
    mirror images), ordered by interval-excludes-zero first, then |mean|."""
    rows = []
    for d, cats in effects.items():
        best = max(cats.items(), key=lambda kv: -1 if kv[1]["mean"] is None else abs(kv[1]["mean"]))
        c, e = best
        if e["mean"] is None:
            continue
        sig = e["ci95"] is not None and (e["ci95"][0] > 0 or e["ci95"][1] < 0)
        rows.append((not sig, -abs(e["mean"]), d, c, e))
    rows.sort(key=lambda x: (x[0], x[1]))
    return [(d, c, e) for _, _, d, c, e in rows[:top]]
