"""Compare several evaluated runs (methods) side by side, over the events they all cover.

``compare_runs([RUN_A, RUN_B, ...])`` reads each RUN_DIR/metrics.json (evaluating the run first if it
has none; a RUN_DIR may be a folder of replica runs r0/, r1/, ..., evaluated pooled), keeps the events common to every run, recomputes each method's mean / std / 95% CI over
those events, adds the LLM-free baselines (persistence, marginal: they depend only on the real
data, so they are taken from the first run) and reports the relative KL change of every ``mf`` run
against the best non-MF method and against each baseline: ``(KL_mf - KL_other) / KL_other``
(negative = mf is better).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mfllm.errors import ConfigError, DataError
from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.evaluation.evaluate import BASELINES, SCHEMA_VERSION, evaluate_run, fmt, metric_header

MF = "mf"
_MUST_MATCH = ("labeler", "binning", "keywords_top_n", "eps", "scoring")


def _load_metrics(run_dir: Path, evaluate_missing: bool, evaluate_kwargs: dict) -> dict:
    p = run_dir / "metrics.json"
    if not p.is_file():
        if not evaluate_missing:
            raise DataError(str(p), "no metrics.json: run `mfllm evaluate` on this run first")
        return evaluate_run(run_dir, **evaluate_kwargs)
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(str(p), f"cannot read: {e}") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA_VERSION or "events" not in m:
        raise DataError(
            str(p), f"not an mfllm metrics file of schema {SCHEMA_VERSION}; re-run `mfllm evaluate`"
        )
    return m


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return (a - b) / b


def compare_runs(
    run_dirs: Sequence[str | os.PathLike], evaluate_missing: bool = True, **evaluate_kwargs: Any
) -> dict:
    """Side-by-side comparison of runs. ``evaluate_kwargs`` go to evaluate_run for runs without metrics."""
    if len(run_dirs) < 1:
        raise ConfigError("compare needs at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(str(d), "run directory not found")
    all_m = [_load_metrics(d, evaluate_missing, evaluate_kwargs) for d in dirs]
    ref = all_m[0]
    for d, m in zip(dirs[1:], all_m[1:], strict=True):
        for key in _MUST_MATCH:
            if m.get(key) != ref.get(key):
                raise ConfigError(
                    f"{d} was evaluated with {key}={m.get(key)!r} but {dirs[0]} with {ref.get(key)!r}; "
                    "re-evaluate them with the same settings"
                )
    names: list[str] = []
    for d, m in zip(dirs, all_m, strict=True):
        name = m["method"]
        if name in names or name in BASELINES or sum(x["method"] == name for x in all_m) > 1:
            name = f"{m['method']} ({d.name})"
        while name in names:
            name += "'"
        names.append(name)
    common = [e for e in ref["events"] if all(e in m["events"] for m in all_m)]
    if not common:
        raise DataError(", ".join(map(str, dirs)), "the runs have no event in common")
    warnings: list[str] = []
    for d, m in zip(dirs, all_m, strict=True):
        extra = len(m["events"]) - len(common)
        if extra:
            warnings.append(f"{d}: {extra} event(s) not in every run were left out")
        if not m.get("complete", True):
            warnings.append(f"{d}: run is incomplete")

    def stats(m: dict, source: str) -> dict:
        return {
            h: {
                met: M.summarize([m["events"][e]["scores"][source][h]["macro"].get(met) for e in common])
                for met in M.METRICS
            }
            for h in D.HORIZONS
        }

    summary = {n: stats(m, m["method"]) for n, m in zip(names, all_m, strict=True)}
    base_src = next((m for m in all_m if m["method"] == MF), ref)
    for b in BASELINES:
        summary[b] = stats(base_src, b)

    relative: dict[str, dict] = {}
    methods = dict(zip(names, [m["method"] for m in all_m], strict=True))
    for n, meth in methods.items():
        if meth != MF:
            continue
        relative[n] = {}
        for h in D.HORIZONS:
            kl_mf = summary[n][h]["kl"]["mean"]
            others = {o: summary[o][h]["kl"]["mean"] for o, om in methods.items() if om != MF}
            others = {o: v for o, v in others.items() if v is not None}
            entry: dict[str, Any] = {"kl": kl_mf}
            if others:
                best = min(others, key=others.get)
                entry["vs_best_non_mf"] = {
                    "against": best,
                    "kl": others[best],
                    "change": _rel(kl_mf, others[best]),
                }
            else:
                entry["vs_best_non_mf"] = None
            for b in BASELINES:
                kb = summary[b][h]["kl"]["mean"]
                entry[f"vs_{b}"] = (
                    {"against": b, "kl": kb, "change": _rel(kl_mf, kb)} if kb is not None else None
                )
            relative[n][h] = entry
    if not relative:
        warnings.append("no run of method 'mf': no relative KL change reported")
    return {
        "schema": SCHEMA_VERSION,
        "runs": [
            {"name": n, "method": m["method"], "run_dir": str(d)}
            for n, m, d in zip(names, all_m, dirs, strict=True)
        ],
        "rows": [*names, *BASELINES],
        "labeler": ref.get("labeler"),
        "binning": ref.get("binning"),
        "n_events": len(common),
        "events": common,
        "summary": summary,
        "relative_kl": relative,
        "warnings": warnings,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def compare_tables(result: dict) -> list:
    """Rich tables: metrics per (horizon, method) and, if there is an mf run, its relative KL change."""
    from rich.table import Table

    t = Table(
        title=f"{len(result['runs'])} run(s) over {result['n_events']} common event(s)",
        caption="mean over events (±std); macro over dimensions",
    )
    t.add_column("horizon", no_wrap=True)
    t.add_column("method", no_wrap=True)
    for m in M.METRICS:
        t.add_column(metric_header(m), justify="right", no_wrap=True)
    for h in D.HORIZONS:
        for r in result["rows"]:
            t.add_row(h, r, *(fmt(result["summary"][r][h][m]) for m in M.METRICS))
        t.add_section()
    out = [t]
    if result["relative_kl"]:
        r = Table(title="relative KL change of mf (negative = mf better)")
        r.add_column("mf run")
        r.add_column("horizon")
        r.add_column("vs best non-MF", justify="right")
        for b in BASELINES:
            r.add_column(f"vs {b}", justify="right")
        for n, per_h in result["relative_kl"].items():
            for h, e in per_h.items():
                best = e["vs_best_non_mf"]
                cells = [f"{_pct(best['change'])} ({best['against']})" if best else "-"]
                cells += [_pct(e[f"vs_{b}"]["change"]) if e[f"vs_{b}"] else "-" for b in BASELINES]
                r.add_row(n, h, *cells)
        out.append(r)
    return out
