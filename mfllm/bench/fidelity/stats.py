"""Statistics over events: the relative KL change of the mean-field rows with a paired bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mfllm.bench.fidelity.rows import BASELINES, SAMPLED_BASELINES
from mfllm.evaluation.distributions import HORIZONS
from mfllm.evaluation.metrics import summarize


def mean(xs) -> float | None:
    v = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def compare_pair(a: Sequence, b: Sequence, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Relative change of the mean of ``a`` against the mean of ``b`` over the events where both exist:
    ``(mean_a - mean_b) / mean_b`` (negative = a lower), with a paired bootstrap 95% interval over events,
    the share of events where a < b, and the per-event difference's mean / std / CI."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True)
             if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    if not pairs:
        return None
    xa, xb = np.array(pairs, dtype=float).T
    ma, mb = float(xa.mean()), float(xb.mean())
    change = (ma - mb) / mb if mb != 0 else None
    ci = None
    if n_boot > 0 and len(xa) >= 2 and mb != 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
        ba, bb = xa[idx].mean(1), xb[idx].mean(1)
        ok = bb != 0
        r = (ba[ok] - bb[ok]) / bb[ok]
        ci = [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))] if r.size else None
    return {"kl": ma, "against_kl": mb, "change": change, "change_ci95": ci,
            "wins": float(np.mean(xa < xb)), "n": int(len(xa)), "diff": summarize(list(xa - xb))}


def relative_kl(vals: dict, mf_rows: Sequence[str], non_mf_rows: Sequence[str], n_boot: int = 2000,
                metric: str = "kl", reference: str = "mf") -> dict:
    """For every mf row and horizon: its KL against the best (lowest mean KL) non-MF row, against each
    baseline (smooth: ``vs_persistence``, ``vs_marginal``; sampled: ``vs_persistence-sampled``,
    ``vs_marginal-sampled``) and against every non-MF row. ``change = (KL_mf - KL_other) / KL_other`` (negative = mf better).
    Every mf row but ``reference`` is also compared with it (``vs_reference``; ``vs_mf`` when it is mf).
    """
    out: dict[str, dict] = {}
    for r in mf_rows:
        out[r] = {}
        for h in HORIZONS:
            mine = vals[r][h][metric]
            entry: dict[str, Any] = {"kl": mean(mine)}
            means = {o: mean(vals[o][h][metric]) for o in non_mf_rows}
            means = {o: v for o, v in means.items() if v is not None}
            vs = {o: compare_pair(mine, vals[o][h][metric], n_boot) for o in non_mf_rows}
            if means:
                best = min(means, key=means.get)
                entry["vs_best_non_mf"] = {"against": best, **(vs[best] or {})}
            else:
                entry["vs_best_non_mf"] = None
            for b in (*BASELINES, *SAMPLED_BASELINES):  # smooth and sampled baselines (absent rows: None)
                c = compare_pair(mine, vals[b][h][metric], n_boot) if b in vals else None
                entry[f"vs_{b}"] = {"against": b, **c} if c else None
            entry["vs"] = {o: c for o, c in vs.items() if c}
            if r != reference and reference in vals:  # ablations / diagnostics against the reference row
                c = compare_pair(mine, vals[reference][h][metric], n_boot)
                entry["vs_reference"] = {"against": reference, **c} if c else None
                if reference == "mf":
                    entry["vs_mf"] = entry["vs_reference"]
            out[r][h] = entry
    return out


def changes(entry: dict) -> dict:
    """A relative_kl entry reduced to its changes (per-domain tables)."""
    best = entry.get("vs_best_non_mf") or {}
    out = {"best_non_mf": best.get("against"), "vs_best_non_mf": best.get("change")}
    for b in BASELINES:
        out[f"vs_{b}"] = (entry.get(f"vs_{b}") or {}).get("change")
    return out


def lowest_share(vals: dict, row: str, rows: Sequence[str], horizon: str, metric: str) -> dict:
    """On how many events ``row`` has the lowest ``metric`` of all ``rows`` (ties count as lowest)."""
    n = wins = 0
    for i, x in enumerate(vals[row][horizon][metric]):
        if x is None or not np.isfinite(x):
            continue
        others = [vals[o][horizon][metric][i] for o in rows if o != row]
        others = [y for y in others if y is not None and np.isfinite(y)]
        n += 1
        wins += all(x <= y for y in others)
    return {"share": wins / n if n else None, "events": wins, "n": n}
