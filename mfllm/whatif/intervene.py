"""`mfllm intervene`: a baseline and an intervened arm with paired seeds, and each label share's change.

    from mfllm.whatif.intervene import intervene
    res = intervene(event, "examples/rebuttal.yaml", "out/iv", observe=48, runs=8)

Both arms are R replicas of the event (mfllm.whatif.common) with the same replica ids, action ids and
seed, so they are identical before the intervention; the effects are paired differences of label shares
(mfllm.whatif.stats). Writes effects.json, effects.md, trajectories.png and effects.png
(mfllm.whatif.plots), and the arms' run directories under baseline/ and intervened/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mfllm.backends.base import Backend
from mfllm.data.schema import Event
from mfllm.errors import ConfigError
from mfllm.files import atomic_write_json, atomic_write_text
from mfllm.labels.base import Labeler
from mfllm.labels.dimensions import DIMENSIONS
from mfllm.simulation.engine import SimConfig
from mfllm.simulation.intervention_spec import MeanFieldSignal, build_interventions, parse_spec
from mfllm.simulation.interventions import Intervention
from mfllm.whatif.common import ArmRun, check_config, close_labeler, open_output, replica_events, run_arm
from mfllm.whatif.plots import plot_effects, plot_trajectories
from mfllm.whatif.shares import Trajectories, bin_ranges, block_shares, label_records, per_dim, trajectories
from mfllm.whatif.stats import describe_effect, headline, mean_band, nums, paired_effects, points, summary


def intervene(event: Event, spec: Any, out: str | Path, *, observe: int = 48, horizon: int | None = None,
              runs: int = 8, config: SimConfig | None = None, backend: Backend | None = None,
              backend_name: str = "hf", model: str | None = None, backend_options: dict | None = None,
              labeler: str | Labeler = "rules", label_cache: str | Path | None = None, bin_steps: int = 1,
              window: int = 50, data: str | None = None, spec_path: str | None = None, plots: bool = True,
              progress: bool = True, force: bool = False) -> dict:
    """Run the baseline and the intervened arm (paired seeds) and write effects.json / effects.md / plots.

    horizon: agents simulated after the W observed ones (default: the event's remaining real ones).
    window: the headline effect pools the simulated agents of the first ceil(window / step_size) steps
    from the intervention's first step. Returns the effects dict (also in out/effects.json).
    """
    spec_obj = parse_spec(spec, path=spec_path)
    config = (config or SimConfig()).model_copy(update={"warmup": observe})
    check_config(config)
    if bin_steps < 1:
        raise ConfigError("--bin-steps must be at least 1", field="bin_steps")
    if window < 1:
        raise ConfigError("--window must be at least 1 agent", field="window")
    if horizon is None:
        horizon = len(event.actions) - observe
        if horizon < 1:
            raise ConfigError(f"event {event.event_id} has no real action after the first {observe}; "
                              "give --horizon to simulate resampled agents", field="horizon")
    if spec_obj.lang is None:
        spec_obj = spec_obj.model_copy(update={"lang": config.lang})
    base_events = replica_events(event, runs, observe, horizon, None, config.seed)
    int_events = replica_events(event, runs, observe, horizon, None, config.seed)
    o = open_output(out, force, backend, backend_name, model, backend_options, labeler, label_cache, data,
                    {"command": "intervene", "event": event.event_id, "observe": observe, "horizon": horizon,
                     "runs": runs})
    out, backend, lab, meta = o.out, o.backend, o.labeler, o.meta
    atomic_write_json(out / "whatif.json", {"command": "intervene", "event": event.event_id,
                                            "spec": spec_obj.dump()})
    base = run_arm("baseline", base_events, config, backend, out / "baseline", meta, None, None, progress)
    ivs = build_interventions(spec_obj, lang=config.lang)
    intv = run_arm("intervened", int_events, config, backend, out / "intervened", meta, ivs, spec_obj.dump(),
                   progress)
    try:
        labels = label_records([base, intv], lab)
    finally:
        close_labeler(lab, labeler)
    tb = trajectories(base, labels, event.source.time, config.step_size)
    ti = trajectories(intv, labels, event.source.time, config.step_size, tb.first_step, tb.n_steps)
    result = effects_report(event, spec_obj, ivs, tb, ti, base, intv, config, observe, horizon, runs, bin_steps,
                            window, lab)
    if plots:
        plot_trajectories(out / "trajectories.png", {"baseline": tb, "intervened": ti}, bin_steps,
                          title=f"{event.event_id}: baseline vs intervened ({runs} paired runs)",
                          marker_step=result["intervention"]["start_step"], total=horizon)
        plot_effects(out / "effects.png", result, title=f"{event.event_id}: effect of the intervention (intervened - baseline)")
        result["plots"] = ["trajectories.png", "effects.png"]
    atomic_write_json(out / "effects.json", result)
    atomic_write_text(out / "effects.md", effects_markdown(result))
    return result


def _policy_read(ivs: list[Intervention], rid: str, step: int, text: str) -> str:
    """The mean field the policy read at `step` in the intervened arm (the signal hooks applied)."""
    for iv in ivs:
        if isinstance(iv, MeanFieldSignal) and iv.was_in(rid, step):
            text = iv.apply(text)
    return text


def effects_report(event: Event, spec, ivs, tb: Trajectories, ti: Trajectories, base: ArmRun, intv: ArmRun,
                   config: SimConfig, observe: int, horizon: int, runs: int, bin_steps: int, window: int,
                   lab: Labeler) -> dict:
    rids = base.replica_ids
    firsts = []
    for rid in rids:
        f = [iv.first_step[rid] for iv in ivs if rid in getattr(iv, "first_step", {})]
        firsts.append(min(f) if f else None)
    warnings_: list[str] = []
    if all(f is None for f in firsts):
        warnings_.append("the intervention never became active in the simulated steps: check at_step / at_time "
                         f"(the rollout is steps {tb.first_step}..{tb.first_step + tb.n_steps - 1})")
    starts = [max(tb.first_step, f if f is not None else tb.first_step) for f in firsts]
    start_step = int(np.median(starts)) if starts else tb.first_step
    # identical before the intervention? (common random numbers; a check, reported)
    same_before = all(
        [a.get("sim_text") for r in br if r["step"] < s for a in r["actions"]]
        == [a.get("sim_text") for r in ir if r["step"] < s for a in r["actions"]]
        for br, ir, s in zip(base.records, intv.records, starts, strict=True))
    if not same_before:
        warnings_.append("the arms differ before the intervention step (a backend without per-request seeds?); "
                         "the paired differences then include sampling noise")
    k = config.step_size
    w_steps = max(1, math.ceil(window / k))
    windows = {}
    for name, n in ((f"the first {w_steps * k} agents", w_steps), ("all agents", None)):
        cb, ci = tb.window(starts, n), ti.window(starts, n)
        windows[name] = {
            "steps": n, "planned_agents": None if n is None else n * k,
            "baseline_share": per_dim(block_shares(cb), lambda v: summary(v)["mean"]),
            "intervened_share": per_dim(block_shares(ci), lambda v: summary(v)["mean"]),
            "effect": paired_effects(cb, ci),
            "agents": {"baseline": float(tb.agents.sum(1).mean()), "intervened": float(ti.agents.sum(1).mean())},
        }
    cb, _, hb = tb.bins(bin_steps)
    ci, _, _ = ti.bins(bin_steps)
    nb = cb.shape[1]
    per_bin = []
    for b in range(nb):
        per_bin.append(paired_effects(cb[:, b], ci[:, b]))
    series = {d: {c: {"mean": [per_bin[b][d][c]["mean"] for b in range(nb)],
                      "lo": [None if per_bin[b][d][c]["ci95"] is None else per_bin[b][d][c]["ci95"][0]
                             for b in range(nb)],
                      "hi": [None if per_bin[b][d][c]["ci95"] is None else per_bin[b][d][c]["ci95"][1]
                             for b in range(nb)]}
                  for c in cs} for d, cs in DIMENSIONS.items()}
    sb, si = block_shares(cb), block_shares(ci)
    mb, mi = mean_band(sb)[0], mean_band(si)[0]
    main_name = next(iter(windows))
    head = headline(windows[main_name]["effect"])
    # the mean field the policy read at the intervention step and two steps later (replica 0)
    rid0 = rids[0]
    mf_rows = []
    for s in (start_step, start_step + 2):
        if s - 1 in tb.meanfield[0] or s - 1 in ti.meanfield[0]:
            mf_rows.append({"step": s, "baseline": tb.meanfield[0].get(s - 1, ""),
                            "intervened": _policy_read(ivs, rid0, s, ti.meanfield[0].get(s - 1, ""))})
    return {
        "event": {"event_id": event.event_id, "label": event.label, "source": event.source.text[:200],
                  "real_actions": len(event.actions)},
        "spec": spec.dump(),
        "config": {"observe": observe, "horizon": horizon, "runs": runs, "bin_steps": bin_steps,
                   "step_size": k, "window": window, "sim": config.model_dump(),
                   "labeler": {"name": str(getattr(lab, "name", "?")), "version": str(getattr(lab, "version", "?"))}},
        "intervention": {"start_step": start_step, "first_active_step": firsts,
                         "first_rollout_step": tb.first_step,
                         "agents_before": (start_step - tb.first_step) * k,
                         "items": [{"label": getattr(iv, "label", type(iv).__name__),
                                    "steps": getattr(iv, "steps_in", {}).get(rid0)} for iv in ivs]},
        "paired_identical_before": same_before,
        "interval": "mean of the per-replica paired differences (intervened - baseline) with a 95% Student-t "
                    "interval over the replicas (mfllm.evaluation.metrics.summarize)",
        "headline": [describe_effect(d, c, e, f"over {main_name} from the intervention step on")
                     for d, c, e in head],
        "windows": windows,
        "bins": {"agents": bin_ranges(nb, bin_steps, k, horizon), "hours_after_source": nums(mean_band(hb[..., None])[0])},
        "trajectories": {"baseline": per_dim(mb, nums), "intervened": per_dim(mi, nums)},
        "effect_by_bin": series,
        "meanfield": mf_rows,
        "runs": {"baseline": [str(Path("baseline") / d.name) for d in base.dirs],
                 "intervened": [str(Path("intervened") / d.name) for d in intv.dirs]},
        "seconds": {"baseline": base.seconds, "intervened": intv.seconds},
        "warnings": warnings_,
    }


def effects_markdown(res: dict) -> str:
    ev, cfg = res["event"], res["config"]
    lines = [f"# Intervention effects: {ev['event_id']} ({ev.get('label') or 'unlabelled'})", "",
             f"> {ev['source'][:120]}", "",
             f"- warm-up: {cfg['observe']} real actions; then {cfg['horizon']} simulated agents; "
             f"{cfg['runs']} paired runs (same seeds in both arms); steps of {cfg['step_size']} agents",
             f"- intervention first active at step {res['intervention']['start_step']} "
             f"({res['intervention']['agents_before']} simulated agents after the warm-up)",
             f"- spec: `{json.dumps(res['spec'], ensure_ascii=False)}`",
             f"- arms identical before the intervention: {'yes' if res['paired_identical_before'] else 'NO'}",
             f"- interval: {res['interval']}", ""]
    for w in res.get("warnings", []):
        lines += [f"**warning:** {w}", ""]
    lines += ["## Headline", ""] + [f"- {h}" for h in res["headline"]] + [""]
    for name, w in res["windows"].items():
        lines += [f"## Effect over {name} from the intervention step on", "",
                  "| dimension | category | baseline | intervened | effect (points) | 95% interval | runs |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for d, cats in w["effect"].items():
            for c, e in cats.items():
                b, i = w["baseline_share"][d][c], w["intervened_share"][d][c]
                ci = "-" if e["ci95"] is None else f"{100 * e['ci95'][0]:+.1f} to {100 * e['ci95'][1]:+.1f}"
                lines.append(f"| {d} | {c} | {'-' if b is None else f'{100 * b:.1f}%'} | "
                             f"{'-' if i is None else f'{100 * i:.1f}%'} | {points(e['mean'])} | {ci} | {e['n']} |")
        lines.append("")
    if res.get("meanfield"):
        lines += ["## The mean field the policy read (run r0)", ""]
        for row in res["meanfield"]:
            lines += [f"Step {row['step']}:", "", f"- baseline: {row['baseline']}",
                      f"- intervened: {row['intervened']}", ""]
    if res.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]] + [""]
    return "\n".join(lines)
