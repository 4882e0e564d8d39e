"""PNG plots of an evaluation (mfllm.plotting's style): the real vs the simulated share of each label, per bin.

A *bin* is the evaluation's unit of time (``binning`` in metrics.json, ``--bin-by`` / ``--bin-size``): by
default one engine step (``step_size`` agents); ``actions N`` = N rollout actions; ``seconds S`` = S
seconds of real time. x = 0 is the rollout's first bin; the warm-up's bins are negative.

- ``event_<id>.png``: one event: the warm-up's real shares (thin), then the rollout's real (solid) and
  simulated (dashed) shares, the rollout start dotted; the keywords panel shows the event's most
  frequent real keywords (k1, k2... without a CJK font; the report lists the words).
- ``average.png``: the mean over events of each bin's share, aligned at the rollout start (keywords left
  out: vocabularies differ), with a panel counting the events behind each bin; bins backed by fewer
  than ``MIN_EVENTS`` events are shaded (their mean swings with a single event).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mfllm import plotting as P
from mfllm.evaluation import distributions as D
from mfllm.labels.dimensions import ALL_DIMENSIONS, DIMENSIONS, KEYWORDS

if TYPE_CHECKING:
    from mfllm.evaluation.result import Evaluation

MAX_KEYWORD_LINES = 6  # keywords panel: the most frequent vocabulary words only
MIN_EVENTS = 3  # average plot: bins backed by fewer events are shaded
_COLS = 3
_PANEL = (3.0, 2.1)
_LEGEND = 1.0
_DPI = 90  # the report embeds every plot: a readable size at a modest file size
SHARE = "share of labelled agents"
KEYWORD_SHARE = "share of keyword uses"  # an agent's every keyword counts once


def keyword_legend(vocab: tuple[str, ...]) -> list[str]:
    """The labels the keywords panel uses for the vocabulary: the words, or k1, k2... without a CJK font."""
    return list(vocab) if P.has_cjk_font() else [f"k{i + 1}" for i in range(len(vocab))]


def bin_description(binning: dict | None, step_size: int | None = None) -> str:
    """What one bin is, in words ("1 bin = 1 engine step of 16 agents", "1 bin = 600 s of real time")."""
    by = (binning or {}).get("by", "steps")
    size = (binning or {}).get("size", 1)
    if by == "actions":
        return f"1 bin = {size:g} rollout actions"
    if by == "seconds":
        s = float(size)
        when = f"{s / 3600:g} h" if s >= 3600 and s % 360 == 0 else f"{s / 60:g} min" if s % 60 == 0 else f"{s:g} s"
        return f"1 bin = {when} of real time"
    steps = f"{size:g} engine step{'s' if size != 1 else ''}"
    return f"1 bin = {steps}" + (f" of {step_size} agents" if step_size else "")


def safe_name(event_id: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", event_id).strip("._") or "event"
    return s[:80]


def event_series(ev: D.EventLabels, dim: str, vocab: tuple[str, ...]) -> dict[str, np.ndarray | tuple]:
    """Share arrays of one dimension: warm-up real (Wb,K), rollout real and sim (Rb,K); NaN = no data."""
    cats = D.categories(dim, vocab)
    return {
        "cats": cats,
        "warmup": D.shares(D.bin_counts(ev.warmup, ev.warmup_bins, ev.n_warmup_bins, dim, cats)),
        "real": D.shares(D.bin_counts(ev.real, ev.bins, ev.n_bins, dim, cats)),
        "sim": D.shares(D.bin_counts(ev.sim, ev.bins, ev.n_bins, dim, cats)),
    }


def _key(fig, method: str) -> None:
    P.key(fig, [("real", "-", "o"), (method, "--", "x"), ("warm-up: real (thin)", "-", None),
                ("rollout start", "|", None)])


def _panel(ax, cats, warm, real, sim, title: str, xlabel: str, keep: list[int] | None = None) -> None:
    nw = warm.shape[0]
    keep = list(range(len(cats))) if keep is None else keep
    xw = np.arange(-nw, 0)
    xr = np.arange(real.shape[0])
    colors = P.colors()
    for j, k in enumerate(keep):
        c = colors[j % len(colors)]
        if nw:
            ax.plot(np.append(xw, xr[:1]), np.append(warm[:, k], real[:1, k]), color=c, lw=1.0, alpha=0.55)
        ax.plot(xr, real[:, k], color=c, marker="o", label=str(cats[k]))
        ax.plot(xr, sim[:, k], color=c, ls="--", marker="x")
    ax.axvline(-0.5, color="k", lw=0.8, ls=":")
    P.style_axes(ax, xlabel, KEYWORD_SHARE if title == KEYWORDS else SHARE, title, ylim=(0, 1), integer_x=True)
    P.legend(ax)


def _xlabel(bins: str) -> str:
    return f"bins from the rollout start ({bins})"


def plot_event(ev: D.EventLabels, path: Path, method: str = "sim",
               keywords_top_n: int = D.DEFAULT_KEYWORDS_TOP_N, bins: str = "1 bin = 1 engine step") -> Path:
    vocab = ev.vocab(keywords_top_n)
    fig, axes = P.figure(len(ALL_DIMENSIONS), _COLS, panel=_PANEL, legend_width=_LEGEND,
                         title=f"event {ev.event_id}: real vs {method}")
    _key(fig, method)
    for ax, dim in zip(axes, ALL_DIMENSIONS, strict=True):
        s = event_series(ev, dim, vocab)
        keep, cats = None, s["cats"]
        if dim == KEYWORDS:
            keep = list(range(min(len(vocab), MAX_KEYWORD_LINES))) + [len(vocab)]
            cats = (*keyword_legend(vocab), "other")
        _panel(ax, cats, s["warmup"], s["real"], s["sim"], dim, _xlabel(bins), keep=keep)
    return P.save(fig, path, dpi=_DPI)


def plot_average(evs: list[D.EventLabels], path: Path, method: str = "sim",
                 bins: str = "1 bin = 1 engine step") -> Path:
    """Mean share over events per bin offset from the rollout start (categorical dimensions), and the
    number of events behind each bin."""
    dims = list(DIMENSIONS)
    max_w = max((ev.n_warmup_bins for ev in evs), default=0)
    max_r = max((ev.n_bins for ev in evs), default=0)
    # events behind each bin, x = -max_w .. max_r - 1 (warm-up bins right-aligned at the boundary)
    n_events = np.array([sum(ev.n_warmup_bins >= -x for ev in evs) for x in range(-max_w, 0)]
                        + [sum(ev.n_bins > x for ev in evs) for x in range(max_r)], dtype=int)
    xs = np.arange(-max_w, max_r)
    enough = min(MIN_EVENTS, len(evs))
    thin = n_events < enough
    fig, axes = P.figure(len(dims) + 1, _COLS, panel=_PANEL, legend_width=_LEGEND,
                         title=f"mean over {len(evs)} event(s): real vs {method}")
    _key(fig, method)
    for ax, dim in zip(axes, dims, strict=False):
        k = len(DIMENSIONS[dim])
        acc = {key: np.full((len(evs), n, k), np.nan) for key, n in (("warmup", max_w), ("real", max_r), ("sim", max_r))}
        for i, ev in enumerate(evs):
            s = event_series(ev, dim, ())
            w = s["warmup"]
            if w.shape[0]:
                acc["warmup"][i, max_w - w.shape[0]:] = w  # right-aligned at the boundary
            acc["real"][i, : s["real"].shape[0]] = s["real"]
            acc["sim"][i, : s["sim"].shape[0]] = s["sim"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns
            mean = {key: np.nanmean(a, axis=0) if a.shape[1] else a[0] for key, a in acc.items()}
        _shade_thin(ax, xs, thin)
        _panel(ax, DIMENSIONS[dim], mean["warmup"], mean["real"], mean["sim"], dim, _xlabel(bins))
    ax = axes[-1]
    ax.bar(xs, n_events, width=0.8, color=np.where(thin, "0.75", "0.4"))
    ax.axvline(-0.5, color="k", lw=0.8, ls=":")
    P.style_axes(ax, _xlabel(bins), "events", "events behind each bin"
                 + (f" (light: fewer than {enough})" if thin.any() else ""), ylim=(0, max(1, len(evs))),
                 integer_x=True, integer_y=True)
    return P.save(fig, path, dpi=_DPI)


def _shade_thin(ax, xs: np.ndarray, thin: np.ndarray) -> None:
    """Shade the runs of consecutive bins backed by too few events."""
    i = 0
    while i < len(xs):
        if not thin[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(xs) and thin[j + 1]:
            j += 1
        P.shade_x(ax, xs[i] - 0.5, xs[j] + 0.5)
        i = j + 1


@dataclass(slots=True)
class PlotFiles:
    average: Path
    events: dict[str, Path] = field(default_factory=dict)  # event_id -> png

    def relative_to(self, root: Path) -> dict:
        return {
            "average": str(self.average.relative_to(root)),
            "events": {e: str(p.relative_to(root)) for e, p in self.events.items()},
        }


def write_plots(result: Evaluation, out_dir: Path, max_events: int | None = 50) -> PlotFiles:
    """plots/average.png + plots/event_<id>.png for the first ``max_events`` events (None = all)."""
    out_dir = Path(out_dir)
    method = result.metrics["method"]
    top_n = result.metrics["keywords_top_n"]
    step_size = (result.run.config.get("sim") or {}).get("step_size")
    bins = bin_description(result.metrics.get("binning"), step_size if isinstance(step_size, int) else None)
    evs = list(result.events.values())
    files = PlotFiles(average=plot_average(evs, out_dir / "average.png", method, bins))
    chosen = evs if max_events is None else evs[: max(0, max_events)]
    used: set[str] = set()
    for ev in chosen:
        name = safe_name(ev.event_id)
        while name in used:
            name += "_"
        used.add(name)
        files.events[ev.event_id] = plot_event(ev, out_dir / f"event_{name}.png", method, top_n, bins)
    return files
