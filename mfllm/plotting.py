"""The one plotting style (matplotlib, Agg): small multiples with labelled axes, a grid, shaded bands,
legends beside the panels (never over the data) and a key of line styles under the figure's title.

    from mfllm import plotting as P

    fig, axes = P.figure(8, cols=4, title="...", legend_width=1.1)
    P.key(fig, [("forecast (band: 5-95% of runs)", "-", "o"), ("real", "--", "x")])
    for ax in axes:
        ax.plot(x, y, "-o", color=P.colors()[0], label="comment")
        P.band(ax, x, lo, hi, P.colors()[0])
        P.style_axes(ax, "agents after the warm-up", "share of agents", "behavior_type", ylim=(0, 1))
        P.legend(ax)
    P.save(fig, out / "plot.png")

Used by the what-if plots (mfllm.whatif.plots) and the evaluation plots (mfllm.evaluation.plots); the
training curves follow the same recipe with one panel per curve group.

Chinese text: the first installed font of CJK_FONTS is put first in the sans-serif list. When
matplotlib's font cache has none, the system's font files are looked through once (so a font installed
after the cache was built works without rebuilding the cache by hand). Without any CJK font, text falls
back to DejaVu Sans without warnings, and callers that show Chinese words (the evaluation's keywords
panel) write k1, k2... instead; ``apt install fonts-noto-cjk`` (or any font of CJK_FONTS) makes them
render.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.files import atomic_write_bytes

CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "Noto Sans CJK JP",  # the same Noto CJK file, named by its first face; holds the Chinese glyphs too
    "Noto Sans CJK TC",
    "Arial Unicode MS",
)
# font files worth adding when the font cache predates them (matched on the file name)
_CJK_FILES = re.compile(r"(cjk|sourcehan|wqy|wenquanyi|droidsansfallback|simhei|msyh|pingfang|heiti|"
                        r"notosanssc|arialuni)", re.IGNORECASE)

STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 3,
    "savefig.dpi": 110,
}

# fixed margins in inches (tight_layout / constrained layout cost about a second per figure)
_LEFT = 0.62  # y label and tick labels of each panel
_RIGHT = 0.12
_BOTTOM = 0.5  # x label of the last row
_ROW_GAP = 0.78  # x label of a row + title of the next
_TITLE = 0.42  # the figure's title
_PANEL_TITLE = 0.3  # each panel's title, above its axes
_KEY = 0.3  # the key of line styles, between the figure's title and the panels' titles


def pyplot():
    """matplotlib.pyplot with the Agg backend and this style (imported on first use: matplotlib costs about
    half a second to import, and most commands never plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _apply_style()
    return plt


@cache
def _apply_style() -> None:
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    cjk = cjk_font()
    if cjk:
        plt.rcParams["font.sans-serif"] = [cjk, *plt.rcParams["font.sans-serif"]]
        plt.rcParams["font.family"] = "sans-serif"


@cache
def cjk_font() -> str | None:
    """The name of an installed font that draws Chinese, or None."""
    from matplotlib import font_manager

    fm = font_manager.fontManager
    names = {f.name for f in fm.ttflist}
    found = next((n for n in CJK_FONTS if n in names), None)
    if found is None:
        try:
            files = [f for f in font_manager.findSystemFonts() if _CJK_FILES.search(Path(f).name)]
        except Exception:  # pragma: no cover - an unreadable font folder is not an error here
            files = []
        for f in files:
            try:
                fm.addfont(f)
            except Exception:  # pragma: no cover - a broken font file
                continue
        names = {f.name for f in fm.ttflist}
        found = next((n for n in CJK_FONTS if n in names), None)
    return found


def has_cjk_font() -> bool:
    return cjk_font() is not None


def colors() -> list[str]:
    return list(pyplot().rcParams["axes.prop_cycle"].by_key()["color"])


def figure(n: int, cols: int, *, panel: tuple[float, float] = (3.3, 2.3), legend_width: float = 1.0,
           title: str | None = None, key: bool = True):
    """A figure of ``n`` panels in ``cols`` columns, each ``panel`` inches, with ``legend_width`` inches
    beside each panel for its legend (see :func:`legend`); unused grid cells are hidden. ``key``: leave
    room under the title for :func:`key`. Returns (fig, list of the n axes)."""
    plt = pyplot()
    rows = max(1, -(-n // cols))
    pw, ph = panel
    top = (_TITLE if title else 0.1) + _PANEL_TITLE + (_KEY if key else 0.0)
    width = cols * (_LEFT + pw + legend_width) - legend_width + max(legend_width, _RIGHT)
    height = top + rows * ph + (rows - 1) * _ROW_GAP + _BOTTOM
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=_LEFT / width, right=1 - max(legend_width, _RIGHT) / width,
                        bottom=_BOTTOM / height, top=1 - top / height,
                        wspace=(legend_width + _LEFT) / pw, hspace=_ROW_GAP / ph)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def style_axes(ax, xlabel: str, ylabel: str, title: str | None = None, *,
               ylim: tuple[float, float] | None = None, integer_x: bool = False,
               integer_y: bool = False) -> None:
    """Labelled axes with the grid; ylim (0, 1) for shares gets a small margin so 0 and 1 stay visible;
    integer_x / integer_y: ticks on whole numbers only (bins, counts)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ylim is not None:
        lo, hi = ylim
        pad = 0.02 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if integer_x or integer_y:
        from matplotlib.ticker import MaxNLocator  # matplotlib is imported on first use (see pyplot)

        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if integer_y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True)


def band(ax, x, lo, hi, color: str, alpha: float = 0.18) -> None:
    """A shaded band between lo and hi (NaN = a gap)."""
    ax.fill_between(np.asarray(x, dtype=float), values(lo), values(hi), color=color, alpha=alpha, lw=0)


def legend(ax, title: str | None = None, **kw) -> None:
    """The panel's legend beside it (right of the axes), so it never covers the data."""
    if not ax.get_legend_handles_labels()[0]:
        return
    opts = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "frameon": False,
            "handlelength": 1.6, "title": title, "title_fontsize": 7, **kw}
    ax.legend(**opts)


def key(fig, entries: Iterable[tuple[str, str, str | None]], color: str = "0.25") -> None:
    """A figure-level key of line styles under the title: (label, linestyle, marker) per entry; a
    linestyle "" draws the marker alone, "|" a dotted vertical line."""
    from matplotlib.lines import Line2D

    handles = []
    for label, ls, marker in entries:
        if ls == "|":
            h = Line2D([], [], color="k", lw=0.8, ls=":", marker="|", ms=8, label=label)
        else:
            h = Line2D([], [], color=color, ls=ls or "none", marker=marker or "", ms=4, label=label)
        handles.append(h)
    top = fig.subplotpars.top
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, top + _PANEL_TITLE / fig.get_figheight()),
               ncol=len(handles), frameon=False, fontsize=8, handlelength=2.2, columnspacing=1.6)


def shade_x(ax, x0: float, x1: float, label: str | None = None) -> None:
    """A light grey span over [x0, x1] (e.g. bins backed by too few events)."""
    ax.axvspan(x0, x1, color="0.85", alpha=0.5, lw=0, label=label)


def values(seq: Sequence | np.ndarray) -> np.ndarray:
    """A float array from a list that may hold None (-> NaN)."""
    if isinstance(seq, np.ndarray):
        return seq.astype(float)
    return np.array([np.nan if v is None else v for v in seq], dtype=float)


def save(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Write the PNG atomically (a reader never sees half a file) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # glyphs missing from the fallback font (an event id in Chinese without a CJK font): drawn as boxes
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
