"""Forecast an event's reactions: W observed actions as the warm-up, then H simulated agents, R times.

    from mfllm.whatif.forecast import forecast
    res = forecast(event, "out/fc", observe=32, horizon=96, runs=8)

Writes to the output folder:

- ``forecast.json``: per label (dimension, category) and bin of agents, the forecast share's mean and
  5-95% band over the R runs, the observed (warm-up) shares, the real future's shares where the data has
  it, and the scores;
- ``forecast.csv``: the same series, one row per (bin, dimension, category);
- ``forecast.png``: the trajectories with their bands (real future dashed);
- ``forecast.md``: the error-by-horizon table when the real future exists;
- ``runs/r0 .. runs/r{R-1}``: each replica's run directory (``mfllm export`` / ``mfllm evaluate`` read them).

Scoring (when the data has the future): per horizon bucket (one bin of agents after the warm-up), KL,
JS and Wasserstein-1 (mfllm.evaluation.metrics) between the real shares of the agents in that bucket and
(a) the forecast (the mean share over runs), (b) one run (the mean of the per-run errors), (c) the
persistence baseline (the warm-up's real shares), (d) the marginal baseline (the training split's
shares; mfllm/assets/marginal_<labeler>_v<version>.json or --marginal), macro-averaged over the 8
categorical dimensions. The real future at position i is the event's (W+i)-th real action: exactly the
agent that was simulated there, unless --blind resampled every agent after the warm-up.

A new event (no data file) is a small JSON file, see :func:`mfllm.data.new_event.load_new_event`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.backends.base import Backend
from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.files import atomic_write_json, atomic_write_text
from mfllm.labels.base import Labeler
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.simulation.engine import SimConfig
from mfllm.whatif.common import check_config, close_labeler, open_output, replica_events, run_arm
from mfllm.whatif.plots import plot_forecast
from mfllm.whatif.shares import (
    BLOCKS,
    CATS,
    bin_ranges,
    block_shares,
    count_vector,
    label_records,
    per_dim,
    trajectories,
)
from mfllm.whatif.stats import mean_band, num, nums

SCORE_METRICS = ("kl", "js", "wasserstein")
_METRIC_FN = {"kl": M.kl, "js": M.js, "wasserstein": M.wasserstein}
SOURCES = ("forecast", "one_run", "persistence", "marginal")

# ------------------------------------------------------------------------------------------------ scoring


def real_future_counts(event: Event, observe: int, n_positions: int, bin_agents: int, n_bins: int,
                       labels: dict, until_time: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) label counts and (B,) numbers of the real actions after the warm-up, binned by position."""
    counts = np.zeros((n_bins, len(CATS)))
    n = np.zeros(n_bins)
    future = event.actions[observe:observe + n_positions]
    for i, a in enumerate(future):
        if until_time is not None and a.time > until_time:
            break
        b = i // bin_agents
        if b >= n_bins:
            break
        counts[b] += count_vector([labels.get(a.text)])
        n[b] += 1
    return counts, n


def _metric(name: str, real: np.ndarray, pred: np.ndarray) -> float | None:
    if real.sum() <= 0 or not np.all(np.isfinite(pred)) or pred.sum() <= 0:
        return None
    return float(_METRIC_FN[name](real, pred))


def score_forecast(real: np.ndarray, shares: np.ndarray, warm: np.ndarray, marginal: dict | None) -> list[dict]:
    """Per bin: {source: {metric: macro over dimensions}} (None where nothing to compare).

    real (B, K) counts; shares (R, B, K) per-run forecast shares; warm (K,) warm-up counts."""
    mean = mean_band(shares)[0] if shares.size else np.full(real.shape, np.nan)
    marg = None
    if marginal is not None:
        dists = marginal.get("distributions") or {}
        marg = np.array([float((dists.get(d) or {}).get(c, 0.0)) for d, cs in DIMENSIONS.items() for c in cs])
    out = []
    for b in range(real.shape[0]):
        res: dict[str, dict[str, float | None]] = {}
        for src in SOURCES:
            per_metric: dict[str, float | None] = {}
            for m in SCORE_METRICS:
                vals = []
                for sl in BLOCKS.values():
                    rc = real[b, sl]
                    if src == "forecast":
                        v = _metric(m, rc, mean[b, sl])
                    elif src == "one_run":
                        rv = [_metric(m, rc, shares[r, b, sl]) for r in range(shares.shape[0])]
                        rv = [x for x in rv if x is not None]
                        v = float(np.mean(rv)) if rv else None
                    elif src == "persistence":
                        v = _metric(m, rc, warm[sl])
                    else:
                        v = _metric(m, rc, marg[sl]) if marg is not None else None
                    if v is not None:
                        vals.append(v)
                per_metric[m] = float(np.mean(vals)) if vals else None
            res[src] = per_metric
        out.append(res)
    return out


