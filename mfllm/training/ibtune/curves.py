"""IB-Tune stage 1's curves: reward_curve.csv and reward_curve.png."""

from __future__ import annotations

from pathlib import Path

from mfllm import plotting as P
from mfllm.training.mini import write_curve_csv


def write_meanfield_curves(out: Path, history: list[dict], before: dict | None = None,
                           reference: dict | None = None) -> None:
    """reward_curve.csv and reward_curve.png: per step the batch's objective / R / KL / length (train R
    varies with the batch's histories) and, every eval, the same on the fixed val histories (step 0:
    before training)."""
    if not history:
        return
    keys = ["step", "objective", "reward", "kl", "length", "surrogate", "grad_norm", "lr",
            "val_objective", "val_reward", "val_kl", "val_length"]
    rows = ([{"step": 0, **{f"val_{k}": v for k, v in before.items()}}] if before else []) + history
    write_curve_csv(out / "reward_curve.csv", keys, rows)
    steps = [h["step"] for h in history]
    ev = [h for h in rows if "val_reward" in h]
    vs = [h["step"] for h in ev]
    fig, axes = P.figure(3, cols=3, panel=(3.0, 2.3), legend_width=1.9, key=False,
                         title="IB-Tune stage 1 (mean field): prediction term, compression term, summary length")
    ax = axes[0]
    ax.plot(vs, [h["val_reward"] for h in ev], "o-", label="val R (log-lik / next action)")
    ax.plot(vs, [h["val_objective"] for h in ev], "s-", label="val R - beta KL")
    for name, style in (("reward_empty_marker", ":"), ("reward_stats_meanfield", "--")):
        if reference and name in reference:
            ax.axhline(reference[name], color="grey", ls=style, lw=1,
                       label="val R, m = " + ("empty marker" if "empty" in name else "stats mean field"))
    ax = axes[1]
    ax.plot(steps, [h["kl"] for h in history], lw=0.8, alpha=0.6, label="train KL estimate")
    ax.plot(vs, [h["val_kl"] for h in ev], "o-", label="val KL estimate")
    ax = axes[2]
    ax.plot(steps, [h["length"] for h in history], lw=0.8, alpha=0.6, label="train |m|")
    ax.plot(vs, [h["val_length"] for h in ev], "o-", label="val |m|")
    for ax, ylabel, title in zip(axes, ("nats", "nats", "tokens"),
                                 ("prediction term R", "compression term KL", "summary length |m|"), strict=True):
        P.style_axes(ax, "step", ylabel, title)
        P.legend(ax)
    P.save(fig, out / "reward_curve.png")
