"""PNG plots (matplotlib, Agg): real vs simulated share of each label over time, per dimension.

One figure per event (warm-up real shares, then rollout real (solid) vs simulated (dashed), the
warm-up/rollout boundary as a vertical line) and one averaged over events, aligned at the boundary
(x = bins relative to the rollout's first bin; keywords left out since vocabularies differ).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mfllm.evaluation import distributions as D  # noqa: E402
from mfllm.labels.dimensions import ALL_DIMENSIONS, DIMENSIONS, KEYWORDS  # noqa: E402

if TYPE_CHECKING:
    from mfllm.evaluation.evaluate import Evaluation

MAX_KEYWORD_LINES = 6  # keywords panel: the most frequent vocabulary words only
_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "Arial Unicode MS",
)


def _setup_fonts() -> bool:
    """Put an installed CJK font first; False if there is none (keywords are then shown as k1, k2...)."""
    names = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [n for n in _CJK_FONTS if n in names]
    if cjk:
        plt.rcParams["font.sans-serif"] = [*cjk, *plt.rcParams["font.sans-serif"]]
        plt.rcParams["font.family"] = "sans-serif"
    return bool(cjk)


HAS_CJK_FONT = _setup_fonts()


def keyword_legend(vocab: tuple[str, ...]) -> list[str]:
    """The labels the keywords panel uses for the vocabulary: the words, or k1, k2... without a CJK font."""
    return list(vocab) if HAS_CJK_FONT else [f"k{i + 1}" for i in range(len(vocab))]


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


def _panel(ax, cats, warm, real, sim, title: str, x0: int = 0, keep: list[int] | None = None) -> None:
    nw = warm.shape[0]
    keep = list(range(len(cats))) if keep is None else keep
    xw = np.arange(x0 - nw, x0)
    xr = np.arange(x0, x0 + real.shape[0])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, k in enumerate(keep):
        c = colors[j % len(colors)]
        if nw:
            ax.plot(np.append(xw, xr[:1]), np.append(warm[:, k], real[:1, k]), color=c, lw=1.2, alpha=0.55)
        ax.plot(xr, real[:, k], color=c, lw=1.6, marker="o", ms=2.5, label=str(cats[k]))
        ax.plot(xr, sim[:, k], color=c, lw=1.6, ls="--", marker="x", ms=3)
    ax.axvline(x0 - 0.5, color="k", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right", ncol=2, frameon=False)


def _grid(n: int):
    cols = 3
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    # fixed margins: tight_layout costs seconds per figure
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.05, top=0.92, wspace=0.18, hspace=0.35)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. missing glyphs in an event id
        fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_event(
    ev: D.EventLabels, path: Path, method: str = "sim", keywords_top_n: int = D.DEFAULT_KEYWORDS_TOP_N
) -> Path:
    vocab = ev.vocab(keywords_top_n)
    fig, axes = _grid(len(ALL_DIMENSIONS))
    for ax, dim in zip(axes, ALL_DIMENSIONS, strict=False):
        s = event_series(ev, dim, vocab)
        keep, cats = None, s["cats"]
        if dim == KEYWORDS:
            keep = list(range(min(len(vocab), MAX_KEYWORD_LINES))) + [len(vocab)]
            cats = (*keyword_legend(vocab), "other")
        _panel(ax, cats, s["warmup"], s["real"], s["sim"], dim, keep=keep)
    fig.suptitle(
        f"event {ev.event_id}: real (solid) vs {method} (dashed); dotted line = rollout start; x = bins from the rollout start",
        fontsize=10,
    )
    _save(fig, path)
    return path


def plot_average(evs: list[D.EventLabels], path: Path, method: str = "sim") -> Path:
    """Mean share over events per bin offset from the rollout start (categorical dimensions)."""
    dims = list(DIMENSIONS)
    max_w = max((ev.n_warmup_bins for ev in evs), default=0)
    max_r = max((ev.n_bins for ev in evs), default=0)
    fig, axes = _grid(len(dims))
    for ax, dim in zip(axes, dims, strict=False):
        k = len(DIMENSIONS[dim])
        acc = {
            key: np.full((len(evs), n, k), np.nan)
            for key, n in (("warmup", max_w), ("real", max_r), ("sim", max_r))
        }
        for i, ev in enumerate(evs):
            s = event_series(ev, dim, ())
            w = s["warmup"]
            if w.shape[0]:
                acc["warmup"][i, max_w - w.shape[0] :] = w  # right-aligned at the boundary
            acc["real"][i, : s["real"].shape[0]] = s["real"]
            acc["sim"][i, : s["sim"].shape[0]] = s["sim"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns
            mean = {key: np.nanmean(a, axis=0) if a.shape[1] else a[0] for key, a in acc.items()}
        _panel(ax, DIMENSIONS[dim], mean["warmup"], mean["real"], mean["sim"], dim)
    fig.suptitle(
        f"mean over {len(evs)} event(s): real (solid) vs {method} (dashed); x = bins from rollout start",
        fontsize=10,
    )
    _save(fig, path)
    return path


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
    evs = list(result.events.values())
    files = PlotFiles(average=plot_average(evs, out_dir / "average.png", method))
    chosen = evs if max_events is None else evs[: max(0, max_events)]
    used: set[str] = set()
    for ev in chosen:
        name = safe_name(ev.event_id)
        while name in used:
            name += "_"
        used.add(name)
        files.events[ev.event_id] = plot_event(ev, out_dir / f"event_{name}.png", method, top_n)
    return files
