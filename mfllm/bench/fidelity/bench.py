"""The whole bench: select the events, simulate the LLM rows (:mod:`.run`), score them and the LLM-free
rows (:mod:`.label_rows`) under the default rule and the paper's, aggregate, write OUT/results.json and
OUT/results.md (shape: docs/results.md)."""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mfllm.bench.fidelity import label_rows
from mfllm.bench.fidelity.aggregate import aggregate, order_rows, row_scores
from mfllm.bench.fidelity.cost import machine_info, model_fingerprint, run_cost
from mfllm.bench.fidelity.report import render_markdown
from mfllm.bench.fidelity.rows import BASELINES, SAMPLED_ROWS, MethodSpec
from mfllm.bench.fidelity.run import CostLedger, log, run_all
from mfllm.bench.fidelity.settings import FidelitySettings, resolve_specs
from mfllm.data.load import load_events
from mfllm.errors import ConfigError
from mfllm.evaluation import distributions as D
from mfllm.evaluation.domains import tag_domain
from mfllm.evaluation.evaluate import evaluate_run, resolve_labeler, resolve_marginal
from mfllm.evaluation.metrics import METRICS, PAPER, Scoring
from mfllm.files import atomic_write_json, atomic_write_text
from mfllm.paths import DEFAULT_MODEL, SAMPLE_DATA
from mfllm.simulation.decision import policy_model, policy_spec

SCHEMA = 2
KIND = "mfllm-bench-fidelity"


def select_events(settings: FidelitySettings):
    """(events, info): the split's events in id order with at least max(warm-ups) + min_rollout actions
    (so every warm-up has a rollout to score), then the first ``limit``."""
    data = settings.data or str(SAMPLE_DATA)
    res = load_events(data, split=settings.split, event_ids=settings.events)
    if settings.events:
        missing = set(settings.events) - {e.event_id for e in res.events}
        if missing:
            raise ConfigError(f"events not found in {data} (split {settings.split}): {', '.join(sorted(missing)[:5])}",
                              field="events")
    need = max(settings.all_warmups()) + max(1, settings.min_rollout)
    ok = [e for e in res.events if len(e.actions) >= need]
    events = ok[: settings.limit] if settings.limit is not None else ok
    if not events:
        raise ConfigError(f"no event of {data} (split {settings.split}) has the {need} actions needed "
                          f"(warm-up {max(settings.all_warmups())} + {settings.min_rollout} rollout)")
    info = {"data": str(Path(data).resolve()), "split": settings.split, "in_split": len(res.events),
            "too_short": len(res.events) - len(ok), "min_actions": need, "selected": len(events)}
    return events, info


def _check(settings: FidelitySettings, specs: list[MethodSpec]) -> list[str]:
    by_name = {s.name: s for s in specs}
    if specs and (settings.reference not in by_name or not by_name[settings.reference].is_mf):
        if settings.reference != "mf" or "mf" in by_name or any(s.is_mf for s in specs):
            raise ConfigError(f"--reference {settings.reference!r} is not a mean-field row of this bench (rows: "
                              f"{', '.join(by_name)})", field="reference")
    decide = bool(policy_spec(policy_model(settings.backend, settings.model)).get("decision_header"))
    for s in specs:
        if s.meanfield_header and not decide:
            raise ConfigError(f"row {s.name}: mfheader needs a decide model (one whose mfllm_policy.json sets "
                              f"decision_header); --model {settings.model or 'default'} has none", field="variant")
        for p in (s.policy_adapter, s.meanfield_adapter):
            if p and not Path(p).expanduser().is_dir():
                raise ConfigError(f"row {s.name}: adapter directory {p} does not exist", field="adapter")
    if settings.meanfield_adapter and not any(s.meanfield == "llm" for s in specs):
        return ["--meanfield-adapter is ignored: no row uses the llm mean field (--meanfield llm)"]
    return []


