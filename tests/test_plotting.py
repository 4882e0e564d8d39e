"""mfllm.plotting: the one plotting style (labelled axes, grid, legends beside the data, atomic PNGs)."""

from __future__ import annotations

import warnings

import numpy as np

from mfllm import plotting as P


def _panels():
    fig, axes = P.figure(3, cols=2, title="three panels", legend_width=1.0)
    P.key(fig, [("mean", "-", "o"), ("real", "--", "x"), ("start", "|", None)])
    x = np.arange(10)
    for j, ax in enumerate(axes):
        for c in range(3):
            ax.plot(x, np.full(10, 0.9 - 0.1 * c), "-o", label=f"category {c}")  # data in the upper right
        P.band(ax, x, [0.1] * 10, [None] * 5 + [0.3] * 5, P.colors()[0])
        P.style_axes(ax, "agents after the warm-up", "share of agents", f"panel {j}", ylim=(0, 1), integer_x=True)
        P.legend(ax)
    return fig, axes


def test_panels_have_labels_grid_and_legends_outside_the_data():
    fig, axes = _panels()
    assert len(axes) == 3 and len(fig.axes) == 4 and not fig.axes[3].get_visible()  # the unused cell is hidden
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [ax.get_window_extent(r) for ax in axes]
    for ax, box in zip(axes, boxes, strict=True):
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert all(line.get_visible() for line in ax.get_ygridlines())
        lo, hi = ax.get_ylim()
        assert lo < 0 and hi > 1  # 0 and 1 stay visible
        leg = ax.get_legend().get_window_extent(r)
        assert leg.x0 >= box.x1  # beside the panel, never on its data
        for other in boxes:
            assert not leg.overlaps(other)  # nor on the next panel
        assert leg.x1 <= fig.bbox.x1 + 1  # and inside the figure
    P.pyplot().close(fig)


def test_save_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    fig, _ = _panels()
    path = P.save(fig, tmp_path / "sub" / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]  # no temp file left behind
    assert fig.number not in P.pyplot().get_fignums()


def test_chinese_text_renders_or_falls_back_without_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig, axes = P.figure(1, cols=1, title="网传某地发生重大事故")
        axes[0].plot([0, 1], [0, 1], label="辟谣")
        P.style_axes(axes[0], "时间", "占比")
        P.legend(axes[0])
        P.save(fig, tmp_path / "zh.png")
    assert not [w for w in caught if "Glyph" in str(w.message) or "findfont" in str(w.message)]
    font = P.cjk_font()
    assert font is None or font in P.CJK_FONTS
    if font:  # the CJK font comes first, so Chinese is drawn with it
        assert P.pyplot().rcParams["font.sans-serif"][0] == font


def test_values_turns_none_into_gaps():
    v = P.values([0.5, None, 1])
    assert v[0] == 0.5 and np.isnan(v[1]) and v[2] == 1