def load_marginal_for(lab: Labeler, marginal: str | Path | dict | None) -> tuple[dict | None, str]:
    if isinstance(marginal, dict):
        return marginal, "given"
    if marginal is not None:
        return D.load_marginal(marginal), str(marginal)
    p = D.marginal_path(str(getattr(lab, "name", "?")), str(getattr(lab, "version", "?")))
    if p.is_file():
        return D.load_marginal(p), str(p)
    return None, f"unavailable (no {p.name}; pass --marginal FILE)"


def scores_markdown(scores: dict) -> str:
    cols = [(s, m) for s in SOURCES for m in SCORE_METRICS]
    head = "| horizon (agents after the warm-up) | real agents | " + " | ".join(
        f"{s.replace('_', ' ')} {M.SHORT_NAMES.get(m, m)}" for s, m in cols) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(cols)]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for row in scores["buckets"]:
        lines.append(f"| {row['agents'][0]}-{row['agents'][1]} | {row['n_real']} | "
                     + " | ".join(f(row[s][m]) for s, m in cols) + " |")
    o = scores["overall"]
    lines.append("| **all** | " + str(sum(r["n_real"] for r in scores["buckets"])) + " | "
                 + " | ".join(f(o[s][m]) for s, m in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ forecast


def forecast(event: Event, out: str | Path, *, observe: int, horizon: int | None = None,
             horizon_time: float | None = None, runs: int = 8, config: SimConfig | None = None,
             backend: Backend | None = None, backend_name: str = "hf", model: str | None = None,
             backend_options: dict | None = None, labeler: str | Labeler = "rules",
             label_cache: str | Path | None = None, marginal: str | Path | dict | None = None,
             bin_steps: int = 1, blind: bool = False, data: str | None = None, plots: bool = True,
             progress: bool = True, force: bool = False) -> dict:
    """Simulate R replicas of `event` after its first `observe` actions; write and return the forecast."""
    config = (config or SimConfig()).model_copy(update={"warmup": observe})
    check_config(config)
    if bin_steps < 1:
        raise ConfigError("--bin-steps must be at least 1", field="bin_steps")
    events = replica_events(event, runs, observe, horizon, horizon_time, config.seed, blind)
    obs_time = event.actions[observe - 1].time if observe else event.source.time
    until = obs_time + horizon_time if horizon_time is not None else None
    if len(events[0].actions) <= observe:
        raise ConfigError("nothing to simulate: no agent arrives within the horizon", field="horizon_time")
    o = open_output(out, force, backend, backend_name, model, backend_options, labeler, label_cache, data,
                    {"command": "forecast", "event": event.event_id, "observe": observe, "horizon": horizon,
                     "horizon_time": horizon_time, "runs": runs, "blind": blind})
    out, backend, lab, meta = o.out, o.backend, o.labeler, o.meta
    atomic_write_json(out / "whatif.json", {"command": "forecast", "event": event.event_id})
    arm = run_arm("forecast", events, config, backend, out / "runs", meta, progress=progress)
    k = config.step_size
    n_real_future = len(event.actions) - observe
    try:
        labels = label_records([arm], lab, [a.text for a in event.actions[observe:]])
        marg, marg_src = load_marginal_for(lab, marginal)
    finally:
        close_labeler(lab, labeler)
    traj = trajectories(arm, labels, event.source.time, k)
    counts, agents, hours = traj.bins(bin_steps)
    shares = block_shares(counts)  # (R, B, K)
    nb = counts.shape[1]
    mean, lo, hi = mean_band(shares)
    warm_share = block_shares(traj.warm)
    max_pos = max(len(e.actions) for e in events) - observe
    real, n_real = real_future_counts(event, observe, min(max_pos, n_real_future), bin_steps * k, nb, labels, until)
    has_real = bool(n_real.sum() > 0)
    result: dict[str, Any] = {
        "event": {"event_id": event.event_id, "label": event.label, "source": event.source.text[:200],
                  "real_actions": len(event.actions), "source_time": event.source.time},
        "config": {"observe": observe, "horizon": horizon, "horizon_time": horizon_time, "runs": runs,
                   "blind": blind, "bin_steps": bin_steps, "step_size": k, "sim": config.model_dump(),
                   "labeler": {"name": str(getattr(lab, "name", "?")), "version": str(getattr(lab, "version", "?"))}},
        "agents_simulated_per_run": [int(x) for x in agents.sum(1)],
        "beyond_real_data": max(0, max_pos - n_real_future),
        "bins": {"agents": bin_ranges(nb, bin_steps, k, max_pos), "hours_after_source": nums(mean_band(hours[..., None])[0]),
                 "real_agents": [int(x) for x in n_real]},
        "observed": per_dim(warm_share, num),
        "forecast": per_dim(np.stack([mean, lo, hi]), lambda v: {"mean": nums(v[0]), "p5": nums(v[1]),
                                                                  "p95": nums(v[2])}),
        "real": per_dim(block_shares(real), nums) if has_real else None,
        "runs": [str(Path("runs") / d.name) for d in arm.dirs],
        "seconds": arm.seconds,
    }
    if has_real:
        per_bin = score_forecast(real, shares, traj.warm, marg)
        buckets = [{"bin": b, "agents": result["bins"]["agents"][b], "n_real": int(n_real[b]), **per_bin[b]}
                   for b in range(nb) if n_real[b] > 0]
        overall = {s: {m: _mean([row[s][m] for row in buckets]) for m in SCORE_METRICS} for s in SOURCES}
        result["scores"] = {"metrics": list(SCORE_METRICS), "sources": list(SOURCES),
                            "macro_over": list(DIMENSIONS), "marginal": marg_src, "buckets": buckets,
                            "overall": overall, "growth": _growth(buckets)}
    else:
        result["scores"] = None
    if plots:
        plot_forecast(out / "forecast.png", result)
        result["plot"] = "forecast.png"
    atomic_write_json(out / "forecast.json", result)
    atomic_write_text(out / "forecast.csv", forecast_csv(result))
    atomic_write_text(out / "forecast.md", forecast_markdown(result))
    return result


def _mean(vals) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _growth(buckets: list[dict]) -> dict | None:
    """Least-squares slope of the forecast's JS per 100 agents of horizon (how fast error grows)."""
    pts = [((b["agents"][0] + b["agents"][1]) / 2, b["forecast"]["js"]) for b in buckets
           if b["forecast"]["js"] is not None]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    slope = float(np.polyfit(x, y, 1)[0])
    return {"js_per_100_agents": round(100 * slope, 6), "first_js": pts[0][1], "last_js": pts[-1][1]}


def forecast_csv(res: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["bin", "agents_from", "agents_to", "hours_after_source", "dimension", "category", "mean", "p5",
                "p95", "real", "real_agents", "observed"])
    for b, (a0, a1) in enumerate(res["bins"]["agents"]):
        for d, cs in DIMENSIONS.items():
            for c in cs:
                f = res["forecast"][d][c]
                real = res["real"][d][c][b] if res["real"] else None
                w.writerow([b, a0, a1, _fmt(res["bins"]["hours_after_source"][b]), d, c, _fmt(f["mean"][b]),
                            _fmt(f["p5"][b]), _fmt(f["p95"][b]), _fmt(real), res["bins"]["real_agents"][b],
                            _fmt(res["observed"][d][c])])
    return buf.getvalue()


def _fmt(x) -> str:
    return "" if x is None else f"{x:.6g}"


def forecast_markdown(res: dict) -> str:
    ev, cfg = res["event"], res["config"]
    hz = f"{cfg['horizon']} agents" if cfg["horizon"] is not None else f"{cfg['horizon_time']:g} s"
    lines = [f"# Forecast: {ev['event_id']} ({ev.get('label') or 'unlabelled'})", "", f"> {ev['source'][:120]}", "",
             f"- observed (warm-up): {cfg['observe']} real actions; horizon: {hz}; {cfg['runs']} runs; "
             f"steps of {cfg['step_size']} agents; bins of {cfg['bin_steps'] * cfg['step_size']} agents",
             f"- agents simulated per run: {res['agents_simulated_per_run']}"
             + (f" ({res['beyond_real_data']} beyond the real data, resampled)" if res["beyond_real_data"] else ""),
             "- band: 5-95% of the runs' shares; forecast = the mean over runs", ""]
    s = res.get("scores")
    if s:
        lines += ["## Error by horizon", "",
                  f"Macro over the {len(s['macro_over'])} categorical dimensions; lower is better. "
                  "`one run` = the mean error of a single run; persistence = the warm-up's shares; "
                  f"marginal: {s['marginal']}.", "", scores_markdown(s), ""]
        if s.get("growth"):
            g = s["growth"]
            lines += [f"Forecast JS grows by {g['js_per_100_agents']:+.4f} per 100 agents of horizon "
                      f"({g['first_js']:.3f} in the first bucket, {g['last_js']:.3f} in the last).", ""]
    else:
        lines += ["No real future in the data for this horizon: nothing to score.", ""]
    if res.get("plot"):
        lines += [f"![forecast]({res['plot']})", ""]
    return "\n".join(lines)
