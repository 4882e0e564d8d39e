"""RUN_DIR/report.html: one self-contained page (inline CSS, PNGs embedded as base64, no JavaScript).

Contents: the run's settings and warnings, the metrics table (method vs baselines per horizon), the
per-dimension table, the averaged plot, then per event: its plot next to the mean-field text
timeline (one row per step), its scores, and sample rollout actions (real vs simulated).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.evaluation.plots import MAX_KEYWORD_LINES, PlotFiles, keyword_legend
from mfllm.files import atomic_write_text
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.plotting import has_cjk_font

if TYPE_CHECKING:
    from mfllm.evaluation.result import Evaluation

SAMPLE_LABELS = ("stance", "sentiment_tendency", "belief_degree")

_CSS = """
body{font-family:-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
 margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.best{font-weight:bold;background:#e8f5e9}
.row{display:flex;gap:16px;align-items:flex-start}.row img{max-width:62%;height:auto;border:1px solid #eee}
.timeline{max-height:620px;overflow:auto;flex:1;font-size:12px}
.warn{color:#8a4b00}.muted{color:#777}.text{max-width:480px;white-space:pre-wrap;word-break:break-all}
"""


def _scoring(m: dict) -> str:
    """The scoring rule in a few words (the paper's eps rule, or the fair additive one)."""
    sc = m.get("scoring") or {}
    if m.get("eps") is not None:
        return f"KL eps {m['eps']:g}"
    return f"KL/JS additive alpha {sc.get('alpha')}, {sc.get('replicas_pooled')} crowd(s) pooled"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="muted">(no plot for {_e(alt)})</p>'
    b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _stat(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    out = f"{s['mean']:.4f}"
    if s.get("std") is not None:
        out += f" ± {s['std']:.4f}"
    if s.get("ci95"):
        out += f'<br><span class="muted">[{s["ci95"][0]:.4f}, {s["ci95"][1]:.4f}]</span>'
    return out


def _best(values: dict[str, float | None], metric: str) -> str | None:
    vals = {k: v for k, v in values.items() if v is not None}
    if not vals:
        return None
    pick = max if metric in M.HIGHER_IS_BETTER else min
    return pick(vals, key=vals.get)


def summary_table(metrics: dict) -> str:
    head = "".join(f"<th>{_e(m)} {'↑' if m in M.HIGHER_IS_BETTER else '↓'}</th>" for m in M.METRICS)
    rows = []
    for h in D.HORIZONS:
        best = {
            m: _best({s: metrics["summary"][s][h][m]["mean"] for s in metrics["sources"]}, m)
            for m in M.METRICS
        }
        for i, s in enumerate(metrics["sources"]):
            cells = "".join(
                f'<td class="num{" best" if best[m] == s else ""}">{_stat(metrics["summary"][s][h][m])}</td>'
                for m in M.METRICS
            )
            hcell = f'<td rowspan="{len(metrics["sources"])}">{_e(h)}</td>' if i == 0 else ""
            rows.append(f"<tr>{hcell}<td>{_e(s)}</td>{cells}</tr>")
    return f"<table><tr><th>horizon</th><th>source</th>{head}</tr>{''.join(rows)}</table>"


def dimension_table(
    metrics: dict, horizon: str = "long", shown: tuple[str, ...] = ("kl", "js", "micro_f1")
) -> str:
    srcs = metrics["sources"]
    head = "".join(f"<th>{_e(m)}<br>{_e(s)}</th>" for m in shown for s in srcs)
    rows = []
    for d in ALL_DIMENSIONS:
        cells = []
        for m in shown:
            vals = {s: metrics["dimensions"][s][horizon][d][m]["mean"] for s in srcs}
            b = _best(vals, m)
            cells += [f'<td class="num{" best" if b == s else ""}">{_num(vals[s])}</td>' for s in srcs]
        rows.append(f"<tr><td>{_e(d)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>dimension</th>{head}</tr>{''.join(rows)}</table>"


def _event_scores(ev_metrics: dict, sources: list[str]) -> str:
    shown = ("kl", "js", "wasserstein", "tv", "dtw", "micro_f1")
    head = "".join(f"<th>{m}</th>" for m in shown)
    rows = []
    for h in D.HORIZONS:
        for s in sources:
            mac = ev_metrics["scores"][s][h]["macro"]
            rows.append(
                f"<tr><td>{_e(h)}</td><td>{_e(s)}</td>"
                + "".join(f'<td class="num">{_num(mac.get(m))}</td>' for m in shown)
                + "</tr>"
            )
    return f"<table><tr><th>horizon</th><th>source</th>{head}</tr>{''.join(rows)}</table>"


def _timeline(steps: list[dict]) -> str:
    rows = []
    for r in steps:
        mf = r.get("meanfield")
        inj = [a.get("real_text") or "" for a in r["actions"] if a.get("injected")]
        note = "".join(f"<br><b>injected:</b> {_e(t)}" for t in inj)
        rows.append(
            f"<tr><td>{_e(r['step'])}</td><td>{_e(r['phase'])}</td><td>{len(r['actions']) - len(inj)}</td>"
            f'<td class="text">{_e(mf) if mf else "<span class=muted>-</span>"}{note}</td></tr>'
        )
    return (
        '<div class="timeline"><table><tr><th>step</th><th>phase</th><th>actions</th>'
        f"<th>mean field after the step</th></tr>{''.join(rows)}</table></div>"
    )


def _labels_cell(al) -> str:
    if al is None:
        return '<span class="muted">unlabelled</span>'
    return "<br>".join(_e(al.labels.get(d, "-")) for d in SAMPLE_LABELS)


def _samples(steps: list[dict], labels: dict, n: int) -> str:
    rows = []
    for r in steps:
        if r["phase"] == "warmup":
            continue
        for a in r["actions"]:
            if len(rows) >= n:
                break
            if a.get("injected"):
                continue
            real, sim = a.get("real_text"), a.get("sim_text")
            rows.append(
                f"<tr><td>{_e(r['step'])}</td><td>{_e(a.get('agent_id', ''))}</td>"
                f'<td class="text">{_e(real) if real else "<i>(plain repost)</i>"}</td>'
                f"<td>{_labels_cell(labels.get(real) if real is not None else None)}</td>"
                f'<td class="text">{_e(sim) if sim else ("<i>(plain repost)</i>" if sim == "" else "-")}</td>'
                f"<td>{_labels_cell(labels.get(sim) if sim is not None else None)}</td></tr>"
            )
    if not rows:
        return '<p class="muted">(no rollout action)</p>'
    lab = " / ".join(SAMPLE_LABELS)
    return (
        f"<table><tr><th>step</th><th>agent</th><th>real</th><th>{_e(lab)}</th>"
        f"<th>simulated</th><th>{_e(lab)}</th></tr>{''.join(rows)}</table>"
    )


def _keywords_note(vocab: list[str]) -> str:
    if not vocab:
        return ""
    shown = vocab[:MAX_KEYWORD_LINES]
    pairs = ", ".join(
        (f"{_e(k)} = {_e(w)}" if k != w else _e(w))
        for k, w in zip(keyword_legend(tuple(shown)), shown, strict=True)
    )
    font = "" if has_cjk_font() else " (no Chinese font: install one, e.g. fonts-noto-cjk, to see the words)"
    return (f"<p class='muted'>keywords panel: {pairs}{font}; vocabulary ({len(vocab)}): "
            f"{_e(' '.join(vocab))}</p>")


def render_report(
    result: Evaluation, plots: PlotFiles | None = None, max_events: int = 50, samples: int = 8
) -> str:
    m = result.metrics
    parts = [
        "<!DOCTYPE html><html lang='zh'><head><meta charset='utf-8'>",
        f"<title>mfllm report — {_e(m['method'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>mfllm evaluation — method <code>{_e(m['method'])}</code></h1>",
        "<p>"
        f"run <code>{_e(m['run_dir'])}</code> · {m['n_events']} event(s) · "
        f"{m['n_actions']['warmup']} warm-up / {m['n_actions']['rollout']} rollout actions · "
        f"labeler {_e(m['labeler']['name'])} v{_e(m['labeler']['version'])} · "
        f"bins {_e(m['binning']['by'])}:{_e(m['binning']['size'])} · {_scoring(m)} · "
        f"{'complete' if m['complete'] else '<b>incomplete</b>'}</p>",
        f"<p class='muted'>marginal baseline: {_e(m['baselines']['marginal'])}</p>",
    ]
    if m["warnings"]:
        parts.append("<ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in m["warnings"]) + "</ul>")
    parts += [
        "<h2>Metrics (macro over dimensions; mean ± std [95% CI] over events)</h2>",
        "<p class='muted'>short / mid / long = first third / two thirds / all of the rollout; "
        "KL, JS, W1, TV per bin then averaged; DTW over the share trajectories; micro-F1 per agent. "
        "Best per column in green.</p>",
        summary_table(m),
        "<h2>Per dimension (long horizon, mean over events)</h2>",
        dimension_table(m),
        "<h2>Real vs simulated shares, averaged over events</h2>",
        _img(plots.average if plots else None, "average"),
    ]
    shown = [e for e in m["events"] if plots is not None and e in plots.events][:max_events]
    parts.append(f"<h2>Events ({len(shown)} of {m['n_events']} shown)</h2>")
    for e in shown:
        steps = result.run.steps.get(e, [])
        parts += [
            f"<h3 id='ev-{_e(e)}'>event {_e(e)}</h3>",
            f"<div class='row'>{_img(plots.events.get(e) if plots else None, e)}{_timeline(steps)}</div>",
            _keywords_note(m["events"][e].get("keywords_vocab", [])),
            _event_scores(m["events"][e], m["sources"]),
            f"<p><b>sample rollout actions</b> (first {samples})</p>",
            _samples(steps, result.labels, samples),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    result: Evaluation,
    plots: PlotFiles | None = None,
    path: Path | None = None,
    max_events: int = 50,
    samples: int = 8,
) -> Path:
    out = Path(path) if path else result.run.run_dir / "report.html"
    atomic_write_text(out, render_report(result, plots, max_events, samples))
    return out
