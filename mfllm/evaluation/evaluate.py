"""Evaluate a run directory: label every action, compare real vs simulated, write metrics.json.

``evaluate_run(run_dir)`` reads RUN_DIR/steps.jsonl (docs/architecture.md), labels the warm-up's
real actions and the rollout's real and simulated actions, scores the run's method and the two
LLM-free baselines (persistence, marginal) per event, per dimension and per horizon, writes
RUN_DIR/metrics.json (shape: docs/evaluation.md), and by default RUN_DIR/plots/*.png and
RUN_DIR/report.html.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.errors import ConfigError, DataError
from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.evaluation.result import Evaluation  # noqa: F401 - re-exported
from mfllm.files import atomic_write_text
from mfllm.labels.base import ActionLabels, Labeler
from mfllm.labels.dimensions import ALL_DIMENSIONS
from mfllm.store.replicas import base_event_id, replica_dirs
from mfllm.store.run import STEPS
from mfllm.store.rundir import RunData, load_run  # noqa: F401 - re-exported

SCHEMA_VERSION = 1
BASELINES: tuple[str, ...] = ("persistence", "marginal")
LABEL_BATCH = 256


# Reading the run directory lives in the store (load_run, RunData are re-exported here).


def resolve_run_dirs(run_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], Path]:
    """(the run directories to pool, the folder metrics.json goes to).

    One run directory -> itself. A folder holding replica runs ``r0/``, ``r1/``, ... -> those, pooled,
    metrics in the folder. Several run directories (replicas of one run) -> those, metrics in their
    common parent folder."""
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("no run directory given")
    if len(dirs) == 1:
        d = dirs[0]
        if d.is_dir() and not (d / STEPS).is_file() and (reps := replica_dirs(d)):
            return reps, d
        return dirs, d
    parents = {d.resolve().parent for d in dirs}
    if len(parents) != 1:
        raise ConfigError("replica runs pooled together must sit in one folder (metrics.json is written there): "
                          + ", ".join(map(str, dirs)))
    return dirs, parents.pop()


def _rollout_keys(steps: list[dict]) -> list[tuple[int, str]]:
    return [(int(r["step"]), str(a.get("action_id"))) for r in steps if r["phase"] != "warmup"
            for a in r["actions"] if not a.get("injected")]


def pool_replicas(runs: Sequence[RunData], folder: Path) -> tuple[RunData, dict[str, list[list[dict]]]]:
    """Replica runs of one method -> (RunData of replica 0 standing for the set, event -> step records of
    every replica, replica 0 first). Replica ids (``E#rK``) are mapped back to their event."""
    methods = {r.method for r in runs}
    if len(methods) > 1:
        raise ConfigError(f"replica runs of different methods cannot be pooled: {', '.join(sorted(methods))}")
    first = runs[0]
    per_event: dict[str, list[list[dict]]] = {}
    for r in runs:
        for e, steps in r.steps.items():
            per_event.setdefault(base_event_id(e), []).append(steps)
    warnings = [w for r in runs for w in r.warnings]
    pooled = RunData(run_dir=folder, config=first.config, method=first.method,
                     complete=all(r.complete for r in runs),
                     steps={base_event_id(e): s for e, s in first.steps.items()},
                     dropped_lines=sum(r.dropped_lines for r in runs),
                     warnings=list(dict.fromkeys(warnings)))
    return pooled, per_event


# --------------------------------------------------------------------------- labelling


def resolve_labeler(
    labeler: str | Labeler, cache: str | os.PathLike | None = None, **options: Any
) -> Labeler:
    """A Labeler as given, or one by name through ``labelers.make_labeler`` (wrapped in the shared
    SQLite label cache: ``cache`` None = the default file, "" = no cache, else that file)."""
    if not isinstance(labeler, str):
        return labeler
    from mfllm.labels import make_labeler

    return make_labeler(labeler, cache="" if cache == "" else cache, **options)


def label_texts(labeler: Labeler, texts: Sequence[str]) -> dict[str, ActionLabels | None]:
    """Label each distinct text once. Returns text -> labels (None = could not be labelled)."""
    uniq = list(dict.fromkeys(texts))
    name = str(getattr(labeler, "name", "?"))
    out: dict[str, ActionLabels | None] = {}
    for i in range(0, len(uniq), LABEL_BATCH):
        batch = uniq[i : i + LABEL_BATCH]
        res = labeler.label(batch)
        if len(res) != len(batch):
            raise ConfigError(f"labeler {name!r} returned {len(res)} results for {len(batch)} texts")
        out.update(zip(batch, res, strict=True))
    return out


# --------------------------------------------------------------------------- scoring


def build_pooled_event_labels(
    event_id: str, replicas: list[list[dict]], labels: dict[str, ActionLabels | None], binning: D.Binning,
    warnings: list[str] | None = None,
) -> D.EventLabels:
    """Replica 0's event labels with every further replica's simulated labels as ``more_sims``. A replica
    that does not cover the same rollout agents (e.g. still incomplete) is left out, with a warning."""
    ev = build_event_labels(event_id, replicas[0], labels, binning)
    keys = _rollout_keys(replicas[0])
    for k, steps in enumerate(replicas[1:], 1):
        if _rollout_keys(steps) != keys:
            if warnings is not None:
                warnings.append(f"event {event_id}: replica {k} does not cover the same rollout agents; left out")
            continue
        ev.more_sims.append(build_event_labels(event_id, steps, labels, binning).sim)
    return ev


def build_event_labels(
    event_id: str, steps: list[dict], labels: dict[str, ActionLabels | None], binning: D.Binning
) -> D.EventLabels:
    warm, roll = [], []
    for rec in steps:
        for a in rec["actions"]:
            if a.get("injected"):  # an intervention's post, not an agent's action: not scored
                continue
            (warm if rec["phase"] == "warmup" else roll).append(
                (int(rec["step"]), float(a.get("time") or 0.0), a)
            )
    warm.sort(key=lambda x: (x[0], x[1]))
    roll.sort(key=lambda x: (x[0], x[1]))

    def lab(text: str | None) -> ActionLabels | None:
        return None if text is None else labels.get(text)

    return D.EventLabels(
        event_id=event_id,
        warmup=[lab(a.get("real_text")) for _, _, a in warm],
        warmup_bins=D.assign_bins([s for s, _, _ in warm], [t for _, t, _ in warm], binning),
        real=[lab(a.get("real_text")) for _, _, a in roll],
        sim=[lab(a.get("sim_text")) for _, _, a in roll],
        bins=D.assign_bins([s for s, _, _ in roll], [t for _, t, _ in roll], binning),
    )


_ROW_METRICS = (
    ("wasserstein", M.wasserstein_rows),
    ("tv", M.total_variation_rows),
)
_BIN_METRICS = ("kl", "js", "wasserstein", "tv")


def score_horizons(
    real_counts: np.ndarray,
    pred: D.Prediction,
    real_items: Sequence,
    bins: Sequence[int],
    horizons: dict[str, int],
    scoring: M.Scoring = M.FAIR,
) -> dict[str, dict[str, float | None]]:
    """Score one source on one dimension at each horizon (name -> number of leading rollout bins).

    KL/JS (smoothed by the scoring rule) and W1/TV: per bin where both sides have data, then the mean
    over those bins. DTW: over the share trajectories of those bins (bins without data dropped on each
    side). micro-F1: over the agents in those bins, every crowd of the source against the real labels.
    A metric with nothing to compare is None.
    """
    nb = real_counts.shape[0]
    cnt = pred.counts[:nb]
    r_ok = real_counts.sum(1) > 0
    s_ok = np.all(np.isfinite(cnt), axis=1) & (np.nan_to_num(cnt).sum(1) > 0)
    both = r_ok & s_ok
    per = {m: np.full(nb, np.nan) for m in _BIN_METRICS}
    if both.any():
        rc, sc = real_counts[both], cnt[both]
        per["kl"][both], per["js"][both] = M.kl_js_rows(rc, sc, scoring)
        for m, fn in _ROW_METRICS:
            per[m][both] = fn(rc, sc)
    real_sh = D.shares(real_counts)
    sim_sh = np.where(s_ok[:, None], np.nan_to_num(cnt), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim_sh = sim_sh / sim_sh.sum(1, keepdims=True)
    out: dict[str, dict[str, float | None]] = {}
    for h, n_h in horizons.items():
        sel = both[:n_h]
        res: dict[str, float | None] = {
            m: (float(per[m][:n_h][sel].mean()) if sel.any() else None) for m in _BIN_METRICS
        }
        rt, st = real_sh[:n_h][r_ok[:n_h]], sim_sh[:n_h][s_ok[:n_h]]
        res["dtw"] = M.dtw(rt, st) if len(rt) and len(st) else None
        idx = [i for i, b in enumerate(bins) if b < n_h]
        try:
            res["micro_f1"] = M.micro_f1([real_items[i] for _ in pred.items for i in idx],
                                         [items[i] for items in pred.items for i in idx])
        except ValueError:
            res["micro_f1"] = None
        out[h] = res
    return out


def score(
    real_counts: np.ndarray,
    pred: D.Prediction,
    real_items: Sequence,
    bins: Sequence[int],
    n_h: int,
    scoring: M.Scoring = M.FAIR,
) -> dict[str, float | None]:
    """Score over the first ``n_h`` rollout bins (see :func:`score_horizons`)."""
    return score_horizons(real_counts, pred, real_items, bins, {"h": n_h}, scoring)["h"]


def _macro(dims: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in M.METRICS:
        v = [d[m] for d in dims.values() if d.get(m) is not None]
        out[m] = float(np.mean(v)) if v else None
    return out


Crowds = Sequence[Sequence[ActionLabels | None]]


def evaluate_event(
    ev: D.EventLabels,
    method: str | None,
    marginal: dict | None,
    keywords_top_n: int = D.DEFAULT_KEYWORDS_TOP_N,
    scoring: M.Scoring = M.FAIR,
    crowds: dict[str, Crowds] | None = None,
) -> dict[str, Any]:
    """Per-event results: {"scores": {source: {horizon: {"macro": {...}, "dimensions": {...}}}}, ...}.

    Sources: ``method`` (the run's simulated crowds ``ev.sims``; None = no run), the baselines, and each
    of ``crowds`` (name -> crowds of the rollout's agents, e.g. sampled baselines), all scored by
    ``scoring`` (``replicas="first"``: only each source's first crowd)."""
    vocab = ev.vocab(keywords_top_n)
    hb = D.horizon_bins(ev.n_bins)
    all_crowds: dict[str, Crowds] = {**({method: ev.sims} if method else {}), **(crowds or {})}
    if scoring.replicas == "first":
        all_crowds = {k: list(v)[:1] for k, v in all_crowds.items()}
    sources = (*([method] if method else []), *BASELINES, *(crowds or {}))
    scores: dict[str, dict[str, dict[str, dict]]] = {s: {h: {} for h in D.HORIZONS} for s in sources}
    available: dict[str, list[str]] = {s: [] for s in sources}
    for dim in ALL_DIMENSIONS:
        cats = D.categories(dim, vocab)
        real_counts = D.bin_counts(ev.real, ev.bins, ev.n_bins, dim, cats)
        real_items = [D.agent_item(al, dim) for al in ev.real]
        preds = {src: D.crowd_prediction(c, ev, dim, cats) for src, c in all_crowds.items()}
        preds["persistence"] = D.persistence_prediction(ev, dim, cats)
        preds["marginal"] = D.marginal_prediction(marginal, ev, dim, cats)
        for src in sources:
            pred = preds[src]
            if pred is None or ev.n_bins == 0:
                continue
            available[src].append(dim)
            for h, res in score_horizons(real_counts, pred, real_items, ev.bins, hb, scoring).items():
                scores[src][h][dim] = res
    return {
        "n_warmup_actions": len(ev.warmup),
        "n_rollout_actions": len(ev.real),
        "n_bins": ev.n_bins,
        "horizon_bins": hb,
        "crowds": {s: len(c) for s, c in all_crowds.items()},
        "unlabelled": {
            "warmup": sum(al is None for al in ev.warmup),
            "real": sum(al is None for al in ev.real),
            "sim": sum(al is None for al in ev.sim),
        },
        "keywords_vocab": list(vocab),
        "dimensions_available": available,
        "scores": {
            s: {h: {"macro": _macro(scores[s][h]), "dimensions": scores[s][h]} for h in D.HORIZONS}
            for s in sources
        },
    }


def aggregate(
    events: dict[str, dict], sources: Sequence[str], event_ids: Sequence[str] | None = None
) -> dict:
    """Mean / std / 95% CI over events of each source's macro and per-dimension scores."""
    ids = list(events) if event_ids is None else list(event_ids)
    summary: dict = {}
    per_dim: dict = {}
    for s in sources:
        summary[s], per_dim[s] = {}, {}
        for h in D.HORIZONS:
            rows = [events[e]["scores"].get(s, {}).get(h) for e in ids]
            rows = [r for r in rows if r is not None]
            summary[s][h] = {m: M.summarize_metric(m, [r["macro"].get(m) for r in rows]) for m in M.METRICS}
            per_dim[s][h] = {
                d: {m: M.summarize_metric(m, [r["dimensions"].get(d, {}).get(m) for r in rows]) for m in M.METRICS}
                for d in ALL_DIMENSIONS
            }
    return {"summary": summary, "dimensions": per_dim}


def resolve_marginal(marginal, labeler: Labeler) -> tuple[dict | None, str]:
    """(marginal dict or None, where it came from / why it is missing)."""
    name, version = str(getattr(labeler, "name", "?")), str(getattr(labeler, "version", "?"))
    if marginal is None:
        p = D.marginal_path(name, version)
        if p.is_file():
            return D.load_marginal(p), str(p)
        return None, (
            f"no training marginal for labeler {name} v{version} (expected {p}); "
            "pass --marginal FILE (see compute_marginal)"
        )
    if isinstance(marginal, dict):
        return marginal, "given"
    if isinstance(marginal, str | os.PathLike):
        m = D.load_marginal(marginal)
        if (m.get("labeler"), str(m.get("labeler_version"))) != (name, version):
            raise ConfigError(
                f"marginal {marginal} was made with labeler {m.get('labeler')} v{m.get('labeler_version')}, "
                f"not {name} v{version}",
                field="marginal",
            )
        return m, str(marginal)
    # an iterable of training events
    return D.compute_marginal(marginal, labeler), "computed from the given training events"


# metrics.json layout: indented down to these depths, one compact line below them (readable, small).
_JSON_DEPTH = {"summary": 4, "dimensions": 4, "events": 2, "plots": 2}


def _dumps(obj: Any, depth: int, limit: int) -> str:
    if depth >= limit or not isinstance(obj, dict) or not obj:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    pad = " " * (depth + 1)
    items = [
        f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, depth + 1, limit)}" for k, v in obj.items()
    ]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


def dumps_metrics(metrics: dict) -> str:
    """metrics as JSON text: top level indented; summaries one line per metric; one line per event."""
    items = [
        f" {json.dumps(k, ensure_ascii=False)}: {_dumps(v, 1, _JSON_DEPTH.get(k, 1))}"
        for k, v in metrics.items()
    ]
    return "{\n" + ",\n".join(items) + "\n}\n"


def evaluate(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    labeler: str | Labeler = "rules",
    bin_size: float = 1,
    bin_by: str = "steps",
    cache: str | os.PathLike | None = None,
    marginal: Any = None,
    keywords_top_n: int = D.DEFAULT_KEYWORDS_TOP_N,
    scoring: M.Scoring = M.FAIR,
    labeler_options: dict | None = None,
    also: dict[str, M.Scoring] | None = None,
) -> Evaluation:
    """Compute the metrics without writing anything. See :func:`evaluate_run`. ``also``: further
    scoring rules (name -> rule) whose summary and per-event scores go under ``metrics[name]``."""
    t0 = time.monotonic()
    binning = D.Binning(bin_by, bin_size)
    if keywords_top_n < 1:
        raise ConfigError("keywords top-N must be at least 1", field="keywords_top_n")
    dirs, folder = resolve_run_dirs(run_dir)
    run, replicas = pool_replicas([load_run(d) for d in dirs], folder)
    lab = resolve_labeler(labeler, cache, **(labeler_options or {}))
    texts: list[str] = []
    for reps in replicas.values():
        for steps in reps:
            for rec in steps:
                for a in rec["actions"]:
                    if a.get("injected"):
                        continue
                    if a.get("real_text") is not None:
                        texts.append(a["real_text"])
                    if rec["phase"] != "warmup" and a.get("sim_text") is not None:
                        texts.append(a["sim_text"])
    try:
        labels = label_texts(lab, texts)
        marg, marg_src = resolve_marginal(marginal, lab)
    finally:
        if lab is not labeler and hasattr(lab, "close"):
            lab.close()
    warnings = list(run.warnings)
    if marg is None:
        warnings.append(f"marginal baseline unavailable: {marg_src}")
    evs = {e: build_pooled_event_labels(e, reps, labels, binning, warnings) for e, reps in replicas.items()}
    rules = {"": scoring, **(also or {})}
    per_event: dict[str, dict[str, dict]] = {k: {} for k in rules}
    for e, ev in evs.items():
        if ev.n_bins == 0:
            warnings.append(f"event {e}: no rollout step; skipped")
            continue
        if not ev.warmup:
            warnings.append(f"event {e}: no warm-up; persistence baseline unavailable")
        for k, rule in rules.items():
            per_event[k][e] = evaluate_event(ev, run.method, marg, keywords_top_n, rule)
    main = per_event[""]
    if not main:
        raise DataError(str(run.run_dir), "no event has a rollout step: nothing to evaluate")
    sources = [run.method, *BASELINES]
    agg = aggregate(main, sources)
    metrics = {
        "schema": SCHEMA_VERSION,
        "run_dir": str(run.run_dir),
        "replica_dirs": [str(d) for d in dirs] if len(dirs) > 1 or dirs[0] != folder else None,
        "method": run.method,
        "complete": run.complete,
        "labeler": {"name": str(getattr(lab, "name", "?")), "version": str(getattr(lab, "version", "?"))},
        "binning": binning.to_dict(),
        "horizons": {h: f"{n}/{d}" for h, (n, d) in D.HORIZON_FRACTIONS.items()},
        "keywords_top_n": keywords_top_n,
        "eps": scoring.eps if scoring.smoothing == "eps" else None,
        "scoring": {**scoring.describe(), "replicas_pooled": len(dirs) if scoring.replicas == "pooled" else 1},
        "metrics": list(M.METRICS),
        "higher_is_better": sorted(M.HIGHER_IS_BETTER),
        "majority_biased": ["micro_f1"],
        "dimensions_list": list(ALL_DIMENSIONS),
        "sources": sources,
        "baselines": {"persistence": "warm-up real distribution carried forward", "marginal": marg_src},
        "n_events": len(main),
        "n_actions": {
            "warmup": sum(v["n_warmup_actions"] for v in main.values()),
            "rollout": sum(v["n_rollout_actions"] for v in main.values()),
        },
        "summary": agg["summary"],
        "dimensions": agg["dimensions"],
        "events": main,
    }
    for k, rule in (also or {}).items():
        metrics[k] = {"scoring": {**rule.describe(), "replicas_pooled": len(dirs) if rule.replicas == "pooled" else 1},
                      "summary": aggregate(per_event[k], sources)["summary"], "events": per_event[k]}
    metrics["warnings"] = warnings
    metrics["seconds"] = round(time.monotonic() - t0, 3)
    return Evaluation(run=run, metrics=metrics, events={e: evs[e] for e in main}, labels=labels)


def evaluate_run(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    labeler: str | Labeler = "rules",
    bin_size: float = 1,
    bin_by: str = "steps",
    cache: str | os.PathLike | None = None,
    marginal: Any = None,
    keywords_top_n: int = D.DEFAULT_KEYWORDS_TOP_N,
    scoring: M.Scoring = M.FAIR,
    plots: bool = True,
    report: bool = True,
    max_event_plots: int | None = 50,
    labeler_options: dict | None = None,
    also: dict[str, M.Scoring] | None = None,
) -> dict:
    """Evaluate RUN_DIR and write RUN_DIR/metrics.json (+ plots/ and report.html unless disabled).

    RUN_DIR may be a folder of replica runs (r0/, r1/, ...) or a list of replica run directories: their
    simulated crowds are pooled per bin (:func:`resolve_run_dirs`; metrics.json goes to that folder).
    scoring: the rule (default :data:`metrics.FAIR`; :data:`metrics.PAPER` = the paper's, eps = 1e-6,
    one crowd); ``also``: further rules recorded under metrics[name] (e.g. {"paper": PAPER}).

    labeler: "rules" (default), "llm" (needs labeler_options={"backend": ...}) or a Labeler.
    bin_by/bin_size: "steps" (steps per bin, default 1), "actions" (actions per bin) or "seconds"
    (seconds per bin). cache: the label cache for a labeler given by name (None = the shared default
    file ~/.cache/mfllm/labels.sqlite, "" = none, else a path). marginal: None (the packaged mfllm/assets/marginal_<labeler>_v<ver>.json if present),
    a marginal dict / JSON path, or training events to compute it from. Returns the metrics dict.
    """
    result = evaluate(
        run_dir, labeler, bin_size, bin_by, cache, marginal, keywords_top_n, scoring, labeler_options, also
    )
    rd = result.run.run_dir
    plot_files = None
    if plots or report:
        from mfllm.evaluation.plots import write_plots

        plot_files = write_plots(result, rd / "plots", max_events=max_event_plots)
        result.metrics["plots"] = plot_files.relative_to(rd)
    atomic_write_text(rd / "metrics.json", dumps_metrics(result.metrics))
    if report:
        from mfllm.evaluation.report import write_report

        write_report(result, plot_files)
    return result.metrics


# --------------------------------------------------------------------------- display


def fmt(stat: dict | None, digits: int = 3) -> str:
    """mean, and ±std on a second line when there is one."""
    if not stat or stat.get("mean") is None:
        return "-"
    s = f"{stat['mean']:.{digits}f}"
    if stat.get("std") is not None:
        s += f"\n±{stat['std']:.{digits}f}"
    return s


def metric_header(m: str) -> str:
    return M.SHORT_NAMES.get(m, m) + (" ↑" if m in M.HIGHER_IS_BETTER else " ↓")


def metrics_table(metrics: dict, title: str | None = None):
    """A rich Table: one row per (source, horizon), one column per metric (mean ± std over events)."""
    from rich.table import Table

    t = Table(
        title=title
        or f"{metrics['method']} — {metrics['n_events']} event(s), labeler {metrics['labeler']['name']}"
        f" v{metrics['labeler']['version']}, bins {metrics['binning']['by']}:{metrics['binning']['size']}",
        caption="mean over events (±std); macro over dimensions",
    )
    t.add_column("source", no_wrap=True)
    t.add_column("horizon", no_wrap=True)
    for m in M.METRICS:
        t.add_column(metric_header(m), justify="right", no_wrap=True)
    for s in metrics["sources"]:
        for h in D.HORIZONS:
            row = metrics["summary"][s][h]
            t.add_row(s, h, *(fmt(row[m]) for m in M.METRICS))
        t.add_section()
    return t