def run_fidelity(settings: FidelitySettings, console=None, backend_factory: Callable[[dict], Any] | None = None) -> dict:
    """Simulate (or continue), evaluate, aggregate; write OUT/results.json and OUT/results.md."""
    t_start = time.time()
    out = Path(settings.out)
    specs = resolve_specs(settings)
    by_name = {s.name: s for s in specs}
    warnings = _check(settings, specs)
    events, sel = select_events(settings)
    if sel["too_short"]:
        warnings.append(f"{sel['too_short']} event(s) of the split with fewer than {sel['min_actions']} actions "
                        "were not selected")
    out.mkdir(parents=True, exist_ok=True)
    log(console, f"fidelity bench: {len(specs)} LLM row(s) x {settings.replicas} replica(s) x "
                 f"{len(settings.all_warmups())} warm-up(s) on {len(events)} events -> {out}")
    outcomes = run_all(settings, specs, events, sel["data"], console, backend_factory) if specs else []

    scoring = Scoring(alpha=settings.alpha)
    rules = {"": scoring, "paper": PAPER}
    ledger = CostLedger(out / "cost.json")
    meta = {e.event_id: {"domain": tag_domain(e.source.text), "n_actions": len(e.actions)} for e in events}
    labeler = resolve_labeler(settings.labeler, settings.label_cache)
    try:
        marginal, marginal_src = resolve_marginal(settings.marginal, labeler)
        train_pool, model, mo_info = label_rows.train_side(
            sel["data"], labeler, settings.main_warmup(), settings.step_size, settings.max_agents,
            settings.train_events, out / "label-rows", lambda m: log(console, m))
        if model is None:
            warnings.append(f"marginal-sampled and mf-oracle left out: {mo_info.get('why')}")
        binning = D.Binning(settings.bin_by, settings.bin_size)
        per_w: dict[int, dict] = {}
        metrics_any = None
        for w in settings.all_warmups():
            scores: dict[str, dict] = {}
            paper: dict[str, dict] = {}
            mets: dict[str, dict] = {}
            for o in (o for o in outcomes if o.warmup == w):
                log(console, f"evaluate {o.key}")
                m = evaluate_run(o.run_dir, labeler=labeler, bin_size=settings.bin_size, bin_by=settings.bin_by,
                                 marginal=marginal, scoring=scoring, plots=settings.reports,
                                 report=settings.reports, also={"paper": PAPER})
                mets[o.spec.name] = metrics_any = m
                scores[o.spec.name] = row_scores(m, m["method"])
                paper[o.spec.name] = row_scores(m, m["method"], "paper")
            log(console, f"score the LLM-free rows (warm-up {w})")
            sks = label_rows.skeletons(events, labeler, w, settings.step_size, settings.max_agents, binning)
            lab = label_rows.score(sks, rules, settings.replicas, settings.seed, marginal, D.DEFAULT_KEYWORDS_TOP_N,
                                   train_pool, model if w == settings.main_warmup() else None)
            label_names = [*BASELINES, *(r for r in SAMPLED_ROWS
                                         if any(r in v["scores"] for v in lab[""].values()))]
            for r in label_names:
                scores[r] = {e: v["scores"][r] for e, v in lab[""].items() if r in v["scores"]}
                paper[r] = {e: v["scores"][r] for e, v in lab["paper"].items() if r in v["scores"]}
            order = order_rows([o.spec.name for o in outcomes if o.warmup == w], label_names)
            scores = {r: scores[r] for r in order}
            paper = {r: paper[r] for r in order}
            block = aggregate(scores, paper, by_name, meta, settings.bootstrap, settings.reference)
            block["cost"] = {o.spec.name: run_cost(o.run_dir, ledger.data.get(o.key, []))
                             for o in outcomes if o.warmup == w}
            block["runs"] = {o.spec.name: str(Path("runs") / o.key) for o in outcomes if o.warmup == w}
            block["warnings"] = sorted({x for m in mets.values() for x in m.get("warnings", [])})
            per_w[w] = block
    finally:
        if hasattr(labeler, "close"):
            labeler.close()

    main = per_w[settings.main_warmup()]
    warnings += main["warnings"]
    if marginal is None:
        warnings.append("marginal baseline unavailable: " + str(marginal_src))
    cfg_example = {}
    if outcomes:
        cfg_example = json.loads((outcomes[0].run_dir / "r0" / "config.json").read_text(encoding="utf-8"))
    model_path = settings.model or (str(DEFAULT_MODEL) if settings.backend == "hf" else None)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": KIND,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": settings.command(),
        "label": settings.label,
        "settings": {
            "data": sel["data"], "split": settings.split, "limit": settings.limit,
            "events_selection": sel, "seed": settings.seed, "warmup": settings.main_warmup(),
            "warmups": settings.all_warmups(), "max_agents": settings.max_agents, "step_size": settings.step_size,
            "replicas": settings.replicas,
            "model": model_path if specs else None,
            "model_sha256": model_fingerprint(model_path) if specs else None,
            "backend": settings.backend, "backend_described": cfg_example.get("backend"),
            "labeler": metrics_any["labeler"] if metrics_any else {"name": labeler.name, "version": str(labeler.version)},
            "binning": binning.to_dict(),
            "horizons": {h: f"{n}/{d}" for h, (n, d) in D.HORIZON_FRACTIONS.items()},
            "marginal": marginal_src,
            "bootstrap": settings.bootstrap,
            "reference": settings.reference,
            "train_events": settings.train_events,
        },
        "scoring": {"rule": "fair", "replicas": settings.replicas, "pooled": "per bin",
                    "smoothing": "additive (counts, both sides)", "alpha": settings.alpha,
                    "bins": binning.to_dict(), "metrics_smoothed": ["kl", "js"], "majority_biased": ["micro_f1"],
                    "headline": "without_keywords"},
        "machine": machine_info((cfg_example.get("backend") or {}).get("device")),
        "specs": {s.name: s.model_dump() for s in specs},
        "rows": main["rows"],
        "llm_rows": [s.name for s in specs],
        "baselines": list(BASELINES),
        "sampled_rows": [r for r in main["rows"] if r in SAMPLED_ROWS],
        "metrics": list(METRICS),
        "horizons": list(D.HORIZONS),
        "n_events": main["n_events"],
        "events": main["events"],
        "methods": main["methods"],
        "spread": main["spread"],
        "relative_kl": main["relative_kl"],
        "ceiling": main["ceiling"],
        "without_keywords": main["without_keywords"],
        "paper": {"scoring": PAPER.describe() | {"replicas": 1}, **main["paper"]},
        "dimensions": main["dimensions"],
        "domains": main["domains"],
        "mf_oracle": mo_info,
        "cost": main["cost"],
        "runs": main["runs"],
        "per_event": main["per_event"],
    }
    if len(per_w) > 1:
        results["warmup_sensitivity"] = {
            str(w): {"n_events": b["n_events"], "methods": b["methods"], "spread": b["spread"],
                     "relative_kl": b["relative_kl"], "without_keywords": b["without_keywords"],
                     "cost": b["cost"], "runs": b["runs"]}
            for w, b in per_w.items()}
    results["warnings"] = warnings
    results["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_markdown(results))
    return results
