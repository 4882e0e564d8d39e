"""The what-if figures (mfllm.plotting's style): one panel per dimension, x = agents after the warm-up.

- ``forecast.png``: the forecast share (mean over runs, 5-95% band), the real future dashed, the
  observed (warm-up) share at x = 0;
- ``trajectories.png``: the baseline and intervened arms' shares (mean, 5-95% band), the intervention dotted;
- ``effects.png``: the paired effect per bin in percentage points (mean, 95% interval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfllm import plotting as P
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.whatif.shares import BLOCKS, Trajectories, bin_ranges, block_shares
from mfllm.whatif.stats import mean_band

# the categories drawn (a binary dimension's second category is the mirror image of the first)
PLOT_CATS: dict[str, tuple[str, ...]] = {
    "rumor": ("counter",), "belief_degree": ("doubt",), "behavior_type": ("comment",),
    "subjectivity": ("subjective",), "stance": DIMENSIONS["stance"],
    "sentiment_tendency": DIMENSIONS["sentiment_tendency"], "intent": DIMENSIONS["intent"],
    "sentiment_state": DIMENSIONS["sentiment_state"],
}
X_LABEL = "agents after the warm-up"
SHARE = "share of agents"
_COLS = 4
_LEGEND = 0.95  # inches beside each panel for its categories


def _panels(title: str):
    return P.figure(len(PLOT_CATS), _COLS, title=title, legend_width=_LEGEND)


def plot_forecast(path: Path, res: dict) -> Path:
    x = [a1 for _, a1 in res["bins"]["agents"]]
    cfg = res["config"]
    fig, axes = _panels(f"{res['event']['event_id']}: forecast after {cfg['observe']} observed actions "
                        f"({cfg['runs']} runs)")
    P.key(fig, [("forecast: mean of the runs (band: 5-95% of the runs)", "-", "o")]
          + ([("real future", "--", "x")] if res["real"] else [])
          + [("observed share (warm-up), at 0", "", "s")])
    colors = P.colors()
    for ax, (d, cats) in zip(axes, PLOT_CATS.items(), strict=True):
        for j, c in enumerate(cats):
            col = colors[j % len(colors)]
            f = res["forecast"][d][c]
            ax.plot(x, P.values(f["mean"]), "-o", color=col, label=c)
            P.band(ax, x, f["p5"], f["p95"], col)
            obs = res["observed"][d][c]
            if obs is not None:
                ax.plot([0], [obs], "s", color=col, ms=5)
            if res["real"]:
                ax.plot(x, P.values(res["real"][d][c]), "--x", ms=4, color=col, alpha=0.9)
        P.style_axes(ax, X_LABEL, SHARE, d, ylim=(0, 1))
        P.legend(ax)
    return P.save(fig, path)


def plot_trajectories(path: Path, arms: dict[str, Trajectories], bin_steps: int, title: str,
                      marker_step: int | None = None, total: int | None = None) -> Path:
    """Each arm's mean share and 5-95% band per bin; colour = category, line style = arm."""
    fig, axes = _panels(title)
    styles, markers = ["-", "--", ":"], ["o", "^", "s"]
    P.key(fig, [(f"{name} (band: 5-95% of the runs)", styles[i % 3], markers[i % 3]) for i, name in enumerate(arms)]
          + ([("intervention", "|", None)] if marker_step is not None else []))
    colors = P.colors()
    first = next(iter(arms.values()))
    k = first.step_size
    for ai, tr in enumerate(arms.values()):
        counts, _, _ = tr.bins(bin_steps)
        mean, lo, hi = mean_band(block_shares(counts))
        x = [a1 for _, a1 in bin_ranges(counts.shape[1], bin_steps, k, total)]
        for ax, (d, cats) in zip(axes, PLOT_CATS.items(), strict=True):
            for j, c in enumerate(cats):
                i = BLOCKS[d].start + DIMENSIONS[d].index(c)
                col = colors[j % len(colors)]
                ax.plot(x, mean[:, i], styles[ai % 3], marker=markers[ai % 3], color=col,
                        label=c if ai == 0 else None)
                P.band(ax, x, lo[:, i], hi[:, i], col, alpha=0.12 if ai == 0 else 0.08)
    for ax, d in zip(axes, PLOT_CATS, strict=True):
        if marker_step is not None:
            ax.axvline((marker_step - first.first_step) * k, color="k", lw=0.8, ls=":")
        P.style_axes(ax, X_LABEL, SHARE, d, ylim=(0, 1))
        P.legend(ax)
    return P.save(fig, path)


def plot_effects(path: Path, res: dict, title: str) -> Path:
    fig, axes = _panels(title)
    P.key(fig, [("mean paired effect (band: 95% interval over the runs)", "-", "o"), ("intervention", "|", None)])
    colors = P.colors()
    x = np.array([a1 for _, a1 in res["bins"]["agents"]], dtype=float)
    k = res["config"]["step_size"]
    xs = (res["intervention"]["start_step"] - res["intervention"]["first_rollout_step"]) * k
    for ax, (d, cats) in zip(axes, PLOT_CATS.items(), strict=True):
        for j, c in enumerate(cats):
            s = res["effect_by_bin"][d][c]
            col = colors[j % len(colors)]
            ax.plot(x, 100 * P.values(s["mean"]), "-o", color=col, label=c)
            P.band(ax, x, 100 * P.values(s["lo"]), 100 * P.values(s["hi"]), col)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(xs, color="k", lw=0.8, ls=":")
        P.style_axes(ax, X_LABEL, "effect (percentage points)", d)
        P.legend(ax)
    return P.save(fig, path)
