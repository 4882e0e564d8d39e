"""RUN_DIR/report.html: one self-contained page (inline CSS, PNGs embedded as base64, no JavaScript).

Contents: the run's settings and warnings, the metrics table (method vs baselines per horizon; n events
beside every mean, a bootstrap interval from n = 3 on), a glossary of the metrics and baselines, the
per-dimension table, the averaged plot, then per event: its source post and rumor label (read from the
data the run was made from, when that is still there), its plot next to the mean-field text timeline
(one row per step), its scores, and sample rollout actions (real vs simulated).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mfllm.data.load import iter_events
from mfllm.errors import MfllmError
from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.evaluation.plots import MAX_KEYWORD_LINES, PlotFiles, bin_description, keyword_legend
from mfllm.files import atomic_write_text
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.plotting import has_cjk_font
from mfllm.seeds import derive_seed

if TYPE_CHECKING:
    from mfllm.evaluation.result import Evaluation
    from mfllm.store.rundir import RunData

SAMPLE_LABELS = ("stance", "sentiment_tendency", "belief_degree")
MIN_N_INTERVAL = 3  # fewer events: no interval (two points say nothing about the spread of a mean)
BOOTSTRAP_RESAMPLES = 2000
# The range each metric can take (W1's upper end depends on the dimension: K - 1); intervals stay inside.
METRIC_RANGE: dict[str, tuple[float, float]] = {
    "kl": (0.0, math.inf), "js": (0.0, 1.0), "wasserstein": (0.0, math.inf), "tv": (0.0, 1.0),
    "dtw": (0.0, math.inf), "micro_f1": (0.0, 1.0),
}  # fmt: skip
SOURCE_CUT = 160  # characters of the source post in the events table (the event's section shows all)
CJK_HINT = "install a Chinese font to see the words: apt-get install fonts-noto-cjk (no cache rebuild needed)"

_CSS = """
body{font-family:-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
 margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.best{font-weight:bold;background:#e8f5e9}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.row img{max-width:100%;height:auto;border:1px solid #eee}
.timeline{max-height:420px;overflow:auto;flex:1;min-width:420px;font-size:12px}
.warn{color:#8a4b00}.muted{color:#777}.text{max-width:480px;white-space:pre-wrap;word-break:break-all}
.n{color:#777;font-size:11px}.note{font-size:13px;max-width:1100px}
.glossary{background:#f7f9fc;border:1px solid #d6dde8;padding:8px 14px;font-size:13px;max-width:1100px}
.glossary dt{font-weight:bold;float:left;clear:left;width:150px}.glossary dd{margin:0 0 4px 160px}
.source{background:#fafafa;border-left:4px solid #90a4ae;padding:6px 12px;max-width:1100px;font-size:14px}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;background:#607d8b}
td.post{max-width:760px}.tag.rumor{background:#c62828}.tag.non-rumor{background:#2e7d32}
"""


def _scoring(m: dict) -> str:
    """The scoring rule in a few words (the paper's eps rule, or the fair additive one)."""
    sc = m.get("scoring") or {}
    if m.get("eps") is not None:
        return f"KL eps {m['eps']:g}"
    return f"KL/JS additive alpha {sc.get('alpha')}, {sc.get('replicas_pooled')} crowd(s) pooled"


@dataclass(slots=True)
class EventSource:
    """What the report shows of an event's source post."""

    text: str
    label: str | None  # the data's rumor label ("rumor" / "non-rumor"), None when the data has none
    time: float | None


def load_sources(run: RunData, event_ids: list[str]) -> tuple[dict[str, EventSource], str | None]:
    """The source post of each event, read again from the data the run was made from (config.json's
    ``data``). Returns (found, why some or all are missing, or None). Never raises: a report is still
    worth having when the data has moved."""
    data = run.config.get("data")
    if not isinstance(data, str) or not data:
        return {}, "the run's config.json names no data path (its events were passed in memory)"
    if not Path(data).exists():
        return {}, f"the run's data {data} is not on this machine (moved or deleted)"
    found: dict[str, EventSource] = {}
    try:
        for ev in iter_events(data, event_ids=event_ids, skipped=[]):
            found[ev.event_id] = EventSource(ev.source.text, ev.label, ev.source.time)
    except (MfllmError, OSError) as e:
        return found, f"cannot read the run's data {data}: {e}"
    missing = [e for e in event_ids if e not in found]
    if missing:
        return found, f"{len(missing)} event(s) not found in the run's data {data}"
    return found, None


def _source_block(src: EventSource | None, why: str | None) -> str:
    if src is None:
        return f'<p class="muted">source post not available{": " + _e(why) if why else ""}</p>'
    label = src.label or "no label in the data"
    cls = src.label if src.label in ("rumor", "non-rumor") else ""
    when = ""
    if src.time is not None and math.isfinite(src.time):
        when = f' · posted {datetime.fromtimestamp(src.time, UTC):%Y-%m-%d %H:%M} UTC'
    return (f'<div class="source"><span class="tag {cls}">{_e(label)}</span>'
            f'<span class="muted"> source post{when}</span><br>{_e(src.text) or "<i>(empty)</i>"}</div>')


def events_table(metrics: dict, listed: list[str], sources: dict[str, EventSource], why: str | None,
                 linked: set[str]) -> str:
    """One row per listed event: rumor label, source post (cut), actions; the id links to its section
    when the report has one (``linked``)."""
    rows = []
    for e in listed:
        ev, src = metrics["events"][e], sources.get(e)
        eid = f"<a href='#ev-{_e(e)}'>{_e(e)}</a>" if e in linked else _e(e)
        if src is None:
            label, text = "-", '<span class="muted">not available</span>'
        else:
            cls = src.label if src.label in ("rumor", "non-rumor") else ""
            label = f'<span class="tag {cls}">{_e(src.label or "none")}</span>'
            cut = src.text if len(src.text) <= SOURCE_CUT else src.text[:SOURCE_CUT] + "…"
            text = _e(cut)
        rows.append(f"<tr><td>{eid}</td><td>{label}</td><td class='post'>{text}</td>"
                    f"<td class='num'>{ev['n_warmup_actions']}</td><td class='num'>{ev['n_rollout_actions']}</td></tr>")
    note = f'<p class="muted">source posts not available: {_e(why)}</p>' if why else ""
    more = len(metrics["events"]) - len(listed)
    if more > 0:
        note += f'<p class="muted">… and {more} more event(s) in metrics.json</p>'
    return (
        "<table><tr><th>event</th><th>label</th><th>source post</th><th>warm-up<br>actions</th>"
        f"<th>rollout<br>actions</th></tr>{''.join(rows)}</table>{note}"
    )


def _glossary(bins: str) -> str:
    """One plain line per metric and baseline (the tables' columns and rows); ``bins``: what a bin is."""
    items = [
        ("KL ↓", "Kullback-Leibler divergence (nats): how surprised you would be by the real crowd's label "
                 "shares if you expected the simulated ones. 0 = identical; it grows fast when the "
                 "simulation leaves out a reaction real people had."),
        ("JS ↓", "Jensen-Shannon divergence: a symmetric, bounded KL. 0 = identical shares, 1 = no overlap."),
        ("W1 ↓", "Wasserstein-1 (earth mover's) distance: how far, in steps between the categories (in "
                 "the order listed in docs/labels.md), shares must move to turn the simulated crowd into "
                 "the real one. 0 = identical."),
        ("TV ↓", "Total variation: the share of people who would have to change category. 0 to 1."),
        ("DTW ↓", "Dynamic time warping: the gap between the real and simulated share curves over time, "
                  "allowing one to run a little ahead of or behind the other. 0 = the same course."),
        ("F1 ↑", "micro-F1: how often each simulated person got the same label as the real person in "
                 "their place. 1 = all right; it favours always guessing the most common label."),
        ("persistence", "baseline that predicts no change: the warm-up's real shares for every later bin."),
        ("marginal", "baseline that ignores the event: the label shares of all training events."),
        ("short / mid / long", "the first third / two thirds / all of the rollout (after the warm-up)."),
        ("bin", f"the unit of time the shares are counted in ({_e(bins)})."),
        ("n", "the number of events a mean is taken over."),
    ]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return (f'<div class="glossary"><b>What the columns mean</b> (↓ lower is better, ↑ higher is better; '
            f"KL, JS, W1, TV are computed per bin, then averaged)<dl>{rows}</dl></div>")


def _bins(result: Evaluation) -> str:
    step_size = (result.run.config.get("sim") or {}).get("step_size")
    return bin_description(result.metrics.get("binning"), step_size if isinstance(step_size, int) else None)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="muted">(no plot for {_e(alt)})</p>'
    b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def interval(values, metric: str, *seed_parts: object) -> dict:
    """Mean over events with n, and a 95% percentile-bootstrap interval of the mean when n >= 3 (else
    None). The bootstrap resamples the events themselves, so the interval never leaves the range the
    per-event values span (a t-interval over 2 events gave W1 [-9.3, 13.5]); it is also clipped to the
    metric's range. Resampling is seeded by ``seed_parts``: the same metrics give the same report."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "n": 0, "ci95": None}
    out = {"mean": float(v.mean()), "n": n, "ci95": None}
    if n >= MIN_N_INTERVAL:
        rng = np.random.default_rng(derive_seed("report-bootstrap", metric, *seed_parts))
        means = v[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        rlo, rhi = METRIC_RANGE.get(metric, (-math.inf, math.inf))
        out["ci95"] = [float(max(lo, rlo)), float(min(hi, rhi))]
    return out


def _stat(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    out = f'{s["mean"]:.4f} <span class="n">n={s["n"]}</span>'
    if s.get("ci95"):
        out += f'<br><span class="muted">[{s["ci95"][0]:.4f}, {s["ci95"][1]:.4f}]</span>'
    return out


def event_values(metrics: dict, source: str, horizon: str, metric: str) -> list[float | None]:
    """The per-event macro values of one cell of the summary table."""
    out = []
    for ev in metrics["events"].values():
        row = ev["scores"].get(source, {}).get(horizon)
        out.append(None if row is None else row["macro"].get(metric))
    return out


def _best(values: dict[str, float | None], metric: str) -> str | None:
    vals = {k: v for k, v in values.items() if v is not None}
    if not vals:
        return None
    pick = max if metric in M.HIGHER_IS_BETTER else min
    return pick(vals, key=vals.get)


def _metric_head(m: str) -> str:
    return f"{_e(M.SHORT_NAMES.get(m, m))} {'↑' if m in M.HIGHER_IS_BETTER else '↓'}"


def summary_table(metrics: dict) -> str:
    """Method vs baselines per horizon: mean over events, n, and the bootstrap interval (n >= 3)."""
    head = "".join(f"<th>{_metric_head(m)}</th>" for m in M.METRICS)
    rows = []
    for h in D.HORIZONS:
        stats = {
            s: {m: interval(event_values(metrics, s, h, m), m, s, h) for m in M.METRICS}
            for s in metrics["sources"]
        }
        best = {m: _best({s: stats[s][m]["mean"] for s in metrics["sources"]}, m) for m in M.METRICS}
        for i, s in enumerate(metrics["sources"]):
            cells = "".join(
                f'<td class="num{" best" if best[m] == s else ""}">{_stat(stats[s][m])}</td>'
                for m in M.METRICS
            )
            hcell = f'<td rowspan="{len(metrics["sources"])}">{_e(h)}</td>' if i == 0 else ""
            rows.append(f"<tr>{hcell}<td>{_e(s)}</td>{cells}</tr>")
    return f"<table><tr><th>horizon</th><th>source</th>{head}</tr>{''.join(rows)}</table>"


def dimension_table(
    metrics: dict, horizon: str = "long", shown: tuple[str, ...] = ("kl", "js", "micro_f1")
) -> str:
    """Mean over events per dimension; n = the events scored on that dimension (the range when the
    sources differ, e.g. no warm-up keyword for persistence)."""
    srcs = metrics["sources"]
    head = "".join(f"<th>{_metric_head(m)}<br>{_e(s)}</th>" for m in shown for s in srcs)
    rows = []
    for d in ALL_DIMENSIONS:
        cells = []
        ns = set()
        for m in shown:
            cell = {s: metrics["dimensions"][s][horizon][d][m] for s in srcs}
            vals = {s: c["mean"] for s, c in cell.items()}
            ns |= {c.get("n", 0) for c in cell.values() if c["mean"] is not None}
            b = _best(vals, m)
            cells += [f'<td class="num{" best" if b == s else ""}">{_num(vals[s])}</td>' for s in srcs]
        n = "-" if not ns else str(min(ns)) if len(ns) == 1 else f"{min(ns)}–{max(ns)}"
        rows.append(f"<tr><td>{_e(d)}</td><td class='num n'>{n}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>dimension</th><th>n</th>{head}</tr>{''.join(rows)}</table>"


def _event_scores(ev_metrics: dict, sources: list[str]) -> str:
    shown = M.METRICS
    head = "".join(f"<th>{_metric_head(m)}</th>" for m in shown)
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
    font = "" if has_cjk_font() else f" ({CJK_HINT})"
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
        f"{_e(_bins(result))} · {_scoring(m)} · "
        f"{'complete' if m['complete'] else '<b>incomplete</b>'}</p>",
        f"<p class='muted'>marginal baseline: {_e(m['baselines']['marginal'])}</p>",
    ]
    if m["warnings"]:
        parts.append("<ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in m["warnings"]) + "</ul>")
    listed = list(m["events"])[:max_events]
    sources, why = load_sources(result.run, listed) if listed else ({}, None)
    with_plot = {e for e in listed if plots is not None and e in plots.events}
    parts += [
        "<h2>Events</h2>",
        events_table(m, listed, sources, why, with_plot),
        "<h2>Metrics (macro over dimensions; mean over events)</h2>",
        summary_table(m),
        f"<p class='muted note'>Each cell: the mean over the n events scored, and under it a 95% interval "
        f"of that mean: a percentile bootstrap over events ({BOOTSTRAP_RESAMPLES} resamples, clipped to the "
        f"metric's range), given only when n ≥ {MIN_N_INTERVAL}"
        + (f" (here n = {m['n_events']}: no interval; run more events to get one)"
           if m["n_events"] < MIN_N_INTERVAL else "")
        + ". Best per column in green. metrics.json's ci95 is a Student-t interval: with few events it can "
        "cross 0.</p>",
        _glossary(_bins(result)),
        "<h2>Per dimension (long horizon, mean over events)</h2>",
        dimension_table(m),
        "<h2>Real vs simulated shares, averaged over events</h2>",
        _img(plots.average if plots else None, "average"),
    ]
    shown = [e for e in listed if e in with_plot]
    parts.append(f"<h2>Event by event ({len(shown)} of {m['n_events']} shown)</h2>")
    for e in shown:
        steps = result.run.steps.get(e, [])
        src = sources.get(e)
        title = f"event {_e(e)}" + (f" · {_e(src.label)}" if src is not None and src.label else "")
        parts += [
            f"<h3 id='ev-{_e(e)}'>{title}</h3>",
            _source_block(src, why),
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
